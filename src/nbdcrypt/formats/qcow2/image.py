"""An opened qcow2 image: its header and how its volume is built on a store, with
the backing chain below it.  Kept apart from :mod:`.header` (which only parses) so
that parsing never depends on the data path."""

from nbdcrypt.errors import InputError
from nbdcrypt.formats.qcow2.backing import MISSING_KEY, Backing, backing_chain
from nbdcrypt.formats.qcow2.header import Qcow2Header
from nbdcrypt.formats.qcow2.volume import Qcow2Volume
from nbdcrypt.storage.store import FileStore


class Qcow2Image(Qcow2Header):
    """A qcow2 header that opens its volume (see :func:`open_qcow2`)."""

    def open_volume(self, store, key=None, backing_keys=b"", backing_dirs=()):
        return open_qcow2(self, store, key, backing_keys=backing_keys, backing_dirs=backing_dirs)


def open_qcow2(header, store, key=None, backing=None, backing_keys=b"", backing_dirs=()):
    """The plaintext block device of the image ``header`` describes, on ``store``;
    ``backing`` overrides the backing file named in the header (an object with
    ``size`` and ``read(buf, offset)``), whose encrypted files open with
    ``backing_keys`` and which may lie in ``backing_dirs`` (:func:`open_backing`)."""
    if backing is None and header.backing_file:
        backing = open_backing(header, store.path, backing_keys, backing_dirs)
    return Qcow2Volume(header, store, header.cipher(key), backing)


def open_backing(header, image_path, keys=b"", backing_dirs=()):
    """The backing file of the image at ``image_path``, its chain opened read-only;
    ``keys`` as :func:`unlock_backing` returns them."""
    chain = backing_chain(header, image_path, backing_dirs)
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
        volume = open_qcow2(header, store, key, parent)
    except BaseException:
        store.close()
        raise
    return Backing(volume.read, volume.size, volume.close)
