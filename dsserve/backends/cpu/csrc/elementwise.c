/* The small per-token ops of a decoder layer on CPU, float32, one call each instead of torch's chain of five to
 * eight elementwise kernels (at decode sizes each torch op costs ~5-20 us of dispatch, more than its arithmetic):
 * RMSNorm, rotary embedding (half-split or DeepSeek's interleaved pairs), SwiGLU's silu(gate) * up, the
 * store of a step's new K/V (or latents) into the paged cache, and DeepSeek-V3's expert router.
 *
 * Built with the other kernels by dsserve/backends/cpu/kernels.py; the torch expressions they replace (layers/norm.py,
 * layers/rotary.py, layers/linear.py: MLP) are the fallback and the test oracle. Plain loops the compiler
 * vectorizes; rows are spread over torch's OpenMP threads once a call has enough of them to pay for the fork.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dsserve_kernels.h"

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

#include "vec_math.h"

#define PARALLEL_MIN 32768 /* elements below which one thread does the whole call */

/* a . b over n values in a fixed order: sixteen independent partial sums (vectorized without reassociating one
 * sum), then the tail, then the partials in order. RMSNorm's sum of squares and the routers' logits. */
static inline float dot16(const float *a, const float *b, int64_t n) {
    float partial[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int i = 0; i < 16; i++) partial[i] += a[j + i] * b[j + i];
    float sum = 0.0f;
    for (; j < n; j++) sum += a[j] * b[j];
    for (int i = 0; i < 16; i++) sum += partial[i];
    return sum;
}

/* out[r] = x[r] * (1 / sqrt(mean(x[r]^2) + eps)) * w, as transformers' float32 RMSNorm. x rows `ldx` apart (last
 * dimension contiguous), out (rows, dim) contiguous. */
int dsserve_rms_norm(const float *x, int64_t ldx, const float *w, float *out, int64_t rows, int64_t dim, float eps) {
#pragma omp parallel for schedule(static) if (rows * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ldx;
        float *o = out + r * dim;
        const float scale = 1.0f / sqrtf(dot16(xr, xr, dim) / (float)dim + eps);
        for (int64_t j = 0; j < dim; j++) o[j] = xr[j] * scale * w[j];
    }
    return 0;
}

/* Rotary embedding of x (tokens, heads, dim): token t at rows `token_stride` apart, heads `head_stride` apart,
 * the last dimension contiguous; out (tokens, heads, dim) contiguous. cos/sin (positions, dim / 2) contiguous,
 * positions (tokens,). Half-split (NeoX): x = [x1 | x2] -> [x1 c - x2 s | x2 c + x1 s]. Interleaved pairs
 * (x[2i], x[2i+1]) -> [evens | odds] = [x[2i] c - x[2i+1] s | x[2i+1] c + x[2i] s], the order transformers'
 * DeepSeek code leaves them in. */
int dsserve_rotary(const float *x, int64_t token_stride, int64_t head_stride, float *out, int64_t tokens,
                   int64_t heads, int64_t dim, const int64_t *positions, const float *cos_table,
                   const float *sin_table, bool interleaved) {
    const int64_t half = dim / 2;
#pragma omp parallel for schedule(static) if (tokens * heads * dim >= PARALLEL_MIN)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos_table + positions[t] * half, *s = sin_table + positions[t] * half;
        for (int64_t h = 0; h < heads; h++) {
            const float *xh = x + t * token_stride + h * head_stride;
            float *o = out + (t * heads + h) * dim;
            if (interleaved) {
                for (int64_t i = 0; i < half; i++) {
                    const float even = xh[2 * i], odd = xh[2 * i + 1];
                    o[i] = even * c[i] - odd * s[i];
                    o[half + i] = odd * c[i] + even * s[i];
                }
            } else {
                for (int64_t i = 0; i < half; i++) {
                    const float x1 = xh[i], x2 = xh[half + i];
                    o[i] = x1 * c[i] - x2 * s[i];
                    o[half + i] = x2 * c[i] + x1 * s[i];
                }
            }
        }
    }
    return 0;
}

