"""Helpers shared by the test suite: finding real tools, running them, making key files."""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"


def require(*tools):
    """Skip the calling test, with the reason printed, unless every tool is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (not installed)")


def run(cmd, check=True, **kwargs):
    """Run a command, capturing text output; on failure show its stderr in the assertion."""
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {result.returncode}:\n{result.stderr}{result.stdout}")
    return result


def nbdcrypt_cmd():
    """The installed console script, so tests start nbdcrypt exactly as a user would."""
    exe = VENV_BIN / "nbdcrypt"
    return [str(exe)] if exe.exists() else ["nbdcrypt"]


def nbdcrypt(*args, check=True):
    """Run ``nbdcrypt ARGS`` (any argument type) as a user would."""
    return run(nbdcrypt_cmd() + [str(a) for a in args], check=check)


def read_all(uri):
    """The whole export at ``uri``, read with nbdcopy."""
    require("nbdcopy")
    return subprocess.run(["nbdcopy", uri, "-"], capture_output=True, check=True).stdout


def write_all(uri, path):
    """Copy the file ``path`` onto the export at ``uri`` with nbdcopy."""
    require("nbdcopy")
    run(["nbdcopy", str(path), uri])


def write_key(path, passphrase=b"correct horse battery staple"):
    """A passphrase file without a trailing newline, readable by qemu, cryptsetup and nbdcrypt."""
    Path(path).write_bytes(passphrase)
    os.chmod(path, 0o600)
    return Path(path)


# -- cryptsetup as the LUKS2 oracle (issue 3) ------------------------------------------

# Cheap keyslots, so cryptsetup and nbdcrypt spend milliseconds, not seconds, per unlock.
FAST_PBKDF = {
    "pbkdf2": ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
    "argon2id": ["--pbkdf", "argon2id", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4"],
    "argon2i": ["--pbkdf", "argon2i", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4"],
}


def cryptsetup(*args, check=True):
    """Run cryptsetup in batch mode (no questions), without device-mapper."""
    require("cryptsetup")
    return run(["cryptsetup", "--batch-mode", *map(str, args)], check=check)


def cryptsetup_encrypt(data, header, key_file, *options):
    """Encrypt the plain file ``data`` in place under a new detached LUKS2 ``header``."""
    cryptsetup("reencrypt", "--encrypt", "--type", "luks2", "--header", header, "--force-offline-reencrypt",
               "--key-file", key_file, *options, data)


def cryptsetup_decrypt(data, header, key_file):
    """Decrypt ``data`` in place with its detached ``header`` (which cryptsetup then drops)."""
    cryptsetup("reencrypt", "--decrypt", "--header", header, "--force-offline-reencrypt",
               "--key-file", key_file, data)


def cryptsetup_opens(image, key_file, *options):
    """Whether ``cryptsetup open --test-passphrase`` accepts the passphrase in ``key_file``."""
    return cryptsetup("open", "--test-passphrase", "--key-file", key_file, *options, image,
                      check=False).returncode == 0


def psk_file(path, key):
    """A TLS pre-shared key file for user alice, in psktool's format (as nbdkit and libnbd read it)."""
    path.write_text(f"alice:{key.hex()}\n")
    os.chmod(path, 0o600)
    return path


# LUKS2 binary header (docs/on-disk-format-luks2): 4 KiB, SHA-256 checksum at 448 in a 64-byte field.
LUKS2_BINARY_SIZE, LUKS2_CSUM_OFFSET, LUKS2_CSUM_SIZE = 4096, 448, 64


def luks2_with_json(image, mutate):
    """Both header copies with ``mutate(doc)`` applied to their JSON and checksums redone,
    so the parser gets past the checksum to the metadata checks."""
    image = bytearray(image)
    hdr_size = int.from_bytes(image[8:16], "big")
    for copy in (0, hdr_size):
        area = slice(copy + LUKS2_BINARY_SIZE, copy + hdr_size)
        doc = json.loads(bytes(image[area]).rstrip(b"\0"))
        mutate(doc)
        text = json.dumps(doc).encode()[:hdr_size - LUKS2_BINARY_SIZE]
        image[area] = text.ljust(hdr_size - LUKS2_BINARY_SIZE, b"\0")
        image[copy + LUKS2_CSUM_OFFSET:copy + LUKS2_CSUM_OFFSET + LUKS2_CSUM_SIZE] = bytes(LUKS2_CSUM_SIZE)
        digest = hashlib.sha256(image[copy:copy + hdr_size]).digest()
        image[copy + LUKS2_CSUM_OFFSET:copy + LUKS2_CSUM_OFFSET + len(digest)] = digest
    return bytes(image)
