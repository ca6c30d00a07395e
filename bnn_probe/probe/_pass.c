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
 * The quantile sample is picked up during the pass (sorted indices, while the block is in cache); numpy sorts it in
 * place and bnnp_bop_rows reads the quantiles. For the Bop family one call (bnnp_bop_step) does the pass, the flip
 * events and the tracked weights of a step, one more (bnnp_bop_rows) the steps table's rows.
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
/* the Bop update: its fma must be a hardware FMA (x86-64-v3 = AVX2 + FMA) to vectorise */
#define HOTF __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) \
    __attribute__((visibility("default")))
#else
#define HOTF __attribute__((visibility("default")))
#define HOT __attribute__((visibility("default")))
#endif

/* Everything a pass reads and writes, set up once by probe/onepass.py (ctypes mirror: cpu_pass.Plan). */
typedef struct {
    int64_t L, K;                   /* layers; quantile sample slots per layer */
    const int64_t *lens, *offs;     /* [L] weights per layer, flat offsets */
    const uintptr_t *wp, *mp, *gp;  /* [L] data pointers: w, m (Bop family), g (Bop family: 0 = not read, its
                                     * non-finite count is 0; latent: zeros where missing) */
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
    /* the Bop family's whole step (bnnp_bop_step, bnnp_bop_rows): double buffers of m_t, w_t m_t (cur: this step's),
     * flip events, tracked weights and the steps table's rows, written into fixed buffers */
    int64_t cur, nev, ntr, Q, Qm, nfloat, hash_on;  /* nev: event slots per layer, ntr: tracked */
    void *mbuf[2], *wmbuf[2];       /* [N] m and w m of the last two steps */
    const double *u;                /* [L][E] uniforms of the event sampler */
    const double *tau_l, *tau_t;    /* [L] tau per layer, [T] per tracked weight (float64) */
    int64_t *ev_i, *ev_safe;        /* [L E][2] (index, steps since previous flip), [L E] flat index */
    double *ev_f;                   /* [L E][2] (inertia before the step, step size) */
    const int64_t *tsel;            /* [T] tracked weights' flat indices */
    uint8_t *tr_sign;               /* [T] b(w_t) = +1 */
    double *tr_out;                 /* [T][2] (inertia, step size) */
    int64_t *rows_i;                /* [L][4] flips, c2i_diff, nonfinite_grads, sign_hash */
    double *rows_f;                 /* [L][nfloat] the float columns (the Bop family's first; the rest NaN) */
    const int64_t *qpos, *mpos;     /* [L][2Q], [L][2Qm] sorted-sample positions (lo | hi) of the quantiles */
    const double *qfrac, *mfrac;    /* [L][Q], [L][Qm] their interpolation fractions */
    const void *prev;               /* latent: [N] w_{t-1} (the pre pass's copy) */
    int64_t nbop;                   /* latent: the first latent float column (after the Bop family's) */
    /* Bop's step fused with the measurement (bnnp_bop_fused, bnnp_bop_tail) */
    const void *hp;                 /* [L][3] gamma, 1 - gamma, tau of the optimizer's param group (T) */
    int64_t *nonfin;                /* [L] out: non-finite gradient entries (skipped) */
    void *fwm, *fmo;                /* [N] per flip (order of fidx): w_{t-1} m_{t-1}, m_{t-1} */
    void *tmprev;                   /* [T] m_{t-1} of the tracked weights */
    /* the weight_flips table kept up to date flip by flip (finish_flips): fhist[l][k] = weights of layer l that
     * flipped exactly k times, for k < fcap; a weight reaching fcap flips sets fover[l] (the histogram of layer l is
     * then rebuilt from the counters). NULL: not kept. */
    int64_t *fhist;
    int64_t fcap;
    uint8_t *fover;
    /* bnnp_bop_fused's tracked weights: 0 m_{t-1} gathered before the pass (tsel in any order); 1 picked up block
     * by block (tsel ascending); 2 also their outputs (tr_sign, tr_out) block by block, as bnnp_bop_tail's */
    int64_t trk_mode;
} bnnp_plan;

