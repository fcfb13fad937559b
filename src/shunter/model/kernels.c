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
#include <stdlib.h>
#include <string.h>

#define TILE_ROWS 4      /* a tile: 4 rows x up to 2 tokens, 8 accumulators within AVX2's 16 registers */
#define TILE_TOKENS 2
#define PREFETCH_ROWS 8  /* how many rows ahead a tile prefetches its weights (measured: 8-64 alike) */

/* Runs TILE(n0, t0, R, T) over every tile of n_out rows by `tokens` tokens, the rows split across
   OpenMP threads. R and T are literals at each call, so every call inlines a tile with constant
   bounds. */
#define FOR_EACH_TILE(n_out, tokens, TILE)                                              \
    _Pragma("omp parallel for schedule(static)") for (long n0_ = 0; n0_ < (n_out); n0_ += TILE_ROWS) { \
        long rows_ = (n_out) - n0_ < TILE_ROWS ? (n_out) - n0_ : TILE_ROWS;             \
        for (long t0_ = 0; t0_ < (tokens); t0_ += TILE_TOKENS) {                        \
            int pair_ = (tokens) - t0_ >= 2;                                            \
            if (rows_ == TILE_ROWS && pair_)                                            \
                TILE(n0_, t0_, TILE_ROWS, 2);                                           \
            else if (rows_ == TILE_ROWS)                                                \
                TILE(n0_, t0_, TILE_ROWS, 1);                                           \
            else                                                                        \
                for (long r_ = n0_; r_ < n0_ + rows_; ++r_) {                           \
                    if (pair_)                                                          \
                        TILE(r_, t0_, 1, 2);                                            \
                    else                                                                \
                        TILE(r_, t0_, 1, 1);                                            \
                }                                                                       \
        }                                                                               \
    }

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

