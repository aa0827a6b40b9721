/* y = x W^T (+ b) for `--quantization w8a8`: int8 weights with a float32 scale per output row, and each row of x
 * quantized to int8 on the fly with its own scale; the products summed exactly in int32. Many rows run on AMX int8
 * tiles (TDPBSSD, Sapphire Rapids and later), few rows and CPUs without AMX on AVX512-VNNI (VPDPBUSD).
 *
 * The twin is formats/quantization.py's reference_linear: per row of x, scale = max |x| / 127 and
 * q = round(x / scale) (half to even, clamped to +-127; an all-zero row quantizes to zeros with scale 0), exactly
 * quantize_activations. Then y[m, n] = float(sum_k q_x[m, k] q_w[n, k]) * x_scale[m] * w_scale[n] (+ bias[n]) in
 * float32: the integer sums are exact, only the final scaling rounds (the reference scales in float64), and both
 * paths scale the same way, so a row's outputs do not depend on how many rows came with it.
 *
 * Layout (kernels.py: pack_w8a8 builds it): panels of 16 output rows, an even number of them (a zero panel pads an
 * odd count); within a panel the inputs come in fours, each four as 16 x 4 bytes:
 *     packed[p][k / 4][n][k % 4] = q_w[16 p + n][k]       (rows past N and columns past K are zero)
 * K padded to a multiple of 64, so sixteen consecutive fours (64 inputs x 16 outputs, 1 KiB) are one AMX B tile for
 * TDPBSSD, and one four (64 bytes) is one VPDPBUSD operand for 16 outputs.
 *     scales[16 p + n]   float32, the weight rows' scales (zero past N)
 *     sums[16 p + n]     int32, sum_k q_w[n, k]: VPDPBUSD multiplies unsigned by signed bytes, so the VNNI path
 *                        feeds q_x + 128 and takes 128 sums[n] off each sum
 *
 * Without AVX512-VNNI at build time every entry point returns -1 (kernels.py then refuses w8a8).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dsserve_kernels.h"
#include "vec_math.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#include "amx.h"
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
#endif

#define NR 16
#define VNNI_ROWS 4     /* rows per VNNI micro-kernel: 4 rows x 2 panels x 2 partial sums = 16 accumulators */
#define CHUNK 8         /* AMX: row blocks of 32 per chunk ... */
#define DEPTH 4096      /* ... and inputs per depth range: a chunk's x (256 x 4 KiB) stays in L2, as linear_bf16.c */

static inline __mmask16 first_lanes(int64_t count) {
    return count >= NR ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1u);
}

/* Rows [0, Mp) of xq (Mp, Kp): row m < M is x[m] quantized (quantize_activations), plus 128 where `unsigned_bytes`
 * (the VNNI path's u8 operand); columns past K and rows past M are zero (they meet zero weights or are not stored).
 * scales[m] = max |x[m]| / 127. Inside a parallel region. */
static void quantize_rows(const float *x, int8_t *xq, float *scales, int64_t M, int64_t Mp, int64_t K, int64_t Kp,
                          int unsigned_bytes) {
    const __m512i high = _mm512_set1_epi32(127), low = _mm512_set1_epi32(-127);
    const __m512i offset = _mm512_set1_epi32(unsigned_bytes ? 128 : 0);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < Mp; m++) {
        int8_t *row = xq + m * Kp;
        if (m >= M) {
            memset(row, 0, (size_t)Kp);
            continue;
        }
        const float *xr = x + m * K;
        __m512 amax = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += NR)
            amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(first_lanes(K - k), xr + k)));
        const float scale = _mm512_reduce_max_ps(amax) / 127.0f;
        scales[m] = scale;
        /* q = round(x / scale) with x / scale a true division, as torch's. A multiply by 1 / scale is within 2 units
         * in the last place of it (< 4e-5 below 128) and rounds to the same integer unless it lies that close to a
         * half: only a vector with such a lane is divided (the division costs ~20% of a 512-row product). A row so
         * tiny that 1 / scale is not finite is divided throughout. */
        const float divisor = scale == 0.0f ? 1.0f : scale;
        const int divide_all = !(1.0f / divisor < 3.0e38f);
        const __m512 inverse = _mm512_set1_ps(1.0f / divisor), half = _mm512_set1_ps(0.5f);
        const __m512 near = _mm512_set1_ps(1.0f / 8192);
        for (int64_t k = 0; k < K; k += NR) {
            const __mmask16 valid = first_lanes(K - k);
            const __m512 xv = _mm512_maskz_loadu_ps(valid, xr + k);
            __m512 v = _mm512_mul_ps(xv, inverse);
            const __m512 fraction = _mm512_sub_ps(v, _mm512_roundscale_ps(v, _MM_FROUND_TO_NEG_INF));
            const __m512 off_half = _mm512_abs_ps(_mm512_sub_ps(fraction, half));
            if (divide_all || _mm512_cmp_ps_mask(off_half, near, _CMP_LT_OQ)) v = _mm512_div_ps(xv, _mm512_set1_ps(divisor));
            __m512i q = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); /* half to even */
            q = _mm512_add_epi32(_mm512_max_epi32(_mm512_min_epi32(q, high), low), offset);
            _mm_mask_storeu_epi8(row + k, valid, _mm512_cvtepi32_epi8(q));
        }
        memset(row + K, 0, (size_t)(Kp - K));
    }
}

