"""Backing files, read-only: where unallocated clusters of an image get their data.

A backing file is raw or qcow2 (which may have a backing file of its own).  Its
name is relative to the directory of the image that names it, as in QEMU.
Encrypted backing files would need a key of their own: not supported yet.
"""

import os

from nbdcrypt.errors import InputError, UnsupportedError
from nbdcrypt.plugin.store import FileStore

MAX_DEPTH = 16


class Backing:
    """Read-only data of ``size`` bytes read by ``read_into(buf, offset)``; zeros past its end."""

    def __init__(self, read_into, size, close):
        self._read_into = read_into
        self.size = size
        self.close = close

    def read(self, buf, offset):
        view = memoryview(buf)
        inside = max(0, min(len(view), self.size - offset))
        if inside:
            self._read_into(view[:inside], offset)
        view[inside:] = bytes(len(view) - inside)


def open_backing(header, image_path, depth=0):
    """The backing file named by ``header`` of the image at ``image_path``."""
    from nbdcrypt.formats.qcow2.header import Qcow2Header, probe

    if depth >= MAX_DEPTH:
        raise InputError(f"{image_path}: backing chain longer than {MAX_DEPTH}")
    path = os.path.join(os.path.dirname(image_path), header.backing_file)
    store = FileStore(path, readonly=True)
    with open(path, "rb") as f:
        fmt = header.backing_format or probe(f) or "raw"
        if fmt == "raw":
            return Backing(store.read_into, store.size(), store.close)
        if fmt != "qcow2":
            raise UnsupportedError(f"{path}: backing format {fmt} is not supported")
        backing = Qcow2Header.read(f, path)
    if backing.encryption:
        raise UnsupportedError(f"{path}: encrypted backing files are not supported yet")
    parent = open_backing(backing, path, depth + 1) if backing.backing_file else None
    volume = backing.open_volume(store, None, parent)
    return Backing(volume.read, volume.size, volume.close)
