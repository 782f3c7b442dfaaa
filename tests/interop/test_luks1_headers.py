"""LUKS1 interop with tools nobody here wrote: qemu-img/qemu-io and cryptsetup.

Both directions: images made by qemu-img and cryptsetup open with nbdcrypt to the
master key cryptsetup dumps (and decrypt what qemu-io wrote); images made by
format_luks1 pass cryptsetup's checks and open in QEMU.  cryptsetup works here on
regular files without device-mapper for luksFormat, luksDump (incl.
--dump-master-key) and open --test-passphrase; nothing below maps a device.
"""

import hashlib
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nbdcrypt.errors import BadPassphraseError
from nbdcrypt.formats import open_header
from nbdcrypt.formats.luks1 import format_luks1, layout
from tests.conftest import qemu_img_create
from tests.tools import require, run, write_key

PASSPHRASE = b"correct horse battery staple"
SIZE = 4 << 20
# (offset, length, byte) written through QEMU, read back through payload_cipher: the
# second lands mid-payload, so a wrong IV sector numbering shows.
PATTERNS = [(0, 64 << 10, 0xAB), ((1 << 20) + 512, 4096, 0xCD)]

# id, qemu-img -o options, the spec nbdcrypt should read, key bits, hash, whether
# cryptsetup can read its keyslot here (it hands "ecb-plain64", which QEMU writes
# for ECB, to the kernel, and there is no kernel crypto here).  No sha1: QEMU 7.2's
# PBKDF2 benchmark fails with it here every time (its first sample reads 0 ms).
QEMU_IMAGES = [
    ("aes-256-xts", "cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64", "aes-xts-plain64", 512, "sha256", True),
    ("aes-128-xts", "cipher-alg=aes-128,cipher-mode=xts", "aes-xts-plain64", 256, "sha256", True),
    ("aes-256-cbc-essiv", "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
     "aes-cbc-essiv:sha256", 256, "sha256", True),
    ("aes-256-cbc-plain64-sha512", "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha512",
     "aes-cbc-plain64", 256, "sha512", True),
    ("aes-128-cbc-plain-ripemd160", "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=plain,hash-alg=ripemd160",
     "aes-cbc-plain", 128, "ripemd160", True),
    ("aes-256-ecb", "cipher-alg=aes-256,cipher-mode=ecb", "aes-ecb-plain64", 256, "sha256", False),
]
QEMU_PARAMS = [pytest.param(*image, id=image[0]) for image in QEMU_IMAGES]

FORMAT_SPECS = [
    ("aes-xts-plain64", 256, "sha256"),
    ("aes-xts-plain64", 512, "sha512"),
    ("aes-cbc-essiv:sha256", 256, "sha1"),
    ("aes-cbc-plain64", 128, "sha256"),
]


def qemu_luks(path, key, options):
    """A LUKS image made by qemu-img create with qemu's luks ``options``."""
    qemu_img_create("-f", "luks", "--object", f"secret,id=s0,file={key}",
                    "-o", f"key-secret=s0,iter-time=10,{options}", path, SIZE)
    return path


def image_opts(key, path):
    return ["--object", f"secret,id=s0,file={key}", "--image-opts", f"driver=luks,key-secret=s0,file.filename={path}"]


def dump_master_key(path, key):
    out = run(["cryptsetup", "luksDump", "--dump-master-key", "--batch-mode", "--key-file", str(key), str(path)]).stdout
    return bytes.fromhex("".join(out.split("MK dump:")[1].split()))


def unlock(path, passphrase=PASSPHRASE):
    with open(path, "rb") as f:
        header = open_header(f, path.name)
        return header, header.unlock(passphrase, f)


