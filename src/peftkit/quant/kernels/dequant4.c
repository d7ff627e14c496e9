/* Blockwise 4-bit dequantization: out[k] = values[code_k] * absmax[block of k].
 *
 * The packed bytes hold two codes each, the first element in the high nibble. Per block, the 16 codebook
 * values are scaled once (`values[c] * absmax`, the same float32 product the PyTorch path computes, so the
 * results are bit-identical); decoding is then a 16-entry table lookup. The instruction set is chosen at compile
 * time (`peftkit_dequant4_isa` names it):
 *   AVX-512 (F and BW): the table sits in one register: `vpermps` decodes 16 float32 codes per instruction,
 *     `vpermw` 32 bfloat16 ones (from a table rounded once per block);
 *   AVX2: float32 from two 8-entry halves of the table (`vpermps` on each, blended on bit 3 of the code, 8 codes
 *     at a time); bfloat16 by `vpshufb` over the rounded table split into its low and high bytes (32 codes at a
 *     time, each byte plane one 16-entry lookup);
 *   elsewhere (or built with -DPEFTKIT_SCALAR) a scalar loop does the same.
 * bfloat16 rounds to nearest even exactly as PyTorch's float -> bfloat16 conversion (finite values).
 *
 * Built and loaded by peftkit/quant/native.py (a plain C file: no PyTorch headers, compiles in a second).
 */
#include <stddef.h>

#include "peftkit_native.h" /* the helpers every peftkit kernel shares (this one needs only its integer types) */
#if defined(PEFTKIT_SCALAR)
#define PEFTKIT_ISA "scalar" /* forced: tests build each path this CPU can run */
#elif defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define PEFTKIT_AVX512 1
#define PEFTKIT_ISA "AVX-512"
#elif defined(__AVX2__)
#include <immintrin.h>
#define PEFTKIT_AVX2 1
#define PEFTKIT_ISA "AVX2"
#else
#define PEFTKIT_ISA "scalar"
#endif

/* The instruction set the kernel was built for: "AVX-512", "AVX2" or "scalar". */
const char *peftkit_dequant4_isa(void) { return PEFTKIT_ISA; }

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

#ifdef PEFTKIT_AVX2
/* The 16 scaled values as two 8-entry halves (the same float32 products `values[c] * absmax`). */
typedef struct {
    __m256 low, high;
} table16_f32;

static inline table16_f32 scaled_table(const float *values, float scale) {
    const __m256 s = _mm256_set1_ps(scale);
    return (table16_f32){_mm256_mul_ps(_mm256_loadu_ps(values), s), _mm256_mul_ps(_mm256_loadu_ps(values + 8), s)};
}

/* float32: 8 values from 4 packed bytes. `dup` holds the 16 packed bytes in both 128-bit halves; `spread` puts
 * byte i of the 4 into 32-bit lanes 2i and 2i+1 (the rest zero); the variable shift then leaves the high nibble
 * in the even lanes and the whole byte in the odd ones (its high nibble sits above the code's 4 bits: `vpermps`
 * reads bits 0-2 only, and the shift that makes the blend mask drops it). */
static inline void decode8_f32(__m256i dup, __m256i spread, table16_f32 t, float *o) {
    const __m256i lanes = _mm256_shuffle_epi8(dup, spread);
    const __m256i codes = _mm256_srlv_epi32(lanes, _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0));
    const __m256 low = _mm256_permutevar8x32_ps(t.low, codes);
    const __m256 high = _mm256_permutevar8x32_ps(t.high, codes);
    /* bit 3 of the code picks the half: moved into the sign bit, which `blendv` reads */
    _mm256_storeu_ps(o, _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28))));
}

/* float32: 32 values from 16 packed bytes. */
static inline void decode32_f32(const uint8_t *bytes, table16_f32 t, float *o) {
    const __m256i dup = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)bytes));
    const char z = -128; /* `vpshufb` writes zero */
    for (int q = 0; q < 4; q++) {
        const char b = (char)(4 * q);
        const __m256i spread = _mm256_setr_epi8(b, z, z, z, b, z, z, z, b + 1, z, z, z, b + 1, z, z, z, b + 2, z, z, z,
                                                b + 2, z, z, z, b + 3, z, z, z, b + 3, z, z, z);
        decode8_f32(dup, spread, t, o + 8 * q);
    }
}

/* float32 -> bfloat16, round to nearest even (PyTorch's rule for finite values), in the low half of each lane. */
static inline __m256i to_bf16_x8(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
}

/* The 16 rounded values as two byte planes for `vpshufb`: `low` their low bytes, `high` their high bytes (16
 * bytes each, repeated in both 128-bit halves). */
typedef struct {
    __m256i low, high;
} table16_bf16;

static inline table16_bf16 rounded_table(table16_f32 t) {
    /* 16-bit lanes in the order 0-3 8-11 | 4-7 12-15 (`vpackusdw` works per half), then 0-7 | 8-15 */
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(to_bf16_x8(t.low), to_bf16_x8(t.high)), 0xD8);
    /* per half: the low bytes of its 8 values, then their high bytes */
    const __m256i planes = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m256i split = _mm256_shuffle_epi8(packed, planes);
    const __m128i first = _mm256_castsi256_si128(split), second = _mm256_extracti128_si256(split, 1);
    return (table16_bf16){_mm256_broadcastsi128_si256(_mm_unpacklo_epi64(first, second)),
                          _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(first, second))};
}

/* bfloat16: 32 values from 16 packed bytes. The codes go one per byte, codes 0-7 and 16-23 in the low half and
 * 8-15 and 24-31 in the high one, so that interleaving the two looked-up byte planes (per half) writes them in
 * element order. */
static inline void decode32_bf16(const uint8_t *bytes, table16_bf16 t, uint16_t *o) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)bytes), nibble = _mm_set1_epi8(15);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble), low = _mm_and_si128(packed, nibble);
    const __m128i first = _mm_unpacklo_epi8(high, low), second = _mm_unpackhi_epi8(high, low); /* codes 0-15, 16-31 */
    const __m256i codes = _mm256_setr_m128i(_mm_unpacklo_epi64(first, second), _mm_unpackhi_epi64(first, second));
    const __m256i lo = _mm256_shuffle_epi8(t.low, codes), hi = _mm256_shuffle_epi8(t.high, codes);
    _mm256_storeu_si256((__m256i *)o, _mm256_unpacklo_epi8(lo, hi));
    _mm256_storeu_si256((__m256i *)(o + 16), _mm256_unpackhi_epi8(lo, hi));
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
#elif defined(PEFTKIT_AVX2)
        const table16_f32 table = scaled_table(values, scale);
        if (out_bf16) {
            const table16_bf16 table16 = rounded_table(table);
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
