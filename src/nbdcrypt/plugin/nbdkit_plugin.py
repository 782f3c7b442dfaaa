"""The script nbdkit loads: ``nbdkit python nbdkit_plugin.py image=... master-key-fd=N``.

Each callback is a thin shim over :mod:`nbdcrypt.plugin.export` and the volume;
nbdcrypt errors become the errno the NBD client sees.
"""

import errno
import functools
import traceback

import nbdkit

from nbdcrypt.crypto.secrets import protect_process
from nbdcrypt.errors import NbdcryptError
from nbdcrypt.plugin.export import Export

API_VERSION = 2

# Largest request we accept; nbdkit itself caps data requests at 64 MiB.
MAX_REQUEST = 32 << 20

_export = Export()

# This process will hold the master key (exec reset the dumpable flag serve set for itself).
protect_process()


def _one_line_for_ours(*args, **kwargs):
    """nbdkit logs a failed callback through traceback.format_exception; nbdcrypt's own
    errors are one clear line by design (a corrupt table entry, a store gone away), so
    they are logged as that line, not a stack."""
    error = args[1] if len(args) > 1 else args[0]
    if isinstance(error, NbdcryptError):
        return [str(error)]
    return _format_exception(*args, **kwargs)


_format_exception, traceback.format_exception = traceback.format_exception, _one_line_for_ours


def _errno_on_failure(callback):
    @functools.wraps(callback)
    def wrapper(*args):
        try:
            return callback(*args)
        except NbdcryptError as e:
            nbdkit.set_error(e.errno)
            raise
        except OSError as e:
            nbdkit.set_error(e.errno or errno.EIO)
            raise
    return wrapper


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    _export.config(key, value)


def config_complete():
    _export.config_complete()


def get_ready():
    _export.open_volume()


def cleanup():
    _export.close()


def open(readonly):
    return _export.volume


def get_size(volume):
    return volume.size


def block_size(volume):
    return 1, max(4096, volume.sector_size), MAX_REQUEST


def can_write(volume):
    return not volume.readonly


def can_flush(volume):
    return True


def can_fua(volume):
    return nbdkit.FUA_NATIVE


def can_zero(volume):
    return True


def can_fast_zero(volume):
    # Zeroing means encrypting zeros: never faster than writing.
    return False


def can_trim(volume):
    # qcow2 frees discarded clusters; a LUKS payload has nothing to free.
    return hasattr(volume, "trim")


def can_extents(volume):
    # qcow2 knows its holes and zero clusters; LUKS payloads are all data.
    return hasattr(volume, "extents")


@_errno_on_failure
def extents(volume, count, offset, flags):
    return volume.extents(count, offset)


def can_multi_conn(volume):
    # Every connection shares one store, so a flush on any of them covers all.
    return True


def is_rotational(volume):
    return False


@_errno_on_failure
def pread(volume, buf, offset, flags):
    volume.read(buf, offset)


@_errno_on_failure
def pwrite(volume, buf, offset, flags):
    volume.write(buf, offset, fua=bool(flags & nbdkit.FLAG_FUA))


@_errno_on_failure
def zero(volume, count, offset, flags):
    if flags & nbdkit.FLAG_FAST_ZERO:
        nbdkit.set_error(errno.ENOTSUP)
        raise OSError(errno.ENOTSUP, "fast zero is not supported")
    volume.zero(count, offset, fua=bool(flags & nbdkit.FLAG_FUA))


@_errno_on_failure
def trim(volume, count, offset, flags):
    volume.trim(count, offset, fua=bool(flags & nbdkit.FLAG_FUA))


@_errno_on_failure
def flush(volume, flags):
    volume.flush()
