/* y = x W^T (+ b) with W stored in bfloat16, x and y float32: on CPUs with AMX tiles (Sapphire Rapids and later)
 * the matmul of several rows runs on the tile unit (x rounded to bf16, products summed in fp32), one row is a
 * bandwidth-bound AVX-512 GEMV in fp32 (x kept exact). One packed layout serves both.
 *
 * Layout (dsserve/backends/cpu/kernels.py: pack_bf16 builds it with torch): panels of 16 output rows, an even number of
 * them (a zero panel pads an odd count); within a panel the K inputs come in pairs, each pair as 16 x 2 halves:
 *     packed[p][k / 2][n][k % 2] = W[16 p + n][k]       (rows past N and columns past K are zero)
 * so sixteen consecutive pairs (32 inputs x 16 outputs, 1 KiB) are exactly one AMX B tile, and one pair row
 * (64 bytes) is one AVX-512 load for the GEMV. K is padded to a multiple of 32.
 *
 * Without AMX + AVX512-BF16 at build time every entry point returns -1 (cpu.py then packs for oneDNN instead).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dsserve_kernels.h"
#include "vec_math.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512F__) && \
    defined(__linux__)
#include "amx.h"
#define LINEAR_BF16_SUPPORTED 1

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch's .bfloat16() */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* One row times two panels (w0 and w1, read side by side): their 16 outputs each; the weights widen to fp32 by a
 * shift (bf16 is fp32's top half). Two streams of loads in flight per thread: one panel at a time, the GEMV read
 * 20.5 GB/s where the tile kernel reads 24.5; two at a time, 24. Each panel's sum runs in the same order either way
 * (four partial sums, two pairs per step), so a panel's outputs do not depend on its neighbour. */
#define PAIR_FMA(acc, pair, shifted, xv) \
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(shifted ? _mm512_slli_epi32(pair, 16) : _mm512_and_si512(pair, high)), \
                          _mm512_set1_ps(xv), acc)
static inline void two_panels_dot(const float *x, const uint16_t *w0, const uint16_t *w1, int64_t K, __m512 *out0,
                                  __m512 *out1) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
    int64_t kk = 0;
    for (; 2 * kk + 3 < K; kk += 2) { /* two pairs per iteration: four independent sums per panel */
        const __m512i p0 = _mm512_loadu_si512((const void *)(w0 + kk * 32));
        const __m512i q0 = _mm512_loadu_si512((const void *)(w1 + kk * 32));
        const __m512i p1 = _mm512_loadu_si512((const void *)(w0 + kk * 32 + 32));
        const __m512i q1 = _mm512_loadu_si512((const void *)(w1 + kk * 32 + 32));
        PAIR_FMA(a0, p0, 1, x[2 * kk]);
        PAIR_FMA(b0, q0, 1, x[2 * kk]);
        PAIR_FMA(a1, p0, 0, x[2 * kk + 1]);
        PAIR_FMA(b1, q0, 0, x[2 * kk + 1]);
        PAIR_FMA(a2, p1, 1, x[2 * kk + 2]);
        PAIR_FMA(b2, q1, 1, x[2 * kk + 2]);
        PAIR_FMA(a3, p1, 0, x[2 * kk + 3]);
        PAIR_FMA(b3, q1, 0, x[2 * kk + 3]);
    }
    for (; 2 * kk + 1 < K; kk++) {
        const __m512i p0 = _mm512_loadu_si512((const void *)(w0 + kk * 32));
        const __m512i q0 = _mm512_loadu_si512((const void *)(w1 + kk * 32));
        PAIR_FMA(a0, p0, 1, x[2 * kk]);
        PAIR_FMA(b0, q0, 1, x[2 * kk]);
        PAIR_FMA(a1, p0, 0, x[2 * kk + 1]);
        PAIR_FMA(b1, q0, 0, x[2 * kk + 1]);
    }
    if (2 * kk < K) { /* an odd K: the last input has no partner (its pair's second half is zero) */
        const __m512i p0 = _mm512_loadu_si512((const void *)(w0 + kk * 32));
        const __m512i q0 = _mm512_loadu_si512((const void *)(w1 + kk * 32));
        PAIR_FMA(a0, p0, 1, x[2 * kk]);
        PAIR_FMA(b0, q0, 1, x[2 * kk]);
    }
    *out0 = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    *out1 = _mm512_add_ps(_mm512_add_ps(b0, b1), _mm512_add_ps(b2, b3));
}
#undef PAIR_FMA

