/* Fused per-element kernels of the merge methods (see kernels.py for why and how they are built).
 *
 * Each function evaluates the element-wise expression of its torch reference in methods.py in the same order,
 * so the two agree bit for bit, and streams its inputs from memory once. Callers split [lo, hi) across threads
 * (ctypes drops the GIL), so nothing here allocates or synchronises. Work goes in blocks of BLOCK elements:
 * each inner loop runs over a block's contiguous elements, which the compiler vectorises, and a block's k rows
 * are read from memory on the first pass and from L1 on the second. */
#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define BLOCK 512

/* TIES election and masked sum (methods.elected_sum): d is [k, n] row-major, the weighted deltas.
 * elected sign = +1 when sum_i d_i (consensus 0) or sum_i sign(d_i) (consensus 1) is >= 0, else -1;
 * a_i = 1 when sign(d_i) equals it (zeros never agree); out = sum_i d_i * a_i, divided by sum_i w_i * a_i when
 * normalize (a zero divisor counts as 1). NaN inputs propagate as in torch (NaN * 0 is NaN). */
void elected_sum_f32(const float *restrict d, int64_t k, int64_t n, const float *restrict w, int consensus,
                     int normalize, float *restrict out, int64_t lo, int64_t hi) {
    float votes[BLOCK], merged[BLOCK], divisor[BLOCK];
    for (int64_t start = lo; start < hi; start += BLOCK) {
        int64_t len = hi - start < BLOCK ? hi - start : BLOCK;
        for (int64_t j = 0; j < len; j++) {
            votes[j] = 0.0f;
            merged[j] = 0.0f;
            divisor[j] = 0.0f;
        }
        for (int64_t i = 0; i < k; i++) {
            const float *row = d + i * n + start;
            for (int64_t j = 0; j < len; j++) {
                float x = row[j];
                votes[j] += consensus ? (float)((x > 0.0f) - (x < 0.0f)) : x;
            }
        }
        for (int64_t i = 0; i < k; i++) {
            const float *row = d + i * n + start;
            float wi = w[i];
            for (int64_t j = 0; j < len; j++) {
                float x = row[j];
                float a = (float)(votes[j] >= 0.0f ? x > 0.0f : x < 0.0f);
                merged[j] += x * a;
                divisor[j] += wi * a;
            }
        }
        for (int64_t j = 0; j < len; j++) {
            out[start + j] = normalize ? merged[j] / (divisor[j] == 0.0f ? 1.0f : divisor[j]) : merged[j];
        }
    }
}

/* One pass of a magnitude selection (kernels.kth_largest_abs): counts[0] = #{j : |x_j| < lo}, counts[1] =
 * #{j : lo <= |x_j| <= hi}, and those |x_j| are copied to band in index order when there are fewer than cap
 * (band[m] is scratch: the caller treats counts[1] >= cap as an overflow). */
void abs_band_f32(const float *restrict x, float lo, float hi, float *restrict band, int64_t cap,
                  int64_t *restrict counts, int64_t start, int64_t stop) {
    int64_t below = 0, m = 0, j = start;
#ifdef __AVX512F__
    /* 16 entries a step: compare, count and compress-store the band (10x the scalar loop's speed) */
    const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
    for (; j + 16 <= stop && m + 16 <= cap; j += 16) {
        __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + j));
        __mmask16 in = _mm512_cmp_ps_mask(a, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(a, vhi, _CMP_LE_OQ);
        below += __builtin_popcount(_mm512_cmp_ps_mask(a, vlo, _CMP_LT_OQ));
        _mm512_mask_compressstoreu_ps(band + m, in, a);
        m += __builtin_popcount(in);
    }
#endif
    for (; j < stop; j++) {
        float a = x[j] < 0.0f ? -x[j] : x[j];
        below += a < lo;
        band[m < cap ? m : cap - 1] = a; /* branch-free: as a branch it mispredicts (10x slower, measured) */
        m += (a >= lo) & (a <= hi);
    }
    counts[0] = below;
    counts[1] = m;
}

/* TIES trim in place (methods.magnitude_prune): x_j is kept where |x_j| > thr, or |x_j| == thr and j < cut, and
 * multiplied by 0 elsewhere (as torch's x * mask: -x stays -0, NaN stays NaN). */
void trim_abs_f32(float *restrict x, float thr, int64_t cut, int64_t start, int64_t stop) {
    for (int64_t j = start; j < stop; j++) {
        float a = x[j] < 0.0f ? -x[j] : x[j];
        x[j] *= (float)((a > thr) | ((a == thr) & (j < cut)));
    }
}

/* The index just past the m-th x_j (m >= 1, in index order) with |x_j| == t; n when there are fewer. Where the
 * top k has surplus ties, the first m of them are kept: trim_abs_f32's cut. */
