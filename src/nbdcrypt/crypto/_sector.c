/* The native sector kernel: one whole request of AES sectors through OpenSSL's
 * libcrypto, IVs computed here, the GIL released for the whole request.
 *
 * Every mode is built from OpenSSL calls over many blocks at once, mostly AES-ECB
 * (OpenSSL's fastest AES: no chaining, 8 blocks in flight), with the per-sector
 * structure done here in C on pieces of a request small enough to stay in cache:
 *
 * - XTS: each block j of sector s is E_K1(x ^ T_s*a^j) ^ T_s*a^j with T_s the
 *   sector's tweak E_K2(iv_s); the tweaks of a piece take one ECB call, the masks
 *   one GF(2^128) doubling per block.
 * - CBC decryption: one CBC call per piece, then re-chain each sector's first
 *   block to its own IV.
 * - CBC encryption is serial within a sector, so a group of sectors runs side by
 *   side: step j encrypts block j of each of them in one ECB call.
 * - CTR: the counter blocks of a piece in one ECB call, XORed in.
 *
 * One Kernel serves many threads: OpenSSL's contexts are not shareable, so each
 * call borrows a State (its own contexts and scratch) from a free list that the
 * GIL guards, and copies new ones from keyed templates when the list is empty.
 * (Copying the contexts for every call instead costs ~90 ns per context here, up
 * to 15 % of a 4 KiB request.)  The templates hold the only key schedules, which
 * OpenSSL wipes when they are freed; the ESSIV digest is wiped at once.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <endian.h>
#include <stdint.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the XTS masks below assume a little-endian machine"
#endif

#define BLOCK 16
#define PIECE (16 * 1024) /* bytes per pass of XTS, CTR and CBC decryption: in L1 with their scratch */
/* Bytes of the sectors CBC encryption runs side by side, at least MIN_GROUP of them:
 * each step touches a block of every one, so they should stay in L1.  1 MiB of
 * 4096-byte sectors: 1.7 GB/s 128 at a time, 3.3 with 16, 4.8 with 8. */
#define SPAN (16 * 1024)
#define MIN_GROUP 8
#define IVS 32            /* the most IVs one pass takes: PIECE or SPAN / 512, MIN_GROUP */
#define FEW_CBC 2         /* fewer sectors than this: one OpenSSL CBC call each (side by side
                             is 1.5x faster already for 2 sectors of 2048 bytes) */
#define XTS_PER_SECTOR 4096 /* sectors this large: one OpenSSL XTS call each */
#define MAX_CALL (1 << 30) /* EVP takes int lengths */

/* XOR passes run on AVX2 where the CPU has it (chosen at load time): XTS and CTR
 * at 1 MiB run ~10 % faster than with x86-64's baseline SSE2. */
#if defined(__x86_64__)
#define XOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define XOR_CLONES
#endif

enum { XTS, CBC, ECB, CTR };
enum { IV_NONE, IV_PLAIN, IV_PLAIN64, IV_PLAIN64BE, IV_BENBI, IV_ESSIV, IV_NULL };
/* AES-ECB under the data key (XTS: K1) both ways, under XTS's tweak key K2 and
 * the ESSIV key; AES-CBC for decryption and short encryptions, AES-XTS for the
 * sectors that run one call each. */
enum { DATA_ENC, DATA_DEC, TWEAK, ESSIV, CBC_ENC, CBC_DEC, XTS_ENC, XTS_DEC, CONTEXTS };

typedef struct State {
    EVP_CIPHER_CTX *ctx[CONTEXTS];
    unsigned char *scratch; /* PIECE bytes, then IVS IVs */
    struct State *next;
} State;

#define SCRATCH (PIECE + IVS * BLOCK)
_Static_assert(PIECE / 512 <= IVS && SPAN / 512 <= IVS && MIN_GROUP <= IVS, "IVS too small");

typedef struct {
    PyObject_HEAD
    int mode, iv;
    size_t sector_size;
    uint64_t iv_step, iv_tweak;
    EVP_CIPHER_CTX *keyed[CONTEXTS]; /* the templates States copy; NULL where unused */
    State *idle;                     /* States no call is using */
} Kernel;

