/* loraplex's CPU kernels, built and loaded by cpu_kernels.py: sums in fp32, on fp32 or bf16
 * weights, activations and KV cache. Both read the data where it lives (the adapters' slot
 * pool, the paged KV cache) instead of gathering copies for torch ops, and run on torch's
 * OpenMP threads (libgomp is shared with torch, which loads it first).
 *
 * lora_bgmv: the LoRA delta of tokens that each use their own adapter (a BGMV, batched
 * gather matrix-vector, as Punica's on GPUs). For every token t with s = slots[t] > 0 and
 * r = ranks[s]:
 *
 *     y[t] += (A[s][:r] @ x[t]) @ B[s][:r]
 *
 * x: [T, in], y: [T, out], A: [S, r_max, in] and B: [S, r_max, out], each slot's rows
 * row-major; a_slot and b_slot are a slot's stride in weights (LoraLinear's pool puts a
 * slot's A rows and B rows in one block, so both are r_max * (in + out)). Returns 0, or -1 when
 * out of memory (y then unchanged). In a decode step every token reads a different adapter,
 * so the delta is bound by reading the weights: each token reads its slot's rows in place,
 * once, in order; torch's batched matmuls read them at about half the memory bandwidth and
 * need the tokens grouped and the slots' weights gathered first. Consecutive tokens of one
 * slot (a prefill chunk) are bound by the multiply-adds instead: they go in tiles of up to 8,
 * in register blocks (vectors of 8 floats: 71 GFLOP/s on one core of the bench machine
 * against 32 for the dot products a token alone uses). lora_bgmv_bf16 reads a pool of bf16
 * weights (EngineConfig.lora_dtype): half the bytes, sums still in fp32. Either takes x and
 * y in bf16 (a bf16 model) as well: each tile's rows widened to fp32, y's rounded back once.
 *
 * paged_decode_attention: one new token per sequence attends to its context in the paged
 * cache, each sequence to its own length (no padding to the longest, no gathered copy).
 *
 * trie_walk: guided decoding's walk of every token of the vocabulary through a pattern's
 * byte automaton at once (engine/guide.py), over the trie of the tokens' bytes.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
/* one build that uses AVX-512 or AVX2 + FMA where the CPU has them */
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* Consecutive tokens of one slot (a prefill chunk) are taken TILE at a time: each row of
 * A and B is then read once for the tile, from L1, instead of once per token. */
#define TILE 8

/* 8 floats in vector registers (GCC vector extensions: each target clone lowers them to its
 * own instructions, AVX2 or AVX-512 registers, or pairs of SSE ones); aligned(4): loads and
 * stores need no alignment. */
#define VW 8
#pragma GCC diagnostic ignored "-Wpsabi" /* vectors by value: all inlined, no ABI */
typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(VW * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VW * 4), aligned(4)));

/* Weights k .. k + VW - 1 of a row of floats, or of bf16 values (the top half of a float:
 * shifting one up 16 bits is the exact float). Inlined with `bf16` constant, each loop
 * has one form. */
#define INLINE static inline __attribute__((always_inline))

INLINE vf weights(const void *row, int64_t k, int bf16) {
  vf f;
  if (!bf16) {
    memcpy(&f, (const float *)row + k, sizeof f);
    return f;
  }
  vh h;
  memcpy(&h, (const uint16_t *)row + k, sizeof h);
  /* element by element: GCC then widens with one instruction (vpmovzxwd), where it split
   * __builtin_convertvector into halves */
  const vu bits = (vu){h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]} << 16;
  memcpy(&f, &bits, sizeof f);
  return f;
}

INLINE float weight(const void *row, int64_t k, int bf16) {
  if (!bf16) return ((const float *)row)[k];
  const uint32_t bits = (uint32_t)((const uint16_t *)row)[k] << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

INLINE vf loadv(const float *p) {
  vf v;
  memcpy(&v, p, sizeof v);
  return v;
}

INLINE float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VW; i++) s += v[i];
  return s;
}

