/* BEMA's arithmetic on a group of tensor slices, with TRL's exact rounding, in one pass over memory.
 *
 * TRL updates each EMA with two torch ops, `ema.mul_(1 - beta).add_(theta, alpha=beta)`, which on float32 round
 * twice per element:
 *
 *     m   = fl32(ema * keep)            keep = fl32(1 - beta)
 *     ema = fma(theta, fl32(beta), m)    torch's CPU and CUDA add kernels fuse `self + alpha * other`
 *
 * and writes an output as `ema + alpha * (theta - theta0)` (three roundings: the difference, the product by
 * fl32(alpha), the sum), or the EMA itself, rounded to the output dtype (float32, or bf16 to nearest even as torch
 * does). Done with torch, a step costs an upcast pass plus three passes over memory per EMA, and the EMAs of a
 * group go through the caches once per step.
 *
 * `replay` runs a whole group instead: every step's checkpoint bytes are already in memory, and a short program
 * (start an EMA at theta0, update it at a step, write an output) is run block by block, so that each block of
 * every EMA lives in L1 from the first step to the last and the EMAs never exist in memory at all. Memory traffic
 * is then the checkpoints' bytes and the outputs'; a sweep of many EMAs costs arithmetic only. bf16 -> float32
 * is exact (a shift), so the bits are those of the torch ops; tests/engine/test_kernel*.py check this against torch.
 *
 * The same program also computes weighted sums, for the averages that are not TRL's recurrence (uniform windows,
 * post-hoc EMAs, DEMA, ExPO, ...): an output sum_i w_i * theta_i takes a slot of its own, started by SCALE
 * (`acc = theta * fl32(w)`, torch's `torch.mul(theta, w)` on float32) and continued by ACCUMULATE
 * (`acc = fma(theta, fl32(w), acc)`, torch's `acc.add_(theta, alpha=w)`), then written by OUTPUT like an EMA. So
 * one pass over a group's bytes produces replayed and weighted outputs alike.
 *
 * `upcast` widens a checkpoint to float32 (theta0), `store` casts float32 values to the output dtype (a frozen
 * tensor's theta0), `equals` tells whether a tensor still equals theta0 (a frozen parameter) without upcasting
 * it, and `all_finite` looks for Inf and NaN. With these the engine runs a bf16 or float32 model without torch.
 *
 * Compiled with -ffp-contract=off: the product `ema * keep` must round on its own, never fuse into the add. On
 * x86-64 a second copy of the loops is built for AVX2+FMA and chosen at run time, so one build runs on any
 * x86-64 CPU (a shared virtual environment on a cluster of mixed nodes, say). Without FMA hardware, C's fmaf()
 * computes the same correctly rounded result, only slower. BEMA_OFFLINE_KERNEL=generic at import chooses the
 * generic loops on any CPU (the tests compare both builds with torch).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 512 /* elements per block: a block of 16 EMAs is 32 KiB, one core's L1 */
#define STRIDE (BLOCK + 24) /* floats between EMA blocks: staggered so no two buffers share their address modulo 4 KiB */

enum { OP_START, OP_UPDATE, OP_OUTPUT, OP_SCALE, OP_ACCUMULATE };

typedef struct {
    const void *theta; /* a checkpoint's values, float32 or bf16 */
    int bf16;
} Step;

typedef struct {
    int code, slot, step; /* slot: which EMA; step: index into the steps */
    const float *theta0;  /* START: the EMA's first value; OUTPUT: theta0 */
    float keep, beta;     /* UPDATE: fl32(1 - beta), fl32(beta); SCALE, ACCUMULATE: beta is fl32(weight) */
    int bema;             /* OUTPUT: ema + alpha * (theta - theta0), else the EMA */
    float alpha;
    void *out;
    int out_bf16;
    int flag; /* OUTPUT: index of its finiteness flag */
} Op;

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

