"""One served export: configuration, opening the image and the master-key handover.

The daemon derives the master key once and hands it to nbdkit over an inherited
pipe (``master-key-fd=N``), so no NBD connection ever re-runs the key derivation
and no secret appears on a command line.  Used directly from nbdkit, the plugin
also accepts ``key-file=PATH`` holding the passphrase.
"""

import os
from collections.abc import Sequence
from typing import Any, BinaryIO

from ..crypto.secrets import MAX_KEY_FILE, Secret, joined, read_secret, wipe
from ..datapath.device import BlockDevice
from ..datapath.queueing import CryptPath
from ..datapath.settings import SETTINGS
from ..errors import InputError
from ..formats import Image, open_header
from ..formats.qcow2.backing import backing_key_bytes, unlock_backing
from ..storage.store import Store, StoreFile, is_uri, open_store
from .control_server import ControlServer
from .metrics import MetricsServer

PARAMETERS = {
    "image": "the encrypted image file (required)",
    "header": "a detached LUKS header file",
    "master-key-fd": "file descriptor to read the master key from (the daemon's handover), "
                     "followed by those of encrypted qcow2 backing files",
    "key-file": "file holding the passphrase (when run without the daemon)",
    "backing-key-file": "file holding the passphrase of an encrypted qcow2 backing file (with key-file; "
                        "repeat for each, nearest first)",
    "backing-dir": "a directory qcow2 backing files may lie in besides the image's own (repeatable)",
    "readonly": "true to open the image read-only",
    "control": "Unix socket for runtime control and statistics (nbdcrypt ctl)",
    "metrics": "Prometheus metrics over HTTP: a Unix socket PATH, a PORT on 127.0.0.1, or HOST:PORT",
    **{s.name: f"{s.help} ({s.values})" for s in SETTINGS},
}
REPEATABLE = ("backing-key-file", "backing-dir")

HeaderFile = BinaryIO | StoreFile


class Export:
    """Collects nbdkit's ``key=value`` parameters, then opens the volume once."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}  # a list of strings for REPEATABLE keys, else a string
        self.volume: BlockDevice | None = None
        self.control: ControlServer | None = None
        self.metrics: MetricsServer | None = None

    def config(self, key: str, value: str) -> None:
        if key not in PARAMETERS:
            raise InputError(f"unknown parameter {key}; known: {', '.join(PARAMETERS)}")
        if key in REPEATABLE:
            self.params.setdefault(key, []).append(value)
        else:
            self.params[key] = value

    def config_complete(self) -> None:
        if "image" not in self.params:
            raise InputError("image=PATH is required")
        if ("master-key-fd" in self.params) == ("key-file" in self.params):
            raise InputError("give exactly one of master-key-fd=N or key-file=PATH")
        if "backing-key-file" in self.params and "key-file" not in self.params:
            raise InputError("backing-key-file=PATH goes with key-file=PATH (the daemon sends both keys)")

    def open_volume(self) -> BlockDevice:
        """Open store and header, obtain the master key and build the volume."""
        readonly = self.params.get("readonly", "false").lower() in ("true", "1", "yes", "on")
        store = open_store(self.params["image"], readonly=readonly)
        with header_file(self.params["image"], self.params.get("header"), store) as f:
            header = open_header(f, self.params.get("header", self.params["image"]))
            key, backing_keys = self._master_keys(header, f)
        path = CryptPath()  # one queueing layer for the image and its whole backing chain
        try:
            self.volume = header.open_volume(store, key, path=path, backing_keys=backing_keys,
                                             backing_dirs=self._backing_dirs())
        finally:
            wipe(key)
            wipe(backing_keys)
        settings = {s.name: self.params[s.name] for s in SETTINGS if s.name in self.params}
        path.configure(settings)
        if "metrics" in self.params:
            self.metrics = MetricsServer(self.params["metrics"], path)
        if "control" in self.params:
            details = header.info()
            info = {"image": self.params["image"], "size": self.volume.size,
                    "format": details["format"], "cipher": details["cipher"]}
            if self.metrics is not None:
                info["metrics"] = self.metrics.address
            self.control = ControlServer(self.params["control"], path, lambda: info)
        return self.volume

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.volume is not None:
            self.volume.close()

    def _master_keys(self, header: Image, f: HeaderFile) -> tuple[Secret, Secret]:
        """(the image's master key, those of its encrypted backing files)."""
        image = self.params["image"]
        if "key-file" in self.params:
            backing = [_read_file(path) for path in self.params.get("backing-key-file", [])]
            keys = unlock_all(header, f, image, _read_file(self.params["key-file"]), backing,
                              backing_dirs=self._backing_dirs())
            return split_keys(header, image, keys, self._backing_dirs())
        handover = _read_handover(int(self.params["master-key-fd"]))
        key, backing_keys = split_keys(header, image, handover, self._backing_dirs())
        header.check_master_key(key)
        return key, backing_keys

    def _backing_dirs(self) -> Sequence[str]:
        return self.params.get("backing-dir", ())


def unlock_all(header: Image, f: HeaderFile, image: str, passphrase: bytes | bytearray,
               backing_passphrases: Sequence[bytes | bytearray] = (), key_slot: int | None = None,
               backing_dirs: Sequence[str] = ()) -> Secret:
    """The master keys ``image`` needs, as the daemon hands them over: its own (from
    LUKS keyslot ``key_slot`` only, if given), then those of its encrypted qcow2
    backing files, which may lie in ``backing_dirs`` (unlocked first, so a missing
    backing key fails before the image's key derivation).  One bytearray to wipe."""
    backing = unlock_backing(header, image, backing_passphrases, backing_dirs)
    try:
        key = header.unlock(passphrase, f, key_slot)
    except BaseException:
        wipe(backing)
        raise
    return joined([key, backing])


def split_keys(header: Image, image: str, keys: Secret, backing_dirs: Sequence[str] = ()) -> tuple[Secret, Secret]:
    """(master key, backing keys) from what :func:`unlock_all` returned (which is wiped)."""
    cut = len(keys) - backing_key_bytes(header, image, backing_dirs)
    if cut <= 0:
        wipe(keys)
        raise InputError(f"{image}: the master key handover is too short")
    with memoryview(keys) as view:
        key, backing = Secret(view[:cut]), Secret(view[cut:])
    wipe(keys)
    return key, backing


def _read_file(path: str) -> Secret:
    with _open(path) as f:
        return read_secret(f.fileno(), MAX_KEY_FILE)


def header_file(image: str, header: str | None, store: Store) -> HeaderFile:
    """The file to read the LUKS header from: the detached header, the image file,
    or (for an image behind NBD) the store itself."""
    if header:
        return _open(header)
    return StoreFile(store) if is_uri(image) else _open(image)


def _open(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory") from None


def _read_handover(fd: int) -> Secret:
    """The keys the daemon wrote to the pipe ``fd``, read straight into a Secret; ``fd`` is closed."""
    try:
        return read_secret(fd, MAX_KEY_FILE)
    finally:
        os.close(fd)
