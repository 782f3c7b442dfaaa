"""Every queueing-layer setting of the one table (nbdcrypt.datapath.settings) is a serve
option, a config key, an nbdkit parameter, a ``ctl set`` name, and documented."""

import json
from pathlib import Path

from nbdcrypt.daemon import config
from nbdcrypt.daemon.cli import build_parser
from nbdcrypt.daemon.cli import main as nbdcrypt_main
from nbdcrypt.daemon.serve import queueing_settings
from nbdcrypt.datapath.settings import SETTINGS, Settings
from nbdcrypt.plugin.export import PARAMETERS
from tests.daemon.conftest import daemon

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


def other_value(setting):
    """A value that is not the default, so arriving at it proves the setting was passed on."""
    if setting.kind is bool:
        return True
    if setting.choices:
        return next(c for c in setting.choices if c != setting.default)
    return setting.default + 1


def as_options(values):
    options = []
    for setting in SETTINGS:
        value = values[setting.name]
        options += [setting.option] if value is True else [setting.option, str(value)]
    return options


def as_toml(values):
    return "".join(f"{s.option[2:]} = {json.dumps(values[s.name])}\n" for s in SETTINGS)


def test_every_setting_is_a_serve_option_and_a_config_key(tmp_path):
    values = {s.name: other_value(s) for s in SETTINGS}
    expected = Settings(**values)
    from_cli = build_parser().parse_args(["serve", "img", *as_options(values)])
    assert Settings().updated(queueing_settings(from_cli)) == expected
    path = tmp_path / "vol.toml"
    path.write_text('image = "img"\n' + as_toml(values))
    from_file = build_parser().parse_args(["serve", "--config", str(path)])
    config.merge(from_file, config.load(path, from_file.config_keys))
    assert queueing_settings(from_file) == queueing_settings(from_cli)


def test_every_setting_reaches_the_export_and_ctl_set_changes_it(tmp_path, image, key_file, capsys):
    """serve hands its options to nbdkit as parameters; ``ctl set`` takes every name back."""
    assert {s.name for s in SETTINGS} <= set(PARAMETERS)
    values = {s.name: other_value(s) for s in SETTINGS}
    control = tmp_path / "ctl.sock"
    with daemon(image, "--key-file", key_file, "--socket", tmp_path / "s.sock", "--control", control,
                *as_options(values)):
        assert nbdcrypt_main(["ctl", str(control), "status"]) == 0
        assert json.loads(capsys.readouterr().out)["settings"] == values
        pairs = [f"{s.name}={'off' if s.default is False else s.default}" for s in SETTINGS]
        assert nbdcrypt_main(["ctl", str(control), "set", *pairs]) == 0
        assert json.loads(capsys.readouterr().out)["settings"] == vars(Settings())


def test_every_setting_is_documented():
    text = REFERENCE.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `--")]
    ctl_set = next(line for line in text.splitlines() if line.startswith("- `set NAME=VALUE"))
    for setting in SETTINGS:
        assert any(row.startswith(f"| `{setting.option}") for row in rows), f"{setting.option} has no row"
        assert setting.name in ctl_set, f"ctl set does not name {setting.name}"


def test_ctl_set_refuses_a_bad_value_before_reaching_the_socket(tmp_path, capsys):
    assert nbdcrypt_main(["ctl", str(tmp_path / "no-such.sock"), "set", "worker_type=fork"]) == 2
    assert capsys.readouterr().err == "nbdcrypt: worker_type takes thread or process, not 'fork'\n"
