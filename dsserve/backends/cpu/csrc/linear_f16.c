/* y = x W^T (+ b) on CPU with W stored in float16: float32 activations, accumulation and output; every weight is
 * read once per call and widened with F16C as it is loaded. The kernel behind `--weight-dtype float16`.
 *
 * Built with paged_attention.c by dsserve/backends/cpu/kernels.py; layers/linear.py (PackedLinear) packs the weights and
 * calls it, and keeps FBGEMM's fp16 GEMM as the fallback where this build has no F16C/FMA.
 *
 * Packed layout: W (N, K) is cut into panels of NR = 16 output rows; panel p holds, for k = 0..K-1, the 16
 * values W[p * 16 + j, k] (j = 0..15) side by side (rows past N are zero). A panel is one contiguous run of
 * K * 16 halves, so the micro-kernel streams it in order and any K works (x is read one scalar at a time).
 *
 * Work: tiles of 6 rows of x by one panel keep a 6 x 16 block of y in 12 AVX registers (with AVX-512: 6 rows by
 * two panels, 6 x 32 in 12 zmm registers, two weight loads and six broadcasts per 12 FMAs; a Qwen2-shaped model's
 * linears at batch 64 28.8 -> 19.5 ms on a Sapphire-Rapids-class Xeon, FBGEMM 19.6); k is split into blocks of
 * at most KC (the panel's block stays in L1 while every row of a chunk passes over it) and rows into chunks of MC
 * (their block of x stays in L2); (row chunk, panel) tasks are spread over torch's OpenMP threads. With one row
 * of x (batch-1 decode) each thread streams whole panels, the k loop unrolled by two into four accumulators to
 * hide FMA latency: bound by reading the weights (21-25 GB/s on a 2-core EPYC, 1.3-2x FBGEMM's fp16 GEMV).
 *
 * Also here, on the same panels: one linear per attention head (MLA's absorbed projections) and the routed
 * experts of a few tokens in one call (DeepSeekMoE at small decode batches).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dsserve_kernels.h"
#include "vec_math.h"

#define NR 16

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LINEAR_F16_SUPPORTED 1

static inline __m256 load_half8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* Write one row of a tile's 16 columns (only `valid` of them: the last panel), added to what y holds when
 * `accumulate` (the earlier k blocks), plus the bias if given. */
static inline __attribute__((always_inline)) void store_row(float *y, __m256 lo, __m256 hi, int accumulate,
                                                            const float *bias, int valid) {
    if (valid == NR) {
        if (accumulate) lo = _mm256_add_ps(lo, _mm256_loadu_ps(y)), hi = _mm256_add_ps(hi, _mm256_loadu_ps(y + 8));
        if (bias) lo = _mm256_add_ps(lo, _mm256_loadu_ps(bias)), hi = _mm256_add_ps(hi, _mm256_loadu_ps(bias + 8));
        _mm256_storeu_ps(y, lo);
        _mm256_storeu_ps(y + 8, hi);
        return;
    }
    float row[NR];
    _mm256_storeu_ps(row, lo);
    _mm256_storeu_ps(row + 8, hi);
    for (int j = 0; j < valid; j++) y[j] = row[j] + (accumulate ? y[j] : 0.0f) + (bias ? bias[j] : 0.0f);
}

/* A `rows` x 16 tile of y (rows <= 6) over `depth` values of k; `accumulate` adds it to what y holds (the earlier
 * k blocks), `bias` is given on the last. Always six rows of arithmetic in twelve named registers (arrays here get
 * spilled to the stack by gcc); a short tile repeats its last row of x and stores only its own rows. */
