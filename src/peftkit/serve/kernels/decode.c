/* The decode step's products, one new token per row: y = x W^T for a few rows, and each row's attention over its
 * own keys. Bound by `peftkit.serve.native`; the PyTorch reference of each function is in that module.
 *
 * Batch-invariant by construction: every output element is computed by one thread, in an order that depends on
 * the sizes of its own row only (never on the number of rows, the thread count or the other rows), so a row's
 * result is bit for bit the same alone or in any batch.
 *
 * Precision: bf16 operands are widened to fp32 exactly (a 16-bit shift), products are summed in fp32 (FMA), and a
 * bf16 result is rounded to nearest even once at the end, as oneDNN's bf16 matmul does (the summation order
 * differs: results equal PyTorch's within fp32 rounding).
 */
#include <math.h>
#include <stdlib.h>
#include "peftkit_native.h"

#define LANES 16
typedef float v16 __attribute__((vector_size(64)));

static inline v16 ld16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* The sum of a's lanes and then the scalar tail a[i:k] . b[i:k], in a fixed order (lanes pairwise). */
static inline float finish(v16 s, const float *a, const float *b, int64_t i, int64_t k) {
    float lanes[LANES];
    memcpy(lanes, &s, sizeof lanes);
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int j = 0; j < w; j++) lanes[j] += lanes[j + w];
    float tail = 0.0f;
    for (; i < k; i++) tail += a[i] * b[i];
    return lanes[0] + tail;
}

/* res[r * J + c] = x[r] . w[c] for R rows of x and J rows of w, each element summed in one fixed order whatever R
 * and J are: two 16-lane accumulators over blocks of 32, a 16-lane tail into the first, then `finish`. The tile
 * only decides which elements share their loads (J weight rows x R input rows in registers). */
#define DOT_TILE(NAME, R, J)                                                                              \
    static void NAME(const float *const *x, const float *const *w, int64_t k, float *res) {             \
        v16 s[R][J][2];                                                                                  \
        memset(s, 0, sizeof s);                                                                          \
        int64_t i = 0;                                                                                   \
        for (; i + 2 * LANES <= k; i += 2 * LANES)                                                       \
            for (int c = 0; c < J; c++) {                                                                \
                v16 w0 = ld16(w[c] + i), w1 = ld16(w[c] + i + LANES);                                    \
                for (int r = 0; r < R; r++) {                                                            \
                    s[r][c][0] += ld16(x[r] + i) * w0;                                                   \
                    s[r][c][1] += ld16(x[r] + i + LANES) * w1;                                           \
                }                                                                                        \
            }                                                                                            \
        for (; i + LANES <= k; i += LANES)                                                               \
            for (int c = 0; c < J; c++)                                                                  \
                for (int r = 0; r < R; r++) s[r][c][0] += ld16(x[r] + i) * ld16(w[c] + i);               \
        for (int r = 0; r < R; r++)                                                                      \
            for (int c = 0; c < J; c++) res[r * J + c] = finish(s[r][c][0] + s[r][c][1], x[r], w[c], i, k); \
    }

DOT_TILE(dot_4x2, 4, 2)
DOT_TILE(dot_1x2, 1, 2)
DOT_TILE(dot_4x1, 4, 1)
DOT_TILE(dot_1x1, 1, 1)

#ifdef __AVX512BF16__
#include <immintrin.h>
#define NATIVE_BF16 1
/* The bf16 tile on CPUs with AVX512-BF16: x and w stay bf16, `vdpbf16ps` adds the products of each pair of
 * elements into fp32 lanes (two accumulators over blocks of 64, a 32-element tail into the first); the last
 * k % 32 elements are widened and summed in `finish`. One fixed order per element, whatever the tile. */
static inline float finish_bf(v16 s, const uint16_t *a, const uint16_t *b, int64_t i, int64_t k) {
    float lanes[LANES];
    memcpy(lanes, &s, sizeof lanes);
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int j = 0; j < w; j++) lanes[j] += lanes[j + w];
    float tail = 0.0f;
    for (; i < k; i++) tail += bf16_to_f32(a[i]) * bf16_to_f32(b[i]);
    return lanes[0] + tail;
}