/* ------------------------------------------------------------------ helpers */

static int ecb(EVP_CIPHER_CTX *ctx, unsigned char *out, const unsigned char *in, size_t len)
{
    int done;
    while (len) {
        int n = len > MAX_CALL ? MAX_CALL : (int)len;
        if (!EVP_CipherUpdate(ctx, out, &done, in, n))
            return 0;
        out += n, in += n, len -= n;
    }
    return 1;
}

static inline uint64_t load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline void store64(unsigned char *p, uint64_t v)
{
    memcpy(p, &v, 8);
}

static inline void xor_block(unsigned char *dst, const unsigned char *src)
{
    store64(dst, load64(dst) ^ load64(src));
    store64(dst + 8, load64(dst + 8) ^ load64(src + 8));
}

XOR_CLONES static void xor_bytes(unsigned char *dst, const unsigned char *src, size_t len)
{
    for (size_t i = 0; i < len; i += 8)
        store64(dst + i, load64(dst + i) ^ load64(src + i));
}

/* The IVs of n consecutive sectors, the first with IV sector number iv_sector:
 * dm-crypt's, the sector number little-endian in the first 8 bytes (plain: its
 * low 32 bits) or big-endian in the last 8 (benbi: the 16-byte block count from 1). */
static int make_ivs(Kernel *k, State *st, unsigned char *ivs, uint64_t iv_sector, size_t n)
{
    memset(ivs, 0, n * BLOCK);
    for (size_t i = 0; i < n; i++, iv_sector += k->iv_step) {
        unsigned char *iv = ivs + i * BLOCK;
        switch (k->iv) {
        case IV_PLAIN:
            store64(iv, htole64(iv_sector & 0xffffffffu));
            break;
        case IV_PLAIN64:
        case IV_ESSIV:
            store64(iv, htole64(iv_sector));
            break;
        case IV_PLAIN64BE:
            store64(iv + 8, htobe64(iv_sector));
            break;
        case IV_BENBI:
            store64(iv + 8, htobe64((iv_sector << 5) + 1));
            break;
        }
    }
    return k->iv != IV_ESSIV || ecb(st->ctx[ESSIV], ivs, ivs, n * BLOCK);
}

/* -------------------------------------------------------------------- modes */

/* XTS: block j of sector s is E_K1(x ^ T_s*a^j) ^ T_s*a^j, T_s = E_K2(iv_s), a the
 * generator of GF(2^128) (a block as a little-endian number, x^128 = x^7+x^2+x+1).
 *
 * One OpenSSL XTS call per sector costs ~100 ns besides the AES; computing the
 * masks here and running one ECB call per piece costs ~1 ns per block instead.
 * engine_bench-style MB/s (AES-256, encrypt, 4 KiB / 1 MiB requests, one core):
 *   sector   per-sector XTS   masks + ECB
 *   512      1840 / 2960      2650 / 5300
 *   1024     2230 / 4160      2650 / 5400
 *   2048     2570 / 5190      2450 / 5470
 *   4096     2790 / 5960      2460 / 5410
 * so 4096-byte sectors take the per-sector calls, smaller ones the masks.  OpenSSL's
 * XTS over a whole piece as one data unit, with corrections XORed in before and
 * after, would do the same mask work as ECB plus OpenSSL's own: never faster. */

typedef uint32_t lanes32 __attribute__((vector_size(BLOCK)));
typedef int32_t signed32 __attribute__((vector_size(BLOCK)));

static inline lanes32 times_a(lanes32 m)
{
    /* each 32-bit lane doubled, its top bit carried into the next lane, the top
     * lane's folded back into the bottom one as x^7+x^2+x+1 */
    lanes32 carries = (lanes32)((signed32)m >> 31);
    return (m + m) ^ (__builtin_shuffle(carries, (lanes32){3, 0, 1, 2}) & (lanes32){0x87, 1, 1, 1});
}

#define LANES 4 /* sectors whose mask chains run side by side: the doublings are serial */

