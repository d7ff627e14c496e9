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
#ifdef __AVX512F__
#include <immintrin.h>
#endif

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

/* The instruction set the products were built for (tests check that a build took the intended path). */
const char *peftkit_decode_isa(void) {
#if NATIVE_BF16
    return "AVX512-BF16";
#elif defined(__AVX512F__)
    return "AVX-512";
#elif defined(__AVX2__)
    return "AVX2";
#else
    return "generic";
#endif
}

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

/* The fp32 sums res[r * ldr + j] = x[r] . w[j] of the m rows of x and the n rows of a dense weight (fp32, or bf16
 * with `bf16`): `xs` the rows as fp32, `xb` the same rows as bf16 (used by the AVX512-BF16 tiles only). Columns go
 * to the threads in pairs; every element's order is fixed by k alone (see `DOT_TILE`). Non-zero: out of memory. */
static int dense_sums(const float *const *xs, const uint16_t *const *xb, int64_t m, const void *w, int bf16,
                      int64_t k, int64_t n, float *res, int64_t ldr, int threads) {
    (void)xb;
    int failed = 0;
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *scratch = malloc(sizeof(float) * (size_t)(2 * k + 2 * m));
        if (!scratch) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j++) {  /* one weight row at a time: one sequential stream through W (two
                                               * interleaved rows halve the bandwidth one core gets) */
            if (!scratch) continue;
            const int J = 1;
            float *part = scratch + 2 * k;
#if NATIVE_BF16
            if (bf16) {
                const uint16_t *wb[2] = {(const uint16_t *)w + j * k, (const uint16_t *)w + (j + J - 1) * k};
                bf_columns(xb, m, wb, J, k, part);
            } else
#endif
            {
                const float *rows[2];
                for (int c = 0; c < J; c++) {
                    if (bf16) widen((const uint16_t *)w + (j + c) * k, scratch + c * k, k);
                    rows[c] = bf16 ? scratch + c * k : (const float *)w + (j + c) * k;
                }
                columns(xs, m, rows, J, k, part);
            }
            for (int64_t r = 0; r < m; r++)
                for (int c = 0; c < J; c++) res[r * ldr + j + c] = part[r * J + c];
        }
        free(scratch);
    }
    return failed;
}

/* y (m x n, row stride ldy) = x (m x k, row stride ldx) W^T, W (n x k) contiguous. `bf16`: x, W and y are bf16
 * (widened exactly, summed in fp32, y rounded once), else fp32. Returns non-zero when out of memory. */
