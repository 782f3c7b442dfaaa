"""The daemon under systemd's protocols: unit files, sd_notify, socket activation."""

import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.daemon.conftest import daemon, free_port
from tests.tools import nbdcrypt_cmd, require, run

UNITS = Path(__file__).resolve().parents[2] / "systemd"
INSTALLED = "/opt/nbdcrypt/bin/nbdcrypt"


def test_units_verify(tmp_path):
    require("systemd-analyze")
    # verify checks that ExecStart= exists: point it at this checkout unless installed.
    for unit in UNITS.glob("nbdcrypt@.*"):
        text = unit.read_text()
        if not Path(INSTALLED).exists():
            text = text.replace(INSTALLED, nbdcrypt_cmd()[0])
        (tmp_path / unit.name).write_text(text)
        (tmp_path / unit.name.replace("@.", "@vol1.")).symlink_to(tmp_path / unit.name)
    result = run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "nbdcrypt@vol1.service"),
                  str(tmp_path / "nbdcrypt@vol1.socket")], check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_notify_ready_only_once_the_export_answers_then_stopping(tmp_path, image, key_file):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    listener.settimeout(60)
    sock = tmp_path / "s.sock"
    with listener, daemon(image, "--key-file", key_file, "--socket", sock,
                          env={"NOTIFY_SOCKET": str(tmp_path / "notify")}) as (proc, uri):
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(listener.recv(4096).decode())
            if "READY=1" in messages[-1]:
                with socket.socket(socket.AF_UNIX) as probe:  # right now, not after a retry
                    probe.connect(str(sock))
                    assert probe.recv(8) == b"NBDMAGIC"
        assert any(m.startswith("STATUS=unlocking") for m in messages)
        assert f"STATUS=serving at {uri}" in messages[-1]
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in listener.recv(4096).decode()
        assert proc.wait(30) == 0


def test_socket_activation_first_connection_starts_serving(tmp_path, image, key_file, nbd_handle):
    require("systemd-socket-activate")
    sock = tmp_path / "activated.sock"
    starter = ["systemd-socket-activate", "-l", str(sock)]
    # systemd-socket-activate listens at once and starts serve on the first connection.
    proc = subprocess.Popen([*starter, *nbdcrypt_cmd(), "serve", str(image), "--key-file", str(key_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not sock.exists():
            time.sleep(0.02)
        h = nbd_handle(f"nbd+unix:///?socket={sock}")  # waits in the backlog while serve unlocks
        h.pwrite(b"activated!" * 400, 12345)
        h.flush()
        assert h.pread(4000, 12345) == b"activated!" * 400
        line = proc.stdout.readline().decode()
        assert f"serving {image}" in line and str(sock) in line, line
        h2 = nbd_handle(f"nbd+unix:///?socket={sock}")  # a second client at the same time
        assert h2.pread(4000, 12345) == b"activated!" * 400
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr.decode()
    with daemon(image, "--key-file", key_file, "--socket", tmp_path / "again.sock") as (_, uri):
        assert nbd_handle(uri).pread(4000, 12345) == b"activated!" * 400


def test_socket_activation_refuses_an_inherited_tcp_socket_without_tls(tmp_path, image, key_file):
    require("systemd-socket-activate")
    port = free_port()
    sock = tmp_path / "activated.sock"
    # The Unix socket first: its family must not decide for the TCP one behind it.
    starter = ["systemd-socket-activate", "-l", str(sock), "-l", f"127.0.0.1:{port}"]
    proc = subprocess.Popen([*starter, *nbdcrypt_cmd(), "serve", str(image), "--key-file", str(key_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not sock.exists():
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            try:
                greeting = client.recv(8)
            except ConnectionResetError:  # closed unaccepted, still in the backlog
                greeting = b""
            assert greeting == b""  # no NBD greeting in plaintext
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    ours = stderr.split("Execing ", 1)[1].splitlines()[1:]  # after systemd-socket-activate's own lines
    assert proc.returncode == 2 and len(ours) == 1 and ours[0].startswith("nbdcrypt: TCP without TLS"), stderr
