// The scoring response's ranked items as JSON, in one pass over flat buffers.
//
// Building N Python dicts and handing them to orjson costs the event loop about half a
// microsecond per candidate; this writes the same bytes from the item IDs (one UTF-8
// buffer), the probabilities and the ranking order. It is a plain C function for ctypes
// (service/codec.py), not an ONNX Runtime op, and lives in the custom-op library only
// so that one build and cache covers both.
//
// The output is byte for byte what ``orjson.dumps`` writes for
// ``[{"item_id": id, "probability": float(p), "rank": r}, ...]``:
// * strings: '"' and '\' escaped, control characters as \b \t \n \f \r or \u00xx,
//   everything else (DEL, non-ASCII UTF-8) as is;
// * probabilities (float32, widened to double as Python's ``float(np.float32)``): the
//   shortest digits that read back as the same double (std::to_chars), laid out as
//   orjson does: "0.0", "1.0", fixed notation down to 1e-5 ("0.00001"), below that
//   "1.5e-7". Only 0 <= p <= 1 is handled; anything else returns kUnsupported and the
//   caller uses orjson.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace {

constexpr int64_t kTooSmall = -1;     // out_cap is too small
constexpr int64_t kUnsupported = -2;  // a probability outside [0, 1], or a bad argument

// Room the output can take for k items whose IDs hold id_bytes bytes in all: per item
// the fixed text (64), a probability (32; at most 24 characters: "0.0000" + 17 digits)
// and a rank (20); per ID byte 6 (every byte as \u00xx); and the brackets.
inline int64_t items_room(int64_t k, int64_t id_bytes) {
  return 2 + k * (64 + 32 + 20) + 6 * id_bytes;
}

char* put(char* o, const char* s) {
  size_t n = std::strlen(s);
  std::memcpy(o, s, n);
  return o + n;
}

char* put_string(char* o, const unsigned char* s, int64_t n) {
  static const char hex[] = "0123456789abcdef";
  *o++ = '"';
  for (int64_t i = 0; i < n; ++i) {
    unsigned char c = s[i];
    if (c >= 0x20 && c != '"' && c != '\\') {
      *o++ = static_cast<char>(c);
      continue;
    }
    *o++ = '\\';
    switch (c) {
      case '"': *o++ = '"'; break;
      case '\\': *o++ = '\\'; break;
      case '\b': *o++ = 'b'; break;
      case '\t': *o++ = 't'; break;
      case '\n': *o++ = 'n'; break;
      case '\f': *o++ = 'f'; break;
      case '\r': *o++ = 'r'; break;
      default:
        o = put(o, "u00");
        *o++ = hex[c >> 4];
        *o++ = hex[c & 15];
    }
  }
  *o++ = '"';
  return o;
}

// p in [0, 1], not NaN, not -0.0 (checked by the caller).
char* put_probability(char* o, double p) {
  if (p == 0.0) return put(o, "0.0");
  if (p == 1.0) return put(o, "1.0");
  char sci[40];
  auto res = std::to_chars(sci, sci + sizeof sci, p, std::chars_format::scientific);
  // "d.ddde-XX" or "de-XX": the digits and the decimal exponent
  char digits[24];
  int nd = 0;
  const char* c = sci;
  for (; c < res.ptr && *c != 'e'; ++c)
    if (*c != '.') digits[nd++] = *c;
  int exp = 0;
  std::from_chars(c + 1 + (c[1] == '+'), res.ptr, exp);
  if (exp >= -5) {  // p < 1 here, so exp <= -1: "0.000ddd"
    o = put(o, "0.");
    for (int k = 0; k < -exp - 1; ++k) *o++ = '0';
    std::memcpy(o, digits, nd);
    return o + nd;
  }
  *o++ = digits[0];
  if (nd > 1) {
    *o++ = '.';
    std::memcpy(o, digits + 1, nd - 1);
    o += nd - 1;
  }
  *o++ = 'e';
  auto r = std::to_chars(o, o + 8, exp);
  return r.ptr;
}

