"""Backing files, read-only: where unallocated clusters of an image get their data.

A backing file is raw or qcow2 (which may have a backing file of its own).  Its
name is relative to the directory of the image that names it, as in QEMU.  An
encrypted qcow2 backing file (LUKS or legacy AES) needs its own master key: the
keys of a chain's encrypted files travel as one buffer, in chain order (nearest
first), each as long as its header says.  Each is unlocked with its own passphrase,
given in the same order; the last one given also opens any deeper encrypted file,
so one passphrase serves a chain that shares it.
"""

import os

from nbdcrypt.crypto.secrets import joined
from nbdcrypt.errors import InputError, UnsupportedError
from nbdcrypt.plugin.store import FileStore

MAX_DEPTH = 16
MISSING_KEY = "the backing file is encrypted: give its passphrase (--backing-key-file)"
WHICH_KEYS = "one --backing-key-file per encrypted backing file, nearest first"


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


def backing_chain(header, image_path):
    """[(path, qcow2 header, or None for raw)] below the image at ``image_path``,
    nearest first.  ``header`` may be any format's: only qcow2 has backing files."""
    from nbdcrypt.formats.qcow2.header import Qcow2Header, probe

    chain, seen, path = [], {os.path.realpath(image_path)}, image_path
    while getattr(header, "backing_file", None):
        if len(chain) == MAX_DEPTH:
            raise InputError(f"{image_path}: backing chain longer than {MAX_DEPTH}")
        path = os.path.join(os.path.dirname(path), header.backing_file)
        if os.path.realpath(path) in seen:
            raise InputError(f"{image_path}: backing chain loops back to {path}")
        seen.add(os.path.realpath(path))
        with _open(path) as f:
            fmt = header.backing_format or probe(f) or "raw"
            if fmt not in ("raw", "qcow2"):
                raise UnsupportedError(f"{path}: backing format {fmt} is not supported")
            header = Qcow2Header.read(f, path) if fmt == "qcow2" else None
        chain.append((path, header))
    return chain


def unlock_backing(header, image_path, passphrases):
    """The master keys of the chain's encrypted files, the k-th unlocked with
    ``passphrases[k]`` (or the last one, past the end); one Secret to wipe, empty
    if none is encrypted."""
    encrypted = [(path, b) for path, b in backing_chain(header, image_path) if b and b.encryption]
    if passphrases and not encrypted:
        raise InputError(f"{image_path}: a backing key was given, but no backing file is encrypted")
    if len(passphrases) > len(encrypted):
        raise InputError(f"{image_path}: {len(passphrases)} backing keys for {len(encrypted)} encrypted "
                         f"backing files ({WHICH_KEYS})")
    keys = []  # Secrets: wiped when freed, should a later one fail
    for k, (path, backing) in enumerate(encrypted):
        if not passphrases:
            raise InputError(f"{path}: {MISSING_KEY}")
        with _open(path) as f:
            keys.append(backing.unlock(passphrases[min(k, len(passphrases) - 1)], f))
    return joined(keys)


def backing_key_bytes(header, image_path):
    """How long the buffer of :func:`unlock_backing` is."""
    return sum(b.key_bytes for _, b in backing_chain(header, image_path) if b and b.encryption)


def open_backing(header, image_path, keys=b""):
    """The backing file of the image at ``image_path``, its chain opened read-only;
    ``keys`` as :func:`unlock_backing` returns them."""
    chain = backing_chain(header, image_path)
    keys = memoryview(keys)
    keyed = []
    for path, backing in chain:
        need = backing.key_bytes if backing else 0
        if len(keys) < need:
            raise InputError(f"{path}: {MISSING_KEY}")
        keyed.append((path, backing, keys[:need]))
        keys = keys[need:]
    if len(keys):
        raise InputError(f"{image_path}: {len(keys)} bytes of backing keys left over")
    parent = None
    try:
        for path, backing, key in reversed(keyed):
            parent = _open_one(path, backing, key, parent)
    except BaseException:
        if parent is not None:
            parent.close()
        raise
    return parent


def _open_one(path, header, key, parent):
    """One file of the chain, on top of ``parent`` (its own backing file)."""
    store = FileStore(path, readonly=True)
    if header is None:
        return Backing(store.read_into, store.size(), store.close)
    try:
        if header.encryption:
            header.check_master_key(key)
        volume = header.open_volume(store, key, parent)
    except BaseException:
        store.close()
        raise
    return Backing(volume.read, volume.size, volume.close)


def _open(path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise InputError(f"{path}: cannot open backing file: {e.strerror}") from None
