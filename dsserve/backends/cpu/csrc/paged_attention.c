/* Decode attention over the paged KV cache on CPU: one query token per sequence, the keys and values read in
 * place through the block table (no gathered copy of the context), online softmax in float32.
 *
 * Built by dsserve/backends/cpu/kernels.py with the system C compiler (-O3, -fopenmp, the vector ISA torch uses) and
 * called through ctypes; its plain-torch twin, layers/attention.py, is the fallback and the test oracle.
 *
 * Layouts (float32 unless stated, row-major, contiguous where stated; the cache may be float16 with `half`, its
 * values widened to float32 as they are loaded):
 *   q       (B, H, Dk) contiguous: H query heads; heads [g * G, (g + 1) * G) share KV head g (G = H / Hkv)
 *   cache   the token in slot s of block n, KV head g: key at cache + (n * block_size + s) * token_stride
 *           + g * head_stride + k_offset (Dk values), value at the same + v_offset - k_offset (Dv values).
 *           MHA/GQA (num_blocks, block_size, 2, Hkv, D): token_stride 2 * Hkv * D, head_stride D,
 *           k_offset 0, v_offset Hkv * D. MLA's latent cache (num_blocks, block_size, C + R) with Hkv = 1:
 *           token_stride C + R, head_stride 0, k_offset 0, v_offset 0 (the value is the key's first C).
 *   tables  (B, table_stride) int64 block ids; lens (B,) int64 context length of each sequence (>= 1)
 *   out     (B, H, Dv) contiguous
 *
 * Work is split into tasks of (sequence, range of heads_per_task query heads): with every head in one task a
 * sequence's blocks are read once, whole and in order; few sequences split their heads so every thread has
 * work. Tasks are spread over torch's OpenMP threads (the process's one libgomp: torch's own pool).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dsserve_kernels.h"
#include "vec_math.h"

/* The two inner products of a block, for a group of at most 8 query heads: scores s[h][j] = q_h . k_j * scale
 * and accumulators acc[h] += sum_j p[h][j] v_j. The vector versions keep one register per head (the key or value
 * chunk is loaded once for all heads); `heads` is a compile-time constant in each instance (see GROUP). One body
 * serves AVX-512 (16 floats a register) and AVX2 (8), through the macros below. */
#if defined(__AVX512F__) && defined(__F16C__)
#include <immintrin.h>
#define VEC 16
typedef __m512 vfloat;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VSET1(x) _mm512_set1_ps(x)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define HSUM(v) _mm512_reduce_add_ps(v)
/* VEC cache values from `p` (element `i` of a float32 or float16 cache) as floats; `half` is a constant. */
#define CACHEV(p, i, half) \
    ((half) ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(p) + (i)))) \
            : _mm512_loadu_ps((const float *)(p) + (i)))
#define SUM16 1

/* Lane i of the result = the sum of the 16 lanes of a[i]: the sixteen horizontal sums in 15 adds and 30 shuffles
 * (a transpose-and-add tree) instead of 16 separate reductions. */
static inline __attribute__((always_inline)) __m512 sum16(const __m512 *a) {
    __m512 s1[8], s2[4];
    for (int k = 0; k < 8; k++) /* per 128-bit lane: [a even, b even, a odd, b odd] partial sums */
        s1[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
    for (int k = 0; k < 4; k++) { /* per 128-bit lane: the partial sums of a[4k .. 4k + 3] */
        const __m512d c = _mm512_castps_pd(s1[2 * k]), d = _mm512_castps_pd(s1[2 * k + 1]);
        s2[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
    }
    const __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[0], s2[1], 0x44), _mm512_shuffle_f32x4(s2[0], s2[1], 0xEE));
    const __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2], s2[3], 0x44), _mm512_shuffle_f32x4(s2[2], s2[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xDD));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VEC 8
typedef __m256 vfloat;
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VSET1(x) _mm256_set1_ps(x)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define HSUM(v) hsum(v)
#define CACHEV(p, i, half) \
    ((half) ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)(p) + (i)))) \
            : _mm256_loadu_ps((const float *)(p) + (i)))
#define SUM16 0

