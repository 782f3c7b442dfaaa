"""Where passphrases come from: a key file, a file descriptor, stdin or a prompt.

Never from the command line or the environment.  Key files are used whole, as
cryptsetup's ``--key-file`` does; a descriptor or piped stdin gives one line.
"""

import getpass
import os
import sys

from ..errors import InputError

MAX_KEY_FILE = 8 << 20  # cryptsetup's default keyfile size limit


def read_passphrase(key_file=None, passphrase_fd=None, prompt="Enter passphrase: "):
    """Return the passphrase as bytes from the first source given."""
    if key_file is not None:
        return _read_key_file(key_file)
    if passphrase_fd is not None:
        return _read_line(passphrase_fd, f"passphrase fd {passphrase_fd}")
    if not sys.stdin.isatty():
        return _read_line(sys.stdin.fileno(), "stdin")
    passphrase = getpass.getpass(prompt).encode()
    if not passphrase:
        raise InputError("empty passphrase")
    return passphrase


def _read_key_file(path):
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise InputError(f"{path}: key file not found") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read key file: {e.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise InputError(f"{path}: key file larger than {MAX_KEY_FILE} bytes")
    if not data:
        raise InputError(f"{path}: key file is empty")
    return data


def _read_line(fd, name):
    data = bytearray()
    try:
        while len(data) <= MAX_KEY_FILE and (byte := os.read(fd, 1)) not in (b"", b"\n"):
            data += byte
    except OSError as e:
        raise InputError(f"cannot read passphrase from {name}: {e.strerror}") from None
    if not data:
        raise InputError(f"no passphrase on {name}")
    return bytes(data)