/* The tiles of a batch: tile i is tokens starts[i] .. starts[i + 1] - 1, of one slot, at
 * most TILE of them; *count tiles. NULL when out of memory; the caller frees it. */
static int64_t *tile_starts(const int64_t *slots, int64_t T, int64_t *count) {
  int64_t *starts = malloc((T + 1) * sizeof(int64_t)), n = 0;
  if (starts == NULL) return NULL;
  for (int64_t t = 0; t < T; t++)
    if (t == 0 || slots[t] != slots[t - 1] || t - starts[n - 1] == TILE) starts[n++] = t;
  starts[n] = T;
  *count = n;
  return starts;
}

/* Shrink, in register blocks of 4 rows of A by NU tokens (each weight and input loaded once
 * per block, 4 * NU sums kept in registers): h[u * r + j] = A[j] . x[u] for rows j0 .. j0 + 3
 * (rows past r - 1 repeat row r - 1, their sums dropped) and tokens u0 .. u0 + NU - 1. */
#define SHRINK_BLOCK(NU)                                                                     \
  INLINE void shrink##NU(                             \
      const char *a, int64_t row_bytes, int64_t r, int64_t j0, const float *x, int64_t in,   \
      int64_t u0, float *h, int bf16) {                                                      \
    const char *rows[4];                                                                     \
    for (int q = 0; q < 4; q++) rows[q] = a + (j0 + q < r ? j0 + q : r - 1) * row_bytes;    \
    vf acc[4][NU] = {{{0}}};                                                                  \
    int64_t k = 0;                                                                           \
    for (; k + VW <= in; k += VW) {                                                          \
      vf xs[NU];                                                                             \
      for (int u = 0; u < NU; u++) xs[u] = loadv(x + (u0 + u) * in + k);                   \
      for (int q = 0; q < 4; q++) {                                                          \
        const vf w = weights(rows[q], k, bf16);                                              \
        for (int u = 0; u < NU; u++) acc[q][u] += w * xs[u];                                 \
      }                                                                                      \
    }                                                                                        \
    for (int q = 0; q < 4 && j0 + q < r; q++)                                                \
      for (int u = 0; u < NU; u++) {                                                         \
        float sum = hsum(acc[q][u]);                                                         \
        for (int64_t kk = k; kk < in; kk++) sum += weight(rows[q], kk, bf16) * x[(u0 + u) * in + kk]; \
        h[(u0 + u) * r + j0 + q] = sum;                                                      \
      }                                                                                      \
  }
SHRINK_BLOCK(2)
SHRINK_BLOCK(1)

/* Expand, in register blocks of NQ rows of B by NU tokens by 2 * VW columns (a block of y
 * is loaded and stored once for NQ rows; the NQ * NU factors stay in registers along the
 * columns): y[u][c] += sum_q h[u * r + j0 + q] B[j0 + q][c] for tokens u0 .. u0 + NU - 1. */