static inline float hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}
#endif

#ifdef VEC
static inline __attribute__((always_inline)) void block_scores(
    const float *q, int64_t heads, int64_t k_dim, const void *keys, int64_t token_stride, int64_t n, float *s,
    int64_t s_stride, float scale, int half) {
    int64_t j = 0;
#if SUM16
    if (16 % heads == 0) { /* 16 / heads tokens at a time: 16 dot products, reduced together by sum16 */
        const int64_t group = 16 / heads;
        for (; j + group <= n; j += group) {
            vfloat acc[16];
            for (int v = 0; v < 16; v++) acc[v] = VZERO();
            for (int64_t d = 0; d < k_dim; d += VEC) {
                vfloat qh[8];
                for (int64_t h = 0; h < heads; h++) qh[h] = VLOAD(q + h * k_dim + d);
                for (int64_t t = 0; t < group; t++) {
                    const vfloat x = CACHEV(keys, (j + t) * token_stride + d, half);
                    for (int64_t h = 0; h < heads; h++) acc[h * group + t] = VFMA(qh[h], x, acc[h * group + t]);
                }
            }
            float out[16];
            VSTORE(out, _mm512_mul_ps(sum16(acc), VSET1(scale)));
            for (int64_t h = 0; h < heads; h++)
                for (int64_t t = 0; t < group; t++) s[h * s_stride + j + t] = out[h * group + t];
        }
    }
#endif
    if (heads <= 4) /* two tokens at a time: each q chunk loaded once for both, twice the independent sums */
        for (; j + 1 < n; j += 2) {
            vfloat a0[4], a1[4];
            for (int64_t h = 0; h < heads; h++) a0[h] = a1[h] = VZERO();
            for (int64_t d = 0; d < k_dim; d += VEC) {
                const vfloat x0 = CACHEV(keys, j * token_stride + d, half);
                const vfloat x1 = CACHEV(keys, (j + 1) * token_stride + d, half);
                for (int64_t h = 0; h < heads; h++) {
                    const vfloat qh = VLOAD(q + h * k_dim + d);
                    a0[h] = VFMA(qh, x0, a0[h]);
                    a1[h] = VFMA(qh, x1, a1[h]);
                }
            }
            for (int64_t h = 0; h < heads; h++) {
                s[h * s_stride + j] = HSUM(a0[h]) * scale;
                s[h * s_stride + j + 1] = HSUM(a1[h]) * scale;
            }
        }
    for (; j < n; j++) {
        vfloat acc[8];
        for (int64_t h = 0; h < heads; h++) acc[h] = VZERO();
        for (int64_t d = 0; d < k_dim; d += VEC) {
            const vfloat kv = CACHEV(keys, j * token_stride + d, half);
            for (int64_t h = 0; h < heads; h++) acc[h] = VFMA(VLOAD(q + h * k_dim + d), kv, acc[h]);
        }
        for (int64_t h = 0; h < heads; h++) s[h * s_stride + j] = HSUM(acc[h]) * scale;
    }
}

static inline __attribute__((always_inline)) void block_values(
    const float *p, int64_t p_stride, int64_t heads, const void *values, int64_t token_stride, int64_t n,
    float *acc, int64_t v_dim, int half) {
    for (int64_t d = 0; d < v_dim; d += VEC) {
        vfloat o[8];
        for (int64_t h = 0; h < heads; h++) o[h] = VLOAD(acc + h * v_dim + d);
        for (int64_t j = 0; j < n; j++) {
            const vfloat v = CACHEV(values, j * token_stride + d, half);
            for (int64_t h = 0; h < heads; h++) o[h] = VFMA(VSET1(p[h * p_stride + j]), v, o[h]);
        }
        for (int64_t h = 0; h < heads; h++) VSTORE(acc + h * v_dim + d, o[h]);
    }
}
#define HALF_SUPPORTED 1
#else
#define VEC 1
#define HALF_SUPPORTED 0 /* float16 caches need the AVX2 + F16C build; the caller checks `half_supported()` */

