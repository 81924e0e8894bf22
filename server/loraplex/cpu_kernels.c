/* loraplex's CPU kernels, fp32 (adapter weights may be bf16), built and loaded by cpu_kernels.py. Both read the data
 * where it lives (the adapters' slot pool, the paged KV cache) instead of gathering copies
 * for torch ops, and run on torch's OpenMP threads (libgomp is shared with torch, which
 * loads it first).
 *
 * lora_bgmv: the LoRA delta of tokens that each use their own adapter (a BGMV, batched
 * gather matrix-vector, as Punica's on GPUs). For every token t with s = slots[t] > 0 and
 * r = ranks[s]:
 *
 *     y[t] += (A[s][:r] @ x[t]) @ B[s][:r]
 *
 * x: [T, in], y: [T, out], A: [S, r_max, in] and B: [S, r_max, out], row-major; a_slot and
 * b_slot are a slot's stride in weights (r_max * in, r_max * out). Returns 0, or -1 when
 * out of memory (y then unchanged). In a decode step every token reads a different adapter,
 * so the delta is bound by reading the weights: each token reads its slot's rows in place,
 * once, in order; torch's batched matmuls read them at about half the memory bandwidth and
 * need the tokens grouped and the slots' weights gathered first. lora_bgmv_bf16 reads a
 * pool of bf16 weights (EngineConfig.lora_dtype): half the bytes, sums still in fp32.
 *
 * paged_decode_attention: one new token per sequence attends to its context in the paged
 * cache, each sequence to its own length (no padding to the longest, no gathered copy).
 */
#include <math.h>
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

/* Weight k of a row of floats, or of bf16 values (the top half of a float: shifting one
 * up 16 bits is the exact float). Inlined with `bf16` constant, each loop has one form. */
static inline float weight(const void *row, int64_t k, int bf16) {
  if (!bf16) return ((const float *)row)[k];
  const uint32_t bits = (uint32_t)((const uint16_t *)row)[k] << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
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

/* One tile's delta. Called inside the exported functions' parallel loops, so it is
 * compiled into each of their target clones (a parallel loop of its own would not be). */
static inline __attribute__((always_inline)) void bgmv_tile(
    const float *x, int64_t in, const void *A, int64_t a_slot, const void *B, int64_t b_slot,
    int64_t out, const int64_t *slots, const int32_t *ranks, const int64_t *starts, int64_t i,
    float *y, int bf16) {
  const int64_t t0 = starts[i], m = starts[i + 1] - t0, s = slots[t0];
  if (s <= 0) return; /* the base model: no delta */
  const int64_t r = ranks[s], size = bf16 ? 2 : 4; /* bytes per weight */
  if (r <= 0) return;
  /* All of A[s]'s rows, then all of B[s]'s: one stream at a time (measured ~10% faster
   * than a row of each in turn). */
  float h[TILE * r]; /* h[u * r + j]: the tile's shrunk inputs, u < m */
  for (int64_t j = 0; j < r; j++) {
    const char *a = (const char *)A + (s * a_slot + j * in) * size; /* row j of A[s]: [in] */
    for (int64_t u = 0; u < m; u++) {
      const float *xt = x + (t0 + u) * in;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < in; k++) acc += weight(a, k, bf16) * xt[k];
      h[u * r + j] = acc;
    }
  }
  for (int64_t j = 0; j < r; j++) {
    const char *b = (const char *)B + (s * b_slot + j * out) * size; /* row j of B[s]: [out] */
    for (int64_t u = 0; u < m; u++) {
      float *yt = y + (t0 + u) * out;
      const float hu = h[u * r + j];
#pragma omp simd
      for (int64_t k = 0; k < out; k++) yt[k] += hu * weight(b, k, bf16);
    }
  }
}

CLONES
int lora_bgmv(const float *x, int64_t in, const float *A, int64_t a_slot,
              const float *B, int64_t b_slot, int64_t out, const int64_t *slots,
              const int32_t *ranks, int64_t T, float *y) {
  int64_t n, *starts = tile_starts(slots, T, &n);
  if (starts == NULL) return -1;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i++)
    bgmv_tile(x, in, A, a_slot, B, b_slot, out, slots, ranks, starts, i, y, 0);
  free(starts);
  return 0;
}

/* lora_bgmv with the pool in bf16 (A and B as uint16 bit patterns): half the bytes to
 * read; x, y and the sums stay fp32. */
CLONES
int lora_bgmv_bf16(const float *x, int64_t in, const uint16_t *A, int64_t a_slot,
                   const uint16_t *B, int64_t b_slot, int64_t out, const int64_t *slots,
                   const int32_t *ranks, int64_t T, float *y) {
  int64_t n, *starts = tile_starts(slots, T, &n);
  if (starts == NULL) return -1;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i++)
    bgmv_tile(x, in, A, a_slot, B, b_slot, out, slots, ranks, starts, i, y, 1);
  free(starts);
  return 0;
}

/* out[i][h] = softmax(scale * K[ctx] q[i][h]) V[ctx] over positions lo .. len[i] - 1 of
 * sequence i (lo = len[i] - window with a sliding window, else 0), grouped-query heads
 * h -> h / (H / KVH). q, out: [D, H, d]; k, v: [slots, KVH, d], slot = block * bs + offset;
 * tables: [D, nb] block ids; lens: [D] (>= 1). Online softmax, one block at a time. */
CLONES
void paged_decode_attention(const float *q, const float *k, const float *v,
                            const int64_t *tables, int64_t nb, const int64_t *lens, int64_t D,
                            int64_t H, int64_t KVH, int64_t d, int64_t bs, float scale,
                            int64_t window, float *out) {
  const int64_t rep = H / KVH;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < D; i++)
    for (int64_t h = 0; h < H; h++) {
      const float *qh = q + (i * H + h) * d;
      const int64_t kvh = h / rep, len = lens[i];
      const int64_t lo = window > 0 && len > window ? len - window : 0;
      float m = -INFINITY, l = 0.f, acc[d], s[bs]; /* running max, sum, sum of w * v */
      for (int64_t e = 0; e < d; e++) acc[e] = 0.f;
      for (int64_t b0 = lo - lo % bs; b0 < len; b0 += bs) { /* block b0 / bs */
        const int64_t first = tables[i * nb + b0 / bs] * bs - b0; /* slot of position 0 */
        const int64_t p0 = b0 > lo ? b0 : lo, n = (b0 + bs < len ? b0 + bs : len) - p0;
        float mb = m;
        for (int64_t u = 0; u < n; u++) {
          const float *kr = k + ((first + p0 + u) * KVH + kvh) * d;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t e = 0; e < d; e++) dot += qh[e] * kr[e];
          s[u] = dot * scale;
          mb = s[u] > mb ? s[u] : mb;
        }
        const float corr = expf(m - mb); /* 0 on the first block (m = -inf) */
        l *= corr;
#pragma omp simd
        for (int64_t e = 0; e < d; e++) acc[e] *= corr;
        for (int64_t u = 0; u < n; u++) {
          const float w = expf(s[u] - mb);
          const float *vr = v + ((first + p0 + u) * KVH + kvh) * d;
          l += w;
#pragma omp simd
          for (int64_t e = 0; e < d; e++) acc[e] += w * vr[e];
        }
        m = mb;
      }
      float *o = out + (i * H + h) * d;
      for (int64_t e = 0; e < d; e++) o[e] = acc[e] / l;
    }
}
