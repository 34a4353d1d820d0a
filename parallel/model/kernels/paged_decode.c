/* Decode attention over the paged KV pool, reading each sequence's blocks in place.
 *
 * One new token per sequence attends to its context [start, length) through its block table;
 * start is length - window for a sliding-window layer, else 0. A task is one sequence, or one
 * contiguous part of its context when there are fewer sequences than the threads need: it reads
 * each token's row of the pool (every KV head, in the pool's order) once for all the query heads,
 * so the pool is read once per layer, in runs as long as a block, instead of gathered into a
 * padded copy and read again. Splitting a context (as flash-decoding does) keeps both threads
 * streaming at batch 1, where one task per KV head read a quarter of every row and waited on
 * memory; the parts' softmax statistics are merged at the end. Compiled on first use by
 * parallel/cpu_kernels.py with the machine's C compiler and OpenMP.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec_math.h"

#define PREFETCH_AHEAD 6 /* rows: a block boundary jumps somewhere the hardware prefetcher cannot guess */
#define MIN_SPLIT_TOKENS 32 /* a context part shorter than this costs more to merge than it saves */

static inline void prefetch_row(const float *row, int64_t floats) {
    for (int64_t j = 0; j < floats; j += 16) __builtin_prefetch(row + j);
}

static inline float dot(const float *a, const float *b, int64_t d) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < d; j++) acc += a[j] * b[j];
    return acc;
}

/* Attention of the query heads qi [heads, d] over the context positions [lo, hi) of one
 * sequence: each head's maximum score, its sum of exp(score - maximum) and the unnormalized sum
 * of weighted values (acc [heads, d]). Returns -1 when the score buffer cannot be had. */
static int attend_part(const float *qi, const float *k_pool, const float *v_pool, const int64_t *table, int64_t lo,
                       int64_t hi, int64_t heads, int64_t kv_heads, int64_t d, int64_t block_size, float scale,
                       float *maxima, float *sums, float *acc) {
    const int64_t n = hi - lo, group = heads / kv_heads, token_stride = kv_heads * d;
    memset(acc, 0, sizeof(float) * (size_t)(heads * d));
    for (int64_t h = 0; h < heads; h++) {
        maxima[h] = -INFINITY;
        sums[h] = 0.0f;
    }
    if (n <= 0) return 0;
    /* Each context token's row in the pool (walked block by block, the same for K and V), then
     * the scores of every head. */
    int64_t *offsets = malloc(sizeof(int64_t) * (size_t)n + sizeof(float) * (size_t)(heads * n));
    if (offsets == NULL) return -1;
    float *scores = (float *)(offsets + n);
    for (int64_t pos = lo, p = 0; pos < hi; pos++, p++)
        offsets[p] = (table[pos / block_size] * block_size + pos % block_size) * token_stride;
    for (int64_t p = 0; p < n; p++) {
        const float *kt = k_pool + offsets[p];
        if (p + PREFETCH_AHEAD < n) prefetch_row(k_pool + offsets[p + PREFETCH_AHEAD], token_stride);
        for (int64_t h = 0; h < heads; h++) {
            const float s = scale * dot(qi + h * d, kt + (h / group) * d, d);
            scores[h * n + p] = s;
            if (s > maxima[h]) maxima[h] = s;
        }
    }
    for (int64_t h = 0; h < heads; h++) {
        float sum = 0.0f, *row = scores + h * n;
        const float m = maxima[h];
#pragma omp simd reduction(+ : sum)
        for (int64_t p = 0; p < n; p++) {
            const float e = vec_expf(row[p] - m);
            row[p] = e;
            sum += e;
        }
        sums[h] = sum;
    }
    for (int64_t p = 0; p < n; p++) {
        const float *vt = v_pool + offsets[p];
        if (p + PREFETCH_AHEAD < n) prefetch_row(v_pool + offsets[p + PREFETCH_AHEAD], token_stride);
        for (int64_t h = 0; h < heads; h++) {
            const float w = scores[h * n + p];
            const float *vh = vt + (h / group) * d;
            float *o = acc + h * d;
#pragma omp simd
            for (int64_t j = 0; j < d; j++) o[j] += w * vh[j];
        }
    }
    free(offsets);
    return 0;
}

/* q, out: [tokens, heads, d]; k_pool, v_pool: [blocks, block_size, kv_heads, d]; rows, lengths:
 * [num_seqs]; tables: [num_seqs, width]. Returns 0, or -1 when a task could not get memory. */
int paged_decode_f32(const float *q, const float *k_pool, const float *v_pool, float *out, const int64_t *rows,
                     const int64_t *tables, const int64_t *lengths, int64_t num_seqs, int64_t width, int64_t heads,
                     int64_t kv_heads, int64_t d, int64_t block_size, int64_t window, float scale) {
    const int64_t threads = omp_get_max_threads();
    /* Two tasks per thread for the dynamic schedule to balance uneven contexts. */
    const int64_t splits = num_seqs >= 2 * threads ? 1 : (2 * threads + num_seqs - 1) / num_seqs;
    const int64_t part = heads * (d + 2); /* one part's maxima, sums and acc */
    float *parts = malloc(sizeof(float) * (size_t)(num_seqs * splits * part));
    if (parts == NULL) return -1;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_seqs * splits; task++) {
        const int64_t i = task / splits, s = task % splits, length = lengths[i];
        const int64_t start = (window > 0 && length > window) ? length - window : 0;
        int64_t chunk = (length - start + splits - 1) / splits;
        if (chunk < MIN_SPLIT_TOKENS) chunk = MIN_SPLIT_TOKENS; /* the last parts stay empty */
        const int64_t lo = start + s * chunk, hi = lo + chunk < length ? lo + chunk : length;
        float *maxima = parts + task * part, *sums = maxima + heads, *acc = sums + heads;
        if (attend_part(q + rows[i] * heads * d, k_pool, v_pool, tables + i * width, lo, hi, heads, kv_heads, d,
                        block_size, scale, maxima, sums, acc) != 0)
            failed = 1;
    }
    if (!failed) {
        /* Each head's parts merged: weights exp(maximum - overall maximum), normalized by the
         * merged sum. */
#pragma omp parallel for if (num_seqs * heads * splits * d >= 65536)
        for (int64_t ih = 0; ih < num_seqs * heads; ih++) {
            const int64_t i = ih / heads, h = ih % heads;
            const float *first = parts + i * splits * part;
            float m = -INFINITY, total = 0.0f;
            for (int64_t s = 0; s < splits; s++)
                if (first[s * part + h] > m) m = first[s * part + h];
            float *o = out + (rows[i] * heads + h) * d;
            memset(o, 0, sizeof(float) * (size_t)d);
            for (int64_t s = 0; s < splits; s++) {
                const float *maxima = first + s * part, *sums = maxima + heads, *acc = sums + heads + h * d;
                if (sums[h] == 0.0f) continue; /* an empty part */
                const float w = expf(maxima[h] - m);
                total += w * sums[h];
#pragma omp simd
                for (int64_t j = 0; j < d; j++) o[j] += w * acc[j];
            }
            const float inverse = 1.0f / total;
#pragma omp simd
            for (int64_t j = 0; j < d; j++) o[j] *= inverse;
        }
    }
    free(parts);
    return failed ? -1 : 0;
}
