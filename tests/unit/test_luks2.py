"""LUKS2 headers: round trips, every refusal, metadata preservation, crash safety."""

import copy
import io
import json
import shutil

import pytest

from nbdcrypt.errors import BadPassphraseError, FormatError, InputError, UnsupportedError
from nbdcrypt.formats import luks1, luks_common, open_header
from nbdcrypt.formats.luks2 import Luks2Header, binary, format_luks2
from nbdcrypt.formats.luks2 import format as luks2_format
from nbdcrypt.formats.luks2.header import pack_json
from nbdcrypt.storage.store import FileStore
from tests.conftest import serving
from tests.tools import nbdcrypt, run

OLD, NEW = b"old passphrase", b"new passphrase"
FAST = dict(pbkdf="pbkdf2", pbkdf_iterations=1000)
FAST_KDF = dict(pbkdf="pbkdf2", iterations=1000)


@pytest.fixture(scope="module", autouse=True)
def cheap_digests():
    """Master-key digests cost 125 ms of PBKDF2 each by default; these tests try many."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(luks2_format, "DIGEST_MS", 1)
        mp.setattr(luks1, "MK_DIGEST_MS", 1)
        yield


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("luks2") / "disk.img"
    format_luks2(path, 1 << 20, OLD, **FAST, label="my label", subsystem="sub")
    return path.read_bytes()


@pytest.fixture
def image(tmp_path, pristine):
    path = tmp_path / "disk.img"
    path.write_bytes(pristine)
    return path


def read(path):
    with open(path, "rb") as f:
        return open_header(f, "disk.img")


def test_round_trip_through_a_volume(image):
    header = read(image)
    assert isinstance(header, Luks2Header) and header.warnings == ()
    info = header.info()
    assert (info["label"], info["subsystem"], info["cipher"], info["key_bits"], info["sector_size"]) == \
        ("my label", "sub", "aes-xts-plain64", 512, 4096)
    assert info["payload_offset"] == 16 << 20 and header.payload_size(image.stat().st_size) == 1 << 20
    with open(image, "rb") as f:
        key = header.unlock(OLD, f)
        with pytest.raises(BadPassphraseError, match="^disk.img: no key available"):
            header.unlock(b"wrong", f)
    header.check_master_key(key)
    store = FileStore(image)
    header.open_volume(store, key).write(b"hello" * 1000, 12345)
    store.close()
    out = bytearray(5000)
    store = FileStore(image, readonly=True)
    read(image).open_volume(store, key).read(out, 12345)
    store.close()
    assert out == b"hello" * 1000


def test_info_has_no_secrets(image):
    header = read(image)
    text = json.dumps(header.info())
    for secret in (header.doc["keyslots"]["0"]["kdf"]["salt"], header.doc["digests"]["0"]["digest"]):
        assert secret not in text


def rewrite(path, mutate):
    """Both copies of ``path`` rewritten (checksums valid) with ``mutate`` applied to the JSON."""
    with open(path, "rb") as f:
        header = Luks2Header.read(f)
    doc = copy.deepcopy(header.doc)
    mutate(doc)
    area = pack_json(doc, header.binary.json_size)
    seqid = header.binary.seqid + 1
    with open(path, "r+b") as f:
        f.write(header.binary.at(0, seqid).pack(area))
        f.write(header.binary.at(header.binary.hdr_size, seqid).pack(area))


def setter(path, value):
    def mutate(doc):
        *parents, last = path.split("/")
        for p in parents:
            doc = doc[p]
        doc[last] = value
    return mutate


REFUSALS = [
    ("reencryption", setter("config/requirements", {"mandatory": ["online-reencrypt-v2"]}),
     UnsupportedError, "requirements 'online-reencrypt-v2' are not supported"),
    ("two segments", lambda d: d["segments"].__setitem__("1", d["segments"]["0"]),
     UnsupportedError, "2 segments"),
    ("integrity", setter("segments/0/integrity", {"type": "hmac(sha256)"}), UnsupportedError, "integrity"),
    ("reencrypt keyslot", setter("keyslots/0/type", "reencrypt"), UnsupportedError, "type 'reencrypt'"),
    ("unknown kdf", setter("keyslots/0/kdf/type", "scrypt"), UnsupportedError, "key derivation 'scrypt'"),
    ("unknown cipher", setter("segments/0/encryption", "blowfish-cbc-plain"), UnsupportedError,
     "unsupported cipher blowfish"),
    ("sector size", setter("segments/0/sector_size", 8192), FormatError, "sector_size must be"),
    ("odd sector size", setter("segments/0/sector_size", 1536), FormatError, "sector size 1536"),
    ("area outside", setter("keyslots/0/area/offset", str(16 << 20)), FormatError, "outside the keyslots"),
    ("area over header", setter("keyslots/0/area/offset", "4096"), FormatError, "outside the keyslots"),
    ("area too small", setter("keyslots/0/area/size", "4096"), FormatError, "cannot hold"),
    ("offset as number", setter("keyslots/0/area/offset", 32768), FormatError, "decimal number in a string"),
    ("huge offset", setter("segments/0/offset", "9" * 30), FormatError, "decimal number"),
    ("data over keyslots", setter("segments/0/offset", str(1 << 20)), FormatError, "overlaps the keyslots"),
    ("keyslots area past end", setter("config/keyslots_size", str(1 << 30)), FormatError, "do not fit"),
    ("json_size", setter("config/json_size", "4096"), FormatError, "json_size does not match"),
    ("argon2 memory", lambda d: d["keyslots"]["0"].update(
        kdf={"type": "argon2id", "time": 4, "memory": 1 << 30, "cpus": 1, "salt": "AAAA"}),
     FormatError, "Argon2 memory"),
    ("iterations", setter("keyslots/0/kdf/iterations", 0), FormatError, "PBKDF2 iterations"),
    ("salt", setter("keyslots/0/kdf/salt", "***"), FormatError, "not base64"),
    ("key size", setter("keyslots/0/key_size", 1 << 20), FormatError, "key_size must be"),
    ("missing keyslot", setter("digests/0/keyslots", ["0", "7"]), FormatError, "missing keyslot 7"),
    ("no digest", setter("digests", {}), FormatError, "0 digests"),
    ("keyslot id", lambda d: d["keyslots"].__setitem__("99", d["keyslots"]["0"]), FormatError, "invalid id"),
    ("superscript keyslot id", lambda d: d["keyslots"].__setitem__("\u00b2", d["keyslots"].pop("0")),
     FormatError, "invalid id '\u00b2'"),
    ("arabic digest id", lambda d: d["digests"].__setitem__("\u0663", d["digests"].pop("0")),
     FormatError, "invalid id '\u0663'"),
    ("superscript digest keyslot", setter("digests/0/keyslots", ["\u00b2"]), FormatError, "invalid id"),
    ("superscript segment", setter("digests/0/segments", ["0", "\u00b9"]), FormatError, "invalid id"),
    ("no config", lambda d: d.pop("config"), FormatError, "config must be an object"),
    ("long digest", setter("digests/0/digest", "A" * 88), FormatError, "digest has 66 bytes"),
]


@pytest.mark.parametrize("mutate, error, message", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals(image, mutate, error, message):
    rewrite(image, mutate)
    with pytest.raises(error, match=message) as caught:
        read(image)
    assert type(caught.value) is error and str(caught.value).startswith("disk.img: ")


def test_non_ascii_id_is_one_line_from_the_cli(image):
    """str.isdigit() takes "\u00b2", which int() refuses: that was a traceback and exit status 1."""
    rewrite(image, lambda d: d["keyslots"].__setitem__("\u00b2", d["keyslots"].pop("0")))
    result = nbdcrypt("info", image, check=False)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"nbdcrypt: {image}: LUKS2 keyslots: invalid id '\u00b2'\n"


def test_unlock_budget_from_the_cli(image, tmp_path):
    """32 keyslots at cryptsetup's limits would take days to try: keyslots past the
    budget of one unlock are not tried unless named, and the error names them."""
    with open(image, "r+b") as f:
        for slot in (1, 2):
            luks_common.add_passphrase(f, read(image), OLD, NEW, slot, **FAST_KDF)
    rewrite(image, lambda d: [d["keyslots"][s]["kdf"].update(iterations=1 << 28) for s in ("1", "2")])
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(OLD)
    new.write_bytes(NEW)
    result = nbdcrypt("keyslot", "add", image, "--key-file", new, "--new-key-file", old, check=False)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"nbdcrypt: {image}: no key available with this passphrase in keyslots 0; "
                             f"keyslots 1, 2 not tried, their key derivation would pass the budget of one "
                             f"unlock: name the keyslot to open with --key-slot N\n")
    served = nbdcrypt("serve", image, "--key-file", new, "--socket", tmp_path / "s", check=False)
    assert served.returncode == 2 and served.stderr == result.stderr
    with serving(image, old, "--key-slot", "0", socket_path=tmp_path / "s") as uri:
        assert run(["nbdinfo", "--size", uri]).stdout == f"{1 << 20}\n"
    result = nbdcrypt("keyslot", "change", image, "--key-file", old, "--new-key-file", new, "--key-slot", 0,
                      "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", 1000)
    assert result.stdout == f"{image}: keyslot 0 now holds the new passphrase\n"


def damage(path, offset, data=b"\xff"):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("offset, which", [(0, "primary"), (300, "primary"), (5000, "primary"),
                                           (16384 + 300, "secondary"), (16384 + 8000, "secondary")])
def test_one_damaged_copy(image, offset, which):
    damage(image, offset)
    header = read(image)
    assert header.warnings == (f"disk.img: the {which} LUKS2 header is damaged "
                               f"({'no valid binary header' if offset == 0 else 'checksum mismatch'}); "
                               f"using the {'secondary' if which == 'primary' else 'primary'}",)
    with open(image, "rb") as f:
        header.unlock(OLD, f)
    with open(image, "r+b") as f:
        luks_common.commit(f, header.repaired())
    assert read(image).warnings == ()


def test_both_copies_damaged(image):
    damage(image, 300)
    damage(image, 16384 + 300)
    with pytest.raises(FormatError, match="both LUKS2 header copies are damaged .primary: checksum mismatch; "
                                          "secondary: checksum mismatch"):
        read(image)


def test_hostile_json_is_damage(image):
    with open(image, "rb") as f:
        header = Luks2Header.read(f)
    area = ("[" * 12000).encode().ljust(header.binary.json_size, b"\0")
    with open(image, "r+b") as f:
        f.write(header.binary.pack(area))
    assert "primary LUKS2 header is damaged (JSON area does not hold valid JSON)" in read(image).warnings[0]


def test_newest_copy_wins(image):
    """A crash between the two copies' writes: the secondary is newer."""
    with open(image, "rb") as f:
        header = Luks2Header.read(f)
    rewrite(image, setter("tokens", {"0": {"type": "x", "keyslots": []}}))
    with open(image, "r+b") as f:
        f.write(header.binary.pack(pack_json(header.doc, header.binary.json_size)))
    newer = read(image)
    assert newer.doc["tokens"] and "primary LUKS2 header is stale" in newer.warnings[0]


