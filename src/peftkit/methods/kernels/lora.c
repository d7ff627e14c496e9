/* LoRA's skinny products on CPU, fp32: the r-wide products around a frozen base matmul (`peftkit.methods.lora_native`).
 *
 * With x (T, d_in), A (r, d_in), B (d_out, r), scale s, h = s x A^T, and the output gradient g (T, d_out):
 *   forward    h = s x A^T                      peftkit_lora_down(x, A)
 *              out += h B^T                     peftkit_lora_up_add(out, h, B^T)
 *   backward   gh = s g B,  gB^T = h^T g        peftkit_lora_grad_out: one pass over g
 *              gx += gh A,  gA = gh^T x         peftkit_lora_grad_in: one pass over x and gx
 * r is small (8 by default): BLAS runs these at a fraction of its speed (the reductions over T mostly on one
 * thread) and reads g and x once per product. Here each pass streams its rows once, on `threads` OpenMP threads:
 * row-wise products split the rows, the reductions over T give each thread a contiguous run of rows and its own
 * (r, d) sums, added up at the end. Rows may be strided (ld*: elements between row starts); everything else is
 * contiguous. Sums run in another order than BLAS's: equal to it within fp32 rounding, not bit for bit.
 * The functions that allocate return -1 when memory runs out (nothing written), else 0.
 */
#include <stdlib.h>

#include "peftkit_native.h" /* thread_id, thread_count, v8, ld, st, hsum */

/* hr[j] = scale * <xr, w[j]> for j < r: w (r, d) */
static void row_down(const float *xr, const float *w, float *hr, int64_t d, int64_t r, float scale) {
    int64_t j = 0;
    for (; j + 4 <= r; j += 4) {
        const float *w0 = w + j * d, *w1 = w0 + d, *w2 = w1 + d, *w3 = w2 + d;
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        int64_t k = 0;
        for (; k + 8 <= d; k += 8) {
            v8 xv = ld(xr + k);
            a0 += xv * ld(w0 + k); a1 += xv * ld(w1 + k); a2 += xv * ld(w2 + k); a3 += xv * ld(w3 + k);
        }
        float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
        for (; k < d; k++) { s0 += xr[k] * w0[k]; s1 += xr[k] * w1[k]; s2 += xr[k] * w2[k]; s3 += xr[k] * w3[k]; }
        hr[j] = scale * s0; hr[j + 1] = scale * s1; hr[j + 2] = scale * s2; hr[j + 3] = scale * s3;
    }
    for (; j < r; j++) {
        const float *w0 = w + j * d;
        v8 a0 = {0};
        int64_t k = 0;
        for (; k + 8 <= d; k += 8) a0 += ld(xr + k) * ld(w0 + k);
        float s0 = hsum(a0);
        for (; k < d; k++) s0 += xr[k] * w0[k];
        hr[j] = scale * s0;
    }
}

/* o[k] += sum_j hr[j] w[j, k]: w (r, d) */
static void row_up_add(float *o, const float *hr, const float *w, int64_t d, int64_t r) {
    int64_t k = 0;
    for (; k + 32 <= d; k += 32) {
        v8 a0 = ld(o + k), a1 = ld(o + k + 8), a2 = ld(o + k + 16), a3 = ld(o + k + 24);
        for (int64_t j = 0; j < r; j++) {
            const float *wj = w + j * d + k;
            float c = hr[j];
            a0 += c * ld(wj); a1 += c * ld(wj + 8); a2 += c * ld(wj + 16); a3 += c * ld(wj + 24);
        }
        st(o + k, a0); st(o + k + 8, a1); st(o + k + 16, a2); st(o + k + 24, a3);
    }
    for (; k + 8 <= d; k += 8) {
        v8 a0 = ld(o + k);
        for (int64_t j = 0; j < r; j++) a0 += hr[j] * ld(w + j * d + k);
        st(o + k, a0);
    }
    for (; k < d; k++) {
        float s = o[k];
        for (int64_t j = 0; j < r; j++) s += hr[j] * w[j * d + k];
        o[k] = s;
    }
}

/* acc[j, :] += c0[j] v0 + c1[j] v1 for j < r (two rows at a time: half the passes over acc); v1 may be NULL */
static void rows_outer(float *acc, const float *c0, const float *v0, const float *c1, const float *v1, int64_t d,
                       int64_t r) {
    for (int64_t j = 0; j < r; j++) {
        float *a = acc + j * d;
        float p = c0[j];
        int64_t k = 0;
        if (v1) {
            float q = c1[j];
            for (; k + 8 <= d; k += 8) st(a + k, ld(a + k) + p * ld(v0 + k) + q * ld(v1 + k));
            for (; k < d; k++) a[k] += p * v0[k] + q * v1[k];
        } else {
            for (; k + 8 <= d; k += 8) st(a + k, ld(a + k) + p * ld(v0 + k));
            for (; k < d; k++) a[k] += p * v0[k];
        }
    }
}

