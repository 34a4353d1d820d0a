/* Decode attention over the paged KV pool, reading each sequence's blocks in place.
 *
 * One new token per sequence attends to its context [start, length) through its block table;
 * start is length - window for a sliding-window layer, else 0. Each (sequence, KV head) task
 * reads every key and value of its context once for all the query heads that share that KV
 * head (GQA), so the pool is read once per layer instead of gathered into a padded copy and
 * read again. Compiled on first use by parallel/cpu_kernels.py with the machine's C
 * compiler and OpenMP; in a process that has imported torch, `libgomp.so.1` resolves to the
 * one torch loaded, so these loops run on torch's own OpenMP threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float dot(const float *a, const float *b, int64_t d) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < d; j++) acc += a[j] * b[j];
    return acc;
}

/* q, out: [tokens, heads, d]; k_pool, v_pool: [blocks, block_size, kv_heads, d]; rows, lengths:
 * [num_seqs]; tables: [num_seqs, width]. A task is one sequence and `task_kv_heads` of its KV
 * heads (all of them when there are sequences enough to go round the threads: each token's row
 * of the pool is then read whole, in order). Returns 0, or -1 when a task could not get memory. */
int paged_decode_f32(const float *q, const float *k_pool, const float *v_pool, float *out, const int64_t *rows,
                     const int64_t *tables, const int64_t *lengths, int64_t num_seqs, int64_t width, int64_t heads,
                     int64_t kv_heads, int64_t d, int64_t block_size, int64_t window, float scale,
                     int64_t task_kv_heads) {
    const int64_t group = heads / kv_heads, splits = kv_heads / task_kv_heads, task_heads = task_kv_heads * group;
    const int64_t token_stride = kv_heads * d;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_seqs * splits; task++) {
        const int64_t i = task / splits, g0 = (task % splits) * task_kv_heads;
        const int64_t length = lengths[i];
        const int64_t start = (window > 0 && length > window) ? length - window : 0;
        const int64_t n = length - start;
        const int64_t *table = tables + i * width;
        const float *qi = q + (rows[i] * heads + g0 * group) * d;
        float *oi = out + (rows[i] * heads + g0 * group) * d;
        /* Per task: each context token's offset in the pool (walked block by block, the same
         * for K and V), then the scores of every head, then their maxima and inverse sums. */
        int64_t *offsets = malloc(sizeof(int64_t) * (size_t)n + sizeof(float) * (size_t)(task_heads * (n + 2)));
        if (offsets == NULL) {
            failed = 1;
            continue;
        }
        float *scores = (float *)(offsets + n), *maxima = scores + task_heads * n, *inverse = maxima + task_heads;
        for (int64_t pos = start, p = 0; pos < length; pos++, p++)
            offsets[p] = (table[pos / block_size] * block_size + pos % block_size) * token_stride + g0 * d;
        for (int64_t h = 0; h < task_heads; h++) maxima[h] = -INFINITY;
        for (int64_t p = 0; p < n; p++) {
            const float *kt = k_pool + offsets[p];
            for (int64_t h = 0; h < task_heads; h++) {
                const float s = scale * dot(qi + h * d, kt + (h / group) * d, d);
                scores[h * n + p] = s;
                if (s > maxima[h]) maxima[h] = s;
            }
        }
        for (int64_t h = 0; h < task_heads; h++) {
            float sum = 0.0f;
            float *row = scores + h * n;
            for (int64_t p = 0; p < n; p++) {
                row[p] = expf(row[p] - maxima[h]);
                sum += row[p];
            }
            inverse[h] = 1.0f / sum;
        }
        memset(oi, 0, sizeof(float) * (size_t)(task_heads * d));
        for (int64_t p = 0; p < n; p++) {
            const float *vt = v_pool + offsets[p];
            for (int64_t h = 0; h < task_heads; h++) {
                const float w = scores[h * n + p] * inverse[h];
                const float *vh = vt + (h / group) * d;
                float *o = oi + h * d;
#pragma omp simd
                for (int64_t j = 0; j < d; j++) o[j] += w * vh[j];
            }
        }
        free(offsets);
    }
    return failed ? -1 : 0;
}
