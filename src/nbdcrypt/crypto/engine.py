"""The sector-cipher engine: encrypts whole requests with a few library calls.

AES specs run in the native kernel (crypto/native.py) where it is built; the numpy
engine below runs the other ciphers, AES where the kernel is missing, and is the
reference the kernel is tested against.

dm-crypt (and QEMU, nbdkit) run the cipher once per sector, which from Python
costs a few microseconds of setup each and tops out near 0.1 GB/s.  Here a request
of many sectors takes a handful of calls whatever its length:

* every sector's IV comes from one numpy expression (ESSIV: plus one ECB call);
* XTS runs OpenSSL's XTS over the whole request as if it were one data unit, and
  XORs in, before and after, the difference between the tweaks OpenSSL uses and
  the per-sector tweaks dm-crypt uses (GF(2^128) arithmetic vectorised in numpy);
* CBC decryption runs OpenSSL's CBC over the whole request and re-chains the first
  block of each sector to that sector's IV; CBC encryption, serial within a
  sector, encrypts block j of every sector in one ECB call;
* CTR encrypts all counter blocks with one ECB call.

Requests of only a few sectors, where those fixed costs dominate, use one
cryptography context per sector instead.

Other block ciphers (serpent, twofish, camellia, sm4; cast5, whose blocks are 8
bytes: the IVs and CBC below take the spec's block size) come from Botan as
raw ECB, behind the same ``update_into`` interface: XTS is then ECB between the
same per-block masks (with no OpenSSL tweaks to cancel), CBC decryption one ECB
call plus an XOR with the shifted ciphertext, CBC encryption, CTR and ESSIV as
for AES.  Botan's block functions take and return bytes, so each call copies its
buffer once more; Serpent runs at about 0.25 GB/s per core here.  Requests are cut into chunks of at most
``CHUNK`` bytes, which bounds the scratch buffers and stays far below
OpenSSL's 16 MiB XTS data-unit limit.  cryptography's contexts are not
thread-safe, so each call borrows a set of its own from a pool: one SectorCipher
may serve many threads at once.
"""

import ctypes
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbdcrypt.crypto import native
from nbdcrypt.crypto.native import ENGINE  # noqa: F401 -- "native" or "numpy": which runs AES specs
from nbdcrypt.crypto.secrets import Secret
from nbdcrypt.crypto.spec import ESSIV_HASHES, CipherSpec
from nbdcrypt.errors import InputError, UnsupportedError

if TYPE_CHECKING:
    from typing_extensions import Buffer  # typeshed's; not needed at run time

BLOCK = 16  # AES's and XTS's block, and the largest
CHUNK = 1 << 20
SECTOR_SIZES = (512, 1024, 2048, 4096)
_MASK64 = (1 << 64) - 1
_MASK128 = (1 << 128) - 1


