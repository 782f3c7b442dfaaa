"""Detached headers whose payload starts at a data offset (`cryptsetup luksFormat
--header H --offset N DATA`): the payload is DATA from byte N*512 on.

Oracles, as cryptsetup cannot decrypt such a volume here (LUKS2 `reencrypt
--decrypt` wants data offset 0 with a detached header; LUKS1 needs device-mapper):

* LUKS2: cryptsetup encrypts in place with `reencrypt --encrypt --header --offset`,
  and the ciphertext of any plaintext under the volume's key comes from `reencrypt
  --encrypt --volume-key-file` into a file at offset 0;
* LUKS1: H followed by DATA from the offset on is an ordinary LUKS1 image (a
  detached header file spans the offset, as cryptsetup makes it), which QEMU's LUKS
  driver reads and writes.
"""

import tempfile
from pathlib import Path

import pytest

from tests.conftest import qemu_write, random_file, serving
from tests.tools import (
    FAST_PBKDF,
    cryptsetup,
    cryptsetup_encrypt,
    nbdcrypt,
    nbdcrypt_cmd,
    read_all,
    require,
    run,
    write_all,
)

SIZE = 1 << 20
LUKS1_OFFSET = 4104  # sectors: past LUKS1's keyslots (4040 sectors), not MiB-aligned
LUKS2_OFFSET = 2056  # sectors: the keyslots area shrinks to fit before it








def splice(data, offset, payload):
    """Write ``payload`` into the file ``data`` at byte ``offset``."""
    with open(data, "r+b") as f:
        f.seek(offset)
        f.write(payload)


