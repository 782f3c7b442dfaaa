"""serve --config FILE: the same names as the command line, which wins; bad files are one line."""

import pytest

from tests.daemon.conftest import daemon, failing, one_line_exit_2


def test_serves_from_a_config_file(tmp_path, image, key_file, nbd_handle):
    config = tmp_path / "vol.toml"
    config.write_text(f'image = "{image}"\nkey-file = "{key_file}"\nsocket = "{tmp_path}/file.sock"\n'
                      f'perf-no_read_workqueue = true\nworkers = 2\ncontrol = "{tmp_path}/ctl.sock"\n')
    with daemon("--config", config, "--socket", tmp_path / "cli.sock") as (proc, uri):
        assert uri.endswith("cli.sock")  # the command line wins
        h = nbd_handle(uri)
        h.pwrite(b"configured" * 100, 4096)
        assert h.pread(1000, 4096) == b"configured" * 100


@pytest.mark.parametrize("text, message", [
    ('image = "x"\nsokcet = "/tmp/s"\n', "unknown key 'sokcet'"),
    ('image = "x"\nworkers = "4"\n', "workers must be an integer, not str"),
    ('image = "x"\nreadonly = 1\n', "readonly must be true or false, not int"),
    ('image = "x"\nbacking-key-file = ["a", 1]\n', "backing-key-file must be a string or a list of them, not int"),
    ('image = "x\n', "not valid TOML"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    one_line_exit_2(failing("--config", config), message)


def test_missing_config_file(tmp_path):
    one_line_exit_2(failing("--config", tmp_path / "nope.toml"), "cannot read config")
