/* DeepSeekMoE's routed experts over any number of tokens, grouped by expert: the prompt steps' and large decode
 * batches' path (moe_f16 in linear_f16.c takes a few tokens; decode_layers.c calls this one for more), and every
 * step's with int8 / int4 experts.
 *
 * The (token, slot) pairs are sorted by expert (a stable counting sort); each active expert then gathers its
 * tokens' rows, runs one SwiGLU product over them (bf16: the fused gate_up + SwiGLU kernel; fp16, int8 and int4:
 * the linear, then silu * up) and one down product, and adds each row, scaled by its routing weight, into its token's
 * output. This is the module path's computation (backends/torch.py `experts`: argsort, per-expert GEMMs, `*=`,
 * index_add_ in sorted order) value for value: a token picks each expert at most once, so going expert by expert
 * adds its rows in the same order. Scratch is one expert's rows (at most T of them), not every pair's. */

#include <stdint.h>
#include <string.h>

#include "dsserve_kernels.h"

/* Floats of scratch for T tokens of k slots each, hidden size D, expert intermediate size I. */
int64_t dsserve_moe_grouped_workspace(int64_t T, int64_t D, int64_t k, int64_t I) {
    /* order (int32, pairs), then one expert's rows: x (T, D), gate_up (T, 2 I), silu * up (T, I), down (T, D) */
    return T * k + T * (2 * D + 3 * I);
}

enum { WEIGHTS_F16, WEIGHTS_BF16, WEIGHTS_QUANT };

/* y (M, N) = x (M, K) W^T for one expert's weight in the table's kind */
static int expert_linear(int kind, const float *x, const void *w, float *y, int64_t M, int64_t N, int64_t K) {
    if (kind == WEIGHTS_QUANT) return dsserve_linear_quant(x, w, NULL, y, M, N, K);
    if (kind == WEIGHTS_BF16) return dsserve_linear_bf16(x, w, NULL, y, M, N, K);
    return dsserve_linear_f16(x, w, NULL, y, M, N, K);
}

/* out (T, D) = sum over slots s of weights[t, s] * expert ids[t, s](x[t]) for ids in [0, E) (other ranks' experts
 * contribute nothing); w13[e] is expert e's packed [gate; up] (2 I, D), w2[e] its down (D, I), by weights_kind:
 * 0 fp16 (linear_f16's layout), 1 bf16 (linear_bf16's), 2 int8 / int4 (each a dsserve_quant_weight). x (T, D)
 * float32, ids and weights (T, k); E <= 1024 (the routers' limit).
 * 0, -2 for E, T * k or weights_kind out of range, or the first failing linear's status. */
int dsserve_moe_grouped(const float *x, int64_t T, int64_t D, const int64_t *ids, const float *weights, int64_t k,
                        const void *const *w13, const void *const *w2, int64_t E, int64_t I, int weights_kind,
                        float *out, float *work) {
    if (E < 1 || E > 1024 || T * k > INT32_MAX || weights_kind < WEIGHTS_F16 || weights_kind > WEIGHTS_QUANT)
        return -2;
    const int64_t pairs = T * k;
    int32_t *order = (int32_t *)work; /* int32: float-aligned, as any offset into a caller's float scratch is */
    float *rows = work + pairs, *gate_up = rows + T * D, *act = gate_up + T * 2 * I, *down = act + T * I;
    int64_t start[1025] = {0}, fill[1024];
    for (int64_t p = 0; p < pairs; p++)
        if (ids[p] >= 0 && ids[p] < E) start[ids[p] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    memcpy(fill, start, E * sizeof(int64_t));
    for (int64_t p = 0; p < pairs; p++)
        if (ids[p] >= 0 && ids[p] < E) order[fill[ids[p]]++] = (int32_t)p;
    memset(out, 0, T * D * sizeof(float));
    const int fused = weights_kind == WEIGHTS_BF16 && I % 16 == 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t first = start[e], count = start[e + 1] - first;
        if (!count) continue;
        const int32_t *pair = order + first;
#pragma omp parallel for schedule(static) if (count * D >= 65536)
        for (int64_t i = 0; i < count; i++) memcpy(rows + i * D, x + pair[i] / k * D, D * sizeof(float));
        int status;
        if (fused) {
            status = dsserve_linear_bf16_swiglu(rows, w13[e], act, count, I, D);
        } else {
            status = expert_linear(weights_kind, rows, w13[e], gate_up, count, 2 * I, D);
            if (!status) dsserve_silu_mul(gate_up, act, count, I);
        }
        if (status) return status;
        status = expert_linear(weights_kind, act, w2[e], down, count, D, I);
        if (status) return status;
        /* scale, then add: two roundings, as torch's `*=` then index_add_; rows of one expert are distinct tokens */
#pragma omp parallel for schedule(static) if (count * D >= 65536)
        for (int64_t i = 0; i < count; i++) {
            const float w = weights[pair[i]];
            const float *y = down + i * D;
            float *o = out + pair[i] / k * D;
            for (int64_t j = 0; j < D; j++) {
                const float scaled = y[j] * w;
                o[j] += scaled;
            }
        }
    }
    return 0;
}