def cryptsetup_ciphertext(tmp_path, header, key_file, plain):
    """``plain`` encrypted by cryptsetup under ``header``'s volume key, sector 0 first
    (aes-xts-plain64, 512-bit key, 4096-byte sectors, as the tests' headers)."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as work:
        volume_key, copy = Path(work, "vk"), Path(work, "ciphertext")
        cryptsetup("luksDump", "--dump-volume-key", "--volume-key-file", volume_key, "--key-file", key_file,
                   header)
        copy.write_bytes(plain)
        cryptsetup_encrypt(copy, Path(work, "hdr"), key_file, "--volume-key-file", volume_key,
                           "--key-size", 512, "--sector-size", 4096, *FAST_PBKDF["pbkdf2"])
        return copy.read_bytes()


@pytest.mark.parametrize("maker", ["cryptsetup", "nbdcrypt"])
def test_luks2_both_ways(tmp_path, key_file, maker):
    """Data cryptsetup encrypted reads back through nbdcrypt; data nbdcrypt writes is
    what cryptsetup encrypts; the bytes before the offset are never touched."""
    offset = LUKS2_OFFSET * 512
    before = random_file(tmp_path / "before", offset + SIZE, seed=1).read_bytes()
    data, header = tmp_path / "data", tmp_path / "hdr"
    data.write_bytes(before)
    options = ["--header", header, "--offset", LUKS2_OFFSET, "--sector-size", 4096, "--key-file", key_file,
               *FAST_PBKDF["pbkdf2"]]
    if maker == "cryptsetup":  # header and ciphertext both from cryptsetup, in place
        cryptsetup("reencrypt", "--encrypt", "--type", "luks2", "--force-offline-reencrypt", *options, data)
    else:
        nbdcrypt("format", "--type", "luks2", *options, data)
        splice(data, offset, cryptsetup_ciphertext(tmp_path, header, key_file, before[offset:]))
    dump = cryptsetup("luksDump", header).stdout
    assert f"offset: {offset} [bytes]" in dump and f"Keyslots area: \t{offset - 32768} [bytes]" in dump
    assert header.stat().st_size == offset
    new = random_file(tmp_path / "new", SIZE, seed=2)
    with serving(data, key_file, "--header", header) as uri:
        assert read_all(uri) == before[offset:]
        write_all(uri, new)
    after = data.read_bytes()
    assert after[:offset] == before[:offset]
    assert after[offset:] == cryptsetup_ciphertext(tmp_path, header, key_file, new.read_bytes())


@pytest.mark.parametrize("maker", ["cryptsetup", "nbdcrypt"])
def test_luks1_both_ways(tmp_path, key_file, maker):
    """QEMU writes the payload, nbdcrypt reads it; nbdcrypt writes, QEMU reads."""
    require("qemu-img")
    offset = LUKS1_OFFSET * 512
    before = random_file(tmp_path / "before", offset + SIZE, seed=3).read_bytes()
    data, header = tmp_path / "data", tmp_path / "hdr"
    data.write_bytes(before)
    if maker == "cryptsetup":
        cryptsetup("luksFormat", "--type", "luks1", "--header", header, "--offset", LUKS1_OFFSET,
                   "--key-file", key_file, *FAST_PBKDF["pbkdf2"], data)
    else:
        nbdcrypt("format", "--type", "luks1", "--header", header, "--offset", LUKS1_OFFSET,
                 "--key-file", key_file, "--pbkdf-force-iterations", 1000, data)
    assert f"Payload offset:\t{LUKS1_OFFSET}\n" in cryptsetup("luksDump", header).stdout
    assert header.stat().st_size == offset and data.read_bytes() == before
    attached = tmp_path / "attached"  # the header, then the data file's payload
    old, new = random_file(tmp_path / "old", SIZE, seed=4), random_file(tmp_path / "new", SIZE, seed=5)
    attached.write_bytes(header.read_bytes() + before[offset:])
    qemu_write(attached, key_file, old)
    splice(data, offset, attached.read_bytes()[offset:])
    with serving(data, key_file, "--header", header) as uri:
        assert read_all(uri) == old.read_bytes()
        write_all(uri, new)
    after = data.read_bytes()
    assert after[:offset] == before[:offset]
    attached.write_bytes(header.read_bytes() + after[offset:])
    result = run(["qemu-img", "compare", "--object", f"secret,id=s0,file={key_file}", "--image-opts",
                  f"driver=raw,file.filename={new}", f"driver=luks,key-secret=s0,file.filename={attached}"])
    assert "Images are identical" in result.stdout


def test_format_creates_the_data_file_past_the_offset(tmp_path, key_file):
    """SIZE is the payload: a new data file holds the offset and then SIZE bytes."""
    data, header = tmp_path / "data", tmp_path / "hdr"
    nbdcrypt("format", "--type", "luks2", "--header", header, "--offset", LUKS2_OFFSET, "--key-file", key_file,
             *FAST_PBKDF["pbkdf2"], data, "1M")
    assert data.stat().st_size == LUKS2_OFFSET * 512 + SIZE
    assert f"payload_offset: {LUKS2_OFFSET * 512}\n" in nbdcrypt("info", "--header", header, data).stdout
    assert cryptsetup("open", "--test-passphrase", "--header", header, "--key-file", key_file, data,
                      check=False).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--type", "luks2", "--offset", 2049], "data offset must be a non-negative multiple of 8 sectors "
                                            "(4096 bytes), not 2049"),
    (["--type", "luks2", "--offset", 560], "data offset 560 sectors leaves no room for a keyslot "
                                           "(at least 568 sectors)"),
    (["--type", "luks1", "--offset", 4032], "data offset 4032 sectors is inside the LUKS1 header and "
                                            "keyslots (4036 sectors)"),
    (["--type", "luks2", "--offset", 16392], "{data}: data file (8388608 bytes) ends before --offset "
                                             "16392 (8392704 bytes)"),
])
def test_bad_offsets_are_refused(tmp_path, key_file, args, message):
    """The limits cryptsetup 2.6 enforces (checked here: 2049, 560 and 4032 fail with
    luksFormat, 568 and 4040 pass); one line, exit 2, nothing created."""
    data, header = tmp_path / "data", tmp_path / "hdr"
    data.write_bytes(bytes(8 * SIZE))
    result = nbdcrypt("format", *args, "--header", header, "--key-file", key_file, data, check=False)
    assert (result.returncode, result.stderr) == (2, f"nbdcrypt: {message.format(data=data)}\n")
    assert not header.exists() and data.read_bytes() == bytes(8 * SIZE)


def test_serving_a_data_file_shorter_than_the_offset_is_refused(tmp_path, key_file):
    data, header = tmp_path / "data", tmp_path / "hdr"
    nbdcrypt("format", "--type", "luks2", "--header", header, "--offset", LUKS2_OFFSET, "--key-file", key_file,
             *FAST_PBKDF["pbkdf2"], data, "1M")
    data.write_bytes(bytes(4096))
    result = run(nbdcrypt_cmd() + ["serve", str(data), "--header", str(header), "--key-file", str(key_file),
                                   "--socket", str(tmp_path / "sock")], check=False)
    assert result.returncode == 2
    assert result.stderr == (f"nbdcrypt: {header}: payload offset {LUKS2_OFFSET * 512} is past the end of the "
                             f"file (4096 bytes)\n")


def test_attached_images_take_an_offset_too(tmp_path, key_file):
    """As luksFormat --offset without --header: the payload after N sectors of the image."""
    require("qemu-img")
    luks1, luks2 = tmp_path / "luks1", tmp_path / "luks2"
    nbdcrypt("format", "--type", "luks1", "--offset", 8192, "--iter-time", 10, "--key-file", key_file, luks1, "1M")
    assert "Payload offset:\t8192\n" in cryptsetup("luksDump", luks1).stdout
    info = run(["qemu-img", "info", "--object", f"secret,id=s0,file={key_file}", "--image-opts",
                f"driver=luks,key-secret=s0,file.filename={luks1}"]).stdout
    assert luks1.stat().st_size == 8192 * 512 + SIZE and "virtual size: 1 MiB (1048576 bytes)" in info
    nbdcrypt("format", "--type", "luks2", "--offset", 4096, "--key-file", key_file, *FAST_PBKDF["pbkdf2"], luks2, "1M")
    dump = cryptsetup("luksDump", luks2).stdout
    assert "offset: 2097152 [bytes]" in dump and f"Keyslots area: \t{2097152 - 32768} [bytes]" in dump
    assert cryptsetup("open", "--test-passphrase", "--key-file", key_file, luks2, check=False).returncode == 0