/* The integer row of layer l of the steps table (both families): flips, c2i_diff, nonfinite_grads from its count
 * columns cn, then the sign hash (INT64_MIN without one). */
static inline void int_row(const bnnp_plan *P, const int64_t *cn, int64_t l) {
    int64_t *ri = P->rows_i + 4 * l;
    ri[0] = cn[0];
    ri[1] = cn[1];
    ri[2] = cn[2];
    ri[3] = P->hash_on ? P->hash[l] : INT64_MIN;
}

/* The layer of flat index i, searched from layer l (indices visited in ascending order: amortised O(1)). */
static inline int64_t layer_at(const bnnp_plan *P, int64_t i, int64_t l) {
    while (l + 1 < P->L && i >= P->offs[l + 1]) l++;
    while (l > 0 && i < P->offs[l]) l--;
    return l;
}

static inline double absdiff(double a, double b) { return a < b ? b - a : a - b; }

/* Every occupied flip-event slot s (layer l, flat index gi) after bnnp_events wrote the slots' integers: the body
 * sets ev_f[2 s], ev_f[2 s + 1]; an empty slot gets NaN in both. */
#define FOR_EVENT_SLOTS(P, ...) \
    for (int64_t l = 0; l < (P)->L; l++) \
        for (int64_t j = 0; j < (P)->nev; j++) { \
            const int64_t s = l * (P)->nev + j, gi = (P)->ev_safe[s]; \
            if ((P)->ev_i[2 * s] < 0) { \
                (P)->ev_f[2 * s] = (P)->ev_f[2 * s + 1] = (double)NAN; \
                continue; \
            } \
            __VA_ARGS__ \
        }

/* Every tracked weight k: flat index i, layer l, index ii in the layer (the indices ascend layer by layer). */
#define FOR_TRACKED(P, ...) \
    { \
        int64_t l = 0; \
        for (int64_t k = 0; k < (P)->ntr; k++) { \
            const int64_t i = (P)->tsel[k]; \
            l = layer_at(P, i, l); \
            const int64_t ii = i - (P)->offs[l]; \
            __VA_ARGS__ \
        } \
    }

/* The flipped weights of block [b0, b0 + bn) of layer l (flat offset o), after the block's pass: their flat
 * indices appended at nf (finish_flips does the rest). Returns the new nf. */
static inline int64_t record_flips(const bnnp_plan *P, const uint8_t *S, int64_t b0, int64_t bn, int64_t o,
                                   int64_t nf) {
    for (int64_t j = 0; j < bn; j++) {
        const int64_t i = b0 + j;
        if (S[i] & S_FLIP) P->fidx[nf++] = o + i;
    }
    return nf;
}

/* The per-weight bookkeeping of the flips fidx[r0, r1) of layer l, after the layer's pass: the previous last-flip
 * step into flast, counter + 1, last-flip step := t, the sign hash (the state byte holds the new sign). The
 * counters are scattered over the layer, so this runs as its own loop over the recorded indices, prefetching ahead:
 * the cache misses of successive flips overlap (inside the pass each flip waited for its own). */
static inline void finish_flips(const bnnp_plan *P, int64_t r0, int64_t r1, int64_t l) {
    const int64_t *fidx = P->fidx;
    int32_t *count = P->count, *last = P->last, *flast = P->flast;
    const int32_t *mix = P->mix;
    const uint8_t *state = P->state;
    const int32_t t = P->t;
    int64_t *fh = P->fhist ? P->fhist + l * P->fcap : NULL;
    const int64_t cap = P->fcap;
    int over = 0;
    int64_t h = 0;
    for (int64_t r = r0; r < r1; r++) {
        if (r + 16 < r1) {
            const int64_t gp = fidx[r + 16];
            __builtin_prefetch(count + gp, 1);
            __builtin_prefetch(last + gp, 1);
            __builtin_prefetch(state + gp, 0);
            if (mix) __builtin_prefetch(mix + gp, 0);
        }
        const int64_t gi = fidx[r];
        flast[r] = last[gi];
        const int32_t c = count[gi];
        count[gi] = c + 1;
        last[gi] = t;
        if (fh) {  /* one weight moves from the bin of c flips to that of c + 1 */
            if (c >= 0 && c + 1 < cap) {
                fh[c] -= 1;
                fh[c + 1] += 1;
            } else {
                over = 1;
            }
        }
        if (mix) h += (state[gi] & S_SIGN) ? (int64_t)mix[gi] : -(int64_t)mix[gi];
    }
    if (mix) P->hash[l] += h;
    if (over) P->fover[l] = 1;
}

