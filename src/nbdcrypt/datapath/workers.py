"""Crypt workers for the queueing layer: threads of this process, or worker processes.

A pool encrypts or decrypts one request's buffer in place with the cipher the
request names (one export serves every layer of a qcow2 backing chain, each with
its own key), then makes a follow-up call (the write, with submit_from_crypt_cpus),
for :class:`nbdcrypt.datapath.queueing.CryptPath`, which waits for both.  Threads
use the request's cipher object: the engine spends large requests inside OpenSSL
and numpy with the GIL released (docs/queueing.md has the measurements).

Worker processes (``worker_type=process``) run ``python3 -m nbdcrypt.datapath.workers``
with two inherited descriptors: one end of a SOCK_SEQPACKET socket pair, and a memfd
that both sides map, the *slot*, which holds the request's data, so no data is
pickled or sent through the socket.  The parameters of every cipher the pool
serves arrive as the socket's first message, then their keys, one message each,
never on the command line or in the environment; the worker makes itself
undumpable, without core dumps and killed with its parent before it reads them,
and wipes its copy of each key once the cipher is built.  Then each request
message (encrypt?, cipher index, length, first sector) transforms the first
``length`` bytes of the slot in place and the reply carries the crypto time or an
error.  Requests longer than the slot go through it in pieces.

A worker that dies fails the request it was serving with EIO (its socket reads
end-of-file), and the thread that waits for its exit starts a replacement.
"""

import ctypes
import errno
import functools
import json
import mmap
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NoReturn, TypedDict

from ..crypto.engine import SectorCipher
from ..crypto.secrets import Secret, lock_all_memory, protect_process, wipe
from ..crypto.spec import CipherSpec
from ..errors import NbdcryptError, StoreError, UnsupportedError

if TYPE_CHECKING:
    from typing_extensions import Buffer  # typeshed's; not needed at run time

    from .stats import Timing

MODULE = "nbdcrypt.datapath.workers"
SLOT = 4 << 20  # shared memory per worker process; a multiple of every sector size
START_TIMEOUT = 60.0  # for a new worker to import its modules and build its cipher
WAIT_TIMEOUT = 60.0  # for a free worker, before a request fails with EIO
PROBE_SECTOR = (1 << 40) + 3  # far out, so IV options show in the ciphertext
PR_SET_PDEATHSIG = 1

_REQUEST = struct.Struct("=?HIQ")  # encrypt, cipher index, length, first sector
_REPLY = struct.Struct("=?d")  # ok, crypto seconds; when not ok an error message follows
_MAX_MESSAGE = 4096
_libc = ctypes.CDLL(None, use_errno=True)

# Every worker process is forked by this one long-lived thread: PR_SET_PDEATHSIG
# fires when the *thread* that forked a child ends, and nbdkit's request threads
# and the control server's come and go.
_spawner = ThreadPoolExecutor(1, thread_name_prefix="nbdcrypt-spawn")


