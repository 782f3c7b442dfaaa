"""`nbdcrypt header backup|restore` and `nbdcrypt erase` against cryptsetup's
luksHeaderBackup, luksHeaderRestore and luksErase: the same backup bytes, backups
restored across the tools, refusals that leave the image untouched."""

import json
import os
import pty
import subprocess

import pytest

from tests.conftest import random_file, serving
from tests.tools import (
    FAST_PBKDF,
    cryptsetup,
    cryptsetup_decrypt,
    cryptsetup_encrypt,
    cryptsetup_opens,
    nbdcrypt,
    nbdcrypt_cmd,
    read_all,
    write_all,
    write_key,
)

SIZE = 1 << 20
KINDS = ["luks1", "luks2"]


def luks_format(image, key_file, kind, *options, size=24 << 20):
    """A cryptsetup-made image (``--header`` in ``options``: its data file), cheap to open."""
    image.write_bytes(b"")
    os.truncate(image, size)
    cryptsetup("luksFormat", "--type", kind, *FAST_PBKDF["pbkdf2"], "--key-file", key_file, *options, image)
    return image


def cryptsetup_backup(image, path, *options):
    cryptsetup("luksHeaderBackup", *options, image, "--header-backup-file", path)
    return path


def fails_untouched(args, message, *files):
    """``nbdcrypt ARGS`` exits 2 with one line holding ``message``, and ``files`` keep their bytes."""
    before = [f.read_bytes() for f in files]
    result = nbdcrypt(*args, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert [f.read_bytes() for f in files] == before


@pytest.mark.parametrize("layout", ["luks1", "luks2", "luks1-detached-offset", "luks2-detached"])
def test_backup_is_byte_for_byte_cryptsetups(tmp_path, key_file, layout):
    kind, _, detached = layout.partition("-")
    image = tmp_path / "img"
    options = []
    if detached:
        options = ["--header", tmp_path / "hdr"] + (["--offset", 4104] if "offset" in detached else [])
    luks_format(image, key_file, kind, *options)
    header = options[1] if options else image
    theirs = cryptsetup_backup(header, tmp_path / "theirs")
    nbdcrypt("header", "backup", image, tmp_path / "ours", *options[:2])
    assert (tmp_path / "ours").read_bytes() == theirs.read_bytes()
    assert (tmp_path / "ours").stat().st_mode & 0o777 == 0o600
    fails_untouched(["header", "backup", image, tmp_path / "ours", *options[:2]], "already exists",
                    tmp_path / "ours")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backup_by", ["cryptsetup", "nbdcrypt"])
def test_restore_across_tools_brings_back_keyslots_and_data(tmp_path, key_file, kind, backup_by):
    """Back up with one tool, change the passphrase, restore with the other: the old
    passphrase opens again (cryptsetup) and the data written before reads back."""
    image, backup = luks_format(tmp_path / "img", key_file, kind), tmp_path / "backup"
    data = random_file(tmp_path / "data", SIZE, seed=3)
    with serving(image, key_file) as uri:
        write_all(uri, data)
    if backup_by == "cryptsetup":
        cryptsetup_backup(image, backup)
    else:
        nbdcrypt("header", "backup", image, backup)
    new_key = write_key(tmp_path / "new-key", b"another passphrase")
    cryptsetup("luksChangeKey", *FAST_PBKDF["pbkdf2"], "--key-file", key_file, image, new_key)
    assert not cryptsetup_opens(image, key_file)
    if backup_by == "cryptsetup":
        nbdcrypt("header", "restore", image, backup)
    else:
        cryptsetup("luksHeaderRestore", image, "--header-backup-file", backup)
    assert cryptsetup_opens(image, key_file) and not cryptsetup_opens(image, new_key)
    with serving(image, key_file, "--readonly") as uri:
        assert read_all(uri)[:SIZE] == data.read_bytes()


def test_detached_header_restore_keeps_cryptsetups_data(tmp_path, key_file):
    """A detached LUKS2 header, backed up by cryptsetup and restored by nbdcrypt over a
    damaged header: cryptsetup decrypts the data it encrypted."""
    plain = random_file(tmp_path / "plain", SIZE, seed=4).read_bytes()
    data, header = random_file(tmp_path / "data", SIZE, seed=4), tmp_path / "hdr"
    cryptsetup_encrypt(data, header, key_file, *FAST_PBKDF["pbkdf2"])
    backup = cryptsetup_backup(header, tmp_path / "backup")
    with open(header, "r+b") as f:  # both header copies gone
        f.write(bytes(32768))
    fails_untouched(["header", "restore", data, backup, "--header", header], "--force", data, header)
    nbdcrypt("header", "restore", data, backup, "--header", header, "--force")
    cryptsetup_decrypt(data, header, key_file)
    assert data.read_bytes() == plain


@pytest.mark.parametrize("kind", KINDS)
def test_restore_refuses_what_does_not_belong(tmp_path, key_file, kind):
    image, other = luks_format(tmp_path / "img", key_file, kind), luks_format(tmp_path / "other", key_file, kind)
    shifted = luks_format(tmp_path / "shifted", key_file, kind, "--offset", 40960, size=32 << 20)
    for source in (other, shifted):
        cryptsetup_backup(source, tmp_path / f"{source.name}.bak")
    noise = random_file(tmp_path / "noise", 1 << 20)
    fails_untouched(["header", "restore", image, tmp_path / "other.bak"], "another volume", image)
    fails_untouched(["header", "restore", image, tmp_path / "shifted.bak", "--force"], "data offset differs",
                    image)
    fails_untouched(["header", "restore", image, noise], "not a LUKS", image)
    fails_untouched(["header", "restore", image, tmp_path / "missing"], "no such file", image)
    fails_untouched(["header", "restore", tmp_path / "missing", tmp_path / "other.bak"], "no such file", image)
    fails_untouched(["header", "backup", tmp_path / "missing", tmp_path / "new.bak"], "no such file", image)
    assert not (tmp_path / "new.bak").exists()
    # a backup of another volume goes on with --force, as luksHeaderRestore --batch-mode
    nbdcrypt("header", "restore", image, tmp_path / "other.bak", "--force")
    assert image.read_bytes()[:1 << 20] == other.read_bytes()[:1 << 20]


def test_qcow2_is_refused(tmp_path, key_file):
    image = tmp_path / "img.qcow2"
    nbdcrypt("format", "--type", "qcow2", image, "8M", "--key-file", key_file, "--iter-time", 10)
    backup = cryptsetup_backup(luks_format(tmp_path / "luks", key_file, "luks2"), tmp_path / "backup")
    fails_untouched(["header", "backup", image, tmp_path / "new.bak"], "takes LUKS images only", image)
    fails_untouched(["header", "restore", image, backup, "--force"], "takes LUKS images only", image)
    fails_untouched(["erase", "-q", image], "takes LUKS images only", image)
    fails_untouched(["header", "restore", tmp_path / "luks", image], "takes LUKS images only", tmp_path / "luks")


def test_a_served_image_is_refused(tmp_path, key_file):
    image = luks_format(tmp_path / "img", key_file, "luks2")
    backup = cryptsetup_backup(image, tmp_path / "backup")
    with serving(image, key_file):
        fails_untouched(["header", "restore", image, backup], "image is in use", image)
        fails_untouched(["erase", "-q", image], "image is in use", image)
        nbdcrypt("header", "backup", image, tmp_path / "live.bak")  # reading is fine
    assert (tmp_path / "live.bak").read_bytes() == backup.read_bytes()


def keyslot_areas(image, *options):
    """``(offset, size)`` of each enabled keyslot's area, as `nbdcrypt info` shows them."""
    info = json.loads(nbdcrypt("info", image, "--json", *options).stdout)

    def area(slot):
        if "area_offset" in slot:
            return slot["area_offset"], slot["area_size"]
        return slot["offset"], -(-info["key_bits"] // 8 * 4000 // 512) * 512  # LUKS1: AF stripes, whole sectors

    return [area(slot) for slot in info["keyslots"] if slot["state"] == "enabled"]


def read_areas(path, areas):
    with open(path, "rb") as f:
        return [os.pread(f.fileno(), size, offset) for offset, size in areas]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("detached", [False, True], ids=["embedded", "detached"])
def test_erase_leaves_no_passphrase_that_opens(tmp_path, key_file, kind, detached):
    image, options = tmp_path / "img", (["--header", tmp_path / "hdr"] if detached else [])
    luks_format(image, key_file, kind, *options)
    header = tmp_path / "hdr" if detached else image
    second = write_key(tmp_path / "second", b"second passphrase")
    cryptsetup("luksAddKey", *FAST_PBKDF["pbkdf2"], "--key-file", key_file, header, second)
    areas = keyslot_areas(image, *options)
    before = read_areas(header, areas)
    assert len(areas) == 2
    nbdcrypt("erase", image, "--batch-mode", *options)
    assert not cryptsetup_opens(header, key_file) and not cryptsetup_opens(header, second)
    dump = cryptsetup("luksDump", header).stdout  # still a valid header, as after luksErase
    if kind == "luks1":
        assert dump.count("DISABLED") == 8
    else:
        metadata = json.loads(cryptsetup("luksDump", "--dump-json-metadata", header).stdout)
        assert metadata["keyslots"] == {} and metadata["digests"]["0"]["keyslots"] == []
    assert keyslot_areas(image, *options) == []
    assert all(old != new for old, new in zip(before, read_areas(header, areas), strict=True))


def test_erase_asks_on_a_terminal(tmp_path, key_file):
    image = luks_format(tmp_path / "img", key_file, "luks2")
    fails_untouched(["erase", image], "--batch-mode", image)  # no terminal: nothing to ask on
    for answer, erased in ((b"yes\n", False), (b"YES\n", True)):
        controller, terminal = pty.openpty()
        with subprocess.Popen(nbdcrypt_cmd() + ["erase", str(image)], stdin=terminal, stdout=terminal,
                              stderr=subprocess.PIPE) as proc:
            os.close(terminal)
            os.write(controller, answer)
            _, stderr = proc.communicate(timeout=30)
        prompt = os.read(controller, 4096)
        os.close(controller)
        assert b"Are you sure? (Type 'yes' in capital letters)" in prompt
        assert (proc.returncode == 0) == erased, stderr
        assert cryptsetup_opens(image, key_file) != erased
