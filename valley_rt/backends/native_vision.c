/* The CLIP ViT encoder of an exported int8 vision graph (valley_rt/export/onnx_vision.py) on the CPU's
 * AMX tiles: the linears on AMX-INT8, the attention on AMX-BF16 (vv_encode).
 *
 * It computes what the graph's encoder layers compute, with the graph's own int8 weights (int8 per output
 * channel, symmetric): pre-norm layers of LayerNorm, fused q/k/v, softmax attention, output projection and
 * residual, LayerNorm, fc1 + quick-GELU, fc2 and residual. Activations are quantized to int8 per token
 * (symmetric, absmax / 127, round to nearest even) where the graph quantizes them per tensor; the products
 * are summed in int32 over the whole row, then scaled once by the token's and the channel's scales. The
 * attention takes q (scaled by 1 / sqrt(head size)), k, v and the softmax weights in bf16 with fp32 sums
 * (the q/k/v linear writes them in bf16, per head).
 *
 * Layouts. Weights packed by vv_pack into the tiles' B layout: [n / 16][k / 4][16 columns][4 k]; activation
 * codes in the A layout: [m / 16][k / 64][16 tokens][64 k] (tiles are whole 1 KB blocks). The hidden state
 * is fp32 [frames * seq][hidden], tokens of a frame contiguous (CLS first).
 *
 * The process must hold the tiles' permission (arch_prctl ARCH_REQ_XCOMP_PERM, asked for by
 * valley_rt.cpu.amx_permitted) before the first call.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const int8_t *w;                /* packed by vv_pack */
    const float *scale, *bias;     /* [n] */
    int64_t n, k;
} vv_linear;

typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    vv_linear qkv, o, fc1, fc2;
} vv_layer;

typedef struct {
    int32_t layers, hidden, heads, head_dim, inter, threads;
    float eps, gelu_alpha;
    const vv_layer *layer;
} vv_model;

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-int8,amx-bf16")))
#define VRT_SIMD TARGET
#include "native_common.h"

/* e^x to ~6e-5 relative error (2^n * a degree-4 polynomial of r = x - n ln2): where the result is rounded
 * to bf16 (softmax weights) or to int8 per token (quick-GELU's output) next, a finer one is wasted work. */
TARGET static inline __m512 exp512_coarse(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945f), x);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 24.0f), r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

#define GEMM_COLS 256 /* weight columns a thread keeps in L2 while every token passes over them */

TARGET static void tiles_configure(void) { _tile_loadconfig(&VRT_TILES_16X64); }

/* out [n / 16][k / 4][16][4] from w [k][n]: each 64-byte group is 4 rows' 16 bytes, interleaved by one byte
 * permutation (AVX512-VBMI, which every AMX CPU has). */
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) static void vv_pack_rows(const int8_t *w, int64_t k, int64_t n,
                                                                                 int8_t *out, int threads) {
    uint8_t idx[64];
    for (int j = 0; j < 16; j++)
        for (int e = 0; e < 4; e++) idx[j * 4 + e] = (uint8_t)(e * 16 + j);
    const __m512i perm = _mm512_loadu_si512((const void *)idx);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t kq = 0; kq < k / 4; kq++)
        for (int64_t nb = 0; nb < n / 16; nb++) {
            __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(w + (kq * 4) * n + nb * 16)));
            v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(w + (kq * 4 + 1) * n + nb * 16)), 1);
            v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(w + (kq * 4 + 2) * n + nb * 16)), 2);
            v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(w + (kq * 4 + 3) * n + nb * 16)), 3);
            _mm512_storeu_si512((void *)(out + (nb * (k / 4) + kq) * 64), _mm512_permutexvar_epi8(perm, v));
        }
}

/* w [k][n] int8 (row-major, as MatMulInteger's B) -> out [n / 16][k / 4][16][4]. n % 16 == 0, k % 4 == 0. */
int vv_pack(const int8_t *w, int64_t k, int64_t n, int8_t *out, int threads) {
    if (n % 16 || k % 4) return -1;
    vv_pack_rows(w, k, n, out, threads);
    return 0;
}

/* x [m][k] fp32 (optionally LayerNorm'd with w, b first) -> codes q in the A layout for mp tokens (those
 * past m zero) and their scales sx [mp]. k % 64 == 0. */
