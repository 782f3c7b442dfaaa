"""Structure-aware fuzzing of the header parsers (LUKS1, LUKS2 JSON, qcow2 header and tables):
whatever the bytes, only nbdcrypt's own clear errors come out, quickly, without allocating by an unchecked field.

Each case starts from a valid header and rewrites fields with hostile values (or
flips bytes), then opens it with the same entry point the server uses.
NBDCRYPT_FUZZ_EXAMPLES raises the case count for the long run (docs/reliability.md).
"""

import io
import json
import os
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdcrypt.errors import NbdcryptError
from nbdcrypt.formats import open_header
from nbdcrypt.formats.luks1 import format_luks1
from nbdcrypt.formats.luks2 import format_luks2
from nbdcrypt.storage.store import FileStore
from tests.tools import LUKS2_BINARY_SIZE, luks2_with_json, require, run

EXAMPLES = int(os.environ.get("NBDCRYPT_FUZZ_EXAMPLES", "1500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=1000, suppress_health_check=[HealthCheck.too_slow],
                database=None)
MAX_PARSE_ALLOCATION = 64 << 20

# (offset, struct format) of LUKS1's numeric fields: version, payload offset, key
# bytes, digest iterations, and each keyslot's state, iterations, offset, stripes.
LUKS1_FIELDS = [(6, ">H"), (104, ">I"), (108, ">I"), (164, ">I")] + [
    (208 + 48 * slot + where, ">I") for slot in range(8) for where in (0, 4, 40, 44)]
LUKS1_STRINGS = [(8, 32), (40, 32), (72, 32), (168, 40)]  # cipher, mode, hash, uuid


@pytest.fixture(scope="module")
def luks1_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "luks1.img"
    format_luks1(path, 1 << 20, b"fuzz", iter_time_ms=1)
    return path.read_bytes()


def parse(image):
    """Open the header as the server does; True if it parsed, False on a clear error."""
    tracemalloc.start()
    try:
        open_header(io.BytesIO(image), "fuzz.img")
        return True
    except NbdcryptError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.img")
        return False
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MAX_PARSE_ALLOCATION, f"parsing allocated {peak} bytes"


numbers = st.one_of(st.sampled_from([0, 1, 7, 8, 512, 4096, 4000, 2**31 - 1, 2**31, 2**32 - 1]),
                    st.integers(0, 2**32 - 1))


@FUZZ
@given(data=st.data())
def test_luks1_fields(luks1_image, data):
    image = bytearray(luks1_image)
    for offset, fmt in data.draw(st.lists(st.sampled_from(LUKS1_FIELDS), min_size=1, max_size=4)):
        value = data.draw(numbers) & (0xFFFF if fmt == ">H" else 0xFFFFFFFF)
        struct.pack_into(fmt, image, offset, value)
    for offset, size in data.draw(st.lists(st.sampled_from(LUKS1_STRINGS), max_size=2)):
        image[offset:offset + size] = data.draw(st.binary(min_size=size, max_size=size))
    parse(bytes(image))


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 591), st.integers(1, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 4096)))
def test_luks1_bytes(luks1_image, flips, cut):
    image = bytearray(luks1_image)
    for offset, mask in flips:
        image[offset] ^= mask
    parse(bytes(image[:cut] if cut is not None else image))


# -- qcow2: header fields, then the L1/L2/refcount walk of a read ------------------------

# (offset, struct format) of qcow2's header fields (v2, then v3's additions).
QCOW2_FIELDS = [(4, ">I"), (8, ">Q"), (16, ">I"), (20, ">I"), (24, ">Q"), (32, ">I"), (36, ">I"), (40, ">Q"),
                (48, ">Q"), (56, ">I"), (60, ">I"), (64, ">Q"), (72, ">Q"), (80, ">Q"), (88, ">Q"),
                (96, ">I"), (100, ">I")]
