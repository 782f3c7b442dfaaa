"""What a qcow2 write puts on the disk, and in what order, on images made by qemu-img and
qemu-io: an allocation never takes a cluster that holds metadata, whatever its refcount
says, and leaves nothing behind when it fails; a flush separates each write from the
metadata that depends on it (seen through a recording wrapper of the real file store)."""

import json
import shutil
import struct

import pytest

from nbdcrypt.errors import FormatError
from nbdcrypt.formats.qcow2 import Qcow2Image
from nbdcrypt.storage.store import FileStore
from tests.conftest import PASSPHRASE, qemu_img_create, sha256_file
from tests.interop.test_qcow2_qemu import (
    OPEN_VOLUMES,
    close_volumes,
    image_opts,
    open_volume,
    qemu_check,
    qemu_create,
    qemu_io,
    release_volumes,
)
from tests.tools import require, run

pytestmark = pytest.mark.usefixtures("tools", "close_volumes")
assert close_volumes  # the autouse fixture, imported so that it runs here too
MiB, KiB = 1 << 20, 1 << 10
COPIED = 1 << 63


@pytest.fixture
def tools():
    require("qemu-img", "qemu-io")


def get(path, offset, fmt):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))


def l1_entry(image, index):
    l1_offset, = get(image, 40, ">Q")
    return get(image, l1_offset + 8 * index, ">Q")[0] & ~COPIED