/* Store the masks of `lanes` consecutive sectors and XOR them into their data. */
static inline __attribute__((always_inline)) void xts_masks(const unsigned char *tweaks, unsigned char *masks,
                                                            unsigned char *data, size_t per_sector, size_t lanes)
{
    lanes32 m[LANES], x;
    for (size_t l = 0; l < lanes; l++)
        memcpy(&m[l], tweaks + l * BLOCK, BLOCK);
    for (size_t j = 0; j < per_sector; j++)
        for (size_t l = 0; l < lanes; l++) {
            size_t at = (l * per_sector + j) * BLOCK;
            memcpy(masks + at, &m[l], BLOCK);
            memcpy(&x, data + at, BLOCK);
            x ^= m[l];
            memcpy(data + at, &x, BLOCK);
            m[l] = times_a(m[l]);
        }
}

static int xts_each_sector(Kernel *k, State *st, unsigned char *data, size_t sectors, uint64_t iv_sector, int enc)
{
    EVP_CIPHER_CTX *ctx = st->ctx[enc ? XTS_ENC : XTS_DEC];
    unsigned char iv[BLOCK];
    int done;
    for (; sectors; sectors--, data += k->sector_size, iv_sector += k->iv_step) {
        if (!make_ivs(k, st, iv, iv_sector, 1) || !EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, enc)
                || !EVP_CipherUpdate(ctx, data, &done, data, (int)k->sector_size))
            return 0;
    }
    return 1;
}

/* The masks' XTS on n sectors whose IVs are in ivs (turned into tweaks). */
static int xts_piece(Kernel *k, State *st, unsigned char *data, size_t n, unsigned char *ivs, int enc)
{
    size_t size = k->sector_size, per_sector = size / BLOCK, s = 0;
    unsigned char *masks = st->scratch;
    if (!ecb(st->ctx[TWEAK], ivs, ivs, n * BLOCK))
        return 0;
    for (; s + LANES <= n; s += LANES)
        xts_masks(ivs + s * BLOCK, masks + s * size, data + s * size, per_sector, LANES);
    for (; s < n; s++)
        xts_masks(ivs + s * BLOCK, masks + s * size, data + s * size, per_sector, 1);
    if (!ecb(st->ctx[enc ? DATA_ENC : DATA_DEC], data, data, n * size))
        return 0;
    xor_bytes(data, masks, n * size);
    return 1;
}

static int ctr_piece(Kernel *k, State *st, unsigned char *data, size_t n, unsigned char *ivs, int enc)
{
    size_t per_sector = k->sector_size / BLOCK;
    unsigned char *stream = st->scratch, *c = stream;
    (void)enc; /* the same both ways */
    for (size_t s = 0; s < n; s++) {
        /* OpenSSL's CTR: the IV is a 128-bit big-endian counter */
        uint64_t hi = be64toh(load64(ivs + s * BLOCK)), lo = be64toh(load64(ivs + s * BLOCK + 8));
        for (size_t j = 0; j < per_sector; j++, c += BLOCK) {
            uint64_t low = lo + j;
            store64(c, htobe64(hi + (low < lo)));
            store64(c + 8, htobe64(low));
        }
    }
    if (!ecb(st->ctx[DATA_ENC], stream, stream, n * k->sector_size))
        return 0;
    xor_bytes(data, stream, n * k->sector_size);
    return 1;
}

static int cbc_decrypt_piece(Kernel *k, State *st, unsigned char *data, size_t n, unsigned char *ivs, int enc)
{
    EVP_CIPHER_CTX *ctx = st->ctx[CBC_DEC];
    size_t size = k->sector_size;
    unsigned char *last = st->scratch; /* each sector's last ciphertext block */
    int done;
    (void)enc;
    for (size_t s = 0; s < n; s++)
        memcpy(last + s * BLOCK, data + (s + 1) * size - BLOCK, BLOCK);
    /* One CBC pass (OpenSSL decrypts 8 blocks at a time) chains each sector's
     * first block to the sector before it: re-chain it to its own IV. */
    if (!EVP_CipherInit_ex(ctx, NULL, NULL, NULL, ivs, 0) || !EVP_CipherUpdate(ctx, data, &done, data, (int)(n * size)))
        return 0;
    for (size_t s = 1; s < n; s++) {
        xor_block(data + s * size, last + (s - 1) * BLOCK);
        xor_block(data + s * size, ivs + s * BLOCK);
    }
    return 1;
}

