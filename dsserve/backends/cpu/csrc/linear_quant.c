/* y = x W^T (+ b) with W quantized to integers, x and y float32: the kernels behind `--quantization int8|int4`.
 * Weight-only: the activations stay float32 and so do the sums; each weight is widened to fp32 in registers as it
 * is loaded. One row of x (batch-1 decode) is a GEMV bound by reading the weights; more rows dequantize a block of
 * a panel into L1 at a time and run an fp32 micro-kernel over it (a simple correct path; AMX int8 tiles can come).
 *
 * The formats and their plain-torch twins are dsserve/formats/quantization.py; kernels.py packs them:
 *
 * int8 (W8A16, per output channel): w[n, k] = q[n, k] * scale[n], q in [-127, 127].
 *     packed[p][k][j] = q[16 p + j][k]     int8, panels of 16 output rows, an even number of panels (rows past N
 *                                          and a padding panel are zero): one 16-byte load per k per panel
 *     scales[16 p + j]                     float32, (panels * 16,)
 *
 * int4 (group-wise): w[n, k] = (q[n, k] - z[n, k / group]) * scale[n, k / group], q in [0, 15]; symmetric: z = 8.
 *     packed[p][k / 2][j] = q[16 p + j][k] | q[16 p + j][k + 1] << 4    (k even; uint8; K padded to whole groups)
 *     scales[p][g][j]                      float16, (panels, groups, 16)
 *     zeros[p][g][j]                       uint8, (panels, groups, 16), or NULL for symmetric (z = 8)
 *     so a pair of inputs is one 16-byte load per panel: 4.5 bits per weight at group 32 (symmetric), 4.75 with
 *     zero points.
 *
 * The GEMVs read two panels side by side (two load streams in flight per thread, as linear_bf16.c's two_panels_dot).
 * int4 widens a byte of two nibbles once and takes two FMAs from it (int4_two_panels_group says how), and corrects
 * each group's sum once for its zero points (8 where symmetric): scale * (sum q x - z * sum x).
 */
#include <stdint.h>
#include <stdlib.h>

#include "dsserve_kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>

#define NR 16
#define MC 64      /* rows of x per task on the several-rows path: their 16 partial sums each stay in L1 */
#define KC 128     /* int8's depth per dequantized block on that path (int4's is one group) */
#define MAX_GROUP 256
/* How far ahead of its loads a GEMV prefetches each of its two streams into L1. The hardware prefetchers keep up
 * with the bf16 GEMV; here the widening leaves the core less time to issue loads and, without this, the time of the
 * arithmetic and of the memory reads added up (one thread, weights in memory, thread CPU time, three runs
 * alternated: int8 9.6-10.5 -> 11.2-11.6 GB/s, int4 7.2-7.7 -> 7.9-8.0; 512 to 2048 bytes ahead alike). */
#define PREFETCH_BYTES 1024

static inline __m512 int8_row(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

static inline __m512i bytes_to_lanes(const uint8_t *p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
}

static inline __mmask16 valid_lanes(int64_t N, int64_t n0) {
    return N - n0 >= NR ? (__mmask16)0xffff : (__mmask16)((1u << (N - n0)) - 1u);
}

/* y[n0 .. n0 + 16) = v (+ bias), only the outputs below N */
static inline void store_outputs(float *y, const float *bias, __m512 v, int64_t N, int64_t n0) {
    const __mmask16 m = valid_lanes(N, n0);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + n0));
    _mm512_mask_storeu_ps(y + n0, m, v);
}

/* ---- int8: one row ------------------------------------------------------------------------------------------- */

