/* The EMA update of BEMA in one pass over memory, with TRL's exact rounding.
 *
 * TRL updates each EMA with two torch ops, `ema.mul_(1 - beta).add_(theta, alpha=beta)`, which on float32 round
 * twice per element:
 *
 *     m   = fl32(ema * keep)            keep = fl32(1 - beta)
 *     ema = fma(theta, fl32(beta), m)    torch's CPU and CUDA add kernels fuse `self + alpha * other`
 *
 * Done with torch, that is three passes over memory per step and per EMA (a bf16 checkpoint is first upcast to
 * float32). `ema_update` does it in one pass, for any number of EMAs, reading theta once: a block of theta is
 * upcast into a buffer that stays in L1, then every EMA is advanced over that block. bf16 -> float32 is exact
 * (a shift), so the bits are those of the torch ops; tests/test_kernel.py checks this against torch itself.
 *
 * `bema_output` writes one output the same way: TRL's `ema + alpha * (theta - theta0)` as torch computes it (three
 * roundings: the difference, the product by fl32(alpha), the sum), or the EMA itself, rounded to the output dtype
 * (float32, or bf16 to nearest even as torch does), in one pass; it says whether every value written is finite.
 *
 * `equals` tells whether a tensor still equals theta0 (a frozen parameter), without upcasting it first; `upcast`
 * widens a bf16 checkpoint to float32 (theta0), and `all_finite` looks for Inf and NaN. With these the engine runs
 * a whole bf16 or float32 model without torch (see bema_offline/kernels.py).
 *
 * Compiled with -ffp-contract=off: the product `ema * keep` must round on its own, never fuse into the add. On
 * x86-64 a second copy of the loops is built for AVX2+FMA and chosen at run time, so one build runs on any
 * x86-64 CPU (a shared virtual environment on a cluster of mixed nodes, say). Without FMA hardware, C's fmaf()
 * computes the same correctly rounded result, only slower.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 2048 /* elements of theta upcast at a time: 8 KiB, well inside L1 */

typedef struct {
    float *ema;
    float keep; /* fl32(1 - beta) */
    float beta; /* fl32(beta) */
} Update;

