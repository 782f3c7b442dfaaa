"""One queueing layer per export: reads served from an encrypted qcow2 backing file go
through the export's pool, settings and statistics, through nbdkit and ``nbdcrypt ctl``."""

import json
import os
import signal
import threading

import pytest

from nbdcrypt.daemon.ctl import request
from tests.conftest import serving
from tests.interop.test_qcow2_qemu import MiB, qemu_create, qemu_io
from tests.tools import nbdcrypt_cmd, require, run, write_key

BASE_PASSPHRASE = b"the backing file's own passphrase"


@pytest.fixture
def chain(tmp_path, key_file):
    """(overlay, base key): a LUKS qcow2 overlay, empty, on a LUKS qcow2 base that
    qemu-io filled with 0x5a in its first MiB."""
    require("qemu-img", "qemu-io")
    base_key = write_key(tmp_path / "base.key", BASE_PASSPHRASE)
    base = qemu_create(tmp_path / "base.qcow2", base_key, 4 * MiB)
    qemu_io(base, base_key, "write -P 0x5a 0 1M")
    return qemu_create(tmp_path / "img.qcow2", key_file, 4 * MiB, backing=(base.name, "qcow2")), base_key


def test_ctl_stats_count_the_crypto_of_a_backing_read(chain, key_file, tmp_path, nbd_handle):
    image, base_key = chain
    control = str(tmp_path / "control.sock")
    with serving(image, key_file, "--backing-key-file", str(base_key), "--control", control) as uri:
        h = nbd_handle(uri)
        request(control, "reset-stats")
        assert h.pread(MiB, 0) == b"\x5a" * MiB  # the overlay holds nothing: all from the base
        stats = json.loads(run(nbdcrypt_cmd() + ["ctl", control, "stats", "--json"]).stdout)
    assert stats["read"]["ops"] == 1 and stats["read"]["bytes"] == MiB  # one request, not one per layer
    crypto = stats["read"]["latency_us"]["queued"]["crypto"]
    assert crypto["count"] == 1 and crypto["sum"] > 0


def test_ctl_set_changes_the_pool_backing_reads_use(chain, key_file, tmp_path, nbd_handle):
    """With one worker process, stopped, a read from the backing file waits for it."""
    image, base_key = chain
    control = str(tmp_path / "control.sock")
    with serving(image, key_file, "--backing-key-file", str(base_key), "--control", control,
                 "--inline-below", "0") as uri:
        h = nbd_handle(uri)
        request(control, "set", {"worker_type": "process", "workers": 1})
        pid, = request(control, "status")["worker_pids"]
        got = []
        os.kill(pid, signal.SIGSTOP)
        try:
            reader = threading.Thread(target=lambda: got.append(h.pread(64 << 10, 0)))
            reader.start()
            reader.join(1.0)
            assert reader.is_alive(), "the backing read did not wait for the export's worker"
        finally:
            os.kill(pid, signal.SIGCONT)
        reader.join(30)
        assert got == [b"\x5a" * (64 << 10)]
        assert request(control, "stats")["read"]["latency_us"]["queued"]["crypto"]["count"] == 1
