"""qcow2 beyond reads and writes, checked by QEMU: discard that frees clusters (also
under a snapshot), zstd compressed clusters, encrypted backing files with a key of
their own, internal snapshots in ``nbdcrypt info``, and bounded metadata caches."""

import json
import random
import time

import pytest

from nbdcrypt.formats.qcow2 import Qcow2Image, refcounts, tables
from nbdcrypt.storage.store import FileStore
from tests.conftest import PASSPHRASE, serving
from tests.interop.test_qcow2_qemu import (
    MiB,
    assert_reads_back,
    close_volumes,
    image_opts,
    open_volume,
    qemu_check,
    qemu_create,
    qemu_io,
    qemu_read,
    random_writes,
    read_all,
    release_volumes,
)
from tests.tools import nbdcrypt_cmd, require, run, write_key

pytestmark = pytest.mark.usefixtures("tools", "close_volumes")
assert close_volumes  # the autouse fixture, imported so that it runs here too
BASE_PASSPHRASE = b"the backing file's own passphrase"


@pytest.fixture
def tools():
    require("qemu-img", "qemu-io")


def whole_clusters(offset, length, cluster_size):
    first = -(-offset // cluster_size) * cluster_size
    return first, max(first, (offset + length) // cluster_size * cluster_size)


def qemu_map(image, key_file):
    """[(start, length, data)] as ``qemu-img map`` sees the image."""
    release_volumes()
    out = json.loads(run(["qemu-img", "map", "--output=json"] + image_opts(image, key_file)).stdout)
    return [(e["start"], e["length"], e["data"]) for e in out]


def allocated(extents, start, end):
    """Whether any byte of [start, end) is data in qemu-img map's ``extents``."""
    return any(data and s < end and start < s + length for s, length, data in extents)


# -- discard ---------------------------------------------------------------------------------


def test_trim_through_serve_frees_clusters_later_writes_reuse(tmp_path, key_file, nbd_handle):
    cs, size = 65536, 8 * MiB
    image = qemu_create(tmp_path / "img.qcow2", key_file, size, "luks", cs)
    rnd = random.Random(11)
    model = bytearray(size)
    trims = [(MiB, 2 * MiB), (4 * MiB + 1000, MiB)]  # the second frees only its whole clusters
    with serving(image, key_file) as uri:
        h = nbd_handle(uri)
        assert h.can_trim()
        model[:6 * MiB] = rnd.randbytes(6 * MiB)
        h.pwrite(bytes(model[:6 * MiB]), 0)
        h.flush()
        full = image.stat().st_size
        for offset, length in trims:
            h.trim(length, offset)
            first, last = whole_clusters(offset, length, cs)
            model[first:last] = bytes(last - first)
        h.flush()
        assert h.pread(size, 0) == model
        model[6 * MiB:] = rnd.randbytes(2 * MiB)  # fewer clusters than were freed
        h.pwrite(bytes(model[6 * MiB:]), 6 * MiB)
        h.flush()
    assert image.stat().st_size == full, "freed clusters were not reused"
    qemu_check(image, key_file)
    extents = qemu_map(image, key_file)
    assert not allocated(extents, MiB, 3 * MiB) and not allocated(extents, 4 * MiB + cs, 5 * MiB)
    assert allocated(extents, 4 * MiB, 4 * MiB + cs)  # the partial cluster is left as it was
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    result = run(["qemu-img", "compare", "--object", f"secret,id=s0,file={key_file}", "--image-opts",
                  f"driver=raw,file.filename={raw}", image_opts(image, key_file)[-1]], check=False)
    assert "Images are identical" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("compat,with_backing,encrypt", [
    ("1.1", False, "luks"), ("1.1", True, "aes"), ("0.10", True, "aes")])
def test_discard_as_qemu_does(tmp_path, key_file, compat, with_backing, encrypt):
    """Without a backing file discarded clusters read zeros; with one, v3 keeps it
    hidden (zero clusters) and v2 lets it show through, as QEMU does."""
    cs, size = 4096, 2 * MiB
    rnd = random.Random(4)
    backing = None
    if with_backing:
        (tmp_path / "base.raw").write_bytes(rnd.randbytes(size))
        backing = ("base.raw", "raw")
    image = qemu_create(tmp_path / "img.qcow2", key_file, size, encrypt, cs, compat, backing=backing)
    volume = open_volume(image)
    model = bytearray(rnd.randbytes(size))
    volume.write(model, 0)
    random_writes(volume, model, rnd, 30, 5 * cs)
    volume.flush()
    full = image.stat().st_size
    for offset, length in ((0, 100 * cs), (300 * cs + 5, 40 * cs), (size - 3 * cs, 3 * cs)):
        volume.trim(length, offset)
        first, last = whole_clusters(offset, length, cs)
        shows_through = with_backing and compat == "0.10"
        model[first:last] = (tmp_path / "base.raw").read_bytes()[first:last] if shows_through else \
            bytes(last - first)
    assert read_all(volume) == model
    data = rnd.randbytes(60 * cs)  # into discarded clusters: 60 of the 142 freed
    volume.write(data, 20 * cs)
    model[20 * cs:80 * cs] = data
    volume.flush()
    assert image.stat().st_size == full
    assert_reads_back(volume, image, key_file, tmp_path, model)


def test_discard_keeps_clusters_a_snapshot_holds(tmp_path, key_file):
    image = qemu_create(tmp_path / "img.qcow2", key_file, 4 * MiB, "luks", 4096)
    qemu_io(image, key_file, "write -P 0x41 0 1M", "write -P 0x42 2M 512k")
    run(["qemu-img", "snapshot", "-c", "before"] + image_opts(image, key_file))
    old = qemu_read(image, key_file, tmp_path)
    volume = open_volume(image)
    volume.write(b"\x44" * 8192, 3 * MiB + 512 * 1024)  # not in the snapshot: freed outright
    volume.trim(4 * MiB, 0)
    model = bytearray(4 * MiB)
    # New data must not land on clusters the snapshot still holds.
    random_writes(volume, model, random.Random(8), 60, 30000)
    volume.flush()
    assert_reads_back(volume, image, key_file, tmp_path, model)
    assert qemu_read(image, key_file, tmp_path, snapshot="before") == old


class RecordingStore:
    """A store that logs each write and flush on its way to the file."""

    def __init__(self, store):
        self._store, self.log = store, []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def write(self, buf, offset, fua=False):
        self.log.append((offset, bytes(buf)))
        self._store.write(buf, offset, fua)

    def flush(self):
        self.log.append(None)
        self._store.flush()


def crash_states(before, log):
    """What a crash can leave of a file that held ``before``: every prefix of the
    writes (a killed process), and the last flushed state plus any one write made
    since (a power cut may persist unflushed writes in any order)."""
    states, current, flushed, pending = set(), bytearray(before), bytes(before), 0
    for entry in log:
        if entry is None:
            flushed, pending = bytes(current), 0
            continue
        offset, data = entry
        for state in (current, bytearray(flushed) if pending else None):
            if state is not None:
                state[offset:offset + len(data)] = data
                states.add(bytes(state))
        pending += 1
    return states


def test_no_moment_of_a_discard_has_a_referenced_cluster_freed(tmp_path, key_file):
    """Discards of unshared clusters and of clusters and an L2 table a snapshot shares:
    qemu-img check finds leaks at most, at every point a crash could stop them."""
    image = qemu_create(tmp_path / "img.qcow2", key_file, 4 * MiB, "aes", 4096)
    qemu_io(image, key_file, "write -P 0x41 0 256k", "write -P 0x43 2M 128k")
    run(["qemu-img", "snapshot", "-c", "before"] + image_opts(image, key_file))
    qemu_io(image, key_file, "write -P 0x42 512k 128k")  # the first L2 table is unshared now
    before = image.read_bytes()
    with open(image, "rb") as f:
        header = Qcow2Image.read(f, str(image))
    store = RecordingStore(FileStore(image))
    with header.open_volume(store, header.unlock(PASSPHRASE, None)) as volume:
        volume.trim(500 << 10, 100 << 10)  # shared and unshared data clusters
        volume.trim(64 << 10, 2 * MiB)  # the second L2 table is copied first
    states = crash_states(before, store.log)
    assert len(states) > 5
    crashed = tmp_path / "crashed.qcow2"
    for state in states:
        crashed.write_bytes(state)
        result = run(["qemu-img", "check", "--output=json"] + image_opts(crashed, key_file), check=False)
        report = json.loads(result.stdout)
        assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report


# -- zstd ------------------------------------------------------------------------------------


def zstd_image(tmp_path, name="zstd.qcow2"):
    """An unencrypted image of compressible data, every cluster zstd-compressed by QEMU
    (QEMU compresses no encrypted image); returns (image, its raw contents)."""
    raw = tmp_path / "src.raw"
    rnd = random.Random(9)
    raw.write_bytes(b"".join(rnd.randbytes(100) * 40 for _ in range(400)))
    image = tmp_path / name
    run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=4096",
         str(raw), str(image)])
    converted = tmp_path / "converted.raw"
    run(["qemu-img", "convert", "-O", "raw", str(image), str(converted)])
    return image, converted.read_bytes()


