"""`nbdcrypt keyslot add|change|remove` and `format --header` as a user runs them,
checked by cryptsetup (and, for LUKS1, QEMU), bad input refused without a write."""

import shutil

import pytest

from nbdcrypt.formats import luks1, luks_common, open_header
from tests.conftest import random_file, serving, sha256_file
from tests.tools import FAST_PBKDF, cryptsetup, cryptsetup_opens, nbdcrypt, require, run, write_key

LAYOUTS = {
    "luks1": ["--type", "luks1"],
    "luks1-detached": ["--type", "luks1", "--header", "{hdr}"],
    "luks2": ["--type", "luks2"],
    "luks2-detached": ["--type", "luks2", "--header", "{hdr}"],
}




@pytest.fixture(params=LAYOUTS)
def volume(request, tmp_path, key_file):
    """``(image, extra args naming the header, file holding the header)``."""
    image, hdr = tmp_path / "image", tmp_path / "hdr"
    options = [o.format(hdr=hdr) for o in LAYOUTS[request.param]]
    nbdcrypt("format", image, "2M", "--key-file", key_file, *options, *FAST_PBKDF["pbkdf2"])
    where = options[2:]
    return image, where, hdr if where else image


def test_add_change_remove_checked_by_cryptsetup(tmp_path, key_file, volume):
    require("cryptsetup")
    image, where, header = volume
    k1, k2 = write_key(tmp_path / "k1", b"second"), write_key(tmp_path / "k2", b"third")
    fast = FAST_PBKDF["pbkdf2"]
    out = nbdcrypt("keyslot", "add", image, *where, "--key-file", key_file, "--new-key-file", k1,
                   "--key-slot", 5, *fast).stdout
    assert out == f"{header}: keyslot 5 added\n"
    nbdcrypt("keyslot", "change", image, *where, "--key-file", k1, "--new-key-file", k2, *fast)
    nbdcrypt("keyslot", "remove", image, *where, "--key-file", k2, "--key-slot", 0)
    opts = ["--header", header] if where else []
    assert [cryptsetup_opens(image, k, *opts) for k in (key_file, k1, k2)] == [False, False, True]
    assert cryptsetup("repair", header).returncode == 0
    plain = random_file(tmp_path / "plain", 2 << 20, seed=7)
    with serving(image, k2, *where) as uri:
        run(["nbdcopy", "--flush", str(plain), uri])
    with serving(image, k2, *where, "--readonly") as uri:
        assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(2 << 20)


