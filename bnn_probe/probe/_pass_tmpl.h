/* The one-pass measurement for one float type; included twice by _pass.c with
 *   T = float / double, SFX = f32 / f64, ABS = fabsf / fabs, IT = int32_t / int64_t (lane-wide integers),
 *   UT = uint32_t / uint64_t (T's bits), BOP_FAST (the float32 AVX-512 kernel, or 0); all undefined at its end.
 * See _pass.c for the state byte, the count columns and the contract of every function. */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SFX)

/* The Bop family's counts of the block's weights [J0, bn) after their state bytes are written (the post-step pass
 * and the fused step share it): flips, c2i, |m| > tau and the crossings from the state bytes (16-bit lanes); the
 * margin ladder from WM, the block's w_t m_t at i (x = w_{t-1} m_t: its sign bit flipped where the weight flipped),
 * in a second loop over the block (in L1: fewer live registers); Sum |m_t| into sb. */
#define BOP_COUNTS(WM, J0) \
            { \
                uint16_t bf = 0, bc = 0, ba = 0, bu = 0, bd = 0; \
_Pragma("GCC ivdep") \
                for (int64_t j = J0; j < bn; j++) { \
                    const uint16_t v = S[b0 + j]; \
                    bf += (v >> 3) & 1; \
                    bc += (v ^ (v >> 1)) & 1; \
                    ba += (v >> 2) & 1; \
                    bu += ((v >> 2) & ~(v >> 4)) & 1; \
                    bd += ((v >> 4) & ~(v >> 2)) & 1; \
                } \
                cf += bf; \
                cc += bc; \
                if (tv) { ca += ba; cu += bu; cd += bd; } \
                else cd += ba; /* tau is NaN: nothing is above, every weight that was above crossed down */ \
            } \
_Pragma("GCC ivdep") \
            for (int64_t j = J0; j < bn; j++) { \
                const int64_t i = b0 + j; \
                const T wm = WM; \
                UT xb; \
                memcpy(&xb, &wm, sizeof(T)); \
                xb ^= (UT)((S[i] >> 3) & 1) << (8 * sizeof(T) - 1); /* -w m where flipped: the sign bit */ \
                T x; \
                memcpy(&x, &xb, sizeof(T)); \
                e0 += (IT)(x > t0); \
                e1 += (IT)(x > t1); \
                e2 += (IT)(x > t2); \
                e3 += (IT)(x > t3); \
                e4 += (IT)(x > t4); \
                e5 += (IT)(x > t5); \
                e6 += (IT)(x > t6); \
            } \
_Pragma("omp simd reduction(+ : sb)") \
            for (int64_t j = J0; j < bn; j++) sb += (double)ABS(m[b0 + j]);

#define BOP_LOOP(SEXPR, J0) \
_Pragma("GCC ivdep") \
            for (int64_t j = J0; j < bn; j++) { \
                const int64_t i = b0 + j; \
                const T wi = w[i], mi = m[i]; \
                const IT st = (IT)S[i]; \
                const IT s = SEXPR; \
                const IT f = s ^ (st & S_SIGN); \
                const IT pa = (st >> 2) & 1; \
                const IT ab = ABS(mi) > tl; \
                const T d = g ? g[i] - g[i] : (T)0; /* NaN iff g is NaN or infinite; no g: proved finite */ \
                cn += (IT)!(d == (T)0); \
                const IT na = tv ? ab : pa; \
                S[i] = (uint8_t)((st & S_SIGN0) | s | (na << 2) | (f << 3) | (pa << 4)); \
                mo[i] = mi; \
                wmo[i] = wi * mi; \
            } \
            BOP_COUNTS(wmo[i], J0)

#define LAT_LOOP(SEXPR) \
_Pragma("GCC ivdep") \
            for (int64_t j = 0; j < bn; j++) { \
                const int64_t i = b0 + j; \
                const T wi = w[i]; \
                const IT st = (IT)S[i]; \
                const IT s = SEXPR; \
                const IT f = s ^ (st & S_SIGN); \
                const T aw = ABS(wi); \
                const T d = g[i] - g[i]; \
                cf += f; \
                cc += s ^ ((st >> 1) & 1); \
                cn += (IT)!(d == (T)0); \
                ck += cv & (IT)(aw >= cl); \
                S[i] = (uint8_t)((st & (S_SIGN0 | S_ABOVE)) | s | (f << 3)); \
            } \
_Pragma("omp simd reduction(+ : sb)") \
            for (int64_t j = 0; j < bn; j++) sb += (double)ABS(w[b0 + j]);

/* Pre-step pass: S_SIGN := b(w_{t-1}) where it differs from the stored sign (a change made outside the optimizer
 * step since the last measurement; rare, so the state is written only then); the sign hash follows every change, and
 * (Bop family) the buffered w_{t-1} m_{t-1} of a changed weight is recomputed with w as it is now.
 * copy_out (latent family): w_{t-1} copied, flat. Returns the number of weights whose sign changed. */
