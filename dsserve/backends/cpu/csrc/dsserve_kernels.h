/* The C interface of dsserve's CPU kernel library: every function Python calls and every struct passed across.
 *
 * The one place the interface is written. Every .c file includes it, so the compiler checks each definition
 * against its declaration here (and -Werror=missing-prototypes rejects an exported function missing from it);
 * kernels.py reads this file with pycparser to build each function's ctypes argtypes/restype and each struct's
 * ctypes fields, and checks the structs' layouts against the library's own sizeof/offsetof table
 * (dsserve_struct_layout) when it loads it. tests/backends/test_c_interface.py checks all of it.
 *
 * Kept to what kernels.py's parser reads: stdint/stdbool types, plain pointers, typedef'd structs of scalar and
 * pointer fields, no macros in declarations. Status returns: 0 ok, negative a failure the caller names.
 */
#ifndef DSSERVE_KERNELS_H
#define DSSERVE_KERNELS_H

#include <stdbool.h>
#include <stdint.h>

/* ---- what this build has (paged_attention.c, linear_f16.c, linear_bf16.c) ---------------------------------- */

int dsserve_vector_width(void);          /* floats per vector: head sizes must be multiples of it */
int dsserve_half_supported(void);        /* the attention kernel reads a float16 cache (AVX2 + F16C) */
int dsserve_linear_f16_supported(void);  /* the float16-weight linear is built (AVX2 + FMA + F16C) */
int dsserve_linear_bf16_supported(void); /* the bf16 AMX linear is built and Linux lets this process use the tiles */
int dsserve_linear_quant_supported(void); /* the int8 / int4 weight-only linears are built (AVX-512) */
int dsserve_linear_fp8_supported(void);   /* the fp8 linear is built (AMX + AVX512-BF16) and may use the tiles */
int dsserve_linear_w8a8_supported(void);  /* w8a8: 2 AMX int8 tiles + AVX512-VNNI, 1 AVX512-VNNI only, 0 none */

/* ---- decode attention over the paged cache (paged_attention.c) ---------------------------------------------- */

int dsserve_paged_decode(const float *q, const void *cache, const int64_t *tables, const int64_t *lens, float *out,
                         int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t k_dim, int64_t v_dim,
                         int64_t block_size, int64_t table_stride, int64_t token_stride, int64_t head_stride,
                         int64_t k_offset, int64_t v_offset, int64_t heads_per_task, float scale, int half);

/* ---- linears over packed weights (linear_f16.c, linear_bf16.c) ---------------------------------------------- */

int dsserve_pack_f16(const float *w, int64_t N, int64_t K, uint16_t *packed);
int dsserve_linear_f16(const float *x, const uint16_t *packed, const float *bias, float *y, int64_t M, int64_t N,
                       int64_t K);
int dsserve_heads_f16(const float *x, const uint16_t *packed, int64_t head_stride, float *y, int64_t T, int64_t H,
                      int64_t N, int64_t K);
int dsserve_moe_f16(const float *x, int64_t T, int64_t D, const int64_t *ids, const float *weights, int64_t k,
                    const uint16_t *const *w13, const uint16_t *const *w2, int64_t num_experts, int64_t I,
                    float *out, float *scratch);
int dsserve_linear_bf16(const float *x, const uint16_t *packed, const float *bias, float *y, int64_t M, int64_t N,
                        int64_t K);
/* y (M, I) = silu(x Wg^T) * (x Wu^T), packed the (2 I, K) gate_up weight for linear_bf16; -2 when I % 16 != 0 */
int dsserve_linear_bf16_swiglu(const float *x, const uint16_t *packed, float *y, int64_t M, int64_t I, int64_t K);

/* ---- linears over int8 / int4 weights, activations float32 (linear_quant.c describes the layouts) ---------- */

int dsserve_linear_int8(const float *x, const int8_t *packed, const float *scales, const float *bias, float *y,
                        int64_t M, int64_t N, int64_t K);
int dsserve_linear_int4(const float *x, const uint8_t *packed, const uint16_t *scales, const uint8_t *zeros,
                        const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t group);

/* ---- linears over float8 e4m3 weights with per-row scales per 128 inputs (linear_fp8.c describes the layout) -- */

int dsserve_linear_fp8(const float *x, const uint8_t *packed, const float *scales, const float *bias, float *y,
                       int64_t M, int64_t N, int64_t K);

/* One quantized weight as the fused decoders and moe_grouped read it (kernels.py: QuantPanels.struct): bits 8
 * (scales float32, zeros NULL, group 0) or 4 (scales float16, zeros uint8 or NULL for symmetric). */
typedef struct {
    const void *packed, *scales;
    const uint8_t *zeros;
    int64_t group;
    int32_t bits, reserved;
} dsserve_quant_weight;

/* dsserve_linear_int8 or dsserve_linear_int4 by w->bits (-2 for another) */
int dsserve_linear_quant(const float *x, const dsserve_quant_weight *w, const float *bias, float *y, int64_t M,
                         int64_t N, int64_t K);

/* ---- int8 weights times int8 activations quantized per row on the fly (linear_w8a8.c describes the layout) -- */

int dsserve_linear_w8a8(const float *x, const int8_t *packed, const float *scales, const int32_t *sums,
                        const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t tile_rows);
/* y (M, I) = silu(x Wg^T) * (x Wu^T), packed the (2 I, K) gate_up weight for linear_w8a8; -2 when I % 16 != 0 */
int dsserve_linear_w8a8_swiglu(const float *x, const int8_t *packed, const float *scales, const int32_t *sums,
                               float *y, int64_t M, int64_t I, int64_t K, int64_t tile_rows);

