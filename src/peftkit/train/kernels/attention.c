/* Causal attention of packed training rows on CPU, fp32 (`peftkit.train.attention_native`).
 *
 * A packed batch holds many short examples; each attends causally to itself and, after a row's shared prefix, to
 * that prefix first. Per example ("piece": row, start, end, prefix p) and key/value head g, with n = end - start
 * queries and m = p + n keys (key j < p is the row's token j, key j >= p its token start + j - p), query i sees
 * keys 0 .. p + i. Only those (query, key) pairs are computed: no padding, no masked upper triangle, no gathers.
 *
 * Layouts (contiguous): q (tokens x heads, d), k and v (tokens x kv_heads, d), token = row * width + position;
 * query head h reads kv head h / (heads / kv_heads). The output (tokens x heads, d) must come zeroed (padding
 * stays 0); forward also writes each query's log-sum-exp, which backward uses to recompute the weights (never
 * stored). Backward writes dq (zeroed beforehand, as dk and dv) and accumulates dk, dv per thread (a shared
 * prefix's keys get gradients from every example of its row), summed at the end.
 *
 * The scores of 4 queries x 16 keys are kept in registers over d (d % 8 == 0, d <= MAX_D); the softmax runs in
 * fp32 with a vectorised exp (Cephes' polynomial, within 2 ulp of expf). Sums run in another order than
 * PyTorch's: equal within fp32 rounding, not bit for bit. Functions return -1 when memory runs out, else 0.
 */
#include <math.h>
#include <stdlib.h>

#include "peftkit_native.h" /* thread_id, thread_count, v8, ld, st, hsum */

#define MAX_D 256
#define QB 4  /* queries per block */
#define KB 16 /* keys per block */

typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }
static inline v8 vmax(v8 a, v8 b) { v8i m = a > b; return (v8)(((v8i)a & m) | ((v8i)b & ~m)); }
static inline float hmax(v8 v) {
    float r = v[0];
    for (int i = 1; i < 8; i++) r = v[i] > r ? v[i] : r;
    return r;
}

/* e^x for x <= 0 (softmax arguments): 0 below -87 */
static inline v8 vexp(v8 x) {
    v8 lo = splat(-87.0f);
    v8i tiny = x < lo;
    x = vmax(x, lo);
    v8 fx = x * splat(1.44269504088896341f) + splat(0.5f);
    v8 fl = __builtin_convertvector(__builtin_convertvector(fx, v8i), v8);
    fl += __builtin_convertvector(fl > fx, v8);  /* truncation -> floor (the mask is -1 where fl > fx) */
    v8 r = x - fl * splat(0.693359375f) + fl * splat(2.12194440e-4f);
    v8 p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    v8i bits = (__builtin_convertvector(fl, v8i) + 127) << 23;
    return (v8)((v8i)(p * (v8)bits) & ~tiny);
}

typedef struct {
    const int64_t *pieces;  /* (count, 4): row, start, end, prefix */
    int64_t width, heads, kv_heads, d;
} Batch;

/* token of the piece's key j */
static inline int64_t key_token(const int64_t *pc, int64_t width, int64_t j) {
    return pc[0] * width + (j < pc[3] ? j : pc[1] + j - pc[3]);
}

/* t (d x mp) = rows^T: column j = row (key_token(j) * kv_heads + g) of `rows`; columns m..mp-1 zero */
static void transpose_keys(const Batch *b, const int64_t *pc, int64_t g, const float *rows, float *t, int64_t m,
                           int64_t mp) {
    int64_t d = b->d;
    for (int64_t j = 0; j < m; j++) {
        const float *r = rows + (key_token(pc, b->width, j) * b->kv_heads + g) * d;
        for (int64_t c = 0; c < d; c++) t[c * mp + j] = r[c];
    }
    for (int64_t c = 0; c < d; c++)
        for (int64_t j = m; j < mp; j++) t[c * mp + j] = 0.0f;
}

/* s[qi * mp + j] = scale * <a_qi, column j of t> for qi < QB, j < keys (rounded up to KB); a: QB row pointers */
static void scores(const float *const a[QB], const float *t, float *s, int64_t d, int64_t mp, int64_t keys,
                   float scale) {
    for (int64_t j = 0; j < keys; j += KB) {
        v8 c[QB][2] = {{{0}}};
        const float *tj = t + j;
        for (int64_t x = 0; x < d; x++) {
            v8 k0 = ld(tj + x * mp), k1 = ld(tj + x * mp + 8);
            for (int qi = 0; qi < QB; qi++) {
                v8 aq = splat(a[qi][x]);
                c[qi][0] += aq * k0;
                c[qi][1] += aq * k1;
            }
        }
        for (int qi = 0; qi < QB; qi++) {
            st(s + qi * mp + j, c[qi][0] * splat(scale));
            st(s + qi * mp + j + 8, c[qi][1] * splat(scale));
        }
    }
}

