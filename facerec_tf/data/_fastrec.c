/* Optional C accelerator for the .rec -> TFRecord converter (facerec_tf.data.fastrec).
 *
 * Five functions, mostly loops the converter otherwise runs in Python or NumPy:
 *
 *   crc32c(data, crc=0, hardware=True) -> int
 *       CRC-32C (Castagnoli) of data, extending crc. SSE4.2 instructions when the CPU has them
 *       and hardware is true, else a slicing-by-8 table.
 *   pread_records(fd, offsets, lengths, buf, starts, got)
 *       got[i] = bytes read by pread(fd, buf + starts[i], lengths[i], offsets[i]) (fewer at
 *       the end of the file). Raises OSError on a read error.
 *   check_records(data, offsets, labels, limits, ok, start, end, expected_height,
 *                 expected_width, max_side)
 *       The record-frame and JPEG-header checks of facerec_tf.data.rec_batch.check_records
 *       (whose docstring is the contract), one record at a time instead of in lock step;
 *       results go to the arrays ok (bool), start and end (int64). expected_height < 0 means
 *       any size. Equal to the NumPy version on every record it marks ok (tested).
 *   start_writeback(fd) -> bool
 *       Starts writing the file's dirty pages to disk without waiting (Linux
 *       sync_file_range(SYNC_FILE_RANGE_WRITE)), so that the fsync that ends a shard has
 *       little left to wait for. Not a durability guarantee: the fsync still gives that.
 *   fs_magic(fd) -> int
 *       The f_type of the file system holding fd (Linux fstatfs), -1 where that is not
 *       available; facerec_tf.data.directio uses it to choose direct I/O on local disks.
 *   frame_examples(out, data, starts, ends, labels, keys, image_field, label_prefixes,
 *                  key_prefixes, label_first) -> int
 *       Writes into the writable buffer out, for each record i, the TFRecord-framed
 *       tf.train.Example
 *       {image/encoded: data[starts[i]:ends[i]], image/key: keys[i], image/label: labels[i]},
 *       all concatenated, and returns the number of bytes written; when out is too small it
 *       writes nothing and returns minus the size needed. The protobuf layout (field names, their order, the map-entry bytes
 *       before each int64 varint) comes from Python (facerec_tf.data.tfrecord owns the
 *       schema); this file only does the arithmetic, the copies and the CRCs. The result is
 *       byte-identical to tfrecord.frame_examples (tested).
 *
 * Array arguments are C-contiguous int64 buffers (numpy arrays); data and buf are byte
 * buffers. The GIL is released while reading and framing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <fcntl.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/vfs.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <nmmintrin.h>
#define FASTREC_X86 1
#endif

/* ------------------------------------------------------------------------------------------ */
/* CRC-32C */

static uint32_t crc_table[8][256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = crc_table[0][i];
        for (int t = 1; t < 8; t++) {
            c = crc_table[0][c & 0xFF] ^ (c >> 8);
            crc_table[t][i] = c;
        }
    }
}

