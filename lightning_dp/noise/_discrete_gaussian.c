/* Native kernels of secure aggregation's noise (lightning_dp.secure_aggregation.discrete_gaussian): the discrete
 * Gaussian samplers (Canonne–Kamath–Steinke, and the rounded ziggurat Gaussian with rejection). Part of the
 * lightning_dp.noise._boxmuller extension (registered in its method table); compiled with the same flags (see
 * setup.py and _boxmuller.c's notes: no fast-math, no FMA contraction, OpenMP over fixed chunks so that no output
 * depends on the thread count). The rounding, masking and decoding kernels are in _secure_aggregation.c.
 */
#include "_kernels.h"

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
 * steps: first the slow candidates', in candidate order (a wedge test: 1 uniform; a tail attempt: 2), then
 * the acceptance events' (gaps and tests). A candidate's
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
void ldp_zig_init(void) {
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

/* Removes positions removed[0 .. k−1] (increasing) from out[0 .. size−1], keeping the order: one memmove per
 * run of kept values. Returns the values kept. */
static Py_ssize_t remove_positions(int64_t *out, Py_ssize_t size, const int32_t *removed, Py_ssize_t k) {
    if (k == 0) return size;
    Py_ssize_t w = removed[0];
    for (Py_ssize_t r = 0; r < k; r++) {
        const Py_ssize_t from = (Py_ssize_t)removed[r] + 1, to = r + 1 < k ? (Py_ssize_t)removed[r + 1] : size;
        if (to > from) memmove(out + w, out + from, sizeof(int64_t) * (size_t)(to - from));
        w += to - from;
    }
    return w;
}

LDP_CLONES64
static Py_ssize_t dg_rounded_chunk(uint64_t *u, Py_ssize_t size, double sigma, double c, double p_event) {
    const uint64_t *next = u + size, *end = next + zig_reserve(size, p_event);
    const double inv_two_var = 0.5 / (sigma * sigma), e2c = exp(-2.0 * c), log1m_p = log1p(-p_event);
    int64_t *out = (int64_t *)u; /* candidate j's value overwrites its word, once read */
    double z[DG_CHUNK], rounded[DG_CHUNK];
    int32_t code[DG_CHUNK]; /* layer | sign << 8 | normal << 9 */
    int32_t removed[DG_CHUNK], dropped[DG_CHUNK], merged[DG_CHUNK];
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
    for (Py_ssize_t j = 0; j < size; j++) out[j] = (int64_t)rounded[j]; /* a separate loop: both vectorise */
    int exhausted = 0;
    Py_ssize_t nremoved = 0;
#define ZIG_NEXT() (next < end ? unit_midpoint(*next++) : (exhausted = 1, 0.5))
    /* the slow candidates (about 1.5 %): a wedge test or the tail, from the reserve in candidate order; the
     * candidates that give no normal are listed in `removed` */
    for (Py_ssize_t j0 = 0; j0 < size; j0 += 8) {
        const Py_ssize_t j1 = j0 + 8 < size ? j0 + 8 : size;
        int32_t all = 1 << 9;
        for (Py_ssize_t j = j0; j < j1; j++) all &= code[j];
        if (all) continue; /* eight fast candidates (~89 % of the blocks) */
        for (Py_ssize_t j = j0; j < j1; j++) {
            if (code[j] >> 9) continue;
            const int layer = code[j] & 255;
            double x = z[j];
            if (layer == 0) { /* the tail beyond R: Marsaglia's exponential rejection, to acceptance */
                double a, b;
                do {
                    a = -log_unit(ZIG_NEXT()) / zig_r;
                    b = -log_unit(ZIG_NEXT());
                } while (2.0 * b < a * a && !exhausted);
                x = zig_r + a;
            } else if (!(zig_f[layer] + ZIG_NEXT() * (zig_f[layer + 1] - zig_f[layer]) < exp(-0.5 * x * x))) {
                removed[nremoved++] = (int32_t)j; /* a wedge point above the curve: no normal */
                continue;
            }
            z[j] = x;
            out[j] = (int64_t)floor(((code[j] >> 8) & 1 ? -(sigma * x) : sigma * x) + 0.5);
            code[j] |= 1 << 9;
        }
    }
    if (exhausted) return -1;
    /* the acceptance events: a Bernoulli(p) sequence over the normals (in candidate order), by its geometric
     * gaps; at an event the normal stays with probability (e^y − e^{−2c})/(1 − e^{−2c}),
     * y + 2c = e(σZ + X)/(2σ²) + c. Normal i is candidate i + (removed candidates before it). */
    const Py_ssize_t normals = size - nremoved;
    Py_ssize_t ndropped = 0, r = 0;
    for (double k = floor(log_unit(ZIG_NEXT()) / log1m_p); k < (double)normals && !exhausted;
         k += 1.0 + floor(log_unit(ZIG_NEXT()) / log1m_p)) {
        const Py_ssize_t i = (Py_ssize_t)k;
        while (r < nremoved && removed[r] <= i + r) r++;
        const Py_ssize_t j = i + r;
        const double zs = (code[j] >> 8) & 1 ? -(sigma * z[j]) : sigma * z[j], value = (double)out[j], e = zs - value;
        const double threshold = e2c * expm1(e * (zs + value) * inv_two_var + c) / p_event;
        if (!(ZIG_NEXT() < threshold)) dropped[ndropped++] = (int32_t)j;
    }
#undef ZIG_NEXT
    if (exhausted) return -1;
    if (ndropped == 0) return remove_positions(out, size, removed, nremoved);
    Py_ssize_t a = 0, b = 0, m = 0; /* both lists increase, no position in both */
    while (a < nremoved || b < ndropped)
        merged[m++] = b == ndropped || (a < nremoved && removed[a] < dropped[b]) ? removed[a++] : dropped[b++];
    return remove_positions(out, size, merged, m);
}

/* discrete_gaussian_(uniforms, out, variance, add, threads[, method, candidates]) -> (filled, used): method 0
 * is Canonne–Kamath–Steinke (two words per candidate; candidates = len/2), method 1 the rounded Gaussian
 * (`candidates` of them in dg_rounded_words(variance, candidates) words). `used`: the words of the chunks
 * that gave the output. */
PyObject *ldp_discrete_gaussian_(PyObject *self, PyObject *args) {
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
PyObject *ldp_dg_rounded_words(PyObject *self, PyObject *args) {
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
PyObject *ldp_ziggurat_table(PyObject *self, PyObject *noargs) {
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
