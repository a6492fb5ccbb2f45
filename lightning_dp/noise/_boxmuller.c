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
#include "_kernels.h"

#define BLOCK 512      /* box_muller_: pairs per inner block */
#define SUM_BLOCK 256  /* sum_normals_: pairs per inner block */

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

static PyMethodDef methods[] = {
    {"box_muller_", box_muller_, METH_VARARGS,
     "box_muller_(buffer, half, start, stop, std): pairs start..stop-1 of a piece of 2*half int32 "
     "keystream words become float32 normals in place (word i: r*cos, word half+i: r*sin)."},
    {"decode_", ldp_decode_, METH_VARARGS,
     "decode_(summed, out, kind, bits, factor, threads): out = signed(summed mod 2^bits) * factor (float64, "
     "rounded once to out: kind 0 float32, 2 float64)."},
    {"dg_rounded_words", ldp_dg_rounded_words, METH_VARARGS,
     "dg_rounded_words(variance, candidates) -> (words, normal_rate, c): the buffer of discrete_gaussian_'s "
     "method 1 for `candidates`, the ziggurat's fraction of candidates giving a normal, the acceptance's c."},
    {"discrete_gaussian_", ldp_discrete_gaussian_, METH_VARARGS,
     "discrete_gaussian_(words, out, variance, add, threads, method=0, candidates=-1) -> (filled, used): "
     "discrete Gaussian N_Z(0, variance) draws (method 0: CKS 2020, 2 words per candidate; 1: rounded "
     "ziggurat Gaussian with rejection, dg_rounded_words(variance, candidates) words) from a buffer of 64-bit "
     "words, read as uniforms (2(w mod 2^52)+1)/2^53 (destroyed), stored (add=0) or added (add=1) to the int64 "
     "buffer out; filled: outputs written (the first ones), used: words used."},
    {"encode_", ldp_encode_, METH_VARARGS,
     "encode_(x, kind, words, values, mask, mask_kind, factor, limit, modulus_mask, threads) -> bad: values = "
     "(floor(x*factor + (w+1/2)/2^32) + values +- mask) & modulus_mask in place (int64; w the uint32 words, mask "
     "int64 added (mask_kind 0) or uint32 added (1) / subtracted (2)); bad counts |value| >= limit."},
    {"fill_", fill_, METH_VARARGS,
     "fill_(keystream, k, pairs, chunk, scale, targets, threads): all chunks of a draw, as sum_normals_, on "
     "`threads` OpenMP threads; chunk i's keystream comes from keystream(first_pair, size, buffer)."},
    {"ziggurat_table", ldp_ziggurat_table, METH_NOARGS,
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
    ldp_zig_init();
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