class SectorCipher:
    """Encrypts/decrypts whole requests (many consecutive sectors) in place."""

    def __init__(self, spec: CipherSpec, key: bytes | bytearray | memoryview, sector_size: int = 512,
                 iv_large_sectors: bool = False, iv_tweak: int = 0, engine: str | None = None):
        spec.check_key_size(len(key))
        # Contexts are made lazily per thread from this one locked copy (the cipher
        # objects below keep references to it, or views of it): a caller may wipe its own.
        key = Secret(key)
        if sector_size not in SECTOR_SIZES:
            raise InputError(f"sector size {sector_size} is not one of {SECTOR_SIZES}")
        half = len(key) // 2
        if spec.mode == "xts" and memoryview(key)[:half] == memoryview(key)[half:]:
            raise InputError("XTS key halves are equal, which OpenSSL refuses")
        self.spec = spec
        self.sector_size = sector_size
        self.iv_large_sectors = iv_large_sectors
        self.iv_tweak = iv_tweak
        # dm-crypt counts IV sectors in 512-byte units unless told otherwise.
        self._iv_step = 1 if iv_large_sectors else sector_size // 512
        kernel = native.kernel(spec, key, sector_size, self._iv_step, iv_tweak, engine)
        self.engine = "native" if kernel else "numpy"
        if kernel:
            # The kernel's own methods: no Python frame between a request and the C code.
            self.encrypt, self.decrypt = kernel.encrypt, kernel.decrypt  # type: ignore[method-assign]
            return
        self._ivgen = _IvGenerator(spec, key)
        self._mode = _MODES[spec.mode](spec.cipher, key, sector_size)
        self._idle: list[_ThreadState] = []  # states no call is using

    def encrypt(self, buf: "Buffer", sector: int, /) -> None:
        self._apply(buf, sector, encrypt=True)

    def decrypt(self, buf: "Buffer", sector: int, /) -> None:
        self._apply(buf, sector, encrypt=False)

    def _apply(self, buf, sector, encrypt):
        data = np.frombuffer(buf, dtype=np.uint8)
        if not data.flags.writeable:
            raise TypeError("buf must be a writable buffer")
        if len(data) % self.sector_size:
            raise ValueError(f"buffer length {len(data)} is not a multiple of "
                             f"the {self.sector_size}-byte sector size")
        if sector < 0:
            raise ValueError(f"negative sector {sector}")
        block = self.spec.block_size
        blocks = data.reshape(-1, self.sector_size // block, block)
        per_chunk = CHUNK // self.sector_size
        state = self._borrow_state()
        try:
            for first in range(0, len(blocks), per_chunk):
                chunk = blocks[first:first + per_chunk]
                iv_sector = ((sector + first) * self._iv_step + self.iv_tweak) & _MASK64
                ivs = self._ivgen.ivs(state, iv_sector, self._iv_step, len(chunk))
                self._mode.apply(state, chunk, ivs, encrypt)
        finally:
            self._idle.append(state)

    def _borrow_state(self):
        """A state no other call is using (list.pop is atomic).  Not threading.local:
        nbdkit's Python plugin runs every request in a new Python thread state, so
        per-thread contexts and buffers would be made anew for each request."""
        try:
            return self._idle.pop()
        except IndexError:
            state = _ThreadState()
            self._ivgen.init_thread(state)
            self._mode.init_thread(state)
            return state


class _ThreadState:
    """The cipher contexts (attributes set by the IV generator's and the mode's
    ``init_thread``) and reusable scratch buffers of one call at a time, each
    buffer with a spare block at the end because cryptography's ``update_into``
    wants room for a block more than it writes."""

    def __init__(self):
        self._buffers = {}

    def raw(self, name, nbytes):
        buffer = self._buffers.get(name)
        if buffer is None or len(buffer) < nbytes + BLOCK:
            buffer = self._buffers[name] = np.empty(nbytes + BLOCK, np.uint8)
        return buffer

    def scratch(self, name, like, dtype=np.uint8):
        """A scratch array of ``like``'s shape (in bytes) viewed as ``dtype``."""
        return self.raw(name, like.nbytes)[:like.nbytes].view(dtype).reshape(
            like.shape[:-1] + (-1,))

    def run(self, context, src, name):
        """Run a cipher context over ``src`` into scratch ``name``; return the
        output shaped like ``src``."""
        out = self.raw(name, src.nbytes)
        context.update_into(src.reshape(-1), out)
        return out[:src.nbytes].reshape(src.shape)


def _ecb(cipher, key):
    """The block cipher ``cipher`` in ECB mode: ``.encryptor()``/``.decryptor()`` give
    contexts with cryptography's ``update_into``."""
    if cipher == "aes":
        return Cipher(algorithms.AES(key), modes.ECB())
    return _BotanEcb(cipher, key)


class _BotanEcb:
    _NAMES = {"serpent": "Serpent", "twofish": "Twofish", "sm4": "SM4", "cast5": "CAST-128"}

    def __init__(self, cipher, key):
        try:
            import botan2
        except ImportError:
            raise UnsupportedError(f"cipher {cipher} needs Botan (python3-botan)") from None
        self._new = lambda: botan2.BlockCipher(self._NAMES.get(cipher) or f"Camellia-{8 * len(key)}")
        self._key = (ctypes.c_char * len(key)).from_buffer(key)  # a view: Botan's set_key wants a char *

    def encryptor(self):
        return _BotanContext(self._new(), self._key, encrypt=True)

    def decryptor(self):
        return _BotanContext(self._new(), self._key, encrypt=False)


class _BotanContext:
    def __init__(self, block_cipher, key, encrypt):
        block_cipher.set_key(key)
        self._run = block_cipher.encrypt if encrypt else block_cipher.decrypt

    def update_into(self, src, out):
        result = self._run(src.tobytes())
        out[:len(result)] = np.frombuffer(result, np.uint8)


def _each_sector(state, aes, mode, blocks, ivs, encrypt):
    """One cryptography context per sector: cheapest when there are few sectors."""
    for sector, iv in zip(blocks, ivs, strict=True):
        cipher = Cipher(aes, mode(iv.tobytes()))
        sector[...] = state.run(cipher.encryptor() if encrypt else cipher.decryptor(),
                                sector, "out")


# ---------------------------------------------------------------- IV generators


class _IvGenerator:
    """Builds the IVs of ``n`` consecutive sectors as an (n, block size) uint8 array:
    dm-crypt's IV is one cipher block, the sector number little-endian in its
    first 8 bytes (plain: 4) or big-endian in its last 8."""

    def __init__(self, spec, key):
        self._kind = "" if spec.mode == "ecb" else spec.iv
        self._block = spec.block_size
        # benbi counts blocks: the sector (512 bytes) shifted by 9 - log2(block size).
        self._benbi_shift = np.uint64(9 - (self._block.bit_length() - 1))
        if self._kind == "essiv":
            # ESSIV: plain64 encrypted with the same cipher keyed by a hash of the whole
            # volume key (both halves for XTS), as dm-crypt and cryptsetup do.
            digest = hashes.Hash(ESSIV_HASHES[spec.iv_hash]())
            digest.update(key)
            self._essiv = _ecb(spec.cipher, Secret(digest.finalize()))  # finalize's bytes stay unwiped

    def init_thread(self, state):
        if self._kind == "essiv":
            state.essiv = self._essiv.encryptor()

    def ivs(self, state, first, step, n):
        iv_sectors = np.arange(n, dtype=np.uint64) * np.uint64(step) + np.uint64(first)
        ivs = state.raw("ivs", n * self._block)[:n * self._block].reshape(n, self._block)
        ivs[:] = 0
        little, big = ivs.view("<u8"), ivs.view(">u8")
        match self._kind:
            case "plain64" | "essiv":
                little[:, 0] = iv_sectors
            case "plain":
                little[:, 0] = iv_sectors & np.uint64(0xFFFFFFFF)
            case "plain64be":
                big[:, -1] = iv_sectors
            case "benbi":
                # Big-endian count of blocks (32 of 16 bytes per 512 bytes), from 1.
                big[:, -1] = (iv_sectors << self._benbi_shift) + np.uint64(1)
        if self._kind == "essiv":
            return state.run(state.essiv, ivs, "essiv")
        return ivs  # "null", and ECB's unused ""


# ------------------------------------------------------------------------ modes


class _Ecb:
    def __init__(self, cipher, key, sector_size):
        self._cipher = _ecb(cipher, key)

    def init_thread(self, state):
        state.ecb_enc = self._cipher.encryptor()
        state.ecb_dec = self._cipher.decryptor()

    def apply(self, state, blocks, ivs, encrypt):
        blocks[...] = state.run(state.ecb_enc if encrypt else state.ecb_dec, blocks, "out")


class _Ctr:
    """Each sector's IV is its initial counter block, incremented as a 128-bit
    big-endian number per block (OpenSSL's CTR, which cryptsetup uses)."""

    def __init__(self, cipher, key, sector_size):
        self._cipher = _ecb(cipher, key)

    def init_thread(self, state):
        state.ecb_enc = self._cipher.encryptor()

    def apply(self, state, blocks, ivs, encrypt):
        start = ivs.view(">u8")[:, None, :]
        counters = state.scratch("counters", blocks, ">u8")
        np.add(start[..., 1], np.arange(blocks.shape[1], dtype=np.uint64),
               out=counters[..., 1])
        carry = counters[..., 1] < start[..., 1]
        np.add(start[..., 0], carry, out=counters[..., 0], casting="unsafe")
        blocks ^= state.run(state.ecb_enc, counters.view(np.uint8), "keystream")


class _Cbc:
    def __init__(self, cipher, key, sector_size):
        self._ecb = _ecb(cipher, key)
        # OpenSSL's own CBC, for AES only, serves small encryptions and decryptions.
        self._aes = algorithms.AES(key) if cipher == "aes" else None
        # Interleaved encryption costs a few microseconds per block of a sector,
        # a per-sector context about the same per sector: use the cheaper.
        self._few = sector_size // BLOCK // 2 if self._aes else 0

    def init_thread(self, state):
        state.ecb_enc = self._ecb.encryptor()
        state.ecb_dec = self._ecb.decryptor()

    def apply(self, state, blocks, ivs, encrypt):
        if encrypt and len(blocks) <= self._few:
            _each_sector(state, self._aes, modes.CBC, blocks, ivs, encrypt)
        elif encrypt:
            self._encrypt(state, blocks, ivs)
        elif self._aes:
            self._decrypt(state, blocks, ivs)
        else:
            self._decrypt_blocks(state, blocks, ivs)

    def _decrypt_blocks(self, state, blocks, ivs):
        # Each plaintext block is D(c_j) ^ c_(j-1), independent of the others.
        plain = state.run(state.ecb_dec, blocks, "out")
        plain[:, 1:] ^= blocks[:, :-1]
        plain[:, 0] ^= ivs
        blocks[...] = plain

    def _decrypt(self, state, blocks, ivs):
        # One CBC pass over the whole request chains each sector's first block to
        # the previous sector's last ciphertext block; re-chain it to its own IV.
        context = Cipher(self._aes, modes.CBC(ivs[0].tobytes())).decryptor()
        plain = state.run(context, blocks, "out")
        plain[1:, 0] ^= blocks[:-1, -1] ^ ivs[1:]
        blocks[...] = plain

    def _encrypt(self, state, blocks, ivs):
        # Serial within a sector, parallel across sectors: step j encrypts block j
        # of every sector with one ECB call, in a (block, sector) transposed copy.
        # Copying whole blocks as numpy "V16" items is several times faster than bytes.
        n, per_sector, block = blocks.shape
        columns = state.raw("columns", blocks.nbytes)[:blocks.nbytes].reshape(per_sector, n, block)
        _as_items(columns)[...] = _as_items(blocks).T
        out = state.raw("out", blocks.nbytes)
        column_bytes = n * block
        previous = ivs
        for j, column in enumerate(columns):
            column ^= previous
            state.ecb_enc.update_into(column.reshape(-1), out[j * column_bytes:])
            previous = out[j * column_bytes:(j + 1) * column_bytes].reshape(n, block)
        _as_items(blocks)[...] = _as_items(out[:blocks.nbytes].reshape(per_sector, n, block)).T


def _as_items(blocks):
    """An (a, b, block) uint8 array as an (a, b) array of block-sized items."""
    return blocks.view(f"V{blocks.shape[-1]}")[..., 0]


class _Xts:
    """dm-crypt's XTS: each sector is one data unit whose tweak is T = E_K2(iv), and
    block j of sector s is E_K1(x ^ T_s*a^j) ^ T_s*a^j (a the generator of GF(2^128)).

    Other ciphers run exactly that: ECB under K1 between the masks.  For AES,
    OpenSSL's XTS is faster than ECB: given a whole chunk as one data unit with the
    fixed tweak U = AES_K2(0), it masks block j of sector s with U*a^(sB+j) (B
    blocks per sector), so the masks XORed in before and after are D_s*a^j, where
    D_s = T_s ^ U*a^(sB) (the "unit masks" cancel OpenSSL's own).

    The masks cost several times more than AES itself.  They take a fixed number
    of numpy passes per chunk, into scratch buffers made once per state: no
    temporaries (a fresh MiB costs page faults), and few, large calls (each
    releases and retakes the GIL, so many small ones stall a busy server: cutting
    chunks into 128 KiB parts that fit the L2 cache ran 40 % slower under nbdkit
    with 8 requests in flight, and no faster alone).
    """

    def __init__(self, cipher, key, sector_size):
        half = len(key) // 2
        key = memoryview(key)  # halves as views, not copies
        self._tweak = _ecb(cipher, key[half:])
        self._per_sector = sector_size // BLOCK
        if cipher != "aes":
            self._data, self._aes, self._few = _ecb(cipher, key[:half]), None, 0
            return
        self._aes = algorithms.AES(key)
        self._data = Cipher(self._aes, modes.XTS(bytes(BLOCK)))
        # Masks cost about 12 us per request, plus a numpy step per 32 blocks of a
        # sector for the group starts; a context about 4 us per sector.
        self._few = self._per_sector // 12
        unit_masks = [int.from_bytes(self._tweak.encryptor().update(bytes(BLOCK)), "little")]
        for _ in range(CHUNK // sector_size - 1):
            unit_masks.append(_gf_mul_alpha_pow(unit_masks[-1], self._per_sector))
        self._unit_masks = _to_lanes(unit_masks)

    def init_thread(self, state):
        state.data_enc = self._data.encryptor()
        state.data_dec = self._data.decryptor()
        state.tweak = self._tweak.encryptor()
        # np.empty maps pages only as they are touched: small requests stay small.
        state.masks = np.empty((CHUNK // BLOCK // _GROUP, _GROUP, 2), "<u8")
        state.masked = np.empty(CHUNK, np.uint8)
        state.out = np.empty(CHUNK + BLOCK, np.uint8)
        # _spread's four lanes are dead before masked and out are written: share them.
        state.lanes = (*state.masked.view(np.uint64).reshape(2, -1, _GROUP),
                       *state.out[:CHUNK].view(np.uint64).reshape(2, -1, _GROUP))

    def apply(self, state, blocks, ivs, encrypt):
        if len(blocks) <= self._few:
            _each_sector(state, self._aes, modes.XTS, blocks, ivs, encrypt)
            return
        tweaks = state.run(state.tweak, ivs, "tweaks").view("<u8")
        if self._aes:
            tweaks ^= self._unit_masks[:len(tweaks)]
        starts = _group_starts(tweaks, self._per_sector // _GROUP)
        data = blocks.reshape(-1)
        masks = state.masks[:len(starts)]
        _spread(state.lanes, starts, masks)
        masks = masks.view(np.uint8).reshape(-1)
        masked = np.bitwise_xor(data, masks, out=state.masked[:len(data)])
        (state.data_enc if encrypt else state.data_dec).update_into(masked, state.out)
        np.bitwise_xor(state.out[:len(data)], masks, out=data)


_MODES = {"ecb": _Ecb, "ctr": _Ctr, "cbc": _Cbc, "xts": _Xts}


# ------------------------------------------------- GF(2^128) arithmetic for XTS
# XTS treats a block as a little-endian 128-bit polynomial; a (alpha) is x, and
# x^128 = x^7 + x^2 + x + 1.  numpy holds a block as (low, high) uint64 lanes.


def _gf_mul_alpha_pow(value, k):
    """value * a^k on Python ints (used once per cipher, for the unit masks)."""
    value <<= k
    while value >> 128:
        carry = value >> 128
        value = (value & _MASK128) ^ carry ^ (carry << 1) ^ (carry << 2) ^ (carry << 7)
    return value


def _to_lanes(values):
    return np.array([(v & _MASK64, v >> 64) for v in values], dtype="<u8")


def _mul_alpha_pow(src, k, dst):
    """dst = src * a^k for 0 <= k < 58 on (..., 2) lane arrays, ``k`` a number or an
    array broadcast against ``src``: shift left by k and fold the k bits carried out
    of the top back in (they fit in one lane; numpy makes a shift by 64 zero)."""
    k = np.asarray(k, dtype=np.uint64)
    lo, hi = src[..., 0], src[..., 1]
    carry = hi >> (np.uint64(64) - k)
    dst[..., 1] = (hi << k) | (lo >> (np.uint64(64) - k))
    dst[..., 0] = (lo << k) ^ carry ^ (carry << np.uint64(1)) \
        ^ (carry << np.uint64(2)) ^ (carry << np.uint64(7))


# Shift counts for _spread, j and 64 - j for every block of a chunk: numpy shifts
# same-shape arrays several times faster than it broadcasts a column against a row.
_GROUP = 32
_SHIFTS = np.tile(np.arange(_GROUP, dtype=np.uint64), CHUNK // BLOCK // _GROUP)
_SHIFTS_BACK = np.uint64(64) - _SHIFTS
_FOLDS = tuple(np.uint64(k) for k in (1, 2, 7))  # x^128 = x^7 + x^2 + x + 1


def _group_starts(first, groups):
    """(n * groups, 2) lanes: first[s] * a^(32g), the mask of the first block of each
    group g of 32 blocks of sector s."""
    if groups == 1:
        return first
    starts = np.empty((len(first), groups, 2), np.uint64)
    starts[:, 0] = first
    for g in range(1, groups):
        _mul_alpha_pow(starts[:, g - 1], _GROUP, starts[:, g])
    return starts.reshape(-1, 2)


def _spread(lanes, starts, masks):
    """masks[i, j] = starts[i] * a^j for j < 32, ``masks`` an (n, 32, 2) lane array and
    ``lanes`` four (n, 32) or larger scratch arrays: _mul_alpha_pow's arithmetic in
    numpy passes over contiguous arrays, with no temporaries."""
    n = len(starts)
    k = _SHIFTS[:n * _GROUP].reshape(n, _GROUP)
    back = _SHIFTS_BACK[:n * _GROUP].reshape(n, _GROUP)
    lo, hi, carry, acc = (lane[:n] for lane in lanes)
    np.copyto(lo, starts[:, :1])
    np.copyto(hi, starts[:, 1:])
    np.right_shift(hi, back, out=carry)
    np.left_shift(hi, k, out=acc)
    np.right_shift(lo, back, out=hi)
    np.bitwise_or(acc, hi, out=masks[..., 1])
    np.left_shift(lo, k, out=acc)
    np.bitwise_xor(acc, carry, out=acc)
    for fold, out in zip(_FOLDS, (acc, acc, masks[..., 0]), strict=True):
        np.left_shift(carry, fold, out=lo)
        np.bitwise_xor(acc, lo, out=out)
