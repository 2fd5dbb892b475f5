// ONNX Runtime custom-op library of this project, domain "ctr_ops": "AttentionalGRU"
// (the fused AUGRU of augru.h) for the CPU provider and, when built with nvcc
// (CTR_OPS_CUDA), for the CUDA provider; "DinAttention" (the fused DIN activation unit of
// din_attention.h, din_attention.cc) for the CPU provider only. Loaded by
// SessionOptions.register_custom_ops_library; written against the C API only
// (third_party/onnxruntime/onnxruntime_c_api.h, API 21), so it loads in any later ORT.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "augru.h"
#include "din_attention.h"
#include "simd.h"
#include "onnxruntime_c_api.h"

#ifdef __FAST_MATH__
#error "ctr_ops needs IEEE float semantics: its exp rounds with a 1.5 * 2^23 add (no -ffast-math)"
#endif

namespace ctr_ops {

namespace {

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
  bool one_user = true;  // the usual call (one request's candidates): x is a broadcast
  for (int l = 0; l < kLanes; ++l) {
    const int64_t row = row0 + std::min(l, lanes - 1);
    xu[l] = x_proj + user_idx[row] * steps * g3;
    ar[l] = att + row * steps;
    one_user &= xu[l] == xu[0];
  }
  vf x[3 * kMaxHidden];
  for (int64_t t = 0; t < steps; ++t) {
    vf a;
    bool any = false;
    for (int l = 0; l < kLanes; ++l) {
      a[l] = l < lanes ? ar[l][t] : 0.0f;
      any |= a[l] != 0.0f;
    }
    if (!any) continue;  // a == 0 leaves h as it is, exactly
    // this step's input projections, per lane: rows r, u (sign-flipped), candidate
    if (one_user) {
      const float* xt = xu[0] + t * g3;
      for (int64_t j = 0; j < g3; ++j) x[j] = splat(xt[j]);
    } else {
      for (int64_t j = 0; j < g3; ++j)
        for (int l = 0; l < kLanes; ++l) x[j][l] = xu[l][t * g3 + j];
    }
    dense(h, hd, w_hh, b_hh, acc, g3);  // b + W h
    for (int64_t j = 0; j < 2 * hd; ++j) s[j] = vsigmoid(x[j] + acc[j]);
    for (int64_t j = 0; j < hd; ++j) {
      const vf c = vtanh(x[2 * hd + j] + s[j] * acc[2 * hd + j]);
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

OrtStatus* op_error(const char* op, const std::string& msg) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string(op) + ": " + msg).c_str());
}
OrtStatus* error(const std::string& msg) { return op_error(kOpName, msg); }

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

OrtStatus* gru_compute(void* op_kernel, OrtKernelContext* ctx) {
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

// ---- ctr_ops.DinAttention (din_attention.h), CPU only ----

constexpr const char* kDinOpName = "DinAttention";
constexpr size_t kDinInputs = 8;

struct DinKernel {
  DinShape shape{};  // widths, act and softmax from the node's attributes
  std::string error;  // a bad attribute: session creation fails with it (and, through
                      // the old CreateKernel entry point, which has no status, every run)
};

OrtStatus* din_error(const std::string& msg) { return op_error(kDinOpName, msg); }

std::string join(const DinShape& s) {
  std::string out;
  for (int64_t i = 0; i < s.layers; ++i) out += (i ? ", " : "") + std::to_string(s.widths[i]);
  return out;
}

DinKernel* din_kernel(const OrtKernelInfo* info) {
  auto* k = new DinKernel();
  size_t count = 0;
  OrtStatus* st = g_api->KernelInfoGetAttributeArray_int64(info, "widths", nullptr, &count);
  if (st == nullptr && (count < 1 || count > static_cast<size_t>(kDinMaxLayers))) {
    k->error = "widths must list 1 to 8 layers";
  } else if (st == nullptr) {
    k->shape.layers = static_cast<int64_t>(count);
    st = g_api->KernelInfoGetAttributeArray_int64(info, "widths", k->shape.widths, &count);
  }
  int64_t act = -1, softmax = 0;
  if (st == nullptr) st = g_api->KernelInfoGetAttribute_int64(info, "act", &act);
  if (st == nullptr) st = g_api->KernelInfoGetAttribute_int64(info, "softmax", &softmax);
  if (st != nullptr) {
    k->error = std::string("attribute: ") + g_api->GetErrorMessage(st);
    g_api->ReleaseStatus(st);
  }
  k->shape.act = act;
  k->shape.softmax = softmax != 0;
  if (k->error.empty() && din_param_count(k->shape) < 0)
    k->error = "attribute widths must be in [1, 256] and act one of 0, 1, 2 (got widths [" +
               join(k->shape) + "], act " + std::to_string(act) + ")";
  return k;
}

OrtStatus* din_compute(void* op_kernel, OrtKernelContext* ctx) {
  const DinKernel* kern = static_cast<DinKernel*>(op_kernel);
  if (!kern->error.empty()) return din_error(kern->error);
  DinShape s = kern->shape;
  Tensor qp, kp, q, keys, idx, len, wp, params;
  CTR_TRY(input(ctx, 0, &qp));
  CTR_TRY(input(ctx, 1, &kp));
  CTR_TRY(input(ctx, 2, &q));
  CTR_TRY(input(ctx, 3, &keys));
  CTR_TRY(input(ctx, 4, &idx));
  CTR_TRY(input(ctx, 5, &len));
  CTR_TRY(input(ctx, 6, &wp));
  CTR_TRY(input(ctx, 7, &params));
  const int64_t h1 = s.widths[0];
  if (keys.shape.size() != 3) return din_error("keys must be [U, L, D]");
  s.users = keys.shape[0];
  s.steps = keys.shape[1];
  s.dim = keys.shape[2];
  if (s.dim < 1 || s.dim > kDinMaxDim) return din_error("key width D must be in [1, 256]");
  if (q.shape.size() != 2 || q.shape[1] != s.dim) return din_error("q must be [N, D]");
  s.n = q.shape[0];
  if (qp.shape.size() != 2 || qp.shape[0] != s.n || qp.shape[1] != h1)
    return din_error("q_part must be [N, H1]");
  if (kp.shape.size() != 3 || kp.shape[0] != s.users || kp.shape[1] != s.steps ||
      kp.shape[2] != h1)
    return din_error("k_part must be [U, L, H1]");
  if (idx.shape.size() != 1 || idx.shape[0] != s.n) return din_error("user_idx must be [N]");
  if (len.shape.size() != 1 || len.shape[0] != s.users) return din_error("hist_len must be [U]");
  if (wp.shape.size() != 2 || wp.shape[0] != s.dim || wp.shape[1] != h1)
    return din_error("w_p must be [D, H1]");
  const int64_t want = din_param_count(s);
  if (want < 0) return din_error("widths must be in [1, 256] and act one of 0, 1, 2");
  if (params.shape.size() != 1 || params.shape[0] != want)
    return din_error("params must hold " + std::to_string(want) + " floats");
  const int64_t pooled_dims[2] = {s.n, s.dim}, weight_dims[2] = {s.n, s.steps};
  OrtValue *pooled = nullptr, *weights = nullptr;
  CTR_TRY(g_api->KernelContext_GetOutput(ctx, 0, pooled_dims, 2, &pooled));
  CTR_TRY(g_api->KernelContext_GetOutput(ctx, 1, weight_dims, 2, &weights));
  void *po = nullptr, *wo = nullptr;
  CTR_TRY(g_api->GetTensorMutableData(pooled, &po));
  CTR_TRY(g_api->GetTensorMutableData(weights, &wo));
  const auto* ip = static_cast<const int64_t*>(idx.data);
  if (!din_indices_ok(ip, s.n, s.users)) return din_error("user_idx out of range [0, U)");
  if (s.n == 0) return nullptr;
  // din_prepare writes every float of it (zeros past each history)
  std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(din_scratch_floats(s))]);
  din_prepare(s, static_cast<const float*>(kp.data), static_cast<const float*>(keys.data),
              scratch.get());
  struct Args {
    const DinShape* s;
    const float *qp, *q, *keys, *wp, *params, *scratch;
    const int64_t *idx, *len;
    float *pooled, *weights;
    std::atomic<bool> failed;  // a chunk threw (on a pool thread: caught there)
  } args{&s,
         static_cast<const float*>(qp.data),
         static_cast<const float*>(q.data),
         static_cast<const float*>(keys.data),
         static_cast<const float*>(wp.data),
         static_cast<const float*>(params.data),
         scratch.get(),
         ip,
         static_cast<const int64_t*>(len.data),
         static_cast<float*>(po),
         static_cast<float*>(wo),
         {false}};
  auto chunk = [](void* p, size_t k) {
    Args* a = static_cast<Args*>(p);
    try {
      din_chunk(*a->s, a->qp, a->q, a->keys, a->idx, a->len, a->wp, a->params, a->scratch,
                a->pooled, a->weights, static_cast<int64_t>(k));
    } catch (...) {
      a->failed = true;
    }
  };
  CTR_TRY(g_api->KernelContext_ParallelFor(ctx, chunk, static_cast<size_t>(din_chunks(s.n)), 0,
                                           &args));
  return args.failed ? g_api->CreateStatus(ORT_FAIL, "DinAttention: a block failed (memory?)")
                     : nullptr;
}

