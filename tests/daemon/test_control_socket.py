"""serve --control PATH (and --metrics PATH): only a stale socket at PATH is replaced, and
malformed requests (deeply nested, over-long) get a protocol error, not a dead connection."""

import json
import os
import socket

import pytest

from nbdcrypt.control import MAX_LINE, encode_request
from nbdcrypt.daemon.ctl import request
from tests.daemon.conftest import daemon, failing, one_line_exit_2


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_control_path_held_by_something_else_is_refused(tmp_path, image, kind):
    path, victim = tmp_path / "control", tmp_path / "victim"
    victim.write_text("keep me")
    if kind == "file":
        path.write_text("keep me")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(victim)
    # A key file that does not exist: the path must be refused before any key is read.
    result = failing(image, "--key-file", tmp_path / "no-such-key", "--socket", tmp_path / "s.sock",
                     "--control", path)
    one_line_exit_2(result, f"{path}: exists and is not a socket")
    assert os.path.lexists(path) and victim.read_text() == "keep me"


def test_metrics_path_held_by_a_file_is_refused(tmp_path, image):
    path = tmp_path / "metrics"
    path.write_text("keep me")
    result = failing(image, "--key-file", tmp_path / "no-such-key", "--socket", tmp_path / "s.sock",
                     "--metrics", path)
    one_line_exit_2(result, f"{path}: exists and is not a socket")
    assert path.read_text() == "keep me"


def test_control_path_of_a_live_socket_is_refused(tmp_path, image):
    path = tmp_path / "control"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen()
        result = failing(image, "--key-file", tmp_path / "no-such-key", "--socket", tmp_path / "s.sock",
                         "--control", path)
        one_line_exit_2(result, f"{path}: a server listens there already")


def test_stale_control_socket_is_replaced(tmp_path, image, key_file):
    path = tmp_path / "control"
    with socket.socket(socket.AF_UNIX) as gone:  # closed at once: nobody listens
        gone.bind(str(path))
    with daemon(image, "--key-file", key_file, "--socket", tmp_path / "s.sock", "--control", path):
        assert request(str(path), "status")["size"] == 8 << 20


def test_malformed_requests_get_a_protocol_error(tmp_path, image, key_file):
    path = tmp_path / "control"
    with daemon(image, "--key-file", key_file, "--socket", tmp_path / "s.sock", "--control", path), \
            socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(30)
        conn.connect(str(path))
        with conn.makefile("rb") as replies:
            conn.sendall(b"[" * 50000 + b"\n")  # within MAX_LINE, far beyond the parser's recursion limit
            assert json.loads(replies.readline()) == {"ok": False, "error": "request nested too deeply"}
            conn.sendall(encode_request("status"))  # the connection still serves
            assert json.loads(replies.readline())["ok"] is True
            conn.sendall(b" " * (MAX_LINE + 1))
            too_long = {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}
            assert json.loads(replies.readline()) == too_long
            assert replies.readline() == b""  # and closed
