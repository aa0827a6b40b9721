/* y = x W^T (+ b) with W stored as float8 e4m3 values and one float32 scale per output row per 128 inputs, x and y
 * float32: the kernels behind fp8 weights (DeepSeek-V3/R1's own checkpoints kept as stored, `--quantization fp8`).
 * w[n, k] = e4m3(q[n, k]) * scale[n, k / 128]. A 128 x 128 block scale is repeated over its rows at packing, a
 * per-row scale over its blocks of inputs: one layout serves both.
 *
 * Layout (kernels.py: pack_fp8): panels of 16 output rows, an even number of them (a zero panel pads an odd count);
 * within a panel the K inputs come in pairs, as linear_bf16.c's layout but one byte per weight:
 *     packed[p][k / 2][n][k % 2] = q[16 p + n][k]       uint8 e4m3 bytes; K padded to a multiple of 128 with zeros
 *     scales[p][k / 128][n]      = scale[16 p + n][k / 128]    float32, zero past N
 * so one pair row is 32 bytes, and widened to bf16 it is 64 bytes: one AVX-512 register, and sixteen of them one
 * AMX B tile.
 *
 * e4m3 -> bf16 is exact (3 mantissa bits fit in 7, exponents 2^-9 .. 2^8 fit in bf16's range): a table of the 128
 * magnitudes (two vpermi2w lookups and a select on bit 6) and the sign bit moved up. The subnormals (exponent field
 * 0: m * 2^-9) and the NaN bytes (0x7f, 0xff) are table entries like the others.
 *
 * One row (batch-1 decode): a GEMV that streams two panels side by side (two load streams in flight per thread, as
 * linear_bf16.c's), x exact in fp32: per 128 inputs a partial sum per output, then times the block's scale into the
 * output's sum. Several rows: x rounded to bf16, each 128-deep block of a pair of panels widened to bf16 once into
 * L1, then every 32-row block of x runs four AMX tiles over it; each block's fp32 partial sums are scaled and added
 * to the outputs in registers. The plain-torch twin of both is formats/quantization.py `reference_linear`.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dsserve_kernels.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512F__) && \
    defined(__AVX512BW__) && defined(__linux__)
#include "amx.h"

#define NR 16
#define BLOCK 128  /* inputs per scale */
#define CHUNK 8    /* 32-row blocks of x per task on the several-rows path: their sums stay in L1/L2 */


/* bf16 bits of the e4m3fn magnitude b (0..127): exponent e = b >> 3 (bias 7), mantissa m = b & 7 */
static uint16_t e4m3_magnitude_bf16(int b) {
    const int e = b >> 3, m = b & 7;
    if (b == 0x7f) return 0x7fc0; /* e4m3fn has no infinity: S.1111.111 is its NaN */
    if (e > 0) return (uint16_t)(((e + 120) << 7) | (m << 4)); /* 2^(e - 7) (1 + m / 8) */
    if (m == 0) return 0;
    /* subnormal m * 2^-9: normalise m = 2^t (1 + f), t = its top bit */
    const int t = m >= 4 ? 2 : m >= 2 ? 1 : 0;
    return (uint16_t)(((t - 9 + 127) << 7) | (((m << (7 - t)) & 0x7f)));
}

/* The four registers of the 128-entry magnitude table (32 halves each) */
typedef struct {
    __m512i t0, t1, t2, t3;
} e4m3_table;

static e4m3_table make_table(void) {
    uint16_t t[128];
    for (int b = 0; b < 128; b++) t[b] = e4m3_magnitude_bf16(b);
    e4m3_table r = {_mm512_loadu_si512(t), _mm512_loadu_si512(t + 32), _mm512_loadu_si512(t + 64),
                    _mm512_loadu_si512(t + 96)};
    return r;
}

/* 32 e4m3 bytes -> 32 bf16 halves (64 bytes), in the same order */
static inline __m512i e4m3_to_bf16(const uint8_t *p, const e4m3_table *t) {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    const __m512i low = _mm512_permutex2var_epi16(t->t0, v, t->t1);  /* index bits 0-5: entries 0..63 */
    const __m512i high = _mm512_permutex2var_epi16(t->t2, v, t->t3); /* entries 64..127 */
    const __m512i magnitude = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(v, _mm512_set1_epi16(0x40)), low, high);
    /* sign: bit 7 of the byte to bit 15 of the half; 0xf8 is a | (b & c) */
    return _mm512_ternarylogic_epi32(magnitude, _mm512_slli_epi16(v, 8), _mm512_set1_epi16((short)0x8000), 0xf8);
}

static inline void store_outputs(float *y, const float *bias, __m512 v, int64_t N, int64_t n0) {
    const __mmask16 m = N - n0 >= NR ? (__mmask16)0xffff : (__mmask16)((1u << (N - n0)) - 1u);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + n0));
    _mm512_mask_storeu_ps(y + n0, m, v);
}

/* ---- one row ------------------------------------------------------------------------------------------------- */

