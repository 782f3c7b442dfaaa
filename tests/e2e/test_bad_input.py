"""Bad input: one clear line on stderr, exit status 2, no traceback, the image untouched."""

import os
import struct
import subprocess

import pytest

from tests.conftest import PASSPHRASE, qemu_luks_create, sha256_file, tmpfs
from tests.tools import nbdcrypt_cmd, run, write_key

# LUKS1 header field offsets (big-endian), from the LUKS1 on-disk specification.
CIPHER_NAME, CIPHER_MODE, HASH_SPEC, PAYLOAD_OFFSET, KEY_BYTES = 8, 40, 72, 104, 108


def patched(image, offset, data):
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return image


def field(text):
    return text.encode().ljust(32, b"\0")


@pytest.fixture
def image(tmp_path, key_file):
    return qemu_luks_create(tmp_path / "img", key_file, "4M")


def expect_failure(args, pattern, touched, stdin=subprocess.DEVNULL):
    hashes = {p: sha256_file(p) for p in touched if os.path.exists(p)}
    result = subprocess.run(nbdcrypt_cmd() + [str(a) for a in args], capture_output=True, text=True,
                            stdin=stdin, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbdcrypt: "), result.stderr
    assert pattern in lines[0], lines[0]
    assert PASSPHRASE.decode() not in result.stderr + result.stdout
    for path, digest in hashes.items():
        assert sha256_file(path) == digest, f"{path} was modified"
    return lines[0]


def serve_args(image, key_file, *extra):
    return ["serve", image, "--key-file", key_file, "--socket", f"{image}.sock", *extra]


def test_wrong_passphrase(image, tmp_path):
    wrong = write_key(tmp_path / "wrong", b"not the passphrase")
    expect_failure(serve_args(image, wrong), "no key available with this passphrase", [image])


def test_not_a_luks_file(tmp_path, key_file):
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(1 << 20))
    expect_failure(serve_args(junk, key_file), "not a LUKS or qcow2 image", [junk])
    expect_failure(["info", junk], "not a LUKS or qcow2 image", [junk])


def test_truncated_header(image, key_file):
    os.truncate(image, 300)
    expect_failure(serve_args(image, key_file), "truncated", [image])


def test_payload_offset_past_end_of_file(image, key_file):
    patched(image, PAYLOAD_OFFSET, struct.pack(">I", 1 << 30))
    expect_failure(serve_args(image, key_file), "past the end of the file", [image])


def test_key_bytes_not_fitting_the_cipher(image, key_file):
    patched(image, KEY_BYTES, struct.pack(">I", 48))
    expect_failure(["info", image], "does not fit", [image])


def test_corrupt_keyslot_material_is_a_wrong_key(image, key_file):
    """Damaged key material cannot be told from a wrong passphrase; LUKS says the same."""
    patched(image, 4096, os.urandom(4096))
    expect_failure(serve_args(image, key_file), "no key available with this passphrase", [image])


def test_unsupported_cipher(image, key_file):
    patched(image, CIPHER_NAME, field("des3_ede"))
    expect_failure(serve_args(image, key_file), "unsupported cipher", [image])


def test_unsupported_hash(image, key_file):
    patched(image, HASH_SPEC, field("whirlpool"))
    expect_failure(serve_args(image, key_file), "unsupported hash whirlpool", [image])


def test_missing_key_file(image, tmp_path):
    expect_failure(serve_args(image, tmp_path / "nokey"), "key file not found", [image])


def test_missing_image(tmp_path, key_file):
    expect_failure(serve_args(tmp_path / "absent", key_file), "no such file", [])


def test_no_passphrase_at_all(image):
    expect_failure(["serve", image, "--socket", f"{image}.sock"], "no passphrase", [image])


def test_format_refuses_bad_arguments_without_creating_anything(tmp_path, key_file):
    target = tmp_path / "new.img"
    expect_failure(["format", target, "16M", "--key-file", key_file, "--cipher", "aes-foo-plain"],
                   "unsupported cipher", [])
    expect_failure(["format", target, "16M", "--key-file", key_file, "--hash", "md4"], "unsupported hash", [])
    expect_failure(["format", target, "16M", "--key-file", key_file, "--key-size", "384"], "key size", [])
    assert not target.exists()


def test_format_refuses_to_overwrite(image, key_file):
    expect_failure(["format", image, "16M", "--key-file", key_file], "exists", [image])


def test_read_only_image_needs_readonly(image, key_file, tmp_path):
    """On a read-only filesystem serve says so (and --readonly works)."""
    with tmpfs(tmp_path / "ro", "16m") as ro:
        copy = ro / "img"
        copy.write_bytes(image.read_bytes())
        run(["mount", "-o", "remount,ro", str(ro)])
        args = ["serve", copy, "--key-file", key_file, "--socket", tmp_path / "ro.sock"]
        expect_failure(args, "read-only; pass --readonly", [copy])


def test_usage_errors_exit_2():
    result = subprocess.run(nbdcrypt_cmd() + ["serve"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr
    result = subprocess.run(nbdcrypt_cmd() + ["format", "x", "12Q"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid size" in result.stderr
