/* Native Box–Muller kernels of the noise package (both optional: Python falls back to torch ops).
 *
 * box_muller_ (GaussianNoise, seeded, float32). Over a piece of 2·half 32-bit keystream words, pair i
 * uses word i for the radius and word half + i for the angle, exactly as the torch path in gaussian.py:
 *
 *   u = (2·(w_i mod 2^23) + 1)·2^-24          uniform on the midpoints of a 2^-23 grid, never 0 or 1
 *   r = std·sqrt(-2 ln u),  θ = w_{half+i}·π/2^31   (w read as a signed integer: θ ∈ [-π, π))
 *
 * and overwrites word i with r·cos θ and word half + i with r·sin θ (float32), in place.
 *
 * sum_normals_ (SecureRNG, float64). Over a chunk of 2·k·size 64-bit keystream words laid out as
 * (2, k, size) (words [i·size + j] are the radius uniforms u_ij, words [(k + i)·size + j] the angle
 * uniforms v_ij), exactly as _box_muller_sum_ in secure_normal.py:
 *
 *   u = (2·(w mod 2^52) + 1)·2^-53            52 random bits, never 0 or 1 (exact in float64)
 *   c_j = scale·Σ_i sqrt(-2 ln u_ij)·cos(2π v_ij),   s_j = the same with sin      (i = 0 .. k-1, in order)
 *
 * all in float64, and writes (or adds) c_0 .. c_{size-1}, s_0 .. s_{size-1}, each rounded once, to a
 * sequence of float32/float64 buffers that together hold those 2·size outputs in that order.
 * The transcendental functions are written out, branch-free so that they vectorise: ln u as in fdlibm's
 * e_log.c (u = 2^e·m with m in [√2/2, √2), a rational approximation in s = (m-1)/(m+1): < 1 ulp);
 * cos and sin of 2πv by an exact reduction to an octant (v − q/4 with q = round(4v) is exact on the
 * 2^-53 grid) and the polynomial kernels of fdlibm / FreeBSD msun (k_sin.c, k_cos.c: < 1 ulp on
 * [-π/4, π/4]), so the only rounding of the angle is that of x = 2π·(v − q/4).
 *
 * Vectorisation: the float32 kernel calls glibc's libmvec (logf/cosf/sinf: SSE to AVX-512 variants,
 * at most 4 ulp), declared below with GCC's simd attribute; the kernels are cloned for x86-64-v4 / v3
 * (or AVX2) and a baseline, picked at load time. The file is compiled without
 * -ffast-math: the float64 kernel relies on IEEE arithmetic being evaluated as written (exact reduction,
 * the compensated cosine), and the module never changes the process's floating-point mode (no
 * crtfastmath.o). Only the float32 kernel is optimised as under fast-math (a pragma), as it always was.
 * FMA contraction is off (-ffp-contract=off) so that the float64 products and sums are rounded as in
 * the torch path. A pair goes through the same code path whatever
 * thread or range computes it, so the output bits do not depend on the thread count. The GIL is released
 * while a kernel runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK 512      /* box_muller_: pairs per inner block */
#define SUM_BLOCK 256  /* sum_normals_: pairs per inner block */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
/* glibc's libmvec has SSE, AVX, AVX2 and AVX-512 variants of these (glibc >= 2.22): let GCC call them. */
extern float logf(float) __attribute__((simd("notinbranch")));
extern float cosf(float) __attribute__((simd("notinbranch")));
extern float sinf(float) __attribute__((simd("notinbranch")));
/* libmvec's double exp (< 1 ulp in glibc's tables for the vector variants): the discrete Gaussian kernel. */
extern double exp(double) __attribute__((simd("notinbranch")));
#define LDP_CLONES __attribute__((target_clones("avx2", "default")))
#if __GNUC__ >= 12
#define LDP_CLONES64 __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LDP_CLONES64 LDP_CLONES
#endif
#else
#define LDP_CLONES
#define LDP_CLONES64
#endif

/* ------------------------------------------------------------------------------- box_muller_ (float32) */

/* Compiled as with -ffast-math (as before the float64 kernel joined this file), so a seed keeps
 * replaying the same bits: GCC then computes the vectorised sqrtf as x·rsqrt(x) with a Newton step. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fast-math")
#endif
LDP_CLONES
static void box_muller_inplace(int32_t *radius_words, int32_t *angle_words, Py_ssize_t n, double std) {
    /* std² folded into the logarithm's factor, unless 2·std² overflows float32 (then applied after) */
    const int folded = 2.0 * std * std < 3.4e38;
    const float scale = folded ? (float)(-2.0 * std * std) : -2.0f;
    const float post = folded ? 1.0f : (float)std;
    const float to_angle = 3.14159265358979323846f / 2147483648.0f;
    float r[BLOCK], t[BLOCK], c[BLOCK];
    for (Py_ssize_t b = 0; b < n; b += BLOCK) {
        Py_ssize_t len = n - b < BLOCK ? n - b : BLOCK;
        const int32_t *ri = radius_words + b, *ai = angle_words + b;
        for (Py_ssize_t j = 0; j < len; j++) {
            float u = (float)(2 * (ri[j] & 0x7FFFFF) + 1) * 5.9604644775390625e-08f; /* exact */
            r[j] = sqrtf(scale * logf(u)) * post;
            t[j] = (float)ai[j] * to_angle;
        }
        for (Py_ssize_t j = 0; j < len; j++) c[j] = r[j] * cosf(t[j]);
        for (Py_ssize_t j = 0; j < len; j++) t[j] = r[j] * sinf(t[j]);
        memcpy(radius_words + b, c, sizeof(float) * (size_t)len);
        memcpy(angle_words + b, t, sizeof(float) * (size_t)len);
    }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

static PyObject *box_muller_(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t half, start, stop;
    double std;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*nnnd", &view, &half, &start, &stop, &std)) return NULL;
    if (half < 0 || start < 0 || stop < start || stop > half || view.len < (Py_ssize_t)(8 * half)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "box_muller_: need 0 <= start <= stop <= half and 8*half bytes");
        return NULL;
    }
    int32_t *words = (int32_t *)view.buf;
    Py_BEGIN_ALLOW_THREADS
    box_muller_inplace(words + start, words + half + start, stop - start, std);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------ sum_normals_ (float64) */