typedef int piece_fn(Kernel *k, State *st, unsigned char *data, size_t n, unsigned char *ivs, int enc);

/* Run `piece` over a request a PIECE at a time, with the IVs of its sectors. */
static int by_pieces(Kernel *k, State *st, unsigned char *data, size_t sectors, uint64_t iv_sector, int enc,
                     piece_fn *piece)
{
    unsigned char *ivs = st->scratch + PIECE;
    size_t most = PIECE / k->sector_size;
    while (sectors) {
        size_t n = sectors < most ? sectors : most;
        if (!make_ivs(k, st, ivs, iv_sector, n) || !piece(k, st, data, n, ivs, enc))
            return 0;
        data += n * k->sector_size, sectors -= n, iv_sector += n * k->iv_step;
    }
    return 1;
}

static int cbc_encrypt(Kernel *k, State *st, unsigned char *data, size_t sectors, uint64_t iv_sector)
{
    unsigned char *column = st->scratch + PIECE;
    size_t size = k->sector_size, per_sector = size / BLOCK;
    int done;
    while (sectors >= FEW_CBC) {
        size_t group = SPAN / size < MIN_GROUP ? MIN_GROUP : SPAN / size;
        size_t n = sectors < group ? sectors : group;
        /* column[s] starts as sector s's IV, then holds its last ciphertext block */
        if (!make_ivs(k, st, column, iv_sector, n))
            return 0;
        for (size_t j = 0; j < per_sector; j++) {
            for (size_t s = 0; s < n; s++)
                xor_block(column + s * BLOCK, data + s * size + j * BLOCK);
            if (!ecb(st->ctx[DATA_ENC], column, column, n * BLOCK))
                return 0;
            for (size_t s = 0; s < n; s++)
                memcpy(data + s * size + j * BLOCK, column + s * BLOCK, BLOCK);
        }
        data += n * size, sectors -= n, iv_sector += n * k->iv_step;
    }
    for (; sectors; sectors--, data += size, iv_sector += k->iv_step) {
        if (!make_ivs(k, st, column, iv_sector, 1)
                || !EVP_CipherInit_ex(st->ctx[CBC_ENC], NULL, NULL, NULL, column, 1)
                || !EVP_CipherUpdate(st->ctx[CBC_ENC], data, &done, data, (int)size))
            return 0;
    }
    return 1;
}

static int run(Kernel *k, State *st, unsigned char *data, size_t sectors, uint64_t iv_sector, int enc)
{
    switch (k->mode) {
    case XTS:
        if (k->sector_size >= XTS_PER_SECTOR)
            return xts_each_sector(k, st, data, sectors, iv_sector, enc);
        return by_pieces(k, st, data, sectors, iv_sector, enc, xts_piece);
    case CTR:
        return by_pieces(k, st, data, sectors, iv_sector, enc, ctr_piece);
    case CBC:
        if (enc)
            return cbc_encrypt(k, st, data, sectors, iv_sector);
        return by_pieces(k, st, data, sectors, iv_sector, enc, cbc_decrypt_piece);
    default:
        return ecb(st->ctx[enc ? DATA_ENC : DATA_DEC], data, data, sectors * k->sector_size);
    }
}

/* ------------------------------------------------------------------- States */

static void free_state(State *st)
{
    for (int i = 0; i < CONTEXTS; i++)
        EVP_CIPHER_CTX_free(st->ctx[i]);
    OPENSSL_clear_free(st->scratch, SCRATCH); /* masks and keystreams */
    PyMem_RawFree(st);
}

static State *new_state(Kernel *k)
{
    State *st = PyMem_RawCalloc(1, sizeof *st);
    if (!st || !(st->scratch = OPENSSL_malloc(SCRATCH)))
        goto fail;
    for (int i = 0; i < CONTEXTS; i++) {
        if (k->keyed[i] && (!(st->ctx[i] = EVP_CIPHER_CTX_new()) || !EVP_CIPHER_CTX_copy(st->ctx[i], k->keyed[i])))
            goto fail;
    }
    return st;
fail:
    if (st)
        free_state(st);
    PyErr_SetString(PyExc_MemoryError, "cannot make OpenSSL cipher contexts");
    return NULL;
}

