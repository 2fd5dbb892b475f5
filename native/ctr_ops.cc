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

#ifdef __FAST_MATH__
#error "ctr_ops needs IEEE float semantics: its exp rounds with a 1.5 * 2^23 add (no -ffast-math)"
#endif

namespace ctr_ops {

namespace {

// Blocks of kLanes candidates run together, one vector lane each (GCC/Clang vector
// extensions), kLanes being the target's vector width in floats: a wider type than the
// registers spills and ran 2-16x slower. Nothing here needs libm: exp is inline.
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

// One block of up to kLanes candidates (rows row0 ...), all L steps; unused lanes repeat
// the block's last candidate and are not written.
void augru_block(const float* x_proj, const float* att, const int64_t* user_idx,
                 const float* w_hh, const float* b_hh, float* out, int64_t row0, int lanes,
                 int64_t steps, int64_t hd) {
  const int64_t g3 = 3 * hd;
  vf h[kMaxHidden], acc[3 * kMaxHidden], s[2 * kMaxHidden];
  for (int64_t j = 0; j < hd; ++j) h[j] = splat(0.0f);
  const float* xu[kLanes];
  const float* ar[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    const int64_t row = row0 + std::min(l, lanes - 1);
    xu[l] = x_proj + user_idx[row] * steps * g3;
    ar[l] = att + row * steps;
  }
  for (int64_t t = 0; t < steps; ++t) {
    vf a;
    bool any = false;
    for (int l = 0; l < kLanes; ++l) {
      a[l] = l < lanes ? ar[l][t] : 0.0f;
      any |= a[l] != 0.0f;
    }
    if (!any) continue;  // a == 0 leaves h as it is, exactly
    for (int64_t j = 0; j < g3; ++j) {  // b + W h, rows r, u (sign-flipped) and the candidate
      vf sum = splat(b_hh[j]);
      const float* wj = w_hh + j * hd;
      for (int64_t k = 0; k < hd; ++k) sum += wj[k] * h[k];
      acc[j] = sum;
    }
    for (int64_t j = 0; j < 2 * hd; ++j) {
      vf x;
      for (int l = 0; l < kLanes; ++l) x[l] = xu[l][t * g3 + j];
      s[j] = vsigmoid(x + acc[j]);
    }
    for (int64_t j = 0; j < hd; ++j) {
      vf x;
      for (int l = 0; l < kLanes; ++l) x[l] = xu[l][t * g3 + 2 * hd + j];
      const vf c = vtanh(x + s[j] * acc[2 * hd + j]);
      // lanes with a == 0 keep h exactly, whatever this step's inputs hold (NaN included)
      h[j] = a != splat(0.0f) ? h[j] + (a * s[hd + j]) * (c - h[j]) : h[j];
    }
  }
  for (int l = 0; l < lanes; ++l)
    for (int64_t j = 0; j < hd; ++j) out[(row0 + l) * hd + j] = h[j][l];
}

}  // namespace

bool augru_indices_ok(const int64_t* user_idx, int64_t n, int64_t users) {
  for (int64_t row = 0; row < n; ++row)
    if (user_idx[row] < 0 || user_idx[row] >= users) return false;
  return true;
}

int64_t augru_cpu_blocks(int64_t n) { return (n + kLanes - 1) / kLanes; }

void augru_cpu_block(const float* x_proj, const float* att, const int64_t* user_idx,
                     const float* w_hh, const float* b_hh, float* out, int64_t n, int64_t steps,
                     int64_t hidden, int64_t block) {
  const int64_t row0 = block * kLanes;
  if (block < 0 || row0 >= n) return;  // no such block
  const int lanes = static_cast<int>(std::min<int64_t>(kLanes, n - row0));
  augru_block(x_proj, att, user_idx, w_hh, b_hh, out, row0, lanes, steps, hidden);
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
  if (!augru_indices_ok(ip, n, users)) return error("user_idx out of range [0, U)");
  // blocks of candidates are independent: spread them over ORT's intra-op threads
  struct Args {
    const float *x, *a, *w, *b;
    const int64_t* i;
    float* o;
    int64_t n, steps, hd;
  } args{xp, ap, wp, bp, ip, op, n, steps, hd};
  auto block = [](void* p, size_t k) {
    const Args* r = static_cast<const Args*>(p);
    augru_cpu_block(r->x, r->a, r->i, r->w, r->b, r->o, r->n, r->steps, r->hd,
                    static_cast<int64_t>(k));
  };
  const int64_t blocks = augru_cpu_blocks(n);
  if (blocks == 0) return nullptr;
  return g_api->KernelContext_ParallelFor(ctx, block, static_cast<size_t>(blocks), 0, &args);
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

// Runs the CPU kernel once on a small fixed input and checks the result is finite: a
// library built for instructions this CPU lacks dies here (in the caller's test process)
// instead of in the service. Returns 1 when it ran.
__attribute__((visibility("default"))) int CtrOpsSelfTest() {
  constexpr int64_t n = 19, steps = 3, hd = 5;
  float x[steps * 3 * hd], att[n * steps], w[3 * hd * hd], b[3 * hd], out[n * hd];
  int64_t idx[n];
  for (int64_t i = 0; i < steps * 3 * hd; ++i) x[i] = 0.01f * static_cast<float>(i % 7);
  for (int64_t i = 0; i < n * steps; ++i) att[i] = 0.1f * static_cast<float>(i % 5);
  for (int64_t i = 0; i < 3 * hd * hd; ++i) w[i] = 0.02f * static_cast<float>(i % 3) - 0.02f;
  for (int64_t i = 0; i < 3 * hd; ++i) b[i] = 0.05f;
  for (int64_t i = 0; i < n; ++i) idx[i] = 0;
  if (!ctr_ops::augru_indices_ok(idx, n, 1)) return 0;
  for (int64_t k = 0; k < ctr_ops::augru_cpu_blocks(n); ++k)
    ctr_ops::augru_cpu_block(x, att, idx, w, b, out, n, steps, hd, k);
  for (float v : out)
    if (!std::isfinite(v)) return 0;
  return 1;
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