def test_zstd_clusters_read_and_are_copied_on_write(tmp_path, key_file):
    image, expected = zstd_image(tmp_path)
    volume = open_volume(image)
    assert volume.header.info()["compression_type"] == "zstd"
    assert read_all(volume) == expected
    model = bytearray(expected)
    random_writes(volume, model, random.Random(2), 80, 9000)
    volume.trim(40960, 4096 * 50)
    model[4096 * 50:4096 * 60] = bytes(40960)
    volume.flush()
    assert_reads_back(volume, image, key_file, tmp_path, model)


def test_served_overlay_on_a_zstd_backing_file(tmp_path, key_file, nbd_handle):
    base, _ = zstd_image(tmp_path, "base.qcow2")
    image = qemu_create(tmp_path / "img.qcow2", key_file, 2 * MiB, "luks", 65536,
                        backing=(base.name, "qcow2"))
    qemu_io(image, key_file, "write -P 0x61 70000 1000")
    model = bytearray(qemu_read(image, key_file, tmp_path))
    with serving(image, key_file) as uri:
        h = nbd_handle(uri)
        assert h.pread(len(model), 0) == model
        h.pwrite(b"\x62" * 5000, 300000)  # copies zstd clusters of the backing file up
        model[300000:305000] = b"\x62" * 5000
        h.flush()
    qemu_check(image, key_file)
    assert qemu_read(image, key_file, tmp_path) == model
    # nbdcrypt serves encrypted images only: the plain base is refused in one line.
    result = run(nbdcrypt_cmd() + ["serve", str(base), "--key-file", str(key_file), "--socket",
                                   str(tmp_path / "plain.sock")], check=False)
    assert result.returncode == 2 and "not encrypted" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- encrypted backing files -------------------------------------------------------------------