/* A pair row widened to bf16 holds input k in each 32-bit lane's low half and k + 1 in its high half: fp32 by a
 * shift or a mask (bf16 is fp32's top half). */
#define PAIR_FMA(acc, pair, shifted, xv) \
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(shifted ? _mm512_slli_epi32(pair, 16) : _mm512_and_si512(pair, high)), \
                          _mm512_set1_ps(xv), acc)

/* The 16 outputs of panels w0 and w1 over inputs [kb, kb + 128) (x zero past K: xs holds the block's inputs) */
static inline void two_panels_block(const float *xs, const uint8_t *w0, const uint8_t *w1, const e4m3_table *t,
                                    __m512 *out0, __m512 *out1) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int kk = 0; kk < BLOCK / 2; kk += 2) { /* two pairs per iteration: four independent sums per panel */
        const __m512i p0 = e4m3_to_bf16(w0 + kk * 32, t), q0 = e4m3_to_bf16(w1 + kk * 32, t);
        const __m512i p1 = e4m3_to_bf16(w0 + kk * 32 + 32, t), q1 = e4m3_to_bf16(w1 + kk * 32 + 32, t);
        PAIR_FMA(a0, p0, 1, xs[2 * kk]);
        PAIR_FMA(b0, q0, 1, xs[2 * kk]);
        PAIR_FMA(a1, p0, 0, xs[2 * kk + 1]);
        PAIR_FMA(b1, q0, 0, xs[2 * kk + 1]);
        PAIR_FMA(a2, p1, 1, xs[2 * kk + 2]);
        PAIR_FMA(b2, q1, 1, xs[2 * kk + 2]);
        PAIR_FMA(a3, p1, 0, xs[2 * kk + 3]);
        PAIR_FMA(b3, q1, 0, xs[2 * kk + 3]);
    }
    *out0 = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    *out1 = _mm512_add_ps(_mm512_add_ps(b0, b1), _mm512_add_ps(b2, b3));
}
#undef PAIR_FMA

static int gemv(const float *x, const uint8_t *packed, const float *scales, const float *bias, float *y, int64_t N,
                int64_t K) {
    const int64_t panels = (N + NR - 1) / NR, blocks = (K + BLOCK - 1) / BLOCK, Kp = blocks * BLOCK;
    /* x padded with zeros to whole blocks (the padded weights are zero bytes, +0.0; x past K must be finite too) */
    float *xs = aligned_alloc(64, (size_t)Kp * sizeof(float));
    if (xs == NULL) return -3;
    memcpy(xs, x, (size_t)K * sizeof(float));
    for (int64_t k = K; k < Kp; k++) xs[k] = 0.0f;
#pragma omp parallel
    {
        const e4m3_table t = make_table();
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p += 2) { /* the layout pads an odd count with a zero panel */
            const uint8_t *w0 = packed + p * Kp * NR, *w1 = w0 + Kp * NR;
            const float *s0 = scales + p * blocks * NR, *s1 = s0 + blocks * NR;
            __m512 y0 = _mm512_setzero_ps(), y1 = y0;
            for (int64_t b = 0; b < blocks; b++) {
                __m512 part0, part1;
                two_panels_block(xs + b * BLOCK, w0 + b * BLOCK * NR, w1 + b * BLOCK * NR, &t, &part0, &part1);
                y0 = _mm512_fmadd_ps(part0, _mm512_loadu_ps(s0 + b * NR), y0);
                y1 = _mm512_fmadd_ps(part1, _mm512_loadu_ps(s1 + b * NR), y1);
            }
            store_outputs(y, bias, y0, N, p * NR);
            if (p + 1 < panels) store_outputs(y, bias, y1, N, (p + 1) * NR);
        }
    }
    free(xs);
    return 0;
}

/* ---- several rows: AMX bf16 tiles ---------------------------------------------------------------------------- */

/* amx.h's configure_tiles: tmm0..3 C (16 x 16 fp32), tmm4/5 A (16 rows x 32 bf16), tmm6/7 B (16 pair rows x 32
 * bf16) */

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch's .bfloat16() */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* x (M, K) float32 -> xb (Mp, Kp) bf16, rows and columns zero-padded to whole tiles and blocks */
static void rows_to_bf16(const float *x, uint16_t *xb, int64_t M, int64_t Mp, int64_t K, int64_t Kp) {
#pragma omp parallel for schedule(static)
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

/* Rows [m0, m0 + 32) times the bf16 block wb (two panels, 128 inputs: 4 B tiles each) from xb's inputs kb..kb + 128:
 * four C tiles of fp32 partial sums, then acc (32 x 32) += partial * the block's per-output scales. */
static inline void block_rows(const uint16_t *xb, int64_t Kp, int64_t kb, const uint16_t *wb, const float *s0,
                              const float *s1, float *acc) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int step = 0; step < BLOCK / 32; step++) {
        const uint16_t *a = xb + kb + step * 32;
        _tile_loadd(6, wb + step * 512, 64);
        _tile_loadd(4, a, Kp * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, wb + (BLOCK / 32 + step) * 512, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, a + 16 * Kp, Kp * 2);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    float c[4][16 * 16];
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    const __m512 sa = _mm512_loadu_ps(s0), sb = _mm512_loadu_ps(s1);
    for (int r = 0; r < 32; r++) {
        float *out = acc + r * 32;
        const float *ca = c[(r / 16) * 2] + (r % 16) * 16, *cb = c[(r / 16) * 2 + 1] + (r % 16) * 16;
        _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_loadu_ps(ca), sa, _mm512_loadu_ps(out)));
        _mm512_storeu_ps(out + 16, _mm512_fmadd_ps(_mm512_loadu_ps(cb), sb, _mm512_loadu_ps(out + 16)));
    }
}