TARGET static void quantize_rows(const float *x, int64_t m, int64_t mp, int64_t k, const float *lw, const float *lb,
                                 float eps, int8_t *q, float *sx, float *scratch, int threads) {
    const int64_t ks = k / 64;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < mp; t++) {
        int8_t *qt = q + (t / 16) * ks * 1024 + (t % 16) * 64;
        if (t >= m) {
            for (int64_t s = 0; s < ks; s++) memset(qt + s * 1024, 0, 64);
            sx[t] = 0.0f;
            continue;
        }
        const float *xt = x + t * k;
        if (lw != NULL) {
            float *row = scratch + (int64_t)omp_get_thread_num() * k;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < k; i += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(xt + i));
            const float mean = _mm512_reduce_add_ps(acc) / (float)k;
            __m512 var = _mm512_setzero_ps();
            for (int64_t i = 0; i < k; i += 16) {
                const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(xt + i), _mm512_set1_ps(mean));
                var = _mm512_fmadd_ps(d, d, var);
            }
            const float rstd = 1.0f / sqrtf(_mm512_reduce_add_ps(var) / (float)k + eps);
            for (int64_t i = 0; i < k; i += 16) {
                const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xt + i), _mm512_set1_ps(mean)), _mm512_set1_ps(rstd));
                _mm512_storeu_ps(row + i, _mm512_fmadd_ps(d, _mm512_loadu_ps(lw + i), _mm512_loadu_ps(lb + i)));
            }
            xt = row;
        }
        __m512 amax = _mm512_setzero_ps();
        for (int64_t i = 0; i < k; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(xt + i)));
        const float a = _mm512_reduce_max_ps(amax), inv = a > 0.0f ? 127.0f / a : 0.0f;
        sx[t] = a / 127.0f;
        for (int64_t s = 0; s < ks; s++)
            for (int i = 0; i < 4; i++) { /* round to nearest even, as nearbyintf */
                __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xt + s * 64 + 16 * i), _mm512_set1_ps(inv)));
                c = _mm512_max_epi32(_mm512_min_epi32(c, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
                _mm_storeu_si128((__m128i *)(qt + s * 1024 + 16 * i), _mm512_cvtepi32_epi8(c));
            }
    }
}

enum { STORE = 0, GELU = 1, ACCUMULATE = 2, QKV = 3 };

/* Where the fused q/k/v linear's outputs go (mode QKV): bf16 [3][frames][heads][seq][head_dim], q scaled. */
typedef struct {
    uint16_t *out;
    int64_t seq, frames, heads, hd, hidden;
    float q_scale;
} qkv_dest;

/* The epilogue of one 32 x 32 block of y (tokens tp * 32.., columns col..): c [32][32] int32 products ->
 * scaled by token and channel, plus bias, then as the mode says (see gemm). */
