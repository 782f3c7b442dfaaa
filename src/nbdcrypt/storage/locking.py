"""Image locking compatible with QEMU's (block/file-posix.c), so nbdcrypt, QEMU,
qemu-img and qemu-nbd never write one image at the same time.

QEMU takes a shared OFD lock on byte 100 + p for each permission p it holds and on
byte 200 + p for each permission it will not share with others; before that it
checks that nobody holds the opposite byte.  The permissions (QEMU's BLK_PERM_*
bit numbers): 0 consistent read, 1 write, 3 resize.  An export that writes holds
read and write and shares neither write nor resize, as a QEMU guest disk does; a
read-only export holds read and does not share write, so nothing changes under it.
"""

import fcntl
import struct

from ..errors import InputError

PERM_BASE, UNSHARED_BASE = 100, 200
PERMISSIONS = {0: "consistent read", 1: "write", 3: "resize"}
_FLOCK = "hh4xqqi4x"  # struct flock on 64-bit Linux: type, whence, start, len, pid


def lock_image(fd: int, path: str, readonly: bool) -> None:
    """Take QEMU-style locks on ``fd``, or raise InputError naming the conflict.
    The locks last as long as the open file description."""
    held = {0} if readonly else {0, 1}
    unshared = {1} if readonly else {1, 3}
    for p in held:
        if _conflicts(fd, UNSHARED_BASE + p):
            raise InputError(f"{path}: image is in use: another process does not share its "
                             f"{PERMISSIONS[p]} permission")
    for p in unshared:
        if _conflicts(fd, PERM_BASE + p):
            raise InputError(f"{path}: image is in use: another process holds the {PERMISSIONS[p]} permission")
    for byte in [PERM_BASE + p for p in held] + [UNSHARED_BASE + p for p in unshared]:
        _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)


def _conflicts(fd: int, byte: int) -> bool:
    """Would an exclusive lock on ``byte`` conflict with another process's lock?"""
    return _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def _flock(fd: int, command: int, kind: int, byte: int) -> int:
    try:
        result = fcntl.fcntl(fd, command, struct.pack(_FLOCK, kind, 0, byte, 1, 0))
    except OSError as e:
        raise InputError(f"cannot lock the image: {e.strerror}") from None
    return struct.unpack(_FLOCK, result)[0]