static void tile(int rows, const float *x, int64_t ldx, const uint16_t *panel, int depth, int accumulate,
                 const float *bias, float *y, int64_t ldy, int valid) {
    const float *x0 = x, *x1 = x + (rows > 1 ? 1 : 0) * ldx, *x2 = x + (rows > 2 ? 2 : rows - 1) * ldx,
                *x3 = x + (rows > 3 ? 3 : rows - 1) * ldx, *x4 = x + (rows > 4 ? 4 : rows - 1) * ldx,
                *x5 = x + (rows > 5 ? 5 : rows - 1) * ldx;
    __m256 l0 = _mm256_setzero_ps(), h0 = l0, l1 = l0, h1 = l0, l2 = l0, h2 = l0, l3 = l0, h3 = l0, l4 = l0, h4 = l0,
           l5 = l0, h5 = l0;
    for (int k = 0; k < depth; k++) {
        const __m256 b0 = load_half8(panel + (int64_t)k * NR), b1 = load_half8(panel + (int64_t)k * NR + 8);
        __m256 a = _mm256_broadcast_ss(x0 + k);
        l0 = _mm256_fmadd_ps(a, b0, l0), h0 = _mm256_fmadd_ps(a, b1, h0);
        a = _mm256_broadcast_ss(x1 + k);
        l1 = _mm256_fmadd_ps(a, b0, l1), h1 = _mm256_fmadd_ps(a, b1, h1);
        a = _mm256_broadcast_ss(x2 + k);
        l2 = _mm256_fmadd_ps(a, b0, l2), h2 = _mm256_fmadd_ps(a, b1, h2);
        a = _mm256_broadcast_ss(x3 + k);
        l3 = _mm256_fmadd_ps(a, b0, l3), h3 = _mm256_fmadd_ps(a, b1, h3);
        a = _mm256_broadcast_ss(x4 + k);
        l4 = _mm256_fmadd_ps(a, b0, l4), h4 = _mm256_fmadd_ps(a, b1, h4);
        a = _mm256_broadcast_ss(x5 + k);
        l5 = _mm256_fmadd_ps(a, b0, l5), h5 = _mm256_fmadd_ps(a, b1, h5);
    }
    store_row(y, l0, h0, accumulate, bias, valid);
    if (rows > 1) store_row(y + ldy, l1, h1, accumulate, bias, valid);
    if (rows > 2) store_row(y + 2 * ldy, l2, h2, accumulate, bias, valid);
    if (rows > 3) store_row(y + 3 * ldy, l3, h3, accumulate, bias, valid);
    if (rows > 4) store_row(y + 4 * ldy, l4, h4, accumulate, bias, valid);
    if (rows > 5) store_row(y + 5 * ldy, l5, h5, accumulate, bias, valid);
}

#if defined(__AVX512F__)
/* With AVX-512 a panel row (16 halves) widens to one 512-bit register: tiles take two panels at a time (below);
 * an odd last panel takes the AVX2 `tile`. */
static inline __attribute__((always_inline)) void store_row16(float *y, __m512 v, int accumulate, const float *bias,
                                                              int valid) {
    if (valid == NR) {
        if (accumulate) v = _mm512_add_ps(v, _mm512_loadu_ps(y));
        if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
        _mm512_storeu_ps(y, v);
        return;
    }
    float row[NR];
    _mm512_storeu_ps(row, v);
    for (int j = 0; j < valid; j++) y[j] = row[j] + (accumulate ? y[j] : 0.0f) + (bias ? bias[j] : 0.0f);
}

/* 6 rows x two panels (32 columns) in 12 registers: two weight loads and six broadcasts per 12 FMAs. */
static void tile_pair(int rows, const float *x, int64_t ldx, const uint16_t *panel0, const uint16_t *panel1,
                      int depth, int accumulate, const float *bias, float *y, int64_t ldy, int valid1) {
#define ROW(i) (x + (rows > (i) ? (i) : rows - 1) * ldx)
    const float *x0 = ROW(0), *x1 = ROW(1), *x2 = ROW(2), *x3 = ROW(3), *x4 = ROW(4), *x5 = ROW(5);
#undef ROW
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0;
    for (int k = 0; k < depth; k++) {
        const __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(panel0 + (int64_t)k * NR)));
        const __m512 w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(panel1 + (int64_t)k * NR)));
        __m512 v = _mm512_set1_ps(x0[k]);
        a0 = _mm512_fmadd_ps(v, w0, a0), b0 = _mm512_fmadd_ps(v, w1, b0);
        v = _mm512_set1_ps(x1[k]);
        a1 = _mm512_fmadd_ps(v, w0, a1), b1 = _mm512_fmadd_ps(v, w1, b1);
        v = _mm512_set1_ps(x2[k]);
        a2 = _mm512_fmadd_ps(v, w0, a2), b2 = _mm512_fmadd_ps(v, w1, b2);
        v = _mm512_set1_ps(x3[k]);
        a3 = _mm512_fmadd_ps(v, w0, a3), b3 = _mm512_fmadd_ps(v, w1, b3);
        v = _mm512_set1_ps(x4[k]);
        a4 = _mm512_fmadd_ps(v, w0, a4), b4 = _mm512_fmadd_ps(v, w1, b4);
        v = _mm512_set1_ps(x5[k]);
        a5 = _mm512_fmadd_ps(v, w0, a5), b5 = _mm512_fmadd_ps(v, w1, b5);
    }
    const __m512 a[6] = {a0, a1, a2, a3, a4, a5}, b[6] = {b0, b1, b2, b3, b4, b5};
    for (int r = 0; r < rows; r++) {
        store_row16(y + r * ldy, a[r], accumulate, bias, NR);
        store_row16(y + r * ldy + NR, b[r], accumulate, bias ? bias + NR : NULL, valid1);
    }
}
#define PAIRS 1
#else
#define PAIRS 0
#endif

