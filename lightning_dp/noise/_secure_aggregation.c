/* Native kernels of secure aggregation's exchange (lightning_dp.secure_aggregation.aggregator): the fused
 * rounding / noise / mask step (encode_) and the decoding (decode_). Part of the lightning_dp.noise._boxmuller
 * extension (registered in its method table); compiled with the same flags (see setup.py and _boxmuller.c's
 * notes). The discrete Gaussian samplers are in _discrete_gaussian.c.
 */
#include "_kernels.h"

/* encode_(x, kind, words, values, mask, mask_kind, factor, limit, modulus_mask, threads[, message]) -> int: secure
 * aggregation's fused rounding step over n = len(values) coordinates:
 *   v_i = (int64)⌊x_i·factor + u_i⌋ + values_i     (u_i = (w_i + ½)·2^-32 for the 32-bit word w_i of `words`
 *                                                  (n uint32); x float32 (kind 0) or float64 (kind 2),
 *                                                  product and sum in float64, as the torch path;
 *                                                  values_i: the noise share)
 *   message_i = (v_i ± mask_i) & modulus_mask      (mask: n int64 added (mask_kind 0), or n uint32 keystream
 *                                                  words added (1) or subtracted (2)); written over values_i,
 *                                                  or into `message` (n int64, or n int32 when 2^bits <= 2^31)
 * Returns how many v_i had |v_i| >= limit or a non-finite / out-of-range ⌊x·factor + u⌋ (then the
 * caller must raise: the modular sum could wrap). */
static inline __attribute__((always_inline)) Py_ssize_t encode_loop(
    const char *x, int kind, const uint32_t *u, int64_t *values, const void *mask, int mask_kind, Py_ssize_t n,
    double factor, int64_t limit, int64_t modulus_mask, void *dest, int dest_size) {
    Py_ssize_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const double xi = kind == 0 ? (double)((const float *)x)[i] : ((const double *)x)[i];
        const double f = floor(xi * factor + ((double)u[i] + 0.5) * 0x1p-32);
        const int in_range = fabs(f) < 0x1p62;
        const int64_t v = (int64_t)((uint64_t)(in_range ? (int64_t)f : 0) + (uint64_t)values[i]);
        bad += !in_range | (v >= limit) | (v <= -limit);
        const uint64_t m = mask_kind == 0 ? (uint64_t)((const int64_t *)mask)[i]
                         : mask_kind == 1 ? (uint64_t)((const uint32_t *)mask)[i]
                                          : (uint64_t)0 - (uint64_t)((const uint32_t *)mask)[i];
        const int64_t message = (int64_t)(((uint64_t)v + m) & (uint64_t)modulus_mask); /* mod 2^64, no UB */
        if (dest_size == 4) ((int32_t *)dest)[i] = (int32_t)message; /* the caller checked: < 2^31 */
        else ((int64_t *)dest)[i] = message;
    }
    return bad;
}

/* encode_loop specialised for every (kind, mask_kind, dest_size), so that each loop vectorises */
LDP_CLONES64
static Py_ssize_t encode_range(const char *x, int kind, const uint32_t *u, int64_t *values, const void *mask,
                               int mask_kind, Py_ssize_t n, double factor, int64_t limit, int64_t modulus_mask,
                               void *dest, int dest_size) {
#define LDP_ENCODE(K, M, D) \
    if (kind == K && mask_kind == M && dest_size == D) \
        return encode_loop(x, K, u, values, mask, M, n, factor, limit, modulus_mask, dest, D);
#define LDP_ENCODE_M(K, M) LDP_ENCODE(K, M, 4) LDP_ENCODE(K, M, 8)
#define LDP_ENCODE_K(K) LDP_ENCODE_M(K, 0) LDP_ENCODE_M(K, 1) LDP_ENCODE_M(K, 2)
    LDP_ENCODE_K(0)
    LDP_ENCODE_K(2)
#undef LDP_ENCODE_K
#undef LDP_ENCODE_M
#undef LDP_ENCODE
    return encode_loop(x, kind, u, values, mask, mask_kind, n, factor, limit, modulus_mask, dest, dest_size);
}

