"""The one exception tree of nbdcrypt.

Every error carries the errno an NBD client should see when it escapes a data-path
callback, and the exit status the CLI uses when it escapes a command.  Messages
never contain key material or passphrases.
"""

import errno as _errno


class NbdcryptError(Exception):
    """Base of every error nbdcrypt raises on purpose.

    Messages often quote what a header says; a hostile header may say anything, so
    control characters are escaped and every message stays one line."""

    errno = _errno.EIO
    exit_status = 1

    def __init__(self, message: object = "") -> None:
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))


class InputError(NbdcryptError):
    """Bad input from the user: arguments, files, images.  Exit status 2."""

    errno = _errno.EINVAL
    exit_status = 2


class FormatError(InputError):
    """An image or header is not what it claims to be: bad magic, truncated, corrupt.
    Found by a request (a corrupt table entry), it is the medium's fault: EIO."""

    errno = _errno.EIO


class UnsupportedError(InputError):
    """A well-formed image uses something nbdcrypt does not implement (cipher, hash, feature)."""

    errno = _errno.ENOTSUP


class BadPassphraseError(InputError):
    """No keyslot opens with the given passphrase."""

    errno = _errno.EPERM


class ReadOnlyError(InputError):
    """A write was asked of an image that can only be read."""

    errno = _errno.EROFS


class StoreError(NbdcryptError):
    """The backing store failed an I/O operation; ``errno`` is the store's own."""

    def __init__(self, message: object, errno: int = _errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno
