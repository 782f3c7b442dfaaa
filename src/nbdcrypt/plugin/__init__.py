"""The data path: backing store, encrypted volume and the nbdkit glue.

Nothing here imports :mod:`nbdcrypt.daemon`; this package runs inside nbdkit's
embedded Python.
"""