static uint32_t crc_sw(uint32_t crc, const uint8_t *p, size_t n) {
    crc = ~crc;
    while (n && ((uintptr_t)p & 7)) {
        crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc; /* little-endian hosts only: checked at import */
        crc = crc_table[7][w & 0xFF] ^ crc_table[6][(w >> 8) & 0xFF] ^
              crc_table[5][(w >> 16) & 0xFF] ^ crc_table[4][(w >> 24) & 0xFF] ^
              crc_table[3][(w >> 32) & 0xFF] ^ crc_table[2][(w >> 40) & 0xFF] ^
              crc_table[1][(w >> 48) & 0xFF] ^ crc_table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* Shifting a raw CRC register over SHIFT_LEN zero bytes (multiplying it by x^(8 SHIFT_LEN)
 * modulo the polynomial) is linear in its 32 bits: crc_shift_table[k][b] is the shift of
 * byte b at byte position k, so a shift is four lookups. The hardware path uses it to run
 * three independent CRCs over consecutive SHIFT_LEN-byte segments at once (the crc32
 * instruction has a latency of 3 cycles but a throughput of 1) and combine them:
 * reg(A B C, c) = shift(shift(reg(A, c)) ^ reg(B, 0)) ^ reg(C, 0). */
#define SHIFT_LEN 256
static uint32_t crc_shift_table[4][256];

static uint32_t crc_zeros(uint32_t reg, size_t n) { /* raw register over n zero bytes */
    while (n--) reg = crc_table[0][reg & 0xFF] ^ (reg >> 8);
    return reg;
}

static void crc_shift_init(void) {
    uint32_t basis[32];
    for (int j = 0; j < 32; j++) basis[j] = crc_zeros(1u << j, SHIFT_LEN);
    for (int k = 0; k < 4; k++)
        for (uint32_t b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int j = 0; j < 8; j++)
                if (b >> j & 1) v ^= basis[8 * k + j];
            crc_shift_table[k][b] = v;
        }
}

static inline uint32_t crc_shift(uint32_t reg) {
    return crc_shift_table[0][reg & 0xFF] ^ crc_shift_table[1][(reg >> 8) & 0xFF] ^
           crc_shift_table[2][(reg >> 16) & 0xFF] ^ crc_shift_table[3][reg >> 24];
}

#ifdef FASTREC_X86
/* CRC-32C of src[0:n] extending crc; when dst is not NULL, also copies src to dst (one pass
 * over the bytes instead of a memcpy and a CRC). */
__attribute__((target("sse4.2"), always_inline)) static inline uint32_t crc_hw_impl(
    uint32_t crc, uint8_t *dst, const uint8_t *src, size_t n) {
    uint64_t c = ~crc;
    while (n && ((uintptr_t)src & 7)) {
        if (dst) *dst++ = *src;
        c = _mm_crc32_u8((uint32_t)c, *src++);
        n--;
    }
    while (n >= 3 * SHIFT_LEN) {
        uint64_t c1 = 0, c2 = 0;
        for (size_t i = 0; i < SHIFT_LEN; i += 8) {
            uint64_t w0, w1, w2;
            memcpy(&w0, src + i, 8);
            memcpy(&w1, src + SHIFT_LEN + i, 8);
            memcpy(&w2, src + 2 * SHIFT_LEN + i, 8);
            if (dst) {
                memcpy(dst + i, &w0, 8);
                memcpy(dst + SHIFT_LEN + i, &w1, 8);
                memcpy(dst + 2 * SHIFT_LEN + i, &w2, 8);
            }
            c = _mm_crc32_u64(c, w0);
            c1 = _mm_crc32_u64(c1, w1);
            c2 = _mm_crc32_u64(c2, w2);
        }
        c = crc_shift(crc_shift((uint32_t)c) ^ (uint32_t)c1) ^ (uint32_t)c2;
        src += 3 * SHIFT_LEN;
        if (dst) dst += 3 * SHIFT_LEN;
        n -= 3 * SHIFT_LEN;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, src, 8);
        if (dst) {
            memcpy(dst, &w, 8);
            dst += 8;
        }
        c = _mm_crc32_u64(c, w);
        src += 8;
        n -= 8;
    }
    while (n--) {
        if (dst) *dst++ = *src;
        c = _mm_crc32_u8((uint32_t)c, *src++);
    }
    return ~(uint32_t)c;
}

__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const uint8_t *p,
                                                           size_t n) {
    return crc_hw_impl(crc, NULL, p, n);
}

__attribute__((target("sse4.2"))) static uint32_t crc_copy_hw(uint32_t crc, uint8_t *dst,
                                                                const uint8_t *src, size_t n) {
    return crc_hw_impl(crc, dst, src, n);
}
static int have_hw = 0;
#endif

static uint32_t crc32c(uint32_t crc, const uint8_t *p, size_t n) {
#ifdef FASTREC_X86
    if (have_hw) return crc_hw(crc, p, n);
#endif
    return crc_sw(crc, p, n);
}