/* ---- routed experts over many tokens, grouped by expert (moe.c) --------------------------------------------- */

int64_t dsserve_moe_grouped_workspace(int64_t T, int64_t D, int64_t k, int64_t I);
int dsserve_moe_grouped(const float *x, int64_t T, int64_t D, const int64_t *ids, const float *weights, int64_t k,
                        const void *const *w13, const void *const *w2, int64_t E, int64_t I, int weights_kind,
                        float *out, float *work);

/* ---- a decoder layer's small ops (elementwise.c) ------------------------------------------------------------ */

int dsserve_rms_norm(const float *x, int64_t ldx, const float *w, float *out, int64_t rows, int64_t dim, float eps);
int dsserve_rotary(const float *x, int64_t token_stride, int64_t head_stride, float *out, int64_t tokens,
                   int64_t heads, int64_t dim, const int64_t *positions, const float *cos_table,
                   const float *sin_table, bool interleaved);
int dsserve_silu_mul(const float *gu, float *out, int64_t rows, int64_t inner);
int dsserve_cache_write(void *cache, int64_t entry, bool half, const int64_t *slots, int64_t tokens, const float *a,
                        int64_t lda, int64_t na, const float *b, int64_t ldb, int64_t nb);
int dsserve_router_noaux(const float *x, int64_t T, int64_t D, const float *W, int64_t E, const float *bias,
                         int64_t n_group, int64_t topk_group, int64_t k, int normalize, float scale,
                         float *out_weights, int64_t *out_ids);
int dsserve_router_softmax(const float *x, int64_t T, int64_t D, const float *W, int64_t E, int64_t n_group,
                           int64_t topk_group, int64_t k, int group_limited, int normalize, float scale,
                           float *out_weights, int64_t *out_ids);

/* ---- a dense (Llama / Qwen2) decode step through every layer (decode_layers.c) ------------------------------ */

/* One layer's weights: RMSNorm weights (hidden,), the four linears (q/k/v stacked, o, gate/up stacked, down), their
 * biases or NULL, and the layer's KV cache (blocks, block_size, 2, kv_heads, head_dim) in float32 or float16. Each
 * linear is packed for linear_f16.c or linear_bf16.c, or is a dsserve_quant_weight: the step's weights_bf16 and
 * weights_quant say which, one kind for every linear of every layer. */
typedef struct {
    const float *input_norm, *post_norm;
    const void *qkv, *o, *gate_up, *down;
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
    int32_t cache_half, interleaved, weights_bf16, weights_quant;
    const int64_t *positions, *slots, *tables, *lens;
    const float *cos_table, *sin_table;
    float *x, *work;
} dsserve_dense_step;

int64_t dsserve_dense_workspace(int64_t tokens, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                int64_t intermediate);
int dsserve_dense_decode(const dsserve_dense_layer *layers, int64_t num_layers, const dsserve_dense_step *s);

/* ---- a DeepSeek (MLA + DeepSeekMoE) decode step through every layer (decode_layers.c) ----------------------- */

/* The linears as in dsserve_dense_layer (16-bit panels, or dsserve_quant_weight where the step's weights_quant) */
typedef struct {
    const float *input_norm, *post_norm, *q_a_norm, *kv_a_norm;
    const void *q_a, *q_b, *kv_a, *o;      /* q_a NULL: no q LoRA, q_b is q_proj (hidden -> heads x (nope + rope)) */
    const float *q_a_bias, *kv_a_bias, *o_bias;
    const uint16_t *absorb_k, *absorb_v;   /* per head, fp16 (linear_f16.c: heads_f16): W_UK^T (C x nope), W_UV (v x C) */
    const void *gate_up, *down;            /* the dense MLP, or the shared experts (NULL: none) */
    const float *router, *router_bias;     /* (experts, hidden) float32 and V3's (experts,): NULL in a dense layer */
    const void *const *w13, *const *w2;    /* each routed expert's [gate; up] (2 I, hidden) and down (hidden, I) */
    void *cache;                           /* (blocks, block_size, C + rope) float32 or float16, contiguous */
    int64_t ffn_intermediate;              /* of gate_up / down */
} dsserve_mla_layer;

typedef struct {
    int64_t tokens, hidden, heads, nope, rope, v_dim, q_rank, kv_rank;
    int64_t experts, top_k, n_group, topk_group, moe_intermediate, max_intermediate;
    int64_t block_size, table_stride, heads_per_task, absorb_k_stride, absorb_v_stride;
    float eps, lora_eps, scale, routed_scale;
    int32_t cache_half, interleaved, weights_bf16, normalize, experts_f16_table;
    int32_t router_kind;  /* 0: V3's sigmoid noaux_tc; V2's softmax: 1 greedy, 2 group-limited greedy */
    int32_t weights_quant; /* every linear and routed expert is a dsserve_quant_weight */
    const int64_t *positions, *slots, *tables, *lens;
    const float *cos_table, *sin_table;
    float *x, *work;
} dsserve_mla_step;

int64_t dsserve_mla_workspace(const dsserve_mla_step *s);
int dsserve_mla_decode(const dsserve_mla_layer *layers, int64_t num_layers, const dsserve_mla_step *s);

/* ---- the structs' layouts as this compiler laid them out (generated at build time by kernels.py) ------------ */

/* The i-th entry of the table: for each struct above in order, its sizeof, then each field's offsetof in order;
 * -1 past the end. */
int64_t dsserve_struct_layout(int64_t i);

#endif
