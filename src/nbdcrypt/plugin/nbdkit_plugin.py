"""The script nbdkit loads: ``nbdkit python nbdkit_plugin.py image=... master-key-fd=N``.

Each callback is a thin shim over :mod:`nbdcrypt.plugin.export` and the volume;
nbdcrypt errors become the errno the NBD client sees.
"""

import errno
import functools
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import nbdkit

from nbdcrypt.crypto.secrets import protect_process
from nbdcrypt.datapath.device import BlockDevice, Extent
from nbdcrypt.errors import NbdcryptError
from nbdcrypt.plugin.export import Export

if TYPE_CHECKING:
    from typing_extensions import Buffer  # typeshed's; not needed at run time

    from nbdcrypt.datapath.volume import Volume
    from nbdcrypt.formats.qcow2.volume import Qcow2Volume

    # mypy holds every volume a format opens to the contract the callbacks rely on.
    _SERVED: tuple[type[BlockDevice], ...] = (Volume, Qcow2Volume)

API_VERSION = 2

# Largest request we accept; nbdkit itself caps data requests at 64 MiB.
MAX_REQUEST = 32 << 20

_export = Export()

# This process will hold the master key (exec reset the dumpable flag serve set for itself).
protect_process()


def _one_line_for_ours(*args: Any, **kwargs: Any) -> list[str]:
    """nbdkit logs a failed callback through traceback.format_exception; nbdcrypt's own
    errors are one clear line by design (a corrupt table entry, a store gone away), so
    they are logged as that line, not a stack."""
    error = args[1] if len(args) > 1 else args[0]
    if isinstance(error, NbdcryptError):
        return [str(error)]
    return _format_exception(*args, **kwargs)


_format_exception, traceback.format_exception = traceback.format_exception, _one_line_for_ours


Callback = TypeVar("Callback", bound=Callable[..., Any])


def _errno_on_failure(callback: Callback) -> Callback:
    @functools.wraps(callback)
    def wrapper(*args: Any) -> Any:
        try:
            return callback(*args)
        except NbdcryptError as e:
            nbdkit.set_error(e.errno)
            raise
        except OSError as e:
            nbdkit.set_error(e.errno or errno.EIO)
            raise
    return cast(Callback, wrapper)


def thread_model() -> int:
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key: str, value: str) -> None:
    _export.config(key, value)


def config_complete() -> None:
    _export.config_complete()


def get_ready() -> None:
    _export.open_volume()


def cleanup() -> None:
    _export.close()


def open(readonly: bool) -> BlockDevice | None:
    return _export.volume


def get_size(volume: BlockDevice) -> int:
    return volume.size


def block_size(volume: BlockDevice) -> tuple[int, int, int]:
    return 1, max(4096, volume.sector_size), MAX_REQUEST


def can_write(volume: BlockDevice) -> bool:
    return not volume.readonly


def can_flush(volume: BlockDevice) -> bool:
    return True


def can_fua(volume: BlockDevice) -> int:
    return nbdkit.FUA_NATIVE


def can_zero(volume: BlockDevice) -> bool:
    return True


def can_fast_zero(volume: BlockDevice) -> bool:
    # Zeroing means encrypting zeros: never faster than writing.
    return False


def can_trim(volume: BlockDevice) -> bool:
    return volume.can_trim


def can_extents(volume: BlockDevice) -> bool:
    return volume.can_extents


@_errno_on_failure
def extents(volume: BlockDevice, count: int, offset: int, flags: int) -> list[Extent]:
    return volume.extents(count, offset)


def can_multi_conn(volume: BlockDevice) -> bool:
    # Every connection shares one store, so a flush on any of them covers all.
    return True


def is_rotational(volume: BlockDevice) -> bool:
    return False


@_errno_on_failure
def pread(volume: BlockDevice, buf: "Buffer", offset: int, flags: int) -> None:
    volume.read(buf, offset)


@_errno_on_failure
def pwrite(volume: BlockDevice, buf: "Buffer", offset: int, flags: int) -> None:
    volume.write(buf, offset, fua=bool(flags & nbdkit.FLAG_FUA))


@_errno_on_failure
def zero(volume: BlockDevice, count: int, offset: int, flags: int) -> None:
    if flags & nbdkit.FLAG_FAST_ZERO:
        nbdkit.set_error(errno.ENOTSUP)
        raise OSError(errno.ENOTSUP, "fast zero is not supported")
    volume.zero(count, offset, fua=bool(flags & nbdkit.FLAG_FUA))


@_errno_on_failure
def trim(volume: BlockDevice, count: int, offset: int, flags: int) -> None:
    volume.trim(count, offset, fua=bool(flags & nbdkit.FLAG_FUA))


@_errno_on_failure
def flush(volume: BlockDevice, flags: int) -> None:
    volume.flush()
