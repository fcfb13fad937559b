/* Matrix-vector products for decode on x86-64 CPUs with AVX2 + FMA + F16C.

   y[t, n] = sum_k x[t, k] * W[n, k] for a few tokens t (decode: one to a few per expert), where W
   is stored as bf16, or in shunter.model.quant's format: 8-bit integers with one fp16 scale per
   group of `group` inputs (W = q * scale), or 4-bit integers with an fp16 scale and min per group
   (W = q * scale + min; byte j of a group holds input j in its low nibble, j + group/2 in its
   high).

   A decode step reads every weight once, so these run at memory speed only if converting a
   weight costs less than loading it: torch's own bf16 and int8/int4 products on AVX2-only CPUs
   are compute-bound (measured). The integer products quantise x to 8 bits per block of 32, as
   llama.cpp does, and multiply bytes (maddubs): four times the work per instruction of floats.
   Rows are split across OpenMP threads; each thread keeps a block of rows in cache while it
   walks the tokens. x and y are fp32, row-major and contiguous; K is a multiple of the group
   (and of 32). Built at first use by shunter.model.kernels; the reference is dequantise-then-
   matmul in torch (tested against this). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define ROWS 2    /* rows per block: 2 rows x 4 tokens = 8 accumulators, within AVX2's 16 registers */
#define TOKENS 4  /* tokens per pass over a row block */

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 load_bf16x8(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __m256 load_i8x8(const int8_t *p) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

void linear_bf16(const float *x, const uint16_t *w, float *y, long tokens, long n_out, long k_in) {
#pragma omp parallel for schedule(static)
    for (long n0 = 0; n0 < n_out; n0 += ROWS) {
        long rows = n_out - n0 < ROWS ? n_out - n0 : ROWS;
        for (long t0 = 0; t0 < tokens; t0 += TOKENS) {
            long ts = tokens - t0 < TOKENS ? tokens - t0 : TOKENS;
            __m256 acc[ROWS][TOKENS];
            for (int r = 0; r < ROWS; ++r)
                for (int t = 0; t < TOKENS; ++t) acc[r][t] = _mm256_setzero_ps();
            for (long k = 0; k < k_in; k += 8) {
                __m256 wv[ROWS];
                for (int r = 0; r < rows; ++r) wv[r] = load_bf16x8(w + (n0 + r) * k_in + k);
                for (int t = 0; t < ts; ++t) {
                    __m256 xv = _mm256_loadu_ps(x + (t0 + t) * k_in + k);
                    for (int r = 0; r < rows; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
                }
            }
            for (int r = 0; r < rows; ++r)
                for (int t = 0; t < ts; ++t) y[(t0 + t) * n_out + n0 + r] = hsum8(acc[r][t]);
        }
    }
}

/* x quantised for the integer products, as llama.cpp quantises activations: per block of 32
   inputs, xq = round(x / d) with d = max|x| / 127. x_scale[t, b] is token t's d of block b. */
void quantize_rows(const float *x, int8_t *xq, float *x_scale, long tokens, long k_in) {
    long blocks = tokens * (k_in / 32);
    for (long b = 0; b < blocks; ++b) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int i = 0; i < 32; ++i) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
        float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        x_scale[b] = d;
        for (int i = 0; i < 32; ++i) xq[32 * b + i] = (int8_t)lrintf(xb[i] * inv);
    }
}

