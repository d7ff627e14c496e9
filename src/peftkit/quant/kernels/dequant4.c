/* Blockwise 4-bit dequantization: out[k] = values[code_k] * absmax[block of k].
 *
 * The packed bytes hold two codes each, the first element in the high nibble. Per block, the 16 codebook
 * values are scaled once (`values[c] * absmax`, the same float32 product the PyTorch path computes, so the
 * results are bit-identical); decoding is then a 16-entry table lookup. With AVX-512 the table sits in one
 * register and `vpermps` decodes 16 codes per instruction; elsewhere a scalar loop does the same.
 * bfloat16 output rounds to nearest even exactly as PyTorch's float -> bfloat16 conversion (finite values).
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

static inline void scaled_table(const float *values, float s, float *table) {
    for (int c = 0; c < 16; c++) table[c] = values[c] * s;
}

#ifdef PEFTKIT_AVX512
/* 16 packed bytes -> 32 scaled values: (first 16, second 16) in element order. */
static inline void decode16(const uint8_t *bytes, __m512 table, __m512 *first, __m512 *second) {
    const __m512i pairs = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
    const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(pairs, 4), table);
    const __m512 low = _mm512_permutexvar_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(15)), table);
    /* interleave: element 2i is high[i], element 2i+1 is low[i] */
    const __m512i lo_half = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi_half = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    *first = _mm512_permutex2var_ps(high, lo_half, low);
    *second = _mm512_permutex2var_ps(high, hi_half, low);
}

static inline __m256i to_bf16_x16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd);
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
#endif

/* `blocks` full blocks of `block_size` elements (even); `out` is float32 (out_bf16 = 0) or bfloat16 bits
 * (out_bf16 = 1). The blocks are shared among the OpenMP threads. */
void peftkit_dequant4(const uint8_t *packed, const float *absmax, const float *values, void *out, int out_bf16,
                      int64_t block_size, int64_t blocks) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        float table[16];
        scaled_table(values, absmax[b], table);
        const uint8_t *bytes = packed + b * (block_size / 2);
        const int64_t base = b * block_size;
        int64_t j = 0;
#ifdef PEFTKIT_AVX512
        const __m512 vtable = _mm512_loadu_ps(table);
        for (; j + 32 <= block_size; j += 32) {
            __m512 first, second;
            decode16(bytes + j / 2, vtable, &first, &second);
            if (out_bf16) {
                uint16_t *o = (uint16_t *)out + base + j;
                _mm256_storeu_si256((__m256i *)o, to_bf16_x16(first));
                _mm256_storeu_si256((__m256i *)(o + 16), to_bf16_x16(second));
            } else {
                float *o = (float *)out + base + j;
                _mm512_storeu_ps(o, first);
                _mm512_storeu_ps(o + 16, second);
            }
        }
#endif
        for (; j < block_size; j += 2) {
            const uint8_t byte = bytes[j / 2];
            const float high = table[byte >> 4], low = table[byte & 15];
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