#define EXPAND_BLOCK(NQ, NU)                                                                 \
  INLINE void expand##NQ##x##NU(                      \
      const char *b, int64_t row_bytes, int64_t r, int64_t j0, const float *h, int64_t u0,   \
      float *y, int64_t out, int bf16) {                                                     \
    const char *rows[NQ];                                                                    \
    float f[NQ][NU];                                                                         \
    for (int q = 0; q < NQ; q++) {                                                           \
      rows[q] = b + (j0 + q) * row_bytes;                                                    \
      for (int u = 0; u < NU; u++) f[q][u] = h[(u0 + u) * r + j0 + q];                       \
    }                                                                                        \
    int64_t c = 0;                                                                           \
    for (; c + 2 * VW <= out; c += 2 * VW) {                                                 \
      vf acc[NU][2];                                                                         \
      for (int u = 0; u < NU; u++)                                                           \
        acc[u][0] = loadv(y + (u0 + u) * out + c), acc[u][1] = loadv(y + (u0 + u) * out + c + VW); \
      for (int q = 0; q < NQ; q++) {                                                         \
        const vf w0 = weights(rows[q], c, bf16), w1 = weights(rows[q], c + VW, bf16);        \
        for (int u = 0; u < NU; u++) acc[u][0] += f[q][u] * w0, acc[u][1] += f[q][u] * w1;   \
      }                                                                                      \
      for (int u = 0; u < NU; u++) {                                                         \
        memcpy(y + (u0 + u) * out + c, &acc[u][0], sizeof(vf));                              \
        memcpy(y + (u0 + u) * out + c + VW, &acc[u][1], sizeof(vf));                         \
      }                                                                                      \
    }                                                                                        \
    for (; c < out; c++)                                                                     \
      for (int u = 0; u < NU; u++) {                                                         \
        float sum = y[(u0 + u) * out + c];                                                   \
        for (int q = 0; q < NQ; q++) sum += f[q][u] * weight(rows[q], c, bf16);              \
        y[(u0 + u) * out + c] = sum;                                                         \
      }                                                                                      \
  }
EXPAND_BLOCK(4, 2)
EXPAND_BLOCK(4, 1)
EXPAND_BLOCK(1, 2)
EXPAND_BLOCK(1, 1)

/* A bf16 token's reads run this many bytes ahead of its loads in software prefetches (the
 * hardware prefetcher keeps up with fp32 weights, not with bf16 ones: 32 tokens' bf16
 * adapters, all linear layers, 60 MB, 2.3 -> 1.8 ms on the 2-core bench machine, kernel
 * alone; for fp32 the same prefetches cost 0-5%). */
#define PREFETCH 8192

/* One token alone (a decode), bound by reading its slot's weights: all of A[s]'s r rows,
 * then all of B[s]'s, one stream at a time (~10% faster than reading 4 rows at once, as the
 * blocks below do). `next`: the next tile's A (NULL: none), where a bf16 token's
 * prefetches go on once they pass the end of B[s]. */
INLINE void bgmv_token(const char *a, const char *b, const char *next, int64_t r,
                       const float *x, int64_t in, float *y, int64_t out, int bf16) {
  const int64_t size = bf16 ? 2 : 4, a_bytes = r * in * size, b_bytes = r * out * size;
  float h[r]; /* h = A[s][:r] @ x */
  for (int64_t j = 0; j < r; j++) {
    const char *row = a + j * in * size;
    vf acc0 = {0}, acc1 = {0}, acc2 = {0}, acc3 = {0}; /* 4 chains of FMAs, not one */
    int64_t k = 0;
    for (; k + 4 * VW <= in; k += 4 * VW) {
      if (bf16) { /* this step's 64 bytes, PREFETCH ahead in A[s], then in B[s] */
        const int64_t o = (j * in + k) * size + PREFETCH;
        __builtin_prefetch(o < a_bytes ? a + o : b + (o - a_bytes), 0, 3);
      }
      acc0 += weights(row, k, bf16) * loadv(x + k);
      acc1 += weights(row, k + VW, bf16) * loadv(x + k + VW);
      acc2 += weights(row, k + 2 * VW, bf16) * loadv(x + k + 2 * VW);
      acc3 += weights(row, k + 3 * VW, bf16) * loadv(x + k + 3 * VW);
    }
    for (; k + VW <= in; k += VW) acc0 += weights(row, k, bf16) * loadv(x + k);
    float sum = hsum((acc0 + acc1) + (acc2 + acc3));
    for (; k < in; k++) sum += weight(row, k, bf16) * x[k];
    h[j] = sum;
  }
  for (int64_t j = 0; j < r; j++) { /* y += h @ B[s][:r] */
    const char *row = b + j * out * size;
    const float hj = h[j];
    int64_t c = 0;
    for (; c + 2 * VW <= out; c += 2 * VW) {
      if (bf16 && (c & 2 * VW) == 0) { /* every other step: 64 bytes, in B[s] then next */
        const int64_t o = (j * out + c) * size + PREFETCH;
        if (o < b_bytes) __builtin_prefetch(b + o, 0, 3);
        else if (next != NULL) __builtin_prefetch(next + (o - b_bytes), 0, 3);
      }
      const vf y0 = loadv(y + c) + hj * weights(row, c, bf16);
      const vf y1 = loadv(y + c + VW) + hj * weights(row, c + VW, bf16);
      memcpy(y + c, &y0, sizeof y0);
      memcpy(y + c + VW, &y1, sizeof y1);
    }
    for (; c < out; c++) y[c] += hj * weight(row, c, bf16);
  }
}

