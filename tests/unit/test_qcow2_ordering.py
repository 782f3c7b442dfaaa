"""What a qcow2 write puts on the disk, and in what order, on images made by qemu-img and
qemu-io: an allocation never takes a cluster that holds metadata, whatever its refcount
says, and leaves nothing behind when it fails."""

import json
import struct

import pytest

from nbdcrypt.errors import FormatError
from tests.conftest import sha256_file
from tests.interop.test_qcow2_qemu import close_volumes, image_opts, open_volume, qemu_create, qemu_io
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


def qemu_check(image, key_file):
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
    report, errors = qemu_check(image, key_file)
    assert not report.get("leaks"), report
    assert errors == [f"ERROR cluster {second_l2 // cs} refcount=0 reference=1",  # only the lie it was given
                      f"ERROR OFLAG_COPIED L2 cluster: l1_index=2 l1_entry={COPIED | second_l2:x} refcount=0"]
