"""The control protocol between ``nbdcrypt ctl`` and a running export.

Sans-I/O: these functions turn requests and replies into bytes and back, and say
what is malformed; the plugin's control server and the CLI do the socket work.
One JSON object per line each way:

    request  {"command": "set", "args": {"no_read_workqueue": "on"}}
    reply    {"ok": true, "result": {...}}  or  {"ok": false, "error": "..."}
"""

import json
from typing import Any

from .errors import InputError

COMMANDS = {
    "status": "settings and export details",
    "stats": "live statistics",
    "set": "change settings: args maps names to values",
    "reset-stats": "zero the counters and histograms",
}
MAX_LINE = 64 << 10

JsonObject = dict[str, Any]


class ControlError(InputError):
    """A malformed request or reply, or an error reported by the other side."""


def encode_request(command: str, args: JsonObject | None = None) -> bytes:
    return _line({"command": command, "args": args or {}})


def decode_request(line: bytes) -> tuple[str, JsonObject]:
    """``(command, args)`` from one request line; ControlError if malformed."""
    message = _parse(line, "request")
    command, args = message.get("command"), message.get("args", {})
    if command not in COMMANDS:
        raise ControlError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    if not isinstance(args, dict):
        raise ControlError("args must be an object")
    return command, args


def encode_reply(result: Any = None, error: str | None = None) -> bytes:
    return _line({"ok": False, "error": error} if error else {"ok": True, "result": result})


def decode_reply(line: bytes) -> Any:
    """The result of a reply line; ControlError carrying the server's error otherwise."""
    message = _parse(line, "reply")
    if message.get("ok") is True:
        return message.get("result")
    raise ControlError(str(message.get("error", "malformed reply")))


def _line(message: JsonObject) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _parse(line: bytes, what: str) -> JsonObject:
    if len(line) > MAX_LINE:
        raise ControlError(f"{what} longer than {MAX_LINE} bytes")
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ControlError(f"{what} is not JSON") from None
    except RecursionError:  # json's parser recurses once per [ or {, and a line may hold 64 Ki of them
        raise ControlError(f"{what} nested too deeply") from None
    if not isinstance(message, dict):
        raise ControlError(f"{what} must be a JSON object")
    return message
