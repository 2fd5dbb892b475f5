// ONNX Runtime custom-op library of this project: domain "ctr_ops", op "AttentionalGRU"
// (the fused AUGRU of augru.h) for the CPU provider and, when built with nvcc
// (CTR_OPS_CUDA), for the CUDA provider. Loaded by
// SessionOptions.register_custom_ops_library; written against the C API only
// (third_party/onnxruntime/onnxruntime_c_api.h, API 21), so it loads in any later ORT.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "augru.h"
#include "onnxruntime_c_api.h"

namespace ctr_ops {

namespace {

constexpr int kLanes = 16;  // candidates per block: the innermost loops run across them

// exp(x) for x in [-87, 88] from exp(x) = 2^n * exp(r), |r| <= ln2/2, with a degree-6
// polynomial for exp(r): about 1 ulp, and only arithmetic and integer bit moves, so the
// loops over lanes vectorise (libm's expf is a call per element).
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // round to nearest by adding and removing 1.5 * 2^23 (no branch, no libm call)
  const float nf = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const int n = static_cast<int>(nf);
  const float r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float sigmoid_approx(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

inline float tanh_approx(float x) {  // 1 - 2 / (e^2x + 1): absolute error ~1e-7
  return 1.0f - 2.0f / (exp_approx(2.0f * x) + 1.0f);
}

// One block of up to kLanes candidates, all L steps. State is [H][kLanes] so that every
// innermost loop runs across candidates with unit stride.
void augru_block(const float* x_proj, const float* att, const int64_t* user_idx,
                 const float* w_hh, const float* b_hh, float* out, int64_t row0, int lanes,
                 int64_t steps, int64_t hd, float* h, float* s, float* acc, float* xs) {
  const int64_t g3 = 3 * hd;
  std::fill(h, h + hd * kLanes, 0.0f);
  float a[kLanes];
  const float* xu[kLanes];
  for (int l = 0; l < kLanes; ++l) {  // unused lanes repeat the last candidate, unwritten
    const int64_t row = row0 + std::min(l, lanes - 1);
    xu[l] = x_proj + user_idx[row] * steps * g3;
  }
  for (int64_t t = 0; t < steps; ++t) {
    bool any = false;
    for (int l = 0; l < kLanes; ++l) {
      a[l] = l < lanes ? att[(row0 + l) * steps + t] : 0.0f;
      any |= a[l] != 0.0f;
    }
    if (!any) continue;  // a == 0 leaves h as it is, exactly
    // gates r, u (rows [0, 2H)) and the recurrent part of the candidate (rows [2H, 3H))
    for (int64_t j = 0; j < g3; ++j) {
      float* aj = acc + j * kLanes;
      const float bj = b_hh[j];
      for (int l = 0; l < kLanes; ++l) aj[l] = bj;
      const float* wj = w_hh + j * hd;
      for (int64_t k = 0; k < hd; ++k) {
        const float w = wj[k];
        const float* hk = h + k * kLanes;
        for (int l = 0; l < kLanes; ++l) aj[l] += w * hk[l];
      }
    }
    for (int l = 0; l < kLanes; ++l) {  // this step's input terms, lane-major
      const float* x = xu[l] + t * g3;
      for (int64_t j = 0; j < g3; ++j) xs[j * kLanes + l] = x[j];
    }
    for (int64_t j = 0; j < 2 * hd; ++j) {
      const float* aj = acc + j * kLanes;
      const float* xj = xs + j * kLanes;
      float* sj = s + j * kLanes;
      for (int l = 0; l < kLanes; ++l) sj[l] = sigmoid_approx(xj[l] + aj[l]);
    }
    for (int64_t j = 0; j < hd; ++j) {
      const float* r = s + j * kLanes;
      const float* u = s + (hd + j) * kLanes;
      const float* hn = acc + (2 * hd + j) * kLanes;
      const float* xn = xs + (2 * hd + j) * kLanes;
      float* hj = h + j * kLanes;
      for (int l = 0; l < kLanes; ++l) {
        const float c = tanh_approx(xn[l] + r[l] * hn[l]);
        hj[l] = hj[l] + (a[l] * u[l]) * (c - hj[l]);
      }
    }
  }
  for (int l = 0; l < lanes; ++l)
    for (int64_t j = 0; j < hd; ++j) out[(row0 + l) * hd + j] = h[j * kLanes + l];
}

}  // namespace

bool augru_cpu(const float* x_proj, const float* att, const int64_t* user_idx, const float* w_hh,
               const float* b_hh, float* out, int64_t users, int64_t n, int64_t steps,
               int64_t hidden) {
  for (int64_t row = 0; row < n; ++row)
    if (user_idx[row] < 0 || user_idx[row] >= users) return false;
  std::vector<float> h(hidden * kLanes), s(2 * hidden * kLanes), acc(3 * hidden * kLanes),
      xs(3 * hidden * kLanes);
  for (int64_t row0 = 0; row0 < n; row0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, n - row0));
    augru_block(x_proj, att, user_idx, w_hh, b_hh, out, row0, lanes, steps, hidden, h.data(),
                s.data(), acc.data(), xs.data());
  }
  return true;
}