/* One row: each thread streams whole pairs of panels (the layout pads an odd count with a zero panel). */
static void gemv(const float *x, const uint16_t *packed, const float *bias, float *y, int64_t N, int64_t K,
                 int64_t Kp) {
    const int64_t panels = (N + 15) / 16;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p += 2) {
        float out[32];
        __m512 first, second;
        two_panels_dot(x, packed + p * Kp * 16, packed + (p + 1) * Kp * 16, K, &first, &second);
        _mm512_storeu_ps(out, first);
        _mm512_storeu_ps(out + 16, second);
        const int valid = N - p * 16 < 32 ? (int)(N - p * 16) : 32;
        for (int n = 0; n < valid; n++) y[p * 16 + n] = out[n] + (bias ? bias[p * 16 + n] : 0.0f);
    }
}

/* One row through SwiGLU: gate panel p and up panel p + I / 16 side by side, y[16 p + n] = silu(gate) * up. */
static void gemv_swiglu(const float *x, const uint16_t *packed, float *y, int64_t I, int64_t K, int64_t Kp) {
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < I / 16; p++) {
        float gate[16], up[16];
        __m512 g, u;
        two_panels_dot(x, packed + p * Kp * 16, packed + (p + I / 16) * Kp * 16, K, &g, &u);
        _mm512_storeu_ps(gate, g);
        _mm512_storeu_ps(up, u);
        for (int n = 0; n < 16; n++) y[p * 16 + n] = silu_times(gate[n], up[n]);
    }
}

/* Rows [32 b, 32 b + 32) of y, outputs of panels p0 and p0 + 1: four C tiles over the depth [kb, ke). The first
 * depth range starts from zero, a later one from the sums y already holds; the last adds the bias. Whole tiles
 * (inside M x N) go straight to y; edges through a buffer.
 *
 * The tile registers are not renamed: a load into a tile waits for the products still reading it. The loads are
 * interleaved with the products (each as late as it can be) so that the next step's loads overlap this step's
 * last products: measured 5-30% faster than four loads ahead of four products. */
/* The weights of the panels a thread takes next, to prefetch into L2 while this task computes: a task is one of
 * `chunk` row blocks over the same panels, and prefetches its share of the next panels' depth range [kb, ke), so
 * that they arrive from memory spread over the chunk (tile loads are not prefetched by the hardware: a task that
 * starts on panels in memory stalls on every load). */
typedef struct {
    const char *first, *second; /* this task's share of the next two panels, or NULL */
    int64_t lines;              /* cache lines of each */
} next_panels;

static inline next_panels share_of_next(const uint16_t *packed, int64_t Kp, int64_t first, int64_t second,
                                        int64_t panels, int64_t kb, int64_t ke, int64_t task_in_chunk, int64_t chunk) {
    next_panels next = {NULL, NULL, 0};
    if (first >= panels || second >= panels) return next;
    const int64_t lines = (ke - kb) / 2, share = (lines + chunk - 1) / chunk, start = task_in_chunk * share;
    if (start >= lines) return next;
    next.first = (const char *)(packed + first * Kp * 16 + kb * 16) + start * 64;
    next.second = (const char *)(packed + second * Kp * 16 + kb * 16) + start * 64;
    next.lines = lines - start < share ? lines - start : share;
    return next;
}