/* (2·(w mod 2^52) + 1)·2^-53: the mantissa bits under the exponent of 1.0 give 1 + j·2^-52, minus
 * (1 − 2^-53); both steps are exact. */
static inline double unit_midpoint(uint64_t w) {
    uint64_t bits = (w & 0xFFFFFFFFFFFFFull) | 0x3FF0000000000000ull;
    double x;
    memcpy(&x, &bits, sizeof x);
    return x - (1.0 - 0x1p-53);
}

/* ln x for x in (0, 1) (no zero, negative, subnormal or non-finite input): fdlibm's e_log.c without
 * its special cases. x = 2^e·m, m in [√2/2, √2); f = m - 1, s = f/(2 + f); ln m = 2s + s·R(s²), R the
 * minimax polynomial Lg1..Lg7; ln x = e·ln2_hi - ((f²/2 - (s·(f²/2 + R) + e·ln2_lo)) - f). */
static inline double log_unit(double x) {
    const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
    const double Lg1 = 6.666666666666735130e-01, Lg2 = 3.999999999940941908e-01,
                 Lg3 = 2.857142874366239149e-01, Lg4 = 2.222219843214978396e-01,
                 Lg5 = 1.818357216161805012e-01, Lg6 = 1.531383769920937332e-01,
                 Lg7 = 1.479819860511658591e-01;
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    /* e in [-53, 0] from the top 12 bits of bits − bits(√2/2), sign-extended; only logical shifts and
     * integer adds, so that AVX2 (no 64-bit arithmetic shift, no int64 → double) vectorises it too. */
    const uint64_t e12 = (bits - 0x3FE6A09E667F3BCDull) >> 52;
    const uint64_t e = (e12 ^ 0x800u) - 0x800u; /* two's complement e */
    const uint64_t mantissa_bits = bits - (e << 52);
    const uint64_t e_bits = e + 0x4338000000000000ull; /* the double 2^52 + 2^51 + e */
    double m, de;
    memcpy(&m, &mantissa_bits, sizeof m);
    memcpy(&de, &e_bits, sizeof de);
    de -= 0x1.8p52; /* exact: e */
    const double f = m - 1.0, s = f / (2.0 + f), z = s * s, w = z * z;
    const double R = z * (Lg1 + w * (Lg3 + w * (Lg5 + w * Lg7))) + w * (Lg2 + w * (Lg4 + w * Lg6));
    const double hfsq = 0.5 * f * f;
    return de * ln2_hi - ((hfsq - (s * (hfsq + R) + de * ln2_lo)) - f);
}

/* cos and sin of θ = 2π·turn for turn on the 2^-53 grid in (0, 1): an exact reduction to an octant and
 * fdlibm / FreeBSD msun's __kernel_sin and __kernel_cos (|x| <= π/4, < 1 ulp). */
static inline __attribute__((always_inline)) void turn_cos_sin(double turn, double *cos_out, double *sin_out) {
    const double S1 = -1.66666666666666324348e-01, S2 = 8.33333333332248946124e-03,
                 S3 = -1.98412698298579493134e-04, S4 = 2.75573137070700676789e-06,
                 S5 = -2.50507602534068634195e-08, S6 = 1.58969099521155010221e-10;
    const double C1 = 4.16666666666666019037e-02, C2 = -1.38888888888741095749e-03,
                 C3 = 2.48015872894767294178e-05, C4 = -2.75573143513906633035e-07,
                 C5 = 2.08757232129817482790e-09, C6 = -1.13596475577881948265e-11;
    const double two_pi = 6.28318530717958647692528676655900577;
    /* 4·turn + 2^52 + 2^51 rounds 4·turn to the nearest integer q (never a tie: 4·turn = (2j + 1)·2^-51)
     * and holds q in its low mantissa bits; subtracting the constant again gives q exactly. */
    const double magic = 0x1.8p52;
    const double qm = 4.0 * turn + magic;
    const double q = qm - magic;                  /* nearest quarter turn, 0..4 */
    const double x = (turn - 0.25 * q) * two_pi; /* turn − q/4 is exact; x ∈ [-π/4, π/4] */
    uint64_t quadrant;
    memcpy(&quadrant, &qm, sizeof quadrant);
    quadrant &= 3;
    const double z = x * x, w = z * z;
    const double rs = S2 + z * (S3 + z * S4) + z * w * (S5 + z * S6);
    const double sin_x = x + z * x * (S1 + z * rs);
    const double rc = z * (C1 + z * (C2 + z * C3)) + w * w * (C4 + z * (C5 + z * C6));
    const double hz = 0.5 * z, one_hz = 1.0 - hz;
    const double cos_x = one_hz + (((1.0 - one_hz) - hz) + z * rc);
    /* θ = quadrant·π/2 + x */
    double cos_t = (quadrant & 1) ? sin_x : cos_x, sin_t = (quadrant & 1) ? cos_x : sin_x;
    if ((quadrant + 1) & 2) cos_t = -cos_t; /* quadrants 1, 2 */
    if (quadrant & 2) sin_t = -sin_t;       /* quadrants 2, 3 */
    *cos_out = cos_t;
    *sin_out = sin_t;
}

LDP_CLONES64
static void sum_normals(const uint64_t *words, Py_ssize_t k, Py_ssize_t size, Py_ssize_t b, Py_ssize_t len,
                        double scale, double *c, double *s) {
    double r[SUM_BLOCK];
    for (Py_ssize_t i = 0; i < k; i++) {
        const uint64_t *u = words + i * size + b, *v = words + (k + i) * size + b;
        for (Py_ssize_t j = 0; j < len; j++) r[j] = sqrt(-2.0 * log_unit(unit_midpoint(u[j]))) * scale;
        for (Py_ssize_t j = 0; j < len; j++) {
            double cos_t, sin_t;
            turn_cos_sin(unit_midpoint(v[j]), &cos_t, &sin_t);
            const double tc = r[j] * cos_t, ts = r[j] * sin_t;
            if (i == 0) {
                c[j] = tc;
                s[j] = ts;
            } else {
                c[j] += tc;
                s[j] += ts;
            }
        }
    }
}