/* n bf16 values (bit patterns) -> floats, exactly. */
INLINE void widen(const uint16_t *h, int64_t n, float *f) {
  int64_t i = 0;
  for (; i + VW <= n; i += VW) {
    const vf w = weights(h, i, 1);
    memcpy(f + i, &w, sizeof w);
  }
  for (; i < n; i++) f[i] = weight(h, i, 1);
}

/* n floats -> bf16 bit patterns, rounded to nearest even, NaN to 0x7FC0 (torch's
 * conversion). */
INLINE void narrow(const float *f, int64_t n, uint16_t *h) {
  int64_t i = 0;
  for (; i + VW <= n; i += VW) {
    vu bits;
    memcpy(&bits, f + i, sizeof bits);
    const vf v = loadv(f + i);
    const vu nan = (vu)(v != v); /* all ones where NaN */
    const vu r = ((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16 & ~nan) | (0x7FC0u & nan);
    const vh out = {r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]};
    memcpy(h + i, &out, sizeof out);
  }
  for (; i < n; i++) {
    uint32_t bits;
    memcpy(&bits, f + i, sizeof bits);
    h[i] = f[i] != f[i] ? 0x7FC0 : (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
}

/* One tile's delta. Called inside the exported functions' parallel loops, so it is
 * compiled into each of their target clones (a parallel loop of its own would not be).
 * x and y are fp32, or bf16 when act_bf16: the tile's rows are then widened into
 * `scratch` (TILE * (in + out) floats of this thread's own), the delta is added there, and
 * y's rows are rounded back once. */
INLINE void bgmv_tile(
    const void *x, int64_t in, const void *A, int64_t a_slot, const void *B, int64_t b_slot,
    int64_t out, const int64_t *slots, const int32_t *ranks, const int64_t *starts, int64_t i,
    int64_t T, void *y, float *scratch, int bf16, int act_bf16) {
  const int64_t t0 = starts[i], m = starts[i + 1] - t0, s = slots[t0];
  if (s <= 0) return; /* the base model: no delta */
  const int64_t r = ranks[s], size = bf16 ? 2 : 4; /* bytes per weight */
  if (r <= 0) return;
  const char *a = (const char *)A + s * a_slot * size; /* A[s]: [r_max, in] */
  const char *b = (const char *)B + s * b_slot * size; /* B[s]: [r_max, out] */
  const float *xt = (const float *)x + t0 * in;        /* the tile's inputs: [m, in] */
  float *yt = (float *)y + t0 * out;                   /* its outputs: [m, out] */
  if (act_bf16) {
    widen((const uint16_t *)x + t0 * in, m * in, scratch);
    widen((const uint16_t *)y + t0 * out, m * out, scratch + TILE * in);
    xt = scratch, yt = scratch + TILE * in;
  }
  if (m == 1) {
    const int64_t t1 = starts[i + 1], s1 = t1 < T ? slots[t1] : 0;
    const char *next = s1 > 0 ? (const char *)A + s1 * a_slot * size : NULL;
    bgmv_token(a, b, next, r, xt, in, yt, out, bf16);
  } else { /* several tokens (a prefill chunk) are bound by the multiply-adds */
    float h[TILE * r]; /* h[u * r + j]: the tile's shrunk inputs, u < m */
    for (int64_t j0 = 0; j0 < r; j0 += 4) {
      int64_t u = 0;
      for (; u + 2 <= m; u += 2) shrink2(a, in * size, r, j0, xt, in, u, h, bf16);
      if (u < m) shrink1(a, in * size, r, j0, xt, in, u, h, bf16);
    }
    for (int64_t j0 = 0; j0 < r;) {
      const int full = j0 + 4 <= r;
      int64_t u = 0;
      for (; u + 2 <= m; u += 2)
        full ? expand4x2(b, out * size, r, j0, h, u, yt, out, bf16)
             : expand1x2(b, out * size, r, j0, h, u, yt, out, bf16);
      if (u < m)
        full ? expand4x1(b, out * size, r, j0, h, u, yt, out, bf16)
             : expand1x1(b, out * size, r, j0, h, u, yt, out, bf16);
      j0 += full ? 4 : 1;
    }
  }
  if (act_bf16) narrow(yt, m * out, (uint16_t *)y + t0 * out);
}

/* The tile list, and act_bf16's scratch; 0, or -1 when out of memory. */
static int bgmv_setup(const int64_t *slots, int64_t T, int64_t in, int64_t out,
                      int64_t act_bf16, int64_t **starts, int64_t *n, float **scratch) {
  *scratch = NULL;
  *starts = tile_starts(slots, T, n);
  if (*starts == NULL) return -1;
  if (act_bf16) {
    *scratch = malloc(omp_get_max_threads() * TILE * (in + out) * sizeof(float));
    if (*scratch == NULL) {
      free(*starts);
      return -1;
    }
  }
  return 0;
}

/* x: [T, in] and y: [T, out] of floats, or of bf16 values (uint16 bit patterns) when
 * act_bf16 is nonzero: y's rows of adapter tokens are then rounded once, after the whole
 * delta is summed in fp32. */
CLONES
int lora_bgmv(const void *x, int64_t in, const float *A, int64_t a_slot, const float *B,
              int64_t b_slot, int64_t out, const int64_t *slots, const int32_t *ranks,
              int64_t T, void *y, int64_t act_bf16) {
  int64_t n, *starts;
  float *scratch;
  if (bgmv_setup(slots, T, in, out, act_bf16, &starts, &n, &scratch)) return -1;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i++)
    bgmv_tile(x, in, A, a_slot, B, b_slot, out, slots, ranks, starts, i, T, y,
              act_bf16 ? scratch + omp_get_thread_num() * TILE * (in + out) : NULL, 0,
              act_bf16 != 0);
  free(scratch);
  free(starts);
  return 0;
}

/* lora_bgmv with the pool in bf16 (A and B as uint16 bit patterns): half the bytes to
 * read; the sums stay fp32. */
CLONES
int lora_bgmv_bf16(const void *x, int64_t in, const uint16_t *A, int64_t a_slot,
                   const uint16_t *B, int64_t b_slot, int64_t out, const int64_t *slots,
                   const int32_t *ranks, int64_t T, void *y, int64_t act_bf16) {
  int64_t n, *starts;
  float *scratch;
  if (bgmv_setup(slots, T, in, out, act_bf16, &starts, &n, &scratch)) return -1;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i++)
    bgmv_tile(x, in, A, a_slot, B, b_slot, out, slots, ranks, starts, i, T, y,
              act_bf16 ? scratch + omp_get_thread_num() * TILE * (in + out) : NULL, 1,
              act_bf16 != 0);
  free(scratch);
  free(starts);
  return 0;
}