HOT int64_t FN(bnnp_pre)(const bnnp_plan *P, T *copy_out) {
    const uintptr_t *wp = P->wp;
    const uint8_t *sgn = P->sgn;
    uint8_t *state = P->state;
    const int32_t *mix = P->mix;
    int64_t *hash = P->hash;
    int64_t changed = 0, o = 0;
    T *wmb = (T *)P->wmbuf[P->cur];  /* Bop family: step t-1's w m and m, which the post pass reads (else NULL) */
    const T *mb = (const T *)P->mbuf[P->cur];
    for (int64_t l = 0; l < P->L; l++) {
        const int64_t n = P->lens[l];
        const T *restrict w = (const T *)wp[l];
        uint8_t *restrict S = state + o;
        const uint8_t *restrict sg = sgn ? sgn + o : NULL;
        if (copy_out) memcpy(copy_out + o, w, (size_t)n * sizeof(T));
        for (int64_t b0 = 0; b0 < n; b0 += BLK) {
            const int64_t bn = n - b0 < BLK ? n - b0 : BLK;
            IT d = 0;
            if (sg) {
#pragma omp simd reduction(+ : d)
                for (int64_t j = 0; j < bn; j++) d += ((IT)sg[b0 + j] ^ (IT)S[b0 + j]) & 1;
            } else {
#pragma omp simd reduction(+ : d)
                for (int64_t j = 0; j < bn; j++) d += (IT)(w[b0 + j] >= (T)0) ^ ((IT)S[b0 + j] & S_SIGN);
            }
            if (!d) continue;
            changed += d;
            for (int64_t j = 0; j < bn; j++) {
                const int64_t i = b0 + j;
                const uint8_t s = sg ? (sg[i] & 1) : (uint8_t)(w[i] >= (T)0);
                if (s == (S[i] & S_SIGN)) continue;
                S[i] = (uint8_t)((S[i] & ~S_SIGN) | s);
                if (mix) hash[l] += s ? (int64_t)mix[o + i] : -(int64_t)mix[o + i];
                if (wmb) wmb[o + i] = w[i] * mb[o + i];  /* the flip events' w_{t-1} m_{t-1}, with w as it is now */
            }
        }
        o += n;
    }
    return changed;
}

/* Post-step pass of the Bop family (Bop: m = exp_avg; Bop2ndOrder: m = normalised momentum m_hat), every layer:
 *   s = b(w_t), f = s != b(w_{t-1}), margin x = w_{t-1} m_t = (f ? -1 : 1) w_t m_t,
 *   counts[l] += (f, s != b(w_0), !isfinite(g), |m| > tau, up-crossing, down-crossing, x > thr_j for j < 7),
 *   thr: the ladder points k tau of each layer in ascending order, so that #{j : x > thr_j} > j iff x > thr_j,
 *   sum_abs[l] = sum |m| (float64), m_out = m_t, wm_out = w_t m_t (for the next step's events),
 *   flipped weights: fidx (flat index) and flast (their last-flip step before this one), count += 1, last = t,
 *   sign hash. Returns the number of flips. */
HOT int64_t FN(bnnp_bop_post)(bnnp_plan *P) {
    const uintptr_t *wp = P->wp, *mp = P->mp, *gp = P->gp;
    const uint8_t *sgn = P->sgn, *tau_valid = P->tau_valid;
    const T *tau = (const T *)P->tau, *thr = (const T *)P->thr;
    uint8_t *state = P->state;
    T *m_out = (T *)P->m_out, *wm_out = (T *)P->wm_out;
    int64_t *counts = P->counts;
    double *sum_abs = P->sum_abs;
    const int64_t L = P->L, K = P->K;
    T *samp = (T *)P->samp;
    int64_t o = 0, nf = 0, ntot = 0;
    for (int64_t l = 0; l < L; l++) ntot += P->lens[l];
    const int big = ntot * (int64_t)sizeof(T) > (4 << 20);  /* m_t, w_t m_t copies larger than the caches */
    (void)big;
    for (int64_t l = 0; l < L; l++) {
        const int64_t n = P->lens[l];
        const int64_t nf0 = nf;  /* this layer's first flip in fidx */
        const int64_t *q = P->qidx + l * K, nq = samp ? P->ks[l] : 0;
        int64_t qi = 0;
        T *sa_ = samp ? samp + l * K : NULL, *sb_ = samp ? samp + (L + l) * K : NULL,
          *sc_ = samp ? samp + (2 * L + l) * K : NULL;
        const T *restrict w = (const T *)wp[l], *restrict m = (const T *)mp[l], *restrict g = (const T *)gp[l];
        const uint8_t *restrict sg = sgn ? sgn + o : NULL;
        uint8_t *restrict S = state + o;
        T *restrict mo = m_out + o, *restrict wmo = wm_out + o;
        const T tl = tau[l];
        const IT tv = tau_valid[l];
        const T t0 = thr[7 * l], t1 = thr[7 * l + 1], t2 = thr[7 * l + 2], t3 = thr[7 * l + 3], t4 = thr[7 * l + 4],
                t5 = thr[7 * l + 5], t6 = thr[7 * l + 6];
        int64_t c[NC_BOP] = {0};
        double sa = 0.0;
        for (int64_t b0 = 0; b0 < n; b0 += BLK) {
            const int64_t bn = n - b0 < BLK ? n - b0 : BLK;
            IT cf = 0, cc = 0, cn = 0, ca = 0, cu = 0, cd = 0, e0 = 0, e1 = 0, e2 = 0, e3 = 0, e4 = 0, e5 = 0, e6 = 0;
            int64_t jv = 0;
            double sb = 0.0;
            if (sg) {
                BOP_LOOP((IT)(sg[i] & 1), 0)
            } else {  /* whole vectors by the AVX-512 kernel where the CPU has it (float32; it records their flips),
                       * the rest here */
                flip_sink fs = {P, o, l, b0, nf};
                jv = BOP_FAST(w + b0, m + b0, g ? g + b0 : NULL, S + b0, mo + b0, wmo + b0, bn, tl, tv, thr + 7 * l, c,
                              &sa, big, &fs);
                nf = fs.nf;
                BOP_LOOP((IT)(wi >= (T)0), jv)
            }
            c[0] += cf; c[1] += cc; c[2] += cn; c[3] += ca; c[4] += cu; c[5] += cd;
            c[6] += e0; c[7] += e1; c[8] += e2; c[9] += e3; c[10] += e4; c[11] += e5; c[12] += e6;
            sa += sb;
            /* the quantile sample (sorted indices) while the block is in cache: |m|, w m, the margin */
            for (; qi < nq && q[qi] < b0 + bn; qi++) {
                const int64_t i = q[qi];
                const T wm = wmo[i];
                sa_[qi] = ABS(m[i]);
                sb_[qi] = wm;
                sc_[qi] = (S[i] & S_FLIP) ? -wm : wm;
            }
            if (cf) nf = record_flips(P, S, b0 + jv, bn - jv, o, nf);  /* the scalar part's flips */
        }
        finish_flips(P, nf0, nf, l);
        for (int k = 0; k < NC_BOP; k++) counts[NC_BOP * l + k] = c[k];
        sum_abs[l] = sa;
        o += n;
    }
    STREAM_FENCE(big);
    P->nf = nf;
    return nf;
}

