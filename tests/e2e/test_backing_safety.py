"""A qcow2 backing file name cannot reach a host file the operator did not allow:
names that are absolute, hold ``..`` or resolve (through symlinks) outside the image's
directory are refused unless ``--backing-dir`` allows where they lead, and a backing
file is never probed into qcow2 when the image did not declare it so."""

import shutil
import struct

import pytest

from tests.conftest import PASSPHRASE, qemu_img_create, serving
from tests.daemon.conftest import daemon
from tests.tools import nbdcrypt, nbdcrypt_cmd, read_all, require, run, write_key

SECRET = b"root:$6$not-for-the-client$" * 100
EXT_BACKING_FORMAT = 0xE2792ACA
V3_HEADER_LENGTH = 112


@pytest.fixture(autouse=True)
def tools():
    require("qemu-img", "nbdkit")


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    return path


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One encrypted qcow2 image of 1 MiB; copies of it get their backing names from
    ``qemu-img rebase -u`` (a LUKS image from qemu-img costs seconds)."""
    path = tmp_path_factory.mktemp("template") / "img.qcow2"
    key = write_key(path.with_name("key"), PASSPHRASE)
    qemu_img_create("-f", "qcow2", "--object", f"secret,id=s0,file={key}", "-o",
                    "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", path, "1M")
    return path


def overlay(template, path, key_file, backing, backing_format="raw"):
    """A copy of ``template`` at ``path`` naming ``backing`` (qemu-img does not check it)."""
    path.parent.mkdir(exist_ok=True)
    shutil.copyfile(template, path)
    run(["qemu-img", "rebase", "-u", "-b", backing, "-F", backing_format, "--object",
         f"secret,id=s0,file={key_file}", "--image-opts", f"driver=qcow2,encrypt.key-secret=s0,file.filename={path}"])
    return path


def escaping(template, tmp_path, key_file, secret, case):
    """An image whose backing name leads out of its directory: by ``..``, an absolute
    name, a symlink, or ``..`` to a symlink."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "link").symlink_to(secret)
    path, name = {"dotdot": ("dotdot.qcow2", "../secret"), "absolute": ("absolute.qcow2", str(secret)),
                  "symlink": ("symlink.qcow2", "link"), "sub-dotdot": ("sub/img.qcow2", "../link")}[case]
    return overlay(template, images / path, key_file, name)


def refused(*args):
    """``nbdcrypt ARGS`` fails with one line and exit status 2, leaking nothing."""
    result = run(nbdcrypt_cmd() + list(map(str, args)), check=False, timeout=60)  # old code served on
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "root:" not in result.stdout + result.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "sub-dotdot"])
def test_escaping_backing_name_is_refused(template, tmp_path, key_file, secret, case):
    image = escaping(template, tmp_path, key_file, secret, case)
    line = refused("serve", image, "--key-file", key_file, "--socket", tmp_path / "s.sock")
    assert "outside" in line and "--backing-dir" in line, line
    line = refused("info", image)
    assert "outside" in line and "--backing-dir" in line, line


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink"])
def test_backing_dir_allows_it(template, tmp_path, key_file, secret, case):
    image = escaping(template, tmp_path, key_file, secret, case)
    with serving(image, key_file, "--readonly", "--backing-dir", tmp_path) as uri:
        assert read_all(uri)[:len(SECRET)] == SECRET
    assert "backing_file" in nbdcrypt("info", image, "--backing-dir", tmp_path).stdout


def test_backing_dir_from_the_config_file(template, tmp_path, key_file, secret):
    image = escaping(template, tmp_path, key_file, secret, "dotdot")
    config = tmp_path / "serve.toml"
    config.write_text(f'backing-dir = ["{tmp_path / "elsewhere"}", "{tmp_path}"]\n')
    with serving(image, key_file, "--readonly", "--config", config) as uri:
        assert read_all(uri)[:len(SECRET)] == SECRET


def test_a_plain_name_inside_the_directory_needs_no_option(template, tmp_path, key_file):
    (tmp_path / "base.raw").write_bytes(b"\x5a" * 65536)
    image = overlay(template, tmp_path / "img.qcow2", key_file, "base.raw")
    with serving(image, key_file, "--readonly") as uri:
        assert read_all(uri)[:65536] == b"\x5a" * 65536


def test_raw_backing_file_that_looks_like_qcow2_stays_raw(template, tmp_path, key_file, secret):
    """A raw backing file anyone could write, holding a qcow2 header whose own backing
    file is the secret: read as raw bytes, its backing name is never followed."""
    trap = tmp_path / "base.raw"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(secret), "-F", "raw", str(trap), "1M"])
    image = overlay(template, tmp_path / "img.qcow2", key_file, "base.raw", "raw")
    with serving(image, key_file, "--readonly", "--backing-dir", tmp_path) as uri:
        data = read_all(uri)
    assert data[:4] == b"QFI\xfb" and SECRET[:64] not in data


def test_backing_file_without_a_format_is_refused(template, tmp_path, key_file, secret):
    """QEMU 7.2 still probes such a backing file; we refuse rather than probe."""
    trap = tmp_path / "base.raw"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(secret), "-F", "raw", str(trap), "1M"])
    image = overlay(template, tmp_path / "img.qcow2", key_file, "base.raw", "qcow2")
    drop_backing_format(image)
    line = refused("serve", image, "--key-file", key_file, "--socket", tmp_path / "s.sock",
                   "--backing-dir", tmp_path)
    assert "no backing format" in line and "-F" in line, line


def drop_backing_format(image):
    """Turn the backing format header extension into one QEMU ignores (an old image)."""
    with open(image, "r+b") as f:
        head = bytearray(f.read(4096))
        offset = V3_HEADER_LENGTH
        while (kind := struct.unpack_from(">I", head, offset)[0]) != EXT_BACKING_FORMAT:
            assert kind, "no backing format extension"
            offset += 8 + -(-struct.unpack_from(">I", head, offset + 4)[0] // 8) * 8
        struct.pack_into(">I", head, offset, 0x12345678)
        f.seek(0)
        f.write(head)
    assert "backing file format" not in run(["qemu-img", "info", "-U", str(image)]).stdout


def test_format_refuses_an_escaping_backing_name(tmp_path, key_file, secret):
    (tmp_path / "images").mkdir()
    image = tmp_path / "images" / "new.qcow2"
    common = ["format", "--type", "qcow2", image, "1M", "--key-file", key_file, "--iter-time", "10"]
    for name in ("../secret", str(secret)):
        assert "outside" in refused(*common, "--backing", name, "--backing-format", "raw")
    assert "--backing-format" in refused(*common, "--backing", "../secret", "--backing-dir", tmp_path)
    assert not image.exists()
    nbdcrypt(*common, "--backing", "../secret", "--backing-format", "raw", "--backing-dir", tmp_path)
    with daemon(image, "--key-file", key_file, "--socket", tmp_path / "s.sock", "--readonly",
                "--backing-dir", tmp_path) as (_, uri):
        assert read_all(uri)[:len(SECRET)] == SECRET
