"""The sector-cipher engine: encrypts whole requests with a few library calls.

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

Other 128-bit block ciphers (serpent, twofish, camellia, sm4) come from Botan as
raw ECB, behind the same ``update_into`` interface: XTS is then ECB between the
same per-block masks (with no OpenSSL tweaks to cancel), CBC decryption one ECB
call plus an XOR with the shifted ciphertext, CBC encryption, CTR and ESSIV as
for AES.  Botan's block functions take and return bytes, so each call copies its
buffer once more; Serpent runs at about 0.25 GB/s per core here.  Requests are cut into chunks of at most
``CHUNK`` bytes, which bounds the per-thread scratch buffers and stays far below
OpenSSL's 16 MiB XTS data-unit limit.  cryptography's contexts are not
thread-safe, so each thread gets its own (``threading.local``): one SectorCipher
may serve many threads at once.
"""

import threading

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbdcrypt.crypto.spec import CIPHER_KEY_SIZES, ESSIV_HASHES, CipherSpec
from nbdcrypt.errors import InputError, UnsupportedError

BLOCK = 16
CHUNK = 1 << 20
SECTOR_SIZES = (512, 1024, 2048, 4096)
_MASK64 = (1 << 64) - 1
_MASK128 = (1 << 128) - 1


class SectorCipher:
    """Encrypts/decrypts whole requests (many consecutive sectors) in place."""

    def __init__(self, spec: CipherSpec, key: bytes, sector_size: int = 512,
                 iv_large_sectors: bool = False, iv_tweak: int = 0):
        spec.check_key_size(len(key))
        key = bytes(key)  # contexts are made lazily per thread: a caller may wipe its copy
        if sector_size not in SECTOR_SIZES:
            raise InputError(f"sector size {sector_size} is not one of {SECTOR_SIZES}")
        self.spec = spec
        self.sector_size = sector_size
        # dm-crypt counts IV sectors in 512-byte units unless told otherwise.
        self._iv_step = 1 if iv_large_sectors else sector_size // 512
        self._iv_tweak = iv_tweak
        self._ivgen = _IvGenerator(spec, key)
        self._mode = _MODES[spec.mode](spec.cipher, key, sector_size)
        self._local = threading.local()

    def encrypt(self, buf, sector: int) -> None:
        self._apply(buf, sector, encrypt=True)

    def decrypt(self, buf, sector: int) -> None:
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
        state = self._thread_state()
        blocks = data.reshape(-1, self.sector_size // BLOCK, BLOCK)
        per_chunk = CHUNK // self.sector_size
        for first in range(0, len(blocks), per_chunk):
            chunk = blocks[first:first + per_chunk]
            iv_sector = ((sector + first) * self._iv_step + self._iv_tweak) & _MASK64
            ivs = self._ivgen.ivs(state, iv_sector, self._iv_step, len(chunk))
            self._mode.apply(state, chunk, ivs, encrypt)

    def _thread_state(self):
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _ThreadState()
            self._ivgen.init_thread(state)
            self._mode.init_thread(state)
        return state


class _ThreadState:
    """One thread's cipher contexts (attributes set by the IV generator and the
    mode) and its reusable scratch buffers, each with a spare block at the end
    because cryptography's ``update_into`` wants room for a block more than it
    writes."""

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
    _NAMES = {"serpent": "Serpent", "twofish": "Twofish", "sm4": "SM4"}

    def __init__(self, cipher, key):
        try:
            import botan2
        except ImportError:
            raise UnsupportedError(f"cipher {cipher} needs Botan (python3-botan)") from None
        self._new = lambda: botan2.BlockCipher(self._NAMES.get(cipher) or f"Camellia-{8 * len(key)}")
        self._key = bytes(key)

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
    for sector, iv in zip(blocks, ivs):
        cipher = Cipher(aes, mode(iv.tobytes()))
        sector[...] = state.run(cipher.encryptor() if encrypt else cipher.decryptor(),
                                sector, "out")


# ---------------------------------------------------------------- IV generators


class _IvGenerator:
    """Builds the IVs of ``n`` consecutive sectors as an (n, 16) uint8 array."""

    def __init__(self, spec, key):
        self._kind = "" if spec.mode == "ecb" else spec.iv
        if self._kind == "essiv":
            # ESSIV: plain64 encrypted with AES keyed by a hash of the whole volume
            # key (both halves for XTS), as dm-crypt and cryptsetup do.
            digest = hashes.Hash(ESSIV_HASHES[spec.iv_hash]())
            digest.update(key)
            salt = digest.finalize()
            if len(salt) not in CIPHER_KEY_SIZES[spec.cipher]:
                raise InputError(f"{spec}: a {spec.iv_hash} digest is not a {spec.cipher} key")
            self._essiv = _ecb(spec.cipher, salt)

    def init_thread(self, state):
        if self._kind == "essiv":
            state.essiv = self._essiv.encryptor()

    def ivs(self, state, first, step, n):
        iv_sectors = np.arange(n, dtype=np.uint64) * np.uint64(step) + np.uint64(first)
        ivs = state.raw("ivs", n * BLOCK)[:n * BLOCK].reshape(n, BLOCK)
        ivs[:] = 0
        little, big = ivs.view("<u8"), ivs.view(">u8")
        match self._kind:
            case "plain64" | "essiv":
                little[:, 0] = iv_sectors
            case "plain":
                little[:, 0] = iv_sectors & np.uint64(0xFFFFFFFF)
            case "plain64be":
                big[:, 1] = iv_sectors
            case "benbi":
                # Big-endian count of 16-byte blocks (32 per 512 bytes), from 1.
                big[:, 1] = (iv_sectors << np.uint64(5)) + np.uint64(1)
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
        # Copying 16-byte items as numpy "V16" is several times faster than bytes.
        n, per_sector, _ = blocks.shape
        columns = state.raw("columns", blocks.nbytes)[:blocks.nbytes].reshape(per_sector, n, BLOCK)
        _as_items(columns)[...] = _as_items(blocks).T
        out = state.raw("out", blocks.nbytes)
        column_bytes = n * BLOCK
        previous = ivs
        for j, column in enumerate(columns):
            column ^= previous
            state.ecb_enc.update_into(column.reshape(-1), out[j * column_bytes:])
            previous = out[j * column_bytes:(j + 1) * column_bytes].reshape(n, BLOCK)
        _as_items(blocks)[...] = _as_items(out[:blocks.nbytes].reshape(per_sector, n, BLOCK)).T


def _as_items(blocks):
    """An (a, b, 16) uint8 array as an (a, b) array of 16-byte items."""
    return blocks.view("V16")[..., 0]


class _Xts:
    """dm-crypt's XTS: each sector is one data unit whose tweak is T = E_K2(iv), and
    block j of sector s is E_K1(x ^ T_s*a^j) ^ T_s*a^j (a the generator of GF(2^128)).

    Other ciphers run exactly that: ECB under K1 between the masks.  For AES,
    OpenSSL's XTS is faster than ECB: given a whole chunk as one data unit with the
    fixed tweak U = AES_K2(0), it masks block j of sector s with U*a^(sB+j) (B
    blocks per sector), so the masks XORed in before and after are D_s*a^j, where
    D_s = T_s ^ U*a^(sB) (the "unit masks" cancel OpenSSL's own).
    """

    def __init__(self, cipher, key, sector_size):
        half = len(key) // 2
        if key[:half] == key[half:]:
            raise InputError("XTS key halves are equal, which OpenSSL refuses")
        self._tweak = _ecb(cipher, key[half:])
        self._per_sector = sector_size // BLOCK
        if cipher != "aes":
            self._data, self._aes, self._few = _ecb(cipher, key[:half]), None, 0
            return
        self._aes = algorithms.AES(key)
        self._data = Cipher(self._aes, modes.XTS(bytes(BLOCK)))
        # The masks' fixed cost grows with blocks per sector (a numpy step per 32).
        self._few = self._per_sector // 8
        unit_masks = [int.from_bytes(self._tweak.encryptor().update(bytes(BLOCK)), "little")]
        for _ in range(CHUNK // sector_size - 1):
            unit_masks.append(_gf_mul_alpha_pow(unit_masks[-1], self._per_sector))
        self._unit_masks = _to_lanes(unit_masks)

    def init_thread(self, state):
        state.data_enc = self._data.encryptor()
        state.data_dec = self._data.decryptor()
        state.tweak = self._tweak.encryptor()

    def apply(self, state, blocks, ivs, encrypt):
        if len(blocks) <= self._few:
            _each_sector(state, self._aes, modes.XTS, blocks, ivs, encrypt)
        else:
            self._apply_masked(state, blocks, ivs, encrypt)

    def _apply_masked(self, state, blocks, ivs, encrypt):
        tweaks = state.run(state.tweak, ivs, "tweaks").view("<u8")
        masks = state.scratch("masks", blocks, "<u8")
        unit_masks = self._unit_masks[:len(blocks)] if self._aes else 0
        _spread_over_blocks(tweaks ^ unit_masks, masks)
        masks = masks.view(np.uint8).reshape(blocks.shape)
        masked = np.bitwise_xor(blocks, masks, out=state.scratch("masked", blocks))
        out = state.run(state.data_enc if encrypt else state.data_dec, masked, "out")
        np.bitwise_xor(out, masks, out=blocks)


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


def _spread_over_blocks(first, out):
    """out[s, j] = first[s] * a^j for every block j of every sector s: the first 32
    columns in one broadcast step, then each group of 32 from the one before."""
    per_sector = out.shape[1]
    width = min(per_sector, 32)
    _mul_alpha_pow(first[:, None], np.arange(width, dtype=np.uint64), out[:, :width])
    for k in range(width, per_sector, 32):
        _mul_alpha_pow(out[:, k - 32:k], 32, out[:, k:k + 32])
