/* Blockwise 4-bit dequantization: out[k] = values[code_k] * absmax[block of k].
 *
 * The packed bytes hold two codes each, the first element in the high nibble. Per block, the 16 codebook
 * values are scaled once (`values[c] * absmax`, the same float32 product the PyTorch path computes, so the
 * results are bit-identical); decoding is then a 16-entry table lookup. With AVX-512 the table sits in one
 * register: `vpermps` decodes 16 float32 codes per instruction, `vpermw` 32 bfloat16 ones (from a table rounded
 * once per block); elsewhere a scalar loop does the same. bfloat16 rounds to nearest even exactly as PyTorch's
 * float -> bfloat16 conversion (finite values).
 *
 * Built and loaded by peftkit/quant/native.py (a plain C file: no PyTorch headers, compiles in a second).
 */
#include <stddef.h>
#include <stdint.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define PEFTKIT_AVX512 1
#endif

static inline uint16_t to_bf16(float x) {
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#ifdef PEFTKIT_AVX512
/* 16 packed bytes (32 codes): one 32-bit lane per byte, its two codes in element order. */
static inline __m512i codes_per_byte(const uint8_t *bytes) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
}

/* float32: 32 values from a 16-entry table of scaled values (`vpermps` per 16 codes, then interleave). */
static inline void decode32_f32(const uint8_t *bytes, __m512 table, float *o) {
    const __m512i pairs = codes_per_byte(bytes);
    const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(pairs, 4), table);
    const __m512 low = _mm512_permutexvar_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(15)), table);
    /* element 2i is high[i], element 2i+1 is low[i] */
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    _mm512_storeu_ps(o, _mm512_permutex2var_ps(high, first, low));
    _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(high, second, low));
}

/* bfloat16: each 32-bit lane becomes two 16-bit codes (high nibble in the low half: element order on a
 * little-endian CPU); one `vpermw` looks up all 32 in a table of the 16 scaled, rounded values. */
static inline void decode32_bf16(const uint8_t *bytes, __m512i table, uint16_t *o) {
    const __m512i pairs = codes_per_byte(bytes);
    const __m512i low = _mm512_slli_epi32(_mm512_and_si512(pairs, _mm512_set1_epi32(15)), 16);
    const __m512i codes = _mm512_or_si512(_mm512_srli_epi32(pairs, 4), low);
    _mm512_storeu_si512((void *)o, _mm512_permutexvar_epi16(codes, table));
}

/* float32 -> bfloat16, round to nearest even (PyTorch's rule for finite values), 16 at a time. */
static inline __m256i to_bf16_x16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd);
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
#endif

/* The scale of block b: `absmax[b]`, or with double quantization (`dyn` given, `absmax` then holds uint8
 * codes) `dyn[code] * scale2[b / 256] + offset`, two float32 roundings (built with -ffp-contract=off: no FMA),
 * as the PyTorch path computes it. */
static inline float block_scale(const void *absmax, const float *dyn, const float *scale2, float offset, int64_t b) {
    if (dyn == NULL) return ((const float *)absmax)[b];
    const float centred = dyn[((const uint8_t *)absmax)[b]] * scale2[b / 256];
    return centred + offset;
}

/* `blocks` full blocks of `block_size` elements (even); `out` is float32 (out_bf16 = 0) or bfloat16 bits
 * (out_bf16 = 1). The blocks are shared among the OpenMP threads. */
void peftkit_dequant4(const uint8_t *packed, const void *absmax, const float *dyn, const float *scale2, float offset,
                      const float *values, void *out, int out_bf16, int64_t block_size, int64_t blocks) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const float scale = block_scale(absmax, dyn, scale2, offset, b);
        const uint8_t *bytes = packed + b * (block_size / 2);
        const int64_t base = b * block_size;
        int64_t j = 0;
#ifdef PEFTKIT_AVX512
        /* the 16 scaled values: the same float32 products `values[c] * absmax` as the PyTorch path */
        const __m512 table = _mm512_mul_ps(_mm512_loadu_ps(values), _mm512_set1_ps(scale));
        if (out_bf16) {
            const __m512i table16 = _mm512_castsi256_si512(to_bf16_x16(table));
            for (; j + 32 <= block_size; j += 32) decode32_bf16(bytes + j / 2, table16, (uint16_t *)out + base + j);
        } else {
            for (; j + 32 <= block_size; j += 32) decode32_f32(bytes + j / 2, table, (float *)out + base + j);
        }
#endif
        if (j == block_size) continue;
        float table1[16];
        for (int c = 0; c < 16; c++) table1[c] = values[c] * scale;
        for (; j < block_size; j += 2) {
            const uint8_t byte = bytes[j / 2];
            const float high = table1[byte >> 4], low = table1[byte & 15];
            if (out_bf16) {
                uint16_t *o = (uint16_t *)out + base + j;
                o[0] = to_bf16(high);
                o[1] = to_bf16(low);
            } else {
                float *o = (float *)out + base + j;
                o[0] = high;
                o[1] = low;
            }
        }
    }
}
