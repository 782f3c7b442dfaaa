"""Compressed clusters: raw deflate (QEMU's default) or zstd (compression type 1).

QEMU never compresses clusters of encrypted images, so compressed data is plaintext.
"""

import zlib

from nbdcrypt.errors import FormatError, UnsupportedError

ZLIB, ZSTD = 0, 1


def decompress(data, cluster_size, compression_type, name="image"):
    """One cluster's plaintext from its compressed bytes (which may carry trailing junk:
    the L2 entry rounds the length up to whole sectors)."""
    try:
        if compression_type == ZLIB:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        else:
            out = _zstd().ZstdDecompressor().decompressobj().decompress(data)[:cluster_size]
    except zlib.error as e:
        raise FormatError(f"{name}: corrupt compressed cluster: {e}") from None
    if len(out) != cluster_size:
        raise FormatError(f"{name}: compressed cluster holds {len(out)} of {cluster_size} bytes")
    return out


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise UnsupportedError("zstd-compressed qcow2 clusters need the python zstandard package") from None
    return zstandard