class _Pool(ABC):
    """A pool serves requests until retired, then closes once the last has left."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._retired = False

    def enter(self) -> None:
        """Count a request in.  Call it under the lock that chose this pool, so a
        retire() cannot close the pool in between; :meth:`run` counts it out."""
        with self._lock:
            self._users += 1

    def run(self, timing: "Timing", cipher: SectorCipher, encrypt: bool, buf: "Buffer", sector: int,
            then: Callable[[], None] | None = None) -> None:
        """Encrypt (or decrypt) ``buf`` in place with ``cipher`` on a worker, then call
        ``then()``; return when both are done.  Adds the queue and crypto phases to ``timing``."""
        try:
            self._run(timing, cipher, encrypt, buf, sector, then)
        finally:
            with self._lock:
                self._users -= 1
                last = self._retired and not self._users
            if last:
                self.close(wait=False)

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            idle = not self._users
        if idle:
            self.close(wait=False)

    def pids(self) -> list[int]:
        return []

    @abstractmethod
    def close(self, wait: bool = True) -> None:
        """Stop the workers; with ``wait``, wait until they have."""

    @abstractmethod
    def _run(self, timing: "Timing", cipher: SectorCipher, encrypt: bool, buf: "Buffer", sector: int,
             then: Callable[[], None] | None) -> None:
        """What :meth:`run` does, without the counting."""


class ThreadWorkers(_Pool):
    """``count`` threads; with ``cpu``, pinned to that CPU."""

    def __init__(self, count: int, cpu: int | None = None) -> None:
        super().__init__()
        pin = None if cpu is None else functools.partial(os.sched_setaffinity, 0, {cpu})
        self._executor = ThreadPoolExecutor(
            count, thread_name_prefix="kcryptd" if cpu is None else f"kcryptd/{cpu}", initializer=pin)

    def _run(self, timing: "Timing", cipher: SectorCipher, encrypt: bool, buf: "Buffer", sector: int,
             then: Callable[[], None] | None) -> None:
        submitted = time.perf_counter()

        def job() -> None:
            timing.add("queue", time.perf_counter() - submitted)
            timing.time("crypto", cipher.encrypt if encrypt else cipher.decrypt, buf, sector)
            if then is not None:
                then()

        self._executor.submit(job).result()

    def close(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait)


class ProcessWorkers(_Pool):
    """``count`` worker processes with the ciphers of ``recipes``; with ``cpu``, pinned
    to that CPU.  ``on_restart()`` is called for each one that died and was replaced.
    The request thread hands its buffer to a free worker itself; then() runs there."""

    def __init__(self, recipes: Iterable["CipherRecipe"], count: int, cpu: int | None = None,
                 on_restart: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self._recipes, self._cpu, self._on_restart = tuple(recipes), cpu, on_restart
        self._index = {id(recipe.cipher): i for i, recipe in enumerate(self._recipes)}
        self._idle: queue.SimpleQueue[_WorkerProcess] = queue.SimpleQueue()
        self._live: set[_WorkerProcess] = set()
        starting = []
        try:
            for _ in range(count):  # spawn all first: they import their modules in parallel
                starting.append(_WorkerProcess(self._recipes, cpu))
            for worker in starting:
                worker.handshake()
        except BaseException:
            for worker in starting:
                worker.abort()
            raise
        for worker in starting:
            self._serve(worker)

    def pids(self) -> list[int]:
        with self._lock:
            return [worker.pid for worker in self._live]

    def close(self, wait: bool = True) -> None:
        """Close every idle worker's socket, so it exits; with ``wait``, wait for that."""
        with self._lock:
            self._retired = True
            live = list(self._live)
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break
        if wait:
            for worker in live:
                worker.process.wait()

    def _run(self, timing: "Timing", cipher: SectorCipher, encrypt: bool, buf: "Buffer", sector: int,
             then: Callable[[], None] | None) -> None:
        index = self._index.get(id(cipher))
        if index is None:
            raise StoreError("this cipher's key was not registered for worker processes", errno.EIO)
        start = time.perf_counter()
        worker = self._acquire()
        try:
            crypto = worker.crypt(index, encrypt, buf, sector)
        finally:
            if worker.dead:
                worker.close()
            else:
                self._idle.put(worker)
        timing.add("crypto", crypto)
        timing.add("queue", time.perf_counter() - start - crypto)  # waiting, copies and hand-offs
        if then is not None:
            then()

    def _acquire(self) -> "_WorkerProcess":
        deadline = time.monotonic() + WAIT_TIMEOUT
        while True:
            try:
                worker = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise StoreError(f"no crypt worker process was free for {WAIT_TIMEOUT:.0f} s", errno.EIO) from None
            if not worker.dead:
                return worker
            worker.close()  # died while idle; its watcher is starting another

    def _serve(self, worker: "_WorkerProcess") -> None:
        """Put a ready worker to work, watched until it exits."""
        with self._lock:
            if self._retired:
                worker.abort()
                return
            self._live.add(worker)
            self._idle.put(worker)  # under the lock: close() either sees it or comes first
        threading.Thread(target=self._watch, args=(worker,), name=f"nbdcrypt-watch/{worker.pid}",
                         daemon=True).start()

    def _watch(self, worker: "_WorkerProcess") -> None:
        status = worker.process.wait()
        worker.dead = True
        with self._lock:
            self._live.discard(worker)
            if self._retired:
                return
        self._on_restart()
        cause = f"killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
        print(f"nbdcrypt: crypt worker process {worker.pid} {cause}; starting another",
              file=sys.stderr, flush=True)
        replacement = self._replacement()
        if replacement is not None:
            self._serve(replacement)

    def _replacement(self) -> "_WorkerProcess | None":
        """A new ready worker (None if the pool closes first); starting is retried
        every second while it fails (requests wait meanwhile, up to WAIT_TIMEOUT)."""
        while not self._retired:
            worker = None
            try:
                worker = _WorkerProcess(self._recipes, self._cpu)
                worker.handshake()
                return worker
            except NbdcryptError as e:
                if worker is not None:
                    worker.abort()
                print(f"nbdcrypt: {e}", file=sys.stderr, flush=True)
                time.sleep(1.0)
        return None


