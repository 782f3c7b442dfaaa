"""One served export: configuration, opening the image and the master-key handover.

The daemon derives the master key once and hands it to nbdkit over an inherited
pipe (``master-key-fd=N``), so no NBD connection ever re-runs the key derivation
and no secret appears on a command line.  Used directly from nbdkit, the plugin
also accepts ``key-file=PATH`` holding the passphrase.
"""

import os
from dataclasses import fields

from ..errors import InputError
from ..formats import open_header
from .control_server import ControlServer
from .queueing import Settings
from .store import StoreFile, is_uri, open_store

PARAMETERS = {
    "image": "the encrypted image file (required)",
    "header": "a detached LUKS header file",
    "master-key-fd": "file descriptor to read the master key from (the daemon's handover)",
    "key-file": "file holding the passphrase (when run without the daemon)",
    "readonly": "true to open the image read-only",
    "control": "Unix socket for runtime control and statistics (nbdcrypt ctl)",
    **{f.name: "queueing layer setting (see nbdcrypt.plugin.queueing)" for f in fields(Settings)},
}


class Export:
    """Collects nbdkit's ``key=value`` parameters, then opens the volume once."""

    def __init__(self):
        self.params = {}
        self.volume = None
        self.control = None

    def config(self, key, value):
        if key not in PARAMETERS:
            raise InputError(f"unknown parameter {key}; known: {', '.join(PARAMETERS)}")
        self.params[key] = value

    def config_complete(self):
        if "image" not in self.params:
            raise InputError("image=PATH is required")
        if ("master-key-fd" in self.params) == ("key-file" in self.params):
            raise InputError("give exactly one of master-key-fd=N or key-file=PATH")

    def open_volume(self):
        """Open store and header, obtain the master key and build the volume."""
        readonly = self.params.get("readonly", "false").lower() in ("true", "1", "yes", "on")
        store = open_store(self.params["image"], readonly=readonly)
        with header_file(self.params["image"], self.params.get("header"), store) as f:
            header = open_header(f, self.params.get("header", self.params["image"]))
            key = self._master_key(header, f)
        try:
            self.volume = header.open_volume(store, key)
        finally:
            _wipe(key)
        settings = {f.name: self.params[f.name] for f in fields(Settings) if f.name in self.params}
        self.volume.path.configure(settings)
        if "control" in self.params:
            details = header.info()
            info = {"image": self.params["image"], "size": self.volume.size,
                    "format": details["format"], "cipher": details["cipher"]}
            self.control = ControlServer(self.params["control"], self.volume, lambda: info)
        return self.volume

    def close(self):
        if self.control is not None:
            self.control.close()
        if self.volume is not None:
            self.volume.close()

    def _master_key(self, header, f):
        if "key-file" in self.params:
            with open(self.params["key-file"], "rb") as kf:
                return bytearray(header.unlock(kf.read(), f))
        key = bytearray(read_all(int(self.params["master-key-fd"])))
        header.check_master_key(bytes(key))
        return key


def header_file(image, header, store):
    """The file to read the LUKS header from: the detached header, the image file,
    or (for an image behind NBD) the store itself."""
    if header:
        return _open(header)
    return StoreFile(store) if is_uri(image) else _open(image)


def _open(path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory") from None


def read_all(fd):
    """Read a pipe to its end and close it."""
    chunks = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _wipe(buf):
    buf[:] = bytes(len(buf))