/* out (rows, inner) = silu(gu[:, :inner]) * gu[:, inner:], gu (rows, 2 * inner) contiguous (vec_math.h: silu_times). */
int dsserve_silu_mul(const float *gu, float *out, int64_t rows, int64_t inner) {
#pragma omp parallel for schedule(static) if (rows * inner >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * inner, *u = g + inner;
        float *o = out + r * inner;
        for (int64_t j = 0; j < inner; j++) o[j] = silu_times(g[j], u[j]);
    }
    return 0;
}

/* Store this step's new cache entries: token t's entry, at slot slots[t] of a cache of `entry`-value entries, is
 * a[t] (na values, rows `lda` apart) followed by b[t] (nb values, rows `ldb` apart), each row contiguous: K then V
 * (GQA, entry (2, Hkv, D)) or the latent then the rope key (MLA). A float16 cache (`half`) gets them rounded to
 * nearest even, as torch's .to(float16); that needs the F16C build (returns -1 without it). */
int dsserve_cache_write(void *cache, int64_t entry, bool half, const int64_t *slots, int64_t tokens, const float *a,
                        int64_t lda, int64_t na, const float *b, int64_t ldb, int64_t nb) {
#if !(defined(__F16C__) && defined(__AVX__))
    if (half) return -1;
#endif
#pragma omp parallel for schedule(static) if (tokens * (na + nb) >= PARALLEL_MIN)
    for (int64_t t = 0; t < tokens; t++) {
        const float *src[2] = {a + t * lda, b + t * ldb};
        const int64_t len[2] = {na, nb}, offset[2] = {0, na};
        for (int part = 0; part < 2; part++) {
            if (!half) {
                memcpy((float *)cache + slots[t] * entry + offset[part], src[part], len[part] * sizeof(float));
                continue;
            }
#if defined(__F16C__) && defined(__AVX__)
            uint16_t *dst = (uint16_t *)cache + slots[t] * entry + offset[part];
            int64_t j = 0;
            for (; j + 8 <= len[part]; j += 8)
                _mm_storeu_si128((__m128i *)(dst + j),
                                 _mm256_cvtps_ph(_mm256_loadu_ps(src[part] + j), _MM_FROUND_TO_NEAREST_INT));
            for (; j < len[part]; j++) dst[j] = _cvtss_sh(src[part][j], _MM_FROUND_TO_NEAREST_INT);
#endif
        }
    }
    return 0;
}

/* DeepSeek-V3's router (topk_method "noaux_tc", sigmoid scores) for T tokens: scores = sigmoid(W x), choice =
 * scores + bias; a group's score is the sum of its two best choices; the topk_group best groups are kept; the
 * k best choices among their experts are picked (ties: the lower index, at both stages); their weights are the
 * unbiased scores, divided by their sum when `normalize`, times `scale`. W (E, D), x (T, D) contiguous float32;
 * out_weights (T, k) float32, out_ids (T, k) int64. E <= 1024 and E / n_group >= 2. Returns -2 beyond that. */
int dsserve_router_noaux(const float *x, int64_t T, int64_t D, const float *W, int64_t E, const float *bias,
                         int64_t n_group, int64_t topk_group, int64_t k, int normalize, float scale,
                         float *out_weights, int64_t *out_ids) {
    if (E > 1024 || n_group <= 0 || E % n_group || E / n_group < 2 || k > E || topk_group > n_group) return -2;
    const int64_t per_group = E / n_group;
#pragma omp parallel for schedule(static) if (T * E * D >= 4 * PARALLEL_MIN)
    for (int64_t t = 0; t < T; t++) {
        float scores[1024], choice[1024], group_score[1024];
        unsigned char kept[1024];
        const float *xt = x + t * D;
        for (int64_t e = 0; e < E; e++) {
            const float logit = dot16(W + e * D, xt, D);
            scores[e] = 1.0f / (1.0f + expf(-logit));
            choice[e] = scores[e] + bias[e];
        }
        for (int64_t g = 0; g < n_group; g++) {  /* sum of the group's two best choices */
            float first = -INFINITY, second = -INFINITY;
            for (int64_t e = g * per_group; e < (g + 1) * per_group; e++) {
                if (choice[e] > first) second = first, first = choice[e];
                else if (choice[e] > second) second = choice[e];
            }
            group_score[g] = first + second;
            kept[g] = 0;
        }
        for (int64_t pick = 0; pick < topk_group; pick++) {
            int64_t best = -1;
            for (int64_t g = 0; g < n_group; g++)
                if (!kept[g] && (best < 0 || group_score[g] > group_score[best])) best = g;
            if (best < 0) break;
            kept[best] = 1;
        }
        float total = 0.0f;
        for (int64_t pick = 0; pick < k; pick++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (kept[e / per_group] && (best < 0 || choice[e] > choice[best])) best = e;
            if (best < 0) best = 0; /* fewer kept experts than k: cannot happen with valid configs */
            out_ids[t * k + pick] = best;
            out_weights[t * k + pick] = scores[best];
            total += scores[best];
            choice[best] = -INFINITY;
        }
        for (int64_t pick = 0; pick < k; pick++) {
            float w = out_weights[t * k + pick];
            if (normalize) w = w / (total + 1e-20f);
            out_weights[t * k + pick] = w * scale;
        }
    }
    return 0;
}

