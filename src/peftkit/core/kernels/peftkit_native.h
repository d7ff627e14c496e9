/* Helpers shared by peftkit's C kernels (`quant/kernels`, `methods/kernels`, `train/kernels`).
 *
 * Included as "peftkit_native.h": `peftkit.core.native` builds every kernel with this folder on the include path,
 * and its text is part of each kernel's cache key (changing it rebuilds them all). Plain C, no PyTorch headers.
 */
#ifndef PEFTKIT_NATIVE_H
#define PEFTKIT_NATIVE_H

#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* This thread's number in the enclosing OpenMP team (0 when built without OpenMP). */
static inline int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* The size of the enclosing OpenMP team (1 when built without OpenMP). */
static inline int thread_count(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* 8 floats: one AVX2 register with -march=native, a pair of SSE registers without. Unaligned loads and stores
 * through memcpy (compiled to single vector moves). */
typedef float v8 __attribute__((vector_size(32)));

static inline v8 ld(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v8 v) { memcpy(p, &v, sizeof v); }
/* The sum of the 8 lanes, pairwise (a fixed order: the same result on every run). */
static inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

#endif