/* AVX-512 kernel of the Bop post-step pass (float32), chosen at run time where the CPU has AVX-512 (F, BW, VL, DQ):
 * 16 weights per iteration; every predicate is a 16-bit mask added into a 32-bit lane counter (one masked subtract
 * of -1: the counters live in vector registers, no general-purpose register pressure), reduced once per call. The
 * same IEEE operations as the portable loop of _pass_tmpl.h (w >= 0, |m| > tau, w m, the margin's sign bit flipped
 * where the weight flipped, x > thr_j, g - g == 0 for finite g). Flipped weights are recorded here from the flip
 * mask (rare: a mask test per 16 weights), in index order. Returns the number of weights done (a multiple of 16);
 * adds the counts to c, sum |m| to *sa and the flips to *nf. bnnp_set_simd(0) turns it off (the tests run both). */
static int simd_level = -1;

__attribute__((visibility("default"))) void bnnp_set_simd(int level) { simd_level = level; }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,popcnt,bmi")))

typedef struct {  /* where the kernel records flipped weights (the plan's arrays, this layer's offset) */
    const bnnp_plan *P;
    int64_t o, l, b0, nf;
} flip_sink;

AVX512_TARGET static inline void sink_flips(flip_sink *fs, int64_t j, unsigned fm) {
    int64_t *fidx = fs->P->fidx, nf = fs->nf;
    const int64_t base = fs->o + fs->b0 + j;
    while (fm) {  /* flat indices in order (finish_flips does the rest) */
        fidx[nf++] = base + __builtin_ctz(fm);
        fm &= fm - 1;
    }
    fs->nf = nf;
}

#define ACC(a, k) a = _mm512_mask_sub_epi32(a, (k), a, m1)
/* Shared by both AVX-512 kernels, on their local names: the constants and lane counters (KERNEL_SETUP); the count
 * columns of 16 weights from the masks f (flipped),
 * s (b(w_t)), s0m (b(w_0)), ab (|m| > tau), pa (above before), the margin x against the ladder t0..t6 (seven
 * compares, or, for a ladder of powers of two (lad: ladder_pow2), x's bucket counted in nib); the next
 * |m| > tau mask na (kept where tau is NaN); the new state bytes (the bits are distinct: a masked add sets each);
 * the lane counters reduced into c and *sa at the end. */
#define COUNT16() \
        ACC(cf, f); \
        ACC(cc, s ^ s0m); \
        ACC(ca, ab); \
        ACC(cu, ab & (__mmask16)~pa); \
        ACC(cd, pa & (__mmask16)~ab); \
        if (lad) {  /* the ladder's bucket k of x (ladder_pow2), counted in 4-bit field k of the lane's nib */ \
            const __mmask16 gt = _mm512_cmp_ps_mask(x, t0, _CMP_GT_OQ); \
            const __m512i kk = _mm512_maskz_min_epi32( \
                gt, _mm512_srai_epi32(_mm512_sub_epi32(_mm512_castps_si512(x), lbias), 23), seven); \
            nib = _mm512_mask_add_epi32(nib, gt, nib, _mm512_sllv_epi32(one, _mm512_slli_epi32(kk, 2))); \
            if (++nk == 15) NIB_FLUSH(); \
        } else { \
            ACC(e0, _mm512_cmp_ps_mask(x, t0, _CMP_GT_OQ)); \
            ACC(e1, _mm512_cmp_ps_mask(x, t1, _CMP_GT_OQ)); \
            ACC(e2, _mm512_cmp_ps_mask(x, t2, _CMP_GT_OQ)); \
            ACC(e3, _mm512_cmp_ps_mask(x, t3, _CMP_GT_OQ)); \
            ACC(e4, _mm512_cmp_ps_mask(x, t4, _CMP_GT_OQ)); \
            ACC(e5, _mm512_cmp_ps_mask(x, t5, _CMP_GT_OQ)); \
            ACC(e6, _mm512_cmp_ps_mask(x, t6, _CMP_GT_OQ)); \
        } \
        const __mmask16 na = (ab & tvm) | (pa & (__mmask16)~tvm)
