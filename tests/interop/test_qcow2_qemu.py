"""qcow2 + LUKS / legacy AES against QEMU: images made and filled by qemu-img/qemu-io
read back exactly; data written through nbdcrypt reads back through qemu-img, and
``qemu-img check`` finds no errors and no leaks."""

import json
import random
import threading

import pytest

from nbdcrypt.formats.qcow2 import Qcow2Image, create
from nbdcrypt.storage.store import FileStore
from tests.conftest import PASSPHRASE, qemu_img_create
from tests.tools import require, run

pytestmark = pytest.mark.usefixtures("tools")
MiB = 1 << 20


@pytest.fixture
def tools():
    require("qemu-img", "qemu-io")


def qemu_create(image, key_file, size, encrypt="luks", cluster_size=65536, compat="1.1", backing=None):
    options = [f"cluster_size={cluster_size}", f"compat={compat}"]
    if encrypt:
        options += [f"encrypt.format={encrypt}", "encrypt.key-secret=s0"]
    if encrypt == "luks":
        options.append("encrypt.iter-time=10")
    if backing:
        options += [f"backing_file={backing[0]}", f"backing_fmt={backing[1]}"]
    qemu_img_create("-f", "qcow2", "--object", f"secret,id=s0,file={key_file}", "-o", ",".join(options),
                    image, size)
    return image


def image_opts(image, key_file):
    return ["--object", f"secret,id=s0,file={key_file}", "--image-opts",
            f"driver=qcow2,encrypt.key-secret=s0,file.filename={image}"]


def qemu_io(image, key_file, *commands):
    release_volumes()
    cmd = ["qemu-io"] + image_opts(image, key_file)
    for c in commands:
        cmd += ["-c", c]
    out = run(cmd).stdout
    assert "error" not in out.lower() and "failed" not in out.lower(), out


def qemu_read(image, key_file, tmp_path, snapshot=None):
    """The whole virtual disk (or an internal snapshot) as QEMU reads it."""
    release_volumes()
    raw = tmp_path / "qemu.raw"
    options = ["-l", f"snapshot.name={snapshot}"] if snapshot else []
    run(["qemu-img", "convert", "-O", "raw"] + options + image_opts(image, key_file) + [str(raw)])
    data = raw.read_bytes()
    raw.unlink()
    return data


