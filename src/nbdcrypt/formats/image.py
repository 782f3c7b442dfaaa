"""The contract of an opened image: what ``info``, ``serve`` and the nbdkit plugin may
ask of a LUKS1, LUKS2 or qcow2 header alike.  :func:`nbdcrypt.formats.open_header`
returns an :class:`Image`; every format's header class declares each member, so no
caller probes for one.  A header holds no secret: :meth:`Image.unlock` returns the
master key to its caller, who hands it to :meth:`Image.open_volume` and wipes it.
"""

from collections.abc import Sequence
from typing import Protocol

from nbdcrypt.crypto.spec import CipherSpec
from nbdcrypt.datapath.device import BlockDevice
from nbdcrypt.datapath.queueing import CryptPath
from nbdcrypt.storage.store import Store

Passphrase = bytes | bytearray
Key = bytes | bytearray | memoryview  # key material: whoever holds it wipes it


class ImageFile(Protocol):
    """A header's file as a reader uses it.  ``fileno`` raises OSError
    (io.UnsupportedOperation) for a file that is none on disk."""

    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def read(self, size: int = ..., /) -> bytes: ...

    def fileno(self) -> int: ...


class Image(Protocol):
    @property
    def name(self) -> str:
        """The image, for messages only."""

    @property
    def cipher_spec(self) -> CipherSpec | None:
        """The payload's cipher; None for an unencrypted qcow2 image."""

    @property
    def key_bytes(self) -> int | None:
        """The master key's length: 0 unencrypted, None unknown (a LUKS2 header
        without keyslots)."""

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the reader found wrong but could live with (LUKS2: a damaged or stale copy)."""

    @property
    def backing_file(self) -> str | None:
        """The backing file's name as the header stores it (qcow2 only; None: none)."""

    def info(self) -> dict[str, object]:
        """What ``nbdcrypt info`` shows (JSON values, no secrets); ``"format"`` names
        the format."""

    def payload_size(self, data_size: int) -> int:
        """Plaintext bytes served from a data file of ``data_size`` bytes."""

    def unlock(self, passphrase: Passphrase, f: ImageFile, slot: int | None = None) -> bytearray:
        """The master key (a Secret to wipe) that ``passphrase`` opens, trying only LUKS
        keyslot ``slot`` if given; the header's file is ``f``."""

    def check_master_key(self, key: Key) -> None:
        """Raise unless ``key`` is this image's master key (e.g. one handed over)."""

    def open_volume(self, store: Store, key: Key, path: CryptPath | None = None, backing_keys: Key = b"",
                    backing_dirs: Sequence[str] = ()) -> BlockDevice:
        """The plaintext block device on the data file ``store``, with master key ``key``,
        on the export's queueing layer ``path`` (default: a new one).  ``backing_keys``
        are those of the encrypted qcow2 backing files (a LUKS image refuses any), which
        may lie in ``backing_dirs``."""
