"""Hand-made evil images, the table in docs/reliability.md: each is made by a real tool
(qemu-img, cryptsetup), given one hostile field, and must get its own clear message.

Header-level lies stop `nbdcrypt info` and `nbdcrypt serve` with one line and exit status 2;
table-level lies (found only when a request reaches them) fail that request with EIO while
the export keeps serving.  The image is never written to.
"""

import json
import re
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import qemu_img_create, qemu_luks_create, sha256_file
from tests.daemon.conftest import daemon
from tests.tools import cryptsetup, luks2_with_json, nbdcrypt_cmd, require, run

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
# LUKS1 on-disk layout (big-endian): keyslot i at 208 + 48 i: active, iterations, salt[32],
# key material offset (sectors), stripes.
LUKS1_SLOT, LUKS1_ITERATIONS, LUKS1_MATERIAL, LUKS1_STRIPES = 208, 4, 40, 44
# qcow2 header fields (docs/interop/qcow2.txt).
QCOW2_BACKING_OFFSET, QCOW2_L1_SIZE, QCOW2_L1_OFFSET, QCOW2_REFTABLE_OFFSET = 8, 36, 40, 48
QCOW2_SNAPSHOTS, QCOW2_SNAPSHOTS_OFFSET, QCOW2_REFCOUNT_ORDER, QCOW2_HEADER_LENGTH = 60, 64, 96, 100
QCOW2_CRYPTO_EXTENSION = 0x0537BE77
COPIED = 1 << 63


def put(path, offset, fmt, *values):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def get(path, offset, fmt):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))


# -- the images -----------------------------------------------------------------------------

def luks1(tmp_path, key_file):
    return qemu_luks_create(tmp_path / "img", key_file, "4M")


def luks1_slot(index, field, fmt, *values):
    def make(tmp_path, key_file):
        image = luks1(tmp_path, key_file)
        put(image, LUKS1_SLOT + 48 * index + field, fmt, *values)
        return image
    return make


def luks1_overlapping_slots(tmp_path, key_file):
    image = luks1(tmp_path, key_file)
    slot0_material, = get(image, LUKS1_SLOT + LUKS1_MATERIAL, ">I")
    put(image, LUKS1_SLOT + 48 + LUKS1_MATERIAL, ">I", slot0_material + 8)
    return image


def luks1_payload_past_end(tmp_path, key_file):
    image = luks1(tmp_path, key_file)
    put(image, 104, ">I", 1 << 30)
    return image


def luks2(mutate):
    def make(tmp_path, key_file):
        image = tmp_path / "img"
        image.write_bytes(bytes(20 << 20))
        cryptsetup("luksFormat", "--type", "luks2", "--key-file", key_file, "--pbkdf", "pbkdf2",
                   "--pbkdf-force-iterations", 1000, image)
        image.write_bytes(luks2_with_json(image.read_bytes(), mutate))
        return image
    return make


def set_json(path, value):
    def mutate(doc):
        *parents, last = path.split("/")
        for p in parents:
            doc = doc[p]
        doc[last] = value
    return mutate


def argon2_memory(doc):
    doc["keyslots"]["0"]["kdf"] = {"type": "argon2id", "time": 4, "memory": 1 << 40, "cpus": 1,
                                   "salt": doc["keyslots"]["0"]["kdf"]["salt"]}


def qcow2(tmp_path, key_file, *create_options, name="img.qcow2"):
    image = tmp_path / name
    options = ",".join(["encrypt.format=luks", "encrypt.key-secret=s0", "encrypt.iter-time=10", *create_options])
    qemu_img_create("-f", "qcow2", "--object", f"secret,id=s0,file={key_file}", "-o", options, image, "4M")
    run(["qemu-io", "--object", f"secret,id=s0,file={key_file}", "--image-opts",
         f"driver=qcow2,encrypt.key-secret=s0,file.filename={image}", "-c", "write -P 0x5a 0 64k"])
    return image