static inline void block_scores(const float *q, int64_t heads, int64_t k_dim, const void *keys,
                                int64_t token_stride, int64_t n, float *s, int64_t s_stride, float scale, int half) {
    (void)half;
    for (int64_t j = 0; j < n; j++)
        for (int64_t h = 0; h < heads; h++) {
            float sum = 0.0f;
            const float *k = (const float *)keys + j * token_stride, *qh = q + h * k_dim;
#pragma omp simd reduction(+ : sum)
            for (int64_t d = 0; d < k_dim; d++) sum += qh[d] * k[d];
            s[h * s_stride + j] = sum * scale;
        }
}

static inline void block_values(const float *p, int64_t p_stride, int64_t heads, const void *values,
                                int64_t token_stride, int64_t n, float *acc, int64_t v_dim, int half) {
    (void)half;
    for (int64_t j = 0; j < n; j++)
        for (int64_t h = 0; h < heads; h++) {
            const float w = p[h * p_stride + j], *v = (const float *)values + j * token_stride;
            float *a = acc + h * v_dim;
#pragma omp simd
            for (int64_t d = 0; d < v_dim; d++) a[d] += w * v[d];
        }
}
#endif

/* One instance per head count, so that the AVX2 loops above unroll over constant heads into registers. */
#define GROUP(fn, heads, ...)                                                                                         \
    switch (heads) {                                                                                                  \
    case 1: fn(__VA_ARGS__, 1); break;                                                                                \
    case 2: fn(__VA_ARGS__, 2); break;                                                                                \
    case 3: fn(__VA_ARGS__, 3); break;                                                                                \
    case 4: fn(__VA_ARGS__, 4); break;                                                                                \
    case 5: fn(__VA_ARGS__, 5); break;                                                                                \
    case 6: fn(__VA_ARGS__, 6); break;                                                                                \
    case 7: fn(__VA_ARGS__, 7); break;                                                                                \
    default: fn(__VA_ARGS__, 8); break;                                                                               \
    }
#define SCORES(q, k_dim, keys, token_stride, n, s, s_stride, scale, half, heads) \
    block_scores(q, heads, k_dim, keys, token_stride, n, s, s_stride, scale, half)
#define VALUES(p, p_stride, values, token_stride, n, acc, v_dim, half, heads) \
    block_values(p, p_stride, heads, values, token_stride, n, acc, v_dim, half)

/* The KV head of query head `head`, and how many heads from it on (at most `left`, at most 8) share it. */
static inline int64_t group_of(int64_t head, int64_t group, int64_t left, int64_t *count) {
    const int64_t kv_head = head / group, same = (kv_head + 1) * group - head;
    *count = same < left ? same : left;
    if (*count > 8) *count = 8;
    return kv_head;
}