/* e^x for x <= 0, VW at a time (Cephes' expf: 2^n e^r, |r| <= ln2 / 2, a degree-7
 * polynomial; within 2 ulp of expf), where the softmax would otherwise call expf once
 * per position and head. x below -87 gives about 1e-38, not 0. */
INLINE vf exp_neg(vf x) {
  const vf lo = {-87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f};
  const vi under = x < lo; /* -1 where x < lo */
  x = (vf)(((vi)x & ~under) | ((vi)lo & under));
  const vf fx = x * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(fx, vi); /* toward zero: floor(fx) for fx >= 0 */
  vf nf = __builtin_convertvector(n, vf);
  const vi below = nf > fx; /* -1 where truncation rounded up (fx < 0) */
  n += below, nf = __builtin_convertvector(n, vf);
  const vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vf p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const vi scale = (n + 127) << 23; /* 2^n as a float's bits */
  return p * (vf)scale;
}

/* paged_decode_attention's work items are (sequence, group of query heads): G groups of
 * H / G heads a sequence. The fewest groups of whole kv heads (KVH / G each) that still
 * give every thread a few items; where even one kv head an item leaves a thread idle (few
 * sequences over few kv heads: a latent attention's one), the query heads of each kv head
 * are split too, into the fewest parts that give every thread an item, since each part
 * reads its kv head's keys and values again (2 threads, one decode of 16 query heads over
 * 4,096 cached latents of 576: 4.6 ms as one item, 2.9 ms as two; of 128 heads over 2,048:
 * 18 to 26 ms, 10 to 12). */