static void one_row(const float *x, const uint16_t *panel, int64_t K, const float *bias, float *y, int valid) {
    __m256 lo0 = _mm256_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
    int64_t k = 0;
    for (; k + 1 < K; k += 2) {
        const __m256 a0 = _mm256_broadcast_ss(x + k), a1 = _mm256_broadcast_ss(x + k + 1);
        const uint16_t *b = panel + k * NR;
        lo0 = _mm256_fmadd_ps(a0, load_half8(b), lo0);
        hi0 = _mm256_fmadd_ps(a0, load_half8(b + 8), hi0);
        lo1 = _mm256_fmadd_ps(a1, load_half8(b + 16), lo1);
        hi1 = _mm256_fmadd_ps(a1, load_half8(b + 24), hi1);
    }
    if (k < K) {
        const __m256 a0 = _mm256_broadcast_ss(x + k);
        lo0 = _mm256_fmadd_ps(a0, load_half8(panel + k * NR), lo0);
        hi0 = _mm256_fmadd_ps(a0, load_half8(panel + k * NR + 8), hi0);
    }
    store_row(y, _mm256_add_ps(lo0, lo1), _mm256_add_ps(hi0, hi1), 0, bias, valid);
}

/* Blocking for more than one row of x: k in blocks of at most KC (a panel's block, 16 x KC halves, stays in L1),
 * rows in chunks of MC (a chunk's x block, MC x KC floats, stays in L2). */
#define KC 512
#define MC 120

/* x (M, K) float32 contiguous, packed as above, bias (N,) or NULL, y (M, N) float32 contiguous. */
int dsserve_linear_f16(const float *x, const uint16_t *packed, const float *bias, float *y, int64_t M, int64_t N,
                       int64_t K) {
    const int64_t panels = (N + NR - 1) / NR;
    if (M == 1) {  /* batch-1 decode: bound by reading the weights once */
#pragma omp parallel for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            const int valid = N - p * NR < NR ? (int)(N - p * NR) : NR;
            one_row(x, packed + p * K * NR, K, bias ? bias + p * NR : NULL, y + p * NR, valid);
        }
        return 0;
    }
    const int64_t k_blocks = (K + KC - 1) / KC, depth_max = (K + k_blocks - 1) / k_blocks;  /* even blocks */
    const int64_t chunks = (M + MC - 1) / MC;