/* Post-step pass of the latent family: s = b(w_t), f = s != b(w_{t-1}) (the pre pass stored b(w_{t-1})),
 *   counts[l] += (f, s != b(w_0), !isfinite(g), |w| >= clip), sum_abs[l] = sum |w|; flipped weights as above. */
HOT int64_t FN(bnnp_lat_post)(bnnp_plan *P) {
    const uintptr_t *wp = P->wp, *gp = P->gp;
    const uint8_t *sgn = P->sgn, *clip_valid = P->clip_valid;
    const T *clip = (const T *)P->clip;
    uint8_t *state = P->state;
    int64_t *counts = P->counts;
    double *sum_abs = P->sum_abs;
    const int64_t L = P->L, K = P->K;
    T *samp = (T *)P->samp;
    int64_t o = 0, nf = 0;
    for (int64_t l = 0; l < L; l++) {
        const int64_t n = P->lens[l];
        const int64_t nf0 = nf;  /* this layer's first flip in fidx */
        const int64_t *q = P->qidx + l * K, nq = samp ? P->ks[l] : 0;
        int64_t qi = 0;
        T *sa_ = samp ? samp + l * K : NULL;
        const T *restrict w = (const T *)wp[l], *restrict g = (const T *)gp[l];
        const uint8_t *restrict sg = sgn ? sgn + o : NULL;
        uint8_t *restrict S = state + o;
        const T cl = clip[l];
        const IT cv = clip_valid[l];
        int64_t c[NC_LAT] = {0};
        double sa = 0.0;
        for (int64_t b0 = 0; b0 < n; b0 += BLK) {
            const int64_t bn = n - b0 < BLK ? n - b0 : BLK;
            IT cf = 0, cc = 0, cn = 0, ck = 0;
            double sb = 0.0;
if (sg) {
                LAT_LOOP((IT)(sg[i] & 1))
            } else {
                LAT_LOOP((IT)(wi >= (T)0))
            }
            c[0] += cf; c[1] += cc; c[2] += cn; c[3] += ck;
            sa += sb;
            for (; qi < nq && q[qi] < b0 + bn; qi++) sa_[qi] = ABS(w[q[qi]]);
            if (cf) nf = record_flips(P, S, b0, bn, o, nf);
        }
        finish_flips(P, nf0, nf, l);
        for (int k = 0; k < NC_LAT; k++) counts[NC_LAT * l + k] = c[k];
        sum_abs[l] = sa;
        o += n;
    }
    P->nf = nf;
    return nf;
}

/* numpy-"linear" quantiles of R sorted rows of K samples (NaN-padded): out[r][j] = lo + (hi - lo) frac[r][j] with
 * lo = v[r][pos[r][j]], hi = v[r][pos[r][Q + j]] in float64 (the arithmetic of probe/fused.py's _at_positions).
 * pos and frac have one row per layer; row r uses layer r % rows_pos. */
HOT void FN(bnnp_interp)(int64_t R, int64_t K, const T *v, int64_t rows_pos, const int64_t *pos, const double *frac,
                         int64_t Q, double *out) {
    for (int64_t r = 0; r < R; r++) {
        const int64_t *p = pos + (r % rows_pos) * 2 * Q;
        const double *f = frac + (r % rows_pos) * Q;
        const T *row = v + r * K;
        for (int64_t j = 0; j < Q; j++) {
            const double lo = (double)row[p[j]], hi = (double)row[p[Q + j]];
            out[r * Q + j] = lo + (hi - lo) * f[j];
        }
    }
}

/* Flip events: up to E flipped weights per layer, stratified (probe/samplers.py): with f flips in layer l and
 * u ~ U[0, 1) per slot j, rank = j + 1 if f <= E else floor((u + j) f / E) + 1, the rank-th flipped weight of the
 * layer (in index order), valid if rank <= f. out_i [L E][2] = (index in the layer or -1, steps since its previous
 * flip or -1), safe [L E] = its flat index (the layer's first weight for an empty slot). Bop family (wm_before not
 * NULL): out_f [L E][2] = (tau - w_{t-1} m_{t-1}, |m_t - m_{t-1}|) in float64, NaN for an empty slot. */
