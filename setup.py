"""The native AES sector kernel (src/nbdcrypt/crypto/_sector.c) over OpenSSL's libcrypto;
`make deps` installs the compiler and headers.  Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("nbdcrypt.crypto._sector", ["src/nbdcrypt/crypto/_sector.c"],
                             libraries=["crypto"], extra_compile_args=["-O3"])])
