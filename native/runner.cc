// The native graph runner: ONNX Runtime sessions run on threads of their own, which
// never take Python's GIL (service/nativerun.py).
//
// Through ORT's Python binding a graph call's thread needs the GIL twice: to turn the
// feeds into tensors and, after the run, to turn the outputs into arrays and hand them
// back to the event loop. Under load the event loop holds the GIL most of the time, so
// the call's thread waits for it (docs/benchmarks.md, "Session 21"). Here the event loop
// submits a call (pointers to its arrays, copied into a job) without letting go of the
// GIL (the library is loaded as a ctypes.PyDLL), a worker thread runs it with ORT's C
// API and writes the scores into the caller's buffer, and an eventfd tells the event
// loop that calls are done; it collects them with ctr_runner_poll.
//
// The sessions are made with the ONNX Runtime that registered this library as a
// custom-op library first (ctr_ops::registered_api): the one the Python binding runs,
// so there is one runtime in the process and the fused graph's kernels are this
// library's. The caller keeps every array a job points at alive until the job is done.

#include <sys/eventfd.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "onnxruntime_c_api.h"

namespace ctr_ops {
const OrtApi* registered_api();
}

namespace {

constexpr int kMaxInputs = 16;
constexpr int kMaxDims = 4;
constexpr int kDesc = 3 + kMaxDims;  // per input: data pointer, element type, rank, dims
constexpr int kLanes = 2;  // classes of calls, each with its own limit of calls at once

enum Status : int32_t { kOk = 0, kFailed = 1 };

struct Input {
  void* data;
  int32_t type;
  int32_t rank;
  int64_t dims[kMaxDims];
};

struct Job {
  uint64_t token = 0;
  int session = 0;
  int lane = 0;
  int inputs = 0;
  Input in[kMaxInputs];
  float* out = nullptr;
  int64_t out_len = 0;
  int32_t status = kOk;
  double seconds = 0.0;
  std::string error;
  Job* next = nullptr;  // the done list: linked through the jobs, so it never allocates
};

struct Session {
  OrtSession* session = nullptr;
  std::vector<std::string> names;  // the inputs, in the order the caller passes them
  std::vector<int32_t> types;      // their element types (ONNXTensorElementDataType)
  std::vector<const char*> name_ptrs;
  std::string output;
};

struct Runner {
  const OrtApi* api = nullptr;
  OrtEnv* env = nullptr;
  OrtMemoryInfo* memory = nullptr;
  std::vector<Session> sessions;
  // initializers every session added after them takes from the caller's memory
  // (ctr_runner_add_weight), released after the sessions
  std::vector<std::pair<std::string, OrtValue*>> weights;
  int fd = -1;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Job*> queue;
  Job* done_head = nullptr;  // finished calls, oldest first, until polled
  Job* done_tail = nullptr;
  std::unordered_map<uint64_t, std::string> errors;  // failed jobs' messages, until read
  std::vector<std::thread> threads;
  int limit[kLanes] = {1 << 30, 1 << 30};  // calls of each lane at once (ctr_runner_set_lane)
  int busy[kLanes] = {0, 0};
  bool stop = false;
  bool held = false;  // ctr_runner_hold: no thread takes a new call meanwhile
};

void put_error(char* err, int len, const char* msg, size_t size) noexcept {
  if (err == nullptr || len <= 0) return;
  const size_t n = std::min(size, static_cast<size_t>(len - 1));
  std::memcpy(err, msg, n);
  err[n] = '\0';
}

void put_error(char* err, int len, const std::string& msg) noexcept {
  put_error(err, len, msg.data(), msg.size());
}

void put_error(char* err, int len, const char* msg) noexcept {  // a literal: no allocation
  put_error(err, len, msg, std::strlen(msg));
}

// The status's message (and the status released); empty for success.
std::string take(const OrtApi* api, OrtStatus* status) {
  if (status == nullptr) return {};
  std::string msg = api->GetErrorMessage(status);
  if (msg.empty()) msg = "ONNX Runtime failed without a message";
  api->ReleaseStatus(status);
  return msg;
}

size_t element_size(int32_t type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
      return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE:
      return 8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
      return 2;
    default:
      return 0;
  }
}

