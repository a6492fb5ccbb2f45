/* What the native kernels share: includes, the vectorisation attributes, and the float64 uniform and
 * logarithm of a 64-bit keystream word (exact conversion; fdlibm's log kernel, branch-free). Included by
 * _boxmuller.c (the noise generators' kernels), _discrete_gaussian.c and _secure_aggregation.c (secure aggregation's). */
#ifndef LDP_KERNELS_H
#define LDP_KERNELS_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

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

/* secure aggregation's kernels (_discrete_gaussian.c, _secure_aggregation.c), registered in _boxmuller.c's method table */
PyObject *ldp_discrete_gaussian_(PyObject *self, PyObject *args);
PyObject *ldp_dg_rounded_words(PyObject *self, PyObject *args);
PyObject *ldp_ziggurat_table(PyObject *self, PyObject *noargs);
PyObject *ldp_encode_(PyObject *self, PyObject *args);
PyObject *ldp_decode_(PyObject *self, PyObject *args);
void ldp_zig_init(void);

#endif