int64_t encode_items(const char* ids, int64_t ids_len, int64_t n, const float* probs,
                     const int64_t* order, int64_t k, char* out) {
  std::vector<int64_t> start(n + 1);
  int64_t found = 0;
  start[0] = 0;
  for (const char* c = ids; (c = static_cast<const char*>(std::memchr(c, 0, ids + ids_len - c)));
       ++c) {
    if (++found >= n) return kUnsupported;  // more NULs than IDs
    start[found] = c - ids + 1;
  }
  if (found != n - 1) return kUnsupported;
  start[n] = ids_len + 1;  // as if a NUL followed the last ID
  // each position at most once: items_room counts every ID's bytes once
  std::vector<bool> seen(static_cast<size_t>(n));
  for (int64_t r = 0; r < k; ++r) {
    int64_t i = order[r];
    if (i < 0 || i >= n || seen[static_cast<size_t>(i)]) return kUnsupported;
    seen[static_cast<size_t>(i)] = true;
    double p = probs[i];
    if (!(p >= 0.0 && p <= 1.0) || std::signbit(p)) return kUnsupported;
  }
  char* o = out;
  *o++ = '[';
  for (int64_t r = 0; r < k; ++r) {
    int64_t i = order[r];
    if (r) *o++ = ',';
    o = put(o, "{\"item_id\":");
    o = put_string(o, reinterpret_cast<const unsigned char*>(ids) + start[i],
                   start[i + 1] - 1 - start[i]);
    o = put(o, ",\"probability\":");
    o = put_probability(o, static_cast<double>(probs[i]));
    o = put(o, ",\"rank\":");
    o = std::to_chars(o, o + 20, r + 1).ptr;
    *o++ = '}';
  }
  *o++ = ']';
  return o - out;
}

int64_t rank(const float* probs, int64_t n, int64_t k, int64_t* order) {
  // One 64-bit key per score: the score's bits mapped to an unsigned order that falls as
  // the score rises (the sign bit flipped for positives, every bit for negatives), then
  // the request position. Sorting the keys ascending ranks highest first, equal scores
  // in request position order (as the stable sort does), with no indirect compare;
  // -0.0 counts as 0.0, as numpy compares them.
  std::vector<uint64_t> keys(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const float p = probs[i] == 0.0f ? 0.0f : probs[i];
    if (!std::isfinite(p)) return kUnsupported;
    uint32_t bits;
    std::memcpy(&bits, &p, sizeof bits);
    const uint32_t rising = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    keys[static_cast<size_t>(i)] = (static_cast<uint64_t>(~rising) << 32) | static_cast<uint64_t>(i);
  }
  if (2 * k < n) {  // a short top-k: a heap of k (a full sort is faster beyond that)
    std::partial_sort(keys.begin(), keys.begin() + k, keys.end());
  } else {
    std::sort(keys.begin(), keys.end());
  }
  for (int64_t r = 0; r < k; ++r)
    order[r] = static_cast<int64_t>(keys[static_cast<size_t>(r)] & 0xffffffffu);
  return k;
}

}  // namespace

extern "C" {

// Writes the JSON array of the ranked items into ``out`` and returns its length:
// ``ids`` (``ids_len`` bytes) are the request's N item IDs in request order, UTF-8,
// each followed by a NUL except the last (IDs never hold one: the service refuses
// control characters in IDs), ``probs [n]`` their scores, ``order [k]`` the request
// positions in rank order (rank 1 first). Returns kTooSmall if ``out_cap`` may not hold
// it, and kUnsupported for a probability outside [0, 1], an index out of range or given
// twice, or a buffer that does not split into ``n`` IDs; nothing useful is in ``out``
// then.
__attribute__((visibility("default"))) int64_t ctr_encode_items(
    const char* ids, int64_t ids_len, int64_t n, const float* probs, const int64_t* order,
    int64_t k, char* out, int64_t out_cap) {
  // n IDs hold n - 1 separating NULs: a larger n is a bad argument, never an allocation
  if (n <= 0 || k < 0 || k > n || ids_len < 0 || n - 1 > ids_len) return kUnsupported;
  if (out_cap < items_room(k, ids_len)) return kTooSmall;
  try {
    return encode_items(ids, ids_len, n, probs, order, k, out);
  } catch (...) {  // std::bad_alloc: no exception crosses into the caller (ctypes)
    return kUnsupported;
  }
}

// The bound ``ctr_encode_items`` checks ``out_cap`` against, for a caller that sizes
// ``out`` from the length of ``ids``: enough for any order.
__attribute__((visibility("default"))) int64_t ctr_items_bound(int64_t k, int64_t id_bytes) {
  return items_room(k, id_bytes);
}

// Writes into ``order [k]`` the request positions of the ``k`` highest of ``probs [n]``,
// highest first and equal scores in request order: numpy's
// ``argsort(-probs, kind="stable")[:k]``. Here rather than in numpy because numpy's sort
// lets go of the GIL, which the service's other thread may then hold (service.codec).
// Returns ``k``, or kUnsupported for a bad argument or a score that is not finite.
__attribute__((visibility("default"))) int64_t ctr_rank(const float* probs, int64_t n, int64_t k,
                                                        int64_t* order) {
  if (n <= 0 || k < 0 || k > n || n > (int64_t{1} << 32)) return kUnsupported;
  try {
    return rank(probs, n, k, order);
  } catch (...) {  // std::bad_alloc
    return kUnsupported;
  }
}

}  // extern "C"

