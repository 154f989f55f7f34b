/* The exported LLaMA decoder's int4 graph (valley_rt/export/llm_onnx.py), on AVX-512 VNNI CPUs: one
 * decode step (vrt_decode_step) or an append of many tokens (vrt_prefill).
 *
 * It computes what llm.onnx computes for the appended tokens: RMSNorms, the int4 linears (ONNX
 * Runtime's MatMulNBits layout and math at accuracy level 4: activations quantized to int8 per block,
 * int32 dot products), rotary + KV append + grouped-query attention in fp32 over the caller's cache,
 * SiLU-gated MLP, and the int8/int4 vocabulary projection of the last token. The weights are the
 * graph's own initializers, read in place from the memory-mapped data file.
 *
 * Why a kernel of its own: a decode step streams every weight once, so its speed is the rate at which
 * one core can keep loads in flight. The GEMV below prefetches PREFETCH_BYTES ahead of its loads, which
 * lets each core stream the int4 weights at about its plain read rate (benchmarks/bench_native_decode.py
 * measures it against the int4 graph and the read bandwidth).
 *
 * Layouts (MatMulNBits): B [n][blocks][bs * bits / 8] uint8, 4-bit codes two per byte, low nibble =
 * even k; scales [n][blocks] fp32; zero points 4-bit [n][(blocks + 1) / 2] (low nibble first) or
 * 8-bit [n][blocks]. K/V cache: per layer [kv_heads][slots][head_dim] fp32.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VRT_SIMD
#include "native_common.h"

#define PREFETCH_BYTES 4096

typedef struct {
    const uint8_t *b;
    const float *scales;
    const uint8_t *zp;
    int64_t n, k;
    int32_t bits, bs;
} vrt_linear;

typedef struct {
    const float *ln1, *ln2;
    vrt_linear qkv, o, gate_up, down;
} vrt_layer;

typedef struct {
    int32_t layers, hidden, heads, kv_heads, head_dim, inter, vocab, threads;
    float eps, scale;
    const float *cos, *sin; /* [max_pos][head_dim / 2] */
    int64_t max_pos;
    const float *final_norm;
    vrt_linear lm_head;
    const vrt_layer *layer;
    int32_t amx; /* 1: prompt appends on the AMX-INT8 tiles (the caller holds the permission) */
} vrt_model;

/* ---------------------------------------------------------------------------------------- helpers */

static inline int64_t nblocks(const vrt_linear *L) { return (L->k + L->bs - 1) / L->bs; }

/* Elements one 64-byte load of B holds: 128 4-bit codes or 64 8-bit ones. */
static inline int64_t chunk_elems(const vrt_linear *L) { return L->bits == 4 ? 128 : 64; }

/* Padded activation length: whole blocks, then whole chunks. */
static inline int64_t padded_k(const vrt_linear *L) {
    int64_t kp = nblocks(L) * L->bs, ce = chunk_elems(L);
    return (kp + ce - 1) / ce * ce;
}



static void rmsnorm(const float *x, const float *w, float *y, int64_t n, float eps) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __m512 v = _mm512_maskz_loadu_ps(tail16(n - i), x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)n + eps);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = tail16(n - i);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_set1_ps(inv));
        _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + i)));
    }
}

/* x [k] -> int8 codes per block of bs (scale = absmax / 127, round to nearest even), zero-padded to
 * padded_k; for 4-bit weights each 128-element chunk is reordered as its 64 even then 64 odd elements,
 * to meet the low / high nibbles of one 64-byte load. sx: block scales; sumx: block sums of the codes. */
static void quantize(const vrt_linear *L, const float *x, int8_t *q, float *sx, int32_t *sumx, int8_t *tmp) {
    int64_t nb = nblocks(L), kp = padded_k(L), bs = L->bs;
    int8_t *dst = L->bits == 4 ? tmp : q;
    memset(dst, 0, (size_t)kp);
    for (int64_t b = 0; b < nb; b++) {
        int64_t lo = b * bs, hi = lo + bs < L->k ? lo + bs : L->k;
        float amax = 0.0f;
        for (int64_t i = lo; i < hi; i++) amax = fmaxf(amax, fabsf(x[i]));
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t s = 0;
        for (int64_t i = lo; i < hi; i++) {
            int32_t v = (int32_t)nearbyintf(x[i] * inv);
            v = v > 127 ? 127 : (v < -127 ? -127 : v);
            dst[i] = (int8_t)v;
            s += v;
        }
        sx[b] = amax / 127.0f;
        sumx[b] = s;
    }
    if (L->bits == 4)
        for (int64_t c = 0; c < kp; c += 128)
            for (int64_t j = 0; j < 64; j++) {
                q[c + j] = tmp[c + 2 * j];
                q[c + 64 + j] = tmp[c + 2 * j + 1];
            }
}

/* gemv for the common case, 4-bit codes in blocks of 128 (one 64-byte load per block), K a multiple
 * of 128: no tails, the scale products and the zero-point term vectorized per row. */