HOT void FN(bnnp_events)(const bnnp_plan *P, int64_t E, const double *u, const double *tau_l, const T *wm_before,
                         const T *m_now, const T *m_before, int64_t *out_i, int64_t *safe, double *out_f) {
    const int64_t L = P->L, nf = P->nf;
    const int64_t *fidx = P->fidx;
    const int32_t *flast = P->flast;
    int64_t c = 0;
    for (int64_t l = 0; l < L; l++) {
        const int64_t start = P->offs[l], end = start + P->lens[l];
        while (c < nf && fidx[c] < start) c++;
        int64_t c1 = c;
        while (c1 < nf && fidx[c1] < end) c1++;
        const int64_t f = c1 - c;
        for (int64_t j = 0; j < E; j++) {
            const int64_t s = l * E + j;
            const int32_t rank = f <= E ? (int32_t)(j + 1) : (int32_t)(floor((u[s] + (double)j) * (double)f / (double)E) + 1.0);
            if (rank <= f) {
                const int64_t r = c + rank - 1, gi = fidx[r];
                out_i[2 * s] = gi - start;
                out_i[2 * s + 1] = flast[r] > 0 ? (int64_t)P->t - flast[r] : -1;
                safe[s] = gi;
                if (wm_before) {
                    out_f[2 * s] = tau_l[l] - (double)wm_before[gi];
                    out_f[2 * s + 1] = absdiff((double)m_now[gi], (double)m_before[gi]);
                }
            } else {
                out_i[2 * s] = -1;
                out_i[2 * s + 1] = -1;
                safe[s] = start;
                if (wm_before) out_f[2 * s] = out_f[2 * s + 1] = (double)NAN;
            }
        }
        c = c1;
    }
}

/* Fixed-bin histograms (probe/histograms.py) of one quantity for the layers with rows[l] != 0:
 *   kind 0: |m|/tau, 1: w m/tau (division in the weights' type), 2: |m|, 3: |w| (latent),
 * taken in float64; bin = #{edges e <= x} (torch.bucketize(right=True)'s upper-bound search, NaN in the last bin),
 * found through lut (indexed by the top 16 bits of x: the number of edges <= the cell's smallest value when the cell
 * holds at most one edge, else 255 = binary search);
 * counts [L][ne + 1], stats [L][4] = min, max (NaN if any x is NaN), sum, sum of squares. Reads m and w through the
 * plan's pointer tables (valid after a pass). */
HOT void FN(bnnp_hist)(const bnnp_plan *P, int32_t kind, const uint8_t *rows, const double *edges, int64_t ne,
                       const uint8_t *lut, int64_t *counts, double *stats) {
    const T *tau = (const T *)P->tau;
    for (int64_t l = 0; l < P->L; l++) {
        if (!rows[l]) continue;
        const int64_t n = P->lens[l];
        const T *w = (const T *)P->wp[l];
        const T *m = P->mp ? (const T *)P->mp[l] : NULL;
        const T tl = tau ? tau[l] : (T)1;
        int64_t *cnt = counts + l * (ne + 1);
        double mn = INFINITY, mx = -INFINITY, sum = 0.0, sq = 0.0;
        int nan = 0;
        for (int64_t k = 0; k <= ne; k++) cnt[k] = 0;
        for (int64_t i = 0; i < n; i++) {
            T v;
            switch (kind) {
                case 0: v = ABS(m[i]) / tl; break;
                case 1: v = (w[i] * m[i]) / tl; break;
                case 2: v = ABS(m[i]); break;
                default: v = ABS(w[i]); break;
            }
            const double x = (double)v;
            uint64_t xb;
            memcpy(&xb, &x, 8);
            int64_t lo = lut[xb >> 48];
            if (lo != 255) {  /* at most one edge in x's cell: one comparison */
                lo += lo < ne && !(x < edges[lo]);
            } else {
                int64_t hi = ne;
                lo = 0;
                while (lo < hi) {
                    const int64_t mid = lo + ((hi - lo) >> 1);
                    if (!(x < edges[mid])) lo = mid + 1; else hi = mid;
                }
            }
            cnt[lo] += 1;
            if (x != x) nan = 1;
            if (x < mn) mn = x;
            if (x > mx) mx = x;
            sum += x;
            sq += x * x;
        }
        double *st = stats + 4 * l;
        st[0] = nan ? (double)NAN : mn;
        st[1] = nan ? (double)NAN : mx;
        st[2] = sum;
        st[3] = sq;
    }
}

/* Row k of the Bop family's tracked weights: sign[k] = b(w_t) = +1 (from the state byte s), out[k] = (tau - w_t m_t,
 * |m_t - m_{t-1}|) in float64 (bnnp_tracked, bnnp_bop_fused's trk_mode 2 and bnnp_bop_tail write the same row). */
static inline void FN(tracked_row)(uint8_t *sign, double *out, int64_t k, uint8_t s, double tau, T wm, T mt,
                                   T m_before) {
    sign[k] = s & S_SIGN;
    out[2 * k] = tau - (double)wm;
    out[2 * k + 1] = absdiff((double)mt, (double)m_before);
}

/* Tracked weights of the Bop family at flat indices idx[0..n): sign[k] = b(w_t) = +1 (the state byte),
 * out [n][2] = (tau_l - w_t m_t, |m_t - m_{t-1}|) in float64. */
HOT void FN(bnnp_tracked)(const bnnp_plan *P, int64_t n, const int64_t *idx, const double *tau_t, const T *wm_now,
                          const T *m_now, const T *m_before, uint8_t *sign, double *out) {
    for (int64_t k = 0; k < n; k++) {
        const int64_t i = idx[k];
        FN(tracked_row)(sign, out, k, P->state[i], tau_t[k], wm_now[i], m_now[i], m_before[i]);
    }
}