enum { STORE_F32 = 0, ADD_F32 = 1, STORE_F64 = 2, ADD_F64 = 3 };

typedef struct {
    char *data;
    Py_ssize_t count; /* elements */
    int kind;
} target_t;

typedef struct {
    const target_t *targets;
    Py_ssize_t index; /* current target */
    Py_ssize_t start; /* output position of its first element */
} cursor_t;

/* Outputs pos .. pos + len - 1 (values) into the targets, through a cursor that only moves forward. */
static void emit(cursor_t *cursor, Py_ssize_t pos, const double *values, Py_ssize_t len) {
    while (len > 0) {
        const target_t *t = cursor->targets + cursor->index;
        Py_ssize_t at = pos - cursor->start;
        if (at >= t->count) {
            cursor->start += t->count;
            cursor->index++;
            continue;
        }
        Py_ssize_t n = t->count - at < len ? t->count - at : len;
        switch (t->kind) {
        case STORE_F32: {
            float *d = (float *)t->data + at;
            for (Py_ssize_t j = 0; j < n; j++) d[j] = (float)values[j];
            break;
        }
        case ADD_F32: {
            float *d = (float *)t->data + at;
            for (Py_ssize_t j = 0; j < n; j++) d[j] += (float)values[j];
            break;
        }
        case STORE_F64: {
            memcpy((double *)t->data + at, values, sizeof(double) * (size_t)n);
            break;
        }
        default: {
            double *d = (double *)t->data + at;
            for (Py_ssize_t j = 0; j < n; j++) d[j] += values[j];
            break;
        }
        }
        pos += n;
        values += n;
        len -= n;
    }
}

/* Point a cursor at output position pos (binary search over the targets' end positions). */
static void seek(cursor_t *cursor, const Py_ssize_t *ends, Py_ssize_t ntargets, Py_ssize_t pos) {
    Py_ssize_t lo = 0, hi = ntargets - 1;
    while (lo < hi) { /* the first target whose end is past pos */
        Py_ssize_t mid = (lo + hi) / 2;
        if (ends[mid] > pos) hi = mid; else lo = mid + 1;
    }
    cursor->index = lo;
    cursor->start = ends[lo] - cursor->targets[lo].count;
}

/* The sums of normals of one chunk (words: 2·k·size uint64, layout (2, k, size)) to output positions
 * first .. first + 2·size − 1 of the targets. */
static void chunk_to_targets(const uint64_t *words, Py_ssize_t k, Py_ssize_t size, double scale,
                             const target_t *targets, const Py_ssize_t *ends, Py_ssize_t ntargets,
                             Py_ssize_t first) {
    double c[SUM_BLOCK], s[SUM_BLOCK];
    cursor_t cos_cursor = {targets, 0, 0}, sin_cursor = {targets, 0, 0};
    seek(&cos_cursor, ends, ntargets, first);
    seek(&sin_cursor, ends, ntargets, first + size);
    for (Py_ssize_t b = 0; b < size; b += SUM_BLOCK) {
        Py_ssize_t len = size - b < SUM_BLOCK ? size - b : SUM_BLOCK;
        sum_normals(words, k, size, b, len, scale, c, s);
        emit(&cos_cursor, first + b, c, len);
        emit(&sin_cursor, first + size + b, s, len);
    }
}

typedef struct {
    Py_buffer *views;
    target_t *targets;
    Py_ssize_t *ends;
    Py_ssize_t count, acquired, total;
} target_list_t;

static void release_targets(target_list_t *list) {
    for (Py_ssize_t t = 0; t < list->acquired; t++) PyBuffer_Release(&list->views[t]);
    PyMem_Free(list->views);
    PyMem_Free(list->targets);
    PyMem_Free(list->ends);
}

/* The (buffer, kind) targets, their buffers acquired (writable) until release_targets. */
static int acquire_targets(PyObject *spec, target_list_t *list) {
    memset(list, 0, sizeof *list);
    PyObject *seq = PySequence_Fast(spec, "targets must be a sequence of (buffer, kind)");
    if (seq == NULL) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    size_t slots = (size_t)(n > 0 ? n : 1);
    list->count = n;
    list->views = PyMem_Calloc(slots, sizeof(Py_buffer));
    list->targets = PyMem_Calloc(slots, sizeof(target_t));
    list->ends = PyMem_Calloc(slots, sizeof(Py_ssize_t));
    if (list->views == NULL || list->targets == NULL || list->ends == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t t = 0; t < n; t++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, t), *buffer;
        int kind;
        if (!PyArg_ParseTuple(item, "Oi", &buffer, &kind)) goto fail;
        if (kind < STORE_F32 || kind > ADD_F64) {
            PyErr_SetString(PyExc_ValueError, "targets: kind must be 0..3");
            goto fail;
        }
        if (PyObject_GetBuffer(buffer, &list->views[t], PyBUF_WRITABLE) < 0) goto fail;
        list->acquired++;
        Py_ssize_t itemsize = kind >= STORE_F64 ? 8 : 4;
        list->targets[t].data = list->views[t].buf;
        list->targets[t].count = list->views[t].len / itemsize;
        list->targets[t].kind = kind;
        list->total += list->targets[t].count;
        list->ends[t] = list->total;
    }
    Py_DECREF(seq);
    return 0;
fail:
    Py_DECREF(seq);
    release_targets(list);
    return -1;
}

