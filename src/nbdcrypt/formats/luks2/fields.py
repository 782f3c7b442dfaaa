"""Typed access to LUKS2 JSON values, each failure a FormatError naming the field.

LUKS2 writes 64-bit numbers as decimal strings and binary values as base64.
"""

import base64
import binascii
import re
from typing import Any, TypeVar

from nbdcrypt.errors import FormatError

JsonObject = dict[str, Any]  # as json.loads makes it; read only through the checks below
T = TypeVar("T")

MAX_U64 = (1 << 63) - 1  # offsets and sizes must also fit a signed file offset
_DECIMAL = re.compile(r"[0-9]{1,19}")
# ASCII only: str.isdigit() and int() also take "²" or "٣", which cryptsetup does not.
_ID = re.compile(r"0|[1-9][0-9]?")


def obj(parent: JsonObject, key: str, where: str) -> JsonObject:
    return typed(parent, key, dict, "an object", where)


def text(parent: JsonObject, key: str, where: str) -> str:
    return typed(parent, key, str, "a string", where)


def integer(parent: JsonObject, key: str, where: str, low: int = 0, high: int = MAX_U64) -> int:
    value = parent.get(key)
    if type(value) is not int or not low <= value <= high:
        raise FormatError(f"{where}: {key} must be an integer from {low} to {high}")
    return value


def u64(parent: JsonObject, key: str, where: str) -> int:
    """A LUKS2 "string-encoded uint64"."""
    value = parent.get(key)
    if not (isinstance(value, str) and _DECIMAL.fullmatch(value) and int(value) <= MAX_U64):
        raise FormatError(f"{where}: {key} must be a decimal number in a string")
    return int(value)


def b64(parent: JsonObject, key: str, where: str, max_len: int = 512) -> bytes:
    try:
        value = base64.b64decode(text(parent, key, where), validate=True)
    except (binascii.Error, ValueError):  # ValueError: not ASCII
        raise FormatError(f"{where}: {key} is not base64") from None
    if not value or len(value) > max_len:
        raise FormatError(f"{where}: {key} has {len(value)} bytes")
    return value


def encode_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def ids(parent: JsonObject, key: str, where: str) -> list[int]:
    """A list of object ids ("0".."31") as ints."""
    value = parent.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FormatError(f"{where}: {key} must be a list of ids")
    return [object_id(v, where) for v in value]


def object_id(key: str, where: str, limit: int = 32) -> int:
    """An id ("0".."31", no leading zeros) as an int."""
    if not (_ID.fullmatch(key) and int(key) < limit):
        raise FormatError(f"{where}: invalid id {key!r}")
    return int(key)


def typed(parent: JsonObject, key: str, kind: type[T], description: str, where: str) -> T:
    value = parent.get(key)
    if not isinstance(value, kind):
        raise FormatError(f"{where}: {key} must be {description}")
    return value