namespace {

const OrtApi* g_api = nullptr;  // set once, before any kernel can run (std::call_once)
std::once_flag g_api_once;
std::mutex g_domains_mutex;
// Every domain made by RegisterCustomOps. A domain must outlive the sessions that use it
// and ORT never takes ownership, so they are kept here for the life of the process (a
// few bytes per session; not released at exit, when ORT itself may be gone already).
struct DomainList {
  std::vector<OrtCustomOpDomain*> items;
};
DomainList g_domains;
constexpr const char* kDomain = "ctr_ops";
constexpr const char* kOpName = "AttentionalGRU";
constexpr size_t kInputs = 5;

struct Kernel {
  bool cuda;
};

struct Tensor {
  const void* data = nullptr;
  std::vector<int64_t> shape;
};

OrtStatus* error(const std::string& msg) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string(kOpName) + ": " + msg).c_str());
}

#define CTR_TRY(expr)                      \
  do {                                     \
    OrtStatus* _st = (expr);               \
    if (_st != nullptr) return _st;        \
  } while (0)

OrtStatus* input(OrtKernelContext* ctx, size_t i, Tensor* t) {
  const OrtValue* v = nullptr;
  CTR_TRY(g_api->KernelContext_GetInput(ctx, i, &v));
  OrtTensorTypeAndShapeInfo* info = nullptr;
  CTR_TRY(g_api->GetTensorTypeAndShape(v, &info));
  size_t rank = 0;
  OrtStatus* st = g_api->GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    t->shape.resize(rank);
    st = g_api->GetDimensions(info, t->shape.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (st != nullptr) return st;
  void* data = nullptr;
  CTR_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(v), &data));
  t->data = data;
  return nullptr;
}

OrtStatus* compute(void* op_kernel, OrtKernelContext* ctx) {
  const bool on_cuda = static_cast<Kernel*>(op_kernel)->cuda;
  Tensor x, att, idx, w, b;
  CTR_TRY(input(ctx, 0, &x));
  CTR_TRY(input(ctx, 1, &att));
  CTR_TRY(input(ctx, 2, &idx));
  CTR_TRY(input(ctx, 3, &w));
  CTR_TRY(input(ctx, 4, &b));
  if (x.shape.size() != 3 || x.shape[2] % 3 != 0) return error("x_proj must be [U, L, 3H]");
  const int64_t users = x.shape[0], steps = x.shape[1], hd = x.shape[2] / 3;
  if (hd < 1 || hd > kMaxHidden) return error("hidden size must be in [1, 64]");
  if (att.shape.size() != 2 || att.shape[1] != steps) return error("att must be [N, L]");
  const int64_t n = att.shape[0];
  if (idx.shape.size() != 1 || idx.shape[0] != n) return error("user_idx must be [N]");
  if (w.shape.size() != 2 || w.shape[0] != 3 * hd || w.shape[1] != hd)
    return error("w_hh must be [3H, H]");
  if (b.shape.size() != 1 || b.shape[0] != 3 * hd) return error("b_hh must be [3H]");
  const int64_t dims[2] = {n, hd};
  OrtValue* out = nullptr;
  CTR_TRY(g_api->KernelContext_GetOutput(ctx, 0, dims, 2, &out));
  void* out_data = nullptr;
  CTR_TRY(g_api->GetTensorMutableData(out, &out_data));
  const auto* xp = static_cast<const float*>(x.data);
  const auto* ap = static_cast<const float*>(att.data);
  const auto* ip = static_cast<const int64_t*>(idx.data);
  const auto* wp = static_cast<const float*>(w.data);
  const auto* bp = static_cast<const float*>(b.data);
  auto* op = static_cast<float*>(out_data);
  if (on_cuda) {
#ifdef CTR_OPS_CUDA
    void* stream = nullptr;
    CTR_TRY(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
    const char* err = augru_cuda(xp, ap, ip, wp, bp, op, users, n, steps, hd, stream);
    if (err != nullptr) return g_api->CreateStatus(ORT_EP_FAIL, err);
    return nullptr;
#else
    return error("library built without CUDA");
#endif
  }
  if (!augru_cpu(xp, ap, ip, wp, bp, op, users, n, steps, hd))
    return error("user_idx out of range [0, U)");
  return nullptr;
}

// ---- the OrtCustomOp callbacks (same for both providers but the provider name) ----

template <bool kCuda>
const char* ORT_API_CALL provider(const OrtCustomOp*) {
  return kCuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
}

template <bool kCuda>
OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*,
                                      void** kernel) {
  *kernel = new Kernel{kCuda};
  return nullptr;
}