@pytest.mark.parametrize("args, message", [
    (["remove", "--key-file", "{key}"], "refusing to remove keyslot 0, the last one"),
    (["remove", "--key-file", "{key}", "--key-slot", "3"], "keyslot 3 is not in use"),
    (["add", "--key-file", "{wrong}", "--new-key-file", "{key}"], "no key available with this passphrase"),
    (["add", "--key-file", "{key}", "--new-key-file", "{key}", "--key-slot", "0"], "keyslot 0 is not free"),
    (["add", "--key-file", "{key}", "--new-key-file", "{missing}"], "key file not found"),
    (["change", "--key-file", "{wrong}", "--new-key-file", "{key}"], "no key available"),
    (["change", "--key-file", "{key}", "--new-key-file", "{key}", "--pbkdf-force-iterations", "0",
      "--pbkdf", "pbkdf2", "--iter-time", "0"], "iteration time must be positive"),
])
def test_bad_input_is_one_line_and_no_write(tmp_path, key_file, volume, args, message):
    image, where, header = volume
    wrong = write_key(tmp_path / "wrong", b"wrong")
    args = [a.format(key=key_file, wrong=wrong, missing=tmp_path / "missing") for a in args]
    before = sha256_file(header)
    result = nbdcrypt("keyslot", args[0], image, *where, *args[1:], check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert sha256_file(header) == before


@pytest.mark.parametrize("options, message", [
    (["--pbkdf", "argon2id", "--pbkdf-parallel", "9", "--pbkdf-memory", "64"], "Argon2 threads is 9, expected 1 to 4"),
    (["--pbkdf", "argon2i", "--pbkdf-memory", "1"], "Argon2 memory"),
])
def test_bad_pbkdf_options(tmp_path, key_file, options, message):
    image = tmp_path / "image"
    nbdcrypt("format", image, "1M", "--key-file", key_file, *FAST_PBKDF["pbkdf2"])
    before = sha256_file(image)
    result = nbdcrypt("keyslot", "add", image, "--key-file", key_file, "--new-key-file", key_file,
                      "--pbkdf-force-iterations", "4", *options, check=False)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1
    assert sha256_file(image) == before


def test_format_with_header_never_touches_the_data(tmp_path, key_file):
    data = random_file(tmp_path / "data", 1 << 20, seed=8)
    before = sha256_file(data)
    for kind in ("luks1", "luks2"):
        header = tmp_path / f"hdr-{kind}"
        nbdcrypt("format", "--type", kind, data, "--header", header, "--key-file", key_file,
                 *FAST_PBKDF["pbkdf2"])
        assert sha256_file(data) == before
        info = nbdcrypt("info", data, "--header", header, "--json").stdout
        assert '"payload_offset": 0' in info
    refused = nbdcrypt("format", data, "1M", "--header", tmp_path / "h3", "--key-file", key_file, check=False)
    assert refused.returncode == 2 and "omit SIZE" in refused.stderr
    assert not (tmp_path / "h3").exists() and sha256_file(data) == before


def test_serving_a_detached_header_as_the_image_is_refused(tmp_path, key_file):
    header = tmp_path / "hdr"
    nbdcrypt("format", tmp_path / "data", "1M", "--header", header, "--key-file", key_file,
             *FAST_PBKDF["pbkdf2"])
    before = sha256_file(header)
    result = nbdcrypt("serve", header, "--key-file", key_file, "--socket", tmp_path / "s", check=False)
    assert result.returncode != 0 and "detached header" in result.stderr
    assert sha256_file(header) == before


# -- a torn LUKS1 header write (issue 14) ---------------------------------------------


class PowerLoss(Exception):
    pass


class TornFile:
    """A file whose ``n``-th write reaches the disk only in part, then the power fails:
    ``keep`` is "first" (its first 512-byte sector only) or "rest" (all but that)."""

    def __init__(self, f, n, keep):
        self._f, self._left, self._keep = f, n, keep

    def write(self, data):
        if self._left == 0:
            if self._keep == "first":
                self._f.write(data[:512])
            else:
                self._f.seek(self._f.tell() + 512)
                self._f.write(data[512:])
            self._f.flush()
            raise PowerLoss
        self._left -= 1
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


FAST_KDF = dict(pbkdf="pbkdf2", iterations=1000)


def luks1_with_slots(path, old, other, old_slot, monkeypatch):
    """A LUKS1 image with ``old`` in ``old_slot``, ``other`` in slots 1-6 and one free
    slot: 7 or 0.  The 592-byte header spans two sectors: slots 0-5 lie in the
    first, slot 7 in the second."""
    monkeypatch.setattr(luks1, "MK_DIGEST_MS", 1)  # cheap digests: cryptsetup tries every slot
    luks1.format_luks1(path, 1 << 20, old, iterations=1000, iter_time_ms=1)
    with open(path, "r+b") as f:
        for slot in range(1, 7):
            luks_common.add_passphrase(f, open_header(f), old, other, slot, **FAST_KDF)
        if old_slot == 7:
            luks_common.add_passphrase(f, open_header(f), old, old, 7, **FAST_KDF)
            luks_common.remove_passphrase(f, open_header(f), old, slot=0)
    return path


@pytest.mark.parametrize("old_slot, new_slot", [(0, 7), (7, 0)])
def test_luks1_change_survives_a_torn_header_write(tmp_path, monkeypatch, old_slot, new_slot):
    """A power loss during any write of a passphrase change, with only one sector of it
    on disk, leaves a header cryptsetup opens with the old or the new passphrase."""
    require("cryptsetup")
    old, new = write_key(tmp_path / "old", b"old"), write_key(tmp_path / "new", b"new")
    base = luks1_with_slots(tmp_path / "base.img", b"old", b"other", old_slot, monkeypatch)
    image = tmp_path / "image"
    for n in range(4):  # the new slot's material, two header writes, the old material wiped
        for keep in ("first", "rest"):
            shutil.copy(base, image)
            with open(image, "r+b") as f:
                with pytest.raises(PowerLoss):
                    luks_common.change_passphrase(TornFile(f, n, keep), open_header(f), b"old", b"new",
                                                  old_slot, **FAST_KDF)
            opens = [cryptsetup_opens(image, k, "--key-slot", s) for k, s in ((old, old_slot), (new, new_slot))]
            assert any(opens), (n, keep)
    shutil.copy(base, image)
    with open(image, "r+b") as f:  # no power loss: the new passphrase only
        _, slot = luks_common.change_passphrase(f, open_header(f), b"old", b"new", old_slot, **FAST_KDF)
    assert slot == new_slot
    assert [cryptsetup_opens(image, k) for k in (old, new)] == [False, True]