TARGET static inline void block_out(const int32_t *c, int64_t tp, int64_t col, const float *sx, int64_t m,
                                    const vv_linear *L, float *y, int64_t ldy, int mode, float alpha,
                                    const qkv_dest *dst) {
    const __m512 sw0 = _mm512_loadu_ps(L->scale + col), sw1 = _mm512_loadu_ps(L->scale + col + 16);
    const __m512 b0v = _mm512_loadu_ps(L->bias + col), b1v = _mm512_loadu_ps(L->bias + col + 16);
    if (mode == QKV) { /* 32 columns: one part (q, k or v), one head, 32 of its dimensions */
        const int64_t part = col / dst->hidden, head = (col % dst->hidden) / dst->hd, d0 = col % dst->hd;
        const __m512 f = _mm512_set1_ps(part == 0 ? dst->q_scale : 1.0f);
        for (int r = 0; r < 32; r++) {
            const int64_t t = tp * 32 + r;
            if (t >= m) break;
            const __m512 st = _mm512_mul_ps(_mm512_set1_ps(sx[t]), f);
            const __m512 c0 = _mm512_cvtepi32_ps(_mm512_load_si512((const void *)(c + r * 32)));
            const __m512 c1 = _mm512_cvtepi32_ps(_mm512_load_si512((const void *)(c + r * 32 + 16)));
            const __m512 v0 = _mm512_fmadd_ps(_mm512_mul_ps(c0, st), sw0, _mm512_mul_ps(b0v, f));
            const __m512 v1 = _mm512_fmadd_ps(_mm512_mul_ps(c1, st), sw1, _mm512_mul_ps(b1v, f));
            const int64_t fr = t / dst->seq, j = t % dst->seq;
            const int64_t row = ((part * dst->frames + fr) * dst->heads + head) * dst->seq + j;
            _mm512_storeu_si512((void *)(dst->out + row * dst->hd + d0), (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
        }
        return;
    }
    for (int r = 0; r < 32; r++) {
        const int64_t t = tp * 32 + r;
        if (t >= m) break;
        const __m512 st = _mm512_set1_ps(sx[t]);
        float *yt = y + t * ldy + col;
        for (int h = 0; h < 2; h++) {
            __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512((const void *)(c + r * 32 + h * 16)));
            v = _mm512_fmadd_ps(_mm512_mul_ps(v, st), h ? sw1 : sw0, h ? b1v : b0v);
            if (mode == GELU) { /* x sigmoid(alpha x); the reciprocal to 2^-14: the result is quantized next */
                const __m512 e = exp512_coarse(_mm512_mul_ps(v, _mm512_set1_ps(-alpha)));
                v = _mm512_mul_ps(v, _mm512_rcp14_ps(_mm512_add_ps(e, _mm512_set1_ps(1.0f))));
            } else if (mode == ACCUMULATE) {
                v = _mm512_add_ps(v, _mm512_loadu_ps(yt + h * 16));
            }
            _mm512_storeu_ps(yt + h * 16, v);
        }
    }
}

/* y [m][n] (row stride ldy) = (codes q of mp tokens) x L, scaled, plus bias; mode GELU applies quick-GELU
 * x * sigmoid(alpha x), ACCUMULATE adds into y (a residual), QKV writes bf16 per head to dst instead of y.
 * Each 32 x 32 block of y: two A and two B tiles per 64 k, four C tiles summed over all of k in int32, then
 * scaled once. */
TARGET static void gemm(const int8_t *q, const float *sx, int64_t m, int64_t mp, const vv_linear *L, float *y,
                        int64_t ldy, int mode, float alpha, const qkv_dest *dst, int threads) {
    const int64_t k = L->k, n = L->n, ks = k / 64, pairs = mp / 32;
    const int64_t cols = n % GEMM_COLS == 0 ? GEMM_COLS : 32, blocks = n / cols;
#pragma omp parallel num_threads(threads)
    {
        int32_t c[32 * 32] __attribute__((aligned(64)));
        tiles_configure();
#pragma omp for schedule(static) collapse(2)
        for (int64_t nb = 0; nb < blocks; nb++)
            for (int64_t tp = 0; tp < pairs; tp++) {
                const int8_t *a0 = q + (2 * tp) * ks * 1024, *a1 = a0 + ks * 1024;
                for (int64_t np = nb * cols / 32; np < (nb + 1) * cols / 32; np++) {
                    const int8_t *b0 = L->w + (2 * np) * (k / 4) * 64, *b1 = b0 + (k / 4) * 64;
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    for (int64_t s = 0; s < ks; s++) {
                        _tile_loadd(4, a0 + s * 1024, 64);
                        _tile_loadd(5, a1 + s * 1024, 64);
                        _tile_loadd(6, b0 + s * 1024, 64);
                        _tile_loadd(7, b1 + s * 1024, 64);
                        _tile_dpbssd(0, 4, 6);
                        _tile_dpbssd(1, 4, 7);
                        _tile_dpbssd(2, 5, 6);
                        _tile_dpbssd(3, 5, 7);
                    }
                    _tile_stored(0, c, 128);
                    _tile_stored(1, c + 16, 128);
                    _tile_stored(2, c + 512, 128);
                    _tile_stored(3, c + 528, 128);
                    block_out(c, tp, np * 32, sx, m, L, y, ldy, mode, alpha, dst);
                }
            }
        _tile_release();
    }
}

/* The keys of one head, bf16 [seq][hd], into kp [hd / 2][sp][2] (keys past seq zero): 16 keys x 16
 * dimension pairs (32-bit words) at a time, transposed. */
TARGET static void pack_keys(const uint16_t *k, int64_t seq, int64_t sp, int64_t hd, uint16_t *kp) {
    for (int64_t j0 = 0; j0 < sp; j0 += 16)
        for (int64_t c = 0; c < hd / 32; c++) {
            __m512 r[16];
            for (int i = 0; i < 16; i++)
                r[i] = j0 + i < seq ? _mm512_loadu_ps((const float *)(k + (j0 + i) * hd + c * 32)) : _mm512_setzero_ps();
            transpose16(r);
            for (int i = 0; i < 16; i++) _mm512_storeu_ps((float *)kp + (c * 16 + i) * sp + j0, r[i]);
        }
}

/* The values of one head, bf16 [seq][hd], into vp [sp / 2][hd][2]: word (j / 2, d) = (v[j][d], v[j + 1][d]). */
TARGET static void pack_values(const uint16_t *v, int64_t seq, int64_t sp, int64_t hd, uint16_t *vp) {
    for (int64_t j = 0; j < sp; j += 2)
        for (int64_t d = 0; d < hd; d += 16) {
            const __m256i *ra = (const __m256i *)(v + j * hd + d), *rb = (const __m256i *)(v + (j + 1) * hd + d);
            const __m512i a = j < seq ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(ra)) : _mm512_setzero_si512();
            const __m512i b = j + 1 < seq ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(rb)) : _mm512_setzero_si512();
            _mm512_storeu_si512((void *)(vp + ((j / 2) * hd + d) * 2), _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
        }
}

