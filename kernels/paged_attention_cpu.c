/* Paged decode attention on the CPU, the semantics of paged_attention.py's `paged_decode_ref`:
 * for sequence b with context length L, query head h and its KV head g = h / (H / KVH),
 *   o[b, h] = softmax_p(scale * q[b, h] . K[p, g]) @ V[p, g]   over cached positions p < L
 * (and p >= L - window with a window), position p in slot p % bs of block table[b][p / bs].
 *
 * The torch reference gathers every sequence's blocks into a padded copy, then SDPA reads it
 * again: at decode that copy is most of the attention's cost. Here each (sequence, KV head)
 * task walks its own blocks in place and serves the KV head's whole query group, so each
 * key and value row is read once per step. Softmax is online, in fp32, one rescale per block.
 *
 *   q [B, H, D] rows q_sb / q_sh apart; o likewise with o_sb / o_sh
 *   k, v [num_blocks, bs, KVH, D] contiguous; table [B, table_stride] int64; lens [B] int64
 * D must be a multiple of 16 and at most MAXD, the group at most MAXG, bs at most MAXBS (the
 * loader checks). */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));

#define MAXD 256
#define MAXG 16
#define MAXBS 256
#define NV (MAXD / 16)

static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline v16 bc(float f) { return (v16){f, f, f, f, f, f, f, f, f, f, f, f, f, f, f, f}; }

static inline float hsum(v16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; i++) s += v[i];
  return s;
}

static inline v16 ld_f32(const float *p) { return ld(p); }

static inline v16 ld_bf16(const uint16_t *p) {
  uint32_t u[16];
  for (int i = 0; i < 16; i++) u[i] = (uint32_t)p[i] << 16;
  v16 v;
  memcpy(&v, u, sizeof v);
  return v;
}

static inline void st_f32(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* Round to nearest, ties to even, as torch's float -> bfloat16 conversion. */
static inline uint16_t f2bf(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN */
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

static inline void st_bf16(uint16_t *p, v16 v) {
  for (int i = 0; i < 16; i++) p[i] = f2bf(v[i]);
}

#define DECODE(NAME, T, LD, ST)                                                               \
  void NAME(const T *q, int64_t q_sb, int64_t q_sh, const T *k, const T *v,                 \
            const int64_t *table, int64_t table_stride, const int64_t *lens, T *o,           \
            int64_t o_sb, int64_t o_sh, int64_t batch, int64_t heads, int64_t kv_heads,      \
            int64_t d, int64_t bs, float scale, int64_t window, int64_t threads) {           \
    const int64_t group = heads / kv_heads, nv = d / 16, row = kv_heads * d;                \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads)")       \
    for (int64_t b = 0; b < batch; b++)                                                      \
      for (int64_t g = 0; g < kv_heads; g++) {                                               \
        v16 qv[MAXG][NV], acc[MAXG][NV];                                                     \
        float m[MAXG], l[MAXG], s[MAXG][MAXBS];                                              \
        for (int64_t i = 0; i < group; i++) {                                                \
          const T *qr = q + b * q_sb + (g * group + i) * q_sh;                               \
          for (int64_t j = 0; j < nv; j++) {                                                 \
            qv[i][j] = LD(qr + 16 * j);                                                      \
            acc[i][j] = bc(0.0f);                                                            \
          }                                                                                  \
          m[i] = -INFINITY;                                                                  \
          l[i] = 0.0f;                                                                       \
        }                                                                                    \
        const int64_t len = lens[b];                                                         \
        const int64_t first = window > 0 && len > window ? len - window : 0;                 \
        for (int64_t p0 = first - first % bs; p0 < len; p0 += bs) {                          \
          const int64_t lo = p0 > first ? p0 : first, hi = p0 + bs < len ? p0 + bs : len;    \
          const int64_t base = table[b * table_stride + p0 / bs] * bs * row + g * d;         \
          for (int64_t i = 0; i < group; i++) {                                              \
            float top = m[i];                                                                \
            for (int64_t p = lo; p < hi; p++) {                                              \
              const T *kr = k + base + (p - p0) * row;                                       \
              v16 dot = bc(0.0f);                                                            \
              for (int64_t j = 0; j < nv; j++) dot += qv[i][j] * LD(kr + 16 * j);            \
              const float x = hsum(dot) * scale;                                             \
              s[i][p - p0] = x;                                                              \
              top = x > top ? x : top;                                                       \
            }                                                                                \
            const float c = expf(m[i] - top); /* 0 at the first block: m is -inf */          \
            l[i] *= c;                                                                       \
            for (int64_t j = 0; j < nv; j++) acc[i][j] *= bc(c);                             \
            m[i] = top;                                                                      \
            for (int64_t p = lo; p < hi; p++) {                                              \
              const float w = expf(s[i][p - p0] - top);                                      \
              l[i] += w;                                                                     \
              const T *vr = v + base + (p - p0) * row;                                       \
              const v16 wv = bc(w);                                                          \
              for (int64_t j = 0; j < nv; j++) acc[i][j] += wv * LD(vr + 16 * j);            \
            }                                                                                \
          }                                                                                  \
        }                                                                                    \
        for (int64_t i = 0; i < group; i++) {                                                \
          T *orow = o + b * o_sb + (g * group + i) * o_sh;                                   \
          const v16 inv = bc(l[i] > 0.0f ? 1.0f / l[i] : 0.0f);                              \
          for (int64_t j = 0; j < nv; j++) ST(orow + 16 * j, acc[i][j] * inv);               \
        }                                                                                    \
      }                                                                                      \
  }

DECODE(lp_paged_decode_f32, float, ld_f32, st_f32)
DECODE(lp_paged_decode_bf16, uint16_t, ld_bf16, st_bf16)
