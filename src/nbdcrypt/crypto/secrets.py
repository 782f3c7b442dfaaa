"""Key material in memory: locked in RAM, wiped when done, in a process nobody can dump.

A :class:`Secret` is a bytearray mlocked from its creation (where RLIMIT_MEMLOCK
allows; otherwise one line on stderr says so) and zeroed and unlocked by :func:`wipe`,
or when it is freed.  mlock works on whole pages, and a small bytearray shares its
page with other objects, perhaps other secrets: pages are counted, and a page is
unlocked only when the last secret on it is wiped.  Copies made by libraries (OpenSSL's
key schedule, Python's ``bytes``) are outside our reach: docs/security.md lists them.
"""

import ctypes
import mmap
import os
import resource
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer  # typeshed's; not needed at run time

PR_SET_DUMPABLE = 4
MAX_KEY_FILE = 8 << 20  # cryptsetup's default keyfile size limit
PAGE = mmap.PAGESIZE
MCL_CURRENT = 1

_libc = ctypes.CDLL(None, use_errno=True)
for _call in (_libc.mlock, _libc.munlock):
    _call.argtypes, _call.restype = (ctypes.c_void_p, ctypes.c_size_t), ctypes.c_int

_locked: Counter[int] = Counter()  # page address -> secrets on that page
_guard = threading.RLock()  # a Secret freed by the garbage collector may come back in
_warned = False


def protect_process() -> None:
    """No core dumps, no ptrace or /proc/PID/mem for other processes of our user.
    Children inherit the core limit; exec resets the dumpable flag, so each program
    that holds keys calls this itself."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


class Secret(bytearray):
    """A bytearray of key material (zeroed, or a copy of ``data``), locked in RAM until
    wiped or freed.  Never resize one: its buffer would move and leave a copy behind."""

    __slots__ = ("_pages",)
    _pages: "range | tuple[()]"

    def __init__(self, data: "int | Buffer" = 0) -> None:
        super().__init__(data)
        self._pages = _lock_pages(self)

    def __del__(self) -> None:
        wipe(self)

    def __repr__(self) -> str:
        return f"<secret of {len(self)} bytes>"


def wipe(buf: bytearray | memoryview) -> None:
    """Zero the writable buffer ``buf`` in place; a :class:`Secret` is also unlocked."""
    if len(buf):
        ctypes.memset(_address(buf), 0, len(buf))
    pages = getattr(buf, "_pages", ())  # a Secret's; none if its __init__ failed
    if isinstance(buf, Secret) and pages:
        buf._pages = ()
        _unlock_pages(pages)


def joined(parts: Sequence[bytearray]) -> Secret:
    """One Secret holding ``parts`` in order; the parts are wiped."""
    out, pos = Secret(sum(map(len, parts))), 0
    for part in parts:
        out[pos:pos + len(part)] = part
        pos += len(part)
        wipe(part)
    return out


def read_secret(fd: int, limit: int, line: bool = False) -> Secret:
    """Up to ``limit`` bytes from ``fd`` (up to a newline if ``line``) as an exact-size
    Secret; OSError as the read raises it.  The buffer starts at a page and doubles,
    so a short secret locks little; a line is read a byte at a time so nothing after
    it is consumed."""
    buf, n = Secret(min(limit, PAGE)), 0
    try:
        while n < limit:
            if n == len(buf):
                buf = _grown(buf, min(2 * n, limit))
            with memoryview(buf) as view:
                got = os.readv(fd, [view[n:n + 1] if line else view[n:]])
            if got == 0 or (line and buf[n] == ord("\n")):
                break
            n += got
        with memoryview(buf) as view:
            return Secret(view[:n])
    finally:
        wipe(buf)


def _grown(buf: Secret, size: int) -> Secret:
    bigger = Secret(size)
    bigger[:len(buf)] = buf
    wipe(buf)
    return bigger


def lock_all_memory() -> None:
    """Lock every page this process has now (mlockall MCL_CURRENT), for a process whose
    key material sits where no :class:`Secret` reaches: a crypt worker, whose ciphers'
    key schedules live in OpenSSL's heap.  Not MCL_FUTURE: under a small RLIMIT_MEMLOCK
    that would make later allocations fail instead of one line saying so."""
    if _libc.mlockall(MCL_CURRENT) != 0:
        _cannot_lock(ctypes.get_errno())


def _lock_pages(buf: bytearray) -> "range | tuple[()]":
    if not len(buf):
        return ()
    start = _address(buf)
    pages = range(start - start % PAGE, start + len(buf), PAGE)
    with _guard:
        for page in pages:
            if not _locked[page] and _libc.mlock(page, PAGE) != 0:
                _cannot_lock(ctypes.get_errno())
            _locked[page] += 1
    return pages


def _unlock_pages(pages: Iterable[int]) -> None:
    with _guard:
        for page in pages:
            _locked[page] -= 1
            if not _locked[page]:
                del _locked[page]
                _libc.munlock(page, PAGE)


def _cannot_lock(error: int) -> None:
    """Say once per process that key material may reach swap (never what it is)."""
    global _warned
    if not _warned:
        _warned = True
        limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        print(f"nbdcrypt: cannot lock key material in RAM ({os.strerror(error)}; RLIMIT_MEMLOCK is "
              f"{limit} bytes): it may reach swap", file=sys.stderr, flush=True)


def _address(buf: bytearray | memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))
