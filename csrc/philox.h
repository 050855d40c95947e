// Dropout keep-mask bits shared by the CUDA kernels and the host (tests).
//
// Philox4x32 with 10 rounds on the counter (k, t, 0, 0) and the key (seed_lo, seed_hi), then the
// first output word mapped to a float in [0, 1): the same bits as the Triton backend's
// tl.philox(seed, k, t, 0, 0) + tl.uint_to_uniform_float, so both backends drop the same
// elements for the same seed (and a checkpoint recompute on either backend replays them).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FLIX_HD __host__ __device__ __forceinline__
#else
#define FLIX_HD inline
#endif

namespace flix {

FLIX_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First output word of Philox4x32-10 for counter (c0, c1, 0, 0) and a 64-bit seed.
FLIX_HD uint32_t philox_word(uint64_t seed, uint32_t c0, uint32_t c1) {
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffu);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c2 = 0, c3 = 0;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t old0 = c0, old2 = c2;
    c0 = mulhi32(0xCD9E8D57u, old2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, old0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * old2;
    c3 = 0xD2511F53u * old0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Whether element (t, k) of the dropped input is kept: uniform(seed, k, t) >= p.
FLIX_HD bool keep_element(uint64_t seed, uint32_t t, uint32_t k, float p) {
  int32_t v = static_cast<int32_t>(philox_word(seed, k, t));
  if (v < 0) v = ~v;
  const float u = static_cast<float>(v) * 4.6566127342e-10f;
  return u >= p;
}

}  // namespace flix