def set_refcount(image, host, count, cluster_size):
    """16-bit refcounts (qemu-img's default), in the first refcount block."""
    reftable, = get(image, 48, ">Q")
    block, = get(image, reftable, ">Q")
    with open(image, "r+b") as f:
        f.seek(block + 2 * (host // cluster_size))
        f.write(struct.pack(">H", count))


def qemu_check_errors(image, key_file):
    """``qemu-img check``'s report and its ERROR lines."""
    result = run(["qemu-img", "check", "--output=json"] + image_opts(image, key_file), check=False)
    return json.loads(result.stdout), [line for line in result.stderr.splitlines() if line.startswith("ERROR")]


def test_a_failed_allocation_gives_back_what_it_took(tmp_path, key_file):
    """A write needing a new L2 table and a data cluster: the table gets a truly free
    cluster, the data the next "free" one, which is an L2 table with a lying refcount of 0.
    The write fails with nothing written, and the table's cluster is free again: a later
    refcount commit (a discard) leaks nothing."""
    cs = 4 * KiB
    image = qemu_create(tmp_path / "img.qcow2", key_file, 8 * MiB, cluster_size=cs)
    qemu_io(image, key_file, "write -P 1 0 4k", "write -P 2 4M 4k", "discard 0 4k")  # a hole below L2 #2
    second_l2 = l1_entry(image, 2)
    set_refcount(image, second_l2, 0, cs)
    before = sha256_file(image)
    volume = open_volume(image)
    with pytest.raises(FormatError, match=f"cluster {second_l2:#x} is free by its refcount but holds an L2 table"):
        volume.write(b"x" * cs, 2 * MiB)  # L1 entry 1 has no L2 table yet
    assert sha256_file(image) == before
    volume.trim(cs, 4 * MiB)
    volume.close()
    report, errors = qemu_check_errors(image, key_file)
    assert not report.get("leaks"), report
    assert errors == [f"ERROR cluster {second_l2 // cs} refcount=0 reference=1",  # only the lie it was given
                      f"ERROR OFLAG_COPIED L2 cluster: l1_index=2 l1_entry={COPIED | second_l2:x} refcount=0"]


# -- write ordering ---------------------------------------------------------------------------

FLUSH = "flush"


class RecordingStore(FileStore):
    """The real file store, logging each write as (offset, length, fua) and each flush."""

    def __init__(self, path):
        super().__init__(path)
        self.log = []

    def write(self, buf, offset, fua=False):
        self.log.append((offset, memoryview(buf).nbytes, fua))
        super().write(buf, offset, fua)

    def flush(self):
        self.log.append(FLUSH)
        super().flush()


def open_recorded(image):
    release_volumes()
    with open(image, "rb") as f:
        header = Qcow2Image.read(f, str(image))
        key = header.unlock(PASSPHRASE, f)
    store = RecordingStore(image)
    OPEN_VOLUMES.append(header.open_volume(store, key))
    return OPEN_VOLUMES[-1], store


def kinds(log, image):
    """The log with each write named by what it touched, as the image (read raw) is laid
    out now: "l1", "l2" (an active L2 table), "reftable", "refblock", "header" or "data"."""
    cs = 1 << get(image, 20, ">I")[0]
    l1_size, l1_offset, reftable, reftable_clusters = get(image, 36, ">IQQI")
    l2 = {e & ~COPIED for e in get(image, l1_offset, f">{l1_size}Q")} - {0}
    blocks = set(get(image, reftable, f">{reftable_clusters * cs // 8}Q")) - {0}

    def kind(offset):
        host = offset // cs * cs
        for name, start, length in (("header", 0, cs), ("l1", l1_offset, l1_size * 8),
                                    ("reftable", reftable, reftable_clusters * cs)):
            if start <= offset < start + length:
                return name
        return "l2" if host in l2 else "refblock" if host in blocks else "data"
    return [entry if entry == FLUSH else kind(entry[0]) for entry in log]


def assert_flush_between(named, first, then):
    """The first write of kind ``then`` comes after a flush that follows every earlier
    write of kind ``first``."""
    j = named.index(then)
    i = max(k for k in range(j) if named[k] == first)
    assert FLUSH in named[i + 1:j], f"no flush between {first} and {then}: {runs(named)}"


def runs(named):
    """``named`` with repeats counted: ['data x3', 'flush', 'l2']."""
    out = []
    for name in named:
        if out and out[-1][0] == name:
            out[-1][1] += 1
        else:
            out.append([name, 1])
    return [name if n == 1 else f"{name} x{n}" for name, n in out]


def snapshot(image, key_file):
    run(["qemu-img", "snapshot", "-c", "s1"] + image_opts(image, key_file))


def copied_snapshot_cluster(image, key_file):
    """Guest cluster 0 shared with a snapshot, in an L2 table QEMU has already copied."""
    qemu_io(image, key_file, "write -P 1 0 64k")
    snapshot(image, key_file)
    qemu_io(image, key_file, "write -P 2 128k 4k")


def allocated_l2_table(image, key_file):
    qemu_io(image, key_file, "write -P 1 0 4k")


def nearly_full_refcount_block(image, key_file):
    """With 4 KiB clusters and 64-bit refcounts a block covers 2 MiB of the file: 1 MiB
    more data leaves too little room for a 2 MiB write in the second block."""
    qemu_io(image, key_file, "write -P 1 0 4k", "write -P 3 4M 1M")


# (name, qemu-img create options, qemu-io preparation, the write: offset, length,
# [(what, what depends on it)], flushes: as few as the dependencies need)
ORDERINGS = [
    ("cow-of-a-snapshot-cluster", [], copied_snapshot_cluster, (1000, 512),
     [("data", "l2"), ("refblock", "l2")], 2),  # the second: before the old cluster's refcount drops
    ("first-allocation", [], allocated_l2_table, (64 * KiB + 512, 512),
     [("data", "l2"), ("refblock", "l2")], 1),
    ("l2-table-allocation", [], allocated_l2_table, (2 * MiB + 512, 512),
     [("l2", "l1"), ("data", "l1"), ("refblock", "l1")], 1),
    ("refcount-block-growth", ["refcount_bits=64"], nearly_full_refcount_block, (64 * KiB, 2 * MiB - 64 * KiB),
     [("refblock", "reftable"), ("reftable", "l2"), ("data", "l2")], 2),
    ("allocated-cluster", [], allocated_l2_table, (512, 512), [], 0),
]


@pytest.mark.parametrize("name,options,prepare,write,pairs,flushes", ORDERINGS, ids=[o[0] for o in ORDERINGS])
def test_dependent_writes_are_flushed_in_order(tmp_path, key_file, name, options, prepare, write, pairs, flushes):
    """Each pair: the first kind is on disk (a flush) before the second points at it, with
    no flush more than that takes; the result is what QEMU makes of the same write
    (qemu-img compare) and checks clean."""
    image = tmp_path / "img.qcow2"
    qemu_img_create("-f", "qcow2", "--object", f"secret,id=s0,file={key_file}", "-o",
                    ",".join(["cluster_size=4096", "encrypt.format=luks", "encrypt.key-secret=s0",
                              "encrypt.iter-time=10", *options]), image, 8 * MiB)
    prepare(image, key_file)
    twin = shutil.copy(image, tmp_path / "twin.qcow2")
    offset, length = write
    qemu_io(twin, key_file, f"write -P 0x79 {offset} {length}")
    volume, store = open_recorded(image)
    volume.write(b"\x79" * length, offset)
    release_volumes()
    named = kinds(store.log, image)
    for first, then in pairs:
        assert_flush_between(named, first, then)
    assert named.count(FLUSH) == flushes, runs(named)
    qemu_check(image, key_file)
    result = run(["qemu-img", "compare"] + image_opts(image, key_file)[:2] + [
        "--image-opts", image_opts(image, key_file)[-1], image_opts(twin, key_file)[-1]], check=False)
    assert "Images are identical" in result.stdout, result.stdout + result.stderr


def test_fua_overwrite_of_an_allocated_cluster_is_one_dsync_write(tmp_path, key_file):
    """FUA as on LUKS: data in place goes down with RWF_DSYNC, and no flush follows;
    a FUA write that allocates still flushes its metadata."""
    image = qemu_create(tmp_path / "img.qcow2", key_file, 8 * MiB, cluster_size=4096)
    allocated_l2_table(image, key_file)
    volume, store = open_recorded(image)
    volume.write(b"\x79" * 1000, 512, fua=True)
    # Two sectors, read-modify-written: (length, fua) of each write, and the flushes.
    assert [entry if entry == FLUSH else entry[1:] for entry in store.log] == [(1024, True)]
    store.log.clear()
    volume.write(b"\x7a" * 512, 64 * KiB, fua=True)
    assert store.log[-1] == FLUSH
    release_volumes()
    qemu_io(image, key_file, "read -P 0x79 512 1000", "read -P 0x7a 64k 512")