/* The 4-bit fields 1..7 of nib (at most 15 each: one is added per lane and iteration, and this runs every 15
 * iterations) added to the bucket counters e0..e6 (bucket k in e_{k-1}); nib emptied. */
#define NIB_FLUSH() \
    do { \
        e0 = _mm512_add_epi32(e0, _mm512_and_si512(_mm512_srli_epi32(nib, 4), f15)); \
        e1 = _mm512_add_epi32(e1, _mm512_and_si512(_mm512_srli_epi32(nib, 8), f15)); \
        e2 = _mm512_add_epi32(e2, _mm512_and_si512(_mm512_srli_epi32(nib, 12), f15)); \
        e3 = _mm512_add_epi32(e3, _mm512_and_si512(_mm512_srli_epi32(nib, 16), f15)); \
        e4 = _mm512_add_epi32(e4, _mm512_and_si512(_mm512_srli_epi32(nib, 20), f15)); \
        e5 = _mm512_add_epi32(e5, _mm512_and_si512(_mm512_srli_epi32(nib, 24), f15)); \
        e6 = _mm512_add_epi32(e6, _mm512_srli_epi32(nib, 28)); \
        nib = _mm512_setzero_si512(); \
        nk = 0; \
    } while (0)
#define KERNEL_SETUP() \
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32((int)0x80000000u)); \
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff), m1 = _mm512_set1_epi32(-1); \
    const __m128i b1 = _mm_set1_epi8(1), b2 = _mm_set1_epi8(2), b4 = _mm_set1_epi8(4); \
    const __m512 t0 = _mm512_set1_ps(th[0]), t1 = _mm512_set1_ps(th[1]), t2 = _mm512_set1_ps(th[2]), \
                 t3 = _mm512_set1_ps(th[3]), t4 = _mm512_set1_ps(th[4]), t5 = _mm512_set1_ps(th[5]), \
                 t6 = _mm512_set1_ps(th[6]); \
    __m512i cf = _mm512_setzero_si512(), cc = cf, cn = cf, ca = cf, cu = cf, cd = cf; \
    __m512i e0 = cf, e1 = cf, e2 = cf, e3 = cf, e4 = cf, e5 = cf, e6 = cf; \
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd(); \
    const __mmask16 tvm = tv ? (__mmask16)0xFFFF : 0; \
    const __m512i lbias = _mm512_set1_epi32(lad ? ladder_bias(th) : 0), seven = _mm512_set1_epi32(7); \
    const __m512i one = _mm512_set1_epi32(1), f15 = _mm512_set1_epi32(15); \
    __m512i nib = _mm512_setzero_si512(); \
    int nk = 0
#define STATE16() state16(sb, s, na, f)
/* (bucketed ladder: the last fields flushed, then bucket counts -> counts above each point, x > thr_j iff its
 * bucket is > j: the suffix sums e_j = sum of buckets j+1 .. 7) */
#define REDUCE16() \
    do { \
        if (lad) { \
            NIB_FLUSH(); \
            e5 = _mm512_add_epi32(e5, e6); \
            e4 = _mm512_add_epi32(e4, e5); \
            e3 = _mm512_add_epi32(e3, e4); \
            e2 = _mm512_add_epi32(e2, e3); \
            e1 = _mm512_add_epi32(e1, e2); \
            e0 = _mm512_add_epi32(e0, e1); \
        } \
        reduce16(c, sa, cf, cc, cn, ca, cu, cd, e0, e1, e2, e3, e4, e5, e6, s0, s1); \
    } while (0)