#define BF_LD(p) ((__m512bh)_mm512_loadu_si512((const void *)(p)))
#define BF_TILE(NAME, R, J)                                                                               \
    static void NAME(const uint16_t *const *x, const uint16_t *const *w, int64_t k, float *res) {       \
        __m512 s[R][J][2];                                                                               \
        for (int r = 0; r < R; r++)                                                                      \
            for (int c = 0; c < J; c++) s[r][c][0] = s[r][c][1] = _mm512_setzero_ps();                  \
        int64_t i = 0;                                                                                   \
        for (; i + 4 * LANES <= k; i += 4 * LANES)                                                       \
            for (int c = 0; c < J; c++) {                                                                \
                __m512bh w0 = BF_LD(w[c] + i), w1 = BF_LD(w[c] + i + 2 * LANES);                         \
                for (int r = 0; r < R; r++) {                                                            \
                    s[r][c][0] = _mm512_dpbf16_ps(s[r][c][0], BF_LD(x[r] + i), w0);                      \
                    s[r][c][1] = _mm512_dpbf16_ps(s[r][c][1], BF_LD(x[r] + i + 2 * LANES), w1);          \
                }                                                                                        \
            }                                                                                            \
        for (; i + 2 * LANES <= k; i += 2 * LANES)                                                       \
            for (int c = 0; c < J; c++)                                                                  \
                for (int r = 0; r < R; r++)                                                              \
                    s[r][c][0] = _mm512_dpbf16_ps(s[r][c][0], BF_LD(x[r] + i), BF_LD(w[c] + i));        \
        for (int r = 0; r < R; r++)                                                                      \
            for (int c = 0; c < J; c++)                                                                  \
                res[r * J + c] = finish_bf((v16)_mm512_add_ps(s[r][c][0], s[r][c][1]), x[r], w[c], i, k); \
    }

BF_TILE(bf_4x2, 4, 2)
BF_TILE(bf_1x2, 1, 2)
BF_TILE(bf_4x1, 4, 1)
BF_TILE(bf_1x1, 1, 1)

static void bf_columns(const uint16_t *const *xs, int64_t m, const uint16_t *const *w, int J, int64_t k,
                       float *res) {
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) (J == 2 ? bf_4x2 : bf_4x1)(xs + r, w, k, res + r * J);
    for (; r < m; r++) (J == 2 ? bf_1x2 : bf_1x1)(xs + r, w, k, res + r * J);
}
#else
#define NATIVE_BF16 0
#endif

/* Rows j0..j0+J-1 of y's columns (J = 1 or 2) for every row of x: `w` the J weight rows (fp32), `xs` the m input
 * rows (fp32); results go to res (m x J). */
static void columns(const float *const *xs, int64_t m, const float *const *w, int J, int64_t k, float *res) {
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) (J == 2 ? dot_4x2 : dot_4x1)(xs + r, w, k, res + r * J);
    for (; r < m; r++) (J == 2 ? dot_1x2 : dot_1x1)(xs + r, w, k, res + r * J);
}

static void widen(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}

/* y (m x n, row stride ldy) = x (m x k, row stride ldx) W^T, W (n x k) contiguous. `bf16`: x, W and y are bf16
 * (widened exactly, summed in fp32, y rounded once), else fp32. Returns non-zero when out of memory. */
static int decode_linear(const void *x, int64_t ldx, const void *w, void *y, int64_t ldy, int64_t m, int64_t k,
                         int64_t n, int threads, int bf16) {
    int widened = bf16 && !NATIVE_BF16;  /* bf16 rows summed by the fp32 tiles: x widened once */
    float *xf = widened ? malloc(sizeof(float) * (size_t)(m * k)) : NULL;
    const float **xs = malloc(sizeof(float *) * (size_t)m);
    const uint16_t **xb = malloc(sizeof(uint16_t *) * (size_t)m);
    if ((widened && !xf) || !xs || !xb) { free(xf); free(xs); free(xb); return 1; }
    for (int64_t r = 0; r < m; r++) {
        if (widened) widen((const uint16_t *)x + r * ldx, xf + r * k, k);
        xs[r] = widened ? xf + r * k : (const float *)x + r * ldx;
        xb[r] = (const uint16_t *)x + r * ldx;
    }
    int failed = 0;
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *scratch = malloc(sizeof(float) * (size_t)(2 * k + 2 * m));
        if (!scratch) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j += 2) {
            if (!scratch) continue;
            int J = j + 1 < n ? 2 : 1;
            float *res = scratch + 2 * k;
#if NATIVE_BF16
            if (bf16) {
                const uint16_t *wb[2] = {(const uint16_t *)w + j * k, (const uint16_t *)w + (j + J - 1) * k};
                bf_columns(xb, m, wb, J, k, res);
                for (int64_t r = 0; r < m; r++)
                    for (int c = 0; c < J; c++) ((uint16_t *)y)[r * ldy + j + c] = f32_to_bf16(res[r * J + c]);
                continue;
            }
#endif
            const float *rows[2];
            for (int c = 0; c < J; c++) {
                if (bf16) widen((const uint16_t *)w + (j + c) * k, scratch + c * k, k);
                rows[c] = bf16 ? scratch + c * k : (const float *)w + (j + c) * k;
            }
            columns(xs, m, rows, J, k, res);
            for (int64_t r = 0; r < m; r++)
                for (int c = 0; c < J; c++) {
                    if (bf16) ((uint16_t *)y)[r * ldy + j + c] = f32_to_bf16(res[r * J + c]);
                    else ((float *)y)[r * ldy + j + c] = res[r * J + c];
                }
        }
        free(scratch);
    }
    free(xf);
    free(xs);
    free(xb);
    return failed;
}