/* 32 products of unsigned by signed bytes, summed in fours into 8 int32 lanes, as floats */
static inline __m256 dot_u8_i8(__m256i u, __m256i s) {
    __m256i pairs = _mm256_maddubs_epi16(u, s);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

void linear_q8(const int8_t *xq, const float *x_scale, const int8_t *q, const uint16_t *scale, float *y,
               long tokens, long n_out, long k_in, long group) {
    long groups = k_in / group, blocks = k_in / 32;
#pragma omp parallel for schedule(static)
    for (long n0 = 0; n0 < n_out; n0 += ROWS) {
        long rows = n_out - n0 < ROWS ? n_out - n0 : ROWS;
        for (long t0 = 0; t0 < tokens; t0 += TOKENS) {
            long ts = tokens - t0 < TOKENS ? tokens - t0 : TOKENS;
            __m256 acc[ROWS][TOKENS];
            for (int r = 0; r < ROWS; ++r)
                for (int t = 0; t < TOKENS; ++t) acc[r][t] = _mm256_setzero_ps();
            for (long g = 0; g < groups; ++g) {
                __m256 part[ROWS][TOKENS];
                for (int r = 0; r < ROWS; ++r)
                    for (int t = 0; t < TOKENS; ++t) part[r][t] = _mm256_setzero_ps();
                for (long k = g * group; k < (g + 1) * group; k += 32) {
                    __m256i w[ROWS], w_abs[ROWS];
                    for (int r = 0; r < rows; ++r) {
                        w[r] = _mm256_loadu_si256((const __m256i *)(q + (n0 + r) * k_in + k));
                        w_abs[r] = _mm256_sign_epi8(w[r], w[r]);
                    }
                    for (int t = 0; t < ts; ++t) {
                        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (t0 + t) * k_in + k));
                        __m256 d = _mm256_set1_ps(x_scale[(t0 + t) * blocks + k / 32]);
                        for (int r = 0; r < rows; ++r)
                            part[r][t] = _mm256_fmadd_ps(dot_u8_i8(w_abs[r], _mm256_sign_epi8(xv, w[r])), d,
                                                         part[r][t]);
                    }
                }
                for (int r = 0; r < rows; ++r) {
                    __m256 s = _mm256_set1_ps(_cvtsh_ss(scale[(n0 + r) * groups + g]));
                    for (int t = 0; t < ts; ++t) acc[r][t] = _mm256_fmadd_ps(part[r][t], s, acc[r][t]);
                }
            }
            for (int r = 0; r < rows; ++r)
                for (int t = 0; t < ts; ++t) y[(t0 + t) * n_out + n0 + r] = hsum8(acc[r][t]);
        }
    }
}

/* xq and x_scale quantise each token's inputs reordered in the order the packed bytes unpack in:
   16 bytes at a time, their low nibbles (inputs i..i+15 of the group) then their high nibbles
   (inputs i+group/2..). x_group_sum[t, g] is the exact sum of token t's inputs in group g (the
   min's term). */
void linear_q4(const int8_t *xq, const float *x_scale, const float *x_group_sum, const uint8_t *q,
               const uint16_t *scale, const uint16_t *offset, float *y, long tokens, long n_out,
               long k_in, long group) {
    long groups = k_in / group, blocks = k_in / 32, row_bytes = k_in / 2;
    const __m128i low_mask = _mm_set1_epi8(0x0F);
#pragma omp parallel for schedule(static)
    for (long n0 = 0; n0 < n_out; n0 += ROWS) {
        long rows = n_out - n0 < ROWS ? n_out - n0 : ROWS;
        for (long t0 = 0; t0 < tokens; t0 += TOKENS) {
            long ts = tokens - t0 < TOKENS ? tokens - t0 : TOKENS;
            float sums[ROWS][TOKENS];
            memset(sums, 0, sizeof(sums));
            for (long g = 0; g < groups; ++g) {
                __m256 part[ROWS][TOKENS];
                for (int r = 0; r < ROWS; ++r)
                    for (int t = 0; t < TOKENS; ++t) part[r][t] = _mm256_setzero_ps();
                for (long k = g * group; k < (g + 1) * group; k += 32) {
                    __m256i w[ROWS];
                    for (int r = 0; r < rows; ++r) {
                        __m128i b = _mm_loadu_si128((const __m128i *)(q + (n0 + r) * row_bytes + k / 2));
                        __m128i lo = _mm_and_si128(b, low_mask);
                        __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low_mask);
                        w[r] = _mm256_set_m128i(hi, lo);
                    }
                    for (int t = 0; t < ts; ++t) {
                        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (t0 + t) * k_in + k));
                        __m256 d = _mm256_set1_ps(x_scale[(t0 + t) * blocks + k / 32]);
                        for (int r = 0; r < rows; ++r)
                            part[r][t] = _mm256_fmadd_ps(dot_u8_i8(w[r], xv), d, part[r][t]);
                    }
                }
                for (int r = 0; r < rows; ++r) {
                    float s = _cvtsh_ss(scale[(n0 + r) * groups + g]);
                    float o = _cvtsh_ss(offset[(n0 + r) * groups + g]);
                    for (int t = 0; t < ts; ++t)
                        sums[r][t] += s * hsum8(part[r][t]) + o * x_group_sum[(t0 + t) * groups + g];
                }
            }
            for (int r = 0; r < rows; ++r)
                for (int t = 0; t < ts; ++t) y[(t0 + t) * n_out + n0 + r] = sums[r][t];
        }
    }
}
