"""An opened qcow2 image: its header and how its volume is built on a store, with
the backing chain below it.  Kept apart from :mod:`.header` (which only parses) so
that parsing never depends on the data path."""

from collections.abc import Sequence

from nbdcrypt.datapath.queueing import CryptPath
from nbdcrypt.errors import InputError
from nbdcrypt.formats.image import Key
from nbdcrypt.formats.qcow2.backing import MISSING_KEY, Backing, backing_chain
from nbdcrypt.formats.qcow2.header import Qcow2Header
from nbdcrypt.formats.qcow2.volume import Qcow2Volume
from nbdcrypt.storage.store import FileStore, Store


class Qcow2Image(Qcow2Header):
    """A qcow2 header that opens its volume (see :func:`open_qcow2`)."""

    def open_volume(self, store: Store, key: Key, path: CryptPath | None = None, backing_keys: Key = b"",
                    backing_dirs: Sequence[str] = ()) -> Qcow2Volume:
        return open_qcow2(self, store, key, path=path, backing_keys=backing_keys, backing_dirs=backing_dirs)


def open_qcow2(header: Qcow2Header, store: Store, key: Key, backing: Backing | None = None, backing_keys: Key = b"",
               backing_dirs: Sequence[str] = (), path: CryptPath | None = None) -> Qcow2Volume:
    """The plaintext block device of the image ``header`` describes, on ``store``;
    ``backing`` overrides the backing file named in the header, whose encrypted
    files open with ``backing_keys`` and which may lie in ``backing_dirs``
    (:func:`open_backing`).
    The image and its backing chain share the queueing layer ``path`` (default: a
    new one), which gets each cipher's key for its worker processes."""
    path = CryptPath() if path is None else path
    if backing is None and header.backing_file:
        backing = open_backing(header, store.path, backing_keys, backing_dirs, path)
    cipher = header.cipher(key)
    path.register(cipher, key)
    return Qcow2Volume(header, store, cipher, backing, path)


def open_backing(header: Qcow2Header, image_path: str, keys: Key, backing_dirs: Sequence[str],
                 path: CryptPath) -> Backing | None:
    """The backing file of the image at ``image_path``, its chain opened read-only on
    the queueing layer ``path``; ``keys`` as :func:`unlock_backing` returns them."""
    chain = backing_chain(header, image_path, backing_dirs)
    keys = memoryview(keys)
    keyed = []
    for file, backing in chain:
        need = backing.key_bytes if backing else 0
        if len(keys) < need:
            raise InputError(f"{file}: {MISSING_KEY}")
        keyed.append((file, backing, keys[:need]))
        keys = keys[need:]
    if len(keys):
        raise InputError(f"{image_path}: {len(keys)} bytes of backing keys left over")
    parent = None
    try:
        for file, backing, key in reversed(keyed):
            parent = _open_one(file, backing, key, parent, path)
    except BaseException:
        if parent is not None:
            parent.close()
        raise
    return parent


def _open_one(file, header, key, parent, path):
    """One file of the chain, on top of ``parent`` (its own backing file)."""
    store = FileStore(file, readonly=True)
    if header is None:
        return Backing(store.read_into, store.size(), store.close)
    try:
        if header.encryption:
            header.check_master_key(key)
        volume = open_qcow2(header, store, key, parent, path=path)
    except BaseException:
        store.close()
        raise
    return Backing(volume.read, volume.size, volume.close)
