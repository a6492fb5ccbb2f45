/* Box–Muller in place over a piece of keystream words: the native kernel of GaussianNoise.
 *
 * The piece holds 2·half 32-bit words. Pair i uses word i for the radius and word half + i for the
 * angle, exactly as the torch path in gaussian.py (same stream, same formulas):
 *
 *   u = (2·(w_i mod 2^23) + 1)·2^-24          uniform on the midpoints of a 2^-23 grid, never 0 or 1
 *   r = std·sqrt(-2 ln u),  θ = w_{half+i}·π/2^31   (w read as a signed integer: θ ∈ [-π, π))
 *
 * and overwrites word i with r·cos θ and word half + i with r·sin θ (float32). Everything is float32,
 * vectorised by the compiler through glibc's libmvec (logf/cosf/sinf, about 4 ulp); an AVX2 clone is
 * picked at load time where the CPU has it. The GIL is released while it runs.
 *
 * Compiled with -ffast-math (so glibc declares the vector math functions) at compile time only: the
 * link step does not add crtfastmath.o, so loading this module never changes the process's
 * floating-point mode (flush-to-zero).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 512

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LDP_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LDP_CLONES
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

static PyMethodDef methods[] = {
    {"box_muller_", box_muller_, METH_VARARGS,
     "box_muller_(buffer, half, start, stop, std): pairs start..stop-1 of a piece of 2*half int32 "
     "keystream words become float32 normals in place (word i: r*cos, word half+i: r*sin)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_boxmuller", NULL, -1, methods};

PyMODINIT_FUNC PyInit__boxmuller(void) { return PyModule_Create(&module); }