/* Whether the ladder's points are t_j = t_0 2^j exactly with t_0 positive and normal (float32): bits(t_j) = bits(t_0)
 * + j 2^23. Then for every x with x > t_0 (false for NaN) the number of points below x is min(7, (bits(x) - bits(t_0)
 * - 1) / 2^23 + 1), since those x are positive and the bits of positive floats are in the order of their values
 * (+inf's included: a last point of 2^128 is +inf, whose bits follow the largest float's, and x = +inf is not above
 * it). The kernels then count the ladder with one compare instead of seven, with the counts of the seven compares;
 * any other ladder (tau = 0 or NaN, points that are subnormal or not k tau in float32) takes the compares. */
static inline int ladder_pow2(const float *th) {
    uint32_t b0, b;
    memcpy(&b0, th, sizeof b0);
    if (b0 < 0x00800000u || b0 >= 0x7f800000u) return 0;  /* t_0 zero, subnormal, negative, inf or NaN */
    for (int j = 1; j < 7; j++) {
        memcpy(&b, th + j, sizeof b);
        if (b != b0 + ((uint32_t)j << 23)) return 0;
    }
    return 1;
}

/* bits(t_0) + 1 - 2^23: (bits(x) - this) >> 23 = (bits(x) - bits(t_0) - 1) / 2^23 + 1 for x > t_0 (no overflow:
 * bits(x) <= bits(+inf) and this is >= 1) */
static inline int32_t ladder_bias(const float *th) {
    uint32_t b0;
    memcpy(&b0, th, sizeof b0);
    return (int32_t)(b0 + 1u - (1u << 23));
}

AVX512_TARGET static inline __m128i state16(__m128i sb, __mmask16 s, __mmask16 na, __mmask16 f) {
    __m128i nst = _mm_and_si128(sb, _mm_set1_epi8(2));
    nst = _mm_mask_add_epi8(nst, s, nst, _mm_set1_epi8(1));
    nst = _mm_mask_add_epi8(nst, na, nst, _mm_set1_epi8(4));
    return _mm_mask_add_epi8(nst, f, nst, _mm_set1_epi8(8));
}

AVX512_TARGET static inline void reduce16(int64_t *c, double *sa, __m512i cf, __m512i cc, __m512i cn, __m512i ca,
                                          __m512i cu, __m512i cd, __m512i e0, __m512i e1, __m512i e2, __m512i e3,
                                          __m512i e4, __m512i e5, __m512i e6, __m512d s0, __m512d s1) {
    c[0] += _mm512_reduce_add_epi32(cf); c[1] += _mm512_reduce_add_epi32(cc); c[2] += _mm512_reduce_add_epi32(cn);
    c[3] += _mm512_reduce_add_epi32(ca); c[4] += _mm512_reduce_add_epi32(cu); c[5] += _mm512_reduce_add_epi32(cd);
    c[6] += _mm512_reduce_add_epi32(e0); c[7] += _mm512_reduce_add_epi32(e1); c[8] += _mm512_reduce_add_epi32(e2);
    c[9] += _mm512_reduce_add_epi32(e3); c[10] += _mm512_reduce_add_epi32(e4); c[11] += _mm512_reduce_add_epi32(e5);
    c[12] += _mm512_reduce_add_epi32(e6);
    *sa += _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
}