static int decode_linear(const void *x, int64_t ldx, const void *w, void *y, int64_t ldy, int64_t m, int64_t k,
                         int64_t n, int threads, int bf16) {
    float *xf = bf16 ? malloc(sizeof(float) * (size_t)(m * k)) : NULL;
    float *res = malloc(sizeof(float) * (size_t)(m * n));
    const float **xs = malloc(sizeof(float *) * (size_t)m);
    const uint16_t **xb = malloc(sizeof(uint16_t *) * (size_t)m);
    int failed = (bf16 && !xf) || !res || !xs || !xb;
    for (int64_t r = 0; r < m && !failed; r++) {
        if (bf16) widen((const uint16_t *)x + r * ldx, xf + r * k, k);
        xs[r] = bf16 ? xf + r * k : (const float *)x + r * ldx;
        xb[r] = (const uint16_t *)x + r * ldx;
    }
    if (!failed) failed = dense_sums(xs, xb, m, w, bf16, k, n, res, n, threads);
    for (int64_t r = 0; r < m && !failed; r++)
        for (int64_t j = 0; j < n; j++) {
            if (bf16) ((uint16_t *)y)[r * ldy + j] = f32_to_bf16(res[r * n + j]);
            else ((float *)y)[r * ldy + j] = res[r * n + j];
        }
    free(xf);
    free(res);
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

/* ---- The whole decode step in one call: every layer of a Llama-shaped model, then the final norm and the head. ----
 *
 * `plan` (int64 words, written once by `peftkit.serve.fast`): PLAN_HEAD words, then LAYER_WORDS per layer:
 *   head:  layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, round (1: activations are bf16),
 *          embed address, embed format, final norm address (fp32), the head's matrix (MATRIX_WORDS);
 *   layer: input norm, post-attention norm (fp32 addresses), then q, k, v, o, gate, up, down (MATRIX_WORDS each).
 * A matrix: format (FMT_F32, FMT_BF16 or FMT_NF4), data address, fp32 block scales (NF4), block size (NF4), n, k,
 * fp32 bias address (or 0), added to the fp32 sum before its rounding.
 *
 * Rounding: with `round` every value the model's bf16 forward pass stores in bf16 is rounded to bf16 here at the
 * same point (norm outputs, each product, the rotary terms, the residual sums, SiLU and its product, the LoRA
 * terms); the sums themselves run in fp32, the attention in fp32 (as `peftkit_decode_attention`). NF4 weights are
 * used as their fp32 values (codebook value x block scale), one rounding fewer than a dequantized bf16 copy. */
enum { FMT_F32 = 0, FMT_BF16 = 1, FMT_NF4 = 2 };
enum { MATRIX_WORDS = 7, PLAN_HEAD = 11 + MATRIX_WORDS, LAYER_WORDS = 2 + 7 * MATRIX_WORDS, PROJECTIONS = 7 };

typedef struct { int64_t fmt, data, scales, block, n, k, bias; } matrix;

static float NF4_BOOK[16];  /* set by peftkit_decode_step from its argument (the codebook of `peftkit.quant`) */

static inline float rb(float f, int round) { return round ? bf16_to_f32(f32_to_bf16(f)) : f; }

/* R rows of xd (each de-interleaved per 32 elements: the 16 even then the 16 odd ones) times one NF4 weight row:
 * packed codes (the first element in the high nibble), one fp32 scale per block. Two 16-lane sums (even and odd
 * elements) over the whole row, then `finish`: one order per element whatever R is. */
#define NF4_TILE(NAME, R)                                                                                 \
    static void NAME(const float *const *xd, const uint8_t *codes, const float *scales, int64_t block,   \
                     int64_t k, float *res) {                                                           \
        v16 s[R][2];                                                                                     \
        memset(s, 0, sizeof s);                                                                          \
        for (int64_t b0 = 0; b0 < k; b0 += block) {                                                      \
            float table[16];                                                                             \
            for (int c = 0; c < 16; c++) table[c] = NF4_BOOK[c] * scales[b0 / block];                    \
            for (int64_t i = b0; i < b0 + block; i += 2 * LANES) {                                       \
                v16 hi, lo;                                                                              \
                nf4_decode(codes + i / 2, table, &hi, &lo);                                              \
                for (int r = 0; r < R; r++) {                                                            \
                    s[r][0] += hi * ld16(xd[r] + i);                                                     \
                    s[r][1] += lo * ld16(xd[r] + i + LANES);                                             \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < R; r++) res[r] = finish(s[r][0] + s[r][1], NULL, NULL, 0, 0);               \
    }

/* 16 packed bytes: the values of their high codes (even elements) and low codes (odd elements). */
static inline void nf4_decode(const uint8_t *bytes, const float *table, v16 *hi, v16 *lo) {
#ifdef __AVX512F__
    __m512 t = _mm512_loadu_ps(table);
    __m512i pairs = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
    *hi = (v16)_mm512_permutexvar_ps(_mm512_srli_epi32(pairs, 4), t);
    *lo = (v16)_mm512_permutexvar_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(15)), t);
#else
    float h[LANES], l[LANES];
    for (int i = 0; i < LANES; i++) {
        h[i] = table[bytes[i] >> 4];
        l[i] = table[bytes[i] & 15];
    }
    *hi = ld16(h);
    *lo = ld16(l);
#endif
}

NF4_TILE(nf4_4, 4)
NF4_TILE(nf4_1, 1)

/* x rows (m x k fp32, stride k) as every matrix format reads them: pointers, bf16 copies, de-interleaved copies. */
typedef struct { const float **xs; const uint16_t **xb; const float **xd; uint16_t *b; float *d; } inputs;

static void prepare(inputs *in, const float *x, int64_t m, int64_t k, int fmt) {
    for (int64_t r = 0; r < m; r++) {
        const float *row = x + r * k;
        in->xs[r] = row;
        in->xb[r] = in->b + r * k;
        in->xd[r] = in->d + r * k;
        if (fmt == FMT_BF16)
            for (int64_t i = 0; i < k; i++) in->b[r * k + i] = f32_to_bf16(row[i]);
        if (fmt == FMT_NF4)
            for (int64_t i = 0; i < k; i += 2 * LANES)
                for (int j = 0; j < LANES; j++) {
                    in->d[r * k + i + j] = row[i + 2 * j];
                    in->d[r * k + i + LANES + j] = row[i + 2 * j + 1];
                }
    }
}

/* res (m x n, stride n) = fp32 sums of x (m x k) times the matrix; non-zero when out of memory. */
static int matrix_sums(const matrix *w, inputs *in, const float *x, int64_t m, float *res, int threads) {
    prepare(in, x, m, w->k, (int)w->fmt);
    if (w->fmt != FMT_NF4)
        return dense_sums(in->xs, in->xb, m, (const void *)(intptr_t)w->data, w->fmt == FMT_BF16, w->k, w->n, res,
                          w->n, threads);
    const uint8_t *codes = (const uint8_t *)(intptr_t)w->data;
    const float *scales = (const float *)(intptr_t)w->scales;
    int64_t k = w->k, blocks = k / w->block;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t j = 0; j < w->n; j++) {
        float part[4];
        int64_t r = 0;
        for (; r + 4 <= m; r += 4) {
            nf4_4(in->xd + r, codes + j * k / 2, scales + j * blocks, w->block, k, part);
            for (int c = 0; c < 4; c++) res[(r + c) * w->n + j] = part[c];
        }
        for (; r < m; r++) {
            nf4_1(in->xd + r, codes + j * k / 2, scales + j * blocks, w->block, k, part);
            res[r * w->n + j] = part[0];
        }
    }
    return 0;
}

