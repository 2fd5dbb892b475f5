// CUDA kernel of the fused AUGRU (contract in augru.h): one thread per candidate runs all
// L steps with its hidden state in registers; the recurrent weights sit in shared
// memory. One launch replaces the ~12 kernels per step of the unrolled ONNX graph.
#include <cuda_runtime.h>

#include "augru.h"

namespace ctr_ops {
namespace {

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// H known at compile time: every loop unrolls and h, s, c live in registers.
template <int H>
__global__ void augru_fixed(const float* __restrict__ x_proj, const float* __restrict__ att,
                            const int64_t* __restrict__ user_idx, const float* __restrict__ w_hh,
                            const float* __restrict__ b_hh, float* __restrict__ out,
                            int64_t users, int64_t n, int64_t steps) {
  __shared__ float w[3 * H * H];
  __shared__ float b[3 * H];
  for (int i = threadIdx.x; i < 3 * H * H; i += blockDim.x) w[i] = w_hh[i];
  for (int i = threadIdx.x; i < 3 * H; i += blockDim.x) b[i] = b_hh[i];
  __syncthreads();
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= n) return;
  const int64_t u = user_idx[row];
  float h[H];
#pragma unroll
  for (int j = 0; j < H; ++j) h[j] = 0.0f;
  if (u >= 0 && u < users) {
    const float* xu = x_proj + u * steps * 3 * H;
    const float* a_row = att + row * steps;
    for (int64_t t = 0; t < steps; ++t) {
      const float a = a_row[t];
      if (a == 0.0f) continue;
      const float* x = xu + t * 3 * H;
      float s[2 * H];
#pragma unroll
      for (int j = 0; j < 2 * H; ++j) {
        float acc = x[j] + b[j];
#pragma unroll
        for (int k = 0; k < H; ++k) acc = fmaf(w[j * H + k], h[k], acc);
        s[j] = sigmoidf(acc);
      }
      float c[H];
#pragma unroll
      for (int j = 0; j < H; ++j) {
        float acc = b[2 * H + j];
#pragma unroll
        for (int k = 0; k < H; ++k) acc = fmaf(w[(2 * H + j) * H + k], h[k], acc);
        c[j] = tanhf(x[2 * H + j] + s[j] * acc);
      }
#pragma unroll
      for (int j = 0; j < H; ++j) h[j] = h[j] + (a * s[H + j]) * (c[j] - h[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < H; ++j) h[j] = __int_as_float(0x7fc00000);  // NaN: a bad index shows
  }
#pragma unroll
  for (int j = 0; j < H; ++j) out[row * H + j] = h[j];
}

// Any H up to kMaxHidden: the same steps with run-time loop bounds.
__global__ void augru_any(const float* __restrict__ x_proj, const float* __restrict__ att,
                          const int64_t* __restrict__ user_idx, const float* __restrict__ w_hh,
                          const float* __restrict__ b_hh, float* __restrict__ out, int64_t users,
                          int64_t n, int64_t steps, int hd) {
  const float* w = w_hh;  // read through L1: no shared-memory limit on H
  const float* b = b_hh;
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= n) return;
  const int64_t u = user_idx[row];
  float h[kMaxHidden];
  float s[2 * kMaxHidden];
  for (int j = 0; j < hd; ++j) h[j] = 0.0f;
  if (u >= 0 && u < users) {
    const float* xu = x_proj + u * steps * 3 * hd;
    for (int64_t t = 0; t < steps; ++t) {
      const float a = att[row * steps + t];
      if (a == 0.0f) continue;
      const float* x = xu + t * 3 * hd;
      for (int j = 0; j < 2 * hd; ++j) {
        float acc = x[j] + b[j];
        for (int k = 0; k < hd; ++k) acc = fmaf(w[j * hd + k], h[k], acc);
        s[j] = sigmoidf(acc);
      }
      for (int j = 0; j < hd; ++j) {
        float acc = b[2 * hd + j];
        for (int k = 0; k < hd; ++k) acc = fmaf(w[(2 * hd + j) * hd + k], h[k], acc);
        s[j] = tanhf(x[2 * hd + j] + s[j] * acc);  // r_j is not needed after this
      }
      for (int j = 0; j < hd; ++j) h[j] = h[j] + (a * s[hd + j]) * (s[j] - h[j]);
    }
  } else {
    for (int j = 0; j < hd; ++j) h[j] = __int_as_float(0x7fc00000);
  }
  for (int j = 0; j < hd; ++j) out[row * hd + j] = h[j];
}

}  // namespace

const char* augru_cuda(const float* x_proj, const float* att, const int64_t* user_idx,
                       const float* w_hh, const float* b_hh, float* out, int64_t users, int64_t n,
                       int64_t steps, int64_t hidden, void* stream) {
  if (n == 0) return nullptr;
  const int block = 64;
  const unsigned grid = static_cast<unsigned>((n + block - 1) / block);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
#if CUDART_VERSION >= 12080
  // This library links its own (static) CUDA runtime, whose current device is per thread:
  // follow ORT's stream to its device. Not while ORT captures a CUDA graph: a stream
  // query then breaks the capture (ORT runs each graph once uncaptured first, on the same
  // thread, so the device is already set).
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(st, &capturing) == cudaSuccess &&
      capturing == cudaStreamCaptureStatusNone) {
    int dev = 0, cur = 0;
    if (cudaStreamGetDevice(st, &dev) == cudaSuccess && cudaGetDevice(&cur) == cudaSuccess &&
        dev != cur)
      cudaSetDevice(dev);
  }
#endif
  switch (hidden) {
    case 8:
      augru_fixed<8><<<grid, block, 0, st>>>(x_proj, att, user_idx, w_hh, b_hh, out, users, n, steps);
      break;
    case 16:
      augru_fixed<16><<<grid, block, 0, st>>>(x_proj, att, user_idx, w_hh, b_hh, out, users, n, steps);
      break;
    case 32:
      augru_fixed<32><<<grid, block, 0, st>>>(x_proj, att, user_idx, w_hh, b_hh, out, users, n, steps);
      break;
    default: {
      augru_any<<<grid, block, 0, st>>>(x_proj, att, user_idx, w_hh, b_hh, out, users, n, steps,
                                           static_cast<int>(hidden));
    }
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace ctr_ops
