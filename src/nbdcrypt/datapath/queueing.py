"""The queueing layer: where a request's crypto and I/O run, as dm-crypt decides it.

dm-crypt hands a bio's crypto to the kcryptd workqueue and its writes to one
dmcrypt_write thread that sorts them by sector; Cloudflare found those hops doubled
latency and added ``no_read_workqueue`` / ``no_write_workqueue`` (Linux 5.9).  The
same four flags, with the same names and defaults (all off), choose the path here::

    read,  no_read_workqueue:   request thread: pread -> decrypt
    read,  queued:              request thread: pread; worker: decrypt
    write, no_write_workqueue:  request thread: encrypt -> pwrite
    write, queued:              worker: encrypt; writer thread: sort by offset -> pwrite
    write, queued + submit_from_crypt_cpus:   worker: encrypt -> pwrite
    same_cpu_crypt:             the worker pinned to the submitting CPU, not any free one

The request thread always waits for its request to finish before nbdkit replies,
so an acknowledged write is in the file.  Every request reads the settings once
when it starts: a switch takes effect for the next request while in-flight ones
finish on the path they started on (the pools keep running), so nothing drains
or drops.  Workers are threads by default, or processes (``worker_type``):
:mod:`nbdcrypt.datapath.workers`; docs/queueing.md has the measurements.
"""

from __future__ import annotations

import ctypes
import threading
import time
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING, cast

from ..errors import InputError
from .settings import Settings
from .stats import Stats, Timing
from .throttle import Throttle
from .workers import CipherRecipe, ProcessWorkers, ThreadWorkers

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from ..crypto.engine import SectorCipher
    from ..storage.store import Store

_libc = ctypes.CDLL(None, use_errno=True)


def current_cpu() -> int:
    return _libc.sched_getcpu()


class Request(Timing):
    """One NBD request: counted, throttled and timed, on the settings of its start, and
    on the path those give its size.  A context manager class rather than a generator:
    one is made per request."""

    __slots__ = ("_path", "_direction", "_nbytes", "_start", "settings", "inline_reads", "inline_writes")

    def __init__(self, path: CryptPath, direction: str, nbytes: int) -> None:
        super().__init__()
        self._path, self._direction, self._nbytes = path, direction, nbytes

    def __enter__(self):
        path, nbytes = self._path, self._nbytes
        self.settings = settings = path.settings
        self.inline_reads = settings.inline("read", nbytes)
        self.inline_writes = settings.inline("write", nbytes)
        path.stats.started(self._direction)
        self._start = time.perf_counter()
        if settings.throttle_bps or settings.throttle_ops:
            self.phases["throttle"] = path._throttle.wait(nbytes)
        path._current.request = self

    def __exit__(self, kind, error, trace):
        self._path._current.request = None
        self.phases["total"] = time.perf_counter() - self._start
        inline = self.inline_reads if self._direction == "read" else self.inline_writes
        self._path.stats.finished(self._direction, "inline" if inline else "queued", self._nbytes, self.phases,
                                  ok=kind is None)


# A request opened inside another (a volume calling itself, or its backing file) is part of it.
_PART_OF_ONE = nullcontext()


class _Current(threading.local):
    """The request this thread is serving (None between requests)."""

    request: Request | None = None