qcow2_numbers = st.one_of(st.sampled_from([0, 1, 3, 9, 21, 22, 64, 104, 112, 4096, 2**31, 2**32 - 1, 2**63]),
                          st.integers(0, 2**64 - 1))


@pytest.fixture(scope="module")
def qcow2_image(tmp_path_factory):
    """A small qcow2 image with data, zeros and a backing-free layout, made by QEMU."""
    require("qemu-img", "qemu-io")
    path = tmp_path_factory.mktemp("fuzz") / "img.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "1M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 20k", "-c", "write -z 40k 8k",
         "-c", "write -P 0x17 512k 4k", str(path)])
    return path.read_bytes()


def open_and_read(image, tmp_path):
    """Parse, then read the whole disk through the L1/L2 tables, as the server would."""
    if not parse(image):
        return
    path = tmp_path / "fuzzed.qcow2"
    path.write_bytes(image)
    store = FileStore(path, readonly=True)
    try:
        with open(path, "rb") as f:
            header = open_header(f, "fuzz.img")
            key = header.unlock(b"fuzz", f) if header.encryption else None  # a field may say so
        with header.open_volume(store, key) as volume:
            for offset in range(0, min(volume.size, 1 << 20), 256 << 10):
                volume.read(bytearray(min(256 << 10, volume.size - offset)), offset)
    except NbdcryptError as e:
        assert "\n" not in str(e)
    finally:
        store.close()


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(QCOW2_FIELDS), qcow2_numbers), min_size=1, max_size=3))
def test_qcow2_fields(qcow2_image, tmp_path_factory, changes):
    image = bytearray(qcow2_image)
    for (offset, fmt), value in changes:
        struct.pack_into(fmt, image, offset, value & (2 ** (8 * struct.calcsize(fmt)) - 1))
    open_and_read(bytes(image), tmp_path_factory.getbasetemp())


@settings(max_examples=max(50, EXAMPLES // 5), deadline=2000, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.integers(0, 5 * 4096 - 1), st.integers(1, 255)), min_size=1, max_size=16))
def test_qcow2_tables(qcow2_image, tmp_path_factory, flips):
    """Flipped bytes anywhere in the header, L1, refcount table or L2 clusters."""
    image = bytearray(qcow2_image)
    for offset, mask in flips:
        image[offset] ^= mask
    open_and_read(bytes(image), tmp_path_factory.getbasetemp())


# -- LUKS2: hostile values anywhere in the JSON metadata, with valid checksums -----------

hostile_json = st.one_of(
    st.sampled_from([None, True, 0, -1, 2**64, "", "-1", "0", "18446744073709551616", "dynamic", "auto",
                     "aes-xts-plain64", "argon2id", "pbkdf2", "sha1", "luks2", "crypt", [], {}, ["0"]]),
    st.integers(-2**70, 2**70), st.text(max_size=40))


@pytest.fixture(scope="module")
def luks2_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "luks2.img"
    format_luks2(path, 1 << 20, b"fuzz", pbkdf="pbkdf2", pbkdf_iterations=1000, sector_size=512)
    return path.read_bytes()


def json_paths(node, path=()):
    """Every place in the metadata a value can be replaced: object members and list items."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield path + (key,)
        yield from json_paths(child, path + (key,))


@FUZZ
@given(changes=st.lists(st.tuples(st.integers(0, 10**6), hostile_json), min_size=1, max_size=3))
def test_luks2_json(luks2_image, changes):
    hdr_size = int.from_bytes(luks2_image[8:16], "big")
    paths = sorted(json_paths(json.loads(luks2_image[LUKS2_BINARY_SIZE:hdr_size].rstrip(b"\0"))), key=repr)

    def mutate(doc):
        for index, value in changes:
            path = paths[index % len(paths)]
            try:
                node = doc
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]]  # noqa: B018 - exists? (an earlier change may have replaced the branch)
                node[path[-1]] = value
            except (KeyError, IndexError, TypeError):
                pass

    parse(luks2_with_json(luks2_image, mutate))