/* One row's LoRA term added to its product: out += B (scale (A x)), with `table` the row's adapter for this
 * projection: A (r x k) and B transposed (r x n), both fp32 (exact copies of the adapter's values). Rounded as
 * the forward path's per-row terms (`LoRABatch._gathered`) round in bf16: A x, its scaling, the term, the sum. */
static void lora_add(const float *x, float *out, const int64_t *table, float scale, int64_t k, int64_t n,
                     int round, float *term) {
    const float *a = (const float *)(intptr_t)table[0], *bt = (const float *)(intptr_t)table[1];
    int64_t rank = table[2];
    for (int64_t o = 0; o < n; o++) term[o] = 0.0f;
    for (int64_t j = 0; j < rank; j++) {
        float h = rb(rb(dot(x, a + j * k, k), round) * scale, round);
        const float *b = bt + j * n;
        for (int64_t o = 0; o < n; o++) term[o] += h * b[o];
    }
    for (int64_t o = 0; o < n; o++) out[o] = rb(out[o] + rb(term[o], round), round);
}

typedef struct {
    const int64_t *plan, *const *lora;  /* lora[r]: row r's adapter table (NULL: none) */
    int64_t m;
    int round, threads;
    inputs in;
    float *term;
} step_ctx;

/* out (m x n) = the rows of x times projection `p` of `layer` (+ each row's LoRA term), rounded as the model. */
static int project(step_ctx *s, int64_t layer, int p, const float *x, float *out) {
    const matrix *w = (const matrix *)(s->plan + PLAN_HEAD + layer * LAYER_WORDS + 2 + p * MATRIX_WORDS);
    if (matrix_sums(w, &s->in, x, s->m, out, s->threads)) return 1;
    for (int64_t r = 0; r < s->m; r++) {
        float *row = out + r * w->n;
        const float *bias = (const float *)(intptr_t)w->bias;
        for (int64_t j = 0; j < w->n; j++) row[j] = rb(bias ? row[j] + bias[j] : row[j], s->round);
        const int64_t *table = s->lora[r], index = layer * PROJECTIONS + p;
        if (table && table[1 + 3 * index]) {  /* word 0: the fp32 scales; then (A, B^T, r) per projection */
            const float *scales = (const float *)(intptr_t)table[0];
            lora_add(x + r * w->k, row, table + 1 + 3 * index, scales[index], w->k, w->n, s->round, s->term);
        }
    }
    return 0;
}

/* x = RMSNorm(h) per row: w * round(h / sqrt(mean(h^2) + eps)), rounded (LlamaRMSNorm's order). */
static void norm_rows(const float *h, float *x, const float *w, int64_t m, int64_t d, float eps, int round) {
    for (int64_t r = 0; r < m; r++) {
        const float *hr = h + r * d;
        float inv = 1.0f / sqrtf(dot(hr, hr, d) / (float)d + eps);
        for (int64_t i = 0; i < d; i++) x[r * d + i] = rb(w[i] * rb(hr[i] * inv, round), round);
    }
}

/* The rotary embedding of `heads` heads per row (x: m x heads x dim), cos and sin per row (m x dim). */
static void rope_rows(float *x, const float *cos, const float *sin, int64_t m, int64_t heads, int64_t dim,
                      int round) {
    int64_t half = dim / 2;
    for (int64_t r = 0; r < m; r++)
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + (r * heads + h) * dim, old[1024];
            memcpy(old, v, sizeof(float) * (size_t)dim);
            for (int64_t d = 0; d < dim; d++) {
                float rot = d < half ? -old[d + half] : old[d - half];
                const float *c = cos + r * dim, *sn = sin + r * dim;
                v[d] = rb(rb(old[d] * c[d], round) + rb(rot * sn[d], round), round);
            }
        }
}

