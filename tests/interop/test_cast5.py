"""cast5 (64-bit blocks) against QEMU's LUKS driver, both ways.

QEMU is the only oracle here: cryptsetup processes cast5 only through the kernel
(AF_ALG or device-mapper, neither available on these machines), so `reencrypt`
and even `open --test-passphrase` fail on a cast5 image; `luksDump` works.
"""


import pytest

from tests.conftest import qemu_luks_create, qemu_luks_opts, qemu_write, random_file, serving
from tests.tools import nbdcrypt, read_all, require, run, write_all

SIZE = 1 << 20

# nbdcrypt's spec -> qemu-img's luks options for the same cipher.  (plain differs from
# plain64 only from sector 2^32: tests/unit/test_engine.py checks the wrap against Botan.)
QEMU_CONFIGS = {
    "cast5-cbc-plain64": dict(cipher_mode="cbc", ivgen_alg="plain64"),
    "cast5-cbc-essiv:md5": dict(cipher_mode="cbc", ivgen_alg="essiv", ivgen_hash_alg="md5"),
    "cast5-ecb-plain64": dict(cipher_mode="ecb", ivgen_alg="plain64"),
}








def qemu_matches(image, key_file, raw):
    """Whether QEMU decrypts ``image`` to exactly the bytes of ``raw``."""
    result = run(["qemu-img", "compare", "--object", f"secret,id=s0,file={key_file}", "--image-opts",
                  f"driver=raw,file.filename={raw}", f"driver=luks,key-secret=s0,file.filename={image}"],
                 check=False)
    return result.returncode == 0 and "Images are identical" in result.stdout


@pytest.mark.parametrize("spec", QEMU_CONFIGS)
def test_qemu_images_both_ways(tmp_path, key_file, spec):
    """QEMU writes, nbdcrypt reads; nbdcrypt writes, QEMU reads; across sector 0 to the end."""
    require("qemu-img")
    image = qemu_luks_create(tmp_path / "image", key_file, size="1M", cipher_alg="cast5-128",
                             **QEMU_CONFIGS[spec])
    assert f"cipher: {spec}\n" in nbdcrypt("info", image).stdout
    old, new = random_file(tmp_path / "old", SIZE, seed=1), random_file(tmp_path / "new", SIZE, seed=2)
    qemu_write(image, key_file, old)
    with serving(image, key_file) as uri:
        assert read_all(uri) == old.read_bytes()
        write_all(uri, new)
    assert qemu_matches(image, key_file, new)


@pytest.mark.parametrize("spec", ["cast5-cbc-essiv:md5", "cast5-cbc-plain64"])
def test_nbdcrypt_format_opens_in_qemu(tmp_path, key_file, spec):
    """An image `nbdcrypt format` makes: QEMU opens its keyslot and reads the data."""
    require("qemu-img")
    image = tmp_path / "image"
    nbdcrypt("format", "--type", "luks1", "--cipher", spec, "--key-size", 128, "--iter-time", 10,
             "--key-file", key_file, image, SIZE)
    info = run(["qemu-img", "info", *qemu_luks_opts(image, key_file)]).stdout
    assert "cipher alg: cast5-128" in info
    plain = random_file(tmp_path / "plain", SIZE, seed=3)
    with serving(image, key_file) as uri:
        write_all(uri, plain)
    assert qemu_matches(image, key_file, plain)


@pytest.mark.parametrize("spec, qemu_options, qemu_error, reason", [
    ("cast5-xts-plain64", "cipher-mode=xts,ivgen-alg=plain64", "Unsupported cipher mode xts",
     "xts works with 128-bit block ciphers only, and cast5 has 64-bit blocks"),
    ("cast5-cbc-essiv:sha256", "cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
     "Cipher cast5-128 not supported with essiv",
     "ESSIV keys cast5 with the digest, and a sha256 digest is not a cast5 key"),
], ids=["xts", "essiv-sha256"])
def test_refused_where_qemu_refuses(tmp_path, key_file, spec, qemu_options, qemu_error, reason):
    """QEMU refuses these too; nbdcrypt says why in one line, exits 2, creates nothing."""
    require("qemu-img")
    qemu = run(["qemu-img", "create", "-f", "luks", "--object", f"secret,id=s0,file={key_file}", "-o",
                f"key-secret=s0,cipher-alg=cast5-128,{qemu_options}", str(tmp_path / "qemu.img"), "1M"],
               check=False)
    assert qemu.returncode != 0 and qemu_error in qemu.stderr
    image = tmp_path / "image"
    result = nbdcrypt("format", "--type", "luks1", "--cipher", spec, "--key-size", 128,
                      "--key-file", key_file, image, SIZE, check=False)
    assert (result.returncode, result.stderr) == (2, f"nbdcrypt: unsupported cipher {spec}: {reason}\n")
    assert not image.exists()


def test_cast5_xts_header_is_refused_by_name(tmp_path, key_file):
    """A LUKS1 header naming cast5 with XTS (as no tool writes) is refused on open."""
    image = tmp_path / "image"
    nbdcrypt("format", "--type", "luks1", "--cipher", "cast5-cbc-plain64", "--key-size", 128,
             "--iter-time", 10, "--key-file", key_file, image, SIZE)
    with open(image, "r+b") as f:
        f.seek(40)  # the cipher-mode field
        f.write(b"xts-plain64".ljust(32, b"\0"))
    before = image.read_bytes()
    result = nbdcrypt("info", image, check=False)
    assert (result.returncode, result.stderr) == (
        2, f"nbdcrypt: {image}: unsupported cipher cast5-xts-plain64: xts works with 128-bit block "
           f"ciphers only, and cast5 has 64-bit blocks\n")
    assert image.read_bytes() == before