def test_tokens_and_unknown_metadata_survive_keyslot_changes(image):
    token = {"type": "systemd-tpm2", "keyslots": ["0", "1"], "tpm2-blob": "abc"}
    rewrite(image, lambda d: (d["tokens"].__setitem__("3", token), d.__setitem__("future", {"x": [1]}),
                              d["config"].__setitem__("flags", ["allow-discards"])))
    with open(image, "r+b") as f:
        header = read(image)
        header, _ = luks_common.add_passphrase(f, header, OLD, NEW, **FAST_KDF)
        header, _ = luks_common.change_passphrase(f, header, NEW, b"third", **FAST_KDF)
    header = read(image)
    assert header.doc["tokens"]["3"] == token and header.doc["future"] == {"x": [1]}
    assert header.doc["config"]["flags"] == ["allow-discards"] and header.binary.label == "my label"
    with open(image, "r+b") as f:
        luks_common.remove_passphrase(f, header, OLD)
    assert read(image).doc["tokens"]["3"]["keyslots"] == ["1"]


def test_keyslot_rules(image):
    with open(image, "r+b") as f:
        header = read(image)
        with pytest.raises(InputError, match="refusing to remove keyslot 0, the last one"):
            luks_common.remove_passphrase(f, header, OLD)
        with pytest.raises(InputError, match="keyslot 0 is not free"):
            luks_common.add_passphrase(f, header, OLD, NEW, slot=0, **FAST_KDF)
        with pytest.raises(BadPassphraseError):
            luks_common.add_passphrase(f, header, b"wrong", NEW, **FAST_KDF)
    assert read(image) == header  # nothing was written