static int tiles(const float *x, const uint8_t *packed, const float *scales, const float *bias, float *y, int64_t M,
                 int64_t N, int64_t K) {
    const int64_t blocks = (K + BLOCK - 1) / BLOCK, Kp = blocks * BLOCK;
    const int64_t Mp = (M + 31) / 32 * 32, row_blocks = Mp / 32, chunks = (row_blocks + CHUNK - 1) / CHUNK;
    const int64_t panels = (N + NR - 1) / NR, pairs = (panels + 1) / 2;
    uint16_t *xb = aligned_alloc(64, (size_t)(Mp * Kp * 2));
    if (xb == NULL) return -3;
    rows_to_bf16(x, xb, M, Mp, K, Kp);
#pragma omp parallel
    {
        const e4m3_table t = make_table();
        configure_tiles();
        /* a task: a pair of panels times a chunk of up to CHUNK 32-row blocks over the whole depth; each 128-deep
         * block of the pair is widened once (8 KiB) and read by every row block of the chunk */
        uint16_t wb[2 * BLOCK * NR] __attribute__((aligned(64)));
        float acc[CHUNK * 32 * 32] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t task = 0; task < pairs * chunks; task++) {
            const int64_t p0 = 2 * (task / chunks), c0 = task % chunks * CHUNK;
            const int64_t count = row_blocks - c0 < CHUNK ? row_blocks - c0 : CHUNK;
            const uint8_t *w0 = packed + p0 * Kp * NR, *w1 = w0 + Kp * NR;
            memset(acc, 0, sizeof(float) * (size_t)(count * 32 * 32));
            for (int64_t b = 0; b < blocks; b++) {
                for (int i = 0; i < BLOCK / 2; i++) { /* 64 pair rows per panel: B tiles of 16 pair rows each */
                    _mm512_storeu_si512(wb + i * 32, e4m3_to_bf16(w0 + (b * BLOCK / 2 + i) * 32, &t));
                    _mm512_storeu_si512(wb + (BLOCK / 2 + i) * 32, e4m3_to_bf16(w1 + (b * BLOCK / 2 + i) * 32, &t));
                }
                const float *s0 = scales + (p0 * blocks + b) * NR, *s1 = s0 + blocks * NR;
                for (int64_t i = 0; i < count; i++)
                    block_rows(xb + (c0 + i) * 32 * Kp, Kp, b * BLOCK, wb, s0, s1, acc + i * 32 * 32);
            }
            for (int64_t i = 0; i < count; i++)
                for (int64_t r = 0; r < 32 && (c0 + i) * 32 + r < M; r++) {
                    float *out = y + ((c0 + i) * 32 + r) * N;
                    store_outputs(out, bias, _mm512_loadu_ps(acc + (i * 32 + r) * 32), N, p0 * NR);
                    if (p0 + 1 < panels) store_outputs(out, bias, _mm512_loadu_ps(acc + (i * 32 + r) * 32 + 16), N,
                                                       (p0 + 1) * NR);
                }
        }
        _tile_release();
    }
    free(xb);
    return 0;
}

/* x (M, K) float32 contiguous, packed and scales as above, bias (N,) or NULL, y (M, N) float32. -3: no memory for
 * the bf16 copy of x (or the padded x of one row); -4: Linux refused the tile state. */
int dsserve_linear_fp8(const float *x, const uint8_t *packed, const float *scales, const float *bias, float *y,
                       int64_t M, int64_t N, int64_t K) {
    if (M == 1) return gemv(x, packed, scales, bias, y, N, K);
    if (!amx_permitted()) return -4;
    return tiles(x, packed, scales, bias, y, M, N, K);
}

int dsserve_linear_fp8_supported(void) { return amx_permitted(); }

#else
int dsserve_linear_fp8(const float *x, const uint8_t *packed, const float *scales, const float *bias, float *y,
                       int64_t M, int64_t N, int64_t K) {
    (void)x, (void)packed, (void)scales, (void)bias, (void)y, (void)M, (void)N, (void)K;
    return -1;
}
int dsserve_linear_fp8_supported(void) { return 0; }
#endif
