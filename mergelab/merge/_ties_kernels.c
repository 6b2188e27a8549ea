/* TIES-merging's two streamed passes, fused: mergelab/merge/native.py compiles this file on
 * first use (plain C, no Python API; called through ctypes, which releases the GIL, so the
 * worker threads run it in parallel) and TIES falls back to its torch ops when it cannot.
 *
 * Each call covers one slice of one parameter, for θ0 and all T experts ("sources"): a
 * source is a float32 file read with pread (fd >= 0, its slice starting at byte off) or
 * float32 memory (fd < 0, at ptr). The slice is worked through in blocks of `block` entries:
 * the file blocks are read into `buf` (block entries per source), and one sweep over the
 * block does what the torch/numpy path does in one op per sweep — the same float32
 * operations in the same order, so the results are bit for bit the torch path's
 * (tests/test_ties.py runs every test on both). Built with -ffp-contract=off: an a + b * c
 * must not become a fused multiply-add.
 */
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <unistd.h>

/* Source i's entries j0 .. j0 + w of the slice: read into buf (a file), or in place. NULL on
 * a failed or short read (a truncated file: the caller's torch path names it). */
static const float *source_block(int32_t i, const int32_t *fd, const int64_t *off,
                                 const float *const *ptr, int64_t j0, int64_t w, float *buf) {
    if (fd[i] < 0) return ptr[i] + j0;
    char *at = (char *)buf;
    size_t want = (size_t)w * sizeof(float);
    off_t pos = (off_t)(off[i] + j0 * (int64_t)sizeof(float));
    while (want) {
        ssize_t got = pread(fd[i], at, want, pos);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return NULL;
        at += got;
        pos += got;
        want -= (size_t)got;
    }
    return buf;
}

/* Pass 1's sample: n runs of a float32 file, run i being count[i] entries from byte offset
 * off[i], read one after another into out. Returns 0, or -1 on a failed or short read. */
int32_t ml_gather(int32_t fd, int64_t n, const int64_t *off, const int64_t *count, float *out) {
    for (int64_t i = 0; i < n; i++) {
        if (!source_block(0, &fd, off + i, NULL, 0, count[i], out)) return -1;
        out += count[i];
    }
    return 0;
}

/* The sweeps are written with GCC/clang vector extensions, W entries at a time (the
 * compilers' cost models leave these loops scalar otherwise): 16 with AVX-512, 8 with AVX
 * (built with -march=native, see native.py), else 4 (SSE2, NEON; 8 lanes there are split
 * badly). On a Zen 4 EPYC the 16 lanes made pass 2's sweep ≈ 1.3× faster than 8. A
 * comparison gives -1 / 0 per lane; "masked" keeps a lane's bits or gives +0 (as torch's
 * hardshrink and relu do, where a product by 0 would keep the sign). */
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define W 16
#elif defined(__AVX__)
#define W 8
#else
#define W 4
#endif
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

/* Which lanes of a comparison are set, as bits (one instruction on x86). */
#if W == 16
#include <immintrin.h>
__attribute__((always_inline)) static inline int lanes(vi m) {
    return _mm512_movepi32_mask((__m512i)m);
}
#elif defined(__AVX__)
#include <immintrin.h>
__attribute__((always_inline)) static inline int lanes(vi m) {
    return _mm256_movemask_ps((__m256)m);
}
#elif defined(__SSE2__)
#include <emmintrin.h>
__attribute__((always_inline)) static inline int lanes(vi m) { return _mm_movemask_ps((__m128)m); }
#else
__attribute__((always_inline)) static inline int lanes(vi m) {
    int bits = 0;
    for (int k = 0; k < W; k++) bits |= (m[k] & 1) << k;
    return bits;
}
#endif

