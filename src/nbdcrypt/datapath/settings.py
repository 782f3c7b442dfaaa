"""The queueing layer's settings, defined once.

Each field of :class:`Settings` carries its type, default and help; everything that
names a setting derives from :data:`SETTINGS`: serve's options and config keys, the
nbdkit parameters, ``nbdcrypt ctl set`` and ``refresh``, and the tests.  The four
dm-crypt flags keep cryptsetup's names (``--perf-no_read_workqueue``); the other
settings are options with dashes (``--worker-type``).  ``ctl set``, the nbdkit
parameters and the control socket use the field names (``worker_type``).
"""

import os
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, NamedTuple, TypeVar

from ..errors import InputError

T = TypeVar("T")


def _setting(default: T, help: str, choices: tuple[str, ...] = (), metavar: str | None = None) -> T:
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar})


@dataclass(frozen=True)
class Settings:
    """Everything that can change at runtime; the queueing layer reads a snapshot per request."""

    no_read_workqueue: bool = _setting(False, "decrypt reads in the request thread instead of a worker")
    no_write_workqueue: bool = _setting(False, "encrypt and write in the request thread instead of a worker")
    same_cpu_crypt: bool = _setting(False, "queued crypto runs on the worker pinned to the submitting CPU")
    submit_from_crypt_cpus: bool = _setting(
        False, "workers write their own requests instead of the sorting writer thread")
    workers: int = _setting(os.cpu_count() or 1, "crypt workers (default: CPUs)", metavar="N")
    worker_type: str = _setting("thread", "crypt workers are threads of nbdkit (default) or worker processes",
                                choices=("thread", "process"))
    throttle_bps: int = _setting(0, "limit to BYTES per second (0 = off)", metavar="BYTES")
    throttle_ops: int = _setting(0, "limit to N requests per second (0 = off)", metavar="N")
    # Measured on 2 cores, QD8 (docs/queueing.md): inline wins up to 512 KiB, queued from 768 KiB.
    inline_below: int = _setting(512 << 10, "requests smaller than BYTES run inline whatever the flags say "
                                 "(default: 524288; 0 = off)", metavar="BYTES")

    def inline(self, direction: str, nbytes: int) -> bool:
        """Whether the crypto of a request of ``nbytes`` runs in the request thread, for
        ``direction`` (a write request's read-modify-write reads are reads)."""
        if nbytes < self.inline_below:
            return True
        return self.no_read_workqueue if direction == "read" else self.no_write_workqueue

    def updated(self, changes: dict[str, Any]) -> "Settings":
        """A copy with ``changes`` (name -> str or value) applied; InputError on bad ones."""
        parsed = {}
        for name, value in changes.items():
            if name not in BY_NAME:
                raise InputError(f"unknown setting {name}; known: {', '.join(BY_NAME)}")
            parsed[name] = BY_NAME[name].parse(value)
        return replace(self, **parsed)


class Setting(NamedTuple):
    """One setting as the interfaces spell it."""

    name: str  # field, ctl set, nbdkit parameter and control socket name
    kind: type  # bool (on/off), int (a whole number >= 0) or str (one of choices)
    default: Any
    help: str
    choices: tuple[str, ...]
    metavar: str | None

    @property
    def option(self) -> str:
        """serve's option; without the dashes, the config file's key."""
        return f"--perf-{self.name}" if self.kind is bool else "--" + self.name.replace("_", "-")

    @property
    def values(self) -> str:
        """What the setting takes, for help texts."""
        if self.kind is bool:
            return "on/off"
        return "/".join(self.choices) if self.choices else self.metavar or "N"

    def parse(self, value: Any) -> Any:
        """``value`` (a string from the command line, or a JSON value) as this setting's type."""
        if self.kind is str:
            if value not in self.choices:
                raise InputError(f"{self.name} takes {' or '.join(self.choices)}, not {value!r}")
            return value
        if isinstance(value, str):
            text = value.strip().lower()
            if self.kind is bool:
                if text in ("1", "true", "on", "yes"):
                    return True
                if text in ("0", "false", "off", "no"):
                    return False
                raise InputError(f"{self.name} takes on/off, not {value!r}")
            try:
                value = int(text)
            except ValueError:
                raise InputError(f"{self.name} takes a whole number, not {value!r}") from None
        if self.kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InputError(f"{self.name} takes a whole number >= 0, not {value!r}")
        if self.kind is bool and not isinstance(value, bool):
            raise InputError(f"{self.name} takes on/off, not {value!r}")
        return value


def _described(f: Field) -> Setting:
    assert isinstance(f.type, type), "annotations must stay types: no `from __future__ import annotations`"
    return Setting(f.name, f.type, f.default, f.metadata["help"], f.metadata["choices"], f.metadata["metavar"])


SETTINGS = tuple(_described(f) for f in fields(Settings))
BY_NAME = {s.name: s for s in SETTINGS}
# dm-crypt's performance flags, as cryptsetup's --perf-* options name them.
PERF_FLAGS = tuple(s.name for s in SETTINGS if s.kind is bool)