def qcow2_field(offset, fmt, *values):
    def make(tmp_path, key_file):
        image = qcow2(tmp_path, key_file)
        put(image, offset, fmt, *values)
        return image
    return make


def qcow2_l1_into_header(tmp_path, key_file):
    image = qcow2(tmp_path, key_file)
    l1, = get(image, QCOW2_L1_OFFSET, ">Q")
    put(image, l1, ">Q", COPIED | 0x200)
    return image


def qcow2_l2_entry(host):
    """Guest cluster 0's L2 entry says its data is at ``host``."""
    def make(tmp_path, key_file):
        image = qcow2(tmp_path, key_file)
        l1, = get(image, QCOW2_L1_OFFSET, ">Q")
        l2, = get(image, l1, ">Q")
        put(image, l2 & ~COPIED, ">Q", COPIED | host)
        return image
    return make


def zero_refcounts(image, offset, length=1):
    """Set the refcounts of the clusters overlapping [offset, offset+length) to 0
    (qemu-img's defaults: 16-bit refcounts, 64 KiB clusters)."""
    reftable, = get(image, QCOW2_REFTABLE_OFFSET, ">Q")
    block, = get(image, reftable, ">Q")
    for cluster in range(offset // 65536, (offset + length - 1) // 65536 + 1):
        put(image, block + 2 * cluster, ">H", 0)


def qcow2_refcount_zero(tmp_path, key_file):
    """Guest cluster 0's data cluster is mapped, but its refcount says 0."""
    image = qcow2(tmp_path, key_file)
    l1, = get(image, QCOW2_L1_OFFSET, ">Q")
    l2, = get(image, l1 & ~COPIED, ">Q")
    data, = get(image, l2 & ~COPIED, ">Q")
    zero_refcounts(image, data & ~COPIED)
    return image


def luks_header_area(image):
    """(offset, length) of the embedded LUKS header: the crypto header extension."""
    offset, = get(image, QCOW2_HEADER_LENGTH, ">I")
    while True:
        kind, length = get(image, offset, ">II")
        assert kind, "no crypto header extension"
        if kind == QCOW2_CRYPTO_EXTENSION:
            return get(image, offset + 8, ">QQ")
        offset += 8 + -(-length // 8) * 8


def qcow2_free_metadata(where):
    """The refcounts of the metadata clusters ``where(image)`` gives as (offset, length)
    say 0, so the allocator would hand them out."""
    def make(tmp_path, key_file):
        image = qcow2(tmp_path, key_file)
        zero_refcounts(image, *where(image))
        return image
    return make


def l2_table_area(image):
    l1, = get(image, QCOW2_L1_OFFSET, ">Q")
    l2, = get(image, l1, ">Q")
    return l2 & ~COPIED, 65536


def refcount_block_area(image):
    reftable, = get(image, QCOW2_REFTABLE_OFFSET, ">Q")
    return get(image, reftable, ">Q")[0], 65536


def qcow2_snapshot_table_free(tmp_path, key_file):
    """An internal snapshot (qemu-img snapshot -c) whose table's refcount says 0."""
    image = qcow2(tmp_path, key_file)
    run(["qemu-img", "snapshot", "-c", "s1", "--object", f"secret,id=s0,file={key_file}", "--image-opts",
         f"driver=qcow2,encrypt.key-secret=s0,file.filename={image}"])
    table, = get(image, QCOW2_SNAPSHOTS_OFFSET, ">Q")
    zero_refcounts(image, table)
    return image


def qcow2_backing_loop(tmp_path, key_file):
    """a.qcow2 -> c.qcow2 -> b.qcow2 -> a.qcow2, closed with an unsafe rebase."""
    require("qemu-img")
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "b.qcow2"), "4M"])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(tmp_path / "c.qcow2")])
    image = qcow2(tmp_path, key_file, "backing_file=c.qcow2", "backing_fmt=qcow2", name="a.qcow2")
    run(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(tmp_path / "b.qcow2")])
    return image


