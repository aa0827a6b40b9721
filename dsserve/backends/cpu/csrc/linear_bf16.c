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

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512F__) && \
    defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define LINEAR_BF16_SUPPORTED 1

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux hands out the tile registers' state only to processes that ask (once per process). */
static int amx_permitted(void) {
    static int state = 0; /* 0 unknown, 1 yes, -1 no; a benign race: every thread computes the same answer */
    if (state == 0) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    return state == 1;
}

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* tmm0..3: C (16 x 16 fp32), tmm4/5: A (16 rows x 32 bf16), tmm6/7: B (16 pair rows x 32 bf16); all 64-byte rows */
static void configure_tiles(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch's .bfloat16() */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* One row: each thread streams whole panels; the weights widen to fp32 by a shift (bf16 is fp32's top half). */
static void gemv(const float *x, const uint16_t *packed, const float *bias, float *y, int64_t N, int64_t K,
                 int64_t Kp) {
    const int64_t panels = (N + 15) / 16;
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const uint16_t *w = packed + p * Kp * 16;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps();
        __m512 acc3 = _mm512_setzero_ps();
        int64_t kk = 0;
        for (; 2 * kk + 3 < K; kk += 2) { /* two pairs per iteration: four independent sums */
            const __m512i p0 = _mm512_loadu_si512((const void *)(w + kk * 32));
            const __m512i p1 = _mm512_loadu_si512((const void *)(w + kk * 32 + 32));
            acc0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(p0, 16)), _mm512_set1_ps(x[2 * kk]), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(p0, high)), _mm512_set1_ps(x[2 * kk + 1]), acc1);
            acc2 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(p1, 16)), _mm512_set1_ps(x[2 * kk + 2]), acc2);
            acc3 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(p1, high)), _mm512_set1_ps(x[2 * kk + 3]), acc3);
        }
        for (; 2 * kk + 1 < K; kk++) {
            const __m512i pair = _mm512_loadu_si512((const void *)(w + kk * 32));
            acc0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(pair, 16)), _mm512_set1_ps(x[2 * kk]), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(pair, high)), _mm512_set1_ps(x[2 * kk + 1]),
                                   acc1);
        }
        if (2 * kk < K) { /* an odd K: the last input has no partner (its pair's second half is zero) */
            const __m512i pair = _mm512_loadu_si512((const void *)(w + kk * 32));
            acc0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(pair, 16)), _mm512_set1_ps(x[2 * kk]), acc0);
        }
        float out[16];
        _mm512_storeu_ps(out, _mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
        const int valid = N - p * 16 < 16 ? (int)(N - p * 16) : 16;
        for (int n = 0; n < valid; n++) y[p * 16 + n] = out[n] + (bias ? bias[p * 16 + n] : 0.0f);
    }
}

/* Rows [32 b, 32 b + 32) of y, outputs of panels p0 and p0 + 1: four C tiles over the whole depth. Whole tiles
 * (inside M x N) go straight to y; edges through a buffer. */
static inline void block_times_pair(const uint16_t *xb, const uint16_t *packed, const float *bias, float *y,
                                    int64_t M, int64_t N, int64_t Kp, int64_t b, int64_t p0) {
    const uint16_t *a = xb + b * 32 * Kp;
    const uint16_t *w0 = packed + p0 * Kp * 16, *w1 = w0 + Kp * 16;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k0 = 0; k0 < Kp; k0 += 32) {
        _tile_loadd(4, a + k0, Kp * 2);
        _tile_loadd(5, a + 16 * Kp + k0, Kp * 2);
        _tile_loadd(6, w0 + k0 * 16, 64);
        _tile_loadd(7, w1 + k0 * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    const int64_t m0 = b * 32, n0 = p0 * 16;
    if (m0 + 32 <= M && n0 + 32 <= N) {
        _tile_stored(0, y + m0 * N + n0, N * 4);
        _tile_stored(1, y + m0 * N + n0 + 16, N * 4);
        _tile_stored(2, y + (m0 + 16) * N + n0, N * 4);
        _tile_stored(3, y + (m0 + 16) * N + n0 + 16, N * 4);
        if (bias)
            for (int64_t r = m0; r < m0 + 32; r++) {
                float *out = y + r * N + n0;
                _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), _mm512_loadu_ps(bias + n0)));
                _mm512_storeu_ps(out + 16, _mm512_add_ps(_mm512_loadu_ps(out + 16), _mm512_loadu_ps(bias + n0 + 16)));
            }
        return;
    }
    float c[4][16 * 16];
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
            for (int n = 0; n < valid; n++) out[n] = c[t][r * 16 + n] + (bias ? bias[nt + n] : 0.0f);
        }
    }
}

#define CHUNK 8

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
#pragma omp for schedule(static)
        for (int64_t m = 0; m < Mp; m++) { /* x in bf16, rows and columns zero-padded to whole tiles */
            uint16_t *row = xb + m * Kp;
            int64_t k = 0;
            if (m < M) {
                for (; k + 16 <= K; k += 16)
                    _mm256_storeu_si256((__m256i *)(row + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + m * K + k)));
                for (; k < K; k++) row[k] = to_bf16(x[m * K + k]);
            }
            for (; k < Kp; k++) row[k] = 0;
        }
        configure_tiles();
        /* Rows in chunks of CHUNK blocks of 32 (a chunk of x, at most 256 x Kp halves, stays in L2); within a chunk,
         * tasks are pairs of panels, each over the chunk's blocks: a pair's weights come from memory once per
         * chunk, for its first block, and each thread streams its share of them. */
        for (int64_t c0 = 0; c0 < blocks; c0 += CHUNK) {
            const int64_t chunk = blocks - c0 < CHUNK ? blocks - c0 : CHUNK;
#pragma omp for schedule(static) nowait
            for (int64_t task = 0; task < chunk * pairs; task++)
                block_times_pair(xb, packed, bias, y, M, N, Kp, c0 + task % chunk, 2 * (task / chunk));
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
int dsserve_linear_bf16_supported(void) { return 0; }
#endif
