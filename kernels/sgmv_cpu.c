/* SGMV on the CPU, fp32: y[t] += scale[s] * (x[t] @ A[s, :r].T) @ B[s, :, :r].T for every
 * token t of a segment with slot s >= 0 and rank r = ranks[s] > 0.
 *
 * One call does a whole projection for the step. torch's GEMMs cost 5-30 us per call at
 * the decode shapes of LoRA (4 rows x rank 8-64), and the torch reference makes two per
 * segment per projection; here the per-segment work is register-tiled loops over the
 * adapter's weights, which are read once per 4 tokens.
 *
 * At decode the work is bound by streaming the adapters' weights from memory, so each slot
 * is laid out for the order the loops read it, packed to the adapter's own rank r, not the
 * slot's capacity (a rank-8 adapter in a rank-64 slot then reads 8 ranks' bytes, not 64's):
 *   x  [T, in]  rows ldx apart;  y [T, out] rows ldy apart
 *   slot s starts at w + s * slot_stride and holds
 *     A in blocks of 4 ranks, [ceil(r / 4), ceil(in / 16), 4, 16]: block b, chunk c holds
 *            A[4b : 4b + 4, 16c : 16c + 16], zeros past r and past in; the region is sized
 *            for the slot's capacity
 *     B^T panels, from b_offset: [ceil(out / 64), r, 64]: panel p row j holds
 *            B[64p : 64p + 64, j], so expanding 64 columns reads one contiguous run
 * Each loop reads its weights as one sequential stream and uses every byte it loads. Expand
 * computes the last panel's columns past `out`, whose lanes are never stored.
 *
 * Vectors are GCC/Clang vector extensions of VW floats: 16 (one AVX-512 register) where the
 * loader's flags allow AVX-512, else 8 (one AVX2 register). The layout above is the same
 * either way; only the register tiles differ. With 16-float vectors on AVX2 (two registers
 * each) the tiles' accumulators took 32 of its 16 registers and spilled: on a Zen 3 VM the
 * base's decode projections ran at 0.06-0.15x oneDNN's speed. */
#include <sched.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_max_threads(void) { return 1; }
#endif

#ifdef __AVX512F__
#define VW 16
#define JP 4 /* ranks per shrink pass: MB x JP accumulators */
#define GV 4 /* vectors per row of an expand tile: MB x GV accumulators */
#else
#define VW 8
#define JP 2
#define GV 2
#endif
/* loaded and stored through pointers of this type, which may alias floats (GCC 12 kept the
 * memcpy idiom's 32-byte copies on the stack, inside the hot loops) */
typedef float vf __attribute__((vector_size(4 * VW), aligned(4), may_alias));

/* The adapters' weights are fp32, or bf16 where the library is built with LP_WEIGHTS_BF16
 * (`--lora-dtype bfloat16`: half the bytes to stream); either way they are widened to fp32
 * as loaded and every product and sum is fp32. */
typedef uint16_t u16v __attribute__((vector_size(2 * VW), aligned(2), may_alias));
typedef uint32_t u32v __attribute__((vector_size(4 * VW)));
/* VW bf16 values widened to fp32: the weights of a LP_WEIGHTS_BF16 build, a bf16 model's rows */
static inline vf ld_bf16(const uint16_t *p) {
  return (vf)(__builtin_convertvector(*(const u16v *)p, u32v) << 16);
}
#ifdef LP_WEIGHTS_BF16
typedef uint16_t wt;
static inline vf ldw(const wt *p) { return ld_bf16(p); }
#else
typedef float wt;
static inline vf ldw(const wt *p) { return *(const vf *)p; }
#endif

/* One projection's slots, fixed for their lifetime: PackedSlots fills this once, and each
 * call passes its address (a ctypes call costs about 70 ns per argument, and there are 210
 * calls per decode step). */
typedef struct {
  const wt *w;  /* [num_slots, slot_stride] */
  int64_t slot_stride, b_offset, rank_cap, in, out;
  const int32_t *ranks;  /* [num_slots] */
  const float *scales;  /* [num_slots] */
} lp_slots;

/* One step's segments, filled once per step by SegmentTable. */
typedef struct {
  const int64_t *starts;  /* [num_segments + 1] */
  const int64_t *slots;  /* [num_segments] */
  int64_t num_segments;
  int64_t *items;  /* [2 * (T / MB + num_segments)] scratch: more than enough */
  float *h;  /* [T, ldh] scratch for lp_linear_lora_f32's shrinks, or NULL */
  int64_t ldh;  /* a multiple of 16, at least every slot's rank_cap */
} lp_step;