// ---- the ops as ORT sees them: a description per op, one set of callbacks for all ----

template <bool kCudaKernel>
struct GruOp {  // AttentionalGRU, for the CPU or for CUDA
  static constexpr const char* kName = kOpName;
  static constexpr bool kCuda = kCudaKernel;
  static constexpr size_t kInputCount = kInputs, kOutputCount = 1;
  static bool int64_input(size_t i) { return i == 2; }
  static void* create(const OrtKernelInfo*) { return new Kernel{kCuda}; }
  static const std::string* error(void*) { return nullptr; }
  static OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
    return gru_compute(kernel, ctx);
  }
  static void destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }
};

struct DinOp {  // DinAttention, CPU only
  static constexpr const char* kName = kDinOpName;
  static constexpr bool kCuda = false;
  static constexpr size_t kInputCount = kDinInputs, kOutputCount = 2;
  static bool int64_input(size_t i) { return i == 4 || i == 5; }
  static void* create(const OrtKernelInfo* info) { return din_kernel(info); }
  static const std::string* error(void* kernel) {
    const std::string& e = static_cast<DinKernel*>(kernel)->error;
    return e.empty() ? nullptr : &e;
  }
  static OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
    return din_compute(kernel, ctx);
  }
  static void destroy(void* kernel) { delete static_cast<DinKernel*>(kernel); }
};

