// The fused attentional GRU (AUGRU) recurrence: one call for all L steps.
//
// Shapes (float32, row-major):
//   x_proj   [U, L, 3H]  per-user input projection, update-gate rows negated (see below)
//   att      [N, L]      attention of each candidate over the user's steps (0 at padding)
//   user_idx [N]         int64, the user row of each candidate, in [0, U)
//   w_hh     [3H, H]     recurrent weights, same row signs as x_proj
//   b_hh     [3H]        recurrent bias, same signs
//   out      [N, H]      the final hidden state of each candidate
//
// Rows [0, H) are the reset gate, [H, 2H) the update gate with its sign flipped (so one
// sigmoid gives u = 1 - z), [2H, 3H) the candidate state. Per candidate n of user u,
// starting from h = 0, for every step t:
//   s_j = sigmoid(x[u,t,j] + b[j] + sum_k w[j,k] h_k)          j < 2H   (r, then u)
//   c_j = tanh(x[u,t,2H+j] + s_j * (b[2H+j] + sum_k w[2H+j,k] h_k)) j < H
//   h_j = h_j + att[n,t] * s_{H+j} * (c_j - h_j)
// This is training/models.py AttentionalGRU ("augru") step for step. A step with
// att == 0 leaves h unchanged, so it is skipped. A user index outside [0, U) is an error
// on the CPU; the CUDA kernel cannot raise one and writes NaN for that candidate (the
// service builds the indices itself, and its load-time probe rejects non-finite output).
#pragma once

#include <cstdint>

namespace ctr_ops {

constexpr int kMaxHidden = 64;

// CPU implementation, in independent blocks of candidates for a thread pool: check the
// indices once, then run blocks 0 .. augru_cpu_blocks(n) - 1 in any order, on any threads.
bool augru_indices_ok(const int64_t* user_idx, int64_t n, int64_t users);
int64_t augru_cpu_blocks(int64_t n);
void augru_cpu_block(const float* x_proj, const float* att, const int64_t* user_idx,
                     const float* w_hh, const float* b_hh, float* out, int64_t n, int64_t steps,
                     int64_t hidden, int64_t block);

#ifdef CTR_OPS_CUDA
// Launches the kernel on `stream` (a cudaStream_t). Returns a CUDA error string or nullptr.
const char* augru_cuda(const float* x_proj, const float* att, const int64_t* user_idx,
                       const float* w_hh, const float* b_hh, float* out, int64_t users,
                       int64_t n, int64_t steps, int64_t hidden, void* stream);
#endif

}  // namespace ctr_ops