/* o[0 .. 8 nv) = sum_{j < keys} w[j] * r_j[0 .. 8 nv): nv <= 8 vectors in registers (a constant when inlined) */
static inline void weighted_chunk(const Batch *b, const int64_t *pc, int64_t g, const float *rows, const float *w,
                                  int64_t keys, float *o, int64_t nv) {
    v8 acc[8] = {{0}};
    for (int64_t j = 0; j < keys; j++) {
        const float *r = rows + (key_token(pc, b->width, j) * b->kv_heads + g) * b->d;
        v8 wj = splat(w[j]);
        for (int64_t x = 0; x < nv; x++) acc[x] += wj * ld(r + 8 * x);
    }
    for (int64_t x = 0; x < nv; x++) st(o + 8 * x, acc[x]);
}

/* o (d) = sum_{j < keys} w[j] * row j of the piece's kv head g in `rows`, 64 columns at a time */
static void weighted_rows(const Batch *b, const int64_t *pc, int64_t g, const float *rows, const float *w,
                          int64_t keys, float *o) {
    for (int64_t x0 = 0; x0 < b->d; x0 += 64) {
        if (b->d - x0 >= 64)
            weighted_chunk(b, pc, g, rows + x0, w, keys, o + x0, 8);
        else
            weighted_chunk(b, pc, g, rows + x0, w, keys, o + x0, (b->d - x0) / 8);
    }
}

/* the QB query rows of block i0 (the last one repeated past n), their slots, and how many are real */
static int query_block(const Batch *b, const int64_t *pc, int64_t h, int64_t i0, const float *q,
                       const float *rows[QB], int64_t slot[QB]) {
    int64_t n = pc[2] - pc[1];
    int real = n - i0 < QB ? (int)(n - i0) : QB;
    for (int qi = 0; qi < QB; qi++) {
        int64_t i = i0 + (qi < real ? qi : real - 1);
        slot[qi] = (pc[0] * b->width + pc[1] + i) * b->heads + h;
        rows[qi] = q + slot[qi] * b->d;
    }
    return real;
}

static int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

static int64_t max_keys(const Batch *b, int64_t count) {
    int64_t most = 0;
    for (int64_t e = 0; e < count; e++) {
        const int64_t *pc = b->pieces + 4 * e;
        int64_t m = pc[3] + pc[2] - pc[1];
        most = m > most ? m : most;
    }
    return round_up(most, KB);
}

int peftkit_attention_forward(const float *q, const float *k, const float *v, float *out, float *lse,
                              const int64_t *pieces, int64_t count, int64_t width, int64_t heads, int64_t kv_heads,
                              int64_t d, float scale, int threads) {
    Batch b = {pieces, width, heads, kv_heads, d};
    int64_t mp = max_keys(&b, count), group = heads / kv_heads;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *t = malloc(sizeof(float) * (d * mp + QB * mp + 1));
        if (t == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < count * kv_heads; task++) {
            if (t == NULL) continue;
            const int64_t *pc = pieces + 4 * (task / kv_heads);
            int64_t g = task % kv_heads, n = pc[2] - pc[1], p = pc[3], m = p + n;
            float *s = t + d * mp;
            transpose_keys(&b, pc, g, k, t, m, mp);
            for (int64_t h = g * group; h < (g + 1) * group; h++) {
                for (int64_t i0 = 0; i0 < n; i0 += QB) {
                    const float *rows[QB];
                    int64_t slot[QB];
                    int real = query_block(&b, pc, h, i0, q, rows, slot);
                    scores(rows, t, s, d, mp, p + i0 + real, scale);
                    for (int qi = 0; qi < real; qi++) {
                        int64_t keys = p + i0 + qi + 1, j;
                        float *sq = s + qi * mp;
                        v8 mx8 = splat(-INFINITY);
                        for (j = 0; j + 8 <= keys; j += 8) mx8 = vmax(mx8, ld(sq + j));
                        float mx = hmax(mx8);
                        for (; j < keys; j++) mx = sq[j] > mx ? sq[j] : mx;
                        v8 sum8 = {0};
                        for (j = 0; j + 8 <= keys; j += 8) {
                            v8 e = vexp(ld(sq + j) - splat(mx));
                            st(sq + j, e);
                            sum8 += e;
                        }
                        float sum = hsum(sum8);
                        for (; j < keys; j++) {
                            sq[j] = expf(sq[j] - mx);
                            sum += sq[j];
                        }
                        float *o = out + slot[qi] * d;
                        weighted_rows(&b, pc, g, v, sq, keys, o);
                        for (int64_t x = 0; x < d; x++) o[x] /= sum;
                        lse[slot[qi]] = mx + logf(sum);
                    }
                }
            }
        }
        free(t);
    }
    return failed ? -1 : 0;
}