/* One tile of R rows by T tokens, R and T constants once inlined (see q4_tile below). */
static inline __attribute__((always_inline)) void bf16_tile(const float *x, const uint16_t *w, float *y, long n0,
                                                            long t0, long n_out, long k_in, const int R,
                                                            const int T) {
    __m256 acc[TILE_ROWS][TILE_TOKENS];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    for (long k = 0; k < k_in; k += 8) {
        __m256 wv[TILE_ROWS];
        for (int r = 0; r < R; ++r) {
            if ((k & 31) == 0)
                _mm_prefetch((const char *)(w + (n0 + r + PREFETCH_ROWS) * k_in + k), _MM_HINT_T0);
            wv[r] = load_bf16x8(w + (n0 + r) * k_in + k);
        }
        for (int t = 0; t < T; ++t) {
            __m256 xv = _mm256_loadu_ps(x + (t0 + t) * k_in + k);
            for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) y[(t0 + t) * n_out + n0 + r] = hsum8(acc[r][t]);
}

void linear_bf16(const float *x, const uint16_t *w, float *y, long tokens, long n_out, long k_in) {
#define TILE(n0, t0, R, T) bf16_tile(x, w, y, n0, t0, n_out, k_in, R, T)
    FOR_EACH_TILE(n_out, tokens, TILE);
#undef TILE
}

/* x quantised for the integer products, as llama.cpp quantises activations: per block of 32
   inputs, xq = round(x / d) with d = max|x| / 127; *d is the block's scale. */
static void quantize_block(const float *xb, int8_t *xq, float *d) {
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
    float scale = amax / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    *d = scale;
    for (int i = 0; i < 32; ++i) xq[i] = (int8_t)lrintf(xb[i] * inv);
}

/* 32 products of unsigned by signed bytes, summed in fours into 8 int32 lanes, as floats */
static inline __m256 dot_u8_i8(__m256i u, __m256i s) {
    __m256i pairs = _mm256_maddubs_epi16(u, s);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

/* One tile of R rows by T tokens of the 8-bit product (see q4_tile below): each block of 32
   products scaled once by x's block scale times the row's group scale into one accumulator. */
static inline __attribute__((always_inline)) void q8_tile(const int8_t *xq, const float *x_scale, const int8_t *q,
                                                          const uint16_t *scale, float *y, long n0, long t0,
                                                          long n_out, long k_in, long group, const int R,
                                                          const int T) {
    long groups = k_in / group, blocks = k_in / 32, per_group = group / 32;
    __m256 acc[TILE_ROWS][TILE_TOKENS];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    for (long g = 0; g < groups; ++g) {
        float s[TILE_ROWS];
        for (int r = 0; r < R; ++r) s[r] = _cvtsh_ss(scale[(n0 + r) * groups + g]);
        for (long b = g * per_group; b < (g + 1) * per_group; ++b) {
            __m256i w[TILE_ROWS], w_abs[TILE_ROWS];
            for (int r = 0; r < R; ++r) {
                if ((b & 1) == 0)
                    _mm_prefetch((const char *)(q + (n0 + r + PREFETCH_ROWS) * k_in + 32 * b), _MM_HINT_T0);
                w[r] = _mm256_loadu_si256((const __m256i *)(q + (n0 + r) * k_in + 32 * b));
                w_abs[r] = _mm256_sign_epi8(w[r], w[r]);
            }
            for (int t = 0; t < T; ++t) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (t0 + t) * k_in + 32 * b));
                float dx = x_scale[(t0 + t) * blocks + b];
                for (int r = 0; r < R; ++r)
                    acc[r][t] = _mm256_fmadd_ps(dot_u8_i8(w_abs[r], _mm256_sign_epi8(xv, w[r])),
                                                _mm256_set1_ps(dx * s[r]), acc[r][t]);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) y[(t0 + t) * n_out + n0 + r] = hsum8(acc[r][t]);
}

static void q8_product(const int8_t *xq, const float *x_scale, const int8_t *q, const uint16_t *scale, float *y,
                       long tokens, long n_out, long k_in, long group) {
#define TILE(n0, t0, R, T) q8_tile(xq, x_scale, q, scale, y, n0, t0, n_out, k_in, group, R, T)
    FOR_EACH_TILE(n_out, tokens, TILE);
#undef TILE
}

/* The 4-bit product reads x rounded per block of 32 inputs in input order (as the 8-bit one
   does); x_group_sum[t, g] is the exact sum of token t's inputs in group g (the min's term).
   The packed bytes unpack into such blocks directly: a group of 32 is 16 bytes whose low nibbles
   are inputs 0-15 and high nibbles 16-31; in a group of G >= 64 (a multiple of 64), byte j holds
   inputs j and j + G/2, so 32 bytes at offset 32c give the blocks of inputs 32c.. (low nibbles)
   and G/2 + 32c.. (high): one load and three ops for 64 weights.

   One tile is R rows by T tokens; R and T are constants once inlined, so the compiler unrolls
   the loops and keeps the R x T accumulators in registers (with a runtime bound they lived in
   memory). Each block of 32 products is scaled once by x's block scale times the row's group
   scale (as llama.cpp does) into one accumulator per row and token, summed across lanes once at
   the end; four independent rows keep the FMA pipeline full at one token, where two rows left it
   waiting on each sum's latency. A (row, token) pair is computed by the same operations in the
   same order whatever tile it falls in, so a token gets the same numbers alone or in a batch. */
static inline __attribute__((always_inline)) void q4_tile(
    const int8_t *xq, const float *x_scale, const float *x_group_sum, const uint8_t *q, const uint16_t *scale,
    const uint16_t *offset, float *y, long n0, long t0, long n_out, long k_in, long group, const int R,
    const int T) {
    long groups = k_in / group, blocks = k_in / 32, row_bytes = k_in / 2, per_group = group / 32;
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    const __m256i low_mask32 = _mm256_set1_epi8(0x0F);
    __m256 acc[TILE_ROWS][TILE_TOKENS];
    float min_sum[TILE_ROWS][TILE_TOKENS];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) {
            acc[r][t] = _mm256_setzero_ps();
            min_sum[r][t] = 0.0f;
        }
    for (long g = 0; g < groups; ++g) {
        float s[TILE_ROWS];
        for (int r = 0; r < R; ++r) {
            if ((g & 15) == 0) {
                _mm_prefetch((const char *)(scale + (n0 + r + PREFETCH_ROWS) * groups + g), _MM_HINT_T0);
                _mm_prefetch((const char *)(offset + (n0 + r + PREFETCH_ROWS) * groups + g), _MM_HINT_T0);
            }
            s[r] = _cvtsh_ss(scale[(n0 + r) * groups + g]);
            float o = _cvtsh_ss(offset[(n0 + r) * groups + g]);
            for (int t = 0; t < T; ++t) min_sum[r][t] += o * x_group_sum[(t0 + t) * groups + g];
        }
        long first = g * per_group; /* the group's first block of 32 inputs */
        if (group == 32) {
            __m256i w[TILE_ROWS];
            for (int r = 0; r < R; ++r) {
                if ((g & 3) == 0)
                    _mm_prefetch((const char *)(q + (n0 + r + PREFETCH_ROWS) * row_bytes + 16 * g), _MM_HINT_T0);
                __m128i bytes = _mm_loadu_si128((const __m128i *)(q + (n0 + r) * row_bytes + 16 * g));
                __m128i lo = _mm_and_si128(bytes, low_mask);
                __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
                w[r] = _mm256_set_m128i(hi, lo);
            }
            for (int t = 0; t < T; ++t) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (t0 + t) * k_in + 32 * first));
                float dx = x_scale[(t0 + t) * blocks + first];
                for (int r = 0; r < R; ++r)
                    acc[r][t] = _mm256_fmadd_ps(dot_u8_i8(w[r], xv), _mm256_set1_ps(dx * s[r]), acc[r][t]);
            }
            continue;
        }
        for (long c = 0; c < per_group / 2; ++c) {
            long lo_block = first + c, hi_block = first + per_group / 2 + c;
            __m256i x_lo[TILE_TOKENS], x_hi[TILE_TOKENS];
            float d_lo[TILE_TOKENS], d_hi[TILE_TOKENS];
            for (int t = 0; t < T; ++t) {
                const int8_t *xt = xq + (t0 + t) * k_in;
                x_lo[t] = _mm256_loadu_si256((const __m256i *)(xt + 32 * lo_block));
                x_hi[t] = _mm256_loadu_si256((const __m256i *)(xt + 32 * hi_block));
                d_lo[t] = x_scale[(t0 + t) * blocks + lo_block];
                d_hi[t] = x_scale[(t0 + t) * blocks + hi_block];
            }
            for (int r = 0; r < R; ++r) {
                const uint8_t *p = q + (n0 + r) * row_bytes + g * (group / 2) + 32 * c;
                _mm_prefetch((const char *)(p + PREFETCH_ROWS * row_bytes), _MM_HINT_T0);
                __m256i bytes = _mm256_loadu_si256((const __m256i *)p);
                __m256i w_lo = _mm256_and_si256(bytes, low_mask32);
                __m256i w_hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_mask32);
                for (int t = 0; t < T; ++t) {
                    acc[r][t] = _mm256_fmadd_ps(dot_u8_i8(w_lo, x_lo[t]), _mm256_set1_ps(d_lo[t] * s[r]), acc[r][t]);
                    acc[r][t] = _mm256_fmadd_ps(dot_u8_i8(w_hi, x_hi[t]), _mm256_set1_ps(d_hi[t] * s[r]), acc[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) y[(t0 + t) * n_out + n0 + r] = hsum8(acc[r][t]) + min_sum[r][t];
}

static void q4_product(const int8_t *xq, const float *x_scale, const float *x_group_sum, const uint8_t *q,
                       const uint16_t *scale, const uint16_t *offset, float *y, long tokens, long n_out,
                       long k_in, long group) {
#define TILE(n0, t0, R, T) q4_tile(xq, x_scale, x_group_sum, q, scale, offset, y, n0, t0, n_out, k_in, group, R, T)
    FOR_EACH_TILE(n_out, tokens, TILE);
#undef TILE
}

/* x fp32 [tokens, k_in] rounded as the integer products read it (quantize_block per 32 inputs)
   into scratch malloc'd here; the caller frees both. 0 when an allocation fails (nothing held). */
static int rounded_x(const float *x, long tokens, long k_in, int8_t **xq, float **x_scale) {
    long blocks = tokens * (k_in / 32);
    *xq = malloc(tokens * k_in);
    *x_scale = malloc(blocks * sizeof(float));
    if (!*xq || !*x_scale) {
        free(*xq);
        free(*x_scale);
        return 0;
    }
#pragma omp parallel for schedule(static) if (blocks > 4096)
    for (long b = 0; b < blocks; ++b) quantize_block(x + 32 * b, *xq + 32 * b, *x_scale + b);
    return 1;
}

/* The entry points: x fp32 [tokens, k_in], rounded here (one call per product: preparing x in
   torch cost about a dozen tensor ops, 15 us a call, which at one token was most of a small
   product's time). A failed allocation returns 1 (y untouched). */
int linear_q8(const float *x, const int8_t *q, const uint16_t *scale, float *y, long tokens, long n_out, long k_in,
              long group) {
    int8_t *xq;
    float *x_scale;
    if (!rounded_x(x, tokens, k_in, &xq, &x_scale)) return 1;
    q8_product(xq, x_scale, q, scale, y, tokens, n_out, k_in, group);
    free(xq);
    free(x_scale);
    return 0;
}

/* As linear_q8, for the 4-bit format (x rounded per block of 32 in input order, as there), with
   each group's exact sum of x for the min's term. A group size of 32 or a multiple of 64. */
int linear_q4(const float *x, const uint8_t *q, const uint16_t *scale, const uint16_t *offset, float *y, long tokens,
              long n_out, long k_in, long group) {
    long groups = k_in / group;
    int8_t *xq;
    float *x_scale;
    float *x_group_sum = malloc(tokens * groups * sizeof(float));
    if (!x_group_sum) return 1;
    if (!rounded_x(x, tokens, k_in, &xq, &x_scale)) {
        free(x_group_sum);
        return 1;
    }
    for (long tg = 0; tg < tokens * groups; ++tg) {
        const float *xg = x + tg * group; /* token t's group g: rows are k_in = groups * group long */
        float sum = 0.0f;
        for (long i = 0; i < group; ++i) sum += xg[i];
        x_group_sum[tg] = sum;
    }
    q4_product(xq, x_scale, x_group_sum, q, scale, offset, y, tokens, n_out, k_in, group);
    free(xq);
    free(x_scale);
    free(x_group_sum);
    return 0;
}
