"""Metrics over TCP have no authentication: a client must not be able to pile up threads in
nbdkit, by many connections or by idle and slow ones."""

import http.client
import os
import socket
import time

from nbdcrypt.plugin.metrics import MAX_CONNECTIONS, REQUEST_TIMEOUT
from tests.daemon.conftest import daemon, descendants, free_port


def _threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def _threads_drop_to(pid, most):
    """Whether ``pid`` has at most ``most`` threads within 5 s (a handler thread ends just
    after its client got the answer)."""
    deadline = time.monotonic() + 5
    while _threads(pid) > most and time.monotonic() < deadline:
        time.sleep(0.05)
    return _threads(pid) <= most


def _scrape(port):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/metrics")
        return connection.getresponse().status
    finally:
        connection.close()


def _closed(sock):
    """Whether the server closed ``sock`` (waiting up to the socket's timeout)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _drip_until_dropped(sock, limit):
    """Send a request that never ends, a header line every half second; the seconds until
    the server drops the connection, or None if it has not after ``limit`` seconds."""
    started = time.monotonic()
    try:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n")
        while time.monotonic() - started < limit:
            sock.sendall(b"X-Drip: 1\r\n")
            time.sleep(0.5)
    except (BrokenPipeError, ConnectionResetError):
        return time.monotonic() - started
    return None


def test_connections_are_capped_and_idle_or_slow_ones_dropped(tmp_path, image, key_file):
    port = free_port()
    with daemon(image, "--key-file", key_file, "--socket", tmp_path / "s.sock",
                "--metrics", f"127.0.0.1:{port}") as (proc, _):
        nbdkit = descendants(proc.pid)[1]
        assert _scrape(port) == 200
        before = _threads(nbdkit)
        held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(MAX_CONNECTIONS)]
        time.sleep(0.5)  # all accepted
        more = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3 * MAX_CONNECTIONS)]
        try:
            assert all(_closed(sock) for sock in more)  # refused at once, not queued
            assert _threads_drop_to(nbdkit, before + MAX_CONNECTIONS)
            dropped_after = _drip_until_dropped(held[0], 3 * REQUEST_TIMEOUT)
            assert dropped_after is not None and dropped_after < REQUEST_TIMEOUT + 2
            assert all(_closed(sock) for sock in held[1:])  # idle as long: dropped too
        finally:
            for sock in held + more:
                sock.close()
        assert _scrape(port) == 200  # their slots are free again
        assert _threads_drop_to(nbdkit, before)
