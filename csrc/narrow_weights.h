/* Products of 8- and 16-bit weights with float32 vectors (fastlstm.quantize): each weight is widened to
   float32 as it is loaded and every sum is float32, so only the bytes streamed per step shrink.

   Four rows at a time share each load of x, as dot_rows in blas.pxd does, and each group of four rows is
   taken by every batch row in turn, so its weights come from memory once. The sum of a row segment is
   written once per instruction-set level: AVX-512 (16 lanes) and AVX2+FMA (8 lanes) with one widening load
   per vector of weights (sign- or zero-extend, then convert or shift), and for any other target a plain
   loop that gcc vectorises with its own widening conversions (SSE2: unpack and shift). Whichever the build
   targets is compiled; nothing assumes a level the compiler was not told of.

   int8: row r of the matrix holds integers q with w[r, k] = scale[r] * q[r, k], where a gate row's input and
   recurrent blocks have scales of their own; each block's scale multiplies its finished sum. bfloat16: each weight is the upper half of a float32's bits, widened by a 16-bit shift. */
#ifndef FASTLSTM_NARROW_WEIGHTS_H
#define FASTLSTM_NARROW_WEIGHTS_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

static inline float fastlstm_bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

/* Four rows' sums over k < n: s_i = sum_k widen(r_i[k]) * x[k]. The vector paths take whole vectors, then
   the plain loop finishes the tail (none in the kernels' padded layout). */
#if defined(__AVX512F__)
#define FASTLSTM_NARROW_LANES 16
typedef __m512 fastlstm_vec;
#define FASTLSTM_WIDEN_INT8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p))))
#define FASTLSTM_WIDEN_BF16(p) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(p))), 16))
#define FASTLSTM_LOAD(p) _mm512_loadu_ps(p)
#define FASTLSTM_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define FASTLSTM_ZERO() _mm512_setzero_ps()
#define FASTLSTM_SUM(v) _mm512_reduce_add_ps(v)
#elif defined(__AVX2__) && defined(__FMA__)
#define FASTLSTM_NARROW_LANES 8
typedef __m256 fastlstm_vec;
#define FASTLSTM_WIDEN_INT8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p))))
#define FASTLSTM_WIDEN_BF16(p) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p))), 16))
#define FASTLSTM_LOAD(p) _mm256_loadu_ps(p)
#define FASTLSTM_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define FASTLSTM_ZERO() _mm256_setzero_ps()
static inline float fastlstm_sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define FASTLSTM_SUM(v) fastlstm_sum8(v)
#endif

#ifdef FASTLSTM_NARROW_LANES
#define FASTLSTM_SUMS4(WIDEN)                                                                              \
    fastlstm_vec a0 = FASTLSTM_ZERO(), a1 = FASTLSTM_ZERO(), a2 = FASTLSTM_ZERO(), a3 = FASTLSTM_ZERO();   \
    for (; k + FASTLSTM_NARROW_LANES <= n; k += FASTLSTM_NARROW_LANES) {                                    \
        fastlstm_vec xv = FASTLSTM_LOAD(x + k);                                                            \
        a0 = FASTLSTM_FMA(WIDEN(r0 + k), xv, a0);                                                          \
        a1 = FASTLSTM_FMA(WIDEN(r1 + k), xv, a1);                                                          \
        a2 = FASTLSTM_FMA(WIDEN(r2 + k), xv, a2);                                                          \
        a3 = FASTLSTM_FMA(WIDEN(r3 + k), xv, a3);                                                          \
    }                                                                                                      \
    t0 = FASTLSTM_SUM(a0); t1 = FASTLSTM_SUM(a1); t2 = FASTLSTM_SUM(a2); t3 = FASTLSTM_SUM(a3);
#else
#define FASTLSTM_SUMS4(WIDEN)
#endif

static inline void fastlstm_int8_sums4(const int8_t* r0, const int8_t* r1, const int8_t* r2, const int8_t* r3,
                                       const float* x, long n, float* s0, float* s1, float* s2, float* s3) {
    float t0 = 0, t1 = 0, t2 = 0, t3 = 0;
    long k = 0;
    FASTLSTM_SUMS4(FASTLSTM_WIDEN_INT8)
    for (; k < n; k++) {
        float xv = x[k];
        t0 += (float)r0[k] * xv;
        t1 += (float)r1[k] * xv;
        t2 += (float)r2[k] * xv;
        t3 += (float)r3[k] * xv;
    }
    *s0 = t0; *s1 = t1; *s2 = t2; *s3 = t3;
}