# (name, what is wrong, builder, expected message, who finds it: "open" = info and serve
# (the header itself lies), "serve" (the header does not fit the file; info still shows it,
# as luksDump does), "read" (a table entry, found by the request that reaches it),
# "discard" (a refcount, found by the discard that would drop it), "write" (a refcount of 0
# on metadata, found by the write that would allocate that cluster))
EVIL = [
    ("luks1-overlapping-keyslots", "keyslot 1's key material starts inside keyslot 0's",
     luks1_overlapping_slots, "keyslot 1 material at sector 16 overlaps keyslot 0", "open"),
    ("luks1-payload-past-end", "payload offset 2^30 sectors, past the end of the file",
     luks1_payload_past_end, "payload offset 549755813888 is past the end of the file", "serve"),
    ("luks1-huge-stripes", "keyslot 0 claims 2^32-1 anti-forensic stripes",
     luks1_slot(0, LUKS1_STRIPES, ">I", 0xFFFFFFFF), "keyslot 0 has 4294967295 anti-forensic stripes", "open"),
    ("luks1-huge-iterations", "keyslot 0 claims 2^32-1 PBKDF2 iterations",
     luks1_slot(0, LUKS1_ITERATIONS, ">I", 0xFFFFFFFF), "keyslot 0 has 4294967295 PBKDF2 iterations", "open"),
    ("luks2-data-over-keyslots", "the data segment starts inside the keyslots area",
     luks2(set_json("segments/0/offset", str(1 << 20))), "overlaps the keyslots area", "open"),
    ("luks2-segment-past-end", "a fixed-size segment reaching past the end of the file",
     luks2(set_json("segments/0/size", str(1 << 30))), "past the end", "serve"),
    ("luks2-huge-argon2-memory", "keyslot 0's Argon2 memory is 2^40 KiB (1 PiB)",
     luks2(argon2_memory), "Argon2 memory (KiB) is 1099511627776", "open"),
    ("luks2-huge-key", "keyslot 0 says its key is 2^31 bytes",
     luks2(set_json("keyslots/0/key_size", 1 << 31)), "keyslot 0: key_size must be an integer from 1 to 512", "open"),
    ("qcow2-huge-l1", "an L1 table of 2^31 entries",
     qcow2_field(QCOW2_L1_SIZE, ">I", 1 << 31), "L1 table of 2147483648 entries is too large", "open"),
    ("qcow2-refcount-order", "refcount order 7 (128-bit refcounts; 6 is the maximum)",
     qcow2_field(QCOW2_REFCOUNT_ORDER, ">I", 7), "refcount order 7 out of range", "open"),
    ("qcow2-snapshot-count", "2^31 internal snapshots",
     qcow2_field(QCOW2_SNAPSHOTS, ">I", 1 << 31), "snapshots is too many", "open"),
    ("qcow2-backing-name-past-end", "the backing file name lies past the end of the header cluster",
     qcow2_field(QCOW2_BACKING_OFFSET, ">QI", 1 << 40, 8), "backing file name at 1099511627776", "open"),
    ("qcow2-backing-loop", "a.qcow2 -> c.qcow2 -> b.qcow2 -> a.qcow2",
     qcow2_backing_loop, "backing chain loops back to", "serve"),
    ("qcow2-l1-into-header", "L1 entry 0 points into the header cluster",
     qcow2_l1_into_header, "L1 entry 0 (0x8000000000000200) is corrupt", "read"),
    ("qcow2-l2-into-header", "an L2 entry maps guest cluster 0 into the header cluster",
     qcow2_l2_entry(0x200), "guest cluster 0 maps to 0x200", "read"),
    ("qcow2-l2-onto-refcount-table", "an L2 entry maps guest cluster 0 onto the refcount table",
     qcow2_l2_entry(0x10000), "guest cluster 0 maps to 0x10000, which holds the refcount table", "read"),
    ("qcow2-refcount-underflow", "guest cluster 0's data cluster is in use with refcount 0",
     qcow2_refcount_zero, "would go below 0", "discard"),
    ("qcow2-luks-header-free", "the LUKS header's clusters have refcount 0",
     qcow2_free_metadata(luks_header_area), "cluster 0x40000 is free by its refcount but holds the LUKS header",
     "write"),
    ("qcow2-l2-table-free", "the L2 table's cluster has refcount 0",
     qcow2_free_metadata(l2_table_area), "is free by its refcount but holds an L2 table", "write"),
    ("qcow2-refcount-block-free", "the refcount block's own refcount is 0",
     qcow2_free_metadata(refcount_block_area), "is free by its refcount but holds a refcount block", "write"),
    ("qcow2-snapshot-table-free", "the snapshot table's cluster has refcount 0",
     qcow2_snapshot_table_free, "is free by its refcount but holds the snapshot table", "write"),
]