/* float32 -> bf16 over n values, as torch rounds; returns whether none is Inf or NaN. */
static int store_bf16_generic(uint16_t *restrict o, const float *restrict values, Py_ssize_t n) {
    uint32_t special = 0; /* OR of a flag per value: exponent all ones (Inf or NaN) */
    for (Py_ssize_t i = 0; i < n; i++) {
        uint16_t h = f32_to_bf16(values[i]);
        o[i] = h;
        special |= (h & 0x7F80u) == 0x7F80u;
    }
    return !special;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
/* The same, eight values at a time (compilers do not vectorize the narrowing well). */
__attribute__((target("avx2,fma"))) static int store_bf16_avx2(uint16_t *restrict o, const float *restrict values,
                                                                Py_ssize_t n) {
    const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7FFF), quiet = _mm256_set1_epi32(0x7FC0);
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32(0x7F800000);
    const __m256i exponent = _mm256_set1_epi32(0x7F80);
    __m256i special = _mm256_setzero_si256();
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i bits = _mm256_loadu_si256((const __m256i *)(values + i));
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
        __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, half), lsb), 16);
        __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, magnitude), inf);
        __m256i h = _mm256_blendv_epi8(rounded, quiet, nan);
        special = _mm256_or_si256(special, _mm256_cmpeq_epi32(_mm256_and_si256(h, exponent), exponent));
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0xD8);
        _mm_storeu_si128((__m128i *)(o + i), _mm256_castsi256_si128(packed));
    }
    int tail_finite = store_bf16_generic(o + i, values + i, n - i); /* (always written: no short circuit) */
    return _mm256_testz_si256(special, special) && tail_finite;
}
#endif

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
    ATTR static void scale_##SUFFIX(float *restrict acc, const float *restrict theta, Py_ssize_t n, float weight) { \
        for (Py_ssize_t i = 0; i < n; i++) acc[i] = theta[i] * weight;                                       \
    }                                                                                                         \
    ATTR static void accumulate_##SUFFIX(float *restrict acc, const float *restrict theta, Py_ssize_t n,     \
                                         float weight) {                                                      \
        for (Py_ssize_t i = 0; i < n; i++) acc[i] = fmaf(theta[i], weight, acc[i]);                           \
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
        if (out_bf16) return store_bf16_##SUFFIX(out, values, n);                                             \
        {                                                                                                     \
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
    ATTR static void replay_##SUFFIX(const Step *steps, const Op *ops, Py_ssize_t nops, float *emas,         \
                                     Py_ssize_t n, int *flags) {                                              \
        float x_block[BLOCK], values[BLOCK];                                                                  \
        for (Py_ssize_t start = 0; start < n; start += BLOCK) {                                               \
            Py_ssize_t len = n - start < BLOCK ? n - start : BLOCK;                                           \
            const float *x = NULL;                                                                            \
            int loaded = -1; /* the step whose values x holds */                                              \
            for (Py_ssize_t k = 0; k < nops; k++) {                                                           \
                const Op *op = &ops[k];                                                                       \
                float *ema = emas + (Py_ssize_t)op->slot * STRIDE;                                           \
                if ((op->code != OP_START && (op->code != OP_OUTPUT || op->bema)) && op->step != loaded) {    \
                    const Step *step = &steps[op->step];                                                      \
                    if (step->bf16) {                                                                         \
                        upcast_bf16_##SUFFIX(x_block, (const uint16_t *)step->theta + start, len);           \
                        x = x_block;                                                                          \
                    } else {                                                                                  \
                        x = (const float *)step->theta + start;                                               \
                    }                                                                                         \
                    loaded = op->step;                                                                        \
                }                                                                                             \
                if (op->code == OP_START) {                                                                   \
                    memcpy(ema, op->theta0 + start, (size_t)len * sizeof(float));                             \
                } else if (op->code == OP_UPDATE) {                                                           \
                    advance_##SUFFIX(ema, x, len, op->keep, op->beta);                                        \
                } else if (op->code == OP_SCALE) {                                                            \
                    scale_##SUFFIX(ema, x, len, op->beta);                                                    \
                } else if (op->code == OP_ACCUMULATE) {                                                       \
                    accumulate_##SUFFIX(ema, x, len, op->beta);                                               \
                } else {                                                                                      \
                    const float *v = ema;                                                                     \
                    if (op->bema) {                                                                           \
                        bema_values_##SUFFIX(values, x, op->theta0 + start, ema, len, op->alpha);            \
                        v = values;                                                                           \
                    }                                                                                         \
                    void *o = op->out_bf16 ? (void *)((uint16_t *)op->out + start)                            \
                                           : (void *)((float *)op->out + start);                              \
                    flags[op->flag] &= store_##SUFFIX(o, op->out_bf16, v, len);                               \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
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

static void (*replay_impl)(const Step *, const Op *, Py_ssize_t, float *, Py_ssize_t, int *) = replay_generic;
static int (*store_impl)(void *, int, const float *, Py_ssize_t) = store_generic;
static const char *impl_name = "generic";

/* replay(n, steps, ops, slots) -> one bool per OUTPUT op: whether every value it wrote is finite.
 * steps: [(address, is_bf16)]; ops: (0, slot, theta0_address) | (1, slot, step, keep, beta)
 *                                   | (2, slot, step, theta0_address, bema, alpha, out_address, out_is_bf16)
 *                                   | (3, slot, step, weight) | (4, slot, step, weight) */
static PyObject *replay(PyObject *self, PyObject *args) {
    Py_ssize_t n, nslots;
    PyObject *steps_arg, *ops_arg;
    if (!PyArg_ParseTuple(args, "nOOn:replay", &n, &steps_arg, &ops_arg, &nslots)) return NULL;
    if (n < 0 || nslots < 0) return PyErr_Format(PyExc_ValueError, "replay: negative length or slot count");
    PyObject *steps_seq = PySequence_Fast(steps_arg, "replay: steps must be a sequence");
    if (steps_seq == NULL) return NULL;
    PyObject *ops_seq = PySequence_Fast(ops_arg, "replay: ops must be a sequence");
    if (ops_seq == NULL) {
        Py_DECREF(steps_seq);
        return NULL;
    }
    Py_ssize_t nsteps = PySequence_Fast_GET_SIZE(steps_seq), nops = PySequence_Fast_GET_SIZE(ops_seq), noutputs = 0;
    Step *steps = PyMem_Calloc(nsteps ? nsteps : 1, sizeof(Step));
    Op *ops = PyMem_Calloc(nops ? nops : 1, sizeof(Op));
    float *emas = PyMem_Malloc((nslots ? nslots : 1) * STRIDE * sizeof(float));
    int *flags = PyMem_Malloc((nops ? nops : 1) * sizeof(int));
    PyObject *result = NULL;
    if (steps == NULL || ops == NULL || emas == NULL || flags == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < nsteps; i++) {
        unsigned long long address;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(steps_seq, i), "Kp:step", &address, &steps[i].bf16)) goto done;
        steps[i].theta = (const void *)(uintptr_t)address;
    }
    for (Py_ssize_t k = 0; k < nops; k++) {
        PyObject *item = PySequence_Fast_GET_ITEM(ops_seq, k);
        Op *op = &ops[k];
        unsigned long long theta0 = 0, out = 0;
        double keep = 0, beta = 0, alpha = 0;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < 1) {
            PyErr_SetString(PyExc_ValueError, "replay: each op must be a tuple starting with its code");
            goto done;
        }
        long code = PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
        int ok = code == OP_START    ? PyArg_ParseTuple(item, "iiK:start", &op->code, &op->slot, &theta0)
                 : code == OP_UPDATE ? PyArg_ParseTuple(item, "iiidd:update", &op->code, &op->slot, &op->step, &keep, &beta)
                 : code == OP_OUTPUT ? PyArg_ParseTuple(item, "iiiKpdKp:output", &op->code, &op->slot, &op->step, &theta0,
                                                        &op->bema, &alpha, &out, &op->out_bf16)
                 : code == OP_SCALE    ? PyArg_ParseTuple(item, "iiid:scale", &op->code, &op->slot, &op->step, &beta)
                 : code == OP_ACCUMULATE ? PyArg_ParseTuple(item, "iiid:accumulate", &op->code, &op->slot, &op->step, &beta)
                                     : 0;
        if (!ok) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "replay: unknown op code %ld", code);
            goto done;
        }
        if (op->slot < 0 || op->slot >= nslots || (code != OP_START && (op->step < 0 || op->step >= nsteps))) {
            PyErr_Format(PyExc_ValueError, "replay: op %zd names slot %d or step %d out of range", k, op->slot, op->step);
            goto done;
        }
        if ((code == OP_SCALE || code == OP_ACCUMULATE) && !(fabs(beta) <= FLT_MAX)) {
            PyErr_Format(PyExc_ValueError, "replay: op %zd has a weight that is not a finite float32", k);
            goto done;
        }
        op->theta0 = (const float *)(uintptr_t)theta0;
        op->out = (void *)(uintptr_t)out;
        op->keep = (float)keep;
        op->beta = (float)beta;
        op->alpha = (float)alpha;
        if (code == OP_OUTPUT) {
            op->flag = (int)noutputs;
            flags[noutputs++] = 1;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    replay_impl(steps, ops, nops, emas, n, flags);
    Py_END_ALLOW_THREADS
    result = PyTuple_New(noutputs);
    for (Py_ssize_t i = 0; result != NULL && i < noutputs; i++) PyTuple_SET_ITEM(result, i, PyBool_FromLong(flags[i]));
done:
    PyMem_Free(steps);
    PyMem_Free(ops);
    PyMem_Free(emas);
    PyMem_Free(flags);
    Py_DECREF(steps_seq);
    Py_DECREF(ops_seq);
    return result;
}

static PyObject *store(PyObject *self, PyObject *args) {
    unsigned long long values_address, out_address;
    int out_bf16, finite;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KKpn:store", &values_address, &out_address, &out_bf16, &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    finite = store_impl((void *)(uintptr_t)out_address, out_bf16, (const float *)(uintptr_t)values_address, n);
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
    {"replay", replay, METH_VARARGS,
     "replay(n, steps, ops, slots) -> finiteness of each output: run a group's program over n elements, block by "
     "block (see the comment at the top of _kernel.c)."},
    {"store", store, METH_VARARGS,
     "store(values_address, out_address, out_is_bf16, n) -> all finite: out = float32 values rounded to float32 or "
     "bf16."},
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
    const char *choice = getenv("BEMA_OFFLINE_KERNEL");
    if (has_avx2_fma() && !(choice != NULL && strcmp(choice, "generic") == 0)) {
        replay_impl = replay_avx2;
        store_impl = store_avx2;
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
