"""serve's daemon options and its TOML config file, which uses the same names.

A config file describes one export with the long options of ``nbdcrypt serve``
as keys (``image`` for the positional argument)::

    image = "/srv/vol1.img"
    key-credential = "vol1"
    socket = "/run/nbdcrypt/vol1.sock"
    perf-no_read_workqueue = true
    workers = 4

Options given on the command line win over the file: a value option left unset
(None) or a flag left off takes the file's value.
"""

import argparse
import tomllib

from ..errors import InputError

# Options that exclude each other: one given on the command line drops the file's others.
EXCLUSIVE = (("key_file", "passphrase_fd", "key_credential", "key_keyring"), ("socket", "port"))


def add_options(parser: argparse.ArgumentParser) -> None:
    """Add the daemon options to serve's ``parser``; call it after every other serve option,
    since it records them all as the config file's keys."""
    parser.add_argument("--config", metavar="FILE",
                        help="read options from a TOML file (keys: the long option names, and image); "
                             "the command line wins")
    keys = parser.add_argument_group("key sources (besides --key-file and --passphrase-fd)")
    keys.add_argument("--key-credential", metavar="NAME",
                      help="read the passphrase from the systemd credential NAME "
                           "($CREDENTIALS_DIRECTORY/NAME, from LoadCredential=/LoadCredentialEncrypted=)")
    keys.add_argument("--key-keyring", metavar="DESCRIPTION",
                      help="read the passphrase from the kernel keyring's user key DESCRIPTION (needs keyctl)")
    listen = parser.add_argument_group("listener")
    listen.add_argument("--socket-group", metavar="GROUP",
                        help="let GROUP connect to the Unix socket too (mode 0660 instead of 0600)")
    listen.add_argument("--tls-psk", metavar="FILE",
                        help="require TLS with the pre-shared keys in FILE (psktool's format) on TCP")
    listen.add_argument("--tls-certificates", metavar="DIR",
                        help="require TLS with the X.509 files in DIR (ca-cert.pem, server-cert.pem, "
                             "server-key.pem) on TCP; clients need a certificate signed by ca-cert.pem")
    listen.add_argument("--tls-no-verify-peer", action="store_true",
                        help="with --tls-certificates, let clients in without a certificate: anyone who "
                             "reaches the port and trusts the server reads the export")
    listen.add_argument("--insecure-tcp", action="store_true",
                        help="allow --port without TLS: plaintext data and no authentication on the network")
    parser.set_defaults(config_keys=_keys(parser))


def _keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config key -> the argparse action it sets."""
    keys = {}
    for action in parser._actions:
        names = [o[2:] for o in action.option_strings if o.startswith("--")]
        if not action.option_strings:
            names = [action.dest]
        for name in names:
            if name not in ("help", "config"):
                keys[name] = action
    return keys


def load(path: str, keys: dict[str, argparse.Action]) -> dict[str, object]:
    """The file's settings as ``{dest: value}``; InputError (one line) on anything wrong."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read config: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML: {e}") from None
    values: dict[str, object] = {}
    for name, value in table.items():
        if name not in keys:
            raise InputError(f"{path}: unknown key {name!r} (known: {', '.join(sorted(keys))})")
        action = keys[name]
        repeatable = isinstance(action, argparse._AppendAction)
        items = value if repeatable and type(value) is list else [value]
        expected = _kind(action)
        for item in items:
            if type(item) is not expected:  # bool is an int: be exact
                kind = _KIND_NAMES[expected] + (" or a list of them" if repeatable else "")
                raise InputError(f"{path}: {name} must be {kind}, not {type(item).__name__}")
        values[action.dest] = items if repeatable else value
    return values


_KIND_NAMES = {bool: "true or false", int: "an integer", str: "a string"}


def _kind(action: argparse.Action) -> type:
    if action.nargs == 0:  # a flag
        return bool
    return int if action.type is int else str


def merge(args: argparse.Namespace, values: dict[str, object]) -> None:
    """Fill ``args`` from the file's ``values`` where the command line left them unset."""
    for group in EXCLUSIVE:
        if any(getattr(args, dest, None) not in (None, False) for dest in group):
            values = {dest: value for dest, value in values.items() if dest not in group}
    for dest, value in values.items():
        if getattr(args, dest) in (None, False):
            setattr(args, dest, value)
