/* bnn-probe's one-pass CPU measurement (docs/quantities.md, "How the probe computes").
 *
 * One call per (group, step) reads every binary weight of the group once, in place through a table of per-layer
 * pointers (no concatenated copies), and returns every per-layer count of the steps table. Per weight one state
 * byte keeps what the next step needs:
 *   bit 0 S_SIGN   b(w) at the last measurement / before the step (set by the pre pass only where it changed)
 *   bit 1 S_SIGN0  b(w_0) at attach (c2i)
 *   bit 2 S_ABOVE  |m| > tau at the last measurement (threshold crossings)
 *   bit 3 S_FLIP   flipped in the last measured step (the margin sample)
 *   bit 4          scratch: S_ABOVE before the last measured step (its crossings)
 * Count columns: Bop family (flips, c2i_diff, nonfinite_grads, above_threshold, crossings_up, crossings_down,
 * margin_exceed_j for the 7 ladder points); latent (flips, c2i_diff, nonfinite_grads, at_clip).
 * Comparisons are IEEE comparisons in the weights' type (no fast-math, no FMA contraction: -ffp-contract=off), so
 * every count equals the per-layer reference's; float64 sums are vectorised (reassociated), equal to rounding.
 * The quantile sample is picked up during the pass (sorted indices, while the block is in cache).
 * The module is a CPython extension only so that setuptools builds and installs it; Python calls the functions
 * through ctypes (bnn_probe/probe/cpu_pass.py). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stddef.h>

#define BLK 512
#define NC_BOP 13
#define NC_LAT 4
#define S_SIGN 1
#define S_SIGN0 2
#define S_ABOVE 4
#define S_FLIP 8

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define HOT __attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) __attribute__((visibility("default")))
#else
#define HOT __attribute__((visibility("default")))
#endif

/* Everything a pass reads and writes, set up once by probe/onepass.py (ctypes mirror: cpu_pass.Plan). */
typedef struct {
    int64_t L, K;                   /* layers; quantile sample slots per layer */
    const int64_t *lens, *offs;     /* [L] weights per layer, flat offsets */
    const uintptr_t *wp, *mp, *gp;  /* [L] data pointers: w, m (Bop family), g (zeros where missing) */
    const uint8_t *sgn;             /* [N] b(w) from a binarizer other than sign, or NULL (w >= 0) */
    const void *tau, *thr, *clip;   /* [L], [L][7] (ascending), [L] in the weights' type */
    const uint8_t *tau_valid, *clip_valid;
    uint8_t *state;                 /* [N] state bytes */
    void *m_out, *wm_out;           /* [N] m_t, w_t m_t (Bop family) */
    int32_t *count, *last;          /* [N] flip counters, last-flip steps */
    const int32_t *mix;             /* [N] hash coefficients r_i, or NULL */
    int64_t *hash;                  /* [L] sign hash */
    int64_t *fidx;                  /* [N] flipped weights of the step (flat indices) */
    int32_t *flast;                 /* [N] their last-flip step before this one */
    int64_t *counts;                /* [L][NC] count columns */
    double *sum_abs;                /* [L] sum |m| (Bop family) or |w| (latent) */
    const int64_t *ks, *qidx;       /* [L] sample sizes, [L][K] sorted sample indices in the layer */
    void *samp;                     /* [3][L][K] samples (|m|, w m, margin; latent: |w|) or NULL */
    int64_t nf;                     /* out: flips of the step */
    int32_t t;                      /* the step */
} bnnp_plan;

/* The flipped weights of block [b0, b0 + bn) of layer l (flat offset o), after the block's pass: their flat
 * indices and previous last-flip steps are appended at nf, their counters, last-flip steps and the sign hash
 * updated. Returns the new nf. */
static inline int64_t record_flips(const bnnp_plan *P, const uint8_t *S, int64_t b0, int64_t bn, int64_t o,
                                   int64_t l, int64_t nf) {
    for (int64_t j = 0; j < bn; j++) {
        const int64_t i = b0 + j;
        if (!(S[i] & S_FLIP)) continue;
        P->fidx[nf] = o + i;
        P->flast[nf++] = P->last[o + i];
        P->count[o + i] += 1;
        P->last[o + i] = P->t;
        if (P->mix) P->hash[l] += (S[i] & S_SIGN) ? (int64_t)P->mix[o + i] : -(int64_t)P->mix[o + i];
    }
    return nf;
}

#define T float
#define SFX f32
#define ABS(x) __builtin_fabsf(x)
#define IT int32_t
#define UT uint32_t
#include "_pass_tmpl.h"
#undef T
#undef SFX
#undef ABS
#undef IT
#undef UT

#define T double
#define SFX f64
#define ABS(x) __builtin_fabs(x)
#define IT int64_t
#define UT uint64_t
#include "_pass_tmpl.h"
#undef T
#undef SFX
#undef ABS
#undef IT
#undef UT

__attribute__((visibility("default"))) int64_t bnnp_abi_version(void) { return 5; }

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_pass", "bnn-probe's one-pass CPU measurement "
                                    "(called through ctypes: bnn_probe.probe.cpu_pass).", -1, NULL};

PyMODINIT_FUNC PyInit__pass(void) { return PyModule_Create(&moddef); }