__attribute__((always_inline)) static inline vf load(const float *p) {
    vf v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

__attribute__((always_inline)) static inline vf masked(vf x, vi keep) {
    return (vf)((vi)x & keep);
}

/* Pass 1 for T tasks (sources 1..T; source 0 is θ0) on m entries: a = |θt − θ0|. Per task:
 * below[t] = how many a < lo[t]; the a with lo[t] <= a <= hi[t] are written, in order, to
 * cand + t * cap (n_cand[t] of them; cap >= m). Returns 0; -1 on a failed read; t + 1 when
 * task t has a non-finite a (NaN or inf in θt or θ0). NaN counts in neither. Each block of
 * all T + 1 sources is swept once, θ0's entries loaded once for the T tasks. buf holds
 * (T + 1) * block floats. */
int32_t ml_ties_count(int32_t T, const int32_t *fd, const int64_t *off,
                      const float *const *ptr, int64_t m, const float *lo_t,
                      const float *hi_t, int64_t *below, float *cand, int64_t cap,
                      int64_t *n_cand, float *buf, int64_t block) {
    const vi magnitude = (vi){0} + 0x7fffffff;
    const vf biggest = (vf){0} + FLT_MAX;
    const float *x[T + 1];
    vf low[T], high[T];
    vi nb[T];
    for (int32_t t = 0; t < T; t++) {
        below[t] = n_cand[t] = 0;
        low[t] = (vf){0} + lo_t[t];
        high[t] = (vf){0} + hi_t[t];
        nb[t] = (vi){0};
    }
    vi bad = {0};
    for (int64_t j0 = 0; j0 < m; j0 += block) {
        int64_t w = j0 + block < m ? block : m - j0;
        for (int32_t i = 0; i <= T; i++) {
            x[i] = source_block(i, fd, off, ptr, j0, w, buf + i * block);
            if (!x[i]) return -1;
        }
        int64_t j = 0;
        for (; j + W <= w; j += W) {
            const vf b = load(x[0] + j);
            for (int32_t t = 0; t < T; t++) {
                vf a = (vf)((vi)(load(x[t + 1] + j) - b) & magnitude);
                nb[t] += a < low[t]; /* -1 per entry below */
                bad |= ~(a <= biggest);
                int hit = lanes((a >= low[t]) & (a <= high[t]));
                if (__builtin_expect(hit != 0, 0)) { /* ≈ 1 % are candidates */
                    float *out = cand + t * cap;
                    int64_t n = n_cand[t];
                    do {
                        out[n++] = a[__builtin_ctz(hit)];
                        hit &= hit - 1;
                    } while (hit);
                    n_cand[t] = n;
                }
            }
        }
        for (; j < w; j++) {
            for (int32_t t = 0; t < T; t++) {
                float a = fabsf(x[t + 1][j] - x[0][j]);
                below[t] += a < lo_t[t];
                bad[0] |= !(a <= FLT_MAX);
                if (a >= lo_t[t] && a <= hi_t[t]) cand[t * cap + n_cand[t]++] = a;
            }
        }
        for (int32_t t = 0; t < T; t++) { /* per block: the lanes' counts stay small */
            for (int k = 0; k < W; k++) below[t] -= nb[t][k];
            nb[t] = (vi){0};
        }
        int32_t any_bad = 0;
        for (int k = 0; k < W; k++) any_bad |= bad[k];
        if (any_bad) { /* which task: the first with a non-finite a in this block */
            for (int32_t t = 0; t < T; t++)
                for (j = 0; j < w; j++)
                    if (!(fabsf(x[t + 1][j] - x[0][j]) <= FLT_MAX)) return t + 1;
        }
    }
    return 0;
}

/* Columns j .. j + W of pass 2 (see ml_ties_merge). Adds Σ sgn(s) to *gsum and the count of
 * undecided columns to *undecided, per lane. */
__attribute__((always_inline)) static inline void merge_lanes(int32_t T, const float *const *x,
                                                             int64_t j, const float *lam,
                                                             float scaling, int32_t mean,
                                                             float *o, vi *gsum, vi *undecided) {
    const vi magnitude = (vi){0} + 0x7fffffff;
    const vf zero = (vf){0}, one = zero + 1.0f;
    const vf b = load(x[0] + j);
    vf s = zero;
    for (int32_t t = 0; t < T; t++) {
        vf d = load(x[t + 1] + j) - b;
        s += masked(d, (vf)((vi)d & magnitude) > lam[t]); /* torch.hardshrink */
    }
    vi up = s > zero, down = s < zero, none = s == zero;
    *gsum += down - up; /* masks are -1: Σ sgn(s) */
    vf g = (masked(one, up) - masked(one, down)) + masked(one, none);
    vf r = zero, c = zero;
    for (int32_t t = 0; t < T; t++) {
        vf d = load(x[t + 1] + j) - b;
        vf u = g * masked(d, (vf)((vi)d & magnitude) > lam[t]);
        vi pos = u > zero;
        r += masked(u, pos); /* torch.relu */
        c += masked(one, pos);
    }
    *undecided -= none & (r > zero);
    vf y = r * g;
    if (mean) {
        vi more = c > one; /* max(c, 1) */
        y = y / (vf)(((vi)c & more) | ((vi)one & ~more));
    }
    y = y * scaling;
    y = b + y;
    __builtin_memcpy(o + j, &y, sizeof y);
}

/* The same for one column (a block's last w mod W); returns whether it is undecided. */
__attribute__((always_inline)) static inline int32_t merge_one(int32_t T, const float *const *x,
                                                               int64_t j, const float *lam,
                                                               float scaling, int32_t mean,
                                                               float *o, int64_t *gsum) {
    const float b = x[0][j];
    float s = 0.0f;
    for (int32_t t = 0; t < T; t++) {
        float d = x[t + 1][j] - b;
        s += fabsf(d) > lam[t] ? d : 0.0f;
    }
    float g = s > 0.0f ? 1.0f : s < 0.0f ? -1.0f : 0.0f;
    *gsum += (int64_t)g;
    g += s == 0.0f ? 1.0f : 0.0f;
    float r = 0.0f, c = 0.0f;
    for (int32_t t = 0; t < T; t++) {
        float d = x[t + 1][j] - b;
        float u = g * (fabsf(d) > lam[t] ? d : 0.0f);
        if (u > 0.0f) {
            r += u;
            c += 1.0f;
        }
    }
    float y = r * g;
    if (mean) y = y / (c > 1.0f ? c : 1.0f);
    y = y * scaling;
    o[j] = b + y;
    return s == 0.0f && r > 0.0f;
}

/* Pass 2 for T tasks (sources 1..T; source 0 is θ0) on m columns. Per column, exactly as the
 * torch path (ties.py, _TiesRun._chunk):
 *   τ̂t = hardshrink(θt − θ0, lam[t])    (lam[t]: the float32 just below task t's threshold)
 *   s = ((0 + τ̂0) + τ̂1) + ...            (torch's order for T ≤ 17 rows)
 *   γ = sgn(s), +1 where s = 0;  Σ sgn(s) is added to *gamma_sum
 *   r = ((0 + u0) + u1) + ...,  ut = max(γ·τ̂t, 0)   (the entries whose sign is γ, as |·|)
 *   out = θ0 + scaling · (γ·r)                       (reduce = sum)
 *   out = θ0 + scaling · ((γ·r) / max(#{ut > 0}, 1)) (reduce = mean)
 * Returns how many columns have s = 0 with r > 0 (γ undecided: the caller redoes such a slice
 * on the torch path, which defers them; out is then incomplete), or -1 on a failed read.
 * buf holds (T + 1) * block floats. */
int64_t ml_ties_merge(int32_t T, const int32_t *fd, const int64_t *off,
                      const float *const *ptr, int64_t m, const float *lam, float scaling,
                      int32_t mean, float *out, int64_t *gamma_sum, float *buf, int64_t block) {
    const float *x[T + 1];
    int64_t gsum = 0, undecided = 0;
    for (int64_t j0 = 0; j0 < m; j0 += block) {
        int64_t w = j0 + block < m ? block : m - j0;
        for (int32_t i = 0; i <= T; i++) {
            x[i] = source_block(i, fd, off, ptr, j0, w, buf + i * block);
            if (!x[i]) return -1;
        }
        vi gw = {0}, uw = {0};
        int64_t j = 0;
        for (; j + W <= w; j += W) merge_lanes(T, x, j, lam, scaling, mean, out + j0, &gw, &uw);
        for (; j < w; j++) undecided += merge_one(T, x, j, lam, scaling, mean, out + j0, &gsum);
        for (int k = 0; k < W; k++) {
            gsum += gw[k];
            undecided += uw[k];
        }
    }
    *gamma_sum += gsum;
    return undecided;
}