/* The Bop family's step in one call: this step's m and w m buffers (cur flips), the post-step pass, then, by flags,
 * the flip events (bit 0; u, tau_l, ev_*: bnnp_events with w_{t-1} m_{t-1} and m_{t-1} from the other buffer) and
 * the tracked weights (bit 1; tsel, tau_t, tr_*: bnnp_tracked). Returns the number of flips. */
HOT int64_t FN(bnnp_bop_step)(bnnp_plan *P, int64_t flags) {
    const int64_t c = P->cur = 1 - P->cur;
    P->m_out = P->mbuf[c];
    P->wm_out = P->wmbuf[c];
    const int64_t nf = FN(bnnp_bop_post)(P);
    if ((flags & 1) && P->nev > 0)
        FN(bnnp_events)(P, P->nev, P->u, P->tau_l, (const T *)P->wmbuf[1 - c], (const T *)P->mbuf[c],
                        (const T *)P->mbuf[1 - c], P->ev_i, P->ev_safe, P->ev_f);
    if ((flags & 2) && P->ntr > 0)
        FN(bnnp_tracked)(P, P->ntr, P->tsel, P->tau_t, (const T *)P->wmbuf[c], (const T *)P->mbuf[c],
                         (const T *)P->mbuf[1 - c], P->tr_sign, P->tr_out);
    return nf;
}

/* The steps table's rows of the Bop family after bnnp_bop_step and an in-place sort of the sample rows (samp
 * [3][L][K] = |m|, w m, margin, each ascending with NaN last; NULL off the quantile cadence: those columns NaN):
 *   rows_i[l] = (flips, c2i_diff, nonfinite_grads, sign hash or INT64_MIN without one),
 *   rows_f[l] = (above_threshold, crossings_up, crossings_down, the 7 margin_exceed counts, sum |m| / n,
 *               |m| quantiles (Q), w m quantiles (Q), margin quantiles (Qm), NaN for the latent columns). */
HOT void FN(bnnp_bop_rows)(const bnnp_plan *P) {
    const int64_t L = P->L, K = P->K, Q = P->Q, Qm = P->Qm, NFL = P->nfloat;
    const T *samp = (const T *)P->samp;
    for (int64_t l = 0; l < L; l++) {
        const int64_t *cn = P->counts + NC_BOP * l;
        double *rf = P->rows_f + NFL * l;
        int_row(P, cn, l);
        for (int k = 0; k < 10; k++) rf[k] = (double)cn[3 + k];
        rf[10] = P->sum_abs[l] / (double)P->lens[l];
        int64_t k0 = 11;
        if (samp) {  /* a quantile step */
            FN(bnnp_interp)(1, K, samp + l * K, 1, P->qpos + l * 2 * Q, P->qfrac + l * Q, Q, rf + 11);
            FN(bnnp_interp)(1, K, samp + (L + l) * K, 1, P->qpos + l * 2 * Q, P->qfrac + l * Q, Q, rf + 11 + Q);
            FN(bnnp_interp)(1, K, samp + (2 * L + l) * K, 1, P->mpos + l * 2 * Qm, P->mfrac + l * Qm, Qm,
                            rf + 11 + 2 * Q);
            k0 = 11 + 2 * Q + Qm;
        }
        for (int64_t k = k0; k < NFL; k++) rf[k] = (double)NAN;
    }
}

/* The latent family's step in one call, for groups whose binarizer is bnn-probe's sign (the latent inertia is then
 * |w|): the post-step pass, then, by flags, the flip events (bit 0: bnnp_events' slots, with float64 (|w_{t-1}|,
 * |w_t - w_{t-1}|), NaN for an empty slot) and the tracked weights (bit 1: b(w_t) = +1 from the state byte,
 * (|w_t|, |w_t - w_{t-1}|)); w_{t-1} is the pre pass's copy (prev). Returns the number of flips. */
HOT int64_t FN(bnnp_lat_step)(bnnp_plan *P, int64_t flags) {
    const int64_t nf = FN(bnnp_lat_post)(P);
    const T *prev = (const T *)P->prev;
    if ((flags & 1) && P->nev > 0) {
        FN(bnnp_events)(P, P->nev, P->u, NULL, NULL, NULL, NULL, P->ev_i, P->ev_safe, NULL);
        FOR_EVENT_SLOTS(P, {
            const T pw = prev[gi];
            P->ev_f[2 * s] = (double)ABS(pw);
            P->ev_f[2 * s + 1] = absdiff((double)((const T *)P->wp[l])[gi - P->offs[l]], (double)pw);
        })
    }
    if ((flags & 2) && P->ntr > 0)
        FOR_TRACKED(P, {
            const T wt = ((const T *)P->wp[l])[ii];
            P->tr_sign[k] = P->state[i] & S_SIGN;
            P->tr_out[2 * k] = (double)ABS(wt);
            P->tr_out[2 * k + 1] = absdiff((double)wt, (double)prev[i]);
        })
    return nf;
}

/* The steps table's rows of the latent family after bnnp_lat_step or bnnp_lat_post (and an in-place sort of the |w| sample rows on
 * quantile steps; samp NULL otherwise): rows_i as for the Bop family; rows_f[l] = (NaN for the Bop family's nbop
 * columns, sum |w| / n, |w| quantiles (Q) or NaN, at_clip (NaN without a clip value), NaN for the rest: the Adam
 * step quantiles, which Python fills on quantile steps). */
