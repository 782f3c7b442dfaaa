"""SIGTERM during a write load: every write the server acknowledged is there after a restart."""

import signal
import threading
import time

import pytest

from tests.daemon.conftest import daemon

BLOCK = 64 << 10


def test_sigterm_during_writes_keeps_every_acknowledged_write(tmp_path, image, key_file, nbd_handle):
    nbd = pytest.importorskip("nbd")
    acknowledged = {}  # block -> the pattern the server acknowledged
    in_flight = {}  # block -> a write sent but not acknowledged: it may or may not have landed

    def writer(h, first):
        for round_ in range(1, 1000):
            for block in range(first, 128, 4):
                data = bytes([round_ % 251 + 1]) * BLOCK
                in_flight[block] = data
                try:
                    h.pwrite(data, block * BLOCK)
                except nbd.Error:
                    return  # the server is stopping
                acknowledged[block] = data

    with daemon(image, "--key-file", key_file, "--socket", tmp_path / "s.sock") as (proc, uri):
        threads = [threading.Thread(target=writer, args=(nbd_handle(uri), i)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(30) == 0
    assert len(acknowledged) == 128
    with daemon(image, "--key-file", key_file, "--socket", tmp_path / "again.sock") as (_, uri):
        h = nbd_handle(uri)
        for block, data in acknowledged.items():
            assert h.pread(BLOCK, block * BLOCK) in (data, in_flight[block]), f"block {block}"


def test_second_signal_drops_idle_clients_at_once(tmp_path, image, key_file, nbd_handle):
    from nbdcrypt.daemon.serve import STOP_GRACE
    with daemon(image, "--key-file", key_file, "--socket", tmp_path / "s.sock") as (proc, uri):
        idle = nbd_handle(uri)  # keeps nbdkit waiting after the first SIGTERM
        assert idle.pread(512, 0) is not None
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None, "an idle client should hold the stop for the grace period"
        second = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        waited = time.monotonic() - second
    assert "second SIGINT: dropping clients now" in proc.stderr_text
    assert waited < STOP_GRACE - 0.5, f"took {waited:.1f} s: the second signal did not cut the grace period"
