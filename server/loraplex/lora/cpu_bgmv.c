/* The LoRA delta of tokens that each use their own adapter, on the CPU (a BGMV: batched
 * gather matrix-vector, as Punica's on GPUs). Built and loaded by cpu_bgmv.py.
 *
 * For every token t with s = slots[t] > 0 and r = ranks[s]:
 *
 *     y[t] += (A[s][:r] @ x[t]) @ B[s][:r]
 *
 * x: [T, in], y: [T, out], A: [S, r_max, in] and B: [S, r_max, out], all fp32 and
 * row-major; a_slot and b_slot are a slot's stride in floats (r_max * in, r_max * out).
 * Returns 0, or -1 when out of memory (y then unchanged).
 *
 * Why: in a decode step every token reads a different adapter, so the delta is bound by
 * reading the weights. Each token reads its slot's rows of A and B straight from the pool,
 * once, in order; torch's batched matmuls over the same tokens read them at about half the
 * memory bandwidth and need the tokens grouped and the slots' weights gathered first.
 * The tokens are split over torch's OpenMP threads (libgomp is shared with torch, which
 * loads it first).
 */
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) && defined(__GNUC__)
/* one build that uses AVX-512 or AVX2 + FMA where the CPU has them */
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* Consecutive tokens of one slot (a prefill chunk) are taken TILE at a time: each row of
 * A and B is then read once for the tile, from L1, instead of once per token. */
#define TILE 8

CLONES
int lora_bgmv(const float *x, int64_t in, const float *A, int64_t a_slot,
              const float *B, int64_t b_slot, int64_t out, const int64_t *slots,
              const int32_t *ranks, int64_t T, float *y) {
  /* tile i: tokens starts[i] .. starts[i + 1] - 1, of one slot, at most TILE of them */
  int64_t *starts = malloc((T + 1) * sizeof(int64_t)), n = 0;
  if (starts == NULL) return -1;
  for (int64_t t = 0; t < T; t++)
    if (t == 0 || slots[t] != slots[t - 1] || t - starts[n - 1] == TILE) starts[n++] = t;
  starts[n] = T;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i++) {
    const int64_t t0 = starts[i], m = starts[i + 1] - t0, s = slots[t0];
    if (s <= 0) continue; /* the base model: no delta */
    const int64_t r = ranks[s];
    if (r <= 0) continue;
    /* All of A[s]'s rows, then all of B[s]'s: one stream at a time (measured ~10% faster
     * than a row of each in turn). */
    float h[TILE * r]; /* h[u * r + j]: the tile's shrunk inputs, u < m */
    for (int64_t j = 0; j < r; j++) {
      const float *a = A + s * a_slot + j * in; /* row j of A[s]: [in] */
      for (int64_t u = 0; u < m; u++) {
        const float *xt = x + (t0 + u) * in;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < in; k++) acc += a[k] * xt[k];
        h[u * r + j] = acc;
      }
    }
    for (int64_t j = 0; j < r; j++) {
      const float *b = B + s * b_slot + j * out; /* row j of B[s]: [out] */
      for (int64_t u = 0; u < m; u++) {
        float *yt = y + (t0 + u) * out;
        const float hu = h[u * r + j];
#pragma omp simd
        for (int64_t k = 0; k < out; k++) yt[k] += hu * b[k];
      }
    }
  }
  free(starts);
  return 0;
}
