"""PBKDF2 against published vectors; the anti-forensic splitter against the LUKS1 spec."""

import hashlib
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdcrypt.crypto import af
from nbdcrypt.crypto.kdf import digest_size, pbkdf2, pbkdf2_iterations
from nbdcrypt.errors import InputError, UnsupportedError

HASHES = ["sha1", "sha256", "sha512", "ripemd160"]

# RFC 6070 (PBKDF2-HMAC-SHA1), except the 16777216-iteration case; the last one is
# RFC 7914 section 11 (PBKDF2-HMAC-SHA256).
PBKDF2_VECTORS = [
    ("sha1", b"password", b"salt", 1, 20, "0c60c80f961f0e71f3a9b524af6012062fe037a6"),
    ("sha1", b"password", b"salt", 2, 20, "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957"),
    ("sha1", b"password", b"salt", 4096, 20, "4b007901b765489abead49d926f721d065a429c1"),
    ("sha1", b"passwordPASSWORDpassword", b"saltSALTsaltSALTsaltSALTsaltSALTsalt", 4096, 25,
     "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038"),
    ("sha1", b"pass\0word", b"sa\0lt", 4096, 16, "56fa6aa75548099dcc37d7f03425e0c3"),
    ("sha256", b"passwd", b"salt", 1, 64,
     "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
     "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783"),
]


@pytest.mark.parametrize("hash_name, password, salt, iterations, length, expected", PBKDF2_VECTORS)
def test_pbkdf2_vectors(hash_name, password, salt, iterations, length, expected):
    assert pbkdf2(hash_name, password, salt, iterations, length).hex() == expected


@pytest.mark.parametrize("name", ["whirlpool", "md5", "SHA256", ""])
def test_unsupported_hash(name):
    with pytest.raises(UnsupportedError, match=f"^unsupported hash {name}$"):
        pbkdf2(name, b"p", b"s", 1, 20)
    with pytest.raises(UnsupportedError):
        af.split(b"k" * 16, 2, name)


def test_iterations_have_a_floor_and_scale_with_time_and_output_blocks():
    assert pbkdf2_iterations("sha256", 0.001, 32) == 1000
    assert pbkdf2_iterations("sha256", 1, 32, minimum=7) >= 7
    one_block = pbkdf2_iterations("sha1", 1000, 20)
    assert one_block > 1000
    # 32 bytes of sha1 output cost two PBKDF2 runs, so half the iterations fit.
    assert pbkdf2_iterations("sha1", 1000, 32) == pytest.approx(one_block / 2, abs=1)
    assert pbkdf2_iterations("sha1", 2000, 20) == pytest.approx(2 * one_block, abs=2)


def _spec_diffuse(block, hash_name):
    """LUKS1 spec 2.4, written out: H(be32(i) || chunk i), last chunk's hash truncated."""
    size = digest_size(hash_name)
    out = b""
    for i in range(0, -(-len(block) // size)):
        chunk = block[i * size : (i + 1) * size]
        out += hashlib.new(hash_name, i.to_bytes(4, "big") + chunk).digest()[: len(chunk)]
    return out


def _xor(a, b):
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("hash_name", HASHES)
@pytest.mark.parametrize("length", [16, 20, 50, 64])
def test_merge_known_answer(hash_name, length):
    # Three stripes: key = diffuse(diffuse(s0) ^ s1) ^ s2.
    s0, s1, s2 = (bytes((k + i) % 256 for i in range(length)) for k in (1, 101, 201))
    expected = _xor(_spec_diffuse(_xor(_spec_diffuse(s0, hash_name), s1), hash_name), s2)
    assert af.merge(s0 + s1 + s2, length, 3, hash_name) == expected


@settings(max_examples=40, deadline=None)
@given(key=st.binary(min_size=1, max_size=100), stripes=st.integers(1, 40), hash_name=st.sampled_from(HASHES))
def test_split_merge_round_trip(key, stripes, hash_name):
    material = af.split(key, stripes, hash_name)
    assert isinstance(material, bytearray) and len(material) == len(key) * stripes
    assert af.merge(material + b"extra", len(key), stripes, hash_name) == key


def test_split_is_randomised_and_every_stripe_matters():
    key = os.urandom(32)
    a, b = af.split(key, 4000, "sha256"), af.split(key, 4000, "sha256")
    assert a != b
    a[32 * 1234] ^= 1
    assert af.merge(a, 32, 4000, "sha256") != key


def test_merge_rejects_short_material_and_empty_keys():
    with pytest.raises(InputError, match="need 64000"):
        af.merge(bytes(63999), 16, 4000, "sha1")
    with pytest.raises(InputError):
        af.split(b"", 4000, "sha1")


def test_4000_stripes_of_64_bytes_is_fast():
    key = os.urandom(64)
    start = time.perf_counter()
    assert af.merge(af.split(key, 4000, "sha256"), 64, 4000, "sha256") == key
    assert time.perf_counter() - start < 0.2  # a few ms here; generous for busy CI
