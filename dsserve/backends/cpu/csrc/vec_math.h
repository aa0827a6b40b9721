/* Scalar maths written so that gcc/clang vectorize the loops calling it (shared by the CPU kernels). */
#ifndef DSSERVE_VEC_MATH_H
#define DSSERVE_VEC_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x) for x <= 0 (a score minus its running maximum): Cephes' expf polynomial after reducing by ln 2,
 * written so the compiler vectorizes the loops that call it; relative error ~1e-7, x < -87 clamps there. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = rintf(x * 1.44269504088896341f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const union { int32_t bits; float value; } scale = {.bits = ((int32_t)n + 127) << 23};  /* 2^n; a union: */
    return p * scale.value;  /* gcc vectorizes it, not a memcpy */
}

/* silu(g) * u = g / (1 + e^-g) * u, through e^-|g| (never overflows): g >= 0 -> g / (1 + e), g < 0 -> g e / (1 + e). */
static inline float silu_times(float g, float u) {
    const float e = exp_nonpositive(-fabsf(g)), r = 1.0f / (1.0f + e);
    return g * (g >= 0.0f ? r : e * r) * u;
}

#endif
