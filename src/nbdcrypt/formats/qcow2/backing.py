"""Backing files, read-only: where unallocated clusters of an image get their data.

A backing file is raw or qcow2 (which may have a backing file of its own), as the
image that names it declares: never probed, so a raw file someone else can write is
never taken for qcow2 and its backing name never followed (CVE-2008-2004's pattern).
Its name is relative to the directory of the image that names it, as in QEMU, and
may not lead outside it (no absolute name, no ``..``, no symlink out) unless it
resolves inside a directory the operator allows (``--backing-dir``).  An
encrypted qcow2 backing file (LUKS or legacy AES) needs its own master key: the
keys of a chain's encrypted files travel as one buffer, in chain order (nearest
first), each as long as its header says.  Each is unlocked with its own passphrase,
given in the same order; the last one given also opens any deeper encrypted file,
so one passphrase serves a chain that shares it.
"""

import os
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING

from nbdcrypt.crypto.secrets import Secret, joined
from nbdcrypt.errors import InputError, UnsupportedError
from nbdcrypt.formats.image import Image, Passphrase
from nbdcrypt.formats.qcow2.header import Qcow2Header

if TYPE_CHECKING:
    from typing_extensions import Buffer  # typeshed's; not needed at run time

MAX_DEPTH = 16
MISSING_KEY = "the backing file is encrypted: give its passphrase (--backing-key-file)"
WHICH_KEYS = "one --backing-key-file per encrypted backing file, nearest first"


class Backing:
    """Read-only data of ``size`` bytes read by ``read_into(buf, offset)``; zeros past its end."""

    def __init__(self, read_into: Callable[["Buffer", int], None], size: int, close: Callable[[], None]) -> None:
        self._read_into = read_into
        self.size = size
        self.close = close

    def read(self, buf: "Buffer", offset: int) -> None:
        view = memoryview(buf)
        inside = max(0, min(len(view), self.size - offset))
        if inside:
            self._read_into(view[:inside], offset)
        view[inside:] = bytes(len(view) - inside)


def backing_path(image_path: str | os.PathLike[str], name: str, backing_dirs: Sequence[str] = ()) -> str:
    """The real path of the backing file ``name`` of the image at ``image_path``, checked
    before anything opens it: a relative name without ``..`` may resolve inside the
    image's directory, any name inside one of ``backing_dirs``."""
    directory = os.path.dirname(os.path.abspath(image_path))
    real = os.path.realpath(os.path.join(directory, name))
    allowed = [os.path.realpath(d) for d in backing_dirs]
    if not os.path.isabs(name) and ".." not in name.split("/"):
        allowed.append(os.path.realpath(directory))
    if not any(os.path.commonpath([real, d]) == d != real for d in allowed):
        raise InputError(f"{image_path}: backing file {name!r} is outside the image's directory "
                         f"(allow where it leads with --backing-dir)")
    return real


def backing_chain(header: Image | Qcow2Header, image_path: str,
                  backing_dirs: Sequence[str] = ()) -> list[tuple[str, Qcow2Header | None]]:
    """[(real path, qcow2 header, or None for raw)] below the image at ``image_path``,
    nearest first.  ``header`` may be any format's: only qcow2 has backing files."""
    chain: list[tuple[str, Qcow2Header | None]] = []
    seen, path = {os.path.realpath(image_path)}, image_path
    layer: Image | Qcow2Header | None = header
    while isinstance(layer, Qcow2Header) and layer.backing_file:
        if len(chain) == MAX_DEPTH:
            raise InputError(f"{image_path}: backing chain longer than {MAX_DEPTH}")
        name, fmt = layer.backing_file, layer.backing_format
        if fmt is None:  # QEMU would probe the file; an old image, fixed by recording it
            raise InputError(f"{path}: no backing format for backing file {name!r}; record it with "
                             f"`qemu-img rebase -u -b NAME -F raw|qcow2`")
        if fmt not in ("raw", "qcow2"):
            raise UnsupportedError(f"{path}: backing format {fmt} is not supported")
        real = backing_path(path, name, backing_dirs)
        if real in seen:
            raise InputError(f"{image_path}: backing chain loops back to {real}")
        seen.add(real)
        path = os.path.join(os.path.dirname(path), name)  # deeper names are relative to this, as in QEMU
        with _open(real) as f:
            layer = Qcow2Header.read(f, real) if fmt == "qcow2" else None
        chain.append((real, layer))
    return chain


def unlock_backing(header: Image, image_path: str, passphrases: Sequence[Passphrase],
                   backing_dirs: Sequence[str] = ()) -> Secret:
    """The master keys of the chain's encrypted files, the k-th unlocked with
    ``passphrases[k]`` (or the last one, past the end); one Secret to wipe, empty
    if none is encrypted."""
    encrypted = [(path, b) for path, b in backing_chain(header, image_path, backing_dirs)
                 if b and b.encryption]
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


def backing_key_bytes(header: Image, image_path: str, backing_dirs: Sequence[str] = ()) -> int:
    """How long the buffer of :func:`unlock_backing` is."""
    return sum(b.key_bytes for _, b in backing_chain(header, image_path, backing_dirs) if b and b.encryption)


def _open(path: str) -> IO[bytes]:
    try:
        return open(path, "rb")
    except OSError as e:
        raise InputError(f"{path}: cannot open backing file: {e.strerror}") from None