static inline uint16_t f32_to_bf16(float f) { /* torch's round-to-nearest-even; NaN -> 0x7FC0 */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#define DEFINE_LOOPS(SUFFIX, ATTR)                                                                           \
    ATTR static void upcast_bf16_##SUFFIX(float *restrict out, const uint16_t *restrict in, Py_ssize_t n) {   \
        for (Py_ssize_t i = 0; i < n; i++) out[i] = bf16_to_f32(in[i]);                                      \
    }                                                                                                         \
    ATTR static void advance_##SUFFIX(float *restrict ema, const float *restrict theta, Py_ssize_t n,        \
                                      float keep, float beta) {                                               \
        for (Py_ssize_t i = 0; i < n; i++) {                                                                  \
            float m = ema[i] * keep;                                                                          \
            ema[i] = fmaf(theta[i], beta, m);                                                                 \
        }                                                                                                     \
    }                                                                                                         \
    ATTR static void update_##SUFFIX(const Update *updates, Py_ssize_t count, const void *theta, int bf16,  \
                                     Py_ssize_t n) {                                                          \
        float block[BLOCK];                                                                                   \
        for (Py_ssize_t start = 0; start < n; start += BLOCK) {                                               \
            Py_ssize_t len = n - start < BLOCK ? n - start : BLOCK;                                           \
            const float *x = (const float *)theta + start;                                                    \
            if (bf16) {                                                                                       \
                upcast_bf16_##SUFFIX(block, (const uint16_t *)theta + start, len);                           \
                x = block;                                                                                    \
            }                                                                                                 \
            for (Py_ssize_t k = 0; k < count; k++)                                                            \
                advance_##SUFFIX(updates[k].ema + start, x, len, updates[k].keep, updates[k].beta);          \
        }                                                                                                     \
    }                                                                                                         \
    ATTR static void bema_values_##SUFFIX(float *restrict out, const float *restrict theta,                 \
                                          const float *restrict theta0, const float *restrict ema,           \
                                          Py_ssize_t n, float alpha) {                                        \
        for (Py_ssize_t i = 0; i < n; i++) {                                                                  \
            float diff = theta[i] - theta0[i];                                                                \
            float scaled = diff * alpha;                                                                      \
            out[i] = scaled + ema[i];                                                                         \
        }                                                                                                     \
    }                                                                                                         \
    ATTR static int store_##SUFFIX(void *out, int out_bf16, const float *restrict values, Py_ssize_t n) {    \
        uint32_t special = 0; /* OR of a flag per value: exponent all ones (Inf or NaN) */                  \
        if (out_bf16) {                                                                                       \
            uint16_t *restrict o = out;                                                                       \
            for (Py_ssize_t i = 0; i < n; i++) {                                                              \
                uint16_t h = f32_to_bf16(values[i]);                                                          \
                o[i] = h;                                                                                     \
                special |= (h & 0x7F80u) == 0x7F80u;                                                          \
            }                                                                                                 \
        } else {                                                                                              \
            float *restrict o = out;                                                                          \
            for (Py_ssize_t i = 0; i < n; i++) {                                                              \
                uint32_t bits;                                                                                \
                memcpy(&bits, &values[i], sizeof bits);                                                       \
                o[i] = values[i];                                                                             \
                special |= (bits & 0x7F800000u) == 0x7F800000u;                                               \
            }                                                                                                 \
        }                                                                                                     \
        return !special;                                                                                      \
    }                                                                                                         \
    ATTR static int output_##SUFFIX(const void *theta, int theta_bf16, const float *theta0, const float *ema, \
                                    Py_ssize_t n, int bema, float alpha, void *out, int out_bf16) {           \
        float x_block[BLOCK], values[BLOCK];                                                                  \
        int finite = 1;                                                                                       \
        for (Py_ssize_t start = 0; start < n; start += BLOCK) {                                               \
            Py_ssize_t len = n - start < BLOCK ? n - start : BLOCK;                                           \
            const float *v = ema + start;                                                                     \
            if (bema) {                                                                                       \
                const float *x = (const float *)theta + start;                                                \
                if (theta_bf16) {                                                                             \
                    upcast_bf16_##SUFFIX(x_block, (const uint16_t *)theta + start, len);                     \
                    x = x_block;                                                                              \
                }                                                                                             \
                bema_values_##SUFFIX(values, x, theta0 + start, ema + start, len, alpha);                    \
                v = values;                                                                                   \
            }                                                                                                 \
            void *o = out_bf16 ? (void *)((uint16_t *)out + start) : (void *)((float *)out + start);          \
            finite &= store_##SUFFIX(o, out_bf16, v, len);                                                    \
        }                                                                                                     \
        return finite;                                                                                        \
    }

DEFINE_LOOPS(generic, )

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
DEFINE_LOOPS(avx2, __attribute__((target("avx2,fma"))))
static int has_avx2_fma(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#define HAVE_AVX2_BUILD 1
#else
#define HAVE_AVX2_BUILD 0
#endif

static void (*update_impl)(const Update *, Py_ssize_t, const void *, int, Py_ssize_t) = update_generic;
static int (*output_impl)(const void *, int, const float *, const float *, Py_ssize_t, int, float, void *, int) =
    output_generic;
static const char *impl_name = "generic";

static PyObject *ema_update(PyObject *self, PyObject *args) {
    unsigned long long theta_address;
    int bf16;
    Py_ssize_t n;
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "KpnO:ema_update", &theta_address, &bf16, &n, &seq)) return NULL;
    PyObject *fast = PySequence_Fast(seq, "updates must be a sequence of (address, keep, beta)");
    if (fast == NULL) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(fast);
    Update *updates = PyMem_Malloc((count ? count : 1) * sizeof(Update));
    if (updates == NULL) {
        Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t k = 0; k < count; k++) {
        unsigned long long address;
        double keep, beta;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, k), "Kdd:update", &address, &keep, &beta)) {
            PyMem_Free(updates);
            Py_DECREF(fast);
            return NULL;
        }
        updates[k] = (Update){(float *)(uintptr_t)address, (float)keep, (float)beta};
    }
    Py_DECREF(fast);
    Py_BEGIN_ALLOW_THREADS
    update_impl(updates, count, (const void *)(uintptr_t)theta_address, bf16, n);
    Py_END_ALLOW_THREADS
    PyMem_Free(updates);
    Py_RETURN_NONE;
}