static inline void tiles_times_panels(const uint16_t *a, const uint16_t *w0, const uint16_t *w1, int64_t Kp,
                                      int64_t kb, int64_t ke, next_panels next) {
    const int64_t per_step = next.first ? (next.lines + (ke - kb) / 32 - 1) / ((ke - kb) / 32) : 0;
    int64_t fetched = 0;
    for (int64_t k0 = kb; k0 < ke; k0 += 32) {
        for (int64_t l = 0; l < per_step && fetched < next.lines; l++, fetched++) {
            _mm_prefetch(next.first + 64 * fetched, _MM_HINT_T1);
            _mm_prefetch(next.second + 64 * fetched, _MM_HINT_T1);
        }
        _tile_loadd(6, w0 + k0 * 16, 64);
        _tile_loadd(4, a + k0, Kp * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, w1 + k0 * 16, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, a + 16 * Kp + k0, Kp * 2);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
}

static inline void block_times_pair(const uint16_t *xb, const uint16_t *packed, const float *bias, float *y,
                                    int64_t M, int64_t N, int64_t Kp, int64_t b, int64_t p0, int64_t kb, int64_t ke,
                                    next_panels next) {
    const uint16_t *a = xb + b * 32 * Kp;
    const uint16_t *w0 = packed + p0 * Kp * 16, *w1 = w0 + Kp * 16;
    const int64_t m0 = b * 32, n0 = p0 * 16;
    const int whole = m0 + 32 <= M && n0 + 32 <= N, last = ke == Kp;
    float c[4][16 * 16];
    if (kb == 0) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    } else if (whole) {
        _tile_loadd(0, y + m0 * N + n0, N * 4);
        _tile_loadd(1, y + m0 * N + n0 + 16, N * 4);
        _tile_loadd(2, y + (m0 + 16) * N + n0, N * 4);
        _tile_loadd(3, y + (m0 + 16) * N + n0 + 16, N * 4);
    } else {
        for (int t = 0; t < 4; t++) {
            const int64_t mt = m0 + (t >> 1) * 16, nt = n0 + (t & 1) * 16;
            for (int r = 0; r < 16; r++)
                for (int n = 0; n < 16; n++)
                    c[t][r * 16 + n] = mt + r < M && nt + n < N ? y[(mt + r) * N + nt + n] : 0.0f;
        }
        _tile_loadd(0, c[0], 64);
        _tile_loadd(1, c[1], 64);
        _tile_loadd(2, c[2], 64);
        _tile_loadd(3, c[3], 64);
    }
    tiles_times_panels(a, w0, w1, Kp, kb, ke, next);
    if (whole) {
        _tile_stored(0, y + m0 * N + n0, N * 4);
        _tile_stored(1, y + m0 * N + n0 + 16, N * 4);
        _tile_stored(2, y + (m0 + 16) * N + n0, N * 4);
        _tile_stored(3, y + (m0 + 16) * N + n0 + 16, N * 4);
        if (bias && last)
            for (int64_t r = m0; r < m0 + 32; r++) {
                float *out = y + r * N + n0;
                _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), _mm512_loadu_ps(bias + n0)));
                _mm512_storeu_ps(out + 16, _mm512_add_ps(_mm512_loadu_ps(out + 16), _mm512_loadu_ps(bias + n0 + 16)));
            }
        return;
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    for (int t = 0; t < 4; t++) {
        const int64_t mt = m0 + (t >> 1) * 16, nt = n0 + (t & 1) * 16;
        if (nt >= N) continue;
        const int valid = N - nt < 16 ? (int)(N - nt) : 16;
        for (int r = 0; r < 16 && mt + r < M; r++) {
            float *out = y + (mt + r) * N + nt;
            for (int n = 0; n < valid; n++) out[n] = c[t][r * 16 + n] + (bias && last ? bias[nt + n] : 0.0f);
        }
    }
}