/* Token rows per tile: each weight loaded is used by up to 4 rows. A tile of fewer rows (a
 * segment's last, or a decode segment of one token) runs loops specialised for its count
 * (`tile`), which do only its rows' arithmetic: at 4 rows a core spends about as long on the
 * FMAs as on reading the weights. */
#define MB 4
/* Rows per work item: up to 4 tiles of one segment, run by one thread one after another, so
 * that the tiles after the first read the adapter's weights from that core's cache. As tiles
 * handed out one by one, two threads took a segment's tiles at once and both streamed its
 * weights from memory. Kernel alone (bench_sgmv_cpu --against), items against single tiles,
 * on a VM where the same source on both sides differs by up to 6%: 6-8 tokens per adapter
 * 0.975-1.097x over six runs (median 1.04x), prefill (1875 tokens) 0.99-1.15x, one token
 * unchanged. A step with few segments takes smaller items (`item_rows`): one adapter's 16
 * tokens as one item ran on one core, 22% slower. Where items end changes no result: tiles
 * start every MB rows of a segment either way. */
#define ITEM_ROWS (4 * MB)
#define PW 64  /* output columns per panel of B^T */
#define CG (GV * VW)  /* output columns per expand tile: a whole panel on AVX-512 */
/* Weights are streamed once per step: each loop asks for what it reads 1 KB (A) and 2 KB
 * (B^T) ahead, without keeping it in cache (prefetchnta). Measured on the 2-core EPYC VM with
 * the earlier A^T [in, r] layout, 8 adapters over SmolLM2's 210 projections: the kernel alone
 * 6.9-8.7 ms per decode step before, 6.0-7.1 after; in the engine 7.2-7.6 before, 7.0-7.2
 * after. Farther ahead (8-32 KB) or with the default cache hint it gained nothing. A prefetch
 * past the end of the weights never faults. */
#define AHEAD_A (1024 / (int)sizeof(wt))
/* The cache hint: prefetchnta on AMD's cores (cpu_build defines LP_PREFETCH_NTA there), as
 * measured above; prefetcht1 (into L2) elsewhere. On an Intel Xeon with AVX-512 (2026-12-03)
 * prefetchnta kept the lines out of L2, so every 4-row tile of a base panel read it from memory
 * again: the base's 211 projections ran at 0.18x oneDNN's speed at 32 rows and 0.67x at one
 * row, and at 1.06x and 1.38x with prefetcht1 (docs/benchmarks.md). t0 and t2 did as t1. */
#ifdef LP_PREFETCH_NTA
#define PF_HINT 0
#else
#define PF_HINT 2
#endif
#define AHEAD_B_BYTES 2048
#define LINE (64 / (int)sizeof(wt)) /* weights per cache line */

static inline vf ld(const float *p) { return *(const vf *)p; }
static inline void st(float *p, vf v) { *(vf *)p = v; }
#if VW == 16
static inline vf bc(float f) { return (vf){f, f, f, f, f, f, f, f, f, f, f, f, f, f, f, f}; }
#else
static inline vf bc(float f) { return (vf){f, f, f, f, f, f, f, f}; }
#endif

typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));