static PyObject *sum_normals_(PyObject *self, PyObject *args) {
    Py_buffer words;
    Py_ssize_t k, size;
    double scale;
    PyObject *spec;
    target_list_t list;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nndO", &words, &k, &size, &scale, &spec)) return NULL;
    if (k < 1 || size < 0 || words.len / 16 / k < size) {
        PyBuffer_Release(&words);
        PyErr_SetString(PyExc_ValueError, "sum_normals_: need k >= 1, size >= 0 and 16*k*size bytes of words");
        return NULL;
    }
    if (acquire_targets(spec, &list) < 0) {
        PyBuffer_Release(&words);
        return NULL;
    }
    PyObject *result = NULL;
    if (list.total != 2 * size) {
        PyErr_SetString(PyExc_ValueError, "sum_normals_: the targets must hold exactly 2*size elements");
    } else {
        Py_BEGIN_ALLOW_THREADS
        if (size > 0) chunk_to_targets((const uint64_t *)words.buf, k, size, scale, list.targets, list.ends, list.count, 0);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    release_targets(&list);
    PyBuffer_Release(&words);
    return result;
}

/* Keep the first error of a fill_ (the pending exception, with the GIL held), clear later ones; returns 0. */
static int keep_error(volatile int *failed, PyObject **type, PyObject **value, PyObject **traceback) {
    if (!*failed) {
        *failed = 1;
        PyErr_Fetch(type, value, traceback);
    } else {
        PyErr_Clear();
    }
    return 0;
}

/* fill_(keystream, k, pairs, chunk, scale, targets, threads): a whole draw. Chunk i (pairs i·chunk ..)
 * gets its keystream from keystream(first_pair, size, buffer), a Python callable run with the GIL (it
 * releases it while OpenSSL works), then becomes normals in the targets without the GIL. The chunks are
 * shared out dynamically to `threads` OpenMP threads: the team torch's own operators use (torch's
 * libgomp, loaded first, serves this module too), so no thread has to be woken and none competes with
 * idle OpenMP workers still spinning after torch's last parallel region. */
static PyObject *fill_(PyObject *self, PyObject *args) {
    PyObject *keystream, *spec;
    Py_ssize_t k, pairs, chunk;
    double scale;
    int threads;
    target_list_t list;
    (void)self;
    if (!PyArg_ParseTuple(args, "OnnndOi", &keystream, &k, &pairs, &chunk, &scale, &spec, &threads)) return NULL;
    if (k < 1 || pairs < 0 || chunk < 1 || threads < 1 || !PyCallable_Check(keystream)) {
        PyErr_SetString(PyExc_ValueError, "fill_: need a callable keystream, k >= 1, pairs >= 0, chunk >= 1, threads >= 1");
        return NULL;
    }
    if (acquire_targets(spec, &list) < 0) return NULL;
    if (list.total != 2 * pairs) {
        release_targets(&list);
        PyErr_SetString(PyExc_ValueError, "fill_: the targets must hold exactly 2*pairs elements");
        return NULL;
    }
    const Py_ssize_t chunks = (pairs + chunk - 1) / chunk;
    const size_t buffer_bytes = (size_t)(16 * k * chunk);
    PyObject *error_type = NULL, *error_value = NULL, *error_traceback = NULL;
    volatile int failed = 0;
    if (threads > chunks) threads = chunks > 0 ? (int)chunks : 1;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
    {
        uint64_t *words = malloc(buffer_bytes);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (Py_ssize_t i = 0; i < chunks; i++) {
            if (failed) continue;
            const Py_ssize_t first = i * chunk, size = pairs - first < chunk ? pairs - first : chunk;
            int ok = 1;
            PyGILState_STATE gil = PyGILState_Ensure();
            PyObject *view = words ? PyMemoryView_FromMemory((char *)words, 16 * k * size, PyBUF_WRITE) : NULL;
            if (view == NULL) {
                if (!PyErr_Occurred()) PyErr_NoMemory();
                ok = keep_error(&failed, &error_type, &error_value, &error_traceback);
            } else {
                PyObject *done = PyObject_CallFunction(keystream, "nnO", first, size, view);
                if (done == NULL) ok = keep_error(&failed, &error_type, &error_value, &error_traceback);
                Py_XDECREF(done);
                /* the buffer is ours again: an error here means the callable kept a view of it */
                PyObject *released = PyObject_CallMethod(view, "release", NULL);
                if (released == NULL) ok = keep_error(&failed, &error_type, &error_value, &error_traceback);
                Py_XDECREF(released);
                Py_DECREF(view);
            }
            PyGILState_Release(gil);
            if (ok) chunk_to_targets(words, k, size, scale, list.targets, list.ends, list.count, 2 * first);
        }
        free(words);
    }
    Py_END_ALLOW_THREADS
    release_targets(&list);
    if (failed) {
        PyErr_Restore(error_type, error_value, error_traceback);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------ discrete Gaussian (secure aggregation) */

/* discrete_gaussian_: the sampler of Canonne, Kamath & Steinke (2020), Algorithm 3, as the torch path of
 * lightning_dp/secure_aggregation/discrete_gaussian.py, over a caller's buffer of 64-bit words, each read as
 * the uniform unit_midpoint(w) = (2·(w mod 2^52) + 1)·2^-53 in (0, 1). A candidate takes two uniforms u, u': sign = (2u < 1), V = 2u mod 1 (exact), G = ⌊-t·ln V⌋
 * (the discrete Laplace proposal Y = ±G, t = ⌊σ⌋ + 1), accepted when u' < exp(-(G − σ²/t)²/(2σ²)) and
 * Y is not "−0". ln is log_unit (fdlibm, < 1 ulp), exp libmvec's (or libm's), all in float64.
 *
 * The buffer is cut into chunks of DG_CHUNK candidates (the last one shorter); chunk i's candidates are
 * uniforms [2·i·DG_CHUNK, +size) (proposals) and [2·i·DG_CHUNK + size, +size) (acceptance tests). The
 * accepted values of every chunk, in candidate order, are written as int64 over the chunk's own start
 * (the buffer is destroyed); the output is the chunks' accepted values in chunk order, the first `count`
 * of them. A chunk's values depend on its slice alone, so the output does not depend on the thread count
 * or the schedule. Accepted candidates of i.i.d. candidates, the first `count` of them, are i.i.d. with the
 * discrete Gaussian law (a stopping time on an i.i.d. sequence). */
#define DG_CHUNK 4096
#define DG_BLOCK 256

LDP_CLONES64
static Py_ssize_t dg_chunk(uint64_t *u, Py_ssize_t size, double t, double shift, double coef) {
    const uint64_t *proposal = u, *test = u + size;
    int64_t *out = (int64_t *)u; /* accepted values overwrite proposals already read */
    double y[DG_BLOCK];
    int64_t ok[DG_BLOCK];
    Py_ssize_t n = 0;
    for (Py_ssize_t b = 0; b < size; b += DG_BLOCK) {
        const Py_ssize_t len = size - b < DG_BLOCK ? size - b : DG_BLOCK;
        for (Py_ssize_t j = 0; j < len; j++) {
            const double doubled = unit_midpoint(proposal[b + j]) * 2.0;
            const int negative = doubled < 1.0;
            const double v = negative ? doubled : doubled - 1.0;
            const double g = floor(log_unit(v) * -t);
            const double z = g - shift;
            const double p = exp(z * z * coef);
            y[j] = negative ? -g : g;
            ok[j] = (unit_midpoint(test[b + j]) < p) & !(negative & (g == 0.0));
        }
        for (Py_ssize_t j = 0; j < len; j++) {
            out[n] = (int64_t)y[j]; /* n <= b + j: a proposal of this block or an earlier one, already read */
            n += ok[j];
        }
    }
    return n;
}

/* The rounded-Gaussian sampler (method 1), for large σ: a candidate is X = round(σZ) of a standard normal Z
 * drawn by the ziggurat (Marsaglia & Tsang 2000, 256 layers, tables below), accepted with probability
 * exp((σ²Z² − X²)/(2σ²) − c). Then P(X = x, accepted) ∝ ∫_{x−½}^{x+½} φ_σ(z)·e^{(z² − x²)/(2σ²)} dz
 * = e^{−x²/(2σ²)}: exactly the discrete Gaussian kernel, provided the acceptance never exceeds 1.
 * |(σZ)² − X²| ≤ |σZ| + ¼ and the ziggurat on the 2⁻⁵³ grid never gives |Z| > ZIG_ZMAX (its tail,
 * R + a with a = −ln U/R, U ≥ 2⁻⁵³), so c = (ZIG_ZMAX·σ + 1)/(2σ²) covers it.
 *
 * Chunk layout (size candidates, zig_chunk_words(size, p) words): size words, candidate j's in word j (its
 * point in the layer from the low 52 bits, unit_midpoint; its layer from bits 52-59, its sign from bit 60:
 * the generators give 64 random bits per word), then a reserve of uniforms consumed in order by the rare
 * steps: a wedge test (1 uniform), a tail attempt (2), and the acceptance tests. A candidate's
 * acceptance is Bernoulli(e^y), y = (σ²Z² − X²)/(2σ²) − c in [−2c, 0], drawn as "no event, or an event
 * and then Bernoulli((e^y − e^{−2c})/(1 − e^{−2c}))" with events of probability p = 1 − e^{−2c},
 * independent of everything else: which normals see an event is a Bernoulli(p) sequence, drawn by its
 * geometric gaps (1 uniform each) — about 2p uniforms per candidate instead of 1. A chunk whose reserve
 * runs out (sized at > 10 standard deviations above its mean use) raises instead of guessing. */
#define ZIG_LAYERS 256
static double zig_x[ZIG_LAYERS + 1], zig_f[ZIG_LAYERS + 1], zig_r, zig_v, zig_zmax;

/* zig_x[i] is layer i's right edge, zig_f[i] = e^{−zig_x[i]²/2}; layer i (i >= 1) is the rectangle
 * [0, zig_x[i]] × [zig_f[i], zig_f[i+1]] of area v; layer 0 is [0, R] × [0, f(R)] plus the tail beyond R
 * (area v: zig_x[0] = v/f(R) is its virtual width). Returns the top layer's area minus v. */
static double zig_build(double r) {
    const double fr = exp(-0.5 * r * r);
    const double v = r * fr + sqrt(M_PI / 2.0) * erfc(r / sqrt(2.0));
    zig_r = r;
    zig_v = v;
    zig_x[0] = v / fr;
    zig_x[1] = r;
    zig_f[0] = fr;
    zig_f[1] = fr;
    for (int i = 1; i < ZIG_LAYERS - 1; i++) {
        const double next = v / zig_x[i] + zig_f[i];
        if (next >= 1.0) return -1.0; /* r too small: the layers reach the top early */
        zig_x[i + 1] = sqrt(-2.0 * log(next));
        zig_f[i + 1] = next;
    }
    zig_x[ZIG_LAYERS] = 0.0;
    zig_f[ZIG_LAYERS] = 1.0;
    return zig_x[ZIG_LAYERS - 1] * (1.0 - zig_f[ZIG_LAYERS - 1]) - v;
}

/* R such that all 256 layers have the same area (bisection to the last bit; Marsaglia & Tsang's
 * R = 3.6541528853610088 to 16 digits), then the tables for it. */
static void zig_init(void) {
    double lo = 3.5, hi = 3.8;
    for (int k = 0; k < 200 && hi - lo > 0.0; k++) {
        const double mid = 0.5 * (lo + hi);
        if (mid == lo || mid == hi) break;
        if (zig_build(mid) > 0.0) hi = mid; else lo = mid;
    }
    zig_build(lo);
    zig_zmax = (zig_r + 53.0 * M_LN2 / zig_r) * (1.0 + 0x1p-40);
}

static Py_ssize_t zig_reserve(Py_ssize_t size, double p_event) {
    const double mean = (double)size * (0.02 + 2.0 * p_event) + 1.0; /* wedges ~1.5 %, tails, events */
    return (Py_ssize_t)ceil(mean + 12.0 * sqrt(3.0 * mean) + 32.0);
}

static Py_ssize_t zig_chunk_words(Py_ssize_t size, double p_event) {
    return size + zig_reserve(size, p_event);
}

/* The rounded sampler's c and event probability p at this σ. */
static void zig_acceptance(double sigma, double *c, double *p_event) {
    *c = (zig_zmax * sigma + 1.0) / (2.0 * sigma * sigma);
    *p_event = -expm1(-2.0 * *c);
}

LDP_CLONES64
static Py_ssize_t dg_rounded_chunk(uint64_t *u, Py_ssize_t size, double sigma, double c, double p_event) {
    const uint64_t *next = u + size, *end = next + zig_reserve(size, p_event);
    const double inv_two_var = 0.5 / (sigma * sigma), e2c = exp(-2.0 * c), log1m_p = log1p(-p_event);
    double z[DG_CHUNK], rounded[DG_CHUNK];
    int32_t code[DG_CHUNK]; /* layer | sign << 8 | fast << 9 */
    /* every candidate as if on the fast path (vectorised); the slow ones are redone below */
    for (Py_ssize_t j = 0; j < size; j++) {
        const uint64_t w = u[j];
        const int64_t layer = (int64_t)((w >> 52) & 255u), negative = (int64_t)((w >> 60) & 1u);
        const double x = unit_midpoint(w) * zig_x[layer];
        const double zs = negative ? -(sigma * x) : sigma * x;
        z[j] = x;
        rounded[j] = floor(zs + 0.5);
        code[j] = (int32_t)(layer | negative << 8 | (int64_t)(x < zig_x[layer + 1]) << 9);
    }
    int exhausted = 0;
#define ZIG_NEXT() (next < end ? unit_midpoint(*next++) : (exhausted = 1, 0.5))
    double gap = floor(log_unit(ZIG_NEXT()) / log1m_p);
    int64_t *out = (int64_t *)u; /* accepted values overwrite words already read */
    Py_ssize_t n = 0;
    for (Py_ssize_t j = 0; j < size; j++) {
        double x = z[j], value = rounded[j];
        if (!(code[j] >> 9)) {
            const int layer = code[j] & 255;
            if (layer == 0) { /* the tail beyond R: Marsaglia's exponential rejection, to acceptance */
                double a, b;
                do {
                    a = -log_unit(ZIG_NEXT()) / zig_r;
                    b = -log_unit(ZIG_NEXT());
                } while (2.0 * b < a * a && !exhausted);
                x = zig_r + a;
            } else { /* a wedge: under the curve or nothing */
                const double y = zig_f[layer] + ZIG_NEXT() * (zig_f[layer + 1] - zig_f[layer]);
                if (!(y < exp(-0.5 * x * x))) {
                    if (exhausted) return -1;
                    continue;
                }
            }
            value = floor(((code[j] >> 8) & 1 ? -(sigma * x) : sigma * x) + 0.5);
        }
        if (gap >= 1.0) { /* no event: accepted */
            gap -= 1.0;
            out[n++] = (int64_t)value;
            continue;
        }
        /* an event: Bernoulli((e^y − e^{−2c})/(1 − e^{−2c})), with y + 2c = e(σZ + X)/(2σ²) + c */
        const double zs = (code[j] >> 8) & 1 ? -(sigma * x) : sigma * x, e = zs - value;
        const double threshold = e2c * expm1(e * (zs + value) * inv_two_var + c) / p_event;
        const int accept = ZIG_NEXT() < threshold;
        gap = floor(log_unit(ZIG_NEXT()) / log1m_p);
        if (exhausted) return -1;
        if (accept) out[n++] = (int64_t)value;
    }
#undef ZIG_NEXT
    return exhausted ? -1 : n;
}

/* discrete_gaussian_(uniforms, out, variance, add, threads[, method, candidates]) -> (filled, used): method 0
 * is Canonne–Kamath–Steinke (two words per candidate; candidates = len/2), method 1 the rounded Gaussian
 * (`candidates` of them in dg_rounded_words(variance, candidates) words). `used`: the words of the chunks
 * that gave the output. */
static PyObject *discrete_gaussian_(PyObject *self, PyObject *args) {
    Py_buffer ubuf, obuf;
    double variance;
    int add, threads, method = 0;
    Py_ssize_t candidates = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*w*dii|in", &ubuf, &obuf, &variance, &add, &threads, &method, &candidates))
        return NULL;
    const double sigma = sqrt(variance), t = floor(sigma) + 1.0, shift = variance / t, coef = -0.5 / variance;
    double c = 0.0, p_event = 0.0;
    if (method == 1 && variance > 0.0 && isfinite(variance)) zig_acceptance(sigma, &c, &p_event);
    if (method == 0) candidates = ubuf.len / 16;
    const Py_ssize_t chunks = candidates > 0 ? (candidates + DG_CHUNK - 1) / DG_CHUNK : 0;
    const Py_ssize_t full_words = method == 1 ? zig_chunk_words(DG_CHUNK, p_event) : 2 * DG_CHUNK;
    const Py_ssize_t last_size = candidates - (chunks - 1) * DG_CHUNK;
    const Py_ssize_t needed = chunks == 0 ? 0 : (chunks - 1) * full_words +
        (method == 1 ? zig_chunk_words(last_size, p_event) : 2 * last_size);
    if (!(variance > 0.0) || !isfinite(variance) || threads < 1 || ubuf.len % 8 || obuf.len % 8 ||
        (method != 0 && method != 1) || candidates < 0 || (method == 1 && ubuf.len / 8 < needed)) {
        PyBuffer_Release(&ubuf);
        PyBuffer_Release(&obuf);
        PyErr_SetString(PyExc_ValueError, "discrete_gaussian_: need finite variance > 0, threads >= 1, 8-byte buffers, "
                                          "method 0 or 1 (method 1: candidates >= 0 and dg_rounded_words of them)");
        return NULL;
    }
    const Py_ssize_t count = obuf.len / 8;
    Py_ssize_t *counts = PyMem_Calloc((size_t)(chunks > 0 ? chunks : 1), 2 * sizeof(Py_ssize_t));
    if (counts == NULL) {
        PyBuffer_Release(&ubuf);
        PyBuffer_Release(&obuf);
        return PyErr_NoMemory();
    }
    Py_ssize_t *starts = counts + (chunks > 0 ? chunks : 1);
    uint64_t *u = (uint64_t *)ubuf.buf;
    int64_t *out = (int64_t *)obuf.buf;
    Py_ssize_t filled = 0, used = 0, last = 0;
    int exhausted = 0;
    if (threads > chunks) threads = chunks > 0 ? (int)chunks : 1;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (Py_ssize_t i = 0; i < chunks; i++) {
        const Py_ssize_t first = i * DG_CHUNK, size = candidates - first < DG_CHUNK ? candidates - first : DG_CHUNK;
        counts[i] = method == 0 ? dg_chunk(u + 2 * first, size, t, shift, coef)
                                : dg_rounded_chunk(u + i * full_words, size, sigma, c, p_event);
    }
    for (Py_ssize_t i = 0; i < chunks; i++) exhausted |= counts[i] < 0;
    for (last = 0; !exhausted && last < chunks && filled < count; last++) {
        const Py_ssize_t first = last * DG_CHUNK, size = candidates - first < DG_CHUNK ? candidates - first : DG_CHUNK;
        starts[last] = filled;
        if (counts[last] > count - filled) counts[last] = count - filled;
        filled += counts[last];
        used += method == 0 ? 2 * size : (size == DG_CHUNK ? full_words : zig_chunk_words(size, p_event));
    }
    if (!exhausted) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
        for (Py_ssize_t i = 0; i < last; i++) {
            const int64_t *values = (const int64_t *)(u + i * full_words);
            int64_t *dst = out + starts[i];
            if (add) {
                for (Py_ssize_t j = 0; j < counts[i]; j++) dst[j] += values[j];
            } else {
                memcpy(dst, values, sizeof(int64_t) * (size_t)counts[i]);
            }
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(counts);
    PyBuffer_Release(&ubuf);
    PyBuffer_Release(&obuf);
    if (exhausted) {
        PyErr_SetString(PyExc_RuntimeError, "discrete_gaussian_: a chunk's reserve of uniforms ran out (expected "
                                            "never: it is sized > 10 standard deviations above its use); nothing was written");
        return NULL;
    }
    return Py_BuildValue("nn", filled, used);
}

/* dg_rounded_words(variance, candidates) -> (words, normal_rate, c): the buffer discrete_gaussian_'s
 * method 1 takes for `candidates`, the fraction of candidates that give a normal (the ziggurat's area
 * ratio) and the c of its acceptance. */
static PyObject *dg_rounded_words(PyObject *self, PyObject *args) {
    double variance;
    Py_ssize_t candidates;
    (void)self;
    if (!PyArg_ParseTuple(args, "dn", &variance, &candidates)) return NULL;
    if (!(variance > 0.0) || !isfinite(variance) || candidates < 0) {
        PyErr_SetString(PyExc_ValueError, "dg_rounded_words: need finite variance > 0 and candidates >= 0");
        return NULL;
    }
    double c, p_event;
    zig_acceptance(sqrt(variance), &c, &p_event);
    const Py_ssize_t chunks = (candidates + DG_CHUNK - 1) / DG_CHUNK;
    const Py_ssize_t words = chunks == 0 ? 0 : (chunks - 1) * zig_chunk_words(DG_CHUNK, p_event) +
        zig_chunk_words(candidates - (chunks - 1) * DG_CHUNK, p_event);
    return Py_BuildValue("ndd", words, sqrt(M_PI / 2.0) / (ZIG_LAYERS * zig_v), c);
}

/* ziggurat_table() -> (x, f, r, v, zmax): the rounded sampler's tables (for tests). */
static PyObject *ziggurat_table(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    PyObject *x = PyList_New(ZIG_LAYERS + 1), *f = PyList_New(ZIG_LAYERS + 1);
    if (x == NULL || f == NULL) {
        Py_XDECREF(x);
        Py_XDECREF(f);
        return NULL;
    }
    for (int i = 0; i <= ZIG_LAYERS; i++) {
        PyList_SET_ITEM(x, i, PyFloat_FromDouble(zig_x[i]));
        PyList_SET_ITEM(f, i, PyFloat_FromDouble(zig_f[i]));
    }
    return Py_BuildValue("NNddd", x, f, zig_r, zig_v, zig_zmax);
}

/* encode_(x, kind, words, values, mask, mask_kind, factor, limit, modulus_mask, threads) -> int: secure
 * aggregation's fused rounding step over n = len(values) coordinates:
 *   v_i = (int64)⌊x_i·factor + u_i⌋ + values_i     (u_i = (w_i + ½)·2^-32 for the 32-bit word w_i of `words`
 *                                                  (n uint32); x float32 (kind 0) or float64 (kind 2),
 *                                                  product and sum in float64, as the torch path;
 *                                                  values_i: the noise share)
 *   values_i = (v_i ± mask_i) & modulus_mask       (mask: n int64 added (mask_kind 0), or n uint32 keystream
 *                                                  words added (1) or subtracted (2))
 * Returns how many v_i had |v_i| >= limit or a non-finite / out-of-range ⌊x·factor + u⌋ (then the
 * caller must raise: the modular sum could wrap). */
LDP_CLONES64
static Py_ssize_t encode_range(const char *x, int kind, const uint32_t *u, int64_t *values, const void *mask,
                               int mask_kind, Py_ssize_t n, double factor, int64_t limit, int64_t modulus_mask) {
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
        values[i] = (int64_t)(((uint64_t)v + m) & (uint64_t)modulus_mask); /* mod 2^64, no UB */
    }
    return bad;
}

static PyObject *encode_(PyObject *self, PyObject *args) {
    Py_buffer xb, ub, vb, mb;
    int kind, mask_kind, threads;
    double factor;
    long long limit, modulus_mask;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iy*w*y*idLLi", &xb, &kind, &ub, &vb, &mb, &mask_kind, &factor, &limit,
                          &modulus_mask, &threads))
        return NULL;
    const Py_ssize_t n = vb.len / 8, itemsize = kind == 0 ? 4 : 8, mask_size = mask_kind == 0 ? 8 : 4;
    PyObject *result = NULL;
    if ((kind != 0 && kind != 2) || mask_kind < 0 || mask_kind > 2 || threads < 1 || xb.len != n * itemsize ||
        ub.len != n * 4 || mb.len != n * mask_size || vb.len % 8) {
        PyErr_SetString(PyExc_ValueError, "encode_: need kind 0 or 2, mask_kind 0-2, threads >= 1 and buffers of "
                                          "n elements (words: uint32; mask: int64, or uint32 for mask_kind 1-2)");
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
                                factor, (int64_t)limit, (int64_t)modulus_mask);
        }
        Py_END_ALLOW_THREADS
        result = PyLong_FromSsize_t(bad);
    }
    PyBuffer_Release(&xb);
    PyBuffer_Release(&ub);
    PyBuffer_Release(&vb);
    PyBuffer_Release(&mb);
    return result;
}