// ---------------------------------------------------------------------------------
// The request side: a scoring body's candidate list, when it is the plain kind.
//
// orjson turns ``"candidates": [{"item_id": "..."}, ...]`` into N dicts that the
// service then checks in several passes. This finds that array in the body's bytes and
// copies the IDs out when every candidate is exactly ``{"item_id": "<ID>"}`` with an
// ID of 1 to ``max_id_len`` printable ASCII characters and no escapes, and the array
// has 1 to ``max_n`` of them. Anything else (another shape, an escape, non-ASCII, a
// second "candidates" key, a top-level key with an escape, trailing bytes, an ID given
// twice) declines, and the caller parses the whole body as before, so every error it
// answers is the one it always answered. The rest of the body is not checked here: the
// caller parses it with the array cut out.

namespace {

struct Cursor {
  const char* p;
  const char* end;
  void ws() {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) ++p;
  }
  bool eat(char c) {
    if (p < end && *p == c) {
      ++p;
      return true;
    }
    return false;
  }
};

// A string at c.p (on its opening quote); sets [s, e) to its raw bytes. escaped: it
// holds a backslash. False when it does not end.
bool skip_string(Cursor& c, const char** s, const char** e, bool* escaped) {
  if (!c.eat('"')) return false;
  *s = c.p;
  *escaped = false;
  while (c.p < c.end) {
    char ch = *c.p++;
    if (ch == '"') {
      *e = c.p - 1;
      return true;
    }
    if (ch == '\\') {
      *escaped = true;
      if (c.p >= c.end) return false;
      ++c.p;
    }
  }
  return false;
}

// Any JSON value, not validated (the caller's parser does that): only its end is found,
// strings and nesting respected.
bool skip_value(Cursor& c) {
  int depth = 0;
  do {
    c.ws();
    if (c.p >= c.end) return false;
    char ch = *c.p;
    if (ch == '"') {
      const char *s, *e;
      bool esc;
      if (!skip_string(c, &s, &e, &esc)) return false;
    } else if (ch == '{' || ch == '[') {
      ++depth;
      ++c.p;
    } else if (ch == '}' || ch == ']') {
      if (--depth < 0) return false;
      ++c.p;
    } else if (ch == ',' || ch == ':') {
      if (depth == 0) return false;
      ++c.p;
    } else {  // a number or a literal
      while (c.p < c.end && *c.p != ',' && *c.p != '}' && *c.p != ']' && *c.p != ' ' &&
             *c.p != '\t' && *c.p != '\n' && *c.p != '\r' && *c.p != ':')
        ++c.p;
    }
  } while (depth > 0);
  return true;
}

bool key_is(const char* s, const char* e, const char* want) {
  size_t n = std::strlen(want);
  return static_cast<size_t>(e - s) == n && std::memcmp(s, want, n) == 0;
}

// One ID copied out: where it starts in the output, its length and its FNV-1a hash.
struct Span {
  int64_t start;
  int64_t len;
  uint64_t hash;
};

constexpr uint64_t kFnvPrime = 1099511628211ull;

// FNV-1a's starting value, drawn once per process: IDs crafted to share their low hash
// bits (every one in one slot of the table below, the check quadratic) cannot be made
// without it.
const uint64_t kFnvBasis = [] {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32 ^ rd()) | 1;
}();

// The slot of a hash in a table of 2^k: its bits mixed (splitmix64's finaliser), so
// that the low bits depend on all of them.
inline uint64_t mix(uint64_t h) {
  h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
  h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
  return h ^ (h >> 31);
}

// Probes of one ID past which the check gives up: the caller then parses the body
// whole and checks it there. Random IDs in a half-full table take one or two.
constexpr int kMaxProbes = 64;

