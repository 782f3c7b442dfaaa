"""Compressed clusters: raw deflate (QEMU's default) or zstd (compression type 1).

QEMU never compresses clusters of encrypted images, so compressed data is plaintext.
The L2 entry rounds a compressed cluster's length up to whole sectors, so its bytes
may end with padding (often the start of the next compressed cluster): both
decoders stop once the cluster is full, as QEMU's do.
"""

import zlib

import zstandard

from nbdcrypt.errors import FormatError

ZLIB, ZSTD = 0, 1


def decompress(data: bytes | bytearray, cluster_size: int, compression_type: int,
               name: str = "image") -> bytes | bytearray:
    """One cluster's plaintext from its compressed bytes."""
    try:
        if compression_type == ZLIB:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        else:
            out = _unzstd(bytes(data), cluster_size)
    except (zlib.error, zstandard.ZstdError) as e:
        raise FormatError(f"{name}: corrupt compressed cluster: {e}") from None
    if len(out) != cluster_size:
        raise FormatError(f"{name}: compressed cluster holds {len(out)} of {cluster_size} bytes")
    return out


def _unzstd(data, cluster_size):
    """QEMU's qcow2_zstd_decompress: zstd frames, one after another, until the cluster
    is full; a frame running past the cluster is an error.  Output never exceeds the
    cluster, whatever a frame claims."""
    dctx = zstandard.ZstdDecompressor()
    out = bytearray()
    while len(out) < cluster_size and data:
        room = cluster_size - len(out)
        size = zstandard.frame_content_size(data)
        if size != zstandard.CONTENTSIZE_UNKNOWN and size > room:
            raise zstandard.ZstdError(f"a frame of {size} bytes does not fit the cluster")
        if size:  # 0: an empty or skippable frame
            out += dctx.decompress(data, max_output_size=room, allow_extra_data=True)
        if len(out) < cluster_size:  # more frames follow this one: step over it
            frame = dctx.decompressobj()
            frame.decompress(data)
            data = frame.unused_data
    return out