/* decode_(summed, out, kind, bits, factor, threads): out_i = signed(summed_i mod 2^bits)·factor, computed in
 * float64 and rounded once to out's dtype (kind 0: float32, 2: float64), as the torch path. */
LDP_CLONES64
static void decode_range(const int64_t *summed, char *out, int kind, Py_ssize_t n, int bits, double factor) {
    const int64_t modulus_mask = (int64_t)((((uint64_t)1) << bits) - 1), half = (int64_t)(((uint64_t)1) << (bits - 1));
    const int64_t modulus = (int64_t)(((uint64_t)1) << bits);
    if (kind == 0) {
        float *o = (float *)out;
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t v = summed[i] & modulus_mask;
            v = v >= half ? v - modulus : v;
            o[i] = (float)((double)v * factor);
        }
    } else {
        double *o = (double *)out;
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t v = summed[i] & modulus_mask;
            v = v >= half ? v - modulus : v;
            o[i] = (double)v * factor;
        }
    }
}

static PyObject *decode_(PyObject *self, PyObject *args) {
    Py_buffer sb, ob;
    int kind, bits, threads;
    double factor;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*iidi", &sb, &ob, &kind, &bits, &factor, &threads)) return NULL;
    const Py_ssize_t n = sb.len / 8, itemsize = kind == 0 ? 4 : 8;
    PyObject *result = NULL;
    if ((kind != 0 && kind != 2) || bits < 1 || bits > 62 || threads < 1 || sb.len % 8 || ob.len != n * itemsize) {
        PyErr_SetString(PyExc_ValueError, "decode_: need kind 0 or 2, 1 <= bits <= 62, threads >= 1, n elements each");
    } else {
        const Py_ssize_t block = 1 << 14, blocks = (n + block - 1) / block;
        const int team = threads > blocks ? (blocks > 0 ? (int)blocks : 1) : threads;
        Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(team) schedule(static)
#endif
        for (Py_ssize_t b = 0; b < blocks; b++) {
            const Py_ssize_t first = b * block, len = n - first < block ? n - first : block;
            decode_range((const int64_t *)sb.buf + first, (char *)ob.buf + first * itemsize, kind, len, bits, factor);
        }
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&sb);
    PyBuffer_Release(&ob);
    return result;
}