static inline void int8_two_panels(const float *x, const int8_t *w0, const int8_t *w1, int64_t K, __m512 *out0,
                                   __m512 *out1) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) { /* four independent sums per panel; 64 bytes of each */
        _mm_prefetch((const char *)(w0 + k * NR) + PREFETCH_BYTES, _MM_HINT_T0);
        _mm_prefetch((const char *)(w1 + k * NR) + PREFETCH_BYTES, _MM_HINT_T0);
        const __m512 x0 = _mm512_set1_ps(x[k]), x1 = _mm512_set1_ps(x[k + 1]);
        const __m512 x2 = _mm512_set1_ps(x[k + 2]), x3 = _mm512_set1_ps(x[k + 3]);
        a0 = _mm512_fmadd_ps(int8_row(w0 + k * NR), x0, a0);
        b0 = _mm512_fmadd_ps(int8_row(w1 + k * NR), x0, b0);
        a1 = _mm512_fmadd_ps(int8_row(w0 + (k + 1) * NR), x1, a1);
        b1 = _mm512_fmadd_ps(int8_row(w1 + (k + 1) * NR), x1, b1);
        a2 = _mm512_fmadd_ps(int8_row(w0 + (k + 2) * NR), x2, a2);
        b2 = _mm512_fmadd_ps(int8_row(w1 + (k + 2) * NR), x2, b2);
        a3 = _mm512_fmadd_ps(int8_row(w0 + (k + 3) * NR), x3, a3);
        b3 = _mm512_fmadd_ps(int8_row(w1 + (k + 3) * NR), x3, b3);
    }
    for (; k < K; k++) {
        const __m512 xv = _mm512_set1_ps(x[k]);
        a0 = _mm512_fmadd_ps(int8_row(w0 + k * NR), xv, a0);
        b0 = _mm512_fmadd_ps(int8_row(w1 + k * NR), xv, b0);
    }
    *out0 = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    *out1 = _mm512_add_ps(_mm512_add_ps(b0, b1), _mm512_add_ps(b2, b3));
}

static void int8_gemv(const float *x, const int8_t *packed, const float *scales, const float *bias, float *y,
                      int64_t N, int64_t K) {
    const int64_t panels = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p += 2) { /* the layout pads an odd count with a zero panel */
        __m512 first, second;
        int8_two_panels(x, packed + p * K * NR, packed + (p + 1) * K * NR, K, &first, &second);
        store_outputs(y, bias, _mm512_mul_ps(first, _mm512_loadu_ps(scales + p * NR)), N, p * NR);
        if (p + 1 < panels)
            store_outputs(y, bias, _mm512_mul_ps(second, _mm512_loadu_ps(scales + (p + 1) * NR)), N, (p + 1) * NR);
    }
}

/* ---- int4: one row ------------------------------------------------------------------------------------------- */

/* The sum over inputs [kb, ke) of panel w's 16 outputs, before zero point and scale: of q x. A byte holds the pair
 * (l, h) = (q[k], q[k + 1]) as l + 16 h. Widened once, it gives l through vpermps (index bits 0-3 only) and l + 16 h
 * through vcvtdq2ps, and l x[k] + h x[k + 1] = l (x[k] - x[k + 1] / 16) + (l + 16 h) x[k + 1] / 16: two FMAs over
 * the caller's xs, pairs (x[k] - x[k + 1] / 16, x[k + 1] / 16). Five vector ops per pair where widening each nibble
 * on its own (a shift, two vpermps) took six: 8-10% faster with the panels in L2 (one thread, alternated). */