static int64_t head_groups(int64_t D, int64_t H, int64_t KVH, int64_t threads) {
  for (int64_t g = 1; g < KVH; g++)
    if (KVH % g == 0 && D * g >= 4 * threads) return g;
  const int64_t rep = H / KVH;
  for (int64_t p = 1; p < rep; p++)
    if (rep % p == 0 && D * KVH * p >= threads) return KVH * p;
  return H;
}

/* One work item of paged_decode_attention: sequence i, query heads h0 .. h0 + nh - 1 (whole
 * kv heads' or a part of one kv head's, see head_groups) and their kv heads. Called inside
 * the exported functions' parallel loops (see bgmv_tile). */
INLINE void attend_item(const float *q, const void *k, const void *v, const int64_t *tables,
                        int64_t nb, const int64_t *lens, int64_t i, int64_t h0, int64_t nh,
                        int64_t H, int64_t KVH, int64_t d, int64_t dv, int64_t vs,
                        int64_t bs, float scale, int64_t window, int64_t chunk, float softcap,
                        const float *sinks, float *out, int bf16) {
  const int64_t size = bf16 ? 2 : 4; /* bytes per cached value */
  const int64_t rep = H / KVH, kv0 = h0 / rep, gk = (h0 + nh - 1) / rep - kv0 + 1;
  const int64_t len = lens[i];
  const int64_t row = KVH * d, vrow = KVH * vs; /* values per cached key, value row */
  const float *qi = q + (i * H + h0) * d; /* this item's query heads: [nh, d] */
  const int64_t lo = chunk > 0                      ? (len - 1) / chunk * chunk
                     : window > 0 && len > window ? len - window
                                                  : 0;
  float m[nh], l[nh], acc[nh * dv], s[nh * bs]; /* per head: running max, sum, sum of w v */
  int64_t kvo[nh]; /* query head h's kv head within this item's heads */
  for (int64_t h = 0; h < nh; h++) kvo[h] = (h0 + h) / rep - kv0;
  for (int64_t h = 0; h < nh; h++) m[h] = -INFINITY, l[h] = 0.f;
  for (int64_t e = 0; e < nh * dv; e++) acc[e] = 0.f;
  for (int64_t b0 = lo - lo % bs; b0 < len; b0 += bs) { /* block b0 / bs */
    const int64_t first = tables[i * nb + b0 / bs] * bs - b0; /* slot of position 0 */
    const int64_t p0 = b0 > lo ? b0 : lo, n = (b0 + bs < len ? b0 + bs : len) - p0;
    /* [n, row] of keys and values from position p0 on, at this item's first head */
    const char *kb = (const char *)k + ((first + p0) * row + kv0 * d) * size;
    const char *vb = (const char *)v + ((first + p0) * vrow + kv0 * vs) * size;
    /* the next block's first slot, its rows at this item's heads (NULL: the last block) */
    const int64_t next = b0 + bs < len ? tables[i * nb + b0 / bs + 1] * bs : -1;
    const char *kn = next < 0 ? NULL : (const char *)k + (next * row + kv0 * d) * size;
    const char *vn = next < 0 ? NULL : (const char *)v + (next * vrow + kv0 * vs) * size;
    for (int64_t u = 0; u < n; u++) {
      if (kn != NULL) /* a 64-byte line at a time, into L2 */
        for (int64_t c = 0; c < gk * d * size; c += 64)
          __builtin_prefetch(kn + u * row * size + c, 0, 2);
      for (int64_t h = 0; h < nh; h++) {
        const char *kr = kb + (u * row + kvo[h] * d) * size;
        const float *qh = qi + h * d;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t e = 0; e < d; e++) dot += qh[e] * weight(kr, e, bf16);
        s[h * bs + u] = softcap > 0.f ? softcap * tanhf(dot * scale / softcap) : dot * scale;
      }
    }
    for (int64_t h = 0; h < nh; h++) {
      float mb = m[h];
      for (int64_t u = 0; u < n; u++) mb = s[h * bs + u] > mb ? s[h * bs + u] : mb;
      const float corr = expf(m[h] - mb); /* 0 on the first block (m = -inf) */
      l[h] *= corr;
#pragma omp simd
      for (int64_t e = 0; e < dv; e++) acc[h * dv + e] *= corr;
      float *sh = s + h * bs;
      int64_t u = 0;
      for (; u + VW <= n; u += VW) {
        const vf w = exp_neg(loadv(sh + u) - mb);
        memcpy(sh + u, &w, sizeof w);
      }
      for (; u < n; u++) sh[u] = expf(sh[u] - mb);
      m[h] = mb;
    }
    for (int64_t u = 0; u < n; u++) {
      if (vn != NULL)
        for (int64_t c = 0; c < gk * dv * size; c += 64)
          __builtin_prefetch(vn + u * vrow * size + c, 0, 2);
      for (int64_t h = 0; h < nh; h++) {
        const float w = s[h * bs + u];
        const char *vr = vb + (u * vrow + kvo[h] * vs) * size;
        float *ah = acc + h * dv;
        l[h] += w;
#pragma omp simd
        for (int64_t e = 0; e < dv; e++) ah[e] += w * weight(vr, e, bf16);
      }
    }
  }
  for (int64_t h = 0; h < nh; h++) {
    float *o = out + (i * H + h0 + h) * dv;
    /* a sink: one more logit in the softmax's sum, with no value */
    const float sum = sinks != NULL ? l[h] + expf(sinks[h0 + h] - m[h]) : l[h];
    for (int64_t e = 0; e < dv; e++) o[e] = acc[h * dv + e] / sum;
  }
}

