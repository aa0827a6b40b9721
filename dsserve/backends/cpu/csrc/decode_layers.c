/* A whole decode step through every decoder layer in one call: the dense (Llama / Qwen2) layers, and DeepSeek's
 * (MLA's absorbed decode, then a dense MLP or DeepSeekMoE).
 *
 * At batch 1 a layer's arithmetic is a few hundred microseconds of weight reads, and the Python between the
 * kernels (module calls, views, ctypes argument conversion, allocations) cost as much again: ten C calls per
 * layer, each a few microseconds of interpreter on either side. Here the same kernels run back to back, layer
 * after layer, on preallocated scratch: the step's tokens enter as the residual stream x and leave it updated in
 * place; the final norm and the LM head stay in Python (models/llama.py: DenseDecode). The functions called are
 * the ones the module path calls (elementwise.c, linear_f16.c, paged_attention.c), in the same order on the same
 * values, so both paths give the same bits (tests/models/test_fused_decode.py).
 */

#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "dsserve_kernels.h"

int64_t dsserve_dense_workspace(int64_t tokens, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                int64_t intermediate) {
    const int64_t q = heads * head_dim, kv = kv_heads * head_dim;
    /* h, qkv, q, k, attention output, the residual branch, gate/up, silu(gate) * up */
    return tokens * (hidden + (q + 2 * kv) + q + kv + q + hidden + 2 * intermediate + intermediate);
}

/* Which kernel reads the step's linears (moe.c's weights_kind values): 16-bit panels, or dsserve_quant_weight. */
enum { WEIGHTS_F16, WEIGHTS_BF16, WEIGHTS_QUANT };

static int weights_kind(int32_t bf16, int32_t quant) {
    return quant ? WEIGHTS_QUANT : bf16 ? WEIGHTS_BF16 : WEIGHTS_F16;
}

static int linear_any(int kind, const float *x, const void *weight, const float *bias, float *y, int64_t M,
                      int64_t N, int64_t K) {
    if (kind == WEIGHTS_QUANT) return dsserve_linear_quant(x, weight, bias, y, M, N, K);
    if (kind == WEIGHTS_BF16) return dsserve_linear_bf16(x, weight, bias, y, M, N, K);
    return dsserve_linear_f16(x, weight, bias, y, M, N, K);
}

static int linear(const dsserve_dense_step *s, const float *x, const void *weight, const float *bias, float *y,
                  int64_t M, int64_t N, int64_t K) {
    return linear_any(weights_kind(s->weights_bf16, s->weights_quant), x, weight, bias, y, M, N, K);
}

static void add_into(float *restrict x, const float *restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* 0, or the first failing kernel's status (nothing is undone: the caller reruns the step on the module path only
 * before any layer ran, which the Python side checks up front). */
int dsserve_dense_decode(const dsserve_dense_layer *layers, int64_t num_layers, const dsserve_dense_step *s) {
    const int64_t T = s->tokens, D = s->hidden, H = s->heads, G = s->kv_heads, Dh = s->head_dim;
    const int64_t I = s->intermediate, nq = H * Dh, nkv = G * Dh, nqkv = nq + 2 * nkv;
    float *h = s->work, *qkv = h + T * D, *q = qkv + T * nqkv, *k = q + T * nq, *attn = k + T * nkv;
    float *branch = attn + T * nq, *gate_up = branch + T * D, *act = gate_up + T * 2 * I;
    int status;
    for (int64_t l = 0; l < num_layers; l++) {
        const dsserve_dense_layer *L = layers + l;
        /* attention half: h = norm(x); qkv = h Wqkv^T + b; rotate q and k; store k, v; attend; x += o(attn) */
        dsserve_rms_norm(s->x, D, L->input_norm, h, T, D, s->eps);
        if ((status = linear(s, h, L->qkv, L->qkv_bias, qkv, T, nqkv, D))) return status;
        dsserve_rotary(qkv, nqkv, Dh, q, T, H, Dh, s->positions, s->cos_table, s->sin_table, s->interleaved);
        dsserve_rotary(qkv + nq, nqkv, Dh, k, T, G, Dh, s->positions, s->cos_table, s->sin_table, s->interleaved);
        if ((status = dsserve_cache_write(L->cache, 2 * nkv, s->cache_half, s->slots, T, k, nkv, nkv,
                                          qkv + nq + nkv, nqkv, nkv))) return status;
        if ((status = dsserve_paged_decode(q, L->cache, s->tables, s->lens, attn, T, H, G, Dh, Dh, s->block_size,
                                           s->table_stride, 2 * nkv, Dh, 0, nkv, s->heads_per_task, s->scale,
                                           s->cache_half))) return status;
        if ((status = linear(s, attn, L->o, L->o_bias, branch, T, D, nq))) return status;
        add_into(s->x, branch, T * D);
        /* feed-forward half: x += down(silu(gate(h)) * up(h)), h = norm(x) */
        dsserve_rms_norm(s->x, D, L->post_norm, h, T, D, s->eps);
        if ((status = linear(s, h, L->gate_up, NULL, gate_up, T, 2 * I, D))) return status;
        dsserve_silu_mul(gate_up, act, T, I);
        if ((status = linear(s, act, L->down, NULL, branch, T, D, I))) return status;
        add_into(s->x, branch, T * D);
    }
    return 0;
}

