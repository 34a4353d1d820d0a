/* The element-wise steps of a decoder layer on CPU in float32, each one pass over memory.
 *
 * In eager torch a Llama layer's glue is some thirty operators: the RMSNorm alone is six
 * (pow, mean, add, rsqrt, mul, mul) and the rotary embedding a dozen (slices, neg, cat, four
 * muls, two adds) before two index_copy_ calls write K and V to the pool. At a decode step's
 * few rows each operator costs its dispatch and a pass over a tensor that is still in cache,
 * which is most of a batch-1 forward that is not matrix work. vLLM's CPU backend fuses these
 * in C++ (rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul); these are ours,
 * built and loaded like the paged decode kernel (parallel/cpu_kernels.py) and called through
 * parallel/fused_layers.py. Rows run in parallel on torch's OpenMP threads only when there are
 * enough of them (a prefill chunk): at a decode step's few rows a parallel region costs more
 * than the work.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "vec_math.h"

#define PARALLEL_ELEMENTS 65536 /* below this many elements a loop stays on the calling thread */

/* out[r] = weight * (v * 1/sqrt(mean(v^2) + eps)) for each row v (as transformers' RMSNorm
 * computes it in float32). With `residual` non-NULL the row is v = residual[r] + x[r], and
 * residual[r] is updated to it first: the residual add before the norm, in the same pass. */
void rms_norm_f32(const float *x, int64_t x_stride, float *residual, const float *weight, float *out, int64_t rows,
                  int64_t hidden, float eps) {
#pragma omp parallel for if (rows * hidden >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const float *src = x + r * x_stride;
        if (residual != NULL) {
            float *res = residual + r * hidden;
#pragma omp simd
            for (int64_t j = 0; j < hidden; j++) res[j] += src[j];
            src = res;
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < hidden; j++) sum += src[j] * src[j];
        const float inv = 1.0f / sqrtf(sum / (float)hidden + eps);
        float *o = out + r * hidden;
#pragma omp simd
        for (int64_t j = 0; j < hidden; j++) o[j] = weight[j] * (src[j] * inv);
    }
}

/* Rotary embedding in the half-split layout (x1 = first half, x2 = second half of a head:
 * out = x * cos + cat(-x2, x1) * sin), for the queries and keys of `tokens` rows, then the
 * step's K/V written to the pool at each token's slot.
 * q, k, v: rows of heads x d floats, `*_stride` floats apart (views into the projections'
 * outputs); cos, sin: [tokens, d]; q_out: [tokens, heads, d]; k_out: [tokens, kv_heads, d]
 * (the rotated keys, for prefill chunks that attend to their own); pools:
 * [slots, kv_heads, d]. */
void rope_kv_write_f32(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                       int64_t v_stride, const float *cos, const float *sin, const int64_t *slots, int64_t tokens,
                       int64_t heads, int64_t kv_heads, int64_t d, float *q_out, float *k_out, float *k_pool,
                       float *v_pool) {
    const int64_t half = d / 2;
#pragma omp parallel for if (tokens * (heads + kv_heads) * d >= PARALLEL_ELEMENTS)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * d, *s = sin + t * d;
        for (int64_t h = 0; h < heads + kv_heads; h++) {
            const int key = h >= heads;
            const float *x = key ? k + t * k_stride + (h - heads) * d : q + t * q_stride + h * d;
            float *o = key ? k_out + (t * kv_heads + h - heads) * d : q_out + (t * heads + h) * d;
#pragma omp simd
            for (int64_t j = 0; j < half; j++) {
                o[j] = x[j] * c[j] - x[j + half] * s[j];
                o[j + half] = x[j + half] * c[j + half] + x[j] * s[j + half];
            }
        }
        float *kp = k_pool + slots[t] * kv_heads * d, *vp = v_pool + slots[t] * kv_heads * d;
        const float *kt = k_out + t * kv_heads * d, *vt = v + t * v_stride;
#pragma omp simd
        for (int64_t j = 0; j < kv_heads * d; j++) {
            kp[j] = kt[j];
            vp[j] = vt[j];
        }
    }
}

/* out[r] = silu(gate[r]) * up[r], silu(x) = x / (1 + exp(-x)), over rows of n floats. */
static void silu_mul_row(const float *restrict g, const float *restrict u, float *restrict o, int64_t n) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) o[j] = g[j] / (1.0f + vec_expf(-g[j])) * u[j];
}

void silu_mul_f32(const float *gate, int64_t gate_stride, const float *up, int64_t up_stride, float *out, int64_t rows,
                  int64_t n) {
#pragma omp parallel for if (rows * n >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) silu_mul_row(gate + r * gate_stride, up + r * up_stride, out + r * n, n);
}