AVX512_TARGET static inline int64_t bop_avx512_f32_body(const float *w, const float *m, const float *g, uint8_t *S,
                                                        float *mo, float *wmo, int64_t bn, float tl, int64_t tv,
                                                        const float *th, int64_t *c, double *sa, flip_sink *fs,
                                                        const int nt, const int hasg, const int lad) {
    const __m512 zero = _mm512_setzero_ps(), tau = _mm512_set1_ps(tl);
    KERNEL_SETUP();
    int64_t j = 0;
    for (; j + 16 <= bn; j += 16) {
        const __m512 wv = _mm512_loadu_ps(w + j), mv = _mm512_loadu_ps(m + j);
        const __m128i sb = _mm_loadu_si128((const __m128i *)(S + j));
        const __mmask16 s = _mm512_cmp_ps_mask(wv, zero, _CMP_GE_OQ);
        const __mmask16 ps = _mm_test_epi8_mask(sb, b1), s0m = _mm_test_epi8_mask(sb, b2);
        const __mmask16 pa = _mm_test_epi8_mask(sb, b4);
        const __mmask16 f = s ^ ps;
        const __m512 am = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(mv), absmask));
        const __mmask16 ab = _mm512_cmp_ps_mask(am, tau, _CMP_GT_OQ);
        const __m512 wm = _mm512_mul_ps(wv, mv);
        const __m512 x = _mm512_mask_xor_ps(wm, f, wm, sign);
        if (hasg) {  /* g - g == 0 iff g is finite (a gradient proved finite is not read: g NULL) */
            const __m512 gv = _mm512_loadu_ps(g + j);
            ACC(cn, (__mmask16)~_mm512_cmp_ps_mask(_mm512_sub_ps(gv, gv), zero, _CMP_EQ_OQ));
        }
        COUNT16();
        const __m128i nst = STATE16();
        _mm_storeu_si128((__m128i *)(S + j), nst);
        if (nt) {  /* streaming stores: not read back before the next step (only at a few indices) */
            _mm512_stream_ps(mo + j, mv);
            _mm512_stream_ps(wmo + j, wm);
        } else {
            _mm512_storeu_ps(mo + j, mv);
            _mm512_storeu_ps(wmo + j, wm);
        }
        s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(am)));
        s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(am, 1)));
        if (__builtin_expect(f != 0, 0)) sink_flips(fs, j, f);
    }
    REDUCE16();
    return j;
}

AVX512_TARGET static int64_t bop_avx512_f32(const float *w, const float *m, const float *g, uint8_t *S, float *mo,
                                             float *wmo, int64_t bn, float tl, int64_t tv, const float *th,
                                             int64_t *c, double *sa, int big, flip_sink *fs) {
    const int nt = big && !((uintptr_t)mo & 63) && !((uintptr_t)wmo & 63);
#define BODY(NT, G, LAD) bop_avx512_f32_body(w, m, g, S, mo, wmo, bn, tl, tv, th, c, sa, fs, NT, G, LAD)
    if (ladder_pow2(th)) {
        if (g) return nt ? BODY(1, 1, 1) : BODY(0, 1, 1);
        return nt ? BODY(1, 0, 1) : BODY(0, 0, 1);
    }
    if (g) return nt ? BODY(1, 1, 0) : BODY(0, 1, 0);
    return nt ? BODY(1, 0, 0) : BODY(0, 0, 0);
#undef BODY
}

static inline void simd_detect(void) {
    if (simd_level < 0) {
        __builtin_cpu_init();
        simd_level = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") ? 1 : 0;
    }
}

static inline int64_t bop_fast_f32(const float *w, const float *m, const float *g, uint8_t *S, float *mo,
                                   float *wmo, int64_t bn, float tl, int64_t tv, const float *th, int64_t *c,
                                   double *sa, int big, flip_sink *fs) {
    simd_detect();
    return simd_level > 0 ? bop_avx512_f32(w, m, g, S, mo, wmo, bn, tl, tv, th, c, sa, big, fs) : 0;
}

/* AVX-512 kernel of Bop's step fused with the measurement (float32; bnnp_bop_fused in _pass_tmpl.h), 16 weights
 * per iteration, the same IEEE operations as its portable loops: b(w_{t-1}) checked against the stored sign (a
 * change made outside the step: the hash follows, rare), m_t = ok ? fma(g, gamma, m (1 - gamma)) : m with ok = (g - g
 * == 0), w_t = -w_{t-1} where w_{t-1} m_t > tau_opt (the sign bit flipped), the state byte, every count of
 * bop_avx512_f32_body (margin x = w_{t-1} m_t), Sum |m_t|; flipped weights recorded with w_{t-1} m_{t-1} and
 * m_{t-1}. Returns the number of weights done (a multiple of 16). */