/* One layer for every row: h (m x hidden) in place. `work` holds x, q, k, v, o, gate and up. */
static int layer_step(step_ctx *s, int64_t layer, float *h, float *work, const float *cos, const float *sin,
                      const int64_t *caches, const int64_t *capacity, const int64_t *pos, float eps, float scale) {
    const int64_t *head = s->plan, *words = s->plan + PLAN_HEAD + layer * LAYER_WORDS;
    int64_t m = s->m, d = head[1], heads = head[2], kv = head[3], dim = head[4], inter = head[5];
    int round = s->round;
    float *x = work, *q = x + m * (d > inter ? d : inter), *k = q + m * heads * dim, *v = k + m * kv * dim;
    float *o = v + m * kv * dim, *gate = o + m * heads * dim, *up = gate + m * inter;
    norm_rows(h, x, (const float *)(intptr_t)words[0], m, d, eps, round);
    if (project(s, layer, 0, x, q) || project(s, layer, 1, x, k) || project(s, layer, 2, x, v)) return 1;
    rope_rows(q, cos, sin, m, heads, dim, round);
    rope_rows(k, cos, sin, m, kv, dim, round);
    if (peftkit_decode_attention(q, k, v, o, caches, capacity, pos, m, heads, kv, dim, layer, scale, s->threads))
        return 1;
    for (int64_t i = 0; i < m * heads * dim; i++) o[i] = rb(o[i], round);
    if (project(s, layer, 3, o, x)) return 1;
    for (int64_t i = 0; i < m * d; i++) h[i] = rb(h[i] + x[i], round);
    norm_rows(h, x, (const float *)(intptr_t)words[1], m, d, eps, round);
    if (project(s, layer, 4, x, gate) || project(s, layer, 5, x, up)) return 1;
    for (int64_t i = 0; i < m * inter; i++) {
        float g = gate[i];
        gate[i] = rb(rb(g / (1.0f + expf(-g)), round) * up[i], round);
    }
    if (project(s, layer, 6, gate, x)) return 1;
    for (int64_t i = 0; i < m * d; i++) h[i] = rb(h[i] + x[i], round);
    return 0;
}

/* One decode step of `m` rows through the model `plan` describes (see above): row r is fed token ids[r] at
 * position pos[r] (cos and sin: its rotary factors, m x head_dim), writes its key and value into its cache
 * (`peftkit_decode_attention`), and gets its next-token logits (logits: m x vocab, fp32). lora[r]: the address of
 * row r's adapter table or 0. book: the 16 NF4 codebook values. Returns non-zero when out of memory. */
int peftkit_decode_step(const int64_t *plan, const float *book, int64_t m, const int64_t *ids, const int64_t *pos,
                        const float *cos, const float *sin, const int64_t *caches, const int64_t *capacity,
                        const int64_t *lora, float *logits, float eps, float scale, int threads) {
    int64_t d = plan[1], heads = plan[2], kv = plan[3], dim = plan[4], inter = plan[5], widest = d;
    memcpy(NF4_BOOK, book, sizeof NF4_BOOK);
    if (inter > widest) widest = inter;
    if (heads * dim > widest) widest = heads * dim;
    size_t work = (size_t)(m * (widest + 2 * heads * dim + 2 * kv * dim + 2 * inter));
    float *h = malloc(sizeof(float) * (size_t)(m * d)), *buf = malloc(sizeof(float) * work);
    float *term = malloc(sizeof(float) * (size_t)(plan[6] > widest ? plan[6] : widest));
    step_ctx s = {plan, (const int64_t *const *)lora, m, (int)plan[7], threads,
                  {malloc(sizeof(float *) * (size_t)m), malloc(sizeof(uint16_t *) * (size_t)m),
                   malloc(sizeof(float *) * (size_t)m), malloc(sizeof(uint16_t) * (size_t)(m * widest)),
                   malloc(sizeof(float) * (size_t)(m * widest))}, term};
    int failed = !h || !buf || !term || !s.in.xs || !s.in.xb || !s.in.xd || !s.in.b || !s.in.d;
    for (int64_t r = 0; r < m && !failed; r++) {  /* the embedding rows, as fp32 */
        const void *embed = (const void *)(intptr_t)plan[8];
        if (plan[9] == FMT_BF16) widen((const uint16_t *)embed + ids[r] * d, h + r * d, d);
        else memcpy(h + r * d, (const float *)embed + ids[r] * d, sizeof(float) * (size_t)d);
    }
    for (int64_t layer = 0; layer < plan[0] && !failed; layer++)
        failed = layer_step(&s, layer, h, buf, cos, sin, caches, capacity, pos, eps, scale);
    if (!failed) {
        const matrix *lm = (const matrix *)(plan + 11);
        norm_rows(h, buf, (const float *)(intptr_t)plan[10], m, d, eps, s.round);
        failed = matrix_sums(lm, &s.in, buf, m, logits, threads);
        for (int64_t i = 0; i < m * lm->n && !failed; i++) logits[i] = rb(logits[i], s.round);
    }
    free(h); free(buf); free(term);
    free((void *)s.in.xs); free((void *)s.in.xb); free((void *)s.in.xd); free(s.in.b); free(s.in.d);
    return failed;
}