/* y[n0 .. n0 + 16) = float(sum) * x_scale * w_scale (+ bias), the outputs in `valid` only. ws: 16 scales (the
 * layout pads them). */
static inline void scale_out(__m512i sum, float x_scale, const float *ws, const float *bias, float *y,
                             __mmask16 valid) {
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(x_scale)), _mm512_loadu_ps(ws));
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(valid, bias));
    _mm512_mask_storeu_ps(y, valid, v);
}

/* ---- few rows (and CPUs without AMX): AVX512-VNNI --------------------------------------------------------------- */

/* Rows [0, R) of xu (u8: q + 128, row stride Kp) times panels w0 and w1 (read side by side: two load streams per
 * thread), their 16 outputs each, scaled into y. Two partial sums per (row, panel), alternate fours, so that each
 * accumulator waits for its previous VPDPBUSD only every other step. R is a constant at every call (the switch in
 * vnni_rows): the loops over rows unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void vnni_block(const uint8_t *xu, int64_t Kp, const int8_t *w0,
                                                               const int8_t *w1, const float *x_scales,
                                                               const float *ws, const int32_t *wsums,
                                                               const float *bias, float *y, int64_t N, int64_t n0,
                                                               const int R) {
    __m512i acc[VNNI_ROWS][2][2];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 2; j++) acc[r][j][0] = acc[r][j][1] = _mm512_setzero_si512();
    for (int64_t k = 0; k < Kp; k += 8) { /* Kp is a multiple of 64: fours in pairs */
        const __m512i a0 = _mm512_loadu_si512((const void *)(w0 + k * NR));
        const __m512i b0 = _mm512_loadu_si512((const void *)(w1 + k * NR));
        const __m512i a1 = _mm512_loadu_si512((const void *)(w0 + k * NR + 64));
        const __m512i b1 = _mm512_loadu_si512((const void *)(w1 + k * NR + 64));
        for (int r = 0; r < R; r++) {
            int32_t four0, four1;
            memcpy(&four0, xu + r * Kp + k, 4);
            memcpy(&four1, xu + r * Kp + k + 4, 4);
            const __m512i x0 = _mm512_set1_epi32(four0), x1 = _mm512_set1_epi32(four1);
            acc[r][0][0] = _mm512_dpbusd_epi32(acc[r][0][0], x0, a0);
            acc[r][1][0] = _mm512_dpbusd_epi32(acc[r][1][0], x0, b0);
            acc[r][0][1] = _mm512_dpbusd_epi32(acc[r][0][1], x1, a1);
            acc[r][1][1] = _mm512_dpbusd_epi32(acc[r][1][1], x1, b1);
        }
    }
    /* sum (q_x + 128) q_w = sum q_x q_w + 128 sum q_w */
    const __m512i shift0 = _mm512_slli_epi32(_mm512_loadu_si512((const void *)wsums), 7);
    const __m512i shift1 = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(wsums + NR)), 7);
    const __mmask16 valid0 = first_lanes(N - n0), valid1 = n0 + NR < N ? first_lanes(N - n0 - NR) : 0;
    for (int r = 0; r < R; r++) {
        const __m512i s0 = _mm512_sub_epi32(_mm512_add_epi32(acc[r][0][0], acc[r][0][1]), shift0);
        const __m512i s1 = _mm512_sub_epi32(_mm512_add_epi32(acc[r][1][0], acc[r][1][1]), shift1);
        scale_out(s0, x_scales[r], ws, bias ? bias + n0 : NULL, y + r * N + n0, valid0);
        if (valid1) scale_out(s1, x_scales[r], ws + NR, bias ? bias + n0 + NR : NULL, y + r * N + n0 + NR, valid1);
    }
}