template <class Op>
const char* ORT_API_CALL op_name(const OrtCustomOp*) {
  return Op::kName;
}
template <class Op>
const char* ORT_API_CALL provider(const OrtCustomOp*) {
  return Op::kCuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
}
template <class Op>
ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp*, size_t i) {
  return Op::int64_input(i) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
                            : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
template <class Op>
size_t ORT_API_CALL input_count(const OrtCustomOp*) {
  return Op::kInputCount;
}
ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
template <class Op>
size_t ORT_API_CALL output_count(const OrtCustomOp*) {
  return Op::kOutputCount;
}

// No C++ exception may cross into ORT (a C API; the library's libstdc++ is static): a
// failed allocation becomes an error status for this kernel or this run.
template <class Op>
OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi*,
                                      const OrtKernelInfo* info, void** kernel) {
  try {
    *kernel = Op::create(info);
    if (const std::string* error = Op::error(*kernel)) {  // a bad attribute: no session
      OrtStatus* st = op_error(Op::kName, *error);
      Op::destroy(*kernel);
      *kernel = nullptr;
      return st;
    }
    return nullptr;
  } catch (...) {
    return g_api->CreateStatus(ORT_FAIL, (std::string(Op::kName) + ": no kernel").c_str());
  }
}
template <class Op>
void* ORT_API_CALL create_kernel_v1(const OrtCustomOp*, const OrtApi*,
                                    const OrtKernelInfo* info) {
  try {
    return Op::create(info);
  } catch (...) {
    return nullptr;
  }
}
template <class Op>
OrtStatus* ORT_API_CALL compute_v2(void* kernel, OrtKernelContext* ctx) {
  try {
    return Op::compute(kernel, ctx);
  } catch (const std::exception& e) {
    return g_api->CreateStatus(ORT_FAIL, (std::string(Op::kName) + ": " + e.what()).c_str());
  } catch (...) {
    return g_api->CreateStatus(ORT_FAIL, Op::kName);
  }
}
template <class Op>
void ORT_API_CALL compute_v1(void* kernel, OrtKernelContext* ctx) {
  OrtStatus* st = compute_v2<Op>(kernel, ctx);
  if (st != nullptr) g_api->ReleaseStatus(st);  // not reached: ORT >= 1.16 calls v2
}
template <class Op>
void ORT_API_CALL destroy(void* kernel) {
  Op::destroy(kernel);
}

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