/* Copy src[0:n] to dst and return the CRC-32C of those bytes extending crc. */
static uint32_t crc32c_copy(uint32_t crc, uint8_t *dst, const uint8_t *src, size_t n) {
#ifdef FASTREC_X86
    if (have_hw) return crc_copy_hw(crc, dst, src, n);
#endif
    memcpy(dst, src, n);
    return crc_sw(crc, dst, n);
}

static inline uint32_t masked(uint32_t crc) {
    return ((crc >> 15) | (crc << 17)) + 0xA282EAD8u;
}

/* ------------------------------------------------------------------------------------------ */
/* Buffers */

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static void buf_release(Buf *b) {
    if (b->held) PyBuffer_Release(&b->view);
    b->held = 0;
}

static int get_buf(PyObject *obj, Buf *b, int writable, const char *what) {
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &b->view, flags) < 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected a contiguous%s buffer", what,
                     writable ? " writable" : "");
        return -1;
    }
    b->held = 1;
    return 0;
}

/* An int64 array argument with n items (n < 0: any length, returned in *n). */
static int get_i64(PyObject *obj, Buf *b, Py_ssize_t *n, int writable, const char *what) {
    if (get_buf(obj, b, writable, what) < 0) return -1;
    if (b->view.len % 8 != 0 || (b->view.itemsize != 8 && b->view.itemsize != 1)) {
        PyErr_Format(PyExc_TypeError, "%s: expected an int64 array", what);
        buf_release(b);
        return -1;
    }
    Py_ssize_t items = b->view.len / 8;
    if (*n >= 0 && items != *n) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items, got %zd", what, *n, items);
        buf_release(b);
        return -1;
    }
    *n = items;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Python functions */

static PyObject *py_crc32c(PyObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"data", "crc", "hardware", NULL};
    Py_buffer data;
    unsigned long crc = 0;
    int hardware = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*|kp", names, &data, &crc, &hardware))
        return NULL;
    uint32_t out;
    Py_BEGIN_ALLOW_THREADS
#ifdef FASTREC_X86
    if (hardware && have_hw)
        out = crc_hw((uint32_t)crc, data.buf, (size_t)data.len);
    else
#endif
        out = crc_sw((uint32_t)crc, data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(out);
}

static PyObject *py_pread_records(PyObject *self, PyObject *args) {
    int fd;
    PyObject *o_off, *o_len, *o_buf, *o_start, *o_got;
    if (!PyArg_ParseTuple(args, "iOOOOO", &fd, &o_off, &o_len, &o_buf, &o_start, &o_got))
        return NULL;
    Buf off = {0}, len = {0}, buf = {0}, start = {0}, got = {0};
    Py_ssize_t n = -1;
    PyObject *result = NULL;
    if (get_i64(o_off, &off, &n, 0, "offsets") < 0 || get_i64(o_len, &len, &n, 0, "lengths") < 0 ||
        get_buf(o_buf, &buf, 1, "buf") < 0 || get_i64(o_start, &start, &n, 0, "starts") < 0 ||
        get_i64(o_got, &got, &n, 1, "got") < 0)
        goto done;
    const int64_t *po = off.view.buf, *pl = len.view.buf, *ps = start.view.buf;
    int64_t *pg = got.view.buf;
    uint8_t *base = buf.view.buf;
    Py_ssize_t cap = buf.view.len;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (pl[i] < 0 || ps[i] < 0 || po[i] < 0 || ps[i] > cap || pl[i] > cap - ps[i]) {
            PyErr_Format(PyExc_ValueError,
                         "record %zd: offset %lld, length %lld at buffer position %lld does "
                         "not fit the %zd-byte buffer",
                         i, (long long)po[i], (long long)pl[i], (long long)ps[i], cap);
            goto done;
        }
    }
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !err; i++) {
        int64_t done_bytes = 0, want = pl[i];
        while (done_bytes < want) {
            ssize_t r = pread(fd, base + ps[i] + done_bytes, (size_t)(want - done_bytes),
                              (off_t)(po[i] + done_bytes));
            if (r < 0) {
                if (errno == EINTR) continue;
                err = errno;
                break;
            }
            if (r == 0) break; /* end of file */
            done_bytes += r;
        }
        pg[i] = done_bytes;
    }
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    buf_release(&off);
    buf_release(&len);
    buf_release(&buf);
    buf_release(&start);
    buf_release(&got);
    return result;
}