/* Sums `parts` (r x d) buffers of `part` into out, on the threads of the enclosing parallel region. */
static void add_parts(float *out, const float *part, int parts, int64_t size) {
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < size; i++) {
        float s = part[i];
        for (int q = 1; q < parts; q++) s += part[(int64_t)q * size + i];
        out[i] = s;
    }
}

static int clamp_threads(int threads, int64_t rows) {
    if (threads < 1) threads = 1;
    if ((int64_t)threads > rows) threads = rows > 0 ? (int)rows : 1;
    return threads;
}

/* h (T, r) = scale * x A^T; x rows ldx apart */
void peftkit_lora_down(const float *x, int64_t ldx, const float *a, float *h, int64_t T, int64_t d, int64_t r,
                       float scale, int threads) {
    #pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, T))
    for (int64_t t = 0; t < T; t++) row_down(x + t * ldx, a, h + t * r, d, r, scale);
}

/* out (T, d) += h w, w (r, d) (B^T in forward); out rows ldo apart */
void peftkit_lora_up_add(float *out, int64_t ldo, const float *h, const float *w, int64_t T, int64_t d, int64_t r,
                         int threads) {
    #pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, T))
    for (int64_t t = 0; t < T; t++) row_up_add(out + t * ldo, h + t * r, w, d, r);
}

/* The backward passes, for every row t: the row-wise product (grad_out: gh[t] = scale * g[t] B; grad_in:
 * gx[t] += gh[t] A, unless gx is NULL) and sums += c[t]^T v[t] (c = h or gh, v = g or x), two rows per pass over a
 * thread's own (r, d) sums, added up into `sums` at the end. One function for both (a flag, not a function pointer,
 * so that the compiler inlines both row products). */
struct pass {
    int grad_in;           /* 0: grad_out, 1: grad_in */
    const float *w;        /* bt (grad_out) or a (grad_in), (r, d) */
    float *rows;           /* gh (grad_out, T x r) or gx (grad_in, rows ldrows apart, may be NULL) */
    int64_t ldrows;
    float scale;
    const float *c, *v;    /* sums += c^T v: h and g (grad_out), gh and x (grad_in) */
    int64_t ldv;
};

static inline void pass_row(const struct pass *p, int64_t t, int64_t d, int64_t r) {
    if (!p->grad_in)
        row_down(p->v + t * p->ldv, p->w, p->rows + t * r, d, r, p->scale);
    else if (p->rows)
        row_up_add(p->rows + t * p->ldrows, p->c + t * r, p->w, d, r);
}

static int rows_and_sums(const struct pass *p, float *sums, int64_t T, int64_t d, int64_t r, int threads) {
    int nt = clamp_threads(threads, T);
    float *part = calloc((size_t)nt * (size_t)(r * d), sizeof(float));
    if (!part) return -1;
    const float *c = p->c, *v = p->v;
    int64_t ldv = p->ldv;
    #pragma omp parallel num_threads(nt)
    {
        int id = thread_id(), n = thread_count();
        int64_t t = T * id / n, hi = T * (id + 1) / n;
        float *acc = part + (int64_t)id * r * d;
        for (; t + 2 <= hi; t += 2) {
            pass_row(p, t, d, r);
            pass_row(p, t + 1, d, r);
            rows_outer(acc, c + t * r, v + t * ldv, c + (t + 1) * r, v + (t + 1) * ldv, d, r);
        }
        for (; t < hi; t++) {
            pass_row(p, t, d, r);
            rows_outer(acc, c + t * r, v + t * ldv, c, NULL, d, r);
        }
        #pragma omp barrier
        add_parts(sums, part, n, r * d);
    }
    free(part);
    return 0;
}

/* gh (T, r) = scale * g B (bt = B^T, (r, d)) and gbt (r, d) = h^T g, reading g (rows ldg apart) once */
int peftkit_lora_grad_out(const float *g, int64_t ldg, const float *bt, const float *h, float *gh, float *gbt,
                          int64_t T, int64_t d, int64_t r, float scale, int threads) {
    struct pass p = {0, bt, gh, r, scale, h, g, ldg};
    return rows_and_sums(&p, gbt, T, d, r, threads);
}

/* gx (T, d) += gh A (skipped if gx is NULL) and ga (r, d) = gh^T x, reading x (rows ldx apart) and gx (ldgx) once */
int peftkit_lora_grad_in(float *gx, int64_t ldgx, const float *x, int64_t ldx, const float *gh, const float *a,
                         float *ga, int64_t T, int64_t d, int64_t r, int threads) {
    struct pass p = {1, a, gx, ldgx, 1.0f, gh, x, ldx};
    return rows_and_sums(&p, ga, T, d, r, threads);
}