/* out[i][h] = softmax(cap(scale * K[ctx] q[i][h])) V[ctx] over positions lo .. len[i] - 1 of
 * sequence i (lo = len[i] - window with a sliding window, the start of the last token's
 * chunk with chunked attention, Llama 4's; else 0), where cap(x) is
 * softcap * tanh(x / softcap) with a softcap > 0 (Gemma 2's), else x, and with sinks (one
 * logit per query head, GPT-OSS's) each head's softmax also sums exp(sinks[h]), which
 * weighs no value; grouped-query heads
 * h -> h / (H / KVH). q: [D, H, d], out: [D, H, dv]; k: [slots, KVH, d], v: [slots, KVH,
 * dv] (keys and values may differ in size: DeepSeek's latent attention) with rows of KVH
 * heads of vs values (vs = dv; vs = d where the values are the keys' first dv, v = k: a
 * latent attention's latent), slot = block * bs + offset;
 * tables: [D, nb] block ids; lens: [D] (>= 1). Online softmax, one block at a time.
 *
 * Bound by reading the cache, which a step reaches cold (the weights of a whole step
 * passed through since). A work item takes its heads' keys position by position, one
 * contiguous run of each row, and fetches the next block's rows into L2 as it computes
 * (blocks lie anywhere: the hardware prefetcher cannot guess the next). Items of one
 * (sequence, head) each read 256 bytes of every 2 KB row instead: on the 2-core bench
 * machine (Xeon, AVX-512), cold, 32 decodes of 8 heads x 64 over ~57 positions took 684 us
 * that way and 404 us this way; over ~1000 positions 11.0 and 4.8 ms; 16 decodes of 32
 * query / 8 kv heads x 128 over ~500 positions 7.9 and 3.0 ms (GQA: the query heads of a
 * kv head share its reads). exp_neg instead of expf: ~10% of the rest. */
