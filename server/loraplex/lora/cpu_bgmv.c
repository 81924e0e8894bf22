/* The LoRA delta of tokens that each use their own adapter, on the CPU (a BGMV: batched
 * gather matrix-vector, as Punica's on GPUs). Built and loaded by cpu_bgmv.py.
 *
 * For every token t with s = slots[t] > 0 and r = ranks[s]:
 *
 *     y[t] += (A[s][:r] @ x[t]) @ B[s][:r]
 *
 * x: [T, in], y: [T, out], A: [S, r_max, in] and B: [S, r_max, out], all fp32 and
 * row-major; a_slot and b_slot are a slot's stride in floats (r_max * in, r_max * out).
 *
 * Why: in a decode step every token reads a different adapter, so the delta is bound by
 * reading the weights. Each token reads its slot's rows of A and B straight from the pool,
 * once, in order; torch's batched matmuls over the same tokens read them at about half the
 * memory bandwidth and need the tokens grouped and the slots' weights gathered first.
 * The tokens are split over torch's OpenMP threads (libgomp is shared with torch, which
 * loads it first).
 */
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__)
/* one build that uses AVX-512 or AVX2 + FMA where the CPU has them */
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

CLONES
void lora_bgmv(const float *x, int64_t in, const float *A, int64_t a_slot,
               const float *B, int64_t b_slot, int64_t out, const int64_t *slots,
               const int32_t *ranks, int64_t T, float *y) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; t++) {
    const int64_t s = slots[t];
    if (s <= 0) continue; /* the base model: no delta */
    const float *xt = x + t * in;
    float *yt = y + t * out;
    for (int64_t j = 0; j < ranks[s]; j++) {
      const float *a = A + s * a_slot + j * in;  /* row j of A[s]: [in] */
      const float *b = B + s * b_slot + j * out; /* row j of B[s]: [out] */
      float h = 0.f;
#pragma omp simd reduction(+ : h)
      for (int64_t k = 0; k < in; k++) h += a[k] * xt[k];
#pragma omp simd
      for (int64_t i = 0; i < out; i++) yt[i] += h * b[i];
    }
  }
}
