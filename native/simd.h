// Vector helpers shared by the CPU kernels (GCC/Clang vector extensions).
#pragma once

#include <cstdint>
#include <cstring>

namespace ctr_ops {
namespace {

// kLanes is the target's vector width in floats (one lane per candidate in the AUGRU
// kernel, per history step in the DIN one): a wider type than the registers spills and
// ran 2-16x slower. Nothing here needs libm: exp is inline.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf splat(float x) { return vf{} + x; }

// exp(x), x clamped to [-87, 88]: exp(x) = 2^n * exp(r), |r| <= ln2/2, with a degree-6
// polynomial for exp(r) (about 1 ulp; Cephes' expf coefficients).
inline vf vexp(vf x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  // round to nearest by adding and removing 1.5 * 2^23
  const vf nf = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(nf, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }

inline vf vtanh(vf x) { return 1.0f - 2.0f / (vexp(2.0f * x) + 1.0f); }  // abs. error ~1e-7

inline vf load(const float* p) {  // unaligned
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// kGroup outputs at a time: one load of in[j] feeds kGroup independent FMA chains, enough
// to cover the FMA latency (4 chains ran at half the FMA throughput in the DIN kernel; one
// chain per row made the AUGRU's recurrent product 2x slower)
constexpr int64_t kGroup = 8;

// out[o] = b[o] + sum_j w[o, j] in[j]
inline void dense(const vf* in, int64_t n_in, const float* w, const float* b, vf* out,
                  int64_t n_out) {
  int64_t o = 0;
  for (; o + kGroup <= n_out; o += kGroup) {
    vf acc[kGroup];
    for (int64_t g = 0; g < kGroup; ++g) acc[g] = splat(b[o + g]);
    const float* wo = w + o * n_in;
    for (int64_t j = 0; j < n_in; ++j) {
      const vf x = in[j];
      for (int64_t g = 0; g < kGroup; ++g) acc[g] += wo[g * n_in + j] * x;
    }
    for (int64_t g = 0; g < kGroup; ++g) out[o + g] = acc[g];
  }
  for (; o < n_out; ++o) {
    const float* wo = w + o * n_in;
    vf acc = splat(b[o]);
    for (int64_t j = 0; j < n_in; ++j) acc += wo[j] * in[j];
    out[o] = acc;
  }
}

}  // namespace
}  // namespace ctr_ops