/* x (M, K) float32 -> xb (Mp, Kp) bf16, rows and columns zero-padded to whole tiles; inside a parallel region. */
static void rows_to_bf16(const float *x, uint16_t *xb, int64_t M, int64_t Mp, int64_t K, int64_t Kp) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < Mp; m++) {
        uint16_t *row = xb + m * Kp;
        int64_t k = 0;
        if (m < M) {
            for (; k + 16 <= K; k += 16)
                _mm256_storeu_si256((__m256i *)(row + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + m * K + k)));
            for (; k < K; k++) row[k] = to_bf16(x[m * K + k]);
        }
        for (; k < Kp; k++) row[k] = 0;
    }
}

#define CHUNK 8
#define DEPTH 2048

/* x (M, K) float32 contiguous, packed as above (Kp = K rounded up to 32), bias (N,) or NULL, y (M, N) float32. */
int dsserve_linear_bf16(const float *x, const uint16_t *packed, const float *bias, float *y, int64_t M, int64_t N,
                        int64_t K) {
    const int64_t Kp = (K + 31) / 32 * 32;
    if (M == 1) {
        gemv(x, packed, bias, y, N, K, Kp);
        return 0;
    }
    if (!amx_permitted()) return -4;
    const int64_t Mp = (M + 31) / 32 * 32, panels = (N + 15) / 16, pairs = (panels + 1) / 2, blocks = Mp / 32;
    uint16_t *xb = aligned_alloc(64, (size_t)(Mp * Kp * 2));
    if (xb == NULL) return -3;
#pragma omp parallel
    {
        rows_to_bf16(x, xb, M, Mp, K, Kp);
        configure_tiles();
        /* Rows in chunks of CHUNK blocks of 32, the depth in ranges of at most DEPTH (a chunk's range of x, at most
         * 256 x 2048 halves, stays in L2; with the whole depth at once, K = 8960 ran 15-25% slower); within a chunk
         * and range, tasks are pairs of panels, each over the chunk's blocks: a pair's weights come from memory once
         * per chunk and range, for its first block, and each thread streams its share of them. The depth ranges of
         * one (block, pair) follow each other on one thread: loops of one trip count under schedule(static) hand
         * every thread the same iterations, so `nowait` needs no barrier between them. */
        const int64_t ranges = (Kp + DEPTH - 1) / DEPTH, depth = (Kp / 32 + ranges - 1) / ranges * 32;
        for (int64_t c0 = 0; c0 < blocks; c0 += CHUNK) {
            const int64_t chunk = blocks - c0 < CHUNK ? blocks - c0 : CHUNK;
            for (int64_t kb = 0; kb < Kp; kb += depth) {
                const int64_t ke = kb + depth < Kp ? kb + depth : Kp;
#pragma omp for schedule(static) nowait
                for (int64_t task = 0; task < chunk * pairs; task++) {
                    const int64_t i = task % chunk, p0 = 2 * (task / chunk);
                    block_times_pair(xb, packed, bias, y, M, N, Kp, c0 + i, p0, kb, ke,
                                     share_of_next(packed, Kp, p0 + 2, p0 + 3, 2 * pairs, kb, ke, i, chunk));
                }
            }
        }
        _tile_release();
    }
    free(xb);
    return 0;
}

/* y (M, I) = silu(x Wg^T) * (x Wu^T): packed is the (2 I, K) gate_up weight (gate rows first) in the layout above,
 * I a multiple of 16, so gate panel p and up panel p + I / 16 hold the same outputs. A task is one 32-row block
 * times that pair of panels over the whole depth; the four C tiles go through SwiGLU on their way out, so the
 * (M, 2 I) product is never written. Chunks of row blocks are sized so that a chunk of x stays in L2. */