/* Every row of xu times every pair of panels: tasks (pair, VNNI_ROWS rows), the pair outermost, so a thread's run of
 * tasks reads its pair's weights from memory once and from L2 after. */
static void vnni_rows(const uint8_t *xu, const float *x_scales, const int8_t *packed, const float *scales,
                      const int32_t *sums, const float *bias, float *y, int64_t M, int64_t N, int64_t Kp) {
    const int64_t pairs = ((N + NR - 1) / NR + 1) / 2, chunks = (M + VNNI_ROWS - 1) / VNNI_ROWS;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < pairs * chunks; task++) {
        const int64_t p = 2 * (task / chunks), m0 = task % chunks * VNNI_ROWS, n0 = p * NR;
        const int8_t *w0 = packed + p * Kp * NR, *w1 = w0 + Kp * NR;
        const uint8_t *xr = xu + m0 * Kp;
        const float *xs = x_scales + m0, *ws = scales + n0;
        const int32_t *wsums = sums + n0;
        float *yr = y + m0 * N;
        switch (M - m0 < VNNI_ROWS ? M - m0 : VNNI_ROWS) {
        case 1: vnni_block(xr, Kp, w0, w1, xs, ws, wsums, bias, yr, N, n0, 1); break;
        case 2: vnni_block(xr, Kp, w0, w1, xs, ws, wsums, bias, yr, N, n0, 2); break;
        case 3: vnni_block(xr, Kp, w0, w1, xs, ws, wsums, bias, yr, N, n0, 3); break;
        default: vnni_block(xr, Kp, w0, w1, xs, ws, wsums, bias, yr, N, n0, 4); break;
        }
    }
}

#if HAVE_AMX
/* ---- many rows: AMX int8 tiles, as linear_bf16.c's bf16 kernel with 64 inputs per tile row ----------------------- */

/* The weights of the panels a thread takes next, to prefetch into L2 while this task computes (as linear_bf16.c:
 * tile loads are not prefetched by the hardware). */
typedef struct {
    const char *first, *second; /* this task's share of the next two panels, or NULL */
    int64_t lines;              /* cache lines of each */
} next_panels;

static inline next_panels share_of_next(const int8_t *packed, int64_t Kp, int64_t first, int64_t second,
                                        int64_t panels, int64_t kb, int64_t ke, int64_t task_in_chunk, int64_t chunk) {
    next_panels next = {NULL, NULL, 0};
    if (first >= panels || second >= panels) return next;
    const int64_t lines = (ke - kb) / 4, share = (lines + chunk - 1) / chunk, start = task_in_chunk * share;
    if (start >= lines) return next;
    next.first = (const char *)(packed + first * Kp * NR + kb * NR) + start * 64;
    next.second = (const char *)(packed + second * Kp * NR + kb * NR) + start * 64;
    next.lines = lines - start < share ? lines - start : share;
    return next;
}

/* C tiles 0..3 (rows 0-15 / 16-31 of a, times panels w0 / w1) += a times the panels over inputs [kb, ke); loads
 * interleaved with the products as linear_bf16.c's tiles_times_panels. */
static inline void tiles_times_panels(const int8_t *a, const int8_t *w0, const int8_t *w1, int64_t Kp, int64_t kb,
                                      int64_t ke, next_panels next) {
    const int64_t per_step = next.first ? (next.lines + (ke - kb) / 64 - 1) / ((ke - kb) / 64) : 0;
    int64_t fetched = 0;
    for (int64_t k0 = kb; k0 < ke; k0 += 64) {
        for (int64_t l = 0; l < per_step && fetched < next.lines; l++, fetched++) {
            _mm_prefetch(next.first + 64 * fetched, _MM_HINT_T1);
            _mm_prefetch(next.second + 64 * fetched, _MM_HINT_T1);
        }
        _tile_loadd(6, w0 + k0 * NR, 64);
        _tile_loadd(4, a + k0, Kp);
        _tile_dpbssd(0, 4, 6);
        _tile_loadd(7, w1 + k0 * NR, 64);
        _tile_dpbssd(1, 4, 7);
        _tile_loadd(5, a + 16 * Kp + k0, Kp);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
    }
}

