"""Where passphrases come from, and how they are kept while held.

Sources: a key file (used whole, as cryptsetup's ``--key-file``), a systemd
credential (a file in ``$CREDENTIALS_DIRECTORY``), a user key in the kernel
keyring (read with ``keyctl pipe``, so it never reaches a command line), a file
descriptor or piped stdin (one line), or a prompt.  Never argv or the environment.

Every source returns a :class:`~nbdcrypt.crypto.secrets.Secret`, locked in RAM
where RLIMIT_MEMLOCK allows; the caller wipes it (:func:`wipe`).
"""

import getpass
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..crypto.secrets import MAX_KEY_FILE, Secret, protect_process, read_secret, wipe  # noqa: F401  (keys.wipe for callers)
from ..errors import InputError

MAX_LINE = 64 << 10  # a passphrase on a descriptor or stdin


def read_passphrase(key_file: str | None = None, passphrase_fd: int | None = None, prompt: str = "Enter passphrase: ",
                    credential: str | None = None, keyring: str | None = None) -> Secret:
    """The passphrase (a Secret to :func:`wipe`) from the one source given."""
    given = [s for s in (key_file, passphrase_fd, credential, keyring) if s is not None]
    if len(given) > 1:
        raise InputError("give only one of --key-file, --passphrase-fd, --key-credential, --key-keyring")
    if key_file is not None:
        return _read_key_file(key_file)
    if credential is not None:
        return _read_key_file(_credential_path(credential))
    if keyring is not None:
        return _read_keyring(keyring)
    if passphrase_fd is not None:
        return _read_line(passphrase_fd, f"passphrase fd {passphrase_fd}")
    if not sys.stdin.isatty():
        return _read_line(sys.stdin.fileno(), "stdin")
    return _from_prompt(prompt)


def _from_prompt(prompt: str) -> Secret:
    typed = getpass.getpass(prompt).encode()  # an immutable copy we cannot wipe: interactive use only
    if not typed:
        raise InputError("empty passphrase")
    return Secret(typed)


def _credential_path(name: str) -> Path:
    """systemd's LoadCredential=/LoadCredentialEncrypted= put NAME in $CREDENTIALS_DIRECTORY."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise InputError(f"credential {name}: $CREDENTIALS_DIRECTORY is not set (systemd's LoadCredential= sets it)")
    if "/" in name or name in ("", ".", ".."):
        raise InputError(f"credential {name!r}: not a credential name")
    return Path(directory, name)


def _read_key_file(path: str | Path) -> Secret:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"{path}: key file not found") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read key file: {e.strerror}") from None
    try:
        data = _read_fd(fd, MAX_KEY_FILE + 1, f"key file {path}")
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        wipe(data)
        raise InputError(f"{path}: key file larger than {MAX_KEY_FILE} bytes")
    if not data:
        raise InputError(f"{path}: key file is empty")
    return data


def _read_keyring(description: str) -> Secret:
    """The payload of the user key ``description`` found from our session keyring
    (which links the user keyring outside systemd; in a unit, KeyringMode=shared)."""
    keyctl = shutil.which("keyctl")
    if keyctl is None:
        raise InputError("the kernel keyring needs keyctl (apt-get install keyutils)")
    found = subprocess.run([keyctl, "request", "user", description], capture_output=True, text=True)
    if found.returncode != 0:
        raise InputError(f"no user key {description!r} in the kernel keyring")
    with subprocess.Popen([keyctl, "pipe", found.stdout.strip()], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as pipe:
        assert pipe.stdout is not None  # stdout=PIPE
        data = _read_fd(pipe.stdout.fileno(), MAX_KEY_FILE, f"keyring key {description!r}")
    if pipe.returncode != 0 or not data:
        wipe(data)
        raise InputError(f"cannot read user key {description!r} from the kernel keyring")
    return data


def _read_line(fd: int, name: str) -> Secret:
    data = _read_fd(fd, MAX_LINE + 1, name, line=True)
    if len(data) > MAX_LINE:
        wipe(data)
        raise InputError(f"passphrase on {name} is longer than {MAX_LINE} bytes")
    if not data:
        raise InputError(f"no passphrase on {name}")
    return data


def _read_fd(fd: int, limit: int, name: str, line: bool = False) -> Secret:
    try:
        return read_secret(fd, limit, line)
    except OSError as e:
        raise InputError(f"cannot read {name}: {e.strerror}") from None