static inline float hsum(vf v) {
#if VW == 16
  v8 lo, hi;
  memcpy(&lo, &v, sizeof lo);
  memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
  const v8 s8 = lo + hi;
#else
  const v8 s8 = v;
#endif
  v4 a, b;
  memcpy(&a, &s8, sizeof a);
  memcpy(&b, (const char *)&s8 + sizeof a, sizeof b);
  const v4 s4 = a + b;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

#define JB 4 /* ranks per block of A */

/* h[i][0:r] = xr[i] @ A[0:r].T for mb rows. A is stored in blocks of JB ranks, each block
 * [ceil(in / 16), JB, 16]: chunk c of the block holds A[j0 + jj, 16c : 16c + 16] for its JB
 * ranks (zeros past r and past in). Each rank's row is a dot product along `in`, VW lanes at a
 * time, so every byte loaded is used whatever the rank; JP ranks x mb rows keep up to 16
 * (AVX-512; 8 on AVX2) independent accumulators busy, and A is read as one sequential stream
 * (AVX-512) or JB / JP interleaved ones. Inlined into `tile` with a constant mb, so that its
 * loops over rows unroll. */
static inline __attribute__((always_inline)) void shrink(
    float *h, int64_t ldh, const float *const xr[MB], int mb, const wt *a, int64_t r,
    int64_t in) {
  const int64_t kv = in / 16 * 16, chunks = (in + 15) / 16;
  for (int64_t j0 = 0; j0 < r; j0 += JP) {
    const int nj = r - j0 < JP ? (int)(r - j0) : JP;
    /* this pass's ranks in their block [chunks, JB, 16] */
    const wt *ab = a + j0 / JB * JB * chunks * 16 + j0 % JB * 16;
    vf acc[MB][JP];
    for (int i = 0; i < mb; i++)
      for (int jj = 0; jj < JP; jj++) acc[i][jj] = bc(0.0f);
    for (int64_t k = 0; k < in; k += 16) {
      const wt *ak = ab + k * JB;
      for (int l = 0; l < JP * 16; l += LINE) __builtin_prefetch(ak + AHEAD_A + l, 0, PF_HINT);
      for (int c = 0; c < 16; c += VW) {
        vf xv[MB];
        if (k < kv) {
          for (int i = 0; i < mb; i++) xv[i] = ld(xr[i] + k + c);
        } else {  /* the last chunk of an `in` that is not a multiple of 16 */
          for (int i = 0; i < mb; i++) {
            float t[16] = {0};
            memcpy(t, xr[i] + k, (size_t)(in - k) * sizeof(float));
            xv[i] = ld(t + c);
          }
        }
        for (int jj = 0; jj < JP; jj++) {
          const vf av = ldw(ak + 16 * jj + c);
          for (int i = 0; i < mb; i++) acc[i][jj] += xv[i] * av;
        }
      }
    }
    for (int i = 0; i < mb; i++)
      for (int jj = 0; jj < nj; jj++) h[i * ldh + j0 + jj] = hsum(acc[i][jj]);
  }
}

/* y[row i] += scale * h[i][0:r] @ B^T[0:r, :] for mb rows, CG columns of a 64-column panel
 * at a time. Each output column's sum runs over j in order whatever CG, so both builds give
 * the same bits. NAME reads weights of type T through LOAD: `expand` the adapters' (wt: fp32,
 * or bf16 in a LP_WEIGHTS_BF16 build), `expand_f32` the base's dense copy (fp32 in either
 * build). */
#define EXPAND(NAME, T, LOAD)                                                               \
  static inline __attribute__((always_inline)) void NAME(                                    \
      float *const yr[MB], int mb, const float *h, int64_t ldh, const T *panels, int64_t r,  \
      int64_t out, float scale) {                                                            \
    const vf sv = bc(scale);                                                                 \
    for (int64_t o0 = 0; o0 < out; o0 += PW) {                                               \
      for (int64_t c0 = 0; c0 < PW && o0 + c0 < out; c0 += CG) {                             \
        const T *bp = panels + o0 * r + c0; /* panel o0 / PW: [r, PW], from column c0 */     \
        vf acc[MB][GV];                                                                      \
        for (int i = 0; i < mb; i++)                                                         \
          for (int v = 0; v < GV; v++) acc[i][v] = bc(0.0f);                                 \
        for (int64_t j = 0; j < r; j++) {                                                    \
          vf b[GV];                                                                          \
          for (int v = 0; v < GV; v++) b[v] = LOAD(bp + j * PW + VW * v);                    \
          for (int l = 0; l < CG; l += 64 / (int)sizeof(T))                                  \
            __builtin_prefetch(bp + j * PW + l + AHEAD_B_BYTES / (int)sizeof(T), 0, PF_HINT);\
          for (int i = 0; i < mb; i++) {                                                     \
            vf hv = bc(h[i * ldh + j]);                                                      \
            for (int v = 0; v < GV; v++) acc[i][v] += hv * b[v];                             \
          }                                                                                  \
        }                                                                                    \
        const int64_t o1 = o0 + c0;                                                          \
        if (o1 + CG <= out) {                                                                \
          for (int i = 0; i < mb; i++)                                                       \
            for (int v = 0; v < GV; v++) {                                                   \
              float *p = yr[i] + o1 + VW * v;                                                \
              st(p, ld(p) + acc[i][v] * sv);                                                 \
            }                                                                                \
        } else { /* the last columns of an `out` that is not a multiple of CG */             \
          float tail[CG];                                                                    \
          for (int i = 0; i < mb; i++) {                                                     \
            for (int v = 0; v < GV; v++) st(tail + VW * v, acc[i][v] * sv);                  \
            for (int64_t o = o1; o < out; o++) yr[i][o] += tail[o - o1];                     \
          }                                                                                  \
        }                                                                                    \
      }                                                                                      \
    }                                                                                        \
  }
EXPAND(expand, wt, ldw)
EXPAND(expand_f32, float, ld)

/* The rows per item for this step: ITEM_ROWS, or fewer (down to one tile) where that would
 * leave fewer than two items per thread. */
static int64_t item_rows(const int32_t *ranks, const int64_t *starts, const int64_t *slots,
                         int64_t num_segments, int64_t threads) {
  int64_t rows = ITEM_ROWS;
  for (; rows > MB; rows /= 2) {
    int64_t n = 0;
    for (int64_t g = 0; g < num_segments; g++)
      if (slots[g] >= 0 && ranks[slots[g]] > 0) n += (starts[g + 1] - starts[g] + rows - 1) / rows;
    if (n >= 2 * threads) break;
  }
  return rows;
}

/* The step's work items, `rows` rows of one segment each (its last fewer), in order of
 * falling rank (an item's cost grows with it), so that the threads taking them in turn end
 * close together. One pass per distinct rank: few of either. Returns how many; items[2t] is
 * the segment, items[2t+1] the first row. */
static int64_t order_items(const int32_t *ranks, const int64_t *starts, const int64_t *slots,
                           int64_t num_segments, int64_t rows, int64_t *items) {
  int64_t num_items = 0;
  for (int64_t bound = INT64_MAX;;) {
    int64_t r = 0;
    for (int64_t g = 0; g < num_segments; g++) {
      const int64_t rg = slots[g] < 0 ? 0 : ranks[slots[g]];
      if (rg < bound && rg > r) r = rg;
    }
    if (r <= 0) break;
    for (int64_t g = 0; g < num_segments; g++) {
      if (slots[g] < 0 || ranks[slots[g]] != r) continue;
      for (int64_t m0 = starts[g]; m0 < starts[g + 1]; m0 += rows) {
        items[2 * num_items] = g;
        items[2 * num_items + 1] = m0;
        num_items++;
      }
    }
    bound = r;
  }
  return num_items;
}

/* yr[i] += scale * (xr[i] @ A.T) @ B.T for mb rows, in fp32. */
static inline __attribute__((always_inline)) void tile_rows(
    float *const yr[MB], int mb, const float *const xr[MB], const wt *a, int64_t b_offset,
    int64_t r, int64_t in, int64_t out, float scale) {
  const int64_t ldh = (r + 15) / 16 * 16;  /* h's rows hold whole vectors */
  float h[MB * ldh];
  shrink(h, ldh, xr, mb, a, r, in);
  expand(yr, mb, h, ldh, a + b_offset, r, out, scale);
}

/* `call` with mb_ a constant: 1, 2, 3, or MB for `rows` of MB and more, so that the inlined
 * loops over a tile's rows unroll and do only its rows' arithmetic. */
#define BY_ROWS(mb, call)                                                \
  switch (mb) {                                                          \
    case 1: { const int mb_ = 1; call; break; }                          \
    case 2: { const int mb_ = 2; call; break; }                          \
    case 3: { const int mb_ = 3; call; break; }                          \
    default: { const int mb_ = MB; call; break; }                        \
  }

/* Slot s's weights, with its rank (at most the slots' capacity) and scale. */
static inline const wt *slot_of(const lp_slots *p, int64_t s, int64_t *r, float *scale) {
  *r = p->ranks[s] < p->rank_cap ? p->ranks[s] : p->rank_cap;
  *scale = p->scales[s];
  return p->w + s * p->slot_stride;
}

/* One tile of 1 to MB rows of slot s, by the loops compiled for its row count. */
static void tile(float *const yr[MB], int mb, const float *const xr[MB], const lp_slots *p,
                 int64_t s) {
  int64_t r;
  float scale;
  const wt *a = slot_of(p, s, &r, &scale);
  BY_ROWS(mb, tile_rows(yr, mb_, xr, a, p->b_offset, r, p->in, p->out, scale))
}

/* A base model's linear layer at steps of few rows (decode), its weight held as B^T's panels:
 * y[rows, out] = x[rows, in] @ W^T (+ bias). Such a step reads each weight once for a few
 * FMAs, so its time is the weight's bytes over memory bandwidth; oneDNN's matmul on its own
 * packed weight reached about half of that at SmolLM2's shapes (server/runner/cpu_gemm.py
 * has the figures). The panels are split between the threads. */
typedef struct {
  const float *w;  /* [ceil(out / 64), in, 64]: panel p, row k holds W[64p : 64p + 64, k] */
  const float *bias;  /* [out], or NULL */
  int64_t in, out;
} lp_dense;

/* Rows m0 .. m0 + mb of panel o0 / PW: set to the bias (or zero), then the panel's product
 * added by `expand`, with the rows of x as its h. */
static inline __attribute__((always_inline)) void dense_rows(
    float *y, const float *x, int mb, int64_t m0, int64_t o0, const lp_dense *d) {
  const int64_t n = d->out - o0 < PW ? d->out - o0 : PW;
  float *yr[MB] = {0};
  for (int i = 0; i < mb; i++) {
    yr[i] = y + (m0 + i) * d->out + o0;
    if (d->bias) memcpy(yr[i], d->bias + o0, (size_t)n * sizeof(float));
    else memset(yr[i], 0, (size_t)n * sizeof(float));
  }
  expand_f32(yr, mb, x + m0 * d->in, d->in, d->w + o0 * d->in, d->in, n, 1.0f);
}

/* Panel p of every row. */
static inline void dense_panel(float *y, const float *x, int64_t rows, int64_t p,
                               const lp_dense *d) {
  for (int64_t m0 = 0; m0 < rows; m0 += MB)  /* a panel's later tiles read it from cache */
    BY_ROWS(rows - m0, dense_rows(y, x, mb_, m0, p * PW, d))
}

/* x [rows, in] and y [rows, out], both contiguous fp32. */
void lp_dense_f32(float *y, const float *x, int64_t rows, const lp_dense *d) {
  const int64_t panels = (d->out + PW - 1) / PW;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < panels; p++) dense_panel(y, x, rows, p, d);
}