def chain_opts(image, key_file, base_key):
    """qemu-img arguments opening ``image`` and its encrypted qcow2 backing file."""
    return ["--object", f"secret,id=s0,file={key_file}", "--object", f"secret,id=s1,file={base_key}",
            "--image-opts", f"driver=qcow2,encrypt.key-secret=s0,file.filename={image},"
                            f"backing.encrypt.key-secret=s1"]


@pytest.mark.parametrize("base_encryption,encryption", [("luks", "aes"), ("aes", "luks")])
def test_encrypted_backing_file_with_its_own_key(tmp_path, key_file, nbd_handle, base_encryption, encryption):
    """An encrypted overlay on a qcow2 base encrypted with another passphrase, both
    filled by qemu-io, served with the base's key from the config file."""
    base_key = write_key(tmp_path / "base.key", BASE_PASSPHRASE)
    base = qemu_create(tmp_path / "base.qcow2", base_key, 4 * MiB, base_encryption, 65536)
    qemu_io(base, base_key, "write -P 0x5a 0 1M", "write -P 0x6b 3M 300k")
    image = qemu_create(tmp_path / "img.qcow2", key_file, 4 * MiB, encryption, 65536,
                        backing=(base.name, "qcow2"))
    run(["qemu-io"] + chain_opts(image, key_file, base_key) + ["-c", "write -P 0x11 512k 4k", "-c",
                                                               "write -z 3M 64k"])
    check_key_mistakes(tmp_path, key_file, image, base, base_key, base_encryption)
    expected = tmp_path / "expected.raw"
    run(["qemu-img", "convert", "-O", "raw"] + chain_opts(image, key_file, base_key) + [str(expected)])
    model = bytearray(expected.read_bytes())
    config = tmp_path / "serve.toml"
    config.write_text(f'backing-key-file = "{base_key}"\ninsecure-legacy-aes = true\n')  # config keys, as the options
    with serving(image, key_file, "--config", str(config)) as uri:
        h = nbd_handle(uri)
        assert h.pread(len(model), 0) == model
        h.pwrite(b"\x77" * 3000, 3 * MiB + 100000)  # copies a cluster of the base up
        model[3 * MiB + 100000:3 * MiB + 103000] = b"\x77" * 3000
        h.flush()
    check = run(["qemu-img", "check", "--output=json"] + chain_opts(image, key_file, base_key))
    result = json.loads(check.stdout)
    assert result.get("corruptions", 0) == 0 and result.get("leaks", 0) == 0
    run(["qemu-img", "convert", "-O", "raw"] + chain_opts(image, key_file, base_key) + [str(expected)])
    assert expected.read_bytes() == model


