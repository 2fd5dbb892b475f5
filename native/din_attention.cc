// CPU kernel of the fused DIN activation unit (din_attention.h). A chunk of candidates at
// a time, kLanes history steps of one candidate per vector: every layer of the unit runs on
// registers and a few KB of stack, so nothing of size N x L x H ever reaches memory.
#include "din_attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

#ifdef __FAST_MATH__
#error "ctr_ops needs IEEE float semantics (no -ffast-math)"
#endif

namespace ctr_ops {

namespace {

int64_t padded_steps(int64_t steps) { return (steps + kLanes - 1) / kLanes * kLanes; }

int64_t act_params(int64_t act, int64_t width) {
  switch (act) {
    case kDinSigmoid:
      return 0;
    case kDinDice:
      return 3 * width;
    case kDinPrelu:
      return width;
    default:
      return -1;
  }
}

// a[0 .. width) = act(a), with the layer's parameters at p (advanced past them)
void activate(vf* a, int64_t width, int64_t act, const float*& p) {
  if (act == kDinSigmoid) {
    for (int64_t j = 0; j < width; ++j) a[j] = vsigmoid(a[j]);
  } else if (act == kDinDice) {
    const float *mean = p, *inv_std = p + width, *alpha = p + 2 * width;
    for (int64_t j = 0; j < width; ++j) {
      const vf x = a[j];
      const vf pr = vsigmoid((x - mean[j]) * inv_std[j]);
      a[j] = x * (alpha[j] + pr * (1.0f - alpha[j]));
    }
    p += 3 * width;
  } else {  // prelu
    for (int64_t j = 0; j < width; ++j) {
      const vf x = a[j];
      a[j] = x >= splat(0.0f) ? x : x * p[j];
    }
    p += width;
  }
}

}  // namespace

int64_t din_param_count(const DinShape& s) {
  if (s.layers < 1 || s.layers > kDinMaxLayers) return -1;
  int64_t total = 0;
  for (int64_t i = 0; i < s.layers; ++i) {
    const int64_t w = s.widths[i];
    if (w < 1 || w > kDinMaxWidth) return -1;
    const int64_t act = act_params(s.act, w);
    if (act < 0) return -1;
    if (i > 0) total += w * s.widths[i - 1] + w;
    total += act;
  }
  return total + s.widths[s.layers - 1] + 1;
}

bool din_indices_ok(const int64_t* user_idx, int64_t n, int64_t users) {
  for (int64_t row = 0; row < n; ++row)
    if (user_idx[row] < 0 || user_idx[row] >= users) return false;
  return true;
}

int64_t din_scratch_floats(const DinShape& s) {
  return s.users * (s.widths[0] + s.dim) * padded_steps(s.steps);
}

// Per user: k_part and keys transposed to [H1, Lp] and [D, Lp] (Lp = L rounded up to
// kLanes, zero tail), so that kLanes consecutive steps are one vector load.
void din_prepare(const DinShape& s, const float* k_part, const float* keys, float* scratch) {
  const int64_t lp = padded_steps(s.steps), h1 = s.widths[0], d = s.dim;
  std::fill(scratch, scratch + din_scratch_floats(s), 0.0f);
  for (int64_t u = 0; u < s.users; ++u) {
    float* kpt = scratch + u * (h1 + d) * lp;
    float* kt = kpt + h1 * lp;
    const float* kp = k_part + u * s.steps * h1;
    const float* k = keys + u * s.steps * d;
    for (int64_t t = 0; t < s.steps; ++t) {
      for (int64_t j = 0; j < h1; ++j) kpt[j * lp + t] = kp[t * h1 + j];
      for (int64_t c = 0; c < d; ++c) kt[c * lp + t] = k[t * d + c];
    }
  }
}

namespace {

// The first layer and its activation (params: its act params first) for steps
// t0 .. t0 + kLanes - 1 of one candidate, into a[0 .. H1). qp: the candidate's first-layer
// part [H1]; qw: its q * w_p products [D, H1]; kpt / kt: its user's transposed history parts
// (rows of lp floats).
void first_layer(const DinShape& s, const float* qp, const float* qw, const float* kpt,
                 const float* kt, int64_t lp, int64_t t0, const float* params, vf* a) {
  const int64_t d = s.dim, h1 = s.widths[0];
  int64_t j = 0;
  for (; j + kGroup <= h1; j += kGroup) {
    vf acc[kGroup];
    for (int64_t g = 0; g < kGroup; ++g) acc[g] = qp[j + g] + load(kpt + (j + g) * lp + t0);
    for (int64_t c = 0; c < d; ++c) {
      const vf k = load(kt + c * lp + t0);
      const float* w = qw + c * h1 + j;
      for (int64_t g = 0; g < kGroup; ++g) acc[g] += w[g] * k;
    }
    for (int64_t g = 0; g < kGroup; ++g) a[j + g] = acc[g];
  }
  for (; j < h1; ++j) {
    vf acc = qp[j] + load(kpt + j * lp + t0);
    for (int64_t c = 0; c < d; ++c) acc += qw[c * h1 + j] * load(kt + c * lp + t0);
    a[j] = acc;
  }
  const float* p = params;
  activate(a, h1, s.act, p);
}

// Layers 2 .. k and the score, from the first layer's output a[0 .. H1) (overwritten; b is
// scratch of the same size); p: the params after the first layer's activation.
vf upper_layers(const DinShape& s, const float* p, vf* a, vf* b) {
  vf* cur = a;
  vf* nxt = b;
  for (int64_t i = 1; i < s.layers; ++i) {
    const int64_t n_in = s.widths[i - 1], n_out = s.widths[i];
    const float* w = p;
    const float* bias = w + n_out * n_in;
    p = bias + n_out;
    dense(cur, n_in, w, bias, nxt, n_out);
    activate(nxt, n_out, s.act, p);
    std::swap(cur, nxt);
  }
  const int64_t last = s.widths[s.layers - 1];
  vf score = splat(p[last]);
  for (int64_t k = 0; k < last; ++k) score += p[k] * cur[k];
  return score;
}

// Steps left over after a candidate's full vectors (a history of 50 is 3 x 16 + 2), when
// they fill at most half a vector, are packed across the candidates of a chunk into full
// vectors for layers 2 .. k, which do not depend on the candidate: only their first layer
// runs on the part-filled vector.
struct Pending {
  float a[kDinMaxWidth][kLanes];  // first-layer outputs, one column per packed step
  float* out[kLanes];             // where each packed step's score goes
  int count = 0;
  vf x[kDinMaxWidth], y[kDinMaxWidth];  // the layers' scratch when the pack is run
};

// Layers 2 .. k for the packed steps (a part-filled pack: its unused columns hold stale
// values, computed and not written)
void flush(const DinShape& s, const float* p, Pending& pend) {
  if (pend.count == 0) return;
  for (int64_t j = 0; j < s.widths[0]; ++j) pend.x[j] = load(pend.a[j]);
  const vf score = upper_layers(s, p, pend.x, pend.y);
  for (int l = 0; l < pend.count; ++l) *pend.out[l] = score[l];
  pend.count = 0;
}

// Softmax (if asked) over the real steps and the weighted sum of the keys, for one row.
void finish_row(const DinShape& s, const float* keys, int64_t u, int64_t len, float* w_row,
                float* p_row) {
  const int64_t steps = s.steps, d = s.dim;
  if (len == 0) return;
  if (s.softmax) {
    float top = w_row[0];
    for (int64_t t = 1; t < len; ++t) top = std::max(top, w_row[t]);
    float sum = 0.0f;
    for (int64_t t = 0; t < len; ++t) {
      w_row[t] = std::exp(w_row[t] - top);
      sum += w_row[t];
    }
    for (int64_t t = 0; t < len; ++t) w_row[t] /= sum;
  }
  const float* k = keys + u * steps * d;
  for (int64_t t = 0; t < len; ++t) {
    const float wt = w_row[t];
    for (int64_t c = 0; c < d; ++c) p_row[c] += wt * k[t * d + c];
  }
}

}  // namespace

int64_t din_chunks(int64_t n) { return (n + kDinChunk - 1) / kDinChunk; }

void din_chunk(const DinShape& s, const float* q_part, const float* q, const float* keys,
               const int64_t* user_idx, const int64_t* hist_len, const float* w_p,
               const float* params, const float* scratch, float* pooled, float* weights,
               int64_t chunk) {
  const int64_t steps = s.steps, d = s.dim, h1 = s.widths[0], lp = padded_steps(steps);
  const int64_t row0 = chunk * kDinChunk, row1 = std::min(s.n, row0 + kDinChunk);
  if (row0 < 0 || row0 >= s.n) return;  // no such chunk
  // qw[c, j] = q[row, c] * w_p[c, j]: the first layer's q * k term is then one FMA per
  // (j, c) and step
  thread_local std::vector<float> qw;
  qw.resize(static_cast<size_t>(d * h1));
  thread_local Pending pend;
  pend.count = 0;
  vf a[kDinMaxWidth], b[kDinMaxWidth];
  const float* upper = params + act_params(s.act, h1);  // layers 2 .. k and the score
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t u = user_idx[row];
    const int64_t len = std::clamp<int64_t>(hist_len[u], 0, steps);
    float* w_row = weights + row * steps;
    std::fill(w_row, w_row + steps, 0.0f);
    std::fill(pooled + row * d, pooled + (row + 1) * d, 0.0f);
    if (len == 0) continue;
    const float* kpt = scratch + u * (h1 + d) * lp;
    const float* kt = kpt + h1 * lp;
    const float* qr = q + row * d;
    for (int64_t c = 0; c < d; ++c)
      for (int64_t j = 0; j < h1; ++j) qw[c * h1 + j] = qr[c] * w_p[c * h1 + j];
    const float* qp = q_part + row * h1;
    for (int64_t t0 = 0; t0 < len; t0 += kLanes) {
      first_layer(s, qp, qw.data(), kpt, kt, lp, t0, params, a);
      const int64_t lanes = std::min<int64_t>(kLanes, len - t0);
      if (2 * lanes > kLanes) {  // at least half full: run it as it is
        const vf score = upper_layers(s, upper, a, b);
        for (int64_t l = 0; l < lanes; ++l) w_row[t0 + l] = score[l];
        continue;
      }
      // a short tail: its steps wait in the pack (copying them costs less than the layers
      // on a mostly empty vector)
      if (pend.count + lanes > kLanes) flush(s, upper, pend);
      for (int64_t j = 0; j < h1; ++j) {
        const float* src = reinterpret_cast<const float*>(&a[j]);
        std::copy(src, src + lanes, pend.a[j] + pend.count);
      }
      for (int64_t l = 0; l < lanes; ++l) pend.out[pend.count++] = w_row + t0 + l;
    }
  }
  flush(s, upper, pend);
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t u = user_idx[row];
    const int64_t len = std::clamp<int64_t>(hist_len[u], 0, steps);
    finish_row(s, keys, u, len, weights + row * steps, pooled + row * d);
  }
}

}  // namespace ctr_ops