int peftkit_attention_backward(const float *q, const float *k, const float *v, const float *out,
                               const float *grad, const float *lse, float *dq, float *dk, float *dv,
                               const int64_t *pieces, int64_t count, int64_t width, int64_t rows_total,
                               int64_t heads, int64_t kv_heads, int64_t d, float scale, int threads) {
    Batch b = {pieces, width, heads, kv_heads, d};
    int64_t mp = max_keys(&b, count), group = heads / kv_heads, kv_size = rows_total * kv_heads * d;
    int failed = 0;
    float *partial = NULL;  /* per thread: dk, dv sums */
#pragma omp parallel num_threads(threads)
    {
        int nt = thread_count();
#pragma omp single
        {
            partial = calloc((size_t)nt * 2 * kv_size + 1, sizeof(float));
            if (partial == NULL) failed = 1;
        }
        float *t = malloc(sizeof(float) * (2 * d * mp + 2 * QB * mp + 1));
        if (t == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        float *my_dk = failed ? NULL : partial + (size_t)thread_id() * 2 * kv_size, *my_dv = my_dk + kv_size;
        /* static: the same tasks on the same thread every call, so the per-thread dk/dv sums add in one order and the
         * gradients do not change from run to run (dynamic scheduling made them differ in the last bit) */
#pragma omp for schedule(static, 1)
        for (int64_t task = 0; task < count * kv_heads; task++) {
            if (failed) continue;
            const int64_t *pc = pieces + 4 * (task / kv_heads);
            int64_t g = task % kv_heads, n = pc[2] - pc[1], p = pc[3], m = p + n;
            float *kt = t, *vt = t + d * mp, *pw = t + 2 * d * mp, *ds = pw + QB * mp;
            transpose_keys(&b, pc, g, k, kt, m, mp);
            transpose_keys(&b, pc, g, v, vt, m, mp);
            for (int64_t h = g * group; h < (g + 1) * group; h++) {
                for (int64_t i0 = 0; i0 < n; i0 += QB) {
                    const float *qr[QB], *gr[QB];
                    int64_t slot[QB];
                    int real = query_block(&b, pc, h, i0, q, qr, slot);
                    for (int qi = 0; qi < QB; qi++) gr[qi] = grad + slot[qi] * d;
                    int64_t keys_all = p + i0 + real;
                    scores(qr, kt, pw, d, mp, keys_all, scale);
                    scores(gr, vt, ds, d, mp, keys_all, 1.0f);  /* dP = g v^T */
                    for (int qi = 0; qi < QB; qi++) {
                        float *pq = pw + qi * mp, *sq = ds + qi * mp;
                        int64_t keys = qi < real ? p + i0 + qi + 1 : 0, j;
                        float rowdot = 0.0f;  /* sum_j p_ij dp_ij = <g_i, out_i> */
                        if (keys) {
                            const float *oi = out + slot[qi] * d, *gi = gr[qi];
                            v8 acc = {0};
                            for (int64_t x = 0; x < d; x += 8) acc += ld(oi + x) * ld(gi + x);
                            rowdot = hsum(acc);
                        }
                        v8 l8 = splat(keys ? lse[slot[qi]] : 0.0f), r8 = splat(rowdot);
                        for (j = 0; j + 8 <= keys; j += 8) {
                            v8 e = vexp(ld(pq + j) - l8);
                            st(pq + j, e);
                            st(sq + j, e * (ld(sq + j) - r8) * splat(scale));
                        }
                        for (; j < keys; j++) {
                            pq[j] = expf(pq[j] - l8[0]);
                            sq[j] = pq[j] * (sq[j] - rowdot) * scale;
                        }
                        for (; j < keys_all; j++) pq[j] = sq[j] = 0.0f;  /* beyond this query's keys */
                        if (keys) weighted_rows(&b, pc, g, k, sq, keys, dq + slot[qi] * d);
                    }
                    /* dk_j += sum_i ds_ij q_i, dv_j += sum_i p_ij g_i (rows past `real` have zero weights) */
                    for (int64_t j = 0; j < keys_all; j++) {
                        int64_t kr = (key_token(pc, width, j) * kv_heads + g) * d;
                        float *dkj = my_dk + kr, *dvj = my_dv + kr;
                        v8 s8[QB], p8[QB];
                        for (int qi = 0; qi < QB; qi++) {
                            s8[qi] = splat(ds[qi * mp + j]);
                            p8[qi] = splat(pw[qi * mp + j]);
                        }
                        for (int64_t x = 0; x < d; x += 8) {
                            v8 ak = ld(dkj + x), av = ld(dvj + x);
                            for (int qi = 0; qi < QB; qi++) {
                                ak += s8[qi] * ld(qr[qi] + x);
                                av += p8[qi] * ld(gr[qi] + x);
                            }
                            st(dkj + x, ak);
                            st(dvj + x, av);
                        }
                    }
                }
            }
        }
        free(t);
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t x = 0; x < kv_size; x++) {
                float sk = 0.0f, sv = 0.0f;
                for (int th = 0; th < nt; th++) {
                    sk += partial[(size_t)th * 2 * kv_size + x];
                    sv += partial[(size_t)th * 2 * kv_size + kv_size + x];
                }
                dk[x] = sk;
                dv[x] = sv;
            }
        }
    }
    free(partial);
    return failed ? -1 : 0;
}
