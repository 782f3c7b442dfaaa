"""Images behind another NBD server: over HTTP via nbdkit's curl plugin, over TLS, with
a detached header, and a backing server that dies and comes back in the middle of a
verified fio run."""

import http.server
import json
import os
import re
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import (
    nbd_backing,
    nbdcrypt_luks1,
    qemu_luks_create,
    qemu_luks_opts,
    qemu_write,
    random_file,
    serving,
)
from tests.tools import (
    FAST_PBKDF,
    cryptsetup,
    cryptsetup_decrypt,
    nbdcrypt,
    nbdcrypt_cmd,
    psk_file,
    read_all,
    require,
    run,
    write_all,
)


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one file with byte ranges, which nbdkit's curl plugin needs."""

    path_to_serve = None

    def do_HEAD(self):
        self._reply(head=True)

    def do_GET(self):
        self._reply(head=False)

    def _reply(self, head):
        data = Path(self.path_to_serve).read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start = int(match[1])
            end = int(match[2]) + 1 if match[2] else len(data)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            data = data[start:end]
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextmanager
def http_server(path):
    handler = type("Handler", (RangeHandler,), {"path_to_serve": str(path)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/image"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_read_only_image_over_http(tmp_path, key_file):
    require("nbdkit", "nbdcopy", "qemu-img")
    image = qemu_luks_create(tmp_path / "img", key_file, "8M")
    raw = random_file(tmp_path / "raw", 8 << 20, seed=7)
    qemu_write(image, key_file, raw)
    out = tmp_path / "out"
    with http_server(image) as url, nbd_backing(image, "--readonly", "curl", f"url={url}") as backing:
        with serving(backing, key_file, "--readonly", socket_path=tmp_path / "export.sock") as uri:
            run(["nbdcopy", uri, str(out)])
    assert out.read_bytes() == raw.read_bytes()


def test_backing_server_over_tls(tmp_path, key_file):
    """nbds+unix:// with a pre-shared key: QEMU's data reads back, ours decrypts in QEMU."""
    require("nbdkit", "nbdcopy", "qemu-img")
    image = qemu_luks_create(tmp_path / "img", key_file, "8M")
    qemu_write(image, key_file, random_file(tmp_path / "before", 8 << 20, seed=3))
    after = random_file(tmp_path / "after", 8 << 20, seed=4)
    psk = psk_file(tmp_path / "psk", os.urandom(32))
    with nbd_backing(image, tls_psk=psk) as backing:
        with serving(backing, key_file, socket_path=tmp_path / "export.sock") as uri:
            run(["nbdcopy", uri, str(tmp_path / "read")])
            run(["nbdcopy", str(after), uri])
        wrong = backing.replace(str(psk), str(psk_file(tmp_path / "wrong", os.urandom(32))))
        refused = subprocess.run(nbdcrypt_cmd() + ["serve", wrong, "--key-file", str(key_file),
                                                  "--socket", str(tmp_path / "no.sock")],
                                 capture_output=True, text=True, timeout=60)
    assert (tmp_path / "read").read_bytes() == (tmp_path / "before").read_bytes()
    assert refused.returncode == 2 and "cannot connect" in refused.stderr, refused.stderr
    run(["qemu-img", "convert", "-O", "raw", *qemu_luks_opts(image, key_file), str(tmp_path / "check")])
    assert (tmp_path / "check").read_bytes() == after.read_bytes()


def test_backing_server_restarts_during_fio_verify(tmp_path, key_file):
    """Requests in flight when the backing nbdkit dies are retried after it comes back."""
    require("nbdkit", "fio")
    image = tmp_path / "img"
    nbdcrypt_luks1(image, key_file, "64M")
    backing_sock = tmp_path / "backing.sock"

    def start_backing():
        return subprocess.Popen(["nbdkit", "--foreground", "--unix", str(backing_sock), "file", str(image)])

    backing = start_backing()
    while not backing_sock.exists():
        time.sleep(0.02)
    try:
        with serving(f"nbd+unix:///?socket={backing_sock}", key_file,
                     socket_path=tmp_path / "export.sock") as uri:
            fio = subprocess.Popen(
                ["fio", "--name=restart", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=64k",
                 "--size=32M", "--rate=16m", "--iodepth=4", "--verify=crc32c", "--verify_fatal=1",
                 "--output-format=json"],  # rate-limited: ~2 s of writes, the kill lands in them
                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            with fio:
                time.sleep(1.0)
                backing.send_signal(signal.SIGKILL)
                backing.wait()
                backing_sock.unlink()
                time.sleep(0.5)
                backing = start_backing()
                stdout, stderr = fio.communicate(timeout=240)
    finally:
        backing.terminate()
        backing.wait()
    assert fio.returncode == 0, stderr
    job = json.loads(stdout[stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] == job["write"]["io_bytes"] > 0  # every block written was verified
    assert job["write"]["runtime"] > 1500  # ms: the backing server died mid-run


def test_unreachable_store_is_a_clear_error(tmp_path, key_file):
    result = subprocess.run(nbdcrypt_cmd() + ["serve", f"nbd+unix:///?socket={tmp_path}/absent.sock",
                                              "--key-file", str(key_file), "--socket", str(tmp_path / "s.sock")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot connect" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("maker", ["cryptsetup", "nbdcrypt"])
def test_detached_header_with_the_data_behind_nbd(tmp_path, key_file, maker):
    """The header a local file, the data behind nbdkit: what nbdcrypt writes reads back,
    and cryptsetup decrypts it to the same bytes."""
    require("cryptsetup")
    data, header = tmp_path / "data", tmp_path / "hdr"
    data.write_bytes(bytes(1 << 20))
    options = ["--type", "luks2", "--header", header, "--key-file", key_file, *FAST_PBKDF["pbkdf2"]]
    if maker == "cryptsetup":
        cryptsetup("luksFormat", *options, data)
    else:
        nbdcrypt("format", *options, data)
    plain = random_file(tmp_path / "plain", 1 << 20, seed=3)
    with nbd_backing(data) as uri, serving(uri, key_file, "--header", header, socket_path=tmp_path / "s.sock") as url:
        write_all(url, plain)
        assert read_all(url) == plain.read_bytes()
    cryptsetup_decrypt(data, header, key_file)
    assert data.read_bytes() == plain.read_bytes()