static void gemv4_128(const vrt_linear *L, const int8_t *q, const float *sx, const int32_t *sumx, float *y, int threads) {
    const int64_t nb = L->k / 128, rowbytes = nb * 64, zrow = (nb + 1) / 2;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < L->n; r++) {
        const uint8_t *w = L->b + r * rowbytes;
        const float *sw = L->scales + r * nb;
        const uint8_t *zr = L->zp + r * zrow;
        float s[nb];
        __m512 zacc = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b += 16) {
            __mmask16 m = tail16(nb - b);
            __m512 sv = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sw + b), _mm512_maskz_loadu_ps(m, sx + b));
            _mm512_mask_storeu_ps(s + b, m, sv);
            /* zero points of blocks b..b+15: 8 bytes, two nibbles each */
            const int64_t cnt = nb - b < 16 ? nb - b : 16;
            __m128i zb = _mm_maskz_loadu_epi8((__mmask16)((1u << ((cnt + 1) / 2)) - 1), zr + b / 2);
            __m512i z32 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(_mm_and_si128(zb, _mm_set1_epi8(0x0F)),
                                                                 _mm_and_si128(_mm_srli_epi16(zb, 4), _mm_set1_epi8(0x0F))));
            __m512 zs = _mm512_cvtepi32_ps(_mm512_mullo_epi32(z32, _mm512_maskz_loadu_epi32(m, sumx + b)));
            zacc = _mm512_fmadd_ps(_mm512_maskz_mov_ps(m, sv), zs, zacc);
        }
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        int64_t b = 0;
        for (; b + 1 < nb; b += 2) {
            _mm_prefetch((const char *)(w + b * 64 + PREFETCH_BYTES), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + b * 64 + 64 + PREFETCH_BYTES), _MM_HINT_T0);
            __m512i w0 = _mm512_loadu_si512((const void *)(w + b * 64)), w1 = _mm512_loadu_si512((const void *)(w + b * 64 + 64));
            __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w0, low4), _mm512_loadu_si512((const void *)(q + b * 128)));
            __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w1, low4), _mm512_loadu_si512((const void *)(q + b * 128 + 128)));
            d0 = _mm512_dpbusd_epi32(d0, _mm512_and_si512(_mm512_srli_epi16(w0, 4), low4), _mm512_loadu_si512((const void *)(q + b * 128 + 64)));
            d1 = _mm512_dpbusd_epi32(d1, _mm512_and_si512(_mm512_srli_epi16(w1, 4), low4), _mm512_loadu_si512((const void *)(q + b * 128 + 192)));
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(s[b]), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(s[b + 1]), acc1);
        }
        if (b < nb) {
            __m512i w0 = _mm512_loadu_si512((const void *)(w + b * 64));
            __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w0, low4), _mm512_loadu_si512((const void *)(q + b * 128)));
            d0 = _mm512_dpbusd_epi32(d0, _mm512_and_si512(_mm512_srli_epi16(w0, 4), low4), _mm512_loadu_si512((const void *)(q + b * 128 + 64)));
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(s[b]), acc0);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) - _mm512_reduce_add_ps(zacc);
    }
}

/* gemv for 8-bit codes in blocks of 32 or 64 (the int8 vocabulary projection), K a multiple of 64:
 * one 64-byte load spans 64 / bs blocks; scale products and zero-point term vectorized per row. */
static void gemv8(const vrt_linear *L, const int8_t *q, const float *sx, const int32_t *sumx, float *y, int threads) {
    const int64_t nb = L->k / L->bs, rowbytes = L->k, per = 64 / L->bs;
    int32_t idx[16];
    for (int l = 0; l < 16; l++) idx[l] = (int32_t)(l * 4 / L->bs);
    const __m512i lane_block = _mm512_loadu_si512(idx);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < L->n; r++) {
        const uint8_t *w = L->b + r * rowbytes;
        const float *sw = L->scales + r * nb;
        const uint8_t *zr = L->zp + r * nb;
        float s[nb + 16];
        __m512 zacc = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b += 16) {
            __mmask16 m = tail16(nb - b);
            __m512 sv = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sw + b), _mm512_maskz_loadu_ps(m, sx + b));
            _mm512_storeu_ps(s + b, sv);
            __m512i z32 = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, zr + b));
            __m512 zs = _mm512_cvtepi32_ps(_mm512_mullo_epi32(z32, _mm512_maskz_loadu_epi32(m, sumx + b)));
            zacc = _mm512_fmadd_ps(sv, zs, zacc);
        }
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < rowbytes / 64; c++) {
            _mm_prefetch((const char *)(w + c * 64 + PREFETCH_BYTES), _MM_HINT_T0);
            __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512((const void *)(w + c * 64)),
                                            _mm512_loadu_si512((const void *)(q + c * 64)));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_permutexvar_ps(lane_block, _mm512_loadu_ps(s + c * per)), acc);
        }
        y[r] = _mm512_reduce_add_ps(acc) - _mm512_reduce_add_ps(zacc);
    }
}

/* y[r] = sum over blocks of scale_w * scale_x * (codes_w - zero) . codes_x, for every row r. */
static void gemv(const vrt_linear *L, const int8_t *q, const float *sx, const int32_t *sumx, float *y, int threads) {
    const int64_t nb = nblocks(L), ce = chunk_elems(L);
    const int64_t rowbytes = nb * L->bs * L->bits / 8, chunks = (rowbytes + 63) / 64;
    const int64_t lane_elems = L->bits == 4 ? 8 : 4; /* elements of one int32 lane of a 64-byte load */
    const int per_chunk = L->bs < ce ? (int)(ce / L->bs) : 1; /* blocks one load spans */
    int32_t idx[16];
    for (int l = 0; l < 16; l++) idx[l] = L->bs < ce ? (int32_t)(l * lane_elems / L->bs) : 0;
    const __m512i lane_block = _mm512_loadu_si512(idx);
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const int64_t zrow = L->bits == 4 ? (nb + 1) / 2 : nb;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < L->n; r++) {
        const uint8_t *w = L->b + r * rowbytes;
        const float *sw = L->scales + r * nb;
        const uint8_t *zr = L->zp + r * zrow;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; c++) {
            _mm_prefetch((const char *)(w + c * 64 + PREFETCH_BYTES), _MM_HINT_T0);
            int64_t left = rowbytes - c * 64;
            __m512i wv = left >= 64 ? _mm512_loadu_si512((const void *)(w + c * 64))
                                    : _mm512_maskz_loadu_epi8((__mmask64)((1ull << left) - 1), w + c * 64);
            __m512i dot;
            if (L->bits == 4) {
                __m512i lo = _mm512_and_si512(wv, low4), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low4);
                dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)(q + c * 128)));
                dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512((const void *)(q + c * 128 + 64)));
            } else {
                dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512((const void *)(q + c * 64)));
            }
            int64_t b0 = c * ce / L->bs;
            __m512 s;
            if (per_chunk == 1) {
                s = _mm512_set1_ps(sw[b0] * sx[b0]);
            } else {
                int64_t nblk = nb - b0 < per_chunk ? nb - b0 : per_chunk;
                __mmask16 m = (__mmask16)((1u << nblk) - 1);
                __m512 sv = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sw + b0), _mm512_maskz_loadu_ps(m, sx + b0));
                s = _mm512_permutexvar_ps(lane_block, sv);
            }
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc);
        }
        float zterm = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            int32_t z = L->bits == 4 ? (zr[b >> 1] >> ((b & 1) * 4)) & 15 : zr[b];
            zterm += sw[b] * sx[b] * (float)(z * sumx[b]);
        }
        y[r] = _mm512_reduce_add_ps(acc) - zterm;
    }
}