HOT void FN(bnnp_lat_rows)(const bnnp_plan *P) {
    const int64_t L = P->L, K = P->K, Q = P->Q, NFL = P->nfloat, nb = P->nbop;
    const T *samp = (const T *)P->samp;
    for (int64_t l = 0; l < L; l++) {
        const int64_t *cn = P->counts + NC_LAT * l;
        double *rf = P->rows_f + NFL * l;
        int_row(P, cn, l);
        for (int64_t k = 0; k < NFL; k++) rf[k] = (double)NAN;
        rf[nb] = P->sum_abs[l] / (double)P->lens[l];
        if (samp) FN(bnnp_interp)(1, K, samp + l * K, 1, P->qpos + l * 2 * Q, P->qfrac + l * Q, Q, rf + nb + 1);
        if (P->clip_valid[l]) rf[nb + 1 + Q] = (double)cn[3];
    }
}

/* Bop's step without a measurement (Helwegen et al. 2019, Alg. 1), tensor k of nt at wp[k], mp[k], gp[k]:
 *   m_t = fma(g_t, gamma, m_{t-1} (1 - gamma))   (one rounding of gamma g, as torch's CPU add(alpha) kernels)
 *   w_t = -w_{t-1} if w_{t-1} m_t > tau else w_{t-1};   hp[k] = (gamma, 1 - gamma, tau) in T.
 * An entry whose gradient is NaN or +-inf keeps its m (optim/nonfinite.py); nonfinite[k] counts them. */
HOTF void FN(bnnp_bop_update)(int64_t nt, const uintptr_t *wp, const uintptr_t *mp, const uintptr_t *gp,
                              const int64_t *lens, const T *hp, int64_t *nonfinite) {
    for (int64_t k = 0; k < nt; k++) {
        T *restrict w = (T *)wp[k], *restrict m = (T *)mp[k];
        const T *restrict g = (const T *)gp[k];
        const T gam = hp[3 * k], omg = hp[3 * k + 1], bt = hp[3 * k + 2];
        const int64_t n = lens[k];
        int64_t bad = 0;
        for (int64_t b0 = 0; b0 < n; b0 += BLK) {
            const int64_t bn = n - b0 < BLK ? n - b0 : BLK;
            IT cb = 0;
            for (int64_t j = BLK; j < 2 * BLK && b0 + j < n; j += 64 / (int64_t)sizeof(T)) {  /* the next block */
                __builtin_prefetch(w + b0 + j, 1);
                __builtin_prefetch(m + b0 + j, 1);
                __builtin_prefetch(g + b0 + j, 0);
            }
_Pragma("GCC ivdep")
            for (int64_t j = 0; j < bn; j++) {
                const int64_t i = b0 + j;
                const T gi = g[i], mi = m[i], wi = w[i];
                const IT ok = (gi - gi) == (T)0;
                const T mn = ok ? FMA(gi, gam, mi * omg) : mi;
                cb += 1 - ok;
                m[i] = mn;
                w[i] = wi * mn > bt ? -wi : wi;
            }
            bad += cb;
        }
        nonfinite[k] = bad;
    }
}

/* Bop's step and the post-step measurement in one pass (the probe's measured step when the optimizer is
 * bnn_probe's Bop on the CPU; probe/onepass.py). Per layer l (gp[l] = 0: no gradient, the layer is measured and not
 * stepped), per block: the pre pass's check (b(w_{t-1}) against the stored sign: a change made outside the step
 * updates the byte and the hash), then the update of bnnp_bop_update with hp[l], then the counts, Sum |m_t|, the
 * quantile sample and the flipped weights of bnnp_bop_post, read from w_t, m_t in cache: margin x = w_{t-1} m_t.
 * For each flipped weight also w_{t-1} m_{t-1} (fwm) and m_{t-1} (fmo); before the pass m_{t-1} of the tracked
 * weights (tmprev). No copies of m_t or w_t m_t are written. Returns the number of flips (P->nf). */