// One graph call: job->in into the session, its output's values into job->out.
// Returns an empty string on success, else what went wrong.
std::string run_job(Runner* r, Job* job) {
  const OrtApi* api = r->api;
  if (job->session < 0 || job->session >= static_cast<int>(r->sessions.size()))
    return "no such session: " + std::to_string(job->session);
  Session& s = r->sessions[static_cast<size_t>(job->session)];
  if (job->inputs != static_cast<int>(s.names.size()))
    return "the call has " + std::to_string(job->inputs) + " inputs, the graph " +
           std::to_string(s.names.size());
  OrtValue* values[kMaxInputs] = {};
  OrtValue* output = nullptr;
  std::string error;
  for (int i = 0; i < job->inputs && error.empty(); ++i) {
    const Input& in = job->in[i];
    if (in.type != s.types[static_cast<size_t>(i)]) {
      error = "input " + s.names[static_cast<size_t>(i)] + " has element type " +
              std::to_string(in.type) + ", the graph wants " +
              std::to_string(s.types[static_cast<size_t>(i)]);
      break;
    }
    size_t count = 1;
    for (int d = 0; d < in.rank; ++d) count *= static_cast<size_t>(in.dims[d]);
    error = take(api, api->CreateTensorWithDataAsOrtValue(
                          r->memory, in.data, count * element_size(in.type), in.dims,
                          static_cast<size_t>(in.rank),
                          static_cast<ONNXTensorElementDataType>(in.type), &values[i]));
  }
  if (error.empty()) {
    const char* out_name = s.output.c_str();
    error = take(api, api->Run(s.session, nullptr, s.name_ptrs.data(), values,
                               static_cast<size_t>(job->inputs), &out_name, 1, &output));
  }
  if (error.empty()) {
    OrtTensorTypeAndShapeInfo* info = nullptr;
    size_t count = 0;
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    error = take(api, api->GetTensorTypeAndShape(output, &info));
    if (error.empty()) error = take(api, api->GetTensorShapeElementCount(info, &count));
    if (error.empty()) error = take(api, api->GetTensorElementType(info, &type));
    if (info != nullptr) api->ReleaseTensorTypeAndShapeInfo(info);
    void* data = nullptr;
    if (error.empty()) error = take(api, api->GetTensorMutableData(output, &data));
    if (error.empty() && type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      error = s.output + " is not float32 (element type " + std::to_string(type) + ")";
    if (error.empty() && static_cast<int64_t>(count) != job->out_len)
      error = s.output + " has " + std::to_string(count) + " values, the call wants " +
              std::to_string(job->out_len);
    if (error.empty() && count > 0) std::memcpy(job->out, data, count * sizeof(float));
  }
  for (int i = 0; i < job->inputs; ++i)
    if (values[i] != nullptr) api->ReleaseValue(values[i]);
  if (output != nullptr) api->ReleaseValue(output);
  return error;
}

// Runs f; false if it threw (e.g. bad_alloc: the call fails, not the process), with the
// exception's message in *error where there is memory for it. Never throws.
template <typename F>
bool guarded(std::string* error, F&& f) noexcept {
  try {
    f();
    return true;
  } catch (const std::exception& exc) {
    try {
      *error = exc.what();
    } catch (...) {  // no memory for the message: the caller reports a bare failure
    }
  } catch (...) {
    try {
      *error = "unknown C++ exception";
    } catch (...) {
    }
  }
  return false;
}

void signal(Runner* r) {
  const uint64_t one = 1;
  // a full counter (2^64 - 2 unread signals) cannot happen; EINTR: try again
  while (write(r->fd, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

void work(Runner* r) {
  pthread_setname_np(pthread_self(), "ort_native");
  for (;;) {
    Job* job = nullptr;
    {
      std::unique_lock<std::mutex> lock(r->mu);
      // the oldest queued call whose lane has room (a stop ends a hold)
      auto next = [r]() {
        if (r->held && !r->stop) return r->queue.end();
        return std::find_if(r->queue.begin(), r->queue.end(),
                            [r](const Job* j) { return r->busy[j->lane] < r->limit[j->lane]; });
      };
      auto it = r->queue.end();
      r->cv.wait(lock, [&] {
        it = next();
        return it != r->queue.end() || (r->stop && r->queue.empty());
      });
      if (it == r->queue.end()) return;  // stopping, and every queued call has run
      job = *it;
      r->queue.erase(it);
      ++r->busy[job->lane];
    }
    const auto start = std::chrono::steady_clock::now();
    std::string error;
    const bool ok = guarded(&error, [&] { error = run_job(r, job); });
    job->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    job->status = ok && error.empty() ? kOk : kFailed;
    job->error = std::move(error);
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(r->mu);
      // a worker waits for this lane only if it was full and calls are queued
      wake = r->busy[job->lane]-- == r->limit[job->lane] && !r->queue.empty();
      (r->done_tail != nullptr ? r->done_tail->next : r->done_head) = job;
      r->done_tail = job;
    }
    if (wake) r->cv.notify_all();
    signal(r);
  }
}

bool fill_job(Job* job, const int64_t* desc, int inputs, float* out, int64_t out_len) {
  if (inputs < 0 || inputs > kMaxInputs || out_len < 0) return false;
  job->inputs = inputs;
  job->out = out;
  job->out_len = out_len;
  for (int i = 0; i < inputs; ++i) {
    const int64_t* d = desc + static_cast<ptrdiff_t>(i) * kDesc;
    Input& in = job->in[i];
    in.data = reinterpret_cast<void*>(static_cast<uintptr_t>(d[0]));
    in.type = static_cast<int32_t>(d[1]);
    in.rank = static_cast<int32_t>(d[2]);
    if (in.rank < 0 || in.rank > kMaxDims || element_size(in.type) == 0) return false;
    for (int k = 0; k < in.rank; ++k) {
      if (d[3 + k] < 0) return false;
      in.dims[k] = d[3 + k];
    }
  }
  return true;
}

}  // namespace

extern "C" {

// 1 once ONNX Runtime has registered this library (its API is known), else 0.
__attribute__((visibility("default"))) int ctr_runner_ready() {
  return ctr_ops::registered_api() != nullptr ? 1 : 0;
}

// A runner without sessions yet, or nullptr (err says why). spin: 0 never, 1 during a
// run only, 2 always (CTR_INTRA_OP_SPIN) for the sessions it makes.
__attribute__((visibility("default"))) void* ctr_runner_new(char* err, int err_len) {
  const OrtApi* api = ctr_ops::registered_api();
  if (api == nullptr) {
    put_error(err, err_len, "the library has not been registered with ONNX Runtime yet");
    return nullptr;
  }
  auto* r = new (std::nothrow) Runner();
  if (r == nullptr) {
    put_error(err, err_len, "no memory for the runner");
    return nullptr;
  }
  r->api = api;
  std::string e;
  const bool ok = guarded(&e, [&] {
    e = take(api, api->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "ctr_native", &r->env));
    if (e.empty())
      e = take(api, api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &r->memory));
    if (e.empty()) {
      r->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
      if (r->fd < 0) e = std::string("eventfd: ") + std::strerror(errno);
    }
  });
  if (!ok && e.empty()) e = "no memory";  // short enough to need no allocation
  if (!e.empty()) {
    put_error(err, err_len, e);
    if (r->memory != nullptr) api->ReleaseMemoryInfo(r->memory);
    if (r->env != nullptr) api->ReleaseEnv(r->env);
    delete r;
    return nullptr;
  }
  return r;
}

// A session of the graph in model[0:len] with intra_threads intra-op threads, taking
// the inputs named in names (inputs of them, '\0'-separated, in the order calls pass
// them) and returning output's values; with ops_library (or nullptr) registered.
// Returns its index, or -1 (err says why). Only before ctr_runner_start.
__attribute__((visibility("default"))) int ctr_runner_add_session(
    void* handle, const void* model, size_t len, int intra_threads, int spin,
    const char* ops_library, const char* names, int inputs, const char* output, char* err,
    int err_len) {
  auto* r = static_cast<Runner*>(handle);
  const OrtApi* api = r->api;
  if (!r->threads.empty() || inputs < 0 || inputs > kMaxInputs) {
    put_error(err, err_len, "sessions are added before the start, with at most 16 inputs");
    return -1;
  }
  OrtSessionOptions* so = nullptr;
  Session s;
  std::string e;
  const bool ok = guarded(&e, [&] {  // strings and vectors may throw: not across extern "C"
    e = take(api, api->CreateSessionOptions(&so));
    if (e.empty()) e = take(api, api->SetIntraOpNumThreads(so, intra_threads));
    if (e.empty()) e = take(api, api->SetInterOpNumThreads(so, 1));
    if (e.empty()) e = take(api, api->SetSessionGraphOptimizationLevel(so, ORT_ENABLE_ALL));
    if (e.empty())
      e = take(api, api->AddSessionConfigEntry(so, "session.intra_op.allow_spinning",
                                               spin == 0 ? "0" : "1"));
    if (e.empty() && spin == 1)
      e = take(api, api->AddSessionConfigEntry(so, "session.force_spinning_stop", "1"));
    if (e.empty() && ops_library != nullptr)
      e = take(api, api->RegisterCustomOpsLibrary_V2(so, ops_library));
    for (const auto& [name, value] : r->weights)  // not deserialized from the graph again
      if (e.empty()) e = take(api, api->AddInitializer(so, name.c_str(), value));
    if (e.empty())
      e = take(api, api->CreateSessionFromArray(r->env, model, len, so, &s.session));
    size_t count = 0;
    if (e.empty()) e = take(api, api->SessionGetInputCount(s.session, &count));
    if (e.empty() && count != static_cast<size_t>(inputs))
      e = "the graph has " + std::to_string(count) + " inputs, " + std::to_string(inputs) +
          " were named";
    const char* p = names;
    for (int i = 0; i < inputs && e.empty(); ++i) {
      s.names.emplace_back(p);
      p += s.names.back().size() + 1;
      // the graph's own input i must be the one named: its element type is checked per call
      OrtAllocator* alloc = nullptr;
      char* graph_name = nullptr;
      e = take(api, api->GetAllocatorWithDefaultOptions(&alloc));
      if (e.empty()) e = take(api, api->SessionGetInputName(s.session, i, alloc, &graph_name));
      if (e.empty() && s.names.back() != graph_name)
        e = "graph input " + std::to_string(i) + " is " + graph_name + ", not " + s.names.back();
      if (graph_name != nullptr) {
        const std::string freed = take(api, api->AllocatorFree(alloc, graph_name));
        if (e.empty()) e = freed;
      }
      OrtTypeInfo* type_info = nullptr;
      if (e.empty()) e = take(api, api->SessionGetInputTypeInfo(s.session, i, &type_info));
      const OrtTensorTypeAndShapeInfo* tensor = nullptr;
      if (e.empty()) e = take(api, api->CastTypeInfoToTensorInfo(type_info, &tensor));
      ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
      if (e.empty() && tensor == nullptr) e = s.names.back() + " is not a tensor";
      if (e.empty()) e = take(api, api->GetTensorElementType(tensor, &type));
      if (type_info != nullptr) api->ReleaseTypeInfo(type_info);
      s.types.push_back(static_cast<int32_t>(type));
    }
    if (e.empty()) {
      s.output = output;
      // every allocation first (any may throw, and then nothing has changed): the
      // push_back and the pointer rebuilds below stay within reserved room
      r->sessions.reserve(r->sessions.size() + 1);
      s.name_ptrs.reserve(s.names.size());
      for (Session& other : r->sessions) other.name_ptrs.reserve(other.names.size());
      r->sessions.push_back(std::move(s));
      s.session = nullptr;  // the runner owns it now
      for (Session& other : r->sessions) {  // the vector may have moved the strings' owners
        other.name_ptrs.clear();
        for (const std::string& n : other.names) other.name_ptrs.push_back(n.c_str());
      }
    }
  });
  if (!ok && e.empty()) e = "no memory";  // short enough to need no allocation
  if (so != nullptr) api->ReleaseSessionOptions(so);
  if (!e.empty()) {
    put_error(err, err_len, e);
    if (s.session != nullptr) api->ReleaseSession(s.session);
    return -1;
  }
  return static_cast<int>(r->sessions.size()) - 1;
}

// An initializer that the sessions added after it take from the caller instead of
// deserializing their own copy from the graph (OrtApi::AddInitializer): `name`, of ONNX
// element type `type` and shape dims[0:ndim], `bytes` bytes at `data`, which must stay
// valid and unchanged until ctr_runner_free. Returns 0, or -1 (err says why). Only
// before ctr_runner_start.
__attribute__((visibility("default"))) int ctr_runner_add_weight(
    void* handle, const char* name, void* data, size_t bytes, int type, const int64_t* dims,
    int ndim, char* err, int err_len) {
  auto* r = static_cast<Runner*>(handle);
  const OrtApi* api = r->api;
  if (!r->threads.empty()) {
    put_error(err, err_len, "weights are added before the start");
    return -1;
  }
  if (ndim < 0 || name == nullptr) {
    put_error(err, err_len, "a weight needs a name and a rank of 0 or more");
    return -1;
  }
  OrtValue* value = nullptr;
  std::string e;
  const bool ok = guarded(&e, [&] {
    e = take(api, api->CreateTensorWithDataAsOrtValue(
                      r->memory, data, bytes, dims, static_cast<size_t>(ndim),
                      static_cast<ONNXTensorElementDataType>(type), &value));
    if (e.empty()) {
      r->weights.emplace_back(name, value);
      value = nullptr;  // the runner owns it now
    }
  });
  if (!ok && e.empty()) e = "no memory";
  if (value != nullptr) api->ReleaseValue(value);
  if (!e.empty()) {
    put_error(err, err_len, e);
    return -1;
  }
  return 0;
}

// Starts `workers` threads; returns the eventfd that becomes readable when calls are
// done (-1 if already started or workers < 1).
__attribute__((visibility("default"))) int ctr_runner_start(void* handle, int workers) {
  auto* r = static_cast<Runner*>(handle);
  if (!r->threads.empty() || workers < 1) return -1;
  try {
    for (int i = 0; i < workers; ++i) r->threads.emplace_back(work, r);
  } catch (...) {  // a thread could not be made (a pids limit, no memory): no runner
    {
      std::lock_guard<std::mutex> lock(r->mu);
      r->stop = true;  // and submit refuses every call
    }
    r->cv.notify_all();
    for (std::thread& t : r->threads) t.join();
    r->threads.clear();
    return -1;
  }
  return r->fd;
}

// At most `limit` calls of lane `lane` run at once (before the start; default: no limit
// but the number of threads). Returns 0, or -1 for no such lane or a limit below 1.
__attribute__((visibility("default"))) int ctr_runner_set_lane(void* handle, int lane,
                                                                int limit) {
  auto* r = static_cast<Runner*>(handle);
  if (lane < 0 || lane >= kLanes || limit < 1 || !r->threads.empty()) return -1;
  r->limit[lane] = limit;
  return 0;
}

// Queues a call of session `session` in lane `lane`: `inputs` inputs described by desc
// (7 int64 each: data address, element type, rank, up to 4 dims), scores into
// out[0:out_len]. Returns 0, or -1 for a malformed description or a stopped runner.
__attribute__((visibility("default"))) int ctr_runner_submit(void* handle, uint64_t token,
                                                              int session, int lane,
                                                              const int64_t* desc, int inputs,
                                                              float* out, int64_t out_len) {
  auto* r = static_cast<Runner*>(handle);
  if (lane < 0 || lane >= kLanes) return -1;
  auto* job = new (std::nothrow) Job();
  if (job == nullptr) return -1;
  job->token = token;
  job->session = session;
  job->lane = lane;
  if (!fill_job(job, desc, inputs, out, out_len)) {
    delete job;
    return -1;
  }
  {
    std::lock_guard<std::mutex> lock(r->mu);
    if (r->stop || r->threads.empty()) {
      delete job;
      return -1;
    }
    try {
      r->queue.push_back(job);
    } catch (const std::bad_alloc&) {  // never across extern "C": the call is refused
      delete job;
      return -1;
    }
  }
  r->cv.notify_one();
  return 0;
}

// The same call on the caller's thread (warm-up, checks at load). Returns 0, or -1 with
// err saying why.
__attribute__((visibility("default"))) int ctr_runner_run(void* handle, int session,
                                                           const int64_t* desc, int inputs,
                                                           float* out, int64_t out_len,
                                                           char* err, int err_len) {
  auto* r = static_cast<Runner*>(handle);
  Job job;
  job.session = session;
  if (!fill_job(&job, desc, inputs, out, out_len)) {
    put_error(err, err_len, "malformed call description");
    return -1;
  }
  std::string e;
  const bool ok = guarded(&e, [&] { e = run_job(r, &job); });  // never across extern "C"
  if (!ok && e.empty()) e = "no memory";  // short enough to need no allocation
  if (!e.empty()) {
    put_error(err, err_len, e);
    return -1;
  }
  return 0;
}

// Drops a queued call that no thread has taken yet: 1 if it was dropped (it will not
// be reported), 0 if it has started or is done (it will be, or was, reported).
__attribute__((visibility("default"))) int ctr_runner_cancel(void* handle, uint64_t token) {
  auto* r = static_cast<Runner*>(handle);
  std::lock_guard<std::mutex> lock(r->mu);
  for (auto it = r->queue.begin(); it != r->queue.end(); ++it) {
    if ((*it)->token == token) {
      delete *it;
      r->queue.erase(it);
      return 1;
    }
  }
  return 0;
}

// Up to `max` finished calls: their tokens, statuses (0 ok, 1 failed: the message from
// ctr_runner_error) and run times in seconds. Clears the eventfd first, so a call that
// finishes meanwhile signals it again.
__attribute__((visibility("default"))) int ctr_runner_poll(void* handle, uint64_t* tokens,
                                                            int32_t* status, double* seconds,
                                                            int max) {
  auto* r = static_cast<Runner*>(handle);
  uint64_t counter = 0;
  (void)!read(r->fd, &counter, sizeof counter);  // EAGAIN: nothing was signalled
  Job* jobs = nullptr;  // the first n of the done list, cut off under the lock
  int n = 0;
  {
    std::lock_guard<std::mutex> lock(r->mu);
    Job* last = nullptr;
    Job* job = r->done_head;
    for (; job != nullptr && n < max; job = job->next, ++n) last = job;
    if (last != nullptr) {
      jobs = r->done_head;
      last->next = nullptr;
    }
    r->done_head = job;
    if (job == nullptr) r->done_tail = nullptr;
    for (Job* j = jobs; j != nullptr; j = j->next) {
      if (j->status == kOk) continue;
      try {
        r->errors[j->token] = std::move(j->error);
      } catch (...) {  // no memory for the message: the call still fails, without it
      }
    }
  }
  for (int i = 0; jobs != nullptr; ++i) {
    Job* job = jobs;
    jobs = job->next;
    tokens[i] = job->token;
    status[i] = job->status;
    seconds[i] = job->seconds;
    delete job;
  }
  return n;
}

// A failed call's message (then forgotten); 0 if there is none for the token.
__attribute__((visibility("default"))) int ctr_runner_error(void* handle, uint64_t token,
                                                             char* err, int err_len) {
  auto* r = static_cast<Runner*>(handle);
  std::lock_guard<std::mutex> lock(r->mu);
  auto it = r->errors.find(token);
  if (it == r->errors.end()) return 0;
  put_error(err, err_len, it->second);
  r->errors.erase(it);
  return 1;
}

// While held (hold != 0), no thread takes a queued call; stopping ends the hold. For
// tests: a call that waits in the queue as long as they need.
__attribute__((visibility("default"))) void ctr_runner_hold(void* handle, int hold) {
  auto* r = static_cast<Runner*>(handle);
  {
    std::lock_guard<std::mutex> lock(r->mu);
    r->held = hold != 0;
  }
  r->cv.notify_all();
}

// Calls queued or running, not yet reported done.
__attribute__((visibility("default"))) int ctr_runner_pending(void* handle) {
  auto* r = static_cast<Runner*>(handle);
  std::lock_guard<std::mutex> lock(r->mu);
  int running = 0;
  for (const int busy : r->busy) running += busy;
  return static_cast<int>(r->queue.size()) + running;
}

// Calls of lane `lane` running now (for tests); -1 for no such lane.
__attribute__((visibility("default"))) int ctr_runner_busy(void* handle, int lane) {
  auto* r = static_cast<Runner*>(handle);
  if (lane < 0 || lane >= kLanes) return -1;
  std::lock_guard<std::mutex> lock(r->mu);
  return r->busy[lane];
}

// Stops the threads once every queued call has run (blocks until then), releases the
// sessions and closes the eventfd. Calls not yet polled are dropped with the runner.
__attribute__((visibility("default"))) void ctr_runner_free(void* handle) {
  auto* r = static_cast<Runner*>(handle);
  if (r == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(r->mu);
    r->stop = true;
    r->held = false;
  }
  r->cv.notify_all();
  for (std::thread& t : r->threads) t.join();
  for (Job* job = r->done_head; job != nullptr;) {
    Job* next = job->next;
    delete job;
    job = next;
  }
  for (Session& s : r->sessions)
    if (s.session != nullptr) r->api->ReleaseSession(s.session);
  for (auto& weight : r->weights) r->api->ReleaseValue(weight.second);
  if (r->memory != nullptr) r->api->ReleaseMemoryInfo(r->memory);
  if (r->env != nullptr) r->api->ReleaseEnv(r->env);
  if (r->fd >= 0) close(r->fd);
  delete r;
}

}  // extern "C"