/* Y [m][n] for m rows of activations at once (a prompt): 4-bit codes in blocks of 128, K a multiple of
 * 128. Tiles of 4 weight rows x 4 activation rows keep 16 accumulators in registers; each weight block
 * is unpacked once per tile and used by 4 rows of activations. q: [mp][kp] (mp a multiple of 4, the
 * padding rows zero), sx / sumx: [mp][nb]. */
static int gemm4_128(const vrt_linear *L, int64_t m, const int8_t *q, int64_t kp, const float *sx,
                     const int32_t *sumx, float *y, int threads) {
    const int64_t nb = L->k / 128, rowbytes = nb * 64, zrow = (nb + 1) / 2, mp = (m + 3) / 4 * 4;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    /* the zero points' term of row r and token i: sum over blocks of (sw * zero)[r][b] * (sx * sumx)[i][b] */
    float *xs = (float *)malloc(sizeof(float) * (size_t)(m * nb));
    if (xs == NULL) return -1;
    for (int64_t i = 0; i < m * nb; i++) xs[i] = sx[i] * (float)sumx[i];
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
    for (int64_t n0 = 0; n0 < L->n; n0 += 4) {
        const int nr = L->n - n0 < 4 ? (int)(L->n - n0) : 4;
        const uint8_t *w[4];
        const float *sw[4];
        const uint8_t *zr[4];
        for (int r = 0; r < 4; r++) {
            int64_t row = n0 + (r < nr ? r : 0); /* a missing row repeats row 0; its results are dropped */
            w[r] = L->b + row * rowbytes;
            sw[r] = L->scales + row * nb;
            zr[r] = L->zp + row * zrow;
        }
        float zs[4][nb];
        for (int r = 0; r < 4; r++)
            for (int64_t b = 0; b < nb; b++) zs[r][b] = sw[r][b] * (float)((zr[r][b >> 1] >> ((b & 1) * 4)) & 15);
        for (int64_t m0 = 0; m0 < mp; m0 += 4) {
            __m512 acc[4][4];
            for (int i = 0; i < 4; i++)
                for (int r = 0; r < 4; r++) acc[i][r] = _mm512_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                __m512i lo[4], hi[4];
                for (int r = 0; r < 4; r++) {
                    __m512i wv = _mm512_loadu_si512((const void *)(w[r] + b * 64));
                    lo[r] = _mm512_and_si512(wv, low4);
                    hi[r] = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low4);
                }
                for (int i = 0; i < 4; i++) {
                    const int8_t *qi = q + (m0 + i) * kp + b * 128;
                    __m512i xl = _mm512_loadu_si512((const void *)qi), xh = _mm512_loadu_si512((const void *)(qi + 64));
                    const float si = sx[(m0 + i) * nb + b];
                    for (int r = 0; r < 4; r++) {
                        __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], xl), hi[r], xh);
                        acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(si * sw[r][b]), acc[i][r]);
                    }
                }
            }
            for (int i = 0; i < 4 && m0 + i < m; i++)
                for (int r = 0; r < nr; r++) {
                    __m512 z = _mm512_setzero_ps();
                    for (int64_t b = 0; b < nb; b += 16) {
                        __mmask16 k = tail16(nb - b);
                        z = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, zs[r] + b), _mm512_maskz_loadu_ps(k, xs + (m0 + i) * nb + b), z);
                    }
                    y[(m0 + i) * L->n + n0 + r] = _mm512_reduce_add_ps(acc[i][r]) - _mm512_reduce_add_ps(z);
                }
        }
    }
    free(xs);
    return 0;
}

/* The linears gemv4_128 / gemm4_128 take: 4-bit codes in blocks of 128, K a multiple of 128. */
static inline int blocks_of_128(const vrt_linear *L) { return L->bits == 4 && L->bs == 128 && L->k % 128 == 0; }

/* ------------------------------------------------------------------------ AMX (prompt appends) */

/* A prompt's linears on the CPU's AMX-INT8 tiles (Sapphire Rapids and later), for 4-bit codes in blocks
 * of 128. The weights are the tiles' A operand in their own row order (16 rows x 64 codes: one block's
 * low or high nibbles less the block's zero point, signed, unpacked once per 32 rows and used by every
 * token); the activations are the B operand, quantized per token and block as `quantize` does and
 * stored straight into the tiles' layout (16 k-quads x 16 tokens x 4 bytes). Each block's int32 products
 * are scaled into fp32 accumulators before the next block: the same integer sums and scales as
 * gemm4_128 (which takes the zero points' term apart), summed in another order. The process must hold
 * the tiles' permission (arch_prctl ARCH_REQ_XCOMP_PERM, asked for by valley_rt.cpu.amx_permitted)
 * before the first call. */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define VRT_AMX 1
#define AMX_TARGET __attribute__((target("amx-tile,amx-int8")))

/* One token's activations for a linear, quantized into the B tiles: slice s (the 64 even- or odd-k codes
 * of block s / 2) of token t is tile (s * mtp + t / 16), row r = codes 4r..4r+3, column t % 16. */
static inline int8_t *b_tile(int8_t *qv, int64_t s, int64_t mtp, int64_t t) { return qv + (s * mtp + t / 16) * 1024 + (t % 16) * 4; }

/* x [m][ldx] -> the B tiles of m tokens (mtp tiles of 16 tokens, the padding zero), their block scales
 * sxT [nb][mtp * 16]. */