template <class Op>
OrtCustomOp make_op() {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof(op));
  op.version = ORT_API_VERSION;
  op.CreateKernel = create_kernel_v1<Op>;
  op.GetName = op_name<Op>;
  op.GetExecutionProviderType = provider<Op>;
  op.GetInputType = input_type<Op>;
  op.GetInputTypeCount = input_count<Op>;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count<Op>;
  op.KernelCompute = compute_v1<Op>;
  op.KernelDestroy = destroy<Op>;
  op.GetInputCharacteristic = required;
  op.GetOutputCharacteristic = required;
  op.GetInputMemoryType = mem_default;
  op.GetVariadicInputMinArity = one;
  op.GetVariadicInputHomogeneity = one;
  op.GetVariadicOutputMinArity = one;
  op.GetVariadicOutputHomogeneity = one;
  op.CreateKernelV2 = create_kernel<Op>;
  op.KernelComputeV2 = compute_v2<Op>;
  op.InferOutputShapeFn = nullptr;
  op.GetStartVersion = since;
  op.GetEndVersion = until;
  op.GetMayInplace = no_pairs;
  op.ReleaseMayInplace = release_pairs;
  op.GetAliasMap = no_pairs;
  op.ReleaseAliasMap = release_pairs;
  return op;
}

OrtCustomOp g_cpu_op = make_op<GruOp<false>>();
OrtCustomOp g_din_op = make_op<DinOp>();
#ifdef CTR_OPS_CUDA
OrtCustomOp g_cuda_op = make_op<GruOp<true>>();
#endif

}  // namespace

// The API table of the ONNX Runtime that registered this library first (nullptr before
// that): native/runner.cc makes its sessions with the same runtime.
const OrtApi* registered_api() { return g_api; }

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
  // the DIN unit too (its own object file): 2 users, 19 candidates, 3 steps, dice 6-4
  ctr_ops::DinShape s{2, n, steps, 4, 2, {6, 4}, ctr_ops::kDinDice, true};
  float qp[n * 6], kp[2 * steps * 6], q[n * 4], keys[2 * steps * 4], wp[4 * 6], pooled[n * 4],
      weights[n * steps];
  float params[64];
  int64_t lens[2] = {3, 2};
  if (ctr_ops::din_param_count(s) > 64) return 0;
  for (int64_t i = 0; i < n * 6; ++i) qp[i] = 0.03f * static_cast<float>(i % 5) - 0.05f;
  for (int64_t i = 0; i < 2 * steps * 6; ++i) kp[i] = 0.02f * static_cast<float>(i % 7);
  for (int64_t i = 0; i < n * 4; ++i) q[i] = 0.1f * static_cast<float>(i % 3);
  for (int64_t i = 0; i < 2 * steps * 4; ++i) keys[i] = 0.05f * static_cast<float>(i % 4);
  for (int64_t i = 0; i < 4 * 6; ++i) wp[i] = 0.01f * static_cast<float>(i % 9);
  for (int64_t i = 0; i < 64; ++i) params[i] = 0.5f + 0.01f * static_cast<float>(i % 11);
  for (int64_t i = 0; i < n; ++i) idx[i] = i % 2;
  std::vector<float> scratch(static_cast<size_t>(ctr_ops::din_scratch_floats(s)));
  ctr_ops::din_prepare(s, kp, keys, scratch.data());
  for (int64_t k = 0; k < ctr_ops::din_chunks(n); ++k)
    ctr_ops::din_chunk(s, qp, q, keys, idx, lens, wp, params, scratch.data(), pooled, weights,
                       k);
  for (float v : weights)
    if (!std::isfinite(v)) return 0;
  for (float v : pooled)
    if (!std::isfinite(v)) return 0;
  return 1;
}

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace ctr_ops;
  std::call_once(g_api_once, [api_base] { g_api = api_base->GetApi(ORT_API_VERSION); });
  if (g_api == nullptr) {  // an ORT older than API 21: say so (API 1 makes the status)
    const OrtApi* v1 = api_base->GetApi(1);
    if (v1 == nullptr) return nullptr;
    std::string msg = std::string("ctr_ops needs ONNX Runtime API ") +
                      std::to_string(ORT_API_VERSION) + " or newer; this is ONNX Runtime " +
                      api_base->GetVersionString();
    return v1->CreateStatus(ORT_FAIL, msg.c_str());
  }
  OrtCustomOpDomain* domain = nullptr;
  CTR_TRY(g_api->CreateCustomOpDomain(kDomain, &domain));
  {
    std::lock_guard<std::mutex> lock(g_domains_mutex);
    g_domains.items.push_back(domain);  // owned here from now on, even if a step fails
  }
  CTR_TRY(g_api->CustomOpDomain_Add(domain, &g_cpu_op));
  CTR_TRY(g_api->CustomOpDomain_Add(domain, &g_din_op));
#ifdef CTR_OPS_CUDA
  CTR_TRY(g_api->CustomOpDomain_Add(domain, &g_cuda_op));
#endif
  return g_api->AddCustomOpDomain(options, domain);
}

}  // extern "C"