class CipherParams(TypedDict):
    """A cipher as a worker process rebuilds it (sent as JSON), without its key."""

    spec: str
    sector_size: int
    iv_large_sectors: bool
    iv_tweak: int


class CipherRecipe:
    """What a worker process needs to build the same cipher as ``cipher``: its
    parameters and a locked copy of ``key`` (:meth:`wipe` it when done)."""

    def __init__(self, cipher: SectorCipher, key: "Buffer") -> None:
        self.cipher = cipher
        self.params: CipherParams = {"spec": str(cipher.spec), "sector_size": cipher.sector_size,
                       "iv_large_sectors": cipher.iv_large_sectors, "iv_tweak": cipher.iv_tweak}
        self.key = Secret(key)
        if _probe(cipher) != _probe(build_cipher(self.params, self.key)):
            self.wipe()
            raise UnsupportedError(f"cannot rebuild the {cipher.spec} cipher in a worker process")

    def wipe(self) -> None:
        wipe(self.key)


def build_cipher(params: CipherParams, key: bytearray | memoryview) -> SectorCipher:
    return SectorCipher(CipherSpec.parse(params["spec"]), key, params["sector_size"],
                        params["iv_large_sectors"], params["iv_tweak"])


def _probe(cipher: SectorCipher) -> bytearray:
    data = bytearray(bytes(range(256)) * (2 * cipher.sector_size // 256))
    cipher.encrypt(data, PROBE_SECTOR)
    return data


class _WorkerProcess:
    """One worker process as the plugin sees it: its Popen, socket and slot."""

    def __init__(self, recipes: Sequence[CipherRecipe], cpu: int | None = None) -> None:
        self.recipes = recipes
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        slot_fd = os.memfd_create("nbdcrypt-slot")
        try:
            os.ftruncate(slot_fd, SLOT)
            self._slot = mmap.mmap(slot_fd, SLOT)
            command = [_interpreter(), "-P", "-m", MODULE, str(theirs.fileno()), str(slot_fd), str(os.getpid())]
            self.process = _spawner.submit(
                subprocess.Popen, command, pass_fds=(theirs.fileno(), slot_fd), env=_environment(),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).result()
        except OSError as e:
            ours.close()
            raise NbdcryptError(f"cannot start a crypt worker process: {e.strerror or e}") from None
        finally:
            os.close(slot_fd)
            theirs.close()
        self.pid = self.process.pid
        self.dead = False
        self._sock = ours
        self._view = memoryview(self._slot)
        if cpu is not None:
            os.sched_setaffinity(self.pid, {cpu})

    def handshake(self) -> None:
        """Hand over the ciphers and wait until the worker is ready."""
        self._sock.settimeout(START_TIMEOUT)
        try:
            self._send(json.dumps([recipe.params for recipe in self.recipes]).encode())
            for recipe in self.recipes:
                self._send(recipe.key)
            self._reply()
        except (StoreError, TimeoutError) as e:
            raise NbdcryptError(f"crypt worker process {self.pid} did not start: "
                                f"{e if str(e) else 'timed out'}") from None
        finally:
            self._sock.settimeout(None)

    def crypt(self, index: int, encrypt: bool, buf: "Buffer", sector: int) -> float:
        """Encrypt or decrypt ``buf`` in place with cipher ``index`` through the slot;
        the worker's crypto seconds.  StoreError (EIO) on failure; ``dead`` tells if
        the worker is gone."""
        data = memoryview(buf).cast("B")
        sector_size = self.recipes[index].params["sector_size"]
        seconds = 0.0
        for start in range(0, len(data), SLOT):
            piece = data[start:start + SLOT]
            self._view[:len(piece)] = piece
            self._send(_REQUEST.pack(encrypt, index, len(piece), sector + start // sector_size))
            seconds += self._reply()
            piece[:] = self._view[:len(piece)]
        return seconds

    def close(self) -> None:
        """Close our ends: the worker reads end-of-file and exits."""
        self._sock.close()
        self._view.release()
        self._slot.close()

    def abort(self) -> None:
        self.process.kill()
        self.process.wait()
        self.close()

    def _send(self, message: "Buffer") -> None:
        try:
            self._sock.send(message, socket.MSG_NOSIGNAL)
        except ConnectionError:
            self._died()

    def _reply(self) -> float:
        try:
            message = self._sock.recv(_MAX_MESSAGE)
        except ConnectionError:
            message = b""
        if not message:
            self._died()
        ok, seconds = _REPLY.unpack_from(message)
        if not ok:
            error = message[_REPLY.size:].decode(errors="replace")
            raise StoreError(f"crypt worker process {self.pid}: {error}", errno.EIO)
        return seconds

    def _died(self) -> NoReturn:
        self.dead = True
        raise StoreError(f"crypt worker process {self.pid} died", errno.EIO)


def _interpreter() -> str:
    """The Python that nbdkit embeds (inside nbdkit, sys.executable is just the
    first python3 on PATH)."""
    return os.path.join(sys.base_exec_prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")


def _environment() -> dict[str, str]:
    """Only a PYTHONPATH that imports what this interpreter imports."""
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(p for p in sys.path if p and os.path.isdir(p)))}


# The worker process.

def main(sock_fd: int, slot_fd: int, parent: int) -> int:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        return 1  # the parent died before we asked to die with it
    protect_process()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # Sent to the whole process group or cgroup, they are for serve: it stops
        # nbdkit, whose exit ends us (end-of-file, or PR_SET_PDEATHSIG).
        signal.signal(signum, signal.SIG_IGN)
    sock = socket.socket(fileno=sock_fd)
    slot = memoryview(mmap.mmap(slot_fd, SLOT))
    os.close(slot_fd)
    try:
        ciphers = _receive_ciphers(sock)
    except Exception as e:  # reported to the plugin, which reports it
        _answer(sock, False, error=e)
        return 1
    lock_all_memory()  # the ciphers' key schedules, wherever OpenSSL put them
    _answer(sock, True)
    while request := sock.recv(_MAX_MESSAGE):
        encrypt, index, length, sector = _REQUEST.unpack(request)
        start = time.perf_counter()
        try:
            cipher = ciphers[index]
            (cipher.encrypt if encrypt else cipher.decrypt)(slot[:length], sector)
        except Exception as e:  # fails this request with EIO, not the worker
            _answer(sock, False, error=e)
        else:
            _answer(sock, True, time.perf_counter() - start)
    return 0  # end-of-file: the pool closed us, or the plugin is gone


def _receive_ciphers(sock: socket.socket) -> list[SectorCipher]:
    return [_receive_cipher(sock, params) for params in json.loads(sock.recv(_MAX_MESSAGE))]


def _receive_cipher(sock: socket.socket, params: CipherParams) -> SectorCipher:
    key = Secret(_MAX_MESSAGE)
    try:
        size = sock.recv_into(key)
        return build_cipher(params, memoryview(key)[:size])
    finally:
        wipe(key)


def _answer(sock: socket.socket, ok: bool, seconds: float = 0.0, error: BaseException | None = None) -> None:
    message = "" if error is None else str(error) or type(error).__name__
    sock.send(_REPLY.pack(ok, seconds) + message.encode()[:1024])


if __name__ == "__main__":
    sys.exit(main(*map(int, sys.argv[1:4])))