/* Rows [32 b, 32 b + 32) of y, outputs of panels p0 and p0 + 1, over the inputs [kb, ke). The int32 sums of an
 * earlier depth range wait in y itself (the same M x N places, read back as int32); the last range scales them
 * into floats in place. Whole tiles (inside M x N) go straight to y; edges through a buffer. */
static inline void block_times_pair(const int8_t *xq, const float *x_scales, const int8_t *packed,
                                    const float *scales, const float *bias, float *y, int64_t M, int64_t N, int64_t Kp,
                                    int64_t b, int64_t p0, int64_t kb, int64_t ke, next_panels next) {
    const int64_t m0 = b * 32, n0 = p0 * NR;
    const int whole = m0 + 32 <= M && n0 + 32 <= N, last = ke == Kp;
    int32_t *sums = (int32_t *)y; /* y's floats hold int32 sums until the last range */
    int32_t c[4][16 * 16];
    if (kb == 0) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    } else if (whole) {
        _tile_loadd(0, sums + m0 * N + n0, N * 4);
        _tile_loadd(1, sums + m0 * N + n0 + 16, N * 4);
        _tile_loadd(2, sums + (m0 + 16) * N + n0, N * 4);
        _tile_loadd(3, sums + (m0 + 16) * N + n0 + 16, N * 4);
    } else {
        for (int t = 0; t < 4; t++) {
            const int64_t mt = m0 + (t >> 1) * 16, nt = n0 + (t & 1) * 16;
            for (int r = 0; r < 16; r++)
                for (int n = 0; n < 16; n++) c[t][r * 16 + n] = mt + r < M && nt + n < N ? sums[(mt + r) * N + nt + n] : 0;
        }
        _tile_loadd(0, c[0], 64);
        _tile_loadd(1, c[1], 64);
        _tile_loadd(2, c[2], 64);
        _tile_loadd(3, c[3], 64);
    }
    tiles_times_panels(xq + m0 * Kp, packed + p0 * Kp * NR, packed + (p0 + 1) * Kp * NR, Kp, kb, ke, next);
    if (whole) {
        _tile_stored(0, sums + m0 * N + n0, N * 4);
        _tile_stored(1, sums + m0 * N + n0 + 16, N * 4);
        _tile_stored(2, sums + (m0 + 16) * N + n0, N * 4);
        _tile_stored(3, sums + (m0 + 16) * N + n0 + 16, N * 4);
        if (last)
            for (int64_t r = m0; r < m0 + 32; r++)
                for (int64_t n = n0; n < n0 + 32; n += NR)
                    scale_out(_mm512_loadu_si512((const void *)(sums + r * N + n)), x_scales[r], scales + n,
                              bias ? bias + n : NULL, y + r * N + n, 0xffff);
        return;
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    for (int t = 0; t < 4; t++) {
        const int64_t mt = m0 + (t >> 1) * 16, nt = n0 + (t & 1) * 16;
        if (nt >= N) continue;
        const __mmask16 valid = first_lanes(N - nt);
        for (int r = 0; r < 16 && mt + r < M; r++) {
            const __m512i sum = _mm512_loadu_si512((const void *)(c[t] + r * 16));
            if (last)
                scale_out(sum, x_scales[mt + r], scales + nt, bias ? bias + nt : NULL, y + (mt + r) * N + nt, valid);
            else
                _mm512_mask_storeu_epi32(sums + (mt + r) * N + nt, valid, sum);
        }
    }
}

/* As dsserve_linear_bf16's tile loop: rows in chunks of CHUNK blocks of 32, the depth in ranges of at most DEPTH;
 * within a chunk and range, tasks are pairs of panels over the chunk's blocks, so a pair's weights come from memory
 * once per chunk and range. The depth ranges of one (block, pair) follow each other on one thread (loops of one
 * trip count under schedule(static)), so `nowait` needs no barrier between them. Inside a parallel region. */