#pragma omp parallel
    for (int64_t kb = 0; kb < k_blocks; kb++) {
        const int64_t k0 = kb * depth_max;
        const int depth = (int)(K - k0 < depth_max ? K - k0 : depth_max);
        const int last = kb == k_blocks - 1;
        /* (row chunk, panel) tasks, row chunks outermost: a thread's run of tasks shares its x block. With
         * AVX-512, tasks of two panels (the last one alone when the count is odd). */
        const int64_t units = PAIRS ? (panels + 1) / 2 : panels;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < chunks * units; task++) {
            const int64_t c = task / units, u = task % units;
#if PAIRS
            if (2 * u + 1 < panels) {
                const int64_t p = 2 * u;
                const int valid1 = N - (p + 1) * NR < NR ? (int)(N - (p + 1) * NR) : NR;
                const uint16_t *panel0 = packed + p * K * NR + k0 * NR, *panel1 = panel0 + K * NR;
                const float *b = bias && last ? bias + p * NR : NULL;
                const int64_t m_end = (c + 1) * MC < M ? (c + 1) * MC : M;
                for (int64_t m = c * MC; m < m_end; m += 6) {
                    const int rows = m_end - m < 6 ? (int)(m_end - m) : 6;
                    tile_pair(rows, x + m * K + k0, K, panel0, panel1, depth, kb > 0, b, y + m * N + p * NR, N, valid1);
                }
                continue;
            }
            const int64_t p = PAIRS ? 2 * u : u;
#else
            const int64_t p = u;
#endif
            const int valid = N - p * NR < NR ? (int)(N - p * NR) : NR;
            const uint16_t *panel = packed + p * K * NR + k0 * NR;
            const float *b = bias && last ? bias + p * NR : NULL;
            const int64_t m_end = (c + 1) * MC < M ? (c + 1) * MC : M;
            for (int64_t m = c * MC; m < m_end; m += 6) {
                const int rows = m_end - m < 6 ? (int)(m_end - m) : 6;
                tile(rows, x + m * K + k0, K, panel, depth, kb > 0, b, y + m * N + p * NR, N, valid);
            }
        }
    }
    return 0;
}

/* One linear per head: y[t, h] = x[t, h] W_h^T, W_h (N, K) in float16, packed as above and stacked head after
 * head (head_stride halves apart); x (T, H, K) and y (T, H, N) contiguous float32. MLA's absorbed decode: the
 * queries into latent space (W_h = W_UK[h]^T) and the attention output back out of it (W_h = W_UV[h]), which
 * einsum over float32 weights does at a tenth of the memory bandwidth at batch 1. Tasks: (head, panel, block
 * of six tokens). */
int dsserve_heads_f16(const float *x, const uint16_t *packed, int64_t head_stride, float *y, int64_t T, int64_t H,
                      int64_t N, int64_t K) {
    const int64_t panels = (N + NR - 1) / NR, blocks = (T + 5) / 6;
#pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < H * panels * blocks; task++) {
        const int64_t h = task / (panels * blocks), p = task / blocks % panels, m = task % blocks * 6;
        const uint16_t *panel = packed + h * head_stride + p * K * NR;
        const int valid = N - p * NR < NR ? (int)(N - p * NR) : NR;
        const int rows = T - m < 6 ? (int)(T - m) : 6;
        if (rows == 1) one_row(x + (m * H + h) * K, panel, K, NULL, y + (m * H + h) * N + p * NR, valid);
        else tile(rows, x + (m * H + h) * K, H * K, panel, (int)K, 0, NULL, y + (m * H + h) * N + p * NR, H * N, valid);
    }
    return 0;
}

/* Routed experts for a few tokens (decode at small batch), float16 weights packed as above: out[t] =
 * sum_s weights[t, s] * W2[e] (silu(G[e] x[t]) * (U[e] x[t])), e = ids[t, s], over the T * k (token, slot)
 * pairs whose expert is in [0, num_experts) (other ranks' experts are skipped). w13[e] packs [G; U] (2I, D),
 * w2[e] (D, I). One parallel region, three phases split by barriers: every pair's gate/up GEMV (pairs x panels
 * spread over the threads), silu * up, every pair's down GEMV, then the weighted sum per token. Instead of
 * sorting the tokens by expert and calling torch per expert (~25 ops per layer at batch 1).
 * scratch: T * k * (3 I + D) floats. x (T, D) contiguous, out (T, D). */