/* c [32][32] fp32 (row stride ldc floats) = A [32 rows][steps x 32] x B on the AMX-BF16 tiles: per step,
 * A's two 16-row tiles (a, a + 16 lda; rows lda bf16 apart, each step a_step further) and B's two tiles of
 * 16 pair-rows x 16 columns (b, b + 32; rows ldb bf16 apart, each step b_step further) into four C tiles. */
TARGET static inline void bf16_block(const uint16_t *a, int64_t lda, int64_t a_step, const uint16_t *b, int64_t ldb,
                                     int64_t b_step, int64_t steps, float *c, int64_t ldc) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t st = 0; st < steps; st++) {
        _tile_loadd(4, a + st * a_step, lda * 2);
        _tile_loadd(5, a + 16 * lda + st * a_step, lda * 2);
        _tile_loadd(6, b + st * b_step, ldb * 2);
        _tile_loadd(7, b + st * b_step + 32, ldb * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, ldc * 4);
    _tile_stored(1, c + 16, ldc * 4);
    _tile_stored(2, c + 16 * ldc, ldc * 4);
    _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}

/* out [frames * seq][hidden] = softmax(q k^T) v per frame and head, from qkv bf16 [3][frames][heads][seq][hd]
 * (q already scaled). A block of 32 queries past a head's seq rows reads the rows after them (the next
 * head's q, or the first k rows after the last head: inside the buffer) and those outputs are dropped. Keys
 * padded to sp (a multiple of 32) weigh zero. QK^T and PV on the AMX-BF16 tiles; softmax in fp32. */
TARGET static int attention(const vv_model *M, const uint16_t *qkv, int64_t frames, int64_t seq, float *out, int threads) {
    const int64_t hd = M->head_dim, D = M->hidden, sp = (seq + 31) / 32 * 32, items = frames * M->heads;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        uint16_t *kp = aligned_alloc(64, (size_t)(sp * hd * 2));       /* [hd / 2][sp][2] */
        uint16_t *vp = aligned_alloc(64, (size_t)(sp * hd * 2));       /* [sp / 2][hd][2] */
        float *s = aligned_alloc(64, (size_t)(32 * sp * 4));           /* [32][sp] */
        uint16_t *p = aligned_alloc(64, (size_t)(32 * sp * 2));        /* [32][sp] */
        float *o = aligned_alloc(64, (size_t)(32 * hd * 4));           /* [32][hd] */
        const int ok = kp && vp && s && p && o;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        } else {
            tiles_configure();
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!ok) continue;
            const int64_t f = it / M->heads, h = it % M->heads, per_part = frames * M->heads * seq * hd;
            const uint16_t *qb = qkv + it * seq * hd;
            pack_keys(qkv + per_part + it * seq * hd, seq, sp, hd, kp);
            pack_values(qkv + 2 * per_part + it * seq * hd, seq, sp, hd, vp);
            for (int64_t q0 = 0; q0 < seq; q0 += 32) {
                /* s [32][sp] = q k^T, 2 x 2 C tiles over 16-key blocks, k-steps of 32 dimensions */
                for (int64_t kb = 0; kb < sp / 16; kb += 2)
                    bf16_block(qb + q0 * hd, hd, 32, kp + kb * 32, 2 * sp, 32 * sp, hd / 32, s + kb * 16, sp);
                for (int r = 0; r < 32; r++) { /* softmax over the seq real keys; padded keys weigh 0 */
                    float *sr = s + r * sp;
                    __m512 mx = _mm512_set1_ps(-INFINITY);
                    for (int64_t j = 0; j < sp; j += 16) {
                        const __mmask16 keep = seq - j >= 16 ? 0xFFFF : (seq > j ? (__mmask16)((1u << (seq - j)) - 1) : 0);
                        mx = _mm512_mask_max_ps(mx, keep, mx, _mm512_loadu_ps(sr + j));
                    }
                    const __m512 mv = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
                    __m512 sum = _mm512_setzero_ps();
                    for (int64_t j = 0; j < sp; j += 16) {
                        const __mmask16 keep = seq - j >= 16 ? 0xFFFF : (seq > j ? (__mmask16)((1u << (seq - j)) - 1) : 0);
                        const __m512 e = _mm512_maskz_mov_ps(keep, exp512_coarse(_mm512_sub_ps(_mm512_loadu_ps(sr + j), mv)));
                        _mm512_storeu_ps(sr + j, e);
                        sum = _mm512_add_ps(sum, e);
                    }
                    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
                    for (int64_t j = 0; j < sp; j += 32)
                        _mm512_storeu_si512((void *)(p + r * sp + j), (__m512i)_mm512_cvtne2ps_pbh(
                            _mm512_mul_ps(_mm512_loadu_ps(sr + j + 16), inv), _mm512_mul_ps(_mm512_loadu_ps(sr + j), inv)));
                }
                /* o [32][hd] = p v: C tiles of 16 queries x 16 dimensions, k-steps of 32 keys */
                for (int64_t db = 0; db < hd / 16; db += 2)
                    bf16_block(p, sp, 32, vp + db * 32, 2 * hd, 32 * hd, sp / 32, o + db * 16, hd);
                for (int64_t r = 0; r < 32 && q0 + r < seq; r++)
                    memcpy(out + (f * seq + q0 + r) * D + h * hd, o + r * hd, (size_t)(hd * 4));
            }
        }
        if (ok) _tile_release();
        free(kp);
        free(vp);
        free(s);
        free(p);
        free(o);
    }
    return failed ? -1 : 0;
}

