"""The LUKS anti-forensic splitter (LUKS1 spec section 2.4, cryptsetup lib/luks1/af.c).

A key of ``n`` bytes is stored as ``stripes`` stripes of ``n`` bytes: all but the last
are random, the last is the key XORed with the diffused XOR-chain of the others.  Losing
any one stripe (a wiped sector) loses the key.

Blocks are XORed as Python ints (one conversion per stripe, not a loop per byte) and
each chunk's hash starts from a copy of a pre-fed ``be32(index)`` state: 4000 stripes
of a 64-byte key take a few milliseconds.
"""

import os
from collections.abc import Callable

import numpy as np

from nbdcrypt.crypto.kdf import hash_factory
from nbdcrypt.crypto.secrets import Secret
from nbdcrypt.errors import InputError


def _diffuser(length: int, hash_name: str) -> Callable[[bytes], bytes]:
    """The diffusion function for blocks of ``length`` bytes.

    Each digest-sized chunk i becomes H(be32(i) || chunk i); a short last chunk keeps
    only as many bytes of its hash as it had.
    """
    new_hash = hash_factory(hash_name)
    size = new_hash().digest_size
    chunks = [(new_hash(i.to_bytes(4, "big")), start) for i, start in enumerate(range(0, length, size))]

    def diffuse(block: bytes) -> bytes:
        out = []
        for prefixed, start in chunks:
            h = prefixed.copy()
            h.update(block[start : start + size])
            out.append(h.digest())
        return b"".join(out)[:length]

    return diffuse


def _chain(material: bytearray | memoryview, length: int, stripes: int, hash_name: str) -> int:
    """XOR and diffuse all stripes but the last: the value that masks the key."""
    diffuse = _diffuser(length, hash_name)
    acc = 0
    for start in range(0, length * (stripes - 1), length):
        mixed = acc ^ int.from_bytes(material[start : start + length], "big")
        acc = int.from_bytes(diffuse(mixed.to_bytes(length, "big")), "big")
    return acc


def _check(length: int, stripes: int) -> None:
    if length <= 0 or stripes <= 0:
        raise InputError(f"anti-forensic split needs a non-empty key and stripes, got {length} x {stripes}")


def split(key: bytes | bytearray | memoryview, stripes: int, hash_name: str) -> bytearray:
    """Split ``key`` into ``stripes * len(key)`` bytes of anti-forensic material (a bytearray)."""
    length = len(key)
    _check(length, stripes)
    material = bytearray(os.urandom(length * (stripes - 1)))
    last = _chain(material, length, stripes, hash_name) ^ int.from_bytes(key, "big")
    material += last.to_bytes(length, "big")
    return material


def merge(material: bytes | bytearray | memoryview, length: int, stripes: int, hash_name: str) -> Secret:
    """Recover the ``length``-byte key (a Secret) from the start of ``material``."""
    _check(length, stripes)
    if len(material) < length * stripes:
        raise InputError(f"anti-forensic material is {len(material)} bytes, need {length * stripes}")
    view = memoryview(material)
    key = Secret(view[length * (stripes - 1) : length * stripes])
    mask = _chain(view, length, stripes, hash_name).to_bytes(length, "big")
    # XORed in place: the key itself never passes through an int or bytes we cannot wipe.
    np.bitwise_xor(np.frombuffer(key, np.uint8), np.frombuffer(mask, np.uint8), out=np.frombuffer(key, np.uint8))
    return key
