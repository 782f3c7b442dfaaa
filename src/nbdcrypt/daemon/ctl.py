"""``nbdcrypt ctl SOCKET ...``: talk to a running export's control endpoint."""

import argparse
import json
import socket
import textwrap
from collections.abc import Iterable
from typing import Any

from ..control import MAX_LINE, ControlError, JsonObject, decode_reply, encode_request
from ..datapath.settings import BY_NAME, PERF_FLAGS, SETTINGS, Setting, Settings
from ..errors import InputError


def add_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    ctl = commands.add_parser(
        "ctl", help="query or change a running export (statistics, queueing flags, throttles)",
        description="Talk to the control socket of `nbdcrypt serve --control PATH`.")
    ctl.add_argument("socket", metavar="SOCKET", help="the export's control socket")
    actions = ctl.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("status", help="settings and export details")
    stats = actions.add_parser("stats", help="ops, bytes, errors, queue depth and latency percentiles")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.add_argument("--reset", action="store_true", help="zero the statistics after reading them")
    change = actions.add_parser("set", help="change settings: NAME=VALUE ...",
                                description="Change settings; requests that start afterwards use them.",
                                epilog=settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    change.add_argument("pairs", nargs="+", metavar="NAME=VALUE")
    refresh = actions.add_parser(
        "refresh", help="set the four performance flags at once, as cryptsetup refresh does",
        description="Flags given are turned on, the others off (cryptsetup refresh semantics).")
    for flag in PERF_FLAGS:
        add_setting_option(refresh, BY_NAME[flag])
    ctl.set_defaults(run=run)


def add_setting_option(parser: argparse._ActionsContainer, setting: Setting) -> None:
    """``setting`` as serve's option: a flag for dm-crypt's, else an option taking a value."""
    if setting.kind is bool:
        parser.add_argument(setting.option, action="store_true", dest=setting.name, help=setting.help)
    else:
        parser.add_argument(setting.option, dest=setting.name, type=setting.kind, help=setting.help,
                            metavar=setting.metavar, choices=setting.choices or None)


def settings_help() -> str:
    lines = ["settings:"]
    for setting in SETTINGS:
        lines.append(f"  {setting.name}={setting.values}")
        lines.append(textwrap.fill(setting.help, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.action == "stats":
        result = request(args.socket, "stats")
        if args.reset:
            request(args.socket, "reset-stats")
        print(json.dumps(result, indent=2) if args.json else format_stats(result))
        return 0
    if args.action == "set":
        changes = parse_pairs(args.pairs)
        Settings().updated(changes)  # a typo is a usage error before the socket is reached
        result = request(args.socket, "set", changes)
    elif args.action == "refresh":
        result = request(args.socket, "set", {flag: getattr(args, flag) for flag in PERF_FLAGS})
    else:
        result = request(args.socket, "status")
    print(json.dumps(result, indent=2))
    return 0


def parse_pairs(pairs: Iterable[str]) -> dict[str, str]:
    changes = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InputError(f"expected NAME=VALUE, not {pair!r}")
        changes[name] = value
    return changes


def request(path: str, command: str, args: JsonObject | None = None) -> Any:
    """One request/reply exchange with the control socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(path)
            sock.sendall(encode_request(command, args))
            with sock.makefile("rb") as reader:
                line = reader.readline(MAX_LINE + 1)
    except OSError as e:
        raise ControlError(f"{path}: cannot reach the control socket: {e.strerror or e}") from None
    if not line:
        raise ControlError(f"{path}: the export closed the connection")
    return decode_reply(line)


def format_stats(stats: JsonObject) -> str:
    lines = []
    for direction in ("read", "write"):
        d = stats[direction]
        lines.append(f"{direction}: {d['ops']} ops, {d['bytes']} bytes, {d['errors']} errors, "
                     f"in flight {d['in_flight']} (peak {d['peak_in_flight']}), "
                     f"throttled {d['throttled_us']}us")
        for mode, phases in d.get("latency_us", {}).items():
            for phase, h in phases.items():
                lines.append(f"  {mode:6} {phase:8} n={h['count']:<8} p50={h['p50']}us "
                             f"p99={h['p99']}us p99.9={h['p99.9']}us max={h['max']}us")
    if stats.get("worker_restarts"):
        lines.append(f"worker processes restarted: {stats['worker_restarts']}")
    return "\n".join(lines)