static void quantize_tiles(const vrt_linear *L, const float *x, int64_t ldx, int64_t m, int64_t mtp, int8_t *qv,
                           float *sxT, int threads) {
    const int64_t nb = L->k / 128, mp = mtp * 16;
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    memset(qv, 0, (size_t)(2 * nb * mtp * 1024));
    memset(sxT, 0, sizeof(float) * (size_t)(nb * mp));
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < m; t++) {
        const float *xt = x + t * ldx;
        for (int64_t b = 0; b < nb; b++) {
            __m512 v[8], amax = _mm512_setzero_ps();
            for (int i = 0; i < 8; i++) {
                v[i] = _mm512_loadu_ps(xt + b * 128 + 16 * i);
                amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
            }
            const float a = _mm512_reduce_max_ps(amax), inv = a > 0.0f ? 127.0f / a : 0.0f;
            __m512i c[8];
            for (int i = 0; i < 8; i++) { /* round to nearest even, as nearbyintf */
                c[i] = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], _mm512_set1_ps(inv)));
                c[i] = _mm512_max_epi32(_mm512_min_epi32(c[i], _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
            }
            sxT[b * mp + t] = a / 127.0f;
            for (int h = 0; h < 2; h++) { /* h = 0: the even codes (low nibbles), 1: the odd ones */
                int8_t *dst = b_tile(qv, 2 * b + h, mtp, t);
                for (int i = 0; i < 4; i++) {
                    __m128i q8 = _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(c[2 * i], h ? odd : even, c[2 * i + 1]));
                    for (int j = 0; j < 4; j++) {
                        const int32_t quad = _mm_extract_epi32(q8, j);
                        memcpy(dst + (4 * i + j) * 64, &quad, 4);
                    }
                }
            }
        }
    }
}


AMX_TARGET static void tiles_configure(void) { _tile_loadconfig(&VRT_TILES_16X64); }

#define AMX_GROUPS 4 /* groups of 32 weight rows a thread unpacks at once */
#define AMX_KC 4     /* blocks of 128 per pass over those groups: the B tiles of a pass stay in L1 */

/* Y [m][n] = the linear of m tokens quantized by quantize_tiles. A thread takes AMX_GROUPS x 32 weight
 * rows, unpacks them once, then for each 32 tokens (two B tiles) runs every group over AMX_KC blocks at a
 * time: each group's 32 rows are two A tiles, four C tiles take the 2 x 2 products, and each block's
 * int32 sums are scaled into the group's fp32 accumulators before the next (the block scales differ).
 * Returns 0, or -1 when scratch memory cannot be had. */
AMX_TARGET static int gemm4_128_amx(const vrt_linear *L, int64_t m, const int8_t *qv, int64_t mtp, const float *sxT,
                                    float *y, int threads) {
    const int64_t nb = L->k / 128, rowbytes = nb * 64, zrow = (nb + 1) / 2, mp = mtp * 16, N = L->n;
    const int64_t supers = (N + 32 * AMX_GROUPS - 1) / (32 * AMX_GROUPS);
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        /* a [group][block][half][tile][16][64]: codes minus zero points, int8; sw [group][block][32];
         * acc [group][32 rows][32 tokens] */
        uint8_t *a = (uint8_t *)aligned_alloc(64, (size_t)(AMX_GROUPS * nb * 4096));
        int32_t *c = (int32_t *)aligned_alloc(64, 4096);
        float *acc = (float *)aligned_alloc(64, AMX_GROUPS * 4096);
        float *sw = (float *)aligned_alloc(64, sizeof(float) * (size_t)(AMX_GROUPS * nb * 32));
        const int ok = a != NULL && c != NULL && acc != NULL && sw != NULL;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        } else {
            tiles_configure();
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t sg = 0; sg < supers; sg++) {
            if (!ok) continue;
            const int64_t first = sg * 32 * AMX_GROUPS;
            const int groups = (int)((N - first + 31) / 32 < AMX_GROUPS ? (N - first + 31) / 32 : AMX_GROUPS);
            for (int64_t rr = 0; rr < 32 * groups; rr++) { /* unpack the rows; those past N are zero */
                const int64_t n = first + rr, g = rr / 32, r = rr % 32;
                const uint8_t *w = n < N ? L->b + n * rowbytes : NULL;
                uint8_t *ag = a + g * nb * 4096;
                for (int64_t b = 0; b < nb; b++) {
                    uint8_t *lo = ag + ((b * 2 + 0) * 2 + r / 16) * 1024 + (r % 16) * 64;
                    uint8_t *hi = ag + ((b * 2 + 1) * 2 + r / 16) * 1024 + (r % 16) * 64;
                    float *swr = sw + (g * nb + b) * 32 + r;
                    if (w != NULL) {
                        const __m512i wv = _mm512_loadu_si512((const void *)(w + b * 64));
                        const __m512i z = _mm512_set1_epi8((char)((L->zp[n * zrow + b / 2] >> ((b & 1) * 4)) & 15));
                        _mm512_store_si512((void *)lo, _mm512_sub_epi8(_mm512_and_si512(wv, low4), z));
                        _mm512_store_si512((void *)hi, _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(wv, 4), low4), z));
                        *swr = L->scales[n * nb + b];
                    } else {
                        _mm512_store_si512((void *)lo, _mm512_setzero_si512());
                        _mm512_store_si512((void *)hi, _mm512_setzero_si512());
                        *swr = 0.0f;
                    }
                }
            }
            for (int64_t t0 = 0; t0 < mtp; t0 += 2) { /* tiles t0, t0 + 1: tokens 16 t0 .. 16 t0 + 31 */
                for (int64_t b0 = 0; b0 < nb; b0 += AMX_KC) {
                    const int64_t b1 = b0 + AMX_KC < nb ? b0 + AMX_KC : nb;
                    for (int g = 0; g < groups; g++) {
                        const uint8_t *ag = a + g * nb * 4096;
                        float *accg = acc + g * 1024;
                        for (int64_t b = b0; b < b1; b++) {
                            _tile_zero(0);
                            _tile_zero(1);
                            _tile_zero(2);
                            _tile_zero(3);
                            for (int64_t h = 0; h < 2; h++) {
                                const uint8_t *at = ag + (b * 2 + h) * 2048;
                                const int8_t *bt = qv + ((2 * b + h) * mtp + t0) * 1024;
                                _tile_loadd(4, at, 64);
                                _tile_loadd(5, at + 1024, 64);
                                _tile_loadd(6, bt, 64);
                                _tile_loadd(7, bt + 1024, 64);
                                _tile_dpbssd(0, 4, 6);
                                _tile_dpbssd(1, 4, 7);
                                _tile_dpbssd(2, 5, 6);
                                _tile_dpbssd(3, 5, 7);
                            }
                            _tile_stored(0, c, 64);
                            _tile_stored(1, c + 256, 64);
                            _tile_stored(2, c + 512, 64);
                            _tile_stored(3, c + 768, 64);
                            const float *swb = sw + (g * nb + b) * 32;
                            for (int j = 0; j < 2; j++) {
                                const __m512 sx = _mm512_loadu_ps(sxT + b * mp + (t0 + j) * 16);
                                for (int i = 0; i < 2; i++)
                                    for (int r = 0; r < 16; r++) { /* acc [row][token] += sw sx C */
                                        const int row = i * 16 + r;
                                        float *ar = accg + row * 32 + j * 16;
                                        const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const void *)(c + (i * 2 + j) * 256 + r * 16))), sx);
                                        const __m512 prev = b ? _mm512_load_ps(ar) : _mm512_setzero_ps();
                                        _mm512_store_ps(ar, _mm512_fmadd_ps(u, _mm512_set1_ps(swb[row]), prev));
                                    }
                            }
                        }
                    }
                }
                for (int g = 0; g < groups; g++) /* acc [row][token] -> y [token][row] */
                    for (int j = 0; j < 2; j++)
                        for (int i = 0; i < 2; i++) {
                            const int64_t col = first + g * 32 + i * 16;
                            if (col >= N) continue;
                            __m512 r[16];
                            for (int k = 0; k < 16; k++) r[k] = _mm512_load_ps(acc + g * 1024 + (i * 16 + k) * 32 + j * 16);
                            transpose16(r);
                            const __mmask16 keep = tail16(N - col);
                            for (int k = 0; k < 16; k++) {
                                const int64_t t = (t0 + j) * 16 + k;
                                if (t < m) _mm512_mask_storeu_ps(y + t * N + col, keep, r[k]);
                            }
                        }
            }
        }
        if (ok) _tile_release();
        free(a);
        free(c);
        free(acc);
        free(sw);
    }
    return failed ? -1 : 0;
}

