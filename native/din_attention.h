// The DIN activation unit, fused: scores, masking, normalisation and weighted-sum pooling
// of every (candidate, history step) pair in one call, without the [N, L, H] tensors the
// unfused graph writes and reads back once per element-wise op.
//
// Shapes (float32 unless noted, row-major); U users, N candidates, L steps, D key width,
// H1 .. Hk the activation unit's layer widths:
//   q_part   [N, H1]     (Wq + Wd) q + b1: the first layer's candidate part
//   k_part   [U, L, H1]  (Wk - Wd) k: its history part, once per user
//   q        [N, D]      the candidates' query embeddings
//   keys     [U, L, D]   the users' history embeddings
//   user_idx [N]         int64, the user row of each candidate, in [0, U)
//   hist_len [U]         int64, steps at or beyond hist_len[u] are padding
//   w_p      [D, H1]     the first layer's weights for q * k, transposed
//   params   [P]         every other parameter, packed (see din_param_count)
//   pooled   [N, D]      out: sum_t w[n, t] keys[u, t]
//   weights  [N, L]      out: the attention weights, 0 at padding
//
// Per candidate n of user u and real step t (t < hist_len[u]):
//   a1 = act1(q_part[n] + k_part[u, t] + w_p^T (q[n] * keys[u, t]))        [H1]
//   a_i = act_i(W_i a_{i-1} + b_i)                                        i = 2 .. k
//   s[t] = w_out . a_k + b_out
// then w = softmax over the real steps (softmax = 1) or w = s (softmax = 0).
// This is training/modules.py DINAttention with its first layer split, step for step.
//
// params, in order: act params of layer 1; for i = 2 .. k: W_i [H_i, H_{i-1}], b_i [H_i],
// act params of layer i; then w_out [H_k], b_out [1]. Act params of a layer of width H:
// sigmoid: none; dice: mean [H], inv_std [H] (1 / sqrt(var + eps)), alpha [H], giving
// x * (alpha + p (1 - alpha)) with p = sigmoid((x - mean) inv_std); prelu: slope [H].
#pragma once

#include <cstdint>

namespace ctr_ops {

constexpr int kDinMaxWidth = 256;  // any layer
constexpr int kDinMaxLayers = 8;
constexpr int kDinMaxDim = 256;  // D

enum DinAct : int64_t { kDinSigmoid = 0, kDinDice = 1, kDinPrelu = 2 };

struct DinShape {
  int64_t users, n, steps, dim;
  int64_t layers;  // k
  int64_t widths[kDinMaxLayers];
  int64_t act;
  bool softmax;
};

// Floats in params for `s`'s layers and activation; -1 if widths or act are invalid.
int64_t din_param_count(const DinShape& s);

// Check user_idx in [0, U) once; after din_prepare has filled `scratch`
// (din_scratch_floats(s) floats), chunks 0 .. din_chunks(n) - 1 of kDinChunk candidates may
// run in any order, on any threads.
constexpr int64_t kDinChunk = 8;
bool din_indices_ok(const int64_t* user_idx, int64_t n, int64_t users);
int64_t din_scratch_floats(const DinShape& s);
void din_prepare(const DinShape& s, const float* k_part, const float* keys, float* scratch);
int64_t din_chunks(int64_t n);
void din_chunk(const DinShape& s, const float* q_part, const float* q, const float* keys,
               const int64_t* user_idx, const int64_t* hist_len, const float* w_p,
               const float* params, const float* scratch, float* pooled, float* weights,
               int64_t chunk);

}  // namespace ctr_ops