static PyObject *bema_output(PyObject *self, PyObject *args) {
    unsigned long long theta_address, theta0_address, ema_address, out_address;
    int theta_bf16, bema, out_bf16, finite;
    Py_ssize_t n;
    double alpha;
    if (!PyArg_ParseTuple(args, "KpKKnpdKp:bema_output", &theta_address, &theta_bf16, &theta0_address, &ema_address, &n,
                          &bema, &alpha, &out_address, &out_bf16))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    finite = output_impl((const void *)(uintptr_t)theta_address, theta_bf16, (const float *)(uintptr_t)theta0_address,
                         (const float *)(uintptr_t)ema_address, n, bema, (float)alpha, (void *)(uintptr_t)out_address,
                         out_bf16);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(finite);
}

static PyObject *equals(PyObject *self, PyObject *args) {
    unsigned long long theta_address, theta0_address;
    int theta_bf16, same = 1;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KpKn:equals", &theta_address, &theta_bf16, &theta0_address, &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    const float *theta0 = (const float *)(uintptr_t)theta0_address;
    if (theta_bf16) {
        const uint16_t *theta = (const uint16_t *)(uintptr_t)theta_address;
        for (Py_ssize_t i = 0; i < n && same; i++) same = bf16_to_f32(theta[i]) == theta0[i];
    } else {
        const float *theta = (const float *)(uintptr_t)theta_address;
        for (Py_ssize_t i = 0; i < n && same; i++) same = theta[i] == theta0[i];
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(same);
}

static PyObject *upcast(PyObject *self, PyObject *args) {
    unsigned long long theta_address, out_address;
    int theta_bf16;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KpKn:upcast", &theta_address, &theta_bf16, &out_address, &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    float *out = (float *)(uintptr_t)out_address;
    if (theta_bf16) {
        const uint16_t *theta = (const uint16_t *)(uintptr_t)theta_address;
        for (Py_ssize_t i = 0; i < n; i++) out[i] = bf16_to_f32(theta[i]);
    } else {
        memmove(out, (const void *)(uintptr_t)theta_address, (size_t)n * sizeof(float));
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *all_finite(PyObject *self, PyObject *args) {
    unsigned long long address;
    int bf16;
    Py_ssize_t n;
    uint32_t special = 0;
    if (!PyArg_ParseTuple(args, "Kpn:all_finite", &address, &bf16, &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (bf16) {
        const uint16_t *values = (const uint16_t *)(uintptr_t)address;
        for (Py_ssize_t i = 0; i < n; i++) special |= (values[i] & 0x7F80u) == 0x7F80u;
    } else {
        const uint32_t *values = (const uint32_t *)(uintptr_t)address;
        for (Py_ssize_t i = 0; i < n; i++) special |= (values[i] & 0x7F800000u) == 0x7F800000u;
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(!special);
}

static PyMethodDef methods[] = {
    {"ema_update", ema_update, METH_VARARGS,
     "ema_update(theta_address, theta_is_bf16, n, updates): for each (ema_address, keep, beta) in updates, "
     "ema = fma(theta, fl32(beta), fl32(ema * fl32(keep))) over n float32 elements; theta is float32 or bf16."},
    {"bema_output", bema_output, METH_VARARGS,
     "bema_output(theta_address, theta_is_bf16, theta0_address, ema_address, n, bema, alpha, out_address, "
     "out_is_bf16) -> all finite: out = ema + fl32(alpha) * (theta - theta0) if bema else ema, rounded to "
     "float32 or bf16."},
    {"equals", equals, METH_VARARGS,
     "equals(theta_address, theta_is_bf16, theta0_address, n) -> whether every upcast theta == theta0 (as "
     "torch.equal compares: 0.0 == -0.0, NaN != NaN); stops at the first difference."},
    {"upcast", upcast, METH_VARARGS,
     "upcast(theta_address, theta_is_bf16, out_address, n): out = theta as float32 (bf16 widened exactly)."},
    {"all_finite", all_finite, METH_VARARGS,
     "all_finite(address, is_bf16, n) -> whether none of n float32 or bf16 values is Inf or NaN."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernel(void) {
#if HAVE_AVX2_BUILD
    if (has_avx2_fma()) {
        update_impl = update_avx2;
        output_impl = output_avx2;
        impl_name = "avx2+fma";
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "BLOCK", BLOCK) < 0 || PyModule_AddStringConstant(m, "IMPL", impl_name) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
