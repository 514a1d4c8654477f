/* One decoding step of prefix attention for small fp32 CPU calls: each sequence's single query against its
 * visible prefix slots and its own keys, in one call. Built and loaded by prefix_attn/decode_cpu.py, which says
 * when the torch backend calls it (prefix_attn/torch_backend.py, forward_heads_first).
 *
 * Layouts, strides in elements (the innermost, head_dim, stride is 1 for every tensor):
 *   q (B, H, 1, D) heads-first; k, v (B, Hkv, Lk, D); prefix_k, prefix_v the task's (P, Hkv, D) block, of which
 *   the first n_slots slots are visible; key_ok (B, Lk) bytes, 0 for a hidden key, or NULL (every key visible);
 *   out (B, 1, H, D) contiguous; lse (B, H) contiguous (natural log, -inf for a row that sees no key) or NULL.
 * Query head h reads KV head h / (H / Hkv). Scores, softmax and sums in fp32: scores first (one pass), then
 * the row's maximum, exp, and the weighted sum of values (a second pass), as the reference computes them. As in
 * the Triton kernels, the scores are in base 2 (log2(e) folded into the softmax scale, exp2), and the lse
 * leaves in natural log.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define LANES 8 /* partial sums of a dot product: independent lanes the compiler vectorises */
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

static float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float part[LANES] = {0.f};
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES)
        for (int lane = 0; lane < LANES; lane++)
            part[lane] += a[d + lane] * b[d + lane];
    float sum = 0.f;
    for (int lane = 0; lane < LANES; lane++)
        sum += part[lane];
    for (; d < n; d++)
        sum += a[d] * b[d];
    return sum;
}

static void add_scaled(float *restrict out, const float *restrict x, float weight, int64_t n) {
    for (int64_t d = 0; d < n; d++)
        out[d] += weight * x[d];
}

/* Returns 0, or 1 when the score buffer cannot be allocated. */
int prefix_attn_decode_f32(const float *q, int64_t q_stride_b, int64_t q_stride_h,
                           const float *k, int64_t k_stride_b, int64_t k_stride_h, int64_t k_stride_l,
                           const float *v, int64_t v_stride_b, int64_t v_stride_h, int64_t v_stride_l,
                           const float *prefix_k, int64_t pk_stride_p, int64_t pk_stride_h,
                           const float *prefix_v, int64_t pv_stride_p, int64_t pv_stride_h,
                           const uint8_t *key_ok, int64_t ok_stride_b, int64_t ok_stride_l,
                           int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t seqlen_k,
                           int64_t n_slots, float scale, float *out, float *lse) {
    const int64_t n_scores = n_slots + seqlen_k, group = heads / kv_heads;
    const float scale_log2 = scale * LOG2E;
    float *scores = malloc(sizeof(float) * (size_t)(n_scores > 0 ? n_scores : 1));
    if (scores == NULL)
        return 1;
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t h = 0; h < heads; h++) {
            const float *q_row = q + b * q_stride_b + h * q_stride_h;
            const int64_t hk = h / group;
            const float *k_head = k + b * k_stride_b + hk * k_stride_h;
            const float *v_head = v + b * v_stride_b + hk * v_stride_h;
            float *o = out + (b * heads + h) * head_dim;
            float row_max = -INFINITY;
            int64_t n_visible = n_slots;
            for (int64_t j = 0; j < n_slots; j++) {
                scores[j] = scale_log2 * dot(q_row, prefix_k + j * pk_stride_p + hk * pk_stride_h, head_dim);
                row_max = scores[j] > row_max ? scores[j] : row_max;
            }
            for (int64_t j = 0; j < seqlen_k; j++) {
                float s = -INFINITY;
                if (key_ok == NULL || key_ok[b * ok_stride_b + j * ok_stride_l]) {
                    s = scale_log2 * dot(q_row, k_head + j * k_stride_l, head_dim);
                    n_visible++;
                }
                scores[n_slots + j] = s;
                row_max = s > row_max ? s : row_max;
            }
            for (int64_t d = 0; d < head_dim; d++)
                o[d] = 0.f;
            if (n_visible == 0) { /* sees no key: out 0, lse -inf */
                if (lse != NULL)
                    lse[b * heads + h] = -INFINITY;
                continue;
            }
            float row_sum = 0.f;
            for (int64_t j = 0; j < n_scores; j++) {
                if (scores[j] == -INFINITY) /* hidden (a NaN score is not skipped: it makes the row NaN) */
                    continue;
                const float p = exp2f(scores[j] - row_max);
                row_sum += p;
                add_scaled(o, j < n_slots ? prefix_v + j * pv_stride_p + hk * pv_stride_h
                                          : v_head + (j - n_slots) * v_stride_l, p, head_dim);
            }
            const float inverse = 1.f / row_sum;
            for (int64_t d = 0; d < head_dim; d++)
                o[d] *= inverse;
            if (lse != NULL)
                lse[b * heads + h] = (row_max + log2f(row_sum)) * LN2;
        }
    }
    free(scores);
    return 0;
}
