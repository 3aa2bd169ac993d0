/* A decoder layer's small ops on the CPU, fp32: RMSNorm and the rotary embedding.
 *
 * At decode each is a handful of torch ops on a few rows of 576 floats: transformers' RMSNorm
 * is six (to, pow, mean, add, rsqrt, two muls), its rotary embedding ten (two muls, a slice, a
 * neg and a cat per tensor, then an add). torch spends 3-5 us of dispatch on each, whatever
 * the size: on SmolLM2 at one sequence that was 1.8 of the 7.3 ms a step costs besides
 * reading the weights. Here each is one call.
 *
 * The rotary embedding gives torch's bits: the same products and sums, each rounded once, so
 * contraction into fused multiply-adds is off for this file. RMSNorm's sum of squares runs in
 * another order than torch's `mean` (it may differ in the last bit); its products are torch's. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

typedef float v16 __attribute__((vector_size(64), aligned(4)));

static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* y[r] = w * (x[r] * 1 / sqrt(mean(x[r]^2) + eps)) for rows r of n: x and y [rows, n]
 * contiguous (y may be x), w [n]. transformers' LlamaRMSNorm (and Qwen2's, Mistral's). */
void lp_rmsnorm_f32(float *y, const float *x, const float *w, int64_t rows, int64_t n,
                    float eps) {
  const int64_t nv = n / 16 * 16;
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * n;
    float *yr = y + r * n;
    v16 acc = {0};
    for (int64_t i = 0; i < nv; i += 16) {
      const v16 v = ld(xr + i);
      acc += v * v;
    }
    float sum = 0.0f;
    for (int l = 0; l < 16; l++) sum += acc[l];
    for (int64_t i = nv; i < n; i++) sum += xr[i] * xr[i];
    const float inv = 1.0f / sqrtf(sum / (float)n + eps);
    for (int64_t i = 0; i < n; i++) yr[i] = w[i] * (xr[i] * inv);
  }
}

/* In place, for each row r and head: x = x * cos[r] + rotate_half(x) * sin[r], where
 * rotate_half(x) = (-x[d/2:], x[:d/2]) (transformers' apply_rotary_pos_emb).
 * q [rows, hq, d] and k [rows, hk, d] contiguous; cos, sin [rows, d]. */
static void rope_rows(float *x, int64_t heads, const float *cos, const float *sin, int64_t rows,
                      int64_t d) {
  const int64_t half = d / 2;
  for (int64_t r = 0; r < rows; r++) {
    const float *c = cos + r * d, *s = sin + r * d;
    for (int64_t h = 0; h < heads; h++) {
      float *xh = x + (r * heads + h) * d;
      for (int64_t i = 0; i < half; i++) {
        const float a = xh[i], b = xh[i + half];
        xh[i] = a * c[i] + -b * s[i];
        xh[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}

void lp_rope_f32(float *q, int64_t hq, float *k, int64_t hk, const float *cos, const float *sin,
                 int64_t rows, int64_t d) {
  rope_rows(q, hq, cos, sin, rows, d);
  rope_rows(k, hk, cos, sin, rows, d);
}