HOTF int64_t FN(bnnp_bop_fused)(bnnp_plan *P) {
    const uintptr_t *wp = P->wp, *mp = P->mp, *gp = P->gp;
    const uint8_t *tau_valid = P->tau_valid;
    const T *tau = (const T *)P->tau, *thr = (const T *)P->thr, *hp = (const T *)P->hp;
    uint8_t *state = P->state;
    int64_t *counts = P->counts, *nonfin = P->nonfin;
    double *sum_abs = P->sum_abs;
    const int64_t L = P->L, K = P->K;
    T *samp = (T *)P->samp, *fwm = (T *)P->fwm, *fmo = (T *)P->fmo, *tmprev = (T *)P->tmprev;
    const int32_t *mix = P->mix;
    int64_t o = 0, nf = 0;
    /* the tracked weights (tsel ascending: trk_mode 1, 2): m_{t-1} picked up block by block before the update, and
     * (trk_mode 2) their outputs after it, while the block is in cache; trk_mode 0: m_{t-1} gathered here, the
     * outputs by bnnp_bop_tail */
    const int64_t tmode = P->trk_mode, ntr = P->ntr, *tsel = P->tsel;
    int64_t ti = 0;
    if (tmode == 0) FOR_TRACKED(P, tmprev[k] = ((const T *)mp[l])[ii];)
    for (int64_t l = 0; l < L; l++) {
        const int64_t n = P->lens[l];
        const int64_t nf0 = nf;  /* this layer's first flip in fidx */
        const int64_t *q = P->qidx + l * K, nq = samp ? P->ks[l] : 0;
        int64_t qi = 0;
        T *sa_ = samp ? samp + l * K : NULL, *sb_ = samp ? samp + (L + l) * K : NULL,
          *sc_ = samp ? samp + (2 * L + l) * K : NULL;
        T *restrict w = (T *)wp[l], *restrict m = (T *)mp[l];
        const T *restrict g = (const T *)gp[l];
        uint8_t *restrict S = state + o;
        const T tl = tau[l], gam = hp[3 * l], omg = hp[3 * l + 1], bt = hp[3 * l + 2];
        const IT tv = tau_valid[l];
        const T t0 = thr[7 * l], t1 = thr[7 * l + 1], t2 = thr[7 * l + 2], t3 = thr[7 * l + 3], t4 = thr[7 * l + 4],
                t5 = thr[7 * l + 5], t6 = thr[7 * l + 6];
        int64_t c[NC_BOP] = {0};
        double sa = 0.0;
        T mold[BLK];
        for (int64_t b0 = 0; b0 < n; b0 += BLK) {
            const int64_t bn = n - b0 < BLK ? n - b0 : BLK;
            IT cf = 0, cc = 0, cn = 0, ca = 0, cu = 0, cd = 0, e0 = 0, e1 = 0, e2 = 0, e3 = 0, e4 = 0, e5 = 0, e6 = 0;
            double sb = 0.0;
            int64_t jv = 0;
            const int64_t tb = ti;  /* this block's tracked weights: tb .. ti */
            if (tmode)
                for (; ti < ntr && tsel[ti] < o + b0 + bn; ti++) tmprev[ti] = m[tsel[ti] - o];
            if (g) {  /* whole vectors by the AVX-512 kernel where the CPU has it (float32), the rest here */
                flip_sink fs = {P, o, l, b0, nf};
                jv = FUSED_FAST(w + b0, m + b0, g + b0, S + b0, bn, gam, omg, bt, tl, tv, thr + 7 * l, c, &sa, &fs,
                                fwm, fmo);
                nf = fs.nf;
            }
            {   /* signs changed outside the step since the last measurement (rare) */
                IT d = 0;
_Pragma("omp simd reduction(+ : d)")
                for (int64_t j = jv; j < bn; j++) d += (IT)(w[b0 + j] >= (T)0) ^ ((IT)S[b0 + j] & S_SIGN);
                if (d) {
                    for (int64_t j = jv; j < bn; j++) {
                        const int64_t i = b0 + j;
                        const uint8_t s = (uint8_t)(w[i] >= (T)0);
                        if (s == (S[i] & S_SIGN)) continue;
                        S[i] = (uint8_t)((S[i] & ~S_SIGN) | s);
                        if (mix) P->hash[l] += s ? (int64_t)mix[o + i] : -(int64_t)mix[o + i];
                    }
                }
            }
            if (g) {
_Pragma("GCC ivdep")
                for (int64_t j = jv; j < bn; j++) {
                    const int64_t i = b0 + j;
                    const T gi = g[i], mi = m[i], wi = w[i];
                    const IT st = (IT)S[i];
                    const IT ok = (gi - gi) == (T)0;
                    const T mn = ok ? FMA(gi, gam, mi * omg) : mi;
                    const T wn = wi * mn > bt ? -wi : wi;
                    cn += 1 - ok;
                    m[i] = mn;
                    w[i] = wn;
                    mold[j] = mi;
                    const IT s = (IT)(wn >= (T)0);
                    const IT f = s ^ (st & S_SIGN);
                    const IT ab = ABS(mn) > tl;
                    const IT pa = (st >> 2) & 1;
                    const IT na = tv ? ab : pa;
                    S[i] = (uint8_t)((st & S_SIGN0) | s | (na << 2) | (f << 3) | (pa << 4));
                }
            } else {  /* not stepped: w, m unchanged */
_Pragma("GCC ivdep")
                for (int64_t j = 0; j < bn; j++) {
                    const int64_t i = b0 + j;
                    const T mi = m[i];
                    const IT st = (IT)S[i];
                    mold[j] = mi;
                    const IT ab = ABS(mi) > tl;
                    const IT pa = (st >> 2) & 1;
                    const IT na = tv ? ab : pa;
                    S[i] = (uint8_t)((st & (S_SIGN0 | S_SIGN)) | (na << 2) | (pa << 4));
                }
            }
            BOP_COUNTS(w[i] * m[i], jv)
            c[0] += cf; c[1] += cc; c[2] += cn; c[3] += ca; c[4] += cu; c[5] += cd;
            c[6] += e0; c[7] += e1; c[8] += e2; c[9] += e3; c[10] += e4; c[11] += e5; c[12] += e6;
            sa += sb;
            for (; qi < nq && q[qi] < b0 + bn; qi++) {
                const int64_t i = q[qi];
                const T wm = w[i] * m[i];
                sa_[qi] = ABS(m[i]);
                sb_[qi] = wm;
                sc_[qi] = (S[i] & S_FLIP) ? -wm : wm;
            }
            if (cf) {  /* the scalar part's flips */
                for (int64_t j = jv; j < bn; j++) {
                    const int64_t i = b0 + j;
                    if (!(S[i] & S_FLIP)) continue;
                    fwm[nf] = -w[i] * mold[j];
                    fmo[nf] = mold[j];
                    P->fidx[nf++] = o + i;
                }
            }
            if (tmode == 2)  /* as bnnp_bop_tail's tracked weights */
                for (int64_t k = tb; k < ti; k++) {
                    const int64_t i = tsel[k] - o;
                    FN(tracked_row)(P->tr_sign, P->tr_out, k, S[i], P->tau_t[k], w[i] * m[i], m[i], tmprev[k]);
                }
        }
        finish_flips(P, nf0, nf, l);
        for (int k = 0; k < NC_BOP; k++) counts[NC_BOP * l + k] = c[k];
        nonfin[l] = c[2];
        sum_abs[l] = sa;
        o += n;
    }
    P->nf = nf;
    return nf;
}