def test_a_header_without_keyslots_refuses_a_new_passphrase_in_one_line(image):
    """With no keyslot left the volume key's size is unknown: PBKDF2's cost (which
    depends on it) once failed with a TypeError traceback."""
    with open(image, "r+b") as f:
        header, writes = read(image).without_keyslot(0)
        luks_common.commit(f, writes)
        with pytest.raises(InputError, match="disk.img: no keyslot is left"):
            luks_common.add_passphrase(f, read(image), OLD, NEW, **{**FAST_KDF, "iterations": None})


# -- crash safety ------------------------------------------------------------------------


class Crash(Exception):
    pass


class CrashingFile:
    """A file that writes half of its ``n``-th write and then "dies"."""

    def __init__(self, f, n):
        self._f, self._left = f, n

    def write(self, data):
        if self._left == 0:
            self._f.write(data[:len(data) // 2])
            self._f.flush()
            raise Crash
        self._left -= 1
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def luks1_image(path):
    luks1.format_luks1(path, 1 << 20, OLD, iterations=1000, iter_time_ms=1)
    return path


def luks2_image(path):
    format_luks2(path, 1 << 20, OLD, **FAST)
    return path


OPERATIONS = {
    "add": lambda f, h: luks_common.add_passphrase(f, h, OLD, NEW, **FAST_KDF),
    "change": lambda f, h: luks_common.change_passphrase(f, h, OLD, NEW, **FAST_KDF),
    "remove": lambda f, h: luks_common.remove_passphrase(f, h, NEW, slot=0),
}


@pytest.mark.parametrize("make", [luks1_image, luks2_image], ids=["luks1", "luks2"])
@pytest.mark.parametrize("operation", OPERATIONS)
def test_a_crash_at_any_write_leaves_old_or_new(tmp_path, make, operation):
    base = make(tmp_path / "base.img")
    if operation == "remove":  # two passphrases, then remove the old one's keyslot
        with open(base, "r+b") as f:
            OPERATIONS["add"](f, read(base))
    for n in range(10):
        image = tmp_path / f"crash{n}.img"
        shutil.copy(base, image)
        with open(image, "r+b") as f:
            try:
                OPERATIONS[operation](CrashingFile(f, n), read(image))
                finished = True
            except Crash:
                finished = False
        header = read(image)
        with open(image, "rb") as f:
            opens = [_opens(header, p, f) for p in (OLD, NEW)]
        expected = {"add": [True, True], "change": [False, True], "remove": [False, True]}[operation]
        assert any(opens) and (opens == expected or not finished), (n, opens)
        if finished:
            break
    else:
        pytest.fail("the operation never finished")


def _opens(header, passphrase, f):
    try:
        header.unlock(passphrase, f)
        return True
    except BadPassphraseError:
        return False


@pytest.mark.parametrize("make", [luks1_image, luks2_image], ids=["luks1", "luks2"])
def test_a_named_keyslot_is_tried_at_any_cost(tmp_path, make, monkeypatch):
    image = make(tmp_path / "disk.img")
    with open(image, "r+b") as f:
        luks_common.add_passphrase(f, read(image), OLD, NEW, **FAST_KDF)
        monkeypatch.setattr(luks_common, "UNLOCK_BUDGET", 1)
        header = read(image)
        with pytest.raises(InputError, match="^disk.img: keyslots 0, 1 not tried"):
            header.unlock(NEW, f)
        assert header.unlock_slot(NEW, f, 1)[0] == 1


def test_format_refuses_bad_arguments_before_writing(tmp_path):
    for kwargs, message in [({"sector_size": 8192}, "sector size"), ({"label": "x" * 60}, "does not fit"),
                            ({"key_bits": 384}, "key size"), ({"pbkdf": "scrypt"}, "unknown PBKDF")]:
        with pytest.raises(InputError, match=message):
            format_luks2(tmp_path / "x.img", 1 << 20, OLD, **{**FAST, **kwargs})
        assert not (tmp_path / "x.img").exists()
    assert list(tmp_path.iterdir()) == []


def test_detached_header_in_the_data_file_is_refused(tmp_path):
    path = tmp_path / "hdr"
    format_luks2(path, 0, OLD, **FAST, detached=True)
    header = read(path)
    with open(path, "rb") as f:
        key = header.unlock(OLD, f)
    with pytest.raises(FormatError, match="detached header, but this header is in the data file"):
        header.open_volume(FileStore(path, readonly=True), key)
    data = tmp_path / "data"
    data.write_bytes(bytes(8192))
    assert header.open_volume(FileStore(data, readonly=True), key).size == 8192
    with pytest.raises(InputError, match="a backing key was given, but a LUKS image has no backing file"):
        header.open_volume(FileStore(data, readonly=True), key, backing_keys=bytes(32))


def test_binary_header_checks():
    bin_header = binary.BinaryHeader(16384, 1, "", "sha256", bytes(64), "u", "", 0)
    area = bin_header.pack(bytes(16384 - 4096))
    assert binary.parse(area, 0)[0] == bin_header
    with pytest.raises(FormatError, match="says it is at offset 0"):
        binary.parse(bin_header.pack(bytes(12288)).replace(b"LUKS", b"SKUL", 1), 16384)
    with pytest.raises(FormatError, match="truncated"):
        binary.parse(area[:8000], 0)
    assert binary.peek_size(io.BytesIO(area).read(4096)) == 16384


def test_segment_is_checked_against_the_data_file(image):
    """A segment past the end of the header's file reads (the header may be detached,
    with a data offset: cryptsetup --header --offset); it must fit the data file."""
    rewrite(image, setter("segments/0/offset", str(1 << 30)))
    header = read(image)
    assert header.payload_size((1 << 30) + 8192) == 8192
    with pytest.raises(FormatError, match="^disk.img: payload offset 1073741824 is past the end of the file"):
        header.payload_size(image.stat().st_size)
    rewrite(image, setter("segments/0/size", str(1 << 20)))
    with pytest.raises(FormatError, match="^disk.img: payload ends at 1074790400, past the end of the data"):
        read(image).payload_size((1 << 30) + 8192)