int peftkit_decode_linear_f32(const float *x, int64_t ldx, const float *w, float *y, int64_t ldy, int64_t m,
                              int64_t k, int64_t n, int threads) {
    return decode_linear(x, ldx, w, y, ldy, m, k, n, threads, 0);
}

int peftkit_decode_linear_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w, uint16_t *y, int64_t ldy,
                               int64_t m, int64_t k, int64_t n, int threads) {
    return decode_linear(x, ldx, w, y, ldy, m, k, n, threads, 1);
}

/* sum_k a[k] b[k], in `DOT_TILE`'s order. */
static float dot(const float *a, const float *b, int64_t k) {
    float res;
    dot_1x1(&a, &b, k, &res);
    return res;
}

/* One decode step's attention for `rows` rows, each over its own cache (fp32).
 *
 * q: rows x heads x dim; k_new, v_new: rows x kv_heads x dim; out: rows x heads x dim. caches[b] points at row b's
 * cache, (layers, 2, kv_heads, capacity[b], dim) contiguous; pos[b] is the new token's position: its key and value are
 * written there, and the row attends over positions 0..pos[b]. Heads share kv heads in groups (GQA). Returns
 * non-zero when out of memory. */
int peftkit_decode_attention(const float *q, const float *k_new, const float *v_new, float *out,
                             const int64_t *caches, const int64_t *capacity, const int64_t *pos, int64_t rows,
                             int64_t heads, int64_t kv_heads, int64_t dim, int64_t layer, float scale,
                             int threads) {
    int64_t group = heads / kv_heads;
    for (int64_t b = 0; b < rows; b++) {
        int64_t plane = capacity[b] * dim;
        float *cache = (float *)(intptr_t)caches[b] + layer * 2 * kv_heads * plane;
        for (int64_t g = 0; g < kv_heads; g++) {
            memcpy(cache + g * plane + pos[b] * dim, k_new + (b * kv_heads + g) * dim, sizeof(float) * dim);
            memcpy(cache + (kv_heads + g) * plane + pos[b] * dim, v_new + (b * kv_heads + g) * dim,
                   sizeof(float) * dim);
        }
    }
    int failed = 0;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t bh = 0; bh < rows * heads; bh++) {
        int64_t b = bh / heads, h = bh % heads, g = h / group, n = pos[b] + 1, plane = capacity[b] * dim;
        const float *cache = (const float *)(intptr_t)caches[b] + layer * 2 * kv_heads * plane;
        const float *keys = cache + g * plane, *values = cache + (kv_heads + g) * plane;
        const float *qh = q + bh * dim;
        float *o = out + bh * dim;
        float *p = malloc(sizeof(float) * (size_t)n);
        if (!p) {
            #pragma omp atomic write
            failed = 1;
            continue;
        }
        float top = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t < n; t++) {
            p[t] = dot(qh, keys + t * dim, dim) * scale;
            top = p[t] > top ? p[t] : top;
        }
        for (int64_t t = 0; t < n; t++) {
            p[t] = expf(p[t] - top);
            total += p[t];
        }
        for (int64_t d = 0; d < dim; d++) o[d] = 0.0f;
        for (int64_t t = 0; t < n; t++) {
            const float *v = values + t * dim;
            for (int64_t d = 0; d < dim; d++) o[d] += p[t] * v[d];
        }
        for (int64_t d = 0; d < dim; d++) o[d] /= total;
        free(p);
    }
    return failed;
}