int dsserve_paged_decode(const float *q, const void *cache, const int64_t *tables, const int64_t *lens, float *out,
                         int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t k_dim, int64_t v_dim,
                         int64_t block_size, int64_t table_stride, int64_t token_stride, int64_t head_stride,
                         int64_t k_offset, int64_t v_offset, int64_t heads_per_task, float scale, int half) {
    if (k_dim % VEC || v_dim % VEC) return -2; /* backends/cpu/kernels.py: usable() checks this first */
    if (half && !HALF_SUPPORTED) return -3;
    const int64_t elem = half ? 2 : 4; /* bytes per cache value */
    const int64_t group = num_heads / num_kv_heads;
    const int64_t chunks = (num_heads + heads_per_task - 1) / heads_per_task;
    const int64_t tasks = batch * chunks;
    int failed = 0;
#pragma omp parallel
    {
        /* per thread: scores/probabilities (heads x block), accumulators (heads x Dv), running max and sum */
        float *scores = malloc(sizeof(float) * (size_t)(heads_per_task * block_size));
        float *acc = malloc(sizeof(float) * (size_t)(heads_per_task * v_dim));
        float *run_max = malloc(sizeof(float) * (size_t)heads_per_task);
        float *run_sum = malloc(sizeof(float) * (size_t)heads_per_task);
        if (!scores || !acc || !run_max || !run_sum) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            int stop;
#pragma omp atomic read
            stop = failed;
            if (stop) continue; /* a thread could not allocate: the call fails, finish quickly */
            const int64_t b = task / chunks;
            const int64_t first = task % chunks * heads_per_task;
            const int64_t heads = num_heads - first < heads_per_task ? num_heads - first : heads_per_task;
            const float *qb = q + (b * num_heads + first) * k_dim;
            const int64_t len = lens[b];
            memset(acc, 0, sizeof(float) * (size_t)(heads * v_dim));
            for (int64_t h = 0; h < heads; h++) {
                run_max[h] = -INFINITY;
                run_sum[h] = 0.0f;
            }
            for (int64_t start = 0; start < len; start += block_size) {
                const int64_t n = len - start < block_size ? len - start : block_size;
                const char *block = (const char *)cache
                                    + tables[b * table_stride + start / block_size] * block_size * token_stride * elem;
                if (start + block_size < len) { /* the next block is elsewhere in memory: fetch it while this one computes */
                    const int64_t next_n = len - start - block_size < block_size ? len - start - block_size : block_size;
                    const char *next = (const char *)cache
                                       + tables[b * table_stride + start / block_size + 1] * block_size * token_stride * elem;
                    for (int64_t off = 0; off < next_n * token_stride * elem; off += 64) __builtin_prefetch(next + off, 0, 3);
                }
                for (int64_t g = 0, in_group; g < heads; g += in_group) {
                    const char *keys = block + (group_of(first + g, group, heads - g, &in_group) * head_stride + k_offset) * elem;
                    if (half) {
                        GROUP(SCORES, in_group, qb + g * k_dim, k_dim, keys, token_stride, n, scores + g * block_size,
                              block_size, scale, 1)
                    } else {
                        GROUP(SCORES, in_group, qb + g * k_dim, k_dim, keys, token_stride, n, scores + g * block_size,
                              block_size, scale, 0)
                    }
                }
                for (int64_t h = 0; h < heads; h++) {
                    float *s = scores + h * block_size;
                    float block_max = -INFINITY;
#pragma omp simd reduction(max : block_max)
                    for (int64_t j = 0; j < n; j++) block_max = s[j] > block_max ? s[j] : block_max;
                    const float new_max = block_max > run_max[h] ? block_max : run_max[h];
                    if (new_max > run_max[h] && run_max[h] != -INFINITY) {
                        const float shrink = exp_nonpositive(run_max[h] - new_max);
                        run_sum[h] *= shrink;
                        float *a = acc + h * v_dim;
#pragma omp simd
                        for (int64_t d = 0; d < v_dim; d++) a[d] *= shrink;
                    }
                    run_max[h] = new_max;
                    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                    for (int64_t j = 0; j < n; j++) {
                        s[j] = exp_nonpositive(s[j] - new_max);
                        sum += s[j];
                    }
                    run_sum[h] += sum;
                }
                for (int64_t g = 0, in_group; g < heads; g += in_group) {
                    const char *values = block + (group_of(first + g, group, heads - g, &in_group) * head_stride + v_offset) * elem;
                    if (half) {
                        GROUP(VALUES, in_group, scores + g * block_size, block_size, values, token_stride, n,
                              acc + g * v_dim, v_dim, 1)
                    } else {
                        GROUP(VALUES, in_group, scores + g * block_size, block_size, values, token_stride, n,
                              acc + g * v_dim, v_dim, 0)
                    }
                }
            }
            for (int64_t h = 0; h < heads; h++) {
                const float inv = 1.0f / run_sum[h];
                float *o = out + (b * num_heads + first + h) * v_dim;
                const float *a = acc + h * v_dim;
#pragma omp simd
                for (int64_t d = 0; d < v_dim; d++) o[d] = a[d] * inv;
            }
        }
        free(scores);
        free(acc);
        free(run_max);
        free(run_sum);
    }
    return failed ? -1 : 0;
}

/* Head dimensions must be multiples of this (8 floats with AVX2). */
int dsserve_vector_width(void) { return VEC; }

/* Whether float16 caches are read (the AVX2 + F16C build). */
int dsserve_half_supported(void) { return HALF_SUPPORTED; }
