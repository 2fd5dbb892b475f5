// An item-ID -> slot index for the service's encoded-row cache (service/rowcache.py).
//
// Looking up N candidate IDs in a Python dict costs the event loop about 0.15 µs an ID
// warm and several times that on caches the request's other work has used. This keeps
// a copy of the cache's ID -> slot map in C++, written by the same two places that
// write the dict (a new slot, an evicted one), and looks a request's IDs up in one
// call from one buffer of NUL-separated IDs. A plain C API for ctypes; not an ORT op.
#include <cstdint>
#include <cstring>
#include <string>
#include <unordered_map>

namespace {
using Index = std::unordered_map<std::string, int64_t>;
}

extern "C" {

__attribute__((visibility("default"))) void* ctr_index_new() { return new Index(); }

__attribute__((visibility("default"))) void ctr_index_free(void* index) {
  delete static_cast<Index*>(index);
}

__attribute__((visibility("default"))) void ctr_index_put(void* index, const char* key,
                                                          int64_t len, int64_t slot) {
  (*static_cast<Index*>(index))[std::string(key, static_cast<size_t>(len))] = slot;
}

__attribute__((visibility("default"))) void ctr_index_erase(void* index, const char* key,
                                                            int64_t len) {
  static_cast<Index*>(index)->erase(std::string(key, static_cast<size_t>(len)));
}

__attribute__((visibility("default"))) int64_t ctr_index_size(void* index) {
  return static_cast<int64_t>(static_cast<Index*>(index)->size());
}

// The slots of ``n`` NUL-separated IDs (``ids``, ``len`` bytes, no NUL after the last)
// into ``out [n]``, -1 where absent. Returns n, or -1 when the buffer does not hold
// exactly n IDs (``out`` is not to be used then).
__attribute__((visibility("default"))) int64_t ctr_index_lookup(void* index, const char* ids,
                                                                int64_t len, int64_t n,
                                                                int64_t* out) {
  const Index& map = *static_cast<Index*>(index);
  std::string key;
  const char* p = ids;
  const char* end = ids + len;
  for (int64_t i = 0; i < n; ++i) {
    const char* stop = static_cast<const char*>(std::memchr(p, 0, end - p));
    if (stop == nullptr) stop = end;
    if (stop == end && i != n - 1) return -1;  // fewer IDs than n
    key.assign(p, static_cast<size_t>(stop - p));
    auto it = map.find(key);
    out[i] = it == map.end() ? -1 : it->second;
    p = stop + 1;
  }
  return p == end + 1 ? n : -1;  // more IDs than n otherwise
}

}  // extern "C"