CLONES
void paged_decode_attention(const float *q, const float *k, const float *v,
                            const int64_t *tables, int64_t nb, const int64_t *lens, int64_t D,
                            int64_t H, int64_t KVH, int64_t d, int64_t dv, int64_t vs,
                            int64_t bs, float scale, int64_t window, int64_t chunk,
                            float softcap, const float *sinks, float *out) {
  const int64_t G = head_groups(D, H, KVH, omp_get_max_threads()), nh = H / G;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int64_t i = 0; i < D; i++)
    for (int64_t g = 0; g < G; g++)
      attend_item(q, k, v, tables, nb, lens, i, g * nh, nh, H, KVH, d, dv, vs, bs, scale,
                  window, chunk, softcap, sinks, out, 0);
}

/* paged_decode_attention on a bf16 cache (k, v as uint16 bit patterns); q, out and the
 * sums stay fp32. */
CLONES
void paged_decode_attention_bf16(const float *q, const uint16_t *k, const uint16_t *v,
                                 const int64_t *tables, int64_t nb, const int64_t *lens,
                                 int64_t D, int64_t H, int64_t KVH, int64_t d, int64_t dv,
                                 int64_t vs, int64_t bs, float scale, int64_t window,
                                 int64_t chunk, float softcap, const float *sinks, float *out) {
  const int64_t G = head_groups(D, H, KVH, omp_get_max_threads()), nh = H / G;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int64_t i = 0; i < D; i++)
    for (int64_t g = 0; g < G; g++)
      attend_item(q, k, v, tables, nb, lens, i, g * nh, nh, H, KVH, d, dv, vs, bs, scale,
                  window, chunk, softcap, sinks, out, 1);
}

/* trie_walk: the automaton state after each prefix of a trie of byte strings, listed so that
 * a prefix comes after its parent (prefix 0 is the empty one):
 *
 *     at[i] = rows[at[parent[i]] * 256 + byte[i]], DEAD (-1) where the parent's is DEAD
 *
 * rows: [states, 256], built[state] whether that state's row is filled in. at[0..from) is
 * given. Returns the first prefix whose parent's state has no row yet (the caller builds the
 * row, then calls again from there), or n once every prefix has its state. One thread: a
 * 128k-token vocabulary is ~410,000 prefixes, a lookup each from L1/L2. */
int64_t trie_walk(const int32_t *rows, const uint8_t *built, const int64_t *parent,
                  const int64_t *byte, int32_t *at, int64_t from, int64_t n) {
  for (int64_t i = from; i < n; i++) {
    const int32_t s = at[parent[i]];
    if (s < 0) {
      at[i] = -1;
    } else if (!built[s]) {
      return i;
    } else {
      at[i] = rows[(int64_t)s * 256 + byte[i]];
    }
  }
  return n;
}