static int varint(uint8_t *out, uint64_t v) {
    int k = 0;
    while (v >= 0x80) {
        out[k++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    out[k++] = (uint8_t)v;
    return k;
}

static int varint_len(uint64_t v) {
    int k = 1;
    while (v >= 0x80) {
        v >>= 7;
        k++;
    }
    return k;
}

typedef struct {
    const uint8_t *p[11];
    Py_ssize_t n[11];
} Prefixes;

static int get_prefixes(PyObject *seq, Prefixes *pre, const char *what) {
    if (!PyTuple_Check(seq) || PyTuple_GET_SIZE(seq) != 11) {
        PyErr_Format(PyExc_TypeError, "%s: expected a tuple of 11 bytes", what);
        return -1;
    }
    for (int k = 0; k < 11; k++) {
        PyObject *item = PyTuple_GET_ITEM(seq, k);
        if (!PyBytes_Check(item)) {
            PyErr_Format(PyExc_TypeError, "%s[%d]: expected bytes", what, k);
            return -1;
        }
        pre->p[k] = (const uint8_t *)PyBytes_AS_STRING(item);
        pre->n[k] = PyBytes_GET_SIZE(item);
    }
    return 0;
}

/* Map entry of an int64 feature: prefix for the varint's length, then the varint. */
static inline size_t int64_piece(uint8_t *out, const Prefixes *pre, int64_t v) {
    uint8_t tmp[10];
    int k = varint(tmp, (uint64_t)v);
    memcpy(out, pre->p[k], (size_t)pre->n[k]);
    memcpy(out + pre->n[k], tmp, (size_t)k);
    return (size_t)pre->n[k] + (size_t)k;
}

static inline size_t int64_piece_len(const Prefixes *pre, int64_t v) {
    int k = varint_len((uint64_t)v);
    return (size_t)pre->n[k] + (size_t)k;
}

/* The nested message lengths of one face Example with an n-byte image. */
typedef struct {
    size_t bytes_list, feature, entry, features, example;
} Sizes;

static Sizes example_sizes(size_t n, size_t field_len, size_t tail_len) {
    Sizes z;
    z.bytes_list = 1 + varint_len(n) + n;                                  /* BytesList */
    z.feature = 1 + varint_len(z.bytes_list) + z.bytes_list;               /* Feature */
    z.entry = field_len + 1 + varint_len(z.feature) + z.feature;           /* map entry */
    z.features = 1 + varint_len(z.entry) + z.entry + tail_len;             /* Features */
    z.example = 1 + varint_len(z.features) + z.features;                   /* Example */
    return z;
}

static PyObject *py_frame_examples(PyObject *self, PyObject *args) {
    PyObject *o_out, *o_data, *o_start, *o_end, *o_label, *o_key, *o_lpre, *o_kpre;
    Py_buffer field;
    int label_first;
    if (!PyArg_ParseTuple(args, "OOOOOOy*OOp", &o_out, &o_data, &o_start, &o_end, &o_label,
                          &o_key, &field, &o_lpre, &o_kpre, &label_first))
        return NULL;
    Buf out_buf = {0}, data = {0}, start = {0}, end = {0}, label = {0}, key = {0};
    Py_ssize_t n = -1;
    PyObject *result = NULL;
    Prefixes lpre, kpre;
    if (get_prefixes(o_lpre, &lpre, "label_prefixes") < 0 ||
        get_prefixes(o_kpre, &kpre, "key_prefixes") < 0 ||
        get_buf(o_data, &data, 0, "data") < 0 || get_i64(o_start, &start, &n, 0, "starts") < 0 ||
        get_i64(o_end, &end, &n, 0, "ends") < 0 || get_i64(o_label, &label, &n, 0, "labels") < 0 ||
        get_i64(o_key, &key, &n, 0, "keys") < 0)
        goto done;
    const int64_t *ps = start.view.buf, *pe = end.view.buf, *pl = label.view.buf,
                  *pk = key.view.buf;
    const uint8_t *src = data.view.buf;
    Py_ssize_t size = data.view.len;
    size_t field_len = (size_t)field.len;
    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (ps[i] < 0 || pe[i] < ps[i] || pe[i] > size) {
            PyErr_Format(PyExc_ValueError,
                         "record %zd: image range [%lld, %lld) is outside the %zd data bytes", i,
                         (long long)ps[i], (long long)pe[i], size);
            goto done;
        }
        size_t tail = int64_piece_len(&lpre, pl[i]) + int64_piece_len(&kpre, pk[i]);
        total += 16 + example_sizes((size_t)(pe[i] - ps[i]), field_len, tail).example;
    }
    if (get_buf(o_out, &out_buf, 1, "out") < 0) goto done;
    if ((size_t)out_buf.view.len < total) { /* too small: say how much is needed */
        result = PyLong_FromLongLong(-(long long)total);
        goto done;
    }
    uint8_t *out = (uint8_t *)out_buf.view.buf;
    const uint8_t *fp = field.buf;
    Py_BEGIN_ALLOW_THREADS
    uint8_t *w = out;
    for (Py_ssize_t i = 0; i < n; i++) {
        size_t img = (size_t)(pe[i] - ps[i]);
        size_t tail = int64_piece_len(&lpre, pl[i]) + int64_piece_len(&kpre, pk[i]);
        Sizes z = example_sizes(img, field_len, tail);
        uint64_t len = z.example;
        /* frame: uint64 length, masked CRC of those 8 bytes */
        for (int b = 0; b < 8; b++) w[b] = (uint8_t)(len >> (8 * b));
        uint32_t lc = masked(crc32c(0, w, 8));
        for (int b = 0; b < 4; b++) w[8 + b] = (uint8_t)(lc >> (8 * b));
        uint8_t *ex = w + 12, *q = ex;
        *q++ = 0x0A; /* Example.features */
        q += varint(q, z.features);
        *q++ = 0x0A; /* Features.feature: the image map entry */
        q += varint(q, z.entry);
        memcpy(q, fp, field_len); /* entry.key */
        q += field_len;
        *q++ = 0x12; /* entry.value */
        q += varint(q, z.feature);
        *q++ = 0x0A; /* Feature.bytes_list */
        q += varint(q, z.bytes_list);
        *q++ = 0x0A; /* BytesList.value */
        q += varint(q, img);
        uint32_t dc = crc32c(0, ex, (size_t)(q - ex));
        dc = crc32c_copy(dc, q, src + ps[i], img); /* the image: copied and CRC'd at once */
        q += img;
        uint8_t *rest = q;
        if (label_first) {
            q += int64_piece(q, &lpre, pl[i]);
            q += int64_piece(q, &kpre, pk[i]);
        } else {
            q += int64_piece(q, &kpre, pk[i]);
            q += int64_piece(q, &lpre, pl[i]);
        }
        dc = masked(crc32c(dc, rest, (size_t)(q - rest)));
        for (int b = 0; b < 4; b++) q[b] = (uint8_t)(dc >> (8 * b));
        w = q + 4;
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSize_t(total);
done:
    PyBuffer_Release(&field);
    buf_release(&out_buf);
    buf_release(&data);
    buf_release(&start);
    buf_release(&end);
    buf_release(&label);
    buf_release(&key);
    return result;
}

/* ------------------------------------------------------------------------------------------ */
/* check_records: the per-record form of facerec_tf.data.rec_batch.check_records (numpy). */

#define REC_MAGIC 0xCED7230Au
#define LENGTH_MASK ((1u << 29) - 1)
#define MAX_SEGMENTS 24

static inline uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline int is_sof(int m) {
    return m == 0xC0 || m == 0xC1 || m == 0xC2 || m == 0xC3 || m == 0xC5 || m == 0xC6 ||
           m == 0xC7 || m == 0xC9 || m == 0xCA || m == 0xCB || m == 0xCD || m == 0xCE ||
           m == 0xCF;
}

/* markers that are not "ff marker length segment", or that end the walk (SOF) */
static inline int not_plain(int m) {
    return is_sof(m) || m == 0xFF || m == 0x00 || m == 0x01 || (m >= 0xD0 && m <= 0xDA);
}

static int check_one(const uint8_t *d, int64_t size, int64_t off, int64_t limit, int64_t label,
                     int64_t exp_h, int64_t exp_w, int64_t max_side, int64_t *o_start,
                     int64_t *o_end) {
    if (limit > size) limit = size;
    if (off < 0 || off % 4 != 0 || off + 32 > limit) return 0;
    uint32_t magic = rd32(d + off), lrec = rd32(d + off + 4);
    if (magic != REC_MAGIC || lrec < 24 || lrec > LENGTH_MASK) return 0;
    if (off + 8 + (int64_t)((lrec + 3) & ~3u) > limit) return 0;
    int64_t flag = rd32(d + off + 8);
    int64_t start = off + 32 + 4 * flag, end = off + 8 + (int64_t)lrec;
    if (start > end) return 0;
    float value;
    uint32_t bits = rd32(d + (flag > 0 ? off + 32 : off + 12));
    memcpy(&value, &bits, 4);
    if ((double)value != (double)label) return 0;
    *o_start = start;
    *o_end = end;
    if (end - start < 4 || d[start] != 0xFF || d[start + 1] != 0xD8) return 0;
    int64_t pos = start + 2;
    for (int seg = 0; seg < MAX_SEGMENTS; seg++) {
        if (pos + 4 > end) return 0;
        const uint8_t *h = d + pos;
        int64_t seg_len = ((int64_t)h[2] << 8) | h[3];
        int marker = h[1];
        if (h[0] != 0xFF || seg_len < 2 || pos + 2 + seg_len > end) return 0;
        if (!not_plain(marker)) {
            pos += 2 + seg_len;
            continue;
        }
        if (!is_sof(marker) || seg_len < 8) return 0;
        const uint8_t *f = h + 4;
        int64_t precision = f[0], height = ((int64_t)f[1] << 8) | f[2],
                width = ((int64_t)f[3] << 8) | f[4], comps = f[5];
        if (seg_len != 8 + 3 * comps || height <= 0 || width <= 0) return 0;
        if (!(marker == 0xC0 || marker == 0xC1 || marker == 0xC2)) return 0;
        if (precision != 8 || !(comps == 1 || comps == 3)) return 0;
        if (height > max_side || width > max_side) return 0;
        if (exp_h >= 0 && (height != exp_h || width != exp_w)) return 0;
        return 1;
    }
    return 0;
}

static PyObject *py_check_records(PyObject *self, PyObject *args) {
    PyObject *o_data, *o_off, *o_label, *o_limit, *o_ok, *o_start, *o_end;
    long long exp_h, exp_w, max_side;
    if (!PyArg_ParseTuple(args, "OOOOOOOLLL", &o_data, &o_off, &o_label, &o_limit, &o_ok,
                          &o_start, &o_end, &exp_h, &exp_w, &max_side))
        return NULL;
    Buf data = {0}, off = {0}, label = {0}, limit = {0}, ok = {0}, start = {0}, end = {0};
    Py_ssize_t n = -1;
    PyObject *result = NULL;
    if (get_buf(o_data, &data, 0, "data") < 0 || get_i64(o_off, &off, &n, 0, "offsets") < 0 ||
        get_i64(o_label, &label, &n, 0, "labels") < 0 ||
        get_i64(o_limit, &limit, &n, 0, "limits") < 0 || get_buf(o_ok, &ok, 1, "ok") < 0 ||
        get_i64(o_start, &start, &n, 1, "start") < 0 || get_i64(o_end, &end, &n, 1, "end") < 0)
        goto done;
    if (ok.view.len != n) {
        PyErr_Format(PyExc_ValueError, "ok: expected %zd bytes, got %zd", n, ok.view.len);
        goto done;
    }
    const uint8_t *d = data.view.buf;
    int64_t size = data.view.len;
    const int64_t *po = off.view.buf, *pl = label.view.buf, *pm = limit.view.buf;
    uint8_t *pk = ok.view.buf;
    int64_t *ps = start.view.buf, *pe = end.view.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        ps[i] = pe[i] = 0;
        pk[i] = (uint8_t)check_one(d, size, po[i], pm[i], pl[i], exp_h, exp_w, max_side, ps + i,
                                   pe + i);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    buf_release(&data);
    buf_release(&off);
    buf_release(&label);
    buf_release(&limit);
    buf_release(&ok);
    buf_release(&start);
    buf_release(&end);
    return result;
}

static PyObject *py_start_writeback(PyObject *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd)) return NULL;
#if defined(__linux__) && defined(SYNC_FILE_RANGE_WRITE)
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE);
    Py_END_ALLOW_THREADS
    if (r != 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *py_fs_magic(PyObject *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd)) return NULL;
