"""Cipher specs, the sector-cipher engine, key derivation and the AF splitter."""

from nbdcrypt.crypto.secrets import wipe  # noqa: F401  the one wipe helper, for the formats
