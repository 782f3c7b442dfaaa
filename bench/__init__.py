"""Benchmarks: bench.run (nbdcrypt against its peers over NBD) and bench.engine_bench (the cipher engine)."""