def test_each_encrypted_backing_file_with_its_own_key(tmp_path, key_file, nbd_handle):
    """base (LUKS) <- middle (legacy AES) <- image (LUKS), three passphrases: served with
    one backing key per encrypted backing file, nearest first (a list in the config file),
    the data as QEMU reads it; the keys in the wrong order, or one too many: one line, exit 2."""
    base_key = write_key(tmp_path / "base.key", BASE_PASSPHRASE)
    middle_key = write_key(tmp_path / "middle.key", b"0123456789abcdef")  # AES-128: the key itself
    base = qemu_create(tmp_path / "base.qcow2", base_key, 4 * MiB, "luks", 65536)
    qemu_io(base, base_key, "write -P 0x5a 0 2M")
    middle = qemu_create(tmp_path / "middle.qcow2", middle_key, 4 * MiB, "aes", 65536,
                         backing=(base.name, "qcow2"))
    image = qemu_create(tmp_path / "img.qcow2", key_file, 4 * MiB, "luks", 65536,
                        backing=(middle.name, "qcow2"))
    secrets = [f"secret,id={name},file={path}" for name, path in
               (("s0", key_file), ("s1", middle_key), ("s2", base_key))]
    opts = [arg for secret in secrets for arg in ("--object", secret)] + [
        "--image-opts", f"driver=qcow2,encrypt.key-secret=s0,file.filename={image},"
                        f"backing.encrypt.key-secret=s1,backing.backing.encrypt.key-secret=s2"]
    run(["qemu-io"] + opts + ["-c", "write -P 0x6b 1M 64k"])  # into the middle via the image
    run(["qemu-io", "--object", secrets[1], "--object", secrets[2], "--image-opts",
         f"driver=qcow2,encrypt.key-secret=s1,file.filename={middle},backing.encrypt.key-secret=s2",
         "-c", "write -P 0x7c 3M 64k"])
    expected = tmp_path / "expected.raw"
    run(["qemu-img", "convert", "-O", "raw"] + opts + [str(expected)])
    model = expected.read_bytes()
    assert model[3 * MiB:3 * MiB + 65536] == b"\x7c" * 65536 and model[:1024] == b"\x5a" * 1024
    config = tmp_path / "serve.toml"
    config.write_text(f'backing-key-file = ["{middle_key}", "{base_key}"]\n')
    with serving(image, key_file, "--config", str(config)) as uri:
        assert nbd_handle(uri).pread(len(model), 0) == model
    keys = ["--backing-key-file", str(middle_key), "--backing-key-file", str(base_key)]
    swapped = ["--backing-key-file", str(base_key), "--backing-key-file", str(middle_key)]
    assert "base.qcow2" in serve_error(image, key_file, tmp_path, *swapped)
    assert "3 backing keys for 2 encrypted backing files" in serve_error(
        image, key_file, tmp_path, *keys, "--backing-key-file", str(base_key))


