/* A whole decode step through the dense (Llama / Qwen2) decoder layers in one call.
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

int dsserve_rms_norm(const float *x, int64_t ldx, const float *w, float *out, int64_t rows, int64_t dim, float eps);
int dsserve_rotary(const float *x, int64_t token_stride, int64_t head_stride, float *out, int64_t tokens,
                   int64_t heads, int64_t dim, const int64_t *positions, const float *cos_table,
                   const float *sin_table, _Bool interleaved);
int dsserve_silu_mul(const float *gu, float *out, int64_t rows, int64_t inner);
int dsserve_cache_write(void *cache, int64_t entry, _Bool half, const int64_t *slots, int64_t tokens, const float *a,
                        int64_t lda, int64_t na, const float *b, int64_t ldb, int64_t nb);
int dsserve_linear_f16(const float *x, const uint16_t *packed, const float *bias, float *y, int64_t M, int64_t N,
                       int64_t K);
int dsserve_linear_bf16(const float *x, const uint16_t *packed, const float *bias, float *y, int64_t M, int64_t N,
                        int64_t K);
int dsserve_paged_decode(const float *q, const void *cache, const int64_t *tables, const int64_t *lens, float *out,
                         int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t k_dim, int64_t v_dim,
                         int64_t block_size, int64_t table_stride, int64_t token_stride, int64_t head_stride,
                         int64_t k_offset, int64_t v_offset, int64_t heads_per_task, float scale, int half);

/* One layer's weights: RMSNorm weights (hidden,), the four linears packed for linear_f16.c or linear_bf16.c
 * (q/k/v stacked, o, gate/up stacked, down; which one: the step's weights_bf16), their biases or NULL, and the layer's KV cache (blocks, block_size, 2, kv_heads,
 * head_dim) in float32 or float16. */
typedef struct {
    const float *input_norm, *post_norm;
    const uint16_t *qkv, *o, *gate_up, *down;
    const float *qkv_bias, *o_bias;
    void *cache;
} dsserve_dense_layer;

/* What the step shares across layers. x (tokens, hidden) float32 contiguous is the residual stream; work holds
 * dsserve_dense_workspace(...) floats. positions, slots (tokens,), tables (tokens, table_stride) and lens (tokens,)
 * are int64: one new token per sequence. */
typedef struct {
    int64_t tokens, hidden, heads, kv_heads, head_dim, intermediate;
    int64_t block_size, table_stride, heads_per_task;
    float eps, scale;
    int32_t cache_half, interleaved, weights_bf16, reserved;
    const int64_t *positions, *slots, *tables, *lens;
    const float *cos_table, *sin_table;
    float *x, *work;
} dsserve_dense_step;

int64_t dsserve_dense_workspace(int64_t tokens, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                int64_t intermediate) {
    const int64_t q = heads * head_dim, kv = kv_heads * head_dim;
    /* h, qkv, q, k, attention output, the residual branch, gate/up, silu(gate) * up */
    return tokens * (hidden + (q + 2 * kv) + q + kv + q + hidden + 2 * intermediate + intermediate);
}

static int linear(const dsserve_dense_step *s, const float *x, const uint16_t *packed, const float *bias, float *y,
                  int64_t M, int64_t N, int64_t K) {
    return s->weights_bf16 ? dsserve_linear_bf16(x, packed, bias, y, M, N, K) : dsserve_linear_f16(x, packed, bias, y, M, N, K);
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