@pytest.mark.parametrize("name,what,make,message,where", EVIL, ids=[case[0] for case in EVIL])
def test_evil_image(tmp_path, key_file, name, what, make, message, where):
    image = make(tmp_path, key_file)
    before = sha256_file(image)
    if where in ("open", "serve"):
        serve = ["serve", image, "--key-file", key_file, "--socket", tmp_path / "s"]
        for command in ([["info", image]] if where == "open" else []) + [serve]:
            result = subprocess.run(nbdcrypt_cmd() + list(map(str, command)), capture_output=True, text=True,
                                    timeout=120)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1, f"{command[0]}: {result.stderr}"
            assert lines[0].startswith("nbdcrypt: ") and message in lines[0], lines[0]
    elif where == "read":
        _fails_with_eio(image, key_file, message, lambda h: h.pread(4096, 0), lambda h: h.pwrite(bytes(4096), 0))
    elif where == "write":
        _fails_with_eio(image, key_file, message, lambda h: h.pwrite(bytes(4096), 1 << 20))
        _qemu_finds_refcount_errors(image, key_file)
    else:
        _fails_with_eio(image, key_file, message, lambda h: h.trim(65536, 0), lambda h: h.trim(65536, 0))
    assert sha256_file(image) == before, "the image was written to"


def _fails_with_eio(image, key_file, message, *requests):
    """Each of ``requests`` (on an NBD handle) fails with EIO; the export keeps serving."""
    nbd = pytest.importorskip("nbd")
    with daemon(image, "--key-file", key_file, "--socket", image.with_suffix(".sock")) as (proc, uri):
        h = nbd.NBD()
        h.connect_uri(uri)
        for request in requests:
            with pytest.raises(nbd.Error) as failed:
                request(h)
            assert failed.value.errno == "EIO"
        h.flush()  # the export still serves
        h.shutdown()
    assert proc.returncode == 0
    assert message in proc.stderr_text and "Traceback" not in proc.stderr_text, proc.stderr_text


def _qemu_finds_refcount_errors(image, key_file):
    """``qemu-img check`` still sees the lie the image was given: referenced clusters with
    refcount 0, and no leak (nothing was allocated)."""
    result = run(["qemu-img", "check", "--output=json", "--object", f"secret,id=s0,file={key_file}",
                  "--image-opts", f"driver=qcow2,encrypt.key-secret=s0,file.filename={image}"], check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 2 and report["corruptions"] > 0 and not report.get("leaks"), result.stdout
    assert "refcount=0 reference=1" in result.stderr, result.stderr


def test_the_documented_table_matches():
    """docs/reliability.md lists every evil image with the message the test expects."""
    rows = re.findall(r"^\| `([\w-]+)` \| (.+?) \| `(.+?)` \|", DOC.read_text(), re.M)
    assert {name: (what, message) for name, what, message in rows} == \
        {name: (what, message) for name, what, _, message, _ in EVIL}