/* The encoder layers over x [frames * seq][hidden] in place. Scratch (caller's): qkv bf16 [3][m][hidden] (q,
 * k, v per frame and head), h [m][inter] and att [m][hidden] fp32, q [mp][max(hidden, inter)] int8 and
 * sx [mp] fp32 with mp = m rounded up to 32, ln [threads][hidden] fp32. seconds (or NULL): [3] the time in
 * the linears, the attention, and the norms and quantization. Returns 0, or -1 when scratch memory cannot
 * be had. */
int vv_encode(const vv_model *M, float *x, int64_t frames, int64_t seq, uint16_t *qkv, float *h, float *att, int8_t *q,
              float *sx, float *ln, double *seconds) {
    const int64_t m = frames * seq, mp = (m + 31) / 32 * 32, D = M->hidden;
    const int th = M->threads;
    const qkv_dest dst = {qkv, seq, frames, M->heads, M->head_dim, D, 1.0f / sqrtf((float)M->head_dim)};
    double t[3] = {0.0, 0.0, 0.0}, t0 = omp_get_wtime(), t1; /* linears, attention, norms + quantization */
#define LAP(i) (t1 = omp_get_wtime(), t[i] += t1 - t0, t0 = t1)
    for (int i = 0; i < M->layers; i++) {
        const vv_layer *L = M->layer + i;
        quantize_rows(x, m, mp, D, L->ln1_w, L->ln1_b, M->eps, q, sx, ln, th);
        LAP(2);
        gemm(q, sx, m, mp, &L->qkv, NULL, 0, QKV, 0.0f, &dst, th);
        LAP(0);
        if (attention(M, qkv, frames, seq, att, th) != 0) return -1;
        LAP(1);
        quantize_rows(att, m, mp, D, NULL, NULL, 0.0f, q, sx, ln, th);
        LAP(2);
        gemm(q, sx, m, mp, &L->o, x, D, ACCUMULATE, 0.0f, NULL, th);
        LAP(0);
        quantize_rows(x, m, mp, D, L->ln2_w, L->ln2_b, M->eps, q, sx, ln, th);
        LAP(2);
        gemm(q, sx, m, mp, &L->fc1, h, M->inter, GELU, M->gelu_alpha, NULL, th);
        LAP(0);
        quantize_rows(h, m, mp, M->inter, NULL, NULL, 0.0f, q, sx, ln, th);
        LAP(2);
        gemm(q, sx, m, mp, &L->fc2, x, D, ACCUMULATE, 0.0f, NULL, th);
        LAP(0);
    }
#undef LAP
    if (seconds != NULL)
        for (int i = 0; i < 3; i++) seconds[i] = t[i];
    return 0;
}

/* y [m][n] = the linear of x [m][k] as vv_encode runs it (a test hook). q, sx: scratch as vv_encode's. */
int vv_linear_rows(const vv_linear *L, const float *x, int64_t m, float *y, int8_t *q, float *sx, int threads) {
    const int64_t mp = (m + 31) / 32 * 32;
    quantize_rows(x, m, mp, L->k, NULL, NULL, 0.0f, q, sx, NULL, threads);
    gemm(q, sx, m, mp, L, y, L->n, STORE, 0.0f, NULL, threads);
    return 0;
}