static inline void int4_two_panels_group(const float *xs, const uint8_t *w0, const uint8_t *w1, int64_t kb,
                                         int64_t ke, __m512 table, __m512 *out0, __m512 *out1) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t k = kb;
    for (; k + 4 <= ke; k += 4) {
        const __m512i v0 = bytes_to_lanes(w0 + k / 2 * NR), v1 = bytes_to_lanes(w1 + k / 2 * NR);
        const __m512i u0 = bytes_to_lanes(w0 + k / 2 * NR + NR), u1 = bytes_to_lanes(w1 + k / 2 * NR + NR);
        const __m512 xl = _mm512_set1_ps(xs[k]), xh = _mm512_set1_ps(xs[k + 1]);
        const __m512 yl = _mm512_set1_ps(xs[k + 2]), yh = _mm512_set1_ps(xs[k + 3]);
        a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(v0, table), xl, a0);
        b0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(v1, table), xl, b0);
        a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v0), xh, a1);
        b1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v1), xh, b1);
        a2 = _mm512_fmadd_ps(_mm512_permutexvar_ps(u0, table), yl, a2);
        b2 = _mm512_fmadd_ps(_mm512_permutexvar_ps(u1, table), yl, b2);
        a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(u0), yh, a3);
        b3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(u1), yh, b3);
    }
    for (; k < ke; k += 2) { /* an odd count: the last input's partner is zero in the layout and in xs */
        const __m512i v0 = bytes_to_lanes(w0 + k / 2 * NR), v1 = bytes_to_lanes(w1 + k / 2 * NR);
        const __m512 xl = _mm512_set1_ps(xs[k]), xh = _mm512_set1_ps(xs[k + 1]);
        a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(v0, table), xl, a0);
        b0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(v1, table), xl, b0);
        a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v0), xh, a1);
        b1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v1), xh, b1);
    }
    *out0 = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    *out1 = _mm512_add_ps(_mm512_add_ps(b0, b1), _mm512_add_ps(b2, b3));
}

static inline __m512 int4_zeros(const uint8_t *zeros) {
    return _mm512_cvtepi32_ps(bytes_to_lanes(zeros));
}

/* xs: the pairs above over K rounded up to even; group_sums: x's sum over each group. */
static void int4_gemv(const float *xs, const float *group_sums, const uint8_t *packed, const uint16_t *scales,
                      const uint8_t *zeros, const float *bias, float *y, int64_t N, int64_t K, int64_t group) {
    const int64_t panels = (N + NR - 1) / NR, groups = (K + group - 1) / group, Kp = groups * group;
    const __m512 table = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 eight = _mm512_set1_ps(8.0f); /* symmetric: every zero point is 8 */
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p += 2) {
        const uint8_t *w0 = packed + p * (Kp / 2) * NR, *w1 = w0 + (Kp / 2) * NR;
        __m512 y0 = _mm512_setzero_ps(), y1 = y0;
        for (int64_t g = 0; g < groups; g++) {
            const int64_t kb = g * group, ke = kb + group < K ? kb + group : K;
            for (int64_t line = 0; line < group / 2 * NR; line += 64) { /* the group's bytes, PREFETCH_BYTES on */
                _mm_prefetch((const char *)(w0 + kb / 2 * NR + line) + PREFETCH_BYTES, _MM_HINT_T0);
                _mm_prefetch((const char *)(w1 + kb / 2 * NR + line) + PREFETCH_BYTES, _MM_HINT_T0);
            }
            __m512 s0, s1;
            int4_two_panels_group(xs, w0, w1, kb, ke, table, &s0, &s1);
            const int64_t at0 = (p * groups + g) * NR, at1 = at0 + groups * NR;
            const __m512 sx = _mm512_set1_ps(group_sums[g]); /* sum (q - z) x = sum q x - z sum x */
            s0 = _mm512_fnmadd_ps(zeros ? int4_zeros(zeros + at0) : eight, sx, s0);
            s1 = _mm512_fnmadd_ps(zeros ? int4_zeros(zeros + at1) : eight, sx, s1);
            y0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + at0))), s0, y0);
            y1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + at1))), s1, y1);
        }
        store_outputs(y, bias, y0, N, p * NR);
        if (p + 1 < panels) store_outputs(y, bias, y1, N, (p + 1) * NR);
    }
}

/* ---- several rows: a panel's block dequantized into L1, then fp32 FMAs over every row of a chunk --------------- */

