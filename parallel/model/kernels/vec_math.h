/* expf that the compiler vectorizes inside `omp simd` loops (glibc's expf is a call per
 * element unless the whole file is built with -ffast-math): Cephes' range reduction and
 * polynomial, within 2 ulp of expf over the float range. It vectorizes with -fno-trapping-math
 * (floorf) and plain comparisons for the clamp (fminf's NaN rules keep it scalar). */
#ifndef SHARDSERVE_VEC_MATH_H
#define SHARDSERVE_VEC_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float vec_expf(float x) {
    x = x < -87.3f ? -87.3f : x; /* results stay normal floats: 2^n below is exact */
    x = x > 88.3f ? 88.3f : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    x = x - n * 0.693359375f + n * 2.12194440e-4f; /* x - n ln 2, in two parts */
    float y = 1.9875691500e-4f;
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * x * x + x + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

#endif