/* y [m][n] = the linear of x [m][ldx] on the tiles; q, sx: scratch for the quantized tokens. */
static int linear_rows_amx(const vrt_linear *L, const float *x, int64_t ldx, int64_t m, int8_t *q, float *sx, float *y,
                           int threads) {
    const int64_t mtp = (m + 31) / 32 * 2;
    quantize_tiles(L, x, ldx, m, mtp, q, sx, threads);
    return gemm4_128_amx(L, m, q, mtp, sx, y, threads);
}
#else
#define VRT_AMX 0
static int linear_rows_amx(const vrt_linear *L, const float *x, int64_t ldx, int64_t m, int8_t *q, float *sx, float *y,
                           int threads) {
    return -1;
}
#endif

/* Whether this build has the AMX kernels (a compiler that knows the tiles). */
int vrt_amx_built(void) { return VRT_AMX; }

typedef struct {
    int8_t *q, *tmp;
    float *sx;
    int32_t *sumx;
} quant_buf;

static void linear(const vrt_linear *L, const float *x, float *y, quant_buf *qb, int threads) {
    quantize(L, x, qb->q, qb->sx, qb->sumx, qb->tmp);
    if (blocks_of_128(L))
        gemv4_128(L, qb->q, qb->sx, qb->sumx, y, threads);
    else if (L->bits == 8 && (L->bs == 32 || L->bs == 64) && L->k % 64 == 0)
        gemv8(L, qb->q, qb->sx, qb->sumx, y, threads);
    else
        gemv(L, qb->q, qb->sx, qb->sumx, y, threads);
}

static void rotate(float *v, const float *cos, const float *sin, int half) {
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i] + a * sin[i];
    }
}

static inline float dot(const float *a, const float *b, int n) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = tail16(n - i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* qkv [(heads + 2 kv_heads) * hd] of position pos: rotary on q and k, k and v appended to the cache,
 * then each head's softmax(q K^T * scale) V over positions 0..pos -> out [heads * hd]. */
static void attention(const vrt_model *M, float *qkv, float *kc, float *vc, int64_t slots, int64_t pos,
                      float *out, float *scores) {
    const int hd = M->head_dim, half = hd / 2, group = M->heads / M->kv_heads;
    const float *cs = M->cos + pos * half, *sn = M->sin + pos * half;
    float *q = qkv, *k = qkv + (int64_t)M->heads * hd, *v = k + (int64_t)M->kv_heads * hd;
    for (int h = 0; h < M->heads; h++) rotate(q + h * hd, cs, sn, half);
    for (int g = 0; g < M->kv_heads; g++) {
        rotate(k + g * hd, cs, sn, half);
        memcpy(kc + ((int64_t)g * slots + pos) * hd, k + g * hd, sizeof(float) * hd);
        memcpy(vc + ((int64_t)g * slots + pos) * hd, v + g * hd, sizeof(float) * hd);
    }
    const int64_t T = pos + 1;
#pragma omp parallel for schedule(static) num_threads(M->threads)
    for (int h = 0; h < M->heads; h++) {
        const int g = h / group;
        const float *K = kc + (int64_t)g * slots * hd, *V = vc + (int64_t)g * slots * hd, *qh = q + h * hd;
        float *sc = scores + (int64_t)h * T, mx = -INFINITY;
        for (int64_t t = 0; t < T; t++) {
            sc[t] = dot(qh, K + t * hd, hd) * M->scale;
            mx = fmaxf(mx, sc[t]);
        }
        __m512 sum = _mm512_setzero_ps();
        for (int64_t t = 0; t < T; t += 16) {
            __mmask16 m = tail16(T - t);
            __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + t), _mm512_set1_ps(mx)));
            e = _mm512_maskz_mov_ps(m, e);
            _mm512_mask_storeu_ps(sc + t, m, e);
            sum = _mm512_add_ps(sum, e);
        }
        const float inv = 1.0f / _mm512_reduce_add_ps(sum);
        float *oh = out + h * hd;
        for (int d = 0; d < hd; d += 16) {
            __mmask16 m = tail16(hd - d);
            __m512 acc = _mm512_setzero_ps();
            for (int64_t t = 0; t < T; t++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(sc[t]), _mm512_maskz_loadu_ps(m, V + t * hd + d), acc);
            _mm512_mask_storeu_ps(oh + d, m, _mm512_mul_ps(acc, _mm512_set1_ps(inv)));
        }
    }
}