AVX512_TARGET static inline int64_t fused_avx512_f32_body(float *w, float *m, const float *g, uint8_t *S,
                                                          int64_t bn, float gam, float omg, float bt, float tl,
                                                          int64_t tv, const float *th, int64_t *c, double *sa,
                                                          flip_sink *fs, float *fwm, float *fmo, const int lad) {
    const bnnp_plan *P = fs->P;
    const __m512 zero = _mm512_setzero_ps(), tau = _mm512_set1_ps(tl), btv = _mm512_set1_ps(bt);
    const __m512 gv_ = _mm512_set1_ps(gam), ov_ = _mm512_set1_ps(omg);
    KERNEL_SETUP();
    int64_t j = 0;
    for (; j + 16 <= bn; j += 16) {
        const __m512 wv = _mm512_loadu_ps(w + j), mv = _mm512_loadu_ps(m + j), gv = _mm512_loadu_ps(g + j);
        const __m128i sb = _mm_loadu_si128((const __m128i *)(S + j));
        _mm_prefetch((const char *)(w + j + 512), _MM_HINT_T0);
        _mm_prefetch((const char *)(m + j + 512), _MM_HINT_T0);
        _mm_prefetch((const char *)(g + j + 512), _MM_HINT_T0);
        const __mmask16 sp = _mm512_cmp_ps_mask(wv, zero, _CMP_GE_OQ);  /* b(w_{t-1}) */
        const __mmask16 chg = sp ^ _mm_test_epi8_mask(sb, b1);
        if (__builtin_expect(chg != 0, 0) && P->mix) {  /* changed outside the step: the hash follows */
            unsigned cm = chg;
            while (cm) {
                const int64_t jj = j + __builtin_ctz(cm), gi = fs->o + fs->b0 + jj;
                cm &= cm - 1;
                P->hash[fs->l] += ((sp >> (jj - j)) & 1) ? (int64_t)P->mix[gi] : -(int64_t)P->mix[gi];
            }
        }
        const __mmask16 s0m = _mm_test_epi8_mask(sb, b2), pa = _mm_test_epi8_mask(sb, b4);
        const __mmask16 ok = _mm512_cmp_ps_mask(_mm512_sub_ps(gv, gv), zero, _CMP_EQ_OQ);
        const __m512 mn = _mm512_mask_blend_ps(ok, mv, _mm512_fmadd_ps(gv, gv_, _mm512_mul_ps(mv, ov_)));
        const __m512 x = _mm512_mul_ps(wv, mn);  /* the margin w_{t-1} m_t */
        const __mmask16 fl = _mm512_cmp_ps_mask(x, btv, _CMP_GT_OQ);
        const __m512 wn = _mm512_mask_xor_ps(wv, fl, wv, sign);
        _mm512_storeu_ps(m + j, mn);
        _mm512_storeu_ps(w + j, wn);
        const __mmask16 s = _mm512_cmp_ps_mask(wn, zero, _CMP_GE_OQ);
        const __mmask16 f = s ^ sp;
        const __m512 am = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(mn), absmask));
        const __mmask16 ab = _mm512_cmp_ps_mask(am, tau, _CMP_GT_OQ);
        ACC(cn, (__mmask16)~ok);
        COUNT16();
        const __m128i nst = STATE16();
        _mm_storeu_si128((__m128i *)(S + j), nst);
        s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(am)));
        s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(am, 1)));
        if (__builtin_expect(f != 0, 0)) {  /* flipped: index, counters, hash, w_{t-1} m_{t-1}, m_{t-1} */
            float wp_[16], mp_[16];
            _mm512_storeu_ps(wp_, _mm512_mul_ps(wv, mv));
            _mm512_storeu_ps(mp_, mv);
            unsigned fm = f;
            int64_t r = fs->nf;
            while (fm) {
                const int k = __builtin_ctz(fm);
                fm &= fm - 1;
                fwm[r] = wp_[k];
                fmo[r++] = mp_[k];
            }
            sink_flips(fs, j, f);
        }
    }
    REDUCE16();
    return j;
}