/* acc (rows, 16) += x[:, 0:depth] (rows, ldx) times the block w (depth, 16) */
static void rows_times_block(const float *x, int64_t ldx, int64_t rows, const float *w, int64_t depth, float *acc) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        const float *x0 = x + r * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
        __m512 a0 = _mm512_loadu_ps(acc + r * NR), a1 = _mm512_loadu_ps(acc + (r + 1) * NR);
        __m512 a2 = _mm512_loadu_ps(acc + (r + 2) * NR), a3 = _mm512_loadu_ps(acc + (r + 3) * NR);
        for (int64_t k = 0; k < depth; k++) {
            const __m512 wv = _mm512_loadu_ps(w + k * NR);
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(x0[k]), wv, a0);
            a1 = _mm512_fmadd_ps(_mm512_set1_ps(x1[k]), wv, a1);
            a2 = _mm512_fmadd_ps(_mm512_set1_ps(x2[k]), wv, a2);
            a3 = _mm512_fmadd_ps(_mm512_set1_ps(x3[k]), wv, a3);
        }
        _mm512_storeu_ps(acc + r * NR, a0);
        _mm512_storeu_ps(acc + (r + 1) * NR, a1);
        _mm512_storeu_ps(acc + (r + 2) * NR, a2);
        _mm512_storeu_ps(acc + (r + 3) * NR, a3);
    }
    for (; r < rows; r++) {
        const float *xr = x + r * ldx;
        __m512 a = _mm512_loadu_ps(acc + r * NR);
        for (int64_t k = 0; k < depth; k++) a = _mm512_fmadd_ps(_mm512_set1_ps(xr[k]), _mm512_loadu_ps(w + k * NR), a);
        _mm512_storeu_ps(acc + r * NR, a);
    }
}

/* Panel p's weights for inputs [kb, ke) as fp32 (ke - kb, 16): the same values as the plain-torch dequantization. */
static void int8_block(const int8_t *packed, const float *scales, int64_t p, int64_t K, int64_t kb, int64_t ke,
                       float *w) {
    const __m512 s = _mm512_loadu_ps(scales + p * NR);
    const int8_t *panel = packed + p * K * NR;
    for (int64_t k = kb; k < ke; k++) _mm512_storeu_ps(w + (k - kb) * NR, _mm512_mul_ps(int8_row(panel + k * NR), s));
}

static void int4_block(const uint8_t *packed, const uint16_t *scales, const uint8_t *zeros, int64_t p, int64_t groups,
                       int64_t group, int64_t g, int64_t depth, float *w) {
    const int64_t at = (p * groups + g) * NR;
    const uint8_t *pairs = packed + p * (groups * group / 2) * NR + g * group / 2 * NR;
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + at)));
    const __m512 z = zeros ? int4_zeros(zeros + at) : _mm512_set1_ps(8.0f);
    const __m512i low = _mm512_set1_epi32(15);
    for (int64_t k = 0; k < depth; k += 2) {
        const __m512i v = bytes_to_lanes(pairs + k / 2 * NR);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
        _mm512_storeu_ps(w + k * NR, _mm512_mul_ps(_mm512_sub_ps(lo, z), s));
        _mm512_storeu_ps(w + (k + 1) * NR, _mm512_mul_ps(_mm512_sub_ps(hi, z), s));
    }
}

/* Tasks (panel, chunk of MC rows), panel outermost: a thread's run of tasks reuses its panel's blocks from L2. */
static void quant_rows(const float *x, const void *packed, const void *scales, const uint8_t *zeros, const float *bias,
                       float *y, int64_t M, int64_t N, int64_t K, int64_t group) {
    const int64_t panels = (N + NR - 1) / NR, chunks = (M + MC - 1) / MC;
    const int64_t step = group ? group : KC, groups = group ? (K + group - 1) / group : 0;
#pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < panels * chunks; task++) {
        const int64_t p = task / chunks, m0 = task % chunks * MC, rows = M - m0 < MC ? M - m0 : MC;
        float acc[MC * NR] __attribute__((aligned(64)));
        float w[(MAX_GROUP > KC ? MAX_GROUP : KC) * NR] __attribute__((aligned(64)));
        for (int64_t i = 0; i < rows * NR; i++) acc[i] = 0.0f;
        for (int64_t kb = 0; kb < K; kb += step) {
            const int64_t depth = K - kb < step ? K - kb : step;
            if (group)
                int4_block(packed, scales, zeros, p, groups, group, kb / group, depth, w);
            else
                int8_block(packed, scales, p, K, kb, kb + depth, w);
            rows_times_block(x + m0 * K + kb, K, rows, w, depth, acc);
        }
        for (int64_t r = 0; r < rows; r++)
            store_outputs(y + (m0 + r) * N, bias, _mm512_loadu_ps(acc + r * NR), N, p * NR);
    }
}