/* ------------------------------------------------------------ Kernel object */

static PyObject *request(Kernel *k, PyObject *const *args, Py_ssize_t nargs, int enc)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "expected (buf, sector)");
        return NULL;
    }
    PyObject *sector_obj = PyNumber_Index(args[1]);
    if (!sector_obj)
        return NULL;
    int overflow;
    long long small = PyLong_AsLongLongAndOverflow(sector_obj, &overflow);
    uint64_t sector = PyLong_AsUnsignedLongLongMask(sector_obj); /* dm-crypt's IV sectors wrap at 2^64 */
    if (overflow < 0 || (!overflow && small < 0)) {
        PyErr_Format(PyExc_ValueError, "negative sector %S", sector_obj);
        Py_DECREF(sector_obj);
        return NULL;
    }
    Py_DECREF(sector_obj);
    if (PyErr_Occurred())
        return NULL;

    Py_buffer buf;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_WRITABLE) < 0) {
        PyErr_SetString(PyExc_TypeError, "buf must be a writable buffer");
        return NULL;
    }
    if (buf.len % k->sector_size) {
        PyErr_Format(PyExc_ValueError, "buffer length %zd is not a multiple of the %zu-byte sector size",
                     buf.len, k->sector_size);
        PyBuffer_Release(&buf);
        return NULL;
    }
    State *st = k->idle;
    if (st)
        k->idle = st->next;
    else if (!(st = new_state(k))) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = run(k, st, buf.buf, buf.len / k->sector_size, sector * k->iv_step + k->iv_tweak, enc);
    Py_END_ALLOW_THREADS
    st->next = k->idle;
    k->idle = st;
    PyBuffer_Release(&buf);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed to run the sector cipher");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Kernel_encrypt(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return request((Kernel *)self, args, nargs, 1);
}

static PyObject *Kernel_decrypt(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return request((Kernel *)self, args, nargs, 0);
}

static const EVP_CIPHER *aes(const char *mode, size_t key_len)
{
    int ecb = !strcmp(mode, "ecb");
    switch (key_len) {
    case 16:
        return ecb ? EVP_aes_128_ecb() : EVP_aes_128_cbc();
    case 24:
        return ecb ? EVP_aes_192_ecb() : EVP_aes_192_cbc();
    case 32:
        return ecb ? EVP_aes_256_ecb() : EVP_aes_256_cbc();
    }
    return NULL;
}

static EVP_CIPHER_CTX *keyed(const EVP_CIPHER *cipher, const unsigned char *key, int enc)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx && cipher && EVP_CipherInit_ex(ctx, cipher, NULL, key, NULL, enc) && EVP_CIPHER_CTX_set_padding(ctx, 0))
        return ctx;
    EVP_CIPHER_CTX_free(ctx);
    return NULL;
}

static int find(const char *name, const char *const *names)
{
    for (int i = 0; names[i]; i++)
        if (!strcmp(name, names[i]))
            return i;
    return -1;
}

static void Kernel_dealloc(PyObject *self)
{
    Kernel *k = (Kernel *)self;
    while (k->idle) {
        State *st = k->idle;
        k->idle = st->next;
        free_state(st);
    }
    for (int i = 0; i < CONTEXTS; i++)
        EVP_CIPHER_CTX_free(k->keyed[i]); /* OpenSSL wipes the key schedules */
    Py_TYPE(self)->tp_free(self);
}

/* Kernel(mode, iv, key, essiv_hash, sector_size, iv_step, iv_tweak): the spec's
 * names as crypto/spec.py has them, essiv_hash None unless iv is "essiv"; the
 * key as given (XTS: K1 then K2); iv_tweak taken modulo 2^64. */
