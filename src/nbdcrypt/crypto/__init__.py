"""Cipher specs, the sector-cipher engine, key derivation and the AF splitter."""


def wipe(buf):
    """Overwrite the key material in the bytearray ``buf`` with zeros."""
    buf[:] = bytes(len(buf))