/* After bnnp_bop_fused, by flags: the flip events (bit 0; bnnp_events' slots, inertia tau - w_{t-1} m_{t-1} and
 * |m_t - m_{t-1}| from the pass's per-flip fwm, fmo) and the tracked weights (bit 1; tau_t - w_t m_t and
 * |m_t - m_{t-1}| from tmprev), read from w_t, m_t in place. */
HOT void FN(bnnp_bop_tail)(bnnp_plan *P, int64_t flags) {
    const T *fwm = (const T *)P->fwm, *fmo = (const T *)P->fmo, *tmprev = (const T *)P->tmprev;
    if ((flags & 1) && P->nev > 0) {
        FN(bnnp_events)(P, P->nev, P->u, NULL, NULL, NULL, NULL, P->ev_i, P->ev_safe, NULL);
        int64_t r = 0;  /* rank of a flip in fidx (ascending flat index) */
        FOR_EVENT_SLOTS(P, {
            while (P->fidx[r] < gi) r++;
            while (P->fidx[r] > gi) r--;
            P->ev_f[2 * s] = P->tau_l[l] - (double)fwm[r];
            P->ev_f[2 * s + 1] = absdiff((double)((const T *)P->mp[l])[gi - P->offs[l]], (double)fmo[r]);
        })
    }
    if ((flags & 2) && P->ntr > 0)
        FOR_TRACKED(P, {
            const T mt = ((const T *)P->mp[l])[ii];
            FN(tracked_row)(P->tr_sign, P->tr_out, k, P->state[i], P->tau_t[k], ((const T *)P->wp[l])[ii] * mt, mt,
                            tmprev[k]);
        })
}

/* max |x| over n values as a double (NaN when one is NaN, as torch's max; 0 for n == 0), adding the non-finite
 * entries to *nonfinite: integer reductions on the bits with the sign bit cleared (``mag``), where the unsigned
 * order is the order of |x|, +inf (``inf_b``) above every finite value and NaN above +inf. */
static inline double FN(abs_max)(const T *x, int64_t n, UT mag, UT inf_b, int64_t *nonfinite) {
    UT mx = 0;
    int64_t bad = 0;
_Pragma("GCC ivdep")
    for (int64_t i = 0; i < n; i++) {
        UT b;
        memcpy(&b, &x[i], sizeof(T));
        b &= mag;
        mx = b > mx ? b : mx;
        bad += b >= inf_b;
    }
    *nonfinite += bad;
    T v;
    memcpy(&v, &mx, sizeof(T));
    return mx > inf_b ? (double)NAN : (double)v;
}

/* The run checks' statistics of one layer, read in place (probe/checks.py, RunChecks.post_step; the same values
 * as its torch expressions): out[0] = max |g| and out[1] = max |m| (NaN when an entry is NaN, as torch's max;
 * left as given where g or m is NULL or n == 0), out[2] = the non-finite entries of m, out[3] = the entries with
 * |w| != 1, out[4] = the entries with w == 0. One pass over each of w, m and g, on the bits (abs_max): integer
 * reductions vectorise, a float max with NaN semantics does not. */
HOT void FN(bnnp_check)(const T *w, const T *m, const T *g, int64_t n, double *out) {
    const UT mag = ~((UT)1 << (8 * sizeof(T) - 1));  /* clears the sign bit */
    const T one = 1, inf = (T)INFINITY;
    UT one_b, inf_b;
    memcpy(&one_b, &one, sizeof(T));
    memcpy(&inf_b, &inf, sizeof(T));
    int64_t bad = 0, non_pm1 = 0, zeros = 0;
_Pragma("GCC ivdep")
    for (int64_t i = 0; i < n; i++) {
        UT b;
        memcpy(&b, &w[i], sizeof(T));
        b &= mag;
        non_pm1 += b != one_b;  /* (NaN != 1) */
        zeros += b == 0;
    }
    if (m) {
        const double v = FN(abs_max)(m, n, mag, inf_b, &bad);
        if (n > 0)
            out[1] = v;
    }
    if (g) {
        int64_t unused = 0;
        const double v = FN(abs_max)(g, n, mag, inf_b, &unused);
        if (n > 0)
            out[0] = v;
    }
    out[2] = (double)bad;
    out[3] = (double)non_pm1;
    out[4] = (double)zeros;
}

/* The entries where a[i] != b[i] (a NaN counts as changed, as torch's !=): the run checks' comparison of a layer's
 * weights with their copy at the last check step (RunChecks.pre_step), without concatenating the layers. */
HOT int64_t FN(bnnp_count_ne)(const T *a, const T *b, int64_t n) {
    int64_t c = 0;
_Pragma("GCC ivdep")
    for (int64_t i = 0; i < n; i++)
        c += a[i] != b[i];
    return c;
}

#undef FN
#undef T
#undef SFX
#undef ABS
#undef IT
#undef UT
#undef FMA
#undef BOP_FAST
#undef FUSED_FAST
#undef BOP_LOOP
#undef BOP_COUNTS
#undef LAT_LOOP
#undef CAT
#undef CAT_
