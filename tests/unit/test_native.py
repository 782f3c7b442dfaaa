"""The native sector kernel against the numpy engine and the per-sector reference, byte
for byte: every AES spec, sector size, IV option, request length and direction."""

import json
import os
import random
import signal
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdcrypt.crypto import native
from nbdcrypt.crypto.engine import CHUNK, SectorCipher
from nbdcrypt.crypto.spec import ESSIV_HASHES, CipherSpec
from tests import reference_cipher
from tests.conftest import _await_line, nbdcrypt_luks1
from tests.tools import nbdcrypt_cmd, require

pytestmark = pytest.mark.skipif(native.Kernel is None, reason="native kernel not built")

IVS = ["plain64", "plain", "plain64be", "benbi", "null"] + [f"essiv:{h}" for h in ESSIV_HASHES]
AES_SPECS = [f"aes-{mode}-{iv}" for mode in ("xts", "cbc", "ctr") for iv in IVS] + ["aes-ecb", "aes-ecb-plain64"]
SECTOR_SIZES = [512, 1024, 2048, 4096]
# Around the 32-bit wrap of "plain" and the 64-bit wrap of the IV sector at every
# sector size (sector * sector_size / 512 too), and past 2^64 (taken modulo 2^64).
EDGE_SECTORS = [0, 2**32 - 5, 2**32, 2**64 // 8 - 3, 2**64 // 2 - 2, 2**64 - 3, 2**64 + 5]


def both_engines(spec, key, **options):
    return (SectorCipher(spec, key, engine="native", **options),
            SectorCipher(spec, key, engine="numpy", **options))


def xts_halves_differ(spec, key):
    """OpenSSL refuses XTS keys whose halves are equal: flip a bit of such a key."""
    if spec.mode == "xts" and key[:len(key) // 2] == key[len(key) // 2:]:
        return key[:-1] + bytes([key[-1] ^ 1])
    return key


@pytest.mark.parametrize("spec_text", AES_SPECS)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_native_matches_numpy_and_reference(spec_text, data):
    spec = CipherSpec.parse(spec_text)
    key_size = data.draw(st.sampled_from(spec.key_sizes))
    key = xts_halves_differ(spec, data.draw(st.binary(min_size=key_size, max_size=key_size)))
    sector_size = data.draw(st.sampled_from(SECTOR_SIZES))
    # Across the kernel's 16 KiB pieces and CBC groups of 8 to 32 sectors.
    count = data.draw(st.integers(1, 80 if sector_size == 512 else 20))
    sector = data.draw(st.one_of(st.sampled_from(EDGE_SECTORS), st.integers(0, 2**64 - 1)))
    options = dict(sector_size=sector_size, iv_large_sectors=data.draw(st.booleans()),
                   iv_tweak=data.draw(st.sampled_from([0, 1, 2**40, 2**64 - 1])))
    text = random.Random(data.draw(st.integers())).randbytes(count * sector_size)
    fast, numpy = both_engines(spec, key, **options)
    assert fast.engine == "native" and numpy.engine == "numpy"
    for encrypt in (True, False):
        expected = reference_cipher.crypt(spec, key, text, sector, encrypt=encrypt, **options)
        for cipher in (fast, numpy):
            buf = bytearray(text)
            (cipher.encrypt if encrypt else cipher.decrypt)(buf, sector)
            assert buf == expected, (cipher.engine, "encrypt" if encrypt else "decrypt")


@pytest.mark.parametrize("spec_text", ["aes-xts-plain64", "aes-cbc-essiv:sha256", "aes-ctr-plain64be",
                                       "aes-cbc-plain", "aes-ecb"])
@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_requests_beyond_a_chunk(spec_text, sector_size):
    """More than the numpy engine's CHUNK (1 MiB), near the plain IV's 32-bit wrap."""
    spec = CipherSpec.parse(spec_text)
    key = bytes(range(1, 65 if spec.mode == "xts" else 33))
    text = random.Random(sector_size).randbytes(CHUNK + 3 * sector_size)
    sector = 2**32 // (sector_size // 512) - 700
    fast, numpy = both_engines(spec, key, sector_size=sector_size)
    for encrypt in (True, False):
        expected = reference_cipher.crypt(spec, key, text, sector, encrypt=encrypt, sector_size=sector_size)
        for cipher in (fast, numpy):
            buf = bytearray(text)
            (cipher.encrypt if encrypt else cipher.decrypt)(buf, sector)
            assert buf == expected, cipher.engine


def environment(engine):
    """This process's environment with NBDCRYPT_ENGINE set to ``engine`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "NBDCRYPT_ENGINE"}
    return env | ({"NBDCRYPT_ENGINE": engine} if engine else {})


def test_numpy_fallback_forced_from_the_environment():
    """NBDCRYPT_ENGINE=numpy makes a fresh process run AES in numpy, with the same bytes."""
    script = ("import sys; from nbdcrypt.crypto import engine; from nbdcrypt.crypto.spec import CipherSpec\n"
              "cipher = engine.SectorCipher(CipherSpec.parse('aes-xts-plain64'), bytes(range(64)))\n"
              "buf = bytearray(range(256)) * 64\n"
              "cipher.encrypt(buf, 2**32 - 3)\n"
              "print(engine.ENGINE, cipher.engine, buf.hex())")
    outputs = {}
    for forced in ("numpy", None):
        done = subprocess.run([sys.executable, "-c", script], env=environment(forced), capture_output=True,
                              text=True, check=True)
        outputs[forced] = done.stdout.split()
    assert outputs["numpy"][:2] == ["numpy", "numpy"]
    assert outputs[None][:2] == ["native", "native"]
    assert outputs["numpy"][2] == outputs[None][2]


def test_info_and_serve_name_the_engine(tmp_path, key_file):
    image = nbdcrypt_luks1(tmp_path / "img", key_file, "16M")
    info = nbdcrypt_cmd() + ["info", "--json", str(image)]
    for forced, expected in (("numpy", "numpy"), (None, "native")):
        done = subprocess.run(info, env=environment(forced), capture_output=True, text=True, check=True)
        assert json.loads(done.stdout)["engine"] == expected
    require("nbdkit")
    serve = nbdcrypt_cmd() + ["serve", str(image), "--key-file", str(key_file), "--socket", str(tmp_path / "sock")]
    with subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            line = _await_line(proc, b"serving", 60)
        finally:
            proc.send_signal(signal.SIGTERM)
    assert line and b"(luks1, aes-xts-plain64 in the native engine, " in line, line


def test_other_ciphers_stay_in_numpy():
    pytest.importorskip("botan2", reason="needs python3-botan")
    assert SectorCipher(CipherSpec.parse("serpent-xts-plain64"), bytes(range(64))).engine == "numpy"


def test_bad_requests_are_refused_alike():
    spec, key = CipherSpec.parse("aes-cbc-essiv:sha256"), bytes(range(32))
    for cipher in both_engines(spec, key):
        with pytest.raises(ValueError, match="negative sector -1"):
            cipher.encrypt(bytearray(512), -1)
        with pytest.raises(ValueError, match="not a multiple of the 512-byte sector size"):
            cipher.decrypt(bytearray(513), 0)
        with pytest.raises(TypeError, match="writable"):
            cipher.encrypt(b"\0" * 512, 0)
    with pytest.raises(ValueError, match="engine 'gpu'"):
        SectorCipher(spec, key, engine="gpu")


@pytest.mark.parametrize("spec_text,sector_size", [("aes-xts-plain64", 512), ("aes-xts-plain64", 4096),
                                                   ("aes-cbc-essiv:sha256", 4096), ("aes-ctr-plain", 1024)])
def test_many_threads_share_one_kernel(spec_text, sector_size):
    """Concurrent requests with the GIL released: each call has contexts of its own."""
    spec = CipherSpec.parse(spec_text)
    key = bytes(range(64 if spec.mode == "xts" else 32))
    fast, numpy = both_engines(spec, key, sector_size=sector_size)
    rng = random.Random(5)
    requests = [(rng.randbytes(rng.randint(1, 48) * sector_size), rng.randrange(2**64)) for _ in range(16)]
    expected = []
    for text, sector in requests:
        buf = bytearray(text)
        numpy.encrypt(buf, sector)
        expected.append(bytes(buf))
    results, start = [], threading.Barrier(len(requests))

    def work(i):
        text, sector = requests[i]
        start.wait()
        for _ in range(30):
            buf = bytearray(text)
            fast.encrypt(buf, sector)
            results.append(buf == expected[i])
            fast.decrypt(buf, sector)
            results.append(buf == text)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * (60 * len(requests))