/* The rows of item t, [m0, end), and its slot. */
static inline int64_t item_span(const lp_step *st, int64_t rows, int64_t t, int64_t *m0,
                                int64_t *s) {
  const int64_t g = st->items[2 * t];
  *m0 = st->items[2 * t + 1];
  *s = st->slots[g];
  return st->starts[g + 1] < *m0 + rows ? st->starts[g + 1] : *m0 + rows;
}

static inline float bf2f(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* Round to nearest, ties to even, as torch's float -> bfloat16 conversion. */
static inline uint16_t f2bf(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN */
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* A row of bf16 widened to fp32, and one rounded back as f2bf does, VW lanes at a time (GCC
 * vectorised f2bf's loop 4 lanes wide: for a low-rank adapter, the rows took longer than the
 * weights). */
static inline void widen_row(float *dst, const uint16_t *src, int64_t n) {
  int64_t o = 0;
  for (; o + VW <= n; o += VW) st(dst + o, ld_bf16(src + o));
  for (; o < n; o++) dst[o] = bf2f(src[o]);
}

static inline void round_row(uint16_t *dst, const float *src, int64_t n) {
  int64_t o = 0;
  for (; o + VW <= n; o += VW) {
    const u32v u = (u32v)ld(src + o);
    const u32v nan = (u32v)((u & 0x7fffffffu) > 0x7f800000u);  /* all ones in a NaN's lane */
    const u32v r = ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16 & ~nan) | ((u >> 16 | 0x40u) & nan);
    *(u16v *)(dst + o) = __builtin_convertvector(r, u16v);
  }
  for (; o < n; o++) dst[o] = f2bf(src[o]);
}

/* Item t's tiles. fp32 rows (scratch NULL) are the caller's; bf16 rows are widened into this
 * thread's scratch for their tile and each sum rounded back once after it. */
static inline void run_item(void *y, int64_t ldy, const void *x, int64_t ldx, const lp_slots *p,
                            const lp_step *st, int64_t rows, float *scratch, int64_t t) {
  const int64_t in = p->in, out = p->out;
  float *xs = scratch ? scratch + (int64_t)omp_get_thread_num() * MB * (in + out) : NULL;
  float *ys = scratch ? xs + MB * in : NULL;
  int64_t m0, s;
  const int64_t end = item_span(st, rows, t, &m0, &s);
  for (; m0 < end; m0 += MB) {
    const int mb = end - m0 < MB ? (int)(end - m0) : MB;
    const float *xr[MB] = {0};  /* rows past mb are never read */
    float *yr[MB] = {0};
    for (int i = 0; i < mb; i++) {
      if (!scratch) {
        xr[i] = (const float *)x + (m0 + i) * ldx;
        yr[i] = (float *)y + (m0 + i) * ldy;
        continue;
      }
      const uint16_t *xb = (const uint16_t *)x + (m0 + i) * ldx;
      const uint16_t *yb = (const uint16_t *)y + (m0 + i) * ldy;
      xr[i] = xs + i * in;
      yr[i] = ys + i * out;
      widen_row(xs + i * in, xb, in);
      widen_row(ys + i * out, yb, out);
    }
    tile(yr, mb, xr, p, s);
    for (int i = 0; scratch && i < mb; i++)
      round_row((uint16_t *)y + (m0 + i) * ldy, ys + i * out, out);
  }
}

/* The items run in parallel on torch's OpenMP threads (torch ships libgomp.so.1, which this
 * library then shares: one thread pool). A single item (a decode step with one adapter's
 * tokens) runs here without entering a parallel region: even one with a false `if` costs
 * libgomp about 0.5 us (and there the bf16 path uses thread 0's scratch). */
static void run_items(void *y, int64_t ldy, const void *x, int64_t ldx, const lp_slots *p,
                      const lp_step *st, float *scratch, int64_t threads) {
  const int64_t rows = item_rows(p->ranks, st->starts, st->slots, st->num_segments, threads);
  const int64_t num_items = order_items(p->ranks, st->starts, st->slots, st->num_segments,
                                        rows, st->items);
  if (num_items <= 1) {
    if (num_items == 1) run_item(y, ldy, x, ldx, p, st, rows, scratch, 0);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t = 0; t < num_items; t++) run_item(y, ldy, x, ldx, p, st, rows, scratch, t);
}

void lp_sgmv_f32(float *y, int64_t ldy, const float *x, int64_t ldx, const lp_slots *p,
                 const lp_step *st) {
  run_items(y, ldy, x, ldx, p, st, NULL, omp_get_max_threads());
}

/* bf16 x and y (a bf16 model), fp32 weights: the delta is added in fp32 and each sum rounded
 * once, as PEFT computes with its adapters in fp32. Rows of tokens without an adapter are
 * never touched. */
void lp_sgmv_bf16(uint16_t *y, int64_t ldy, const uint16_t *x, int64_t ldx, const lp_slots *p,
                  const lp_step *st, float *scratch /* [threads, MB * (in + out)] */,
                  int64_t num_threads) {
  run_items(y, ldy, x, ldx, p, st, scratch, num_threads);
}

/* The rows of item t, [m0, end), with its slot's weights, rank and scale. */
static inline int64_t item_slot(const lp_slots *p, const lp_step *st, int64_t rows, int64_t t,
                                int64_t *m0, const wt **a, int64_t *r, float *scale) {
  int64_t s;
  const int64_t end = item_span(st, rows, t, m0, &s);
  *a = slot_of(p, s, r, scale);
  return end;
}

/* h[m] = x[m] @ A.T for the rows m of item t, into the step's scratch. */
static void item_shrink(const float *x, int64_t ldx, const lp_slots *p, const lp_step *st,
                        int64_t rows, int64_t t) {
  int64_t m0, r;
  const wt *a;
  float scale;
  const int64_t end = item_slot(p, st, rows, t, &m0, &a, &r, &scale);
  for (; m0 < end; m0 += MB) {
    const float *xr[MB] = {0};
    for (int i = 0; i < MB && m0 + i < end; i++) xr[i] = x + (m0 + i) * ldx;
    BY_ROWS(end - m0, shrink(st->h + m0 * st->ldh, st->ldh, xr, mb_, a, r, p->in))
  }
}

/* y[m, c0:c1] += scale * h[m] @ B^T[:, c0:c1] for the rows m of item t; c0 and c1 whole
 * panels' columns (c1 may pass `out`). */
static void item_expand(float *y, int64_t ldy, const lp_slots *p, const lp_step *st,
                        int64_t rows, int64_t t, int64_t c0, int64_t c1) {
  int64_t m0, r;
  const wt *a;
  float scale;
  const int64_t end = item_slot(p, st, rows, t, &m0, &a, &r, &scale);
  const int64_t n = (c1 < p->out ? c1 : p->out) - c0;
  for (; m0 < end; m0 += MB) {
    float *yr[MB] = {0};
    for (int i = 0; i < MB && m0 + i < end; i++) yr[i] = y + (m0 + i) * ldy + c0;
    BY_ROWS(end - m0, expand(yr, mb_, st->h + m0 * st->ldh, st->ldh,
                             a + p->b_offset + c0 * r, r, n, scale))
  }
}

/* Until phase 1 of lp_linear_lora_f32 has finished unit u: a short spin (the unit is a
 * panel or a shrink, microseconds), then yielding the core, where more threads than cores
 * may have descheduled the thread that runs the unit. */
static inline void await_unit(const int *done, int64_t u) {
  for (int spins = 0; !__atomic_load_n(done + u, __ATOMIC_ACQUIRE);) {
    if (spins == 4096) {
      sched_yield();
      continue;
    }
    spins++;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
}

/* y [rows, out] = x [rows, in] @ W^T (+ bias), plus each token's adapter delta as
 * lp_sgmv_f32 adds it: a projection of a step of few rows in one call, with the same sums in
 * the same order as lp_dense_f32 then lp_sgmv_f32 (each row's products do not depend on
 * which rows share its tile).
 *
 * The two calls cost about 4 us more than one at SmolLM2's shapes (Python, ctypes and a
 * parallel region each), 210 times a decode step, and a step whose tokens all take one
 * adapter ran that adapter's item on one thread while the other waited. Here both threads
 * share the work in two phases: the base's panels and the adapters' shrinks, then the
 * adapters' expands, each split into enough column ranges to keep every thread busy.
 *
 * No barrier between the phases: a thread that finds no phase-1 unit left starts on the
 * expands while the other finishes its last unit (a base panel: in x 256 bytes), and each
 * expand waits only for the units it reads: its item's shrink (h) and the panels of its
 * columns (y). Every unit waited for has been handed to a thread that waits for nothing, so
 * each wait ends. The expands go column range by column range (every item's first range,
 * then every item's second), in at least 3 ranges where there are 3 panels, so that the first
 * ones read panels phase 1 finished early (libgomp hands the panels out in order). On an Intel
 * Xeon VM (2026-12-03; SmolLM2's 210 projections, 8 adapters of ranks 4-64, kernel alone, in
 * turn with the barrier) the adapters' cost per decode step fell by 17%, 10%, 17% and 6% at 4,
 * 8, 16 and 24 tokens (3.88 -> 3.23 ms at 4). Waits alone, with the old order (item by item,
 * one range each when there are 4 items or more), gained nothing there: such a range spans
 * every panel, the last one included. */
void lp_linear_lora_f32(float *y, const float *x, int64_t rows, const lp_dense *d,
                        const lp_slots *p, const lp_step *st) {
  const int64_t threads = omp_get_max_threads();
  const int64_t irows = item_rows(p->ranks, st->starts, st->slots, st->num_segments, threads);
  const int64_t items = order_items(p->ranks, st->starts, st->slots, st->num_segments, irows,
                                    st->items);
  const int64_t panels = (d->out + PW - 1) / PW;
  int64_t parts = items ? (2 * threads + items - 1) / items : 1;
  if (parts < 3) parts = 3;
  if (parts > panels) parts = panels;
  int done[items + panels];  /* phase 1's units finished: the items' shrinks, then the panels */
  memset(done, 0, sizeof done);
#pragma omp parallel num_threads(threads)
  {
    /* the shrinks first: each is a whole item, the panels even the threads out after */
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t u = 0; u < items + panels; u++) {
      if (u < items) item_shrink(x, d->in, p, st, irows, u);
      else dense_panel(y, x, rows, u - items, d);
      __atomic_store_n(done + u, 1, __ATOMIC_RELEASE);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < items * parts; u++) {
      const int64_t t = u % items, q = u / items;
      const int64_t p0 = q * panels / parts, p1 = (q + 1) * panels / parts;
      await_unit(done, t);
      for (int64_t pn = p0; pn < p1; pn++) await_unit(done, items + pn);
      item_expand(y, d->out, p, st, irows, t, p0 * PW, p1 * PW);
    }
  }
}