// 1 if two of the IDs at `spans` in `out` are equal, 0 if not, -1 if one ID took more
// than kMaxProbes probes: an open-addressing table of their hashes (kept per thread),
// the bytes compared only where the hashes meet a slot.
int has_duplicate(const char* out, const std::vector<Span>& spans) {
  thread_local std::vector<int64_t> table;  // span index per slot, -1 where free
  size_t cap = 16;
  while (cap < 2 * spans.size()) cap <<= 1;
  table.assign(cap, -1);
  for (size_t k = 0; k < spans.size(); ++k) {
    const Span& id = spans[k];
    size_t slot = mix(id.hash) & (cap - 1);
    int probes = 0;
    for (int64_t o; (o = table[slot]) >= 0; slot = (slot + 1) & (cap - 1)) {
      if (++probes > kMaxProbes) return -1;
      const Span& other = spans[static_cast<size_t>(o)];
      if (other.len == id.len &&
          std::memcmp(out + other.start, out + id.start, static_cast<size_t>(id.len)) == 0)
        return 1;
    }
    table[slot] = static_cast<int64_t>(k);
  }
  return 0;
}

// The candidate array at c.p; IDs copied to out, NUL-separated; *count of them. Returns
// the bytes written, -1 when it is not the plain kind (an ID twice included).
int64_t plain_candidates(Cursor& c, int64_t max_id_len, int64_t max_n, char* out,
                         int64_t out_cap, int64_t* count) {
  if (!c.eat('[')) return -1;
  thread_local std::vector<Span> spans;  // the IDs copied out, for the duplicate check
  spans.clear();
  int64_t n = 0;
  char* o = out;
  c.ws();
  if (c.p < c.end && *c.p == ']') return -1;  // empty: the caller says so
  for (;;) {
    c.ws();
    if (!c.eat('{')) return -1;
    c.ws();
    const char *s, *e;
    bool esc;
    if (!skip_string(c, &s, &e, &esc) || esc || !key_is(s, e, "item_id")) return -1;
    c.ws();
    if (!c.eat(':')) return -1;
    c.ws();
    if (!skip_string(c, &s, &e, &esc) || esc) return -1;
    int64_t len = e - s;
    if (len < 1 || len > max_id_len || ++n > max_n) return -1;
    uint64_t hash = kFnvBasis;
    for (const char* q = s; q < e; ++q) {
      if (*q < 0x20 || *q > 0x7e) return -1;  // printable ASCII only (signed char: >= 0x80 too)
      hash = (hash ^ static_cast<unsigned char>(*q)) * kFnvPrime;
    }
    if (o - out + len + 1 > out_cap) return -1;
    if (n > 1) *o++ = '\0';
    spans.push_back({o - out, len, hash});
    std::memcpy(o, s, len);
    o += len;
    c.ws();
    if (!c.eat('}')) return -1;
    c.ws();
    if (c.eat(']')) break;
    if (!c.eat(',')) return -1;
  }
  // an ID twice: the caller's full check names it; too many probes: it checks it all
  if (has_duplicate(out, spans) != 0) return -1;
  *count = n;
  return o - out;
}

int64_t scan_candidates(const char* body, int64_t len, int64_t max_id_len, int64_t max_n,
                        char* out, int64_t out_cap, int64_t* where) {
  Cursor c{body, body + len};
  c.ws();
  if (!c.eat('{')) return 0;
  int64_t found = -1, ids_len = 0;
  c.ws();
  if (c.eat('}')) return 0;
  for (;;) {
    c.ws();
    const char *s, *e;
    bool esc;
    if (!skip_string(c, &s, &e, &esc) || esc) return 0;
    c.ws();
    if (!c.eat(':')) return 0;
    c.ws();
    if (key_is(s, e, "candidates")) {
      if (found >= 0) return 0;  // a second one: the parser keeps the last
      where[0] = c.p - body;
      ids_len = plain_candidates(c, max_id_len, max_n, out, out_cap, &found);
      if (ids_len < 0) return 0;
      where[1] = c.p - body;
    } else if (!skip_value(c)) {
      return 0;
    }
    c.ws();
    if (c.eat('}')) break;
    if (!c.eat(',')) return 0;
  }
  c.ws();
  if (c.p != c.end || found < 0) return 0;
  where[2] = ids_len;
  return found;
}

}  // namespace

extern "C" {

// Finds the plain candidate list in ``body`` (see above). Returns the number of
// candidates N >= 1, with the IDs NUL-separated in ``out`` and ``where[3]``: the
// array's byte range [where[0], where[1]) in ``body`` and the IDs' length in ``out``;
// 0 when the body is not that case (the caller parses it whole).
__attribute__((visibility("default"))) int64_t ctr_scan_candidates(
    const char* body, int64_t len, int64_t max_id_len, int64_t max_n, char* out,
    int64_t out_cap, int64_t* where) {
  try {
    return scan_candidates(body, len, max_id_len, max_n, out, out_cap, where);
  } catch (...) {  // std::bad_alloc: the caller parses the body whole
    return 0;
  }
}

}  // extern "C"