int dsserve_linear_bf16_swiglu(const float *x, const uint16_t *packed, float *y, int64_t M, int64_t I, int64_t K) {
    if (I % 16) return -2;
    const int64_t Kp = (K + 31) / 32 * 32;
    if (M == 1) {
        gemv_swiglu(x, packed, y, I, K, Kp);
        return 0;
    }
    if (!amx_permitted()) return -4;
    if (Kp > DEPTH) {
        /* Deep sums (V3's 7168 inputs): a task over the whole depth keeps too few row blocks of x in L2 to reuse
         * each weight panel (2 blocks at 7168: the 528 MB gate_up weight streamed 32 times per 2048 rows, 0.87
         * TFLOP/s), so the product goes through the linear's depth ranges instead, 256 rows at a time into a buffer,
         * and SwiGLU after it (1.9 TFLOP/s there); the same values as the linear followed by silu_mul. */
        const int64_t rows = CHUNK * 32;
        float *buf = aligned_alloc(64, (size_t)(rows * 2 * I * 4));
        if (buf == NULL) return -3;
        int status = 0;
        for (int64_t r0 = 0; r0 < M && !status; r0 += rows) {
            const int64_t n = M - r0 < rows ? M - r0 : rows;
            status = dsserve_linear_bf16(x + r0 * K, packed, NULL, buf, n, 2 * I, K);
            if (!status) dsserve_silu_mul(buf, y + r0 * I, n, I);
        }
        free(buf);
        return status;
    }
    const int64_t Mp = (M + 31) / 32 * 32, blocks = Mp / 32, panels = I / 16;
    int64_t per_chunk = (1 << 20) / (64 * Kp);
    per_chunk = per_chunk < 1 ? 1 : per_chunk > CHUNK ? CHUNK : per_chunk;
    uint16_t *xb = aligned_alloc(64, (size_t)(Mp * Kp * 2));
    if (xb == NULL) return -3;
#pragma omp parallel
    {
        rows_to_bf16(x, xb, M, Mp, K, Kp);
        configure_tiles();
        for (int64_t c0 = 0; c0 < blocks; c0 += per_chunk) {
            const int64_t chunk = blocks - c0 < per_chunk ? blocks - c0 : per_chunk;
#pragma omp for schedule(static) nowait
            for (int64_t task = 0; task < chunk * panels; task++) {
                const int64_t i = task % chunk, b = c0 + i, p = task / chunk, m0 = b * 32;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                tiles_times_panels(xb + b * 32 * Kp, packed + p * Kp * 16, packed + (p + panels) * Kp * 16, Kp, 0, Kp,
                                   share_of_next(packed, Kp, p + 1, p + 1 + panels, 2 * panels, 0, Kp, i, chunk));
                float c[4][16 * 16]; /* rows 0-15 gate, up; rows 16-31 gate, up */
                _tile_stored(0, c[0], 64);
                _tile_stored(1, c[1], 64);
                _tile_stored(2, c[2], 64);
                _tile_stored(3, c[3], 64);
                for (int64_t r = 0; r < 32 && m0 + r < M; r++) {
                    const float *gate = c[(r / 16) * 2] + (r % 16) * 16, *up = gate + 256;
                    float *out = y + (m0 + r) * I + p * 16;
                    for (int n = 0; n < 16; n++) out[n] = silu_times(gate[n], up[n]);
                }
            }
        }
        _tile_release();
    }
    free(xb);
    return 0;
}

/* Whether this process may use the tile unit (the kernel then runs); asks the kernel for permission once. */
int dsserve_linear_bf16_supported(void) { return amx_permitted(); }

#else
#define LINEAR_BF16_SUPPORTED 0
int dsserve_linear_bf16(const float *x, const uint16_t *packed, const float *bias, float *y, int64_t M, int64_t N,
                        int64_t K) {
    (void)x, (void)packed, (void)bias, (void)y, (void)M, (void)N, (void)K;
    return -1;
}
int dsserve_linear_bf16_swiglu(const float *x, const uint16_t *packed, float *y, int64_t M, int64_t I, int64_t K) {
    (void)x, (void)packed, (void)y, (void)M, (void)I, (void)K;
    return -1;
}
int dsserve_linear_bf16_supported(void) { return 0; }
#endif