class CryptPath:
    """Reads and writes sectors of stores through ciphers on the configured path.

    One per export: every layer of a qcow2 backing chain goes through it, so all
    share its pools, settings, throttle and statistics.  Each call names its
    ``cipher`` (``encrypt(buf, sector)`` / ``decrypt(buf, sector)``; None: the data
    is stored in the clear, as in an unencrypted qcow2 file) and its ``store``
    (``read_into`` and ``write``).  :meth:`read` and :meth:`write` run inside
    :meth:`request`, which the volume opens once per NBD request.  Thread-safe.
    Worker processes need each cipher's key: :meth:`register`.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        settings = Settings() if settings is None else settings
        self.stats = Stats()
        self._settings = settings
        self._recipes: tuple[CipherRecipe, ...] = ()
        self._throttle = Throttle(settings.throttle_bps, settings.throttle_ops)
        self._pool = self._new_pool(settings)
        self._cpu_pools: dict[int, ThreadWorkers | ProcessWorkers] = {}
        self._writer = SortedWriter()
        self._lock = threading.Lock()  # held only to pick a pool or swap one
        self._configuring = threading.Lock()
        self._current = _Current()

    @property
    def settings(self) -> Settings:
        return self._settings

    def register(self, cipher: SectorCipher | None, key: Buffer) -> None:
        """Keep a copy of ``cipher``'s key, so worker processes can serve it (now or on
        a later ``worker_type=process``); running worker processes are replaced by ones
        that know it too.  :meth:`close` wipes the copies."""
        if cipher is None:
            return
        with self._configuring:
            recipes = self._recipes
            self._recipes = (*recipes, CipherRecipe(cipher, key))
            try:
                process = self._settings.worker_type == "process"
                self._switch(self._settings, new_pool=process, new_cpu_pools=process)
            except BaseException:
                self._recipes[-1].wipe()
                self._recipes = recipes
                raise

    def configure(self, changes: dict[str, object]) -> Settings:
        """Apply changes (name -> value) for the next request; returns the new settings.
        A new pool (other size or type) replaces the old one, which finishes the jobs
        it holds; it is started before anything changes, so a failure changes nothing."""
        with self._configuring:
            old = self._settings
            new = old.updated(changes)
            if new.workers < 1:
                raise InputError("workers must be at least 1")
            self._switch(new, new_pool=(new.workers, new.worker_type) != (old.workers, old.worker_type),
                         new_cpu_pools=new.worker_type != old.worker_type)
            return new

    def worker_pids(self) -> list[int]:
        """The worker processes' pids (none with threads)."""
        with self._lock:
            pools = [self._pool, *self._cpu_pools.values()]
        return sorted(pid for pool in pools for pid in pool.pids())

    def request(self, direction: str, nbytes: int) -> Request | nullcontext[None]:
        """``with path.request(direction, nbytes):`` around each NBD request (a
        :class:`Request`); :meth:`read` and :meth:`write` run inside one."""
        return _PART_OF_ONE if self._current.request is not None else Request(self, direction, nbytes)

    def read(self, cipher: SectorCipher | None, store: Store, buf: Buffer, offset: int, sector: int) -> None:
        """Fill ``buf`` with the plaintext of the sectors stored at ``offset``."""
        request = cast(Request, self._current.request)  # we run inside request()
        request.time("io", store.read_into, buf, offset)
        if cipher is None:
            return
        if request.inline_reads:
            request.time("crypto", cipher.decrypt, buf, sector)
        else:
            self._queue(request, cipher, False, buf, sector)

    def write(self, cipher: SectorCipher | None, store: Store, buf: Buffer, offset: int, sector: int,
              fua: bool = False) -> None:
        """Encrypt ``buf`` (a scratch buffer, changed in place) and store it at ``offset``."""
        request = cast(Request, self._current.request)  # we run inside request()
        if cipher is not None and request.inline_writes:
            request.time("crypto", cipher.encrypt, buf, sector)
        if cipher is None or request.inline_writes:
            request.time("io", store.write, buf, offset, fua)
        elif request.settings.submit_from_crypt_cpus:
            self._queue(request, cipher, True, buf, sector,
                        then=lambda: request.time("io", store.write, buf, offset, fua))
        else:
            self._queue(request, cipher, True, buf, sector)
            request.time("io", self._writer.write, store, buf, offset, fua)

    def close(self) -> None:
        """Stop the workers and wipe the keys; again is harmless (every volume on the
        path closes it)."""
        self._writer.close()
        for pool in [self._pool, *self._cpu_pools.values()]:
            pool.close(wait=True)
        for recipe in self._recipes:
            recipe.wipe()

    def _switch(self, new, new_pool, new_cpu_pools):
        """Serve the next requests with settings ``new``; with ``new_pool`` on a new
        shared pool, with ``new_cpu_pools`` on new pinned ones (made when first used)."""
        pool = self._new_pool(new) if new_pool else None
        with self._lock:
            retired = []
            if pool is not None:
                retired, self._pool = [self._pool], pool
            if new_cpu_pools:
                retired += self._cpu_pools.values()
                self._cpu_pools = {}
            self._throttle.set_rates(new.throttle_bps, new.throttle_ops)
            self._settings = new
        for old_pool in retired:
            old_pool.retire()

    def _queue(self, request, cipher, encrypt, buf, sector, then=None):
        """Encrypt or decrypt ``buf`` on a crypt worker, then call ``then()`` (on the
        worker's side), and wait for both."""
        with self._lock:  # not while configure() swaps the pool
            pool = self._pool_for(request.settings)
            pool.enter()
        pool.run(request, cipher, encrypt, buf, sector, then)

    def _pool_for(self, settings):
        """The shared pool, or the submitting CPU's own pinned worker (lock held)."""
        if not settings.same_cpu_crypt:
            return self._pool
        cpu = current_cpu()
        if cpu not in self._cpu_pools:
            self._cpu_pools[cpu] = self._new_pool(replace(self._settings, workers=1), cpu)
        return self._cpu_pools[cpu]

    def _new_pool(self, settings, cpu=None):
        if settings.worker_type == "thread":
            return ThreadWorkers(settings.workers, cpu)
        if not self._recipes:
            raise InputError("worker processes need the key: register(cipher, key) first")
        return ProcessWorkers(self._recipes, settings.workers, cpu, self.stats.count_worker_restart)


class SortedWriter:
    """dm-crypt's dmcrypt_write: one thread that issues pending writes in offset order."""

    def __init__(self):
        self._pending = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = None

    def write(self, store: Store, buf: Buffer, offset: int, fua: bool = False) -> None:
        """Queue a write to ``store`` and wait until the writer thread has issued it."""
        done: Future[None] = Future()
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dmcrypt_write", daemon=True)
                self._thread.start()
            self._pending.append((offset, store, buf, fua, done))
            self._cond.notify()
        done.result()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                batch, self._pending = sorted(self._pending, key=lambda w: w[0]), []
                if not batch and self._closed:
                    return
            for offset, store, buf, fua, done in batch:
                try:
                    store.write(buf, offset, fua)
                    done.set_result(None)
                except Exception as e:  # handed to the waiting request thread
                    done.set_exception(e)
