"""TCP only with TLS unless --insecure-tcp; TLS-PSK works with libnbd and refuses a wrong key."""

import os

from tests.daemon.conftest import daemon, failing, free_port, one_line_exit_2
from tests.tools import psk_file, require, run


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


def x509_dir(path, ca_name, server=True):
    """A directory as nbdkit's --tls-certificates and libnbd's tls-certificates= read it:
    ca-cert.pem, and with ``server`` a key and certificate for 127.0.0.1 signed by that CA."""
    path.mkdir()
    template = path / "template"

    def certtool(*args, info):
        template.write_text(info)
        run(["certtool", *args, "--template", template])

    run(["certtool", "--generate-privkey", "--outfile", path / "ca-key.pem"])
    certtool("--generate-self-signed", "--load-privkey", path / "ca-key.pem", "--outfile", path / "ca-cert.pem",
             info=f'cn = "{ca_name}"\nca\ncert_signing_key\nexpiration_days = 2\n')
    if server:
        run(["certtool", "--generate-privkey", "--outfile", path / "server-key.pem"])
        certtool("--generate-certificate", "--load-privkey", path / "server-key.pem",
                 "--load-ca-certificate", path / "ca-cert.pem", "--load-ca-privkey", path / "ca-key.pem",
                 "--outfile", path / "server-cert.pem",
                 info='cn = "127.0.0.1"\nip_address = "127.0.0.1"\ndns_name = "localhost"\n'
                      'tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n')
    template.unlink()
    return path


def test_tls_x509(tmp_path, image, key_file):
    require("nbdinfo", "certtool")
    port = free_port()
    server = x509_dir(tmp_path / "server", "nbdcrypt test CA")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "ca-cert.pem").write_bytes((server / "ca-cert.pem").read_bytes())
    stranger = x509_dir(tmp_path / "stranger", "some other CA", server=False)
    with daemon(image, "--key-file", key_file, "--port", port, "--tls-certificates", server) as (_, uri):
        assert uri == f"nbds://127.0.0.1:{port}/"
        assert run(["nbdinfo", "--size", f"{uri}?tls-certificates={trusted}"]).stdout.strip() == str(8 << 20)
        refused = run(["nbdinfo", "--size", f"{uri}?tls-certificates={stranger}"], check=False)
        assert refused.returncode != 0 and not refused.stdout.strip()
        plain = run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/"], check=False)
        assert plain.returncode != 0