/* x (M, K) float32 contiguous; packed, scales as above; bias (N,) or NULL; y (M, N) float32. */
int dsserve_linear_int8(const float *x, const int8_t *packed, const float *scales, const float *bias, float *y,
                        int64_t M, int64_t N, int64_t K) {
    if (M == 1)
        int8_gemv(x, packed, scales, bias, y, N, K);
    else
        quant_rows(x, packed, scales, NULL, bias, y, M, N, K, 0);
    return 0;
}

/* As dsserve_linear_int8 for the int4 layout; group even and at most 256 (-2 otherwise), zeros NULL: symmetric.
 * -3: no memory for one row's scratch (x's group sums and pairs). */
int dsserve_linear_int4(const float *x, const uint8_t *packed, const uint16_t *scales, const uint8_t *zeros,
                        const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t group) {
    if (group < 2 || group % 2 || group > MAX_GROUP) return -2;
    if (M != 1) {
        quant_rows(x, packed, scales, zeros, bias, y, M, N, K, group);
        return 0;
    }
    const int64_t groups = (K + group - 1) / group, pairs = (K + 1) / 2;
    float *sums = malloc((size_t)(groups + 2 * pairs) * sizeof(float));
    if (sums == NULL) return -3;
    float *xs = sums + groups;
    for (int64_t g = 0; g < groups; g++) { /* each group's sum of x, for the zero points' correction */
        float s = 0.0f;
        for (int64_t k = g * group; k < K && k < (g + 1) * group; k++) s += x[k];
        sums[g] = s;
    }
    for (int64_t i = 0; i < pairs; i++) { /* int4_two_panels_group's pairs (x[k] - x[k + 1] / 16, x[k + 1] / 16) */
        const float high = 2 * i + 1 < K ? x[2 * i + 1] * 0.0625f : 0.0f;
        xs[2 * i] = x[2 * i] - high;
        xs[2 * i + 1] = high;
    }
    int4_gemv(xs, sums, packed, scales, zeros, bias, y, N, K, group);
    free(sums);
    return 0;
}

int dsserve_linear_quant_supported(void) { return 1; }

#else
int dsserve_linear_int8(const float *x, const int8_t *packed, const float *scales, const float *bias, float *y,
                        int64_t M, int64_t N, int64_t K) {
    (void)x, (void)packed, (void)scales, (void)bias, (void)y, (void)M, (void)N, (void)K;
    return -1;
}
int dsserve_linear_int4(const float *x, const uint8_t *packed, const uint16_t *scales, const uint8_t *zeros,
                        const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t group) {
    (void)x, (void)packed, (void)scales, (void)zeros, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)group;
    return -1;
}
int dsserve_linear_quant_supported(void) { return 0; }
#endif

int dsserve_linear_quant(const float *x, const dsserve_quant_weight *w, const float *bias, float *y, int64_t M,
                         int64_t N, int64_t K) {
    if (w->bits == 8) return dsserve_linear_int8(x, w->packed, w->scales, bias, y, M, N, K);
    if (w->bits == 4) return dsserve_linear_int4(x, w->packed, w->scales, w->zeros, bias, y, M, N, K, w->group);
    return -2;
}
