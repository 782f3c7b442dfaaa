"""The floor of nbdkit's Python plugin: pread/pwrite on a raw file, no crypto, no locks.

``nbdkit python bench/passthrough_plugin.py file=IMAGE``: what any Python plugin pays
per request (nbdkit -> embedded interpreter -> back) before doing its own work.
"""

import os

import nbdkit

API_VERSION = 2
_path = None


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global _path
    _path = value


def open(readonly):
    return os.open(_path, os.O_RDONLY if readonly else os.O_RDWR)


def close(fd):
    os.close(fd)


def get_size(fd):
    return os.fstat(fd).st_size


def pread(fd, buf, offset, flags):
    os.preadv(fd, [buf], offset)


def pwrite(fd, buf, offset, flags):
    os.pwrite(fd, buf, offset)