PyObject *ldp_encode_(PyObject *self, PyObject *args) {
    Py_buffer xb, ub, vb, mb, db = {0};
    int kind, mask_kind, threads;
    double factor;
    long long limit, modulus_mask;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iy*w*y*idLLi|w*", &xb, &kind, &ub, &vb, &mb, &mask_kind, &factor, &limit,
                          &modulus_mask, &threads, &db))
        return NULL;
    const Py_ssize_t n = vb.len / 8, itemsize = kind == 0 ? 4 : 8, mask_size = mask_kind == 0 ? 8 : 4;
    void *dest = db.buf != NULL ? db.buf : vb.buf;
    const int dest_size = db.buf != NULL && db.len == n * 4 ? 4 : 8;
    PyObject *result = NULL;
    if ((kind != 0 && kind != 2) || mask_kind < 0 || mask_kind > 2 || threads < 1 || xb.len != n * itemsize ||
        ub.len != n * 4 || mb.len != n * mask_size || vb.len % 8 ||
        (db.buf != NULL && (db.len != n * dest_size || (dest_size == 4 && modulus_mask > 0x7FFFFFFFLL)))) {
        PyErr_SetString(PyExc_ValueError, "encode_: need kind 0 or 2, mask_kind 0-2, threads >= 1 and buffers of "
                                          "n elements (words: uint32; mask: int64, or uint32 for mask_kind 1-2; "
                                          "message: int64, or int32 when 2^bits <= 2^31)");
    } else {
        Py_ssize_t bad = 0;
        const Py_ssize_t block = 1 << 14, blocks = (n + block - 1) / block;
        const int team = threads > blocks ? (blocks > 0 ? (int)blocks : 1) : threads;
        Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(team) schedule(static) reduction(+ : bad)
#endif
        for (Py_ssize_t b = 0; b < blocks; b++) {
            const Py_ssize_t first = b * block, len = n - first < block ? n - first : block;
            bad += encode_range((const char *)xb.buf + first * itemsize, kind, (const uint32_t *)ub.buf + first,
                                (int64_t *)vb.buf + first, (const char *)mb.buf + first * mask_size, mask_kind, len,
                                factor, (int64_t)limit, (int64_t)modulus_mask, (char *)dest + first * dest_size,
                                dest_size);
        }
        Py_END_ALLOW_THREADS
        result = PyLong_FromSsize_t(bad);
    }
    PyBuffer_Release(&xb);
    PyBuffer_Release(&ub);
    PyBuffer_Release(&vb);
    PyBuffer_Release(&mb);
    if (db.buf != NULL) PyBuffer_Release(&db);
    return result;
}

/* decode_(summed, out, kind, bits, factor, threads): out_i = signed(summed_i mod 2^bits)·factor (summed: int32
 * or int64, told apart by its length), computed in
 * float64 and rounded once to out's dtype (kind 0: float32, 2: float64), as the torch path. */
LDP_CLONES64
static void decode_range(const void *summed, int summed_size, char *out, int kind, Py_ssize_t n, int bits,
                         double factor) {
    const int64_t modulus_mask = (int64_t)((((uint64_t)1) << bits) - 1), half = (int64_t)(((uint64_t)1) << (bits - 1));
    const int64_t modulus = (int64_t)(((uint64_t)1) << bits);
#define LDP_DECODE(SUMMED_T, OUT_T)                                       \
    for (Py_ssize_t i = 0; i < n; i++) {                                  \
        int64_t v = (int64_t)((const SUMMED_T *)summed)[i] & modulus_mask; \
        v = v >= half ? v - modulus : v;                                  \
        ((OUT_T *)out)[i] = (OUT_T)((double)v * factor);                  \
    }
    if (summed_size == 4) {
        if (kind == 0) { LDP_DECODE(int32_t, float) } else { LDP_DECODE(int32_t, double) }
    } else {
        if (kind == 0) { LDP_DECODE(int64_t, float) } else { LDP_DECODE(int64_t, double) }
    }
#undef LDP_DECODE
}

PyObject *ldp_decode_(PyObject *self, PyObject *args) {
    Py_buffer sb, ob;
    int kind, bits, threads;
    double factor;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*iidi", &sb, &ob, &kind, &bits, &factor, &threads)) return NULL;
    const Py_ssize_t itemsize = kind == 0 ? 4 : 8, n = ob.len / itemsize;
    const int summed_size = sb.len == n * 4 ? 4 : 8; /* int32 or int64 messages */
    PyObject *result = NULL;
    if ((kind != 0 && kind != 2) || bits < 1 || bits > 62 || threads < 1 || ob.len % itemsize ||
        sb.len != n * summed_size) {
        PyErr_SetString(PyExc_ValueError, "decode_: need kind 0 or 2, 1 <= bits <= 62, threads >= 1, n elements each "
                                          "(summed: int32 or int64)");
    } else {
        const Py_ssize_t block = 1 << 14, blocks = (n + block - 1) / block;
        const int team = threads > blocks ? (blocks > 0 ? (int)blocks : 1) : threads;
        Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(team) schedule(static)
#endif
        for (Py_ssize_t b = 0; b < blocks; b++) {
            const Py_ssize_t first = b * block, len = n - first < block ? n - first : block;
            decode_range((const char *)sb.buf + first * summed_size, summed_size, (char *)ob.buf + first * itemsize,
                         kind, len, bits, factor);
        }
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&sb);
    PyBuffer_Release(&ob);
    return result;
}