def qemu_check(image, key_file):
    release_volumes()
    result = run(["qemu-img", "check", "--output=json"] + image_opts(image, key_file), check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report.get("check-errors", 0) == 0, result.stdout + result.stderr
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    return report


# Volumes a test opened; closed (releasing their image locks, as a stopped server
# would) before QEMU opens the image, and at the end of each test.
OPEN_VOLUMES = []


@pytest.fixture(autouse=True)
def close_volumes():
    yield
    release_volumes()


def release_volumes():
    while OPEN_VOLUMES:
        OPEN_VOLUMES.pop().close()


def open_volume(image, readonly=False):
    release_volumes()  # one open volume at a time, as one server at a time
    with open(image, "rb") as f:
        header = Qcow2Image.read(f, str(image))
        key = header.unlock(PASSPHRASE, f) if header.encryption else None
    volume = header.open_volume(FileStore(image, readonly=readonly), key)
    OPEN_VOLUMES.append(volume)
    return volume


def read_all(volume):
    buf = bytearray(volume.size)
    volume.read(buf, 0)
    return bytes(buf)


def qemu_fill(image, key_file, cluster_size, size):
    """Data, zeros and partial clusters written by qemu-io at awkward offsets."""
    cs = cluster_size
    qemu_io(image, key_file, f"write -P 0xab 1000 {3 * cs + 77}", f"write -P 0x11 {5 * cs} {cs}",
            f"write -z {5 * cs + 512} {cs}", f"write -P 0x22 {size - cs - 512} {cs + 512}",
            f"write -P 0x33 {size // 2 + 300} 5000", f"write -z {size // 2} {2 * cs}")


@pytest.mark.parametrize("encrypt,cluster_size,compat", [
    ("luks", 4096, "1.1"), ("luks", 65536, "0.10"), ("luks", 2 * MiB, "1.1"),
    ("aes", 512, "1.1"), ("aes", 65536, "0.10"), ("aes", 2 * MiB, "1.1"),
])
def test_reads_what_qemu_wrote(tmp_path, key_file, encrypt, cluster_size, compat):
    size = 16 * MiB
    image = qemu_create(tmp_path / "img.qcow2", key_file, size, encrypt, cluster_size, compat)
    qemu_fill(image, key_file, cluster_size, size)
    assert read_all(open_volume(image, readonly=True)) == qemu_read(image, key_file, tmp_path)


@pytest.mark.parametrize("encrypt", ["luks", "aes"])
def test_sector_numbers_beyond_2_32(tmp_path, key_file, encrypt):
    """Guest sectors past 2^32 (legacy AES IVs count them) on a sparse 4 TiB image."""
    image = qemu_create(tmp_path / "img.qcow2", key_file, 4 << 40, encrypt)
    offset = (3 << 40) + 4096 * 5 + 512
    qemu_io(image, key_file, f"write -P 0x5a {offset} 70000", "write -P 0x17 0 512")
    volume = open_volume(image, readonly=True)
    buf = bytearray(80000)
    volume.read(buf, offset - 5000)
    assert buf == bytes(5000) + b"\x5a" * 70000 + bytes(5000)
    # And the other way round.
    volume = open_volume(image)
    volume.write(b"\xc3" * 3000, offset + 69000)
    release_volumes()
    out = run(["qemu-io"] + image_opts(image, key_file) + ["-c", f"read -P 0xc3 {offset + 69000} 3000",
                                                            "-c", f"read -P 0x5a {offset} 69000"]).stdout
    assert "Pattern verification failed" not in out, out
    qemu_check(image, key_file)


def assert_reads_back(volume, image, key_file, tmp_path, model):
    """Both nbdcrypt and QEMU read ``model``, and qemu-img check is clean."""
    assert read_all(volume) == model
    qemu_check(image, key_file)
    assert qemu_read(image, key_file, tmp_path) == model


def random_writes(volume, model, rnd, count, max_length):
    for _ in range(count):
        offset = rnd.randrange(volume.size)
        length = min(rnd.randrange(1, max_length), volume.size - offset)
        if rnd.random() < 0.2:
            volume.zero(length, offset)
            model[offset:offset + length] = bytes(length)
        else:
            data = rnd.randbytes(length)
            volume.write(data, offset)
            model[offset:offset + length] = data


@pytest.mark.parametrize("encrypt,cluster_size,compat", [
    ("luks", 512, "1.1"), ("luks", 4096, "0.10"), ("luks", 65536, "1.1"),
    ("aes", 4096, "1.1"), ("aes", 65536, "0.10"),
])
def test_qemu_reads_what_we_wrote(tmp_path, key_file, encrypt, cluster_size, compat):
    size = 8 * MiB
    image = qemu_create(tmp_path / "img.qcow2", key_file, size, encrypt, cluster_size, compat)
    qemu_fill(image, key_file, cluster_size, size)
    model = bytearray(qemu_read(image, key_file, tmp_path))
    volume = open_volume(image)
    random_writes(volume, model, random.Random(cluster_size), 150, 3 * cluster_size + 1000)
    volume.flush()
    assert_reads_back(volume, image, key_file, tmp_path, model)


def test_refcount_table_growth(tmp_path, key_file):
    """512-byte clusters: 20 MiB of data outgrows the first refcount table (64 blocks
    of 256 clusters) and many refcount blocks."""
    image = qemu_create(tmp_path / "img.qcow2", key_file, 32 * MiB, "luks", 512)
    volume = open_volume(image)
    rnd = random.Random(7)
    model = bytearray(volume.size)
    for offset in range(0, 20 * MiB, MiB):
        data = rnd.randbytes(MiB)
        volume.write(data, offset)
        model[offset:offset + MiB] = data
    random_writes(volume, model, rnd, 50, 5000)
    assert_reads_back(volume, image, key_file, tmp_path, model)


def test_snapshot_is_copied_on_write(tmp_path, key_file):
    image = qemu_create(tmp_path / "img.qcow2", key_file, 4 * MiB, "luks", 4096)
    qemu_io(image, key_file, "write -P 0x41 0 1M", "write -P 0x42 3M 4096")
    run(["qemu-img", "snapshot", "-c", "before"] + image_opts(image, key_file))
    old = qemu_read(image, key_file, tmp_path)
    model = bytearray(old)
    volume = open_volume(image)
    random_writes(volume, model, random.Random(3), 60, 20000)
    volume.zero(MiB, 2 * MiB)
    model[2 * MiB:3 * MiB] = bytes(MiB)
    assert_reads_back(volume, image, key_file, tmp_path, model)
    assert qemu_read(image, key_file, tmp_path, snapshot="before") == old


@pytest.mark.parametrize("backing_format", ["raw", "qcow2"])
def test_backing_file(tmp_path, key_file, backing_format):
    """An encrypted overlay on a raw or compressed (qemu-img convert -c) backing file."""
    rnd = random.Random(5)
    raw = tmp_path / "base.raw"
    raw.write_bytes(rnd.randbytes(3 * MiB) + bytes(MiB))
    base = raw
    if backing_format == "qcow2":
        base = tmp_path / "base.qcow2"
        run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", str(raw), str(base)])
    image = qemu_create(tmp_path / "img.qcow2", key_file, 6 * MiB, "luks", 65536,
                        backing=(base.name, backing_format))
    qemu_io(image, key_file, "write -P 0x61 70000 1000", "write -z 200000 65536")
    expected = qemu_read(image, key_file, tmp_path)
    assert read_all(open_volume(image, readonly=True)) == expected
    model = bytearray(expected)
    volume = open_volume(image)
    random_writes(volume, model, rnd, 60, 100000)
    assert_reads_back(volume, image, key_file, tmp_path, model)


def test_compressed_clusters_copied_on_write(tmp_path, key_file):
    """QEMU will not compress encrypted images: an unencrypted compressed image
    exercises decompression and copy-on-write of compressed clusters."""
    raw = tmp_path / "src.raw"
    rnd = random.Random(9)
    raw.write_bytes(b"".join(rnd.randbytes(100) * 40 for _ in range(400)))
    image = tmp_path / "img.qcow2"
    run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", str(raw), str(image)])
    model = bytearray(raw.read_bytes())
    volume = open_volume(image)
    assert read_all(volume) == model
    random_writes(volume, model, rnd, 80, 9000)
    assert_reads_back(volume, image, key_file, tmp_path, model)


def test_concurrent_writes(tmp_path, key_file):
    image = qemu_create(tmp_path / "img.qcow2", key_file, 4 * MiB, "luks", 4096)
    volume = open_volume(image)
    model = bytearray(volume.size)
    lock = threading.Lock()

    def worker(seed):
        rnd = random.Random(seed)
        for _ in range(60):
            # Each thread owns every 4th 64 KiB stripe: no two threads write the same bytes.
            stripe = rnd.randrange(16) * 4 + seed
            offset = stripe * 65536 + rnd.randrange(60000)
            data = rnd.randbytes(rnd.randrange(1, 65536 - offset % 65536))
            volume.write(data, offset)
            with lock:
                model[offset:offset + len(data)] = data

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert_reads_back(volume, image, key_file, tmp_path, model)


@pytest.mark.parametrize("encrypt,compat,cluster_size", [
    ("luks", "1.1", 65536), ("luks", "0.10", 512), ("aes", "1.1", 4096)])
def test_created_images_work_in_qemu(tmp_path, key_file, encrypt, compat, cluster_size):
    image = tmp_path / "new.qcow2"
    create(image, 8 * MiB, PASSPHRASE, encrypt=encrypt, compat=compat, cluster_size=cluster_size,
           iter_time_ms=10, allow_aes=True)
    info = json.loads(run(["qemu-img", "info", "--output=json"] + image_opts(image, key_file)).stdout)
    assert info["virtual-size"] == 8 * MiB and info["cluster-size"] == cluster_size
    assert info["format-specific"]["data"]["compat"] == compat
    qemu_check(image, key_file)
    qemu_io(image, key_file, "write -P 0x77 5000 100000")
    model = bytearray(8 * MiB)
    model[5000:105000] = b"\x77" * 100000
    volume = open_volume(image)
    assert read_all(volume) == model
    random_writes(volume, model, random.Random(1), 40, 30000)
    qemu_check(image, key_file)
    assert qemu_read(image, key_file, tmp_path) == model


def test_created_image_with_backing_file(tmp_path, key_file):
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(2).randbytes(MiB))
    image = tmp_path / "new.qcow2"
    create(image, 2 * MiB, PASSPHRASE, backing="base.raw", backing_format="raw", iter_time_ms=10)
    qemu_check(image, key_file)
    assert qemu_read(image, key_file, tmp_path) == base.read_bytes() + bytes(MiB)
    assert read_all(open_volume(image, readonly=True)) == base.read_bytes() + bytes(MiB)


def test_extents_match_qemu_map(tmp_path, key_file):
    image = qemu_create(tmp_path / "img.qcow2", key_file, 4 * MiB, "luks", 65536)
    qemu_io(image, key_file, "write -P 1 0 128k", "write -z 1M 64k", "write -P 2 2M 100",
            "write -P 3 3M 64k", "write -z 3M 64k")
    volume = open_volume(image, readonly=True)
    ours = merge((offset, length, kind & 2 == 2) for offset, length, kind in volume.extents(4 * MiB, 0))
    qemu_map = json.loads(run(["qemu-img", "map", "--output=json"] + image_opts(image, key_file)).stdout)
    assert ours == merge((e["start"], e["length"], e["zero"]) for e in qemu_map)
    assert volume.extents(1000, 70000) == [(70000, 1000, 0)]


def merge(extents):
    out = []
    for offset, length, zero in extents:
        if out and out[-1][2] == zero:
            out[-1] = (out[-1][0], out[-1][1] + length, zero)
        else:
            out.append((offset, length, zero))
    return out