/* DeepSeek-V2's router (softmax scores; topk_method "greedy", or "group_limited_greedy": a group's score is its
 * best expert's, the topk_group best groups are kept) for T tokens: the k best scores (ties: the lower index, at
 * both stages) and their ids; weights divided by their sum when `normalize`, times `scale`. W (E, D), x (T, D)
 * contiguous float32; out_weights (T, k) float32, out_ids (T, k) int64. E <= 1024 and, group-limited,
 * E % n_group == 0; returns -2 beyond that. */
int dsserve_router_softmax(const float *x, int64_t T, int64_t D, const float *W, int64_t E, int64_t n_group,
                           int64_t topk_group, int64_t k, int group_limited, int normalize, float scale,
                           float *out_weights, int64_t *out_ids) {
    if (E > 1024 || k > E || (group_limited && (n_group <= 0 || E % n_group || topk_group > n_group))) return -2;
    const int64_t per_group = group_limited ? E / n_group : E;
#pragma omp parallel for schedule(static) if (T * E * D >= 4 * PARALLEL_MIN)
    for (int64_t t = 0; t < T; t++) {
        float scores[1024];
        unsigned char kept[1024];
        const float *xt = x + t * D;
        float top = -INFINITY;
        for (int64_t e = 0; e < E; e++) {
            const float logit = dot16(W + e * D, xt, D);
            scores[e] = logit;
            top = logit > top ? logit : top;
        }
        float sum = 0.0f;
        for (int64_t e = 0; e < E; e++) sum += (scores[e] = expf(scores[e] - top));
        for (int64_t e = 0; e < E; e++) scores[e] /= sum;
        const int64_t groups = group_limited ? n_group : 1, keep = group_limited ? topk_group : 1;
        float group_score[1024];
        for (int64_t g = 0; g < groups; g++) {  /* a group's best score */
            float best = -INFINITY;
            for (int64_t e = g * per_group; e < (g + 1) * per_group; e++) best = scores[e] > best ? scores[e] : best;
            group_score[g] = best;
            kept[g] = 0;
        }
        for (int64_t pick = 0; pick < keep; pick++) {
            int64_t best = -1;
            for (int64_t g = 0; g < groups; g++)
                if (!kept[g] && (best < 0 || group_score[g] > group_score[best])) best = g;
            kept[best] = 1;
        }
        unsigned char taken[1024] = {0};
        float total = 0.0f;
        for (int64_t pick = 0; pick < k; pick++) {
            int64_t best = -1;
            float best_score = 0.0f;
            for (int64_t e = 0; e < E; e++) {  /* experts of dropped groups score 0, as the torch router masks them */
                const float s = kept[e / per_group] ? scores[e] : 0.0f;
                if (!taken[e] && (best < 0 || s > best_score)) best = e, best_score = s;
            }
            taken[best] = 1;
            out_ids[t * k + pick] = best;
            out_weights[t * k + pick] = best_score;
            total += best_score;
        }
        for (int64_t pick = 0; pick < k; pick++) {
            float w = out_weights[t * k + pick];
            if (normalize) w = w / (total + 1e-20f);
            out_weights[t * k + pick] = w * scale;
        }
    }
    return 0;
}