static PyObject *Kernel_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    (void)kwargs; /* PyArg_ParseTuple takes positional arguments only */
    static const char *const modes[] = {"xts", "cbc", "ecb", "ctr", NULL};
    static const char *const ivs[] = {"", "plain", "plain64", "plain64be", "benbi", "essiv", "null", NULL};
    const char *mode_name, *iv_name, *hash;
    Py_buffer key;
    Py_ssize_t sector_size;
    unsigned long long iv_step, iv_tweak;
    if (!PyArg_ParseTuple(args, "ssy*znKK", &mode_name, &iv_name, &key, &hash, &sector_size, &iv_step, &iv_tweak))
        return NULL;
    Kernel *k = (Kernel *)type->tp_alloc(type, 0);
    if (!k) {
        PyBuffer_Release(&key);
        return NULL;
    }
    k->mode = find(mode_name, modes);
    k->iv = k->mode == ECB ? IV_NONE : find(iv_name, ivs);
    k->sector_size = sector_size;
    k->iv_step = iv_step;
    k->iv_tweak = iv_tweak;
    const unsigned char *bytes = key.buf;
    size_t data_len = k->mode == XTS ? key.len / 2 : key.len;
    int ok = k->mode >= 0 && k->iv >= 0 && sector_size >= 512 && sector_size <= PIECE && sector_size % 512 == 0;
    if (ok) {
        k->keyed[DATA_ENC] = keyed(aes("ecb", data_len), bytes, 1);
        ok = k->keyed[DATA_ENC] != NULL;
    }
    if (ok && (k->mode == XTS || k->mode == ECB))
        ok = (k->keyed[DATA_DEC] = keyed(aes("ecb", data_len), bytes, 0)) != NULL;
    if (ok && k->mode == XTS)
        ok = (k->keyed[TWEAK] = keyed(aes("ecb", data_len), bytes + data_len, 1)) != NULL;
    if (ok && k->mode == XTS && sector_size >= XTS_PER_SECTOR) {
        const EVP_CIPHER *xts = key.len == 64 ? EVP_aes_256_xts() : key.len == 32 ? EVP_aes_128_xts() : NULL;
        ok = (k->keyed[XTS_ENC] = keyed(xts, bytes, 1)) && (k->keyed[XTS_DEC] = keyed(xts, bytes, 0));
    }
    if (ok && k->mode == CBC)
        ok = (k->keyed[CBC_ENC] = keyed(aes("cbc", data_len), bytes, 1))
            && (k->keyed[CBC_DEC] = keyed(aes("cbc", data_len), bytes, 0));
    if (ok && k->iv == IV_ESSIV) {
        /* ESSIV: the IV sector encrypted under a hash of the whole key */
        unsigned char digest[EVP_MAX_MD_SIZE];
        unsigned int digest_len = 0;
        EVP_MD *md = hash ? EVP_MD_fetch(NULL, hash, NULL) : NULL;
        ok = md && EVP_Digest(bytes, key.len, digest, &digest_len, md, NULL)
            && (k->keyed[ESSIV] = keyed(aes("ecb", digest_len), digest, 1)) != NULL;
        OPENSSL_cleanse(digest, sizeof digest);
        EVP_MD_free(md);
    }
    PyBuffer_Release(&key);
    if (!ok) {
        Py_DECREF(k);
        PyErr_Format(PyExc_ValueError, "the native kernel cannot run aes-%s-%s", mode_name, iv_name);
        return NULL;
    }
    return (PyObject *)k;
}

static PyMethodDef Kernel_methods[] = {
    {"encrypt", (PyCFunction)(void (*)(void))Kernel_encrypt, METH_FASTCALL,
     "encrypt(buf, sector): encrypt whole sectors in place, the first numbered sector"},
    {"decrypt", (PyCFunction)(void (*)(void))Kernel_decrypt, METH_FASTCALL,
     "decrypt(buf, sector): decrypt whole sectors in place, the first numbered sector"},
    {NULL},
};

static PyTypeObject KernelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nbdcrypt.crypto._sector.Kernel",
    .tp_basicsize = sizeof(Kernel),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An AES sector cipher over OpenSSL, shared by any number of threads.",
    .tp_new = Kernel_new,
    .tp_dealloc = Kernel_dealloc,
    .tp_methods = Kernel_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_sector",
    .m_doc = "The native AES sector kernel (see _sector.c).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__sector(void)
{
    if (PyType_Ready(&KernelType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddObjectRef(m, "Kernel", (PyObject *)&KernelType) < 0)
        Py_CLEAR(m);
    return m;
}