def check_qemu_writes_decrypt(path, key):
    """Write PATTERNS through qemu-io, then decrypt the raw file bytes ourselves."""
    writes = (arg for off, n, byte in PATTERNS for arg in ("-c", f"write -P {byte:#x} {off} {n}"))
    run(["qemu-io", *image_opts(key, path), *writes])
    header, master_key = unlock(path)
    cipher = header.payload_cipher(master_key)
    with open(path, "rb") as f:
        for off, n, byte in PATTERNS:
            f.seek(header.payload_offset + off)
            buf = bytearray(f.read(n))
            cipher.decrypt(buf, off // 512)
            assert buf == bytes([byte]) * n, f"{path.name}: QEMU's data at {off} does not decrypt"


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return write_key(tmp_path_factory.mktemp("keys") / "key", PASSPHRASE)


@pytest.fixture(scope="module")
def qemu_images(request, tmp_path_factory, key):
    """A fresh copy of every QEMU_IMAGES image (qemu-io writes into them), by id.

    qemu-img spends seconds of CPU benchmarking PBKDF2 whatever iter-time says, so
    pristine images are made in parallel and kept in pytest's cache, keyed by QEMU's
    version and everything that shapes them.
    """
    require("qemu-img", "qemu-io")
    version = run(["qemu-img", "--version"]).stdout.splitlines()[0]
    tag = hashlib.sha256(repr((version, PASSPHRASE, SIZE, QEMU_IMAGES)).encode()).hexdigest()[:16]
    cache = request.config.cache.mkdir(f"luks1-qemu-{tag}")

    def make(image):
        partial = qemu_luks(cache / f"{image[0]}.tmp", key, image[1])
        partial.replace(cache / f"{image[0]}.img")

    missing = [image for image in QEMU_IMAGES if not (cache / f"{image[0]}.img").exists()]
    with ThreadPoolExecutor(max(1, len(missing))) as pool:
        list(pool.map(make, missing))
    directory = tmp_path_factory.mktemp("qemu")
    return {name: Path(shutil.copy(cache / f"{name}.img", directory)) for name, *_ in QEMU_IMAGES}


@pytest.mark.parametrize("name, options, spec, key_bits, hash_name, cryptsetup_reads", QEMU_PARAMS)
def test_qemu_made_image_unlocks(qemu_images, key, name, options, spec, key_bits, hash_name, cryptsetup_reads):
    path = qemu_images[name]
    header, master_key = unlock(path)
    assert (str(header.cipher_spec), header.key_bytes * 8, header.hash_name) == (spec, key_bits, hash_name)
    if cryptsetup_reads:
        require("cryptsetup")
        assert dump_master_key(path, key) == master_key
    check_qemu_writes_decrypt(path, key)
    with pytest.raises(BadPassphraseError):
        unlock(path, b"wrong passphrase")


def test_cryptsetup_made_image_unlocks(tmp_path, key):
    require("cryptsetup")
    path = tmp_path / "cs.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    run(["cryptsetup", "luksFormat", "--type", "luks1", "--batch-mode", "--iter-time", "10", "--hash", "sha1",
         "--key-file", str(key), str(path)])
    header, master_key = unlock(path)
    assert dump_master_key(path, key) == master_key
    assert (str(header.cipher_spec), header.key_bytes * 8, header.hash_name) == ("aes-xts-plain64", 512, "sha1")
    assert header.payload_offset == 4096 * 512


@pytest.mark.parametrize("cipher, key_bits, hash_name", FORMAT_SPECS, ids=[f"{c}-{b}-{h}" for c, b, h in FORMAT_SPECS])
def test_our_image_passes_cryptsetup_and_qemu(tmp_path, key, cipher, key_bits, hash_name):
    require("cryptsetup", "qemu-img", "qemu-io")
    path = tmp_path / "ours.img"
    made = format_luks1(path, SIZE, PASSPHRASE, cipher=cipher, key_bits=key_bits, hash_name=hash_name, iter_time_ms=10)

    fields = dict(re.findall(r"^(\w[\w ]*):\s*(.*?)\s*$", run(["cryptsetup", "luksDump", str(path)]).stdout, re.M))
    assert fields["Version"] == "1"
    assert f"{fields['Cipher name']}-{fields['Cipher mode']}" == cipher
    assert (fields["Hash spec"], fields["MK bits"], fields["UUID"]) == (hash_name, str(key_bits), made.uuid)
    assert fields["Payload offset"] == str(made.payload_offset // 512) == str(layout(key_bits // 8)[1])

    run(["cryptsetup", "open", "--test-passphrase", "--key-file", str(key), str(path)])
    wrong = write_key(tmp_path / "wrong", b"wrong passphrase")
    opened = run(["cryptsetup", "open", "--test-passphrase", "--key-file", str(wrong), str(path)], check=False)
    assert opened.returncode != 0
    _, master_key = unlock(path)
    assert dump_master_key(path, key) == master_key

    info = json.loads(run(["qemu-img", "info", "--output=json", *image_opts(key, path)]).stdout)
    assert info["virtual-size"] == SIZE
    check_qemu_writes_decrypt(path, key)
    with pytest.raises(BadPassphraseError):
        unlock(path, b"wrong passphrase")