static inline void fastlstm_bf16_sums4(const uint16_t* r0, const uint16_t* r1, const uint16_t* r2,
                                       const uint16_t* r3, const float* x, long n, float* s0, float* s1,
                                       float* s2, float* s3) {
    float t0 = 0, t1 = 0, t2 = 0, t3 = 0;
    long k = 0;
    FASTLSTM_SUMS4(FASTLSTM_WIDEN_BF16)
    for (; k < n; k++) {
        float xv = x[k];
        t0 += fastlstm_bf16_to_float(r0[k]) * xv;
        t1 += fastlstm_bf16_to_float(r1[k]) * xv;
        t2 += fastlstm_bf16_to_float(r2[k]) * xv;
        t3 += fastlstm_bf16_to_float(r3[k]) * xv;
    }
    *s0 = t0; *s1 = t1; *s2 = t2; *s3 = t3;
}

/* y[b*ldy + r] = scale_in[r] * sum_{k < split} q[r*ldq + k] * x[b*ldx + k]
                + scale_rec[r] * sum_{split <= k < n} q[r*ldq + k] * x[b*ldx + k], for r < rows, b < batch:
   a row whose two blocks (a gate row's input and recurrent weights) have scales of their own, in one pass
   along each row. A scale whose block is empty is not read (it may be NULL). */
static void fastlstm_dot_rows_int8(const int8_t* q, long ldq, long rows, const float* scale_in,
                                   const float* scale_rec, long split, const float* x, long ldx, long batch,
                                   long n, float* y, long ldy) {
    long r = 0, b, k;
    for (; r + 4 <= rows; r += 4) {
        const int8_t* r0 = q + r * ldq;
        const int8_t* r1 = r0 + ldq;
        const int8_t* r2 = r1 + ldq;
        const int8_t* r3 = r2 + ldq;
        for (b = 0; b < batch; b++) {
            const float* xb = x + b * ldx;
            float i0 = 0, i1 = 0, i2 = 0, i3 = 0, h0 = 0, h1 = 0, h2 = 0, h3 = 0;
            float* yb = y + b * ldy + r;
            if (split > 0) {
                fastlstm_int8_sums4(r0, r1, r2, r3, xb, split, &i0, &i1, &i2, &i3);
                i0 *= scale_in[r]; i1 *= scale_in[r + 1]; i2 *= scale_in[r + 2]; i3 *= scale_in[r + 3];
            }
            if (split < n) {
                fastlstm_int8_sums4(r0 + split, r1 + split, r2 + split, r3 + split, xb + split, n - split,
                                    &h0, &h1, &h2, &h3);
                h0 *= scale_rec[r]; h1 *= scale_rec[r + 1]; h2 *= scale_rec[r + 2]; h3 *= scale_rec[r + 3];
            }
            yb[0] = i0 + h0; yb[1] = i1 + h1; yb[2] = i2 + h2; yb[3] = i3 + h3;
        }
    }
    for (; r < rows; r++) {
        const int8_t* r0 = q + r * ldq;
        for (b = 0; b < batch; b++) {
            const float* xb = x + b * ldx;
            float s_in = 0, s_rec = 0;
            for (k = 0; k < split; k++)
                s_in += (float)r0[k] * xb[k];
            for (k = split; k < n; k++)
                s_rec += (float)r0[k] * xb[k];
            y[b * ldy + r] = (split > 0 ? scale_in[r] * s_in : 0.0f) + (split < n ? scale_rec[r] * s_rec : 0.0f);
        }
    }
}

/* y[b*ldy + r] = sum_k bf16(w[r*ldw + k]) * x[b*ldx + k], for r < rows, b < batch, k < n. */
static void fastlstm_dot_rows_bf16(const uint16_t* w, long ldw, long rows, const float* x, long ldx,
                                   long batch, long n, float* y, long ldy) {
    long r = 0, b, k;
    for (; r + 4 <= rows; r += 4) {
        const uint16_t* r0 = w + r * ldw;
        const uint16_t* r1 = r0 + ldw;
        const uint16_t* r2 = r1 + ldw;
        const uint16_t* r3 = r2 + ldw;
        for (b = 0; b < batch; b++) {
            const float* xb = x + b * ldx;
            float s0, s1, s2, s3;
            fastlstm_bf16_sums4(r0, r1, r2, r3, xb, n, &s0, &s1, &s2, &s3);
            float* yb = y + b * ldy + r;
            yb[0] = s0; yb[1] = s1; yb[2] = s2; yb[3] = s3;
        }
    }
    for (; r < rows; r++) {
        const uint16_t* r0 = w + r * ldw;
        for (b = 0; b < batch; b++) {
            const float* xb = x + b * ldx;
            float s0 = 0;
            for (k = 0; k < n; k++)
                s0 += fastlstm_bf16_to_float(r0[k]) * xb[k];
            y[b * ldy + r] = s0;
        }
    }
}

#endif