static PyMethodDef methods[] = {
    {"box_muller_", box_muller_, METH_VARARGS,
     "box_muller_(buffer, half, start, stop, std): pairs start..stop-1 of a piece of 2*half int32 "
     "keystream words become float32 normals in place (word i: r*cos, word half+i: r*sin)."},
    {"decode_", decode_, METH_VARARGS,
     "decode_(summed, out, kind, bits, factor, threads): out = signed(summed mod 2^bits) * factor (float64, "
     "rounded once to out: kind 0 float32, 2 float64)."},
    {"dg_rounded_words", dg_rounded_words, METH_VARARGS,
     "dg_rounded_words(variance, candidates) -> (words, normal_rate, c): the buffer of discrete_gaussian_'s "
     "method 1 for `candidates`, the ziggurat's fraction of candidates giving a normal, the acceptance's c."},
    {"discrete_gaussian_", discrete_gaussian_, METH_VARARGS,
     "discrete_gaussian_(words, out, variance, add, threads, method=0, candidates=-1) -> (filled, used): "
     "discrete Gaussian N_Z(0, variance) draws (method 0: CKS 2020, 2 words per candidate; 1: rounded "
     "ziggurat Gaussian with rejection, dg_rounded_words(variance, candidates) words) from a buffer of 64-bit "
     "words, read as uniforms (2(w mod 2^52)+1)/2^53 (destroyed), stored (add=0) or added (add=1) to the int64 "
     "buffer out; filled: outputs written (the first ones), used: words used."},
    {"encode_", encode_, METH_VARARGS,
     "encode_(x, kind, words, values, mask, mask_kind, factor, limit, modulus_mask, threads) -> bad: values = "
     "(floor(x*factor + (w+1/2)/2^32) + values +- mask) & modulus_mask in place (int64; w the uint32 words, mask "
     "int64 added (mask_kind 0) or uint32 added (1) / subtracted (2)); bad counts |value| >= limit."},
    {"fill_", fill_, METH_VARARGS,
     "fill_(keystream, k, pairs, chunk, scale, targets, threads): all chunks of a draw, as sum_normals_, on "
     "`threads` OpenMP threads; chunk i's keystream comes from keystream(first_pair, size, buffer)."},
    {"ziggurat_table", ziggurat_table, METH_NOARGS,
     "ziggurat_table() -> (x, f, r, v, zmax): the rounded sampler's 256-layer ziggurat (for tests)."},
    {"sum_normals_", sum_normals_, METH_VARARGS,
     "sum_normals_(words, k, size, scale, targets): the 2*size outputs of a chunk of 2*k*size uint64 "
     "keystream words, layout (2, k, size): scale * sum over i of sqrt(-2 ln u_i) cos(2 pi v_i) for pairs "
     "0..size-1, then the same with sin, in float64, written (kind 0: float32, 2: float64) or added "
     "(1: float32, 3: float64) to the (buffer, kind) targets, which hold exactly 2*size elements in order."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_boxmuller", NULL, -1, methods};

PyMODINIT_FUNC PyInit__boxmuller(void) {
    zig_init();
    PyObject *m = PyModule_Create(&module);
#ifdef _OPENMP
    const int openmp = 1;
#else
    const int openmp = 0;
#endif
    if (m != NULL && PyModule_AddIntConstant(m, "openmp", openmp) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
