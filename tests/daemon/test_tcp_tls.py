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


def x509_dir(path, ca_name):
    """A directory as nbdkit's --tls-certificates reads it: a new CA (ca-cert.pem, ca-key.pem)
    and a key and certificate for 127.0.0.1 signed by it."""
    path.mkdir()
    run(["certtool", "--generate-privkey", "--outfile", path / "ca-key.pem"])
    _certtool(path, "--generate-self-signed", "--load-privkey", path / "ca-key.pem", "--outfile",
              path / "ca-cert.pem", info=f'cn = "{ca_name}"\nca\ncert_signing_key\nexpiration_days = 2\n')
    _issue(path, path, "server", 'cn = "127.0.0.1"\nip_address = "127.0.0.1"\ndns_name = "localhost"\n'
                                 'tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n')
    return path


def client_dir(path, trusted_ca, issuer=None):
    """A directory as libnbd's tls-certificates= reads it: ca-cert.pem of ``trusted_ca``, and
    with an ``issuer`` (a CA's directory) client-cert.pem and client-key.pem signed by it."""
    path.mkdir()
    (path / "ca-cert.pem").write_bytes((trusted_ca / "ca-cert.pem").read_bytes())
    if issuer is not None:
        _issue(issuer, path, "client", 'cn = "client"\ntls_www_client\nencryption_key\nsigning_key\n'
                                       'expiration_days = 2\n')
    return path


def _issue(ca, path, name, info):
    """NAME-key.pem and NAME-cert.pem in ``path``, signed by the CA in the directory ``ca``."""
    run(["certtool", "--generate-privkey", "--outfile", path / f"{name}-key.pem"])
    _certtool(path, "--generate-certificate", "--load-privkey", path / f"{name}-key.pem",
              "--load-ca-certificate", ca / "ca-cert.pem", "--load-ca-privkey", ca / "ca-key.pem",
              "--outfile", path / f"{name}-cert.pem", info=info)


def _certtool(path, *args, info):
    template = path / "template"
    template.write_text(info)
    run(["certtool", *args, "--template", template])
    template.unlink()


def _size(uri, certificates):
    """nbdinfo's answer for the export's size with the client files in ``certificates``,
    or None if the connection is refused."""
    result = run(["nbdinfo", "--size", f"{uri}?tls-certificates={certificates}"], check=False)
    return int(result.stdout) if result.returncode == 0 else None


def test_tls_x509_verifies_client_certificates(tmp_path, image, key_file):
    require("nbdinfo", "certtool")
    port = free_port()
    server = x509_dir(tmp_path / "server", "nbdcrypt test CA")
    stranger = x509_dir(tmp_path / "stranger", "some other CA")
    with daemon(image, "--key-file", key_file, "--port", port, "--tls-certificates", server) as (_, uri):
        assert uri == f"nbds://127.0.0.1:{port}/"
        assert _size(uri, client_dir(tmp_path / "good", server, issuer=server)) == 8 << 20
        assert _size(uri, client_dir(tmp_path / "anonymous", server)) is None
        assert _size(uri, client_dir(tmp_path / "foreign", server, issuer=stranger)) is None
        assert _size(uri, client_dir(tmp_path / "distrustful", stranger, issuer=server)) is None
        plain = run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/"], check=False)
        assert plain.returncode != 0


def test_tls_x509_without_client_verification_when_asked(tmp_path, image, key_file):
    require("nbdinfo", "certtool")
    port = free_port()
    server = x509_dir(tmp_path / "server", "nbdcrypt test CA")
    with daemon(image, "--key-file", key_file, "--port", port, "--tls-certificates", server,
                "--tls-no-verify-peer") as (_, uri):
        assert _size(uri, client_dir(tmp_path / "anonymous", server)) == 8 << 20
        assert _size(uri, client_dir(tmp_path / "distrustful", x509_dir(tmp_path / "other", "other CA"))) is None


def test_tls_x509_needs_the_ca_certificate_to_verify_clients(tmp_path, image, key_file):
    require("certtool")
    server = x509_dir(tmp_path / "server", "nbdcrypt test CA")
    (server / "ca-cert.pem").unlink()
    one_line_exit_2(failing(image, "--key-file", key_file, "--port", free_port(), "--tls-certificates", server),
                    "ca-cert.pem")