/* The attention of m appended tokens (qkv [m][(heads + 2 kv_heads) * hd], positions pos .. pos + m - 1):
 * rotary on q and k, every k and v appended to the cache, then each head's causal softmax(q K^T * scale) V
 * -> out [m][heads * hd]. Per head, 4 tokens at a time against a transposed copy of the keys (kt:
 * [kv_heads][hd][pp], pp = pos + m rounded up to 32), so the products need no reductions across lanes.
 * scores: threads x 4 x pp floats. */
static void attention_rows(const vrt_model *M, float *qkv, int64_t m, float *kc, float *vc, int64_t slots, int64_t pos,
                           float *out, float *kt, int64_t pp, float *scores) {
    const int hd = M->head_dim, half = hd / 2, group = M->heads / M->kv_heads, kvh = M->kv_heads;
    const int64_t qkv_n = (int64_t)(M->heads + 2 * kvh) * hd, hw = (int64_t)M->heads * hd;
#pragma omp parallel for schedule(static) num_threads(M->threads)
    for (int64_t t = 0; t < m; t++) {
        float *q = qkv + t * qkv_n, *k = q + hw, *v = k + (int64_t)kvh * hd;
        const float *cs = M->cos + (pos + t) * half, *sn = M->sin + (pos + t) * half;
        for (int h = 0; h < M->heads; h++) rotate(q + h * hd, cs, sn, half);
        for (int g = 0; g < kvh; g++) {
            rotate(k + g * hd, cs, sn, half);
            memcpy(kc + ((int64_t)g * slots + pos + t) * hd, k + g * hd, sizeof(float) * hd);
            memcpy(vc + ((int64_t)g * slots + pos + t) * hd, v + g * hd, sizeof(float) * hd);
        }
    }
    const int64_t P = pos + m;
#pragma omp parallel for schedule(static) num_threads(M->threads)
    for (int64_t gd = 0; gd < (int64_t)kvh * hd; gd++) {
        const int64_t g = gd / hd, d = gd % hd;
        float *dst = kt + gd * pp;
        const float *src = kc + g * slots * hd + d;
        for (int64_t p = 0; p < P; p++) dst[p] = src[p * hd];
        for (int64_t p = P; p < pp; p++) dst[p] = 0.0f;
    }
    const int64_t tiles = (m + 3) / 4;
#pragma omp parallel num_threads(M->threads)
    {
        float *S = scores + (int64_t)omp_get_thread_num() * 4 * pp;
#pragma omp for schedule(dynamic, 1)
        for (int64_t job = 0; job < (int64_t)M->heads * tiles; job++) {
            const int h = (int)(job / tiles), g = h / group;
            const int64_t t0 = (job % tiles) * 4, tn = m - t0 < 4 ? m - t0 : 4, last = pos + t0 + tn; /* positions seen */
            const float *qs[4];
            for (int i = 0; i < 4; i++) qs[i] = qkv + (t0 + (i < tn ? i : 0)) * qkv_n + (int64_t)h * hd;
            const float *K = kt + (int64_t)g * hd * pp, *V = vc + (int64_t)g * slots * hd;
            for (int64_t p = 0; p < last; p += 32) { /* S [4][p .. p + 31] */
                __m512 a[4][2];
                for (int i = 0; i < 4; i++) a[i][0] = a[i][1] = _mm512_setzero_ps();
                for (int d = 0; d < hd; d++) {
                    const __m512 k0 = _mm512_loadu_ps(K + (int64_t)d * pp + p), k1 = _mm512_loadu_ps(K + (int64_t)d * pp + p + 16);
                    for (int i = 0; i < 4; i++) {
                        const __m512 qd = _mm512_set1_ps(qs[i][d]);
                        a[i][0] = _mm512_fmadd_ps(qd, k0, a[i][0]);
                        a[i][1] = _mm512_fmadd_ps(qd, k1, a[i][1]);
                    }
                }
                for (int i = 0; i < 4; i++) {
                    _mm512_storeu_ps(S + i * pp + p, _mm512_mul_ps(a[i][0], _mm512_set1_ps(M->scale)));
                    _mm512_storeu_ps(S + i * pp + p + 16, _mm512_mul_ps(a[i][1], _mm512_set1_ps(M->scale)));
                }
            }
            float inv[4];
            for (int i = 0; i < 4; i++) { /* softmax over the positions token t0 + i sees; zero beyond them */
                float *s = S + i * pp;
                const int64_t T = i < tn ? pos + t0 + i + 1 : 1;
                __m512 mv = _mm512_set1_ps(-INFINITY);
                for (int64_t p = 0; p < T; p += 16) mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(mv, tail16(T - p), s + p));
                const float mx = _mm512_reduce_max_ps(mv);
                __m512 sum = _mm512_setzero_ps();
                for (int64_t p = 0; p < last; p += 16) {
                    __mmask16 mk = p < T ? tail16(T - p) : 0;
                    __m512 e = _mm512_maskz_mov_ps(mk, exp512(_mm512_sub_ps(_mm512_loadu_ps(s + p), _mm512_set1_ps(mx))));
                    _mm512_storeu_ps(s + p, e);
                    sum = _mm512_add_ps(sum, e);
                }
                inv[i] = 1.0f / _mm512_reduce_add_ps(sum);
            }
            for (int d = 0; d < hd; d += 64) { /* out [4][d .. d + 63] = S V */
                __mmask16 mk[4];
                for (int j = 0; j < 4; j++) mk[j] = d + 16 * j < hd ? tail16(hd - d - 16 * j) : 0;
                __m512 a[4][4];
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 4; j++) a[i][j] = _mm512_setzero_ps();
                for (int64_t p = 0; p < last; p++) {
                    __m512 v[4];
                    for (int j = 0; j < 4; j++) v[j] = _mm512_maskz_loadu_ps(mk[j], V + p * hd + d + 16 * j);
                    for (int i = 0; i < 4; i++) {
                        const __m512 s = _mm512_set1_ps(S[i * pp + p]);
                        for (int j = 0; j < 4; j++) a[i][j] = _mm512_fmadd_ps(s, v[j], a[i][j]);
                    }
                }
                for (int i = 0; i < 4; i++) /* constant bounds: the accumulators stay in registers */
                    for (int j = 0; j < 4; j++)
                        if (i < tn)
                            _mm512_mask_storeu_ps(out + (t0 + i) * hw + (int64_t)h * hd + d + 16 * j, mk[j],
                                                  _mm512_mul_ps(a[i][j], _mm512_set1_ps(inv[i])));
            }
        }
    }
}

