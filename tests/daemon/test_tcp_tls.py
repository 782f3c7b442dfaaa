"""TCP only with TLS unless --insecure-tcp; TLS-PSK works with libnbd and refuses a wrong key."""

import os

from tests.daemon.conftest import daemon, failing, free_port, one_line_exit_2
from tests.tools import require, run


def psk_file(path, key):
    path.write_text(f"alice:{key.hex()}\n")  # psktool's format
    os.chmod(path, 0o600)
    return path


def test_tcp_without_tls_is_refused(image, key_file):
    one_line_exit_2(failing(image, "--key-file", key_file, "--port", free_port()), "TCP without TLS")


def test_insecure_tcp_when_asked(image, key_file):
    require("nbdinfo")
    port = free_port()
    with daemon(image, "--key-file", key_file, "--port", port, "--insecure-tcp") as (_, uri):
        assert uri == f"nbd://127.0.0.1:{port}/"
        assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(8 << 20)


def test_tls_psk(tmp_path, image, key_file):
    require("nbdinfo")
    port = free_port()
    good = psk_file(tmp_path / "psk", os.urandom(32))
    wrong = psk_file(tmp_path / "wrong", os.urandom(32))
    with daemon(image, "--key-file", key_file, "--port", port, "--tls-psk", good) as (_, uri):
        assert uri == f"nbds://127.0.0.1:{port}/"
        url = f"nbds://alice@127.0.0.1:{port}/?tls-psk-file="
        assert run(["nbdinfo", "--size", url + str(good)]).stdout.strip() == str(8 << 20)
        refused = run(["nbdinfo", "--size", url + str(wrong)], check=False)
        assert refused.returncode != 0 and not refused.stdout.strip()
        plain = run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/"], check=False)
        assert plain.returncode != 0  # --tls=require: no plaintext session