static void amx_rows(const int8_t *xq, const float *x_scales, const int8_t *packed, const float *scales,
                     const float *bias, float *y, int64_t M, int64_t N, int64_t Kp) {
    const int64_t blocks = (M + 31) / 32, pairs = ((N + NR - 1) / NR + 1) / 2;
    const int64_t ranges = (Kp + DEPTH - 1) / DEPTH, depth = (Kp / 64 + ranges - 1) / ranges * 64;
    configure_tiles();
    for (int64_t c0 = 0; c0 < blocks; c0 += CHUNK) {
        const int64_t chunk = blocks - c0 < CHUNK ? blocks - c0 : CHUNK;
        for (int64_t kb = 0; kb < Kp; kb += depth) {
            const int64_t ke = kb + depth < Kp ? kb + depth : Kp;
#pragma omp for schedule(static) nowait
            for (int64_t task = 0; task < chunk * pairs; task++) {
                const int64_t i = task % chunk, p0 = 2 * (task / chunk);
                block_times_pair(xq, x_scales, packed, scales, bias, y, M, N, Kp, c0 + i, p0, kb, ke,
                                 share_of_next(packed, Kp, p0 + 2, p0 + 3, 2 * pairs, kb, ke, i, chunk));
            }
        }
    }
    _tile_release();
}

/* y (M, I) = silu(gate) * up for a (2 I, K) gate_up weight, gate panel p and up panel p + I / 16 as one task's two
 * panels over the whole depth (Kp <= DEPTH), each 32-row block's four C tiles scaled and combined on their way out:
 * the (M, 2 I) product is never written. Each product is scaled as scale_out scales it: the linear's values, then
 * silu * up (as dsserve_silu_mul up to the rounding of silu: this file is built without FMA contraction). Inside a
 * parallel region. */
static void amx_swiglu(const int8_t *xq, const float *x_scales, const int8_t *packed, const float *scales, float *y,
                       int64_t M, int64_t I, int64_t Kp) {
    const int64_t blocks = (M + 31) / 32, panels = I / NR;
    int64_t per_chunk = (1 << 20) / (32 * Kp); /* a chunk's rows of x in about 1 MiB of L2 */
    per_chunk = per_chunk < 1 ? 1 : per_chunk > CHUNK ? CHUNK : per_chunk;
    configure_tiles();
    for (int64_t c0 = 0; c0 < blocks; c0 += per_chunk) {
        const int64_t chunk = blocks - c0 < per_chunk ? blocks - c0 : per_chunk;
#pragma omp for schedule(static) nowait
        for (int64_t task = 0; task < chunk * panels; task++) {
            const int64_t i = task % chunk, p = task / chunk, m0 = (c0 + i) * 32;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            tiles_times_panels(xq + m0 * Kp, packed + p * Kp * NR, packed + (p + panels) * Kp * NR, Kp, 0, Kp,
                               share_of_next(packed, Kp, p + 1, p + 1 + panels, 2 * panels, 0, Kp, i, chunk));
            int32_t c[4][16 * 16]; /* rows 0-15 gate, up; rows 16-31 gate, up */
            _tile_stored(0, c[0], 64);
            _tile_stored(1, c[1], 64);
            _tile_stored(2, c[2], 64);
            _tile_stored(3, c[3], 64);
            const __m512 gate_scales = _mm512_loadu_ps(scales + p * NR);
            const __m512 up_scales = _mm512_loadu_ps(scales + (p + panels) * NR);
            for (int64_t r = 0; r < 32 && m0 + r < M; r++) {
                const int32_t *gate = c[(r / 16) * 2] + (r % 16) * 16, *up = gate + 256;
                const __m512 xs = _mm512_set1_ps(x_scales[m0 + r]);
                float g[16], u[16];
                _mm512_storeu_ps(g, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(
                                                      _mm512_loadu_si512((const void *)gate)), xs), gate_scales));
                _mm512_storeu_ps(u, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(
                                                      _mm512_loadu_si512((const void *)up)), xs), up_scales));
                float *out = y + (m0 + r) * I + p * NR;
                for (int n = 0; n < 16; n++) out[n] = silu_times(g[n], u[n]);
            }
        }
    }
    _tile_release();
}
#endif

/* x (M, K) float32 contiguous; packed, scales, sums as above; bias (N,) or NULL; y (M, N) float32. From tile_rows
 * rows on the AMX tiles run where this process may use them (kernels.py: W8A8_TILE_ROWS), fewer on VNNI. -3: no
 * memory for the quantized rows. */
