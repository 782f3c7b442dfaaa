import re

import pytest

from nbdcrypt.crypto.spec import CipherSpec
from nbdcrypt.errors import InputError, UnsupportedError

GOOD = [
    ("aes-xts-plain64", CipherSpec("aes", "xts", "plain64")),
    ("aes-xts-plain", CipherSpec("aes", "xts", "plain")),
    ("aes-cbc-essiv:sha256", CipherSpec("aes", "cbc", "essiv", "sha256")),
    ("aes-cbc-plain64be", CipherSpec("aes", "cbc", "plain64be")),
    ("aes-cbc-benbi", CipherSpec("aes", "cbc", "benbi")),
    ("aes-cbc-null", CipherSpec("aes", "cbc", "null")),
    ("aes-ctr-plain64", CipherSpec("aes", "ctr", "plain64")),
    ("aes-ecb", CipherSpec("aes", "ecb", "")),
    ("aes-ecb-plain64", CipherSpec("aes", "ecb", "plain64")),  # QEMU's ECB; the IV is ignored
    ("cast5-cbc-plain64", CipherSpec("cast5", "cbc", "plain64")),
    ("cast5-cbc-essiv:md5", CipherSpec("cast5", "cbc", "essiv", "md5")),
    ("cast5-ecb", CipherSpec("cast5", "ecb", "")),
]

BAD = [
    "", "aes", "aes-", "aes-cbc", "aes-xts-", "aes-cbc-essiv",
    "aes-cbc-essiv:", "aes-cbc-essiv:sha1", "aes-cbc-essiv:sha512", "aes-cbc-plain:sha256",
    "aes-xts-plain64-", "AES-XTS-PLAIN64", "blowfish-cbc-essiv:sha256", "des3_ede-cbc-plain",
    "aes-gcm-random", "aes-xts-lmk", "aes--plain64", "capi:xts(aes)-plain64",
]


@pytest.mark.parametrize("text, spec", GOOD)
def test_parse_and_format_round_trip(text, spec):
    assert CipherSpec.parse(text) == spec
    assert str(spec) == text


@pytest.mark.parametrize("text, spec", GOOD)
def test_luks_header_strings_round_trip(text, spec):
    assert (spec.luks_name, spec.luks_mode) == tuple(text.split("-", 1))
    assert CipherSpec.from_luks(spec.luks_name, spec.luks_mode) == spec


@pytest.mark.parametrize("text", BAD)
def test_unsupported_specs_are_named_in_the_error(text):
    with pytest.raises(UnsupportedError, match=f"unsupported cipher {re.escape(text)}$"):
        CipherSpec.parse(text)


def test_bad_luks_fields_name_the_whole_spec():
    with pytest.raises(UnsupportedError, match="unsupported cipher blowfish-cbc-plain"):
        CipherSpec.from_luks("blowfish", "cbc-plain")


def test_constructor_checks_too():
    with pytest.raises(UnsupportedError):
        CipherSpec("aes", "xts", "essiv")  # essiv without its hash


@pytest.mark.parametrize("text, good, bad", [
    ("aes-xts-plain64", [32, 64], [16, 24, 48, 0, 128]),
    ("aes-cbc-essiv:sha256", [16, 24, 32], [8, 64, 0]),
    ("aes-ecb", [16, 24, 32], [31]),
    ("aes-ctr-plain64", [16, 24, 32], [64]),
])
def test_key_sizes(text, good, bad):
    spec = CipherSpec.parse(text)
    for size in good:
        spec.check_key_size(size)
    for size in bad:
        with pytest.raises(InputError, match=f"key size {8 * size} bits does not fit {text} "):
            spec.check_key_size(size)


@pytest.mark.parametrize("text, reason", [
    ("cast5-xts-plain64", "xts works with 128-bit block ciphers only, and cast5 has 64-bit blocks"),
    ("cast5-ctr-plain64", "ctr works with 128-bit block ciphers only, and cast5 has 64-bit blocks"),
    ("cast5-cbc-essiv:sha256", "ESSIV keys cast5 with the digest, and a sha256 digest is not a cast5 key"),
    ("sm4-cbc-essiv:sha256", "ESSIV keys sm4 with the digest, and a sha256 digest is not a sm4 key"),
])
def test_refusals_say_why(text, reason):
    """As dm-crypt and QEMU: XTS is defined for 128-bit blocks only, and ESSIV keys the
    cipher with the whole digest (QEMU: "Cipher cast5-128 not supported with essiv")."""
    with pytest.raises(UnsupportedError, match=f"^unsupported cipher {re.escape(text)}: {reason}$"):
        CipherSpec.parse(text)


def test_block_sizes():
    assert CipherSpec.parse("cast5-cbc-plain64").block_size == 8
    assert CipherSpec.parse("aes-xts-plain64").block_size == 16
    assert CipherSpec.parse("cast5-cbc-plain64").key_sizes == (16,)