static void silu_mul(const float *gate, const float *up, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = tail16(n - i);
        __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
        __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.0f),
                                   _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(_mm512_mul_ps(g, sig), _mm512_maskz_loadu_ps(m, up + i)));
    }
}

static void add(float *acc, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) acc[i] += x[i];
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Append the token whose embedding is x [hidden] at position pos (< slots, < max_pos) to the caches
 * kcache[layer] / vcache[layer] ([kv_heads][slots][head_dim] each) and write the next-token logits
 * [vocab]. Returns 0, or -1 when scratch memory cannot be had. */
int vrt_decode_step(const vrt_model *M, const float *x, float *const *kcache, float *const *vcache,
                    int64_t slots, int64_t pos, float *logits) {
    const int64_t H = M->hidden, hd = M->head_dim, qkv_n = (int64_t)(M->heads + 2 * M->kv_heads) * hd;
    int64_t kmax = padded_k(&M->lm_head);
    for (int i = 0; i < M->layers; i++) {
        const vrt_layer *ly = &M->layer[i];
        kmax = max64(kmax, max64(max64(padded_k(&ly->qkv), padded_k(&ly->o)), max64(padded_k(&ly->gate_up), padded_k(&ly->down))));
    }
    const int64_t floats = 3 * H + qkv_n + (int64_t)M->heads * hd + 3 * (int64_t)M->inter + (int64_t)M->heads * (pos + 1) + kmax;
    float *mem = (float *)aligned_alloc(64, (size_t)((floats * 4 + 2 * kmax + 63) / 64 * 64) + 64 * 8);
    if (mem == NULL) return -1;
    float *residual = mem, *normed = residual + H, *tmp = normed + H, *qkv = tmp + H;
    float *attn = qkv + qkv_n, *gu = attn + (int64_t)M->heads * hd, *act = gu + 2 * (int64_t)M->inter;
    float *scores = act + M->inter, *sx = scores + (int64_t)M->heads * (pos + 1);
    quant_buf qb = {(int8_t *)(sx + kmax), (int8_t *)(sx + kmax) + kmax, sx, (int32_t *)(sx + kmax / 2)};
    /* sx and sumx share the kmax floats: blocks are at least 32 wide, so kmax / 32 of each suffices */
    memcpy(residual, x, sizeof(float) * H);
    rmsnorm(residual, M->layer[0].ln1, normed, H, M->eps);
    for (int i = 0; i < M->layers; i++) {
        const vrt_layer *ly = &M->layer[i];
        linear(&ly->qkv, normed, qkv, &qb, M->threads);
        attention(M, qkv, kcache[i], vcache[i], slots, pos, attn, scores);
        linear(&ly->o, attn, tmp, &qb, M->threads);
        add(residual, tmp, H);
        rmsnorm(residual, ly->ln2, normed, H, M->eps);
        linear(&ly->gate_up, normed, gu, &qb, M->threads);
        silu_mul(gu, gu + M->inter, act, M->inter);
        linear(&ly->down, act, tmp, &qb, M->threads);
        add(residual, tmp, H);
        rmsnorm(residual, i + 1 < M->layers ? M->layer[i + 1].ln1 : M->final_norm, normed, H, M->eps);
    }
    linear(&M->lm_head, normed, logits, &qb, M->threads);
    free(mem);
    return 0;
}

/* Append m tokens (embeddings x [m][hidden]) at positions pos .. pos + m - 1, as m decode steps would,
 * with the linears as int8 GEMMs over all m rows at once (on the AMX tiles where M->amx says so); the last
 * token's logits [vocab]. Returns 0, or -1 when scratch memory cannot be had. */
