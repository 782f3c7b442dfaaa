"""The default socket directory must be ours alone: another user who made it first (or put a
symlink there) could replace the socket and take the clients."""

import os
import pwd
import socket
import stat

import pytest

from nbdcrypt.daemon.listener import Listener
from nbdcrypt.errors import NbdcryptError
from tests.daemon.conftest import daemon, failing, one_line_exit_2


def _refused(image, runtime_dir):
    # A key file that does not exist: the listener must be refused before any key is read.
    return failing(image, "--key-file", runtime_dir / "no-such-key",
                   env={"XDG_RUNTIME_DIR": str(runtime_dir)})


def test_directory_of_another_user_is_refused(tmp_path, image):
    (tmp_path / "nbdcrypt").mkdir(mode=0o700)
    os.chown(tmp_path / "nbdcrypt", pwd.getpwnam("nobody").pw_uid, -1)
    one_line_exit_2(_refused(image, tmp_path), f"{tmp_path / 'nbdcrypt'}: not a directory of ours")


def test_directory_others_can_enter_is_refused(tmp_path, image):
    (tmp_path / "nbdcrypt").mkdir()
    os.chmod(tmp_path / "nbdcrypt", 0o755)
    one_line_exit_2(_refused(image, tmp_path), "mode 0700")


@pytest.mark.parametrize("target", ["elsewhere", "missing"])
def test_symlink_in_place_of_the_directory_is_refused(tmp_path, image, target):
    if target == "elsewhere":
        (tmp_path / target).mkdir(mode=0o700)
    (tmp_path / "nbdcrypt").symlink_to(tmp_path / target)
    one_line_exit_2(_refused(image, tmp_path), "not a directory of ours")


def test_private_directory_is_made_and_used(tmp_path, image, key_file):
    with daemon(image, "--key-file", key_file, env={"XDG_RUNTIME_DIR": str(tmp_path)}) as (_, uri):
        assert uri == f"nbd+unix:///?socket={tmp_path / 'nbdcrypt' / 'img.sock'}"
        assert stat.S_IMODE(os.lstat(tmp_path / "nbdcrypt").st_mode) == 0o700


def test_socket_permissions_are_not_set_through_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("")
    os.chmod(victim, 0o600)
    (tmp_path / "s.sock").symlink_to(victim)
    listener = Listener(socket.AF_UNIX, str(tmp_path / "s.sock"), socket_path=tmp_path / "s.sock",
                        gid=pwd.getpwnam("nobody").pw_gid)
    with pytest.raises(NbdcryptError, match="not nbdkit's socket"):
        listener.grant_access()
    assert os.stat(victim).st_gid == os.getegid() and stat.S_IMODE(os.stat(victim).st_mode) == 0o600