/* ---- DeepSeek: MLA + DeepSeekMoE --------------------------------------------------------------------------------
 *
 * One layer of DeepSeek V3 / R1 / V2 / V2-Lite (with or without q LoRA) at decode, as layers/attention.py's
 * absorbed path and layers/moe.py compute it: the queries are projected into latent space per head (fp16 W_UK^T),
 * attend over the cache's normalized latents + rope keys as one shared KV head, and come back out per head (fp16
 * W_UV) before o_proj. The MLP half is a dense SwiGLU MLP (the first_k_dense_replace layers) or the MoE: the
 * router (V3's sigmoid noaux_tc, or V2's softmax greedy / group-limited), the routed experts (a few tokens:
 * every (token, slot) pair in one call of moe_f16 over fp16 weights; more, or int8 / int4 experts: moe.c's
 * moe_grouped, the module path's call too), plus the shared experts. Every linear of the step reads 16-bit panels
 * (linear_f16.c or linear_bf16.c), or every one int8 / int4 panels (linear_quant.c: --quantization). The layer and step structs: dsserve_kernels.h. */

/* Floats of scratch a step of s->tokens tokens needs (int64 arrays first: the buffer is 8-byte aligned). */
int64_t dsserve_mla_workspace(const dsserve_mla_step *s) {
    const int64_t T = s->tokens, D = s->hidden, H = s->heads, C = s->kv_rank, R = s->rope;
    const int64_t pairs = T * s->top_k, Im = s->moe_intermediate;
    const int64_t few = pairs * (3 * Im + D), grouped = dsserve_moe_grouped_workspace(T, D, s->top_k, Im);
    return 2 * pairs + pairs                                            /* ids (int64); weights */
           + T * (D + 2 * s->q_rank + H * (s->nope + R) + (C + R) + C + R) /* h, q_a, its norm, q, kv_a, latent, k_pe */
           + T * H * (R + s->nope + C + (C + R) + C + s->v_dim)          /* q_pe, q_nope, q_latent, q, out_latent, out */
           + 2 * T * D + 3 * T * s->max_intermediate                      /* branch, routed; gate/up and silu * up */
           + (few > grouped ? few : grouped);                              /* the routed experts' scratch */
}

static void mla_attention(const dsserve_mla_layer *L, const dsserve_mla_step *s, float *h, float *q_a, float *q_a_n,
                          float *q, float *kv, float *latent, float *k_pe, float *q_pe, float *q_nope, float *q_lat,
                          float *q_cat, float *o_lat, float *o_v, float *branch, int *status) {
    const int64_t T = s->tokens, D = s->hidden, H = s->heads, N = s->nope, R = s->rope, C = s->kv_rank;
    const int64_t V = s->v_dim, QR = s->q_rank, NR = N + R, CR = C + R;
    const int kind = weights_kind(s->weights_bf16, s->weights_quant);
#define TRY(call) do { if ((*status = (call))) return; } while (0)
    dsserve_rms_norm(s->x, D, L->input_norm, h, T, D, s->eps);
    if (L->q_a) {
        TRY(linear_any(kind, h, L->q_a, L->q_a_bias, q_a, T, QR, D));
        dsserve_rms_norm(q_a, QR, L->q_a_norm, q_a_n, T, QR, s->lora_eps);
        TRY(linear_any(kind, q_a_n, L->q_b, NULL, q, T, H * NR, QR));
    } else {
        TRY(linear_any(kind, h, L->q_b, NULL, q, T, H * NR, D));
    }
    TRY(linear_any(kind, h, L->kv_a, L->kv_a_bias, kv, T, CR, D));
    dsserve_rms_norm(kv, CR, L->kv_a_norm, latent, T, C, s->lora_eps);
    dsserve_rotary(q + N, H * NR, NR, q_pe, T, H, R, s->positions, s->cos_table, s->sin_table, s->interleaved);
    dsserve_rotary(kv + C, CR, R, k_pe, T, 1, R, s->positions, s->cos_table, s->sin_table, s->interleaved);
    TRY(dsserve_cache_write(L->cache, CR, s->cache_half, s->slots, T, latent, C, C, k_pe, R, R));
    for (int64_t th = 0; th < T * H; th++) memcpy(q_nope + th * N, q + th * NR, N * sizeof(float));
    TRY(dsserve_heads_f16(q_nope, L->absorb_k, s->absorb_k_stride, q_lat, T, H, C, N));
    for (int64_t th = 0; th < T * H; th++) {  /* the query over an entry: [q W_UK^T | rotated q_pe] */
        memcpy(q_cat + th * CR, q_lat + th * C, C * sizeof(float));
        memcpy(q_cat + th * CR + C, q_pe + th * R, R * sizeof(float));
    }
    TRY(dsserve_paged_decode(q_cat, L->cache, s->tables, s->lens, o_lat, T, H, 1, CR, C, s->block_size,
                             s->table_stride, CR, 0, 0, 0, s->heads_per_task, s->scale, s->cache_half));
    TRY(dsserve_heads_f16(o_lat, L->absorb_v, s->absorb_v_stride, o_v, T, H, V, C));
    TRY(linear_any(kind, o_v, L->o, L->o_bias, branch, T, D, H * V));
    add_into(s->x, branch, T * D);
#undef TRY
}