AVX512_TARGET static int64_t fused_avx512_f32(float *w, float *m, const float *g, uint8_t *S, int64_t bn,
                                              float gam, float omg, float bt, float tl, int64_t tv, const float *th,
                                              int64_t *c, double *sa, flip_sink *fs, float *fwm, float *fmo) {
    return ladder_pow2(th) ? fused_avx512_f32_body(w, m, g, S, bn, gam, omg, bt, tl, tv, th, c, sa, fs, fwm, fmo, 1)
                           : fused_avx512_f32_body(w, m, g, S, bn, gam, omg, bt, tl, tv, th, c, sa, fs, fwm, fmo, 0);
}

static inline int64_t fused_fast_f32(float *w, float *m, const float *g, uint8_t *S, int64_t bn, float gam,
                                     float omg, float bt, float tl, int64_t tv, const float *th, int64_t *c,
                                     double *sa, flip_sink *fs, float *fwm, float *fmo) {
    simd_detect();
    return simd_level > 0 ? fused_avx512_f32(w, m, g, S, bn, gam, omg, bt, tl, tv, th, c, sa, fs, fwm, fmo) : 0;
}
#else
typedef struct {
    const bnnp_plan *P;
    int64_t o, l, b0, nf;
} flip_sink;

static inline int64_t bop_fast_f32(const float *w, const float *m, const float *g, uint8_t *S, float *mo,
                                   float *wmo, int64_t bn, float tl, int64_t tv, const float *th, int64_t *c,
                                   double *sa, int big, flip_sink *fs) {
    (void)big, (void)w, (void)m, (void)g, (void)S, (void)mo, (void)wmo, (void)bn, (void)tl, (void)tv, (void)th, (void)c,
        (void)sa, (void)fs;
    return 0;
}
#endif

#if !(defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)))
static inline int64_t fused_fast_f32(float *w, float *m, const float *g, uint8_t *S, int64_t bn, float gam,
                                     float omg, float bt, float tl, int64_t tv, const float *th, int64_t *c,
                                     double *sa, flip_sink *fs, float *fwm, float *fmo) {
    (void)w, (void)m, (void)g, (void)S, (void)bn, (void)gam, (void)omg, (void)bt, (void)tl, (void)tv, (void)th,
        (void)c, (void)sa, (void)fs, (void)fwm, (void)fmo;
    return 0;
}
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define STREAM_FENCE(big) do { if (big && simd_level > 0) _mm_sfence(); } while (0)
#else
#define STREAM_FENCE(big) do { (void)(big); } while (0)
#endif

#define T float
#define SFX f32
#define ABS(x) __builtin_fabsf(x)
#define IT int32_t
#define BOP_FAST bop_fast_f32
#define FUSED_FAST fused_fast_f32
#define UT uint32_t
#define FMA(a, b, c) __builtin_fmaf(a, b, c)
#include "_pass_tmpl.h"  /* undefines its parameters at its end */

#define T double
#define SFX f64
#define ABS(x) __builtin_fabs(x)
#define IT int64_t
#define BOP_FAST(w, m, g, S, mo, wmo, bn, tl, tv, th, c, sa, big, fs) 0
#define FUSED_FAST(w, m, g, S, bn, gam, omg, bt, tl, tv, th, c, sa, fs, fwm, fmo) 0
#define UT uint64_t
#define FMA(a, b, c) __builtin_fma(a, b, c)
#include "_pass_tmpl.h"  /* undefines its parameters at its end */

#include "_tfrecord.h"  /* TensorBoard event records (bnn_probe/runlog/tbevents.py) */

__attribute__((visibility("default"))) int64_t bnnp_abi_version(void) { return 15; }

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_pass", "bnn-probe's one-pass CPU measurement "
                                    "(called through ctypes: bnn_probe.probe.cpu_pass).", -1, NULL};

PyMODINIT_FUNC PyInit__pass(void) { return PyModule_Create(&moddef); }