int dsserve_moe_f16(const float *x, int64_t T, int64_t D, const int64_t *ids, const float *weights, int64_t k,
                    const uint16_t *const *w13, const uint16_t *const *w2, int64_t num_experts, int64_t I,
                    float *out, float *scratch) {
    const int64_t pairs = T * k, up_panels = (2 * I + NR - 1) / NR, down_panels = (D + NR - 1) / NR;
    float *gate_up = scratch, *hidden = scratch + pairs * 2 * I, *down = hidden + pairs * I;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t task = 0; task < pairs * up_panels; task++) {
            const int64_t pair = task / up_panels, p = task % up_panels, e = ids[pair];
            if (e < 0 || e >= num_experts) continue;
            const int valid = 2 * I - p * NR < NR ? (int)(2 * I - p * NR) : NR;
            one_row(x + (pair / k) * D, w13[e] + p * D * NR, D, NULL, gate_up + pair * 2 * I + p * NR, valid);
        }
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < pairs; pair++) {
            const float *g = gate_up + pair * 2 * I, *u = g + I;
            float *h = hidden + pair * I;
            for (int64_t j = 0; j < I; j++) h[j] = silu_times(g[j], u[j]);
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < pairs * down_panels; task++) {
            const int64_t pair = task / down_panels, p = task % down_panels, e = ids[pair];
            if (e < 0 || e >= num_experts) continue;
            const int valid = D - p * NR < NR ? (int)(D - p * NR) : NR;
            one_row(hidden + pair * I, w2[e] + p * I * NR, I, NULL, down + pair * D + p * NR, valid);
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            float *o = out + t * D;
            for (int64_t j = 0; j < D; j++) o[j] = 0.0f;
            for (int64_t s = 0; s < k; s++) {
                const int64_t pair = t * k + s;
                if (ids[pair] < 0 || ids[pair] >= num_experts) continue;
                const float w = weights[pair], *y = down + pair * D;
                for (int64_t j = 0; j < D; j++) o[j] += w * y[j];
            }
        }
    }
    return 0;
}

/* W (N, K) float32 row-major -> the packed float16 layout (round to nearest even; ceil(N / 16) * 16 * K halves). */
int dsserve_pack_f16(const float *w, int64_t N, int64_t K, uint16_t *packed) {
    const int64_t panels = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        uint16_t *dst = packed + p * K * NR;
        for (int64_t k = 0; k < K; k++) {
            float column[NR];
            for (int j = 0; j < NR; j++) {
                const int64_t n = p * NR + j;
                column[j] = n < N ? w[n * K + k] : 0.0f;
            }
            _mm_storeu_si128((__m128i *)(dst + k * NR), _mm256_cvtps_ph(_mm256_loadu_ps(column), _MM_FROUND_TO_NEAREST_INT));
            _mm_storeu_si128((__m128i *)(dst + k * NR + 8),
                             _mm256_cvtps_ph(_mm256_loadu_ps(column + 8), _MM_FROUND_TO_NEAREST_INT));
        }
    }
    return 0;
}

#else
#define LINEAR_F16_SUPPORTED 0

int dsserve_heads_f16(const float *x, const uint16_t *packed, int64_t head_stride, float *y, int64_t T, int64_t H,
                      int64_t N, int64_t K) {
    (void)x, (void)packed, (void)head_stride, (void)y, (void)T, (void)H, (void)N, (void)K;
    return -1;
}

int dsserve_moe_f16(const float *x, int64_t T, int64_t D, const int64_t *ids, const float *weights, int64_t k,
                    const uint16_t *const *w13, const uint16_t *const *w2, int64_t num_experts, int64_t I,
                    float *out, float *scratch) {
    (void)x, (void)T, (void)D, (void)ids, (void)weights, (void)k, (void)w13, (void)w2, (void)num_experts, (void)I;
    (void)out, (void)scratch;
    return -1;
}

int dsserve_linear_f16(const float *x, const uint16_t *packed, const float *bias, float *y, int64_t M, int64_t N,
                       int64_t K) {
    (void)x, (void)packed, (void)bias, (void)y, (void)M, (void)N, (void)K;
    return -1;
}

int dsserve_pack_f16(const float *w, int64_t N, int64_t K, uint16_t *packed) {
    (void)w, (void)N, (void)K, (void)packed;
    return -1;
}
#endif

/* Whether this build has the float16 linear (AVX2 + FMA + F16C); layers/linear.py uses FBGEMM otherwise. */
int dsserve_linear_f16_supported(void) { return LINEAR_F16_SUPPORTED; }