int64_t end_of_mth_tie_f32(const float *restrict x, int64_t n, float t, int64_t m) {
    int64_t j = 0;
    for (; j + BLOCK <= n; j += BLOCK) { /* whole blocks by a count the compiler vectorises */
        int64_t ties = 0;
        for (int64_t i = j; i < j + BLOCK; i++) ties += (x[i] < 0.0f ? -x[i] : x[i]) == t;
        if (ties >= m) break;
        m -= ties;
    }
    for (; j < n; j++) {
        m -= (x[j] < 0.0f ? -x[j] : x[j]) == t;
        if (m == 0) return j + 1;
    }
    return n;
}

/* Counter-based uniforms (methods.counter_uniform): out_j = (mix(key + j * G) >> 40) * 2^-24, the 24-bit float
 * in [0, 1) from SplitMix64's output function of the j-th counter. No state: any range of j can be drawn on
 * any thread, and the torch reference computes the same bits with int64 ops. */
static inline float counter_uniform(uint64_t key, int64_t j) {
    uint64_t z = key + (uint64_t)j * 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return (float)(z >> 40) * 0x1p-24f;
}

void uniform_f32(float *restrict out, uint64_t key, int64_t start, int64_t stop) {
    for (int64_t j = start; j < stop; j++) out[j] = counter_uniform(key, j);
}

/* DARE's drop (methods.bernoulli_prune): out_j = x_j * (u_j < p), u_j the counter uniform above; one pass where
 * torch needs the uniforms, the comparison and the product. */
void dare_mask_f32(const float *restrict x, float *restrict out, uint64_t key, float p, int64_t start,
                   int64_t stop) {
    for (int64_t j = start; j < stop; j++) out[j] = x[j] * (float)(counter_uniform(key, j) < p);
}

/* Breadcrumbs' band in place (methods.breadcrumbs_prune): x_j is kept where it is among the first m2 but not
 * the first m1 of a stable ascending sort of |x|. The first m of that sort are |x_j| < t, and |x_j| == t at
 * j < cut (kernels.lowest_cut gives t and cut for each m); elsewhere x_j is multiplied by 0. */
void keep_abs_band_f32(float *restrict x, float t1, int64_t cut1, float t2, int64_t cut2, int64_t start,
                       int64_t stop) {
    for (int64_t j = start; j < stop; j++) {
        float a = x[j] < 0.0f ? -x[j] : x[j];
        int first1 = (a < t1) | ((a == t1) & (j < cut1));
        int first2 = (a < t2) | ((a == t2) & (j < cut2));
        x[j] *= (float)(first2 & !first1);
    }
}

/* DELLA's magnitude ranks (methods.della_prune): for each row r in [start, stop) of x [rows, len],
 * out[r, j] = the position of entry j in a stable ascending sort of |x[r, :]|, as a float (exact below 2^24).
 * An LSD radix sort on the bits of |x| (which order like the values, NaN last as in torch), 8 bits a pass,
 * passes where every key has the same digit skipped: stable like torch.argsort(stable=True), O(len) per row.
 * scratch holds 4 * len uint32 for the thread. */
void abs_ranks_f32(const float *restrict x, int64_t len, float *restrict out, uint32_t *restrict scratch,
                   int64_t start, int64_t stop) {
    for (int64_t r = start; r < stop; r++) {
        const uint32_t *row = (const uint32_t *)(x + r * len);
        uint32_t *key = scratch, *idx = scratch + len, *key2 = scratch + 2 * len, *idx2 = scratch + 3 * len;
        int64_t hist[4][256] = {{0}};
        for (int64_t j = 0; j < len; j++) {
            uint32_t k = row[j] & 0x7fffffffu;
            key[j] = k;
            idx[j] = (uint32_t)j;
            hist[0][k & 255]++;
            hist[1][(k >> 8) & 255]++;
            hist[2][(k >> 16) & 255]++;
            hist[3][k >> 24]++;
        }
        for (int pass = 0; pass < 4; pass++) {
            int shift = 8 * pass;
            if (hist[pass][(key[0] >> shift) & 255] == len) continue; /* one digit: the order stands */
            int64_t offset[256], sum = 0;
            for (int d = 0; d < 256; d++) {
                offset[d] = sum;
                sum += hist[pass][d];
            }
            for (int64_t j = 0; j < len; j++) {
                int64_t at = offset[(key[j] >> shift) & 255]++;
                key2[at] = key[j];
                idx2[at] = idx[j];
            }
            uint32_t *t = key; key = key2; key2 = t;
            t = idx; idx = idx2; idx2 = t;
        }
        for (int64_t p = 0; p < len; p++) out[r * len + idx[p]] = (float)p;
    }
}