/* 0, or the first failing kernel's status (as dsserve_dense_decode). */
int dsserve_mla_decode(const dsserve_mla_layer *layers, int64_t num_layers, const dsserve_mla_step *s) {
    const int64_t T = s->tokens, D = s->hidden, H = s->heads, N = s->nope, R = s->rope, C = s->kv_rank;
    const int64_t pairs = T * s->top_k, Imax = s->max_intermediate;
    int64_t *ids = (int64_t *)s->work;
    float *weights = s->work + 2 * pairs, *h = weights + pairs;
    float *q_a = h + T * D, *q_a_n = q_a + T * s->q_rank, *q = q_a_n + T * s->q_rank, *kv = q + T * H * (N + R);
    float *latent = kv + T * (C + R), *k_pe = latent + T * C, *q_pe = k_pe + T * R, *q_nope = q_pe + T * H * R;
    float *q_lat = q_nope + T * H * N, *q_cat = q_lat + T * H * C, *o_lat = q_cat + T * H * (C + R);
    float *o_v = o_lat + T * H * C, *branch = o_v + T * H * s->v_dim, *routed = branch + T * D;
    float *gate_up = routed + T * D, *act = gate_up + T * 2 * Imax, *rows = act + T * Imax;
    const int kind = weights_kind(s->weights_bf16, s->weights_quant);
    int status = 0;
    for (int64_t l = 0; l < num_layers; l++) {
        const dsserve_mla_layer *L = layers + l;
        mla_attention(L, s, h, q_a, q_a_n, q, kv, latent, k_pe, q_pe, q_nope, q_lat, q_cat, o_lat, o_v, branch,
                      &status);
        if (status) return status;
        dsserve_rms_norm(s->x, D, L->post_norm, h, T, D, s->eps);
        const int64_t I = L->ffn_intermediate;
        float *shared = L->router ? routed : branch;  /* dense: the MLP's output is the branch itself */
        if (L->router) {
            status = s->router_kind
                ? dsserve_router_softmax(h, T, D, L->router, s->experts, s->n_group, s->topk_group, s->top_k,
                                         s->router_kind == 2, s->normalize, s->routed_scale, weights, ids)
                : dsserve_router_noaux(h, T, D, L->router, s->experts, L->router_bias, s->n_group, s->topk_group,
                                       s->top_k, s->normalize, s->routed_scale, weights, ids);
            if (status) return status;
            if (s->experts_f16_table && !s->weights_quant && pairs <= s->experts)
                status = dsserve_moe_f16(h, T, D, ids, weights, s->top_k, (const uint16_t *const *)L->w13,
                                         (const uint16_t *const *)L->w2, s->experts, s->moe_intermediate, branch,
                                         rows);
            else
                status = dsserve_moe_grouped(h, T, D, ids, weights, s->top_k, L->w13, L->w2, s->experts,
                                             s->moe_intermediate, kind, branch, rows);
            if (status) return status;
        }
        if (L->gate_up) {
            if ((status = linear_any(kind, h, L->gate_up, NULL, gate_up, T, 2 * I, D))) return status;
            dsserve_silu_mul(gate_up, act, T, I);
            if ((status = linear_any(kind, act, L->down, NULL, shared, T, D, I))) return status;
            if (L->router) add_into(branch, shared, T * D);  /* routed + shared */
        }
        add_into(s->x, branch, T * D);
    }
    return 0;
}