def serve_error(image, key_file, tmp_path, *extra):
    """serve's one-line error; legacy AES images are allowed read-write, to reach the key checks."""
    result = run(nbdcrypt_cmd() + ["serve", str(image), "--key-file", str(key_file), "--socket",
                                   str(tmp_path / "err.sock"), "--insecure-legacy-aes", *extra], check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    return lines[0]


def check_key_mistakes(tmp_path, key_file, image, base, base_key, base_encryption):
    """A missing or wrong backing key, or one no backing file needs: one line, exit 2."""
    assert "--backing-key-file" in serve_error(image, key_file, tmp_path)
    if base_encryption == "luks":  # legacy AES has no key check
        wrong = write_key(tmp_path / "wrong.key", b"not the passphrase")
        assert "base.qcow2" in serve_error(image, key_file, tmp_path, "--backing-key-file", str(wrong))
    assert "no backing file is encrypted" in serve_error(base, base_key, tmp_path, "--backing-key-file",
                                                         str(base_key))


# -- snapshots in nbdcrypt info ------------------------------------------------------------------


def local_time(seconds):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def test_info_lists_snapshots_as_qemu_does(tmp_path, key_file):
    image = qemu_create(tmp_path / "img.qcow2", key_file, 4 * MiB, "aes", 65536)
    qemu_io(image, key_file, "write -P 0x41 0 64k")
    for name in ("first", "second one"):
        run(["qemu-img", "snapshot", "-c", name] + image_opts(image, key_file))
    ours = json.loads(run(nbdcrypt_cmd() + ["info", "--json", str(image)]).stdout)["snapshots"]
    theirs = json.loads(run(["qemu-img", "info", "--output=json"] + image_opts(image, key_file)).stdout)
    assert [(s["id"], s["name"], s["vm_size"], s["date"]) for s in ours] == \
        [(t["id"], t["name"], t["vm-state-size"], local_time(t["date-sec"])) for t in theirs["snapshots"]]
    listing = run(["qemu-img", "snapshot", "-l"] + image_opts(image, key_file)).stdout.splitlines()[2:]
    assert [row.split() for row in listing] == \
        [[s["id"], *s["name"].split(), "0", "B", *s["date"].split(), s["vm_clock"], str(s["icount"])]
         for s in ours]
    assert "name: second one" in run(nbdcrypt_cmd() + ["info", str(image)]).stdout


# -- bounded caches ------------------------------------------------------------------------------


def test_metadata_caches_stay_bounded(tmp_path, key_file, monkeypatch):
    """512-byte clusters and the smallest caches: writes, zeroes and discards across
    far more L2 tables and refcount blocks than are cached."""
    monkeypatch.setattr(refcounts, "CACHE_BYTES", 0)
    monkeypatch.setattr(tables, "CACHE_BYTES", 0)
    image = qemu_create(tmp_path / "img.qcow2", key_file, 16 * MiB, "luks", 512)
    volume = open_volume(image)
    rnd = random.Random(6)
    model = bytearray(volume.size)
    random_writes(volume, model, rnd, 200, 4000)
    for offset in range(0, volume.size, 256 << 10):  # a new L2 table each, hosts far apart
        data = rnd.randbytes(16 << 10)
        volume.write(data, offset + 1000)
        model[offset + 1000:offset + 1000 + len(data)] = data
    volume.trim(12 * MiB, 2 * MiB)  # drops references in many refcount blocks at once
    model[2 * MiB:14 * MiB] = bytes(12 * MiB)
    random_writes(volume, model, rnd, 100, 4000)
    assert len(volume._refcounts._blocks) <= refcounts.MIN_CACHED_BLOCKS
    assert len(volume._tables._cache) <= 16
    volume.flush()
    assert_reads_back(volume, image, key_file, tmp_path, model)