int dsserve_linear_w8a8(const float *x, const int8_t *packed, const float *scales, const int32_t *sums,
                        const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t tile_rows) {
    const int64_t Kp = (K + 63) / 64 * 64;
#if HAVE_AMX
    const int tiles = M >= tile_rows && amx_permitted();
#else
    const int tiles = 0;
    (void)tile_rows;
#endif
    const int64_t Mp = tiles ? (M + 31) / 32 * 32 : M; /* the tiles read whole blocks of 32 rows */
    int8_t *xq = aligned_alloc(64, (size_t)(Mp * Kp));
    float *x_scales = malloc((size_t)Mp * sizeof(float));
    if (xq == NULL || x_scales == NULL) {
        free(xq);
        free(x_scales);
        return -3;
    }
#pragma omp parallel if (M * N * Kp >= (1 << 16))
    {
        quantize_rows(x, xq, x_scales, M, Mp, K, Kp, !tiles);
#if HAVE_AMX
        if (tiles)
            amx_rows(xq, x_scales, packed, scales, bias, y, M, N, Kp);
        else
#endif
            vnni_rows((const uint8_t *)xq, x_scales, packed, scales, sums, bias, y, M, N, Kp);
    }
    free(xq);
    free(x_scales);
    return 0;
}

/* y (M, I) = silu(x Wg^T) * (x Wu^T): packed is the (2 I, K) gate_up weight (gate rows first) in the layout above,
 * I a multiple of 16 (-2 otherwise). On the tiles with K up to DEPTH, in one pass (amx_swiglu); otherwise (few rows,
 * no AMX, deep sums) the linear 256 rows at a time into a buffer, then dsserve_silu_mul. -3: no memory. */
int dsserve_linear_w8a8_swiglu(const float *x, const int8_t *packed, const float *scales, const int32_t *sums,
                               float *y, int64_t M, int64_t I, int64_t K, int64_t tile_rows) {
    if (I % NR) return -2;
    const int64_t Kp = (K + 63) / 64 * 64;
#if HAVE_AMX
    if (M >= tile_rows && Kp <= DEPTH && amx_permitted()) {
        const int64_t Mp = (M + 31) / 32 * 32;
        int8_t *xq = aligned_alloc(64, (size_t)(Mp * Kp));
        float *x_scales = malloc((size_t)Mp * sizeof(float));
        if (xq == NULL || x_scales == NULL) {
            free(xq);
            free(x_scales);
            return -3;
        }
#pragma omp parallel
        {
            quantize_rows(x, xq, x_scales, M, Mp, K, Kp, 0);
            amx_swiglu(xq, x_scales, packed, scales, y, M, I, Kp);
        }
        free(xq);
        free(x_scales);
        return 0;
    }
#endif
    const int64_t rows = CHUNK * 32;
    float *buf = aligned_alloc(64, (size_t)((M < rows ? M : rows) * 2 * I * 4));
    if (buf == NULL) return -3;
    int status = 0;
    for (int64_t r0 = 0; r0 < M && !status; r0 += rows) {
        const int64_t n = M - r0 < rows ? M - r0 : rows;
        status = dsserve_linear_w8a8(x + r0 * K, packed, scales, sums, NULL, buf, n, 2 * I, K, tile_rows);
        if (!status) dsserve_silu_mul(buf, y + r0 * I, n, I);
    }
    free(buf);
    return status;
}

/* 2: AMX int8 tiles and AVX512-VNNI; 1: AVX512-VNNI only (no AMX, or Linux refused this process the tiles). */
int dsserve_linear_w8a8_supported(void) {
#if HAVE_AMX
    if (amx_permitted()) return 2;
#endif
    return 1;
}

#else
int dsserve_linear_w8a8(const float *x, const int8_t *packed, const float *scales, const int32_t *sums,
                        const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t tile_rows) {
    (void)x, (void)packed, (void)scales, (void)sums, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)tile_rows;
    return -1;
}
int dsserve_linear_w8a8_swiglu(const float *x, const int8_t *packed, const float *scales, const int32_t *sums,
                               float *y, int64_t M, int64_t I, int64_t K, int64_t tile_rows) {
    (void)x, (void)packed, (void)scales, (void)sums, (void)y, (void)M, (void)I, (void)K, (void)tile_rows;
    return -1;
}
int dsserve_linear_w8a8_supported(void) { return 0; }
#endif
