"""`nbdcrypt keyslot add|change|remove` and `format --header` as a user runs them,
checked by cryptsetup (and, for LUKS1, QEMU), bad input refused without a write."""

import pytest

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