int vrt_prefill(const vrt_model *M, const float *x, int64_t m, float *const *kcache, float *const *vcache,
                int64_t slots, int64_t pos, float *logits) {
    const int64_t H = M->hidden, hd = M->head_dim, I = M->inter, qkv_n = (int64_t)(M->heads + 2 * M->kv_heads) * hd;
    const int64_t mp = (m + 31) / 32 * 32, pp = (pos + m + 31) / 32 * 32, hw = (int64_t)M->heads * hd;
    int64_t kmax = padded_k(&M->lm_head);
    for (int i = 0; i < M->layers; i++) {
        const vrt_layer *ly = &M->layer[i];
        kmax = max64(kmax, max64(max64(padded_k(&ly->qkv), padded_k(&ly->o)), max64(padded_k(&ly->gate_up), padded_k(&ly->down))));
    }
    const int64_t nbmax = kmax / 32;
    const int64_t widest = max64(max64(qkv_n, 2 * I), H);
    const int64_t floats = m * (3 * H + widest + hw + I) + (int64_t)M->kv_heads * hd * pp + (int64_t)M->threads * 4 * pp
                         + 2 * mp * nbmax;
    char *mem = (char *)aligned_alloc(64, (sizeof(float) * (size_t)floats + (size_t)(mp * kmax) + (size_t)kmax + 64 * 16 + 63) / 64 * 64);
    if (mem == NULL) return -1;
    float *residual = (float *)mem, *normed = residual + m * H, *tmp = normed + m * H, *wide = tmp + m * H;
    float *attn = wide + m * widest, *act = attn + m * hw, *kt = act + m * I, *scores = kt + (int64_t)M->kv_heads * hd * pp;
    float *sx = scores + (int64_t)M->threads * 4 * pp;
    int32_t *sumx = (int32_t *)(sx + mp * nbmax);
    int8_t *q = (int8_t *)(((uintptr_t)(sumx + mp * nbmax) + 63) & ~(uintptr_t)63);
    int8_t *qtmp = q + mp * kmax;
    quant_buf qb = {q, qtmp, sx, sumx};

    memcpy(residual, x, sizeof(float) * (size_t)(m * H));
#pragma omp parallel for schedule(static) num_threads(M->threads)
    for (int64_t t = 0; t < m; t++) rmsnorm(residual + t * H, M->layer[0].ln1, normed + t * H, H, M->eps);
#define LINEAR_ROWS(L, in, in_w, out)                                                                         \
    do {                                                                                                     \
        const vrt_linear *L_ = (L);                                                                          \
        int rc_ = 0;                                                                                         \
        if (VRT_AMX && M->amx && blocks_of_128(L_)) {                                                        \
            rc_ = linear_rows_amx(L_, (in), (in_w), m, q, sx, (out), M->threads);             \
        } else if (blocks_of_128(L_)) {                                                                      \
            const int64_t kp_ = padded_k(L_), nb_ = nblocks(L_), mp4_ = (m + 3) / 4 * 4;                     \
            memset(q, 0, (size_t)(mp4_ * kp_));                                                              \
            memset(sx, 0, sizeof(float) * (size_t)(mp4_ * nb_));                                             \
            memset(sumx, 0, sizeof(int32_t) * (size_t)(mp4_ * nb_));                                         \
            for (int64_t t_ = 0; t_ < m; t_++)                                                               \
                quantize(L_, (in) + t_ * (in_w), q + t_ * kp_, sx + t_ * nb_, sumx + t_ * nb_, qtmp);        \
            rc_ = gemm4_128(L_, m, q, kp_, sx, sumx, (out), M->threads);                                     \
        } else {                                                                                             \
            for (int64_t t_ = 0; t_ < m; t_++) linear(L_, (in) + t_ * (in_w), (out) + t_ * L_->n, &qb, M->threads); \
        }                                                                                                    \
        if (rc_ != 0) {                                                                                      \
            free(mem);                                                                                       \
            return -1;                                                                                       \
        }                                                                                                    \
    } while (0)
    for (int i = 0; i < M->layers; i++) {
        const vrt_layer *ly = &M->layer[i];
        const float *next = i + 1 < M->layers ? M->layer[i + 1].ln1 : M->final_norm;
        LINEAR_ROWS(&ly->qkv, normed, H, wide);
        attention_rows(M, wide, m, kcache[i], vcache[i], slots, pos, attn, kt, pp, scores);
        LINEAR_ROWS(&ly->o, attn, hw, tmp);
#pragma omp parallel for schedule(static) num_threads(M->threads)
        for (int64_t t = 0; t < m; t++) {
            add(residual + t * H, tmp + t * H, H);
            rmsnorm(residual + t * H, ly->ln2, normed + t * H, H, M->eps);
        }
        LINEAR_ROWS(&ly->gate_up, normed, H, wide);
#pragma omp parallel for schedule(static) num_threads(M->threads)
        for (int64_t t = 0; t < m; t++) silu_mul(wide + t * 2 * I, wide + t * 2 * I + I, act + t * I, I);
        LINEAR_ROWS(&ly->down, act, I, tmp);
#pragma omp parallel for schedule(static) num_threads(M->threads)
        for (int64_t t = 0; t < m; t++) {
            add(residual + t * H, tmp + t * H, H);
            rmsnorm(residual + t * H, next, normed + t * H, H, M->eps);
        }
    }
#undef LINEAR_ROWS
    linear(&M->lm_head, normed + (m - 1) * H, logits, &qb, M->threads);
    free(mem);
    return 0;
}

/* One linear over m rows x [m][k] -> y [m][n], on the tiles (amx 1) or AVX512-VNNI (0), as vrt_prefill
 * runs it: for tests that hold the two kernels to the same int32 products. Returns 0, -1 without scratch
 * memory, -2 for a linear the kernel does not take this way (not 4-bit blocks of 128, or amx not built). */
int vrt_linear_rows(const vrt_linear *L, const float *x, int64_t m, float *y, int amx, int threads) {
    if (!blocks_of_128(L) || (amx && !VRT_AMX)) return -2;
    const int64_t kp = padded_k(L), nb = nblocks(L), mp = (m + 31) / 32 * 32;
    char *mem = (char *)aligned_alloc(64, (size_t)(mp * kp + 2 * sizeof(float) * mp * nb + kp + 127) / 64 * 64);
    if (mem == NULL) return -1;
    int8_t *q = (int8_t *)mem, *qtmp = q + mp * kp;
    float *sx = (float *)(((uintptr_t)(qtmp + kp) + 63) & ~(uintptr_t)63), *xs = sx + mp * nb;
    int rc;
    if (amx) {
        rc = linear_rows_amx(L, x, L->k, m, q, sx, y, threads);
    } else {
        memset(q, 0, (size_t)(mp * kp));
        memset(sx, 0, sizeof(float) * (size_t)(2 * mp * nb));
        for (int64_t t = 0; t < m; t++) quantize(L, x + t * L->k, q + t * kp, sx + t * nb, (int32_t *)xs + t * nb, qtmp);
        rc = gemm4_128(L, m, q, kp, sx, (int32_t *)xs, y, threads);
    }
    free(mem);
    return rc;
}