template <bool kCuda>
void* ORT_API_CALL create_kernel_v1(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*) {
  return new Kernel{kCuda};
}

const char* ORT_API_CALL op_name(const OrtCustomOp*) { return kOpName; }

ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp*, size_t i) {
  return i == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t ORT_API_CALL input_count(const OrtCustomOp*) { return kInputs; }
ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }

void ORT_API_CALL compute_v1(void* kernel, OrtKernelContext* ctx) {
  OrtStatus* st = compute(kernel, ctx);
  if (st != nullptr) g_api->ReleaseStatus(st);  // not reached: ORT >= 1.16 calls v2
}
OrtStatus* ORT_API_CALL compute_v2(void* kernel, OrtKernelContext* ctx) {
  return compute(kernel, ctx);
}
void ORT_API_CALL destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }

OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL mem_default(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL one(const OrtCustomOp*) { return 1; }
int ORT_API_CALL since(const OrtCustomOp*) { return 1; }
int ORT_API_CALL until(const OrtCustomOp*) { return 2147483647; }
size_t ORT_API_CALL no_pairs(int** in, int** out) {
  *in = nullptr;
  *out = nullptr;
  return 0;
}
void ORT_API_CALL release_pairs(int*, int*) {}

template <bool kCuda>
OrtCustomOp make_op() {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof(op));
  op.version = ORT_API_VERSION;
  op.CreateKernel = create_kernel_v1<kCuda>;
  op.GetName = op_name;
  op.GetExecutionProviderType = provider<kCuda>;
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count;
  op.KernelCompute = compute_v1;
  op.KernelDestroy = destroy;
  op.GetInputCharacteristic = required;
  op.GetOutputCharacteristic = required;
  op.GetInputMemoryType = mem_default;
  op.GetVariadicInputMinArity = one;
  op.GetVariadicInputHomogeneity = one;
  op.GetVariadicOutputMinArity = one;
  op.GetVariadicOutputHomogeneity = one;
  op.CreateKernelV2 = create_kernel<kCuda>;
  op.KernelComputeV2 = compute_v2;
  op.InferOutputShapeFn = nullptr;
  op.GetStartVersion = since;
  op.GetEndVersion = until;
  op.GetMayInplace = no_pairs;
  op.ReleaseMayInplace = release_pairs;
  op.GetAliasMap = no_pairs;
  op.ReleaseAliasMap = release_pairs;
  return op;
}

OrtCustomOp g_cpu_op = make_op<false>();
#ifdef CTR_OPS_CUDA
OrtCustomOp g_cuda_op = make_op<true>();
#endif

}  // namespace
}  // namespace ctr_ops

extern "C" {

// Reports whether the CUDA kernel was compiled in (for the Python side's checks).
__attribute__((visibility("default"))) int CtrOpsHasCuda() {
#ifdef CTR_OPS_CUDA
  return 1;
#else
  return 0;
#endif
}

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace ctr_ops;
  std::call_once(g_api_once, [api_base] { g_api = api_base->GetApi(ORT_API_VERSION); });
  if (g_api == nullptr) return nullptr;  // older than API 21: ORT reports the unknown op
  OrtCustomOpDomain* domain = nullptr;
  CTR_TRY(g_api->CreateCustomOpDomain(kDomain, &domain));
  {
    std::lock_guard<std::mutex> lock(g_domains_mutex);
    g_domains.items.push_back(domain);  // owned here from now on, even if a step fails
  }
  CTR_TRY(g_api->CustomOpDomain_Add(domain, &g_cpu_op));
#ifdef CTR_OPS_CUDA
  CTR_TRY(g_api->CustomOpDomain_Add(domain, &g_cuda_op));
#endif
  return g_api->AddCustomOpDomain(options, domain);
}

}  // extern "C"