#if defined(__linux__)
    struct statfs st;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = fstatfs(fd, &st);
    Py_END_ALLOW_THREADS
    if (r != 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromUnsignedLongLong((unsigned long long)(uint32_t)st.f_type);
#else
    return PyLong_FromLong(-1);
#endif
}

static PyMethodDef methods[] = {
    {"crc32c", (PyCFunction)(void (*)(void))py_crc32c, METH_VARARGS | METH_KEYWORDS,
     "crc32c(data, crc=0, hardware=True) -> int: CRC-32C of data, extending crc."},
    {"check_records", py_check_records, METH_VARARGS,
     "check_records(data, offsets, labels, limits, ok, start, end, expected_height, "
     "expected_width, max_side): rec_batch.check_records, one record at a time."},
    {"start_writeback", py_start_writeback, METH_VARARGS,
     "start_writeback(fd) -> bool: start writing fd's dirty pages to disk without waiting "
     "(Linux sync_file_range); False where unsupported."},
    {"fs_magic", py_fs_magic, METH_VARARGS,
     "fs_magic(fd) -> int: f_type of fd's file system (Linux fstatfs); -1 where unknown."},
    {"pread_records", py_pread_records, METH_VARARGS,
     "pread_records(fd, offsets, lengths, buf, starts, got): read many byte ranges."},
    {"frame_examples", py_frame_examples, METH_VARARGS,
     "frame_examples(out, data, starts, ends, labels, keys, image_field, label_prefixes, "
     "key_prefixes, label_first) -> int: TFRecord-framed face Examples written into out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastrec",
    "C loops of the .rec -> TFRecord converter (see facerec_tf.data.fastrec).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastrec(void) {
    const uint16_t probe = 1;
    if (*(const uint8_t *)&probe != 1) {
        PyErr_SetString(PyExc_ImportError, "_fastrec supports little-endian hosts only");
        return NULL;
    }
    crc_init();
    crc_shift_init();
#ifdef FASTREC_X86
    __builtin_cpu_init();
    have_hw = __builtin_cpu_supports("sse4.2") != 0;
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
#ifdef FASTREC_X86
    if (PyModule_AddIntConstant(m, "HARDWARE_CRC", have_hw) < 0) return NULL;
#else
    if (PyModule_AddIntConstant(m, "HARDWARE_CRC", 0) < 0) return NULL;
#endif
    return m;
}
