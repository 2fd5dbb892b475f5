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
#include <string>
#include <vector>

namespace {

constexpr int64_t kTooSmall = -1;     // out_cap is too small
constexpr int64_t kUnsupported = -2;  // a probability outside [0, 1], or a bad argument

// Room the output can take for k items whose IDs hold id_bytes bytes in all: per item
// the fixed text (64), a probability (32; at most 24 characters: "0.0000" + 17 digits)
// and a rank (20); per ID byte 6 (every byte as \u00xx); and the brackets.
// Arguments past these would overflow it (a caller's bug: the service passes lengths of
// real buffers); both entry points refuse them.
constexpr int64_t kMaxItems = (INT64_MAX / 2) / (64 + 32 + 20);
constexpr int64_t kMaxIdBytes = (INT64_MAX / 2) / 6;
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
  if (k > kMaxItems || ids_len > kMaxIdBytes) return kUnsupported;
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
  if (k < 0 || id_bytes < 0 || k > kMaxItems || id_bytes > kMaxIdBytes) return kUnsupported;
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

// Where the string whose text starts at p ends (its closing quote), 8 bytes at a time
// where it can; nullptr when it does not end. *escaped: it holds a backslash.
inline const char* string_end(const char* p, const char* end, bool* escaped) {
  for (;;) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    constexpr uint64_t kOnes = 0x0101010101010101ull, kHigh = 0x8080808080808080ull;
    while (end - p >= 8) {
      uint64_t v;
      std::memcpy(&v, p, 8);
      const uint64_t q = v ^ (kOnes * '"'), b = v ^ (kOnes * '\\');
      // the high bit of each byte that is zero in q or b: the lowest one set is the first
      // quote or backslash (a borrow only ever marks bytes above a real one)
      const uint64_t hit = (((q - kOnes) & ~q) | ((b - kOnes) & ~b)) & kHigh;
      if (hit) {
        p += __builtin_ctzll(hit) >> 3;
        break;
      }
      p += 8;
    }
#endif
    while (p < end && *p != '"' && *p != '\\') ++p;
    if (p >= end) return nullptr;
    if (*p == '"') return p;
    *escaped = true;
    if (end - p < 2) return nullptr;  // a backslash with nothing after it
    p += 2;                           // the backslash and the character it escapes
  }
}

// A string at c.p (on its opening quote); sets [s, e) to its raw bytes. escaped: it
// holds a backslash. False when it does not end.
bool skip_string(Cursor& c, const char** s, const char** e, bool* escaped) {
  if (!c.eat('"')) return false;
  *s = c.p;
  *escaped = false;
  const char* q = string_end(c.p, c.end, escaped);
  if (q == nullptr) return false;
  *e = q;
  c.p = q + 1;
  return true;
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

// ---------------------------------------------------------------------------------
// Repeated keys: any request body, at any depth.
//
// RFC 8259 leaves an object with a key twice undefined, and every parser the service
// uses keeps the last one: ``{"user_id": "a", ..., "user_id": "b"}`` would score user b.
// The service answers such a body with a 422 naming the key's path instead. This walks
// the whole body once, in document order, and reports the first key that repeats one
// before it in the same object. Keys compare by their decoded text: raw bytes where a
// key has no escape (UTF-8 decodes one way only), the escapes decoded as Python's json
// module decodes them where it has (a surrogate pair to one code point, a lone
// surrogate to its three "surrogatepass" bytes). Objects of up to kLinearKeys keys
// compare each new key with the ones before; a larger one moves to a hash table, so a
// body of 100k keys in one object takes linear time, not quadratic. The caller has
// already parsed the body: malformed JSON is only reported as "cannot tell".

namespace {

constexpr int64_t kCannotTell = -1;
constexpr size_t kMaxDepth = 2048;   // past orjson's 1024: parsed bodies never reach it
constexpr size_t kLinearKeys = 16;   // objects of more keys use the table

struct Key {
  const char* p;  // in the body, or in the decoded copy of an escaped key
  int64_t len;
  uint64_t hash;  // set when the key goes into the table
};

struct Frame {
  int64_t index;      // an array's current position
  size_t keys_start;  // an object's keys: keys[keys_start...], its current key last
  uint64_t serial;    // an object's number in this body (1, 2, ...); 0 for an array
  bool object;
  bool big;           // its keys are in the table
};

struct Slot {
  uint64_t serial;  // the object it belongs to; 0: free
  size_t key;       // its index in keys
};

inline bool same(const Key& a, const Key& b) {
  return a.len == b.len && std::memcmp(a.p, b.p, static_cast<size_t>(a.len)) == 0;
}

inline uint64_t fnv(const char* p, int64_t n) {
  uint64_t h = kFnvBasis;
  for (int64_t i = 0; i < n; ++i) h = (h ^ static_cast<unsigned char>(p[i])) * kFnvPrime;
  return h;
}

int hex4(const char* p, uint32_t* v) {
  *v = 0;
  for (int i = 0; i < 4; ++i) {
    char ch = p[i];
    uint32_t d;
    if (ch >= '0' && ch <= '9') d = ch - '0';
    else if (ch >= 'a' && ch <= 'f') d = ch - 'a' + 10;
    else if (ch >= 'A' && ch <= 'F') d = ch - 'A' + 10;
    else return 0;
    *v = *v << 4 | d;
  }
  return 1;
}

char* put_utf8(char* o, uint32_t cp) {  // surrogates too, as "surrogatepass" writes them
  if (cp < 0x80) {
    *o++ = static_cast<char>(cp);
  } else if (cp < 0x800) {
    *o++ = static_cast<char>(0xC0 | cp >> 6);
    *o++ = static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    *o++ = static_cast<char>(0xE0 | cp >> 12);
    *o++ = static_cast<char>(0x80 | (cp >> 6 & 0x3F));
    *o++ = static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    *o++ = static_cast<char>(0xF0 | cp >> 18);
    *o++ = static_cast<char>(0x80 | (cp >> 12 & 0x3F));
    *o++ = static_cast<char>(0x80 | (cp >> 6 & 0x3F));
    *o++ = static_cast<char>(0x80 | (cp & 0x3F));
  }
  return o;
}

// The escaped string [s, e) decoded to o (never longer than its escaped form); the end
// of what was written, or nullptr for an escape JSON does not have.
char* unescape(const char* s, const char* e, char* o) {
  while (s < e) {
    char ch = *s++;
    if (ch != '\\') {
      *o++ = ch;
      continue;
    }
    if (s >= e) return nullptr;
    switch (*s++) {
      case '"': *o++ = '"'; break;
      case '\\': *o++ = '\\'; break;
      case '/': *o++ = '/'; break;
      case 'b': *o++ = '\b'; break;
      case 'f': *o++ = '\f'; break;
      case 'n': *o++ = '\n'; break;
      case 'r': *o++ = '\r'; break;
      case 't': *o++ = '\t'; break;
      case 'u': {
        uint32_t cp, lo;
        if (e - s < 4 || !hex4(s, &cp)) return nullptr;
        s += 4;
        // a high surrogate and a low one escaped right after it: one code point, as
        // Python's json joins them (any other surrogate stays alone)
        if (cp >= 0xD800 && cp < 0xDC00 && e - s >= 6 && s[0] == '\\' && s[1] == 'u' &&
            hex4(s + 2, &lo) && lo >= 0xDC00 && lo < 0xE000) {
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          s += 6;
        }
        o = put_utf8(o, cp);
        break;
      }
      default:
        return nullptr;
    }
  }
  return o;
}

// The bytes that end a number or a literal.
const struct Delimiters {
  bool at[256] = {};
  Delimiters() {
    for (unsigned char ch : {',', '}', ']', ' ', '\t', '\n', '\r', ':', '"', '{', '['})
      at[ch] = true;
  }
} kDelimiters;

class DuplicateFinder {
 public:
  DuplicateFinder(const char* body, int64_t len) : c_{body, body + len}, len_(len) {
    keys_.clear();
    frames_.clear();
  }

  // 0: no object repeats a key; > 0: the first repeat's path written to out, its
  // length; kCannotTell otherwise.
  int64_t run(char* out, int64_t out_cap) {
    for (;;) {
      // a value
      c_.ws();
      if (c_.p >= c_.end) return kCannotTell;
      const char ch = *c_.p;
      if (ch == '{' || ch == '[') {
        if (frames_.size() >= kMaxDepth) return kCannotTell;
        ++c_.p;
        const bool object = ch == '{';
        frames_.push_back({0, keys_.size(), object ? ++serials_ : 0, object, false});
        c_.ws();
        if (!c_.eat(object ? '}' : ']')) {
          if (!object) continue;  // the array's first value
          int64_t r = member(out, out_cap);
          if (r != 0) return r;
          continue;  // the member's value
        }
        frames_.pop_back();  // {} or []: a whole value
      } else if (ch == '"') {
        bool esc = false;
        const char* e = string_end(c_.p + 1, c_.end, &esc);
        if (e == nullptr) return kCannotTell;
        c_.p = e + 1;
      } else {  // a number or a literal (NaN and Infinity too, as Python's json reads)
        const char* start = c_.p;
        while (c_.p < c_.end && !kDelimiters.at[static_cast<unsigned char>(*c_.p)]) ++c_.p;
        if (c_.p == start) return kCannotTell;
      }
      // after a value: close what ends here, then on to the next member or element
      for (;;) {
        c_.ws();
        if (frames_.empty()) return c_.p == c_.end ? 0 : kCannotTell;
        Frame& f = frames_.back();
        if (c_.eat(',')) {
          if (!f.object) {
            ++f.index;
            break;
          }
          int64_t r = member(out, out_cap);
          if (r != 0) return r;
          break;
        }
        if (!c_.eat(f.object ? '}' : ']')) return kCannotTell;
        keys_.resize(f.keys_start);
        frames_.pop_back();
      }
    }
  }

 private:
  // A member's key and colon, in the innermost frame (an object): 0 when it is new,
  // else what run() returns.
  int64_t member(char* out, int64_t out_cap) {
    c_.ws();
    if (!c_.eat('"')) return kCannotTell;
    bool esc = false;
    const char* s = c_.p;
    const char* e = string_end(s, c_.end, &esc);
    if (e == nullptr) return kCannotTell;
    c_.p = e + 1;
    c_.ws();
    if (!c_.eat(':')) return kCannotTell;
    Key key{s, e - s, 0};
    if (esc) {
      // decoded into a copy sized for the whole body once: every decoded key is shorter
      // than its escaped form, so the copy never moves and the pointers stay good
      if (decoded_.empty()) decoded_.resize(static_cast<size_t>(len_));
      char* o = unescape(s, e, decoded_.data() + used_);
      if (o == nullptr) return kCannotTell;
      key.p = decoded_.data() + used_;
      key.len = o - key.p;
      used_ += static_cast<size_t>(key.len);
    }
    Frame& f = frames_.back();
    const size_t n = keys_.size() - f.keys_start;
    if (!f.big && n < kLinearKeys) {
      for (size_t k = f.keys_start; k < keys_.size(); ++k)
        if (same(keys_[k], key)) return path(key, out, out_cap);
      keys_.push_back(key);
      return 0;
    }
    // room first: a table that grows holds the keys of the open objects, which is the
    // set this key goes into (insert() never grows it)
    if (!reserve(f.big ? 1 : n + 1)) return kCannotTell;
    if (!f.big) {  // the object outgrows the linear compare: its keys go to the table
      for (size_t k = f.keys_start; k < keys_.size(); ++k) {
        keys_[k].hash = fnv(keys_[k].p, keys_[k].len);
        if (insert(k, f.serial) != 0) return kCannotTell;  // (distinct: compared)
      }
      f.big = true;
    }
    key.hash = fnv(key.p, key.len);
    keys_.push_back(key);
    const int r = insert(keys_.size() - 1, f.serial);
    if (r == 1) {
      keys_.pop_back();
      return path(key, out, out_cap);
    }
    return r == 0 ? 0 : kCannotTell;
  }

  // Where frame j's keys end: an object's run up to where the next frame's start (its
  // current key, whose value that frame is, included); the innermost one's to the end.
  size_t keys_end(size_t j) const {
    return j + 1 < frames_.size() ? frames_[j + 1].keys_start : keys_.size();
  }

  // keys_[k] into the table under its object's serial: 0 when new, 1 when that object
  // holds the key already, -1 after kMaxProbes probes. The table has room (reserve).
  int insert(size_t k, uint64_t serial) {
    const size_t mask = table_.size() - 1;
    const Key& key = keys_[k];
    size_t slot = mix(key.hash ^ serial * 0x9e3779b97f4a7c15ull) & mask;
    for (int probes = 0; table_[slot].serial != 0; slot = (slot + 1) & mask) {
      if (++probes > kMaxProbes) return -1;
      const Slot& o = table_[slot];
      if (o.serial == serial && keys_[o.key].hash == key.hash && same(keys_[o.key], key)) return 1;
    }
    table_[slot] = {serial, k};
    ++used_slots_;
    return 0;
  }

  // Room in the table for `extra` more keys at most half full: when there is not, a
  // larger table with the keys of the open objects that use it (the closed ones'
  // entries are dropped). False when a key took too many probes.
  bool reserve(size_t extra) {
    if (2 * (used_slots_ + extra) <= table_.size()) return true;
    // sized for what the new table holds, the open big objects' keys: the closed ones'
    // stale entries counted in used_slots_ would double it at every rebuild
    size_t live = 0;
    for (size_t j = 0; j < frames_.size(); ++j)
      if (frames_[j].big) live += keys_end(j) - frames_[j].keys_start;
    size_t size = 64;
    while (size < 4 * (live + extra)) size <<= 1;
    table_.assign(size, Slot{0, 0});
    used_slots_ = 0;
    for (size_t j = 0; j < frames_.size(); ++j) {
      if (!frames_[j].big) continue;
      for (size_t k = frames_[j].keys_start; k < keys_end(j); ++k)
        if (insert(k, frames_[j].serial) != 0) return false;
    }
    return true;
  }

  // The path to `key`, the repeat, written to out: the enclosing members' keys joined
  // by '.', array positions as [i], as the service names fields ("candidates[3].item_id");
  // "" for a repeated top-level "" (a path is never empty). Its length, or kCannotTell
  // when it does not fit.
  int64_t path(const Key& key, char* out, int64_t out_cap) {
    char* o = out;
    char* end = out + out_cap;
    bool first = true;
    auto put_key = [&](const Key& k) {
      if (end - o < k.len + 1) return false;
      if (!first) *o++ = '.';
      std::memcpy(o, k.p, static_cast<size_t>(k.len));
      o += k.len;
      first = false;
      return true;
    };
    for (size_t j = 0; j + 1 < frames_.size(); ++j) {
      const Frame& f = frames_[j];
      if (f.object) {
        if (!put_key(keys_[frames_[j + 1].keys_start - 1])) return kCannotTell;
      } else {
        if (end - o < 24) return kCannotTell;
        *o++ = '[';
        o = std::to_chars(o, o + 20, f.index).ptr;
        *o++ = ']';
        first = false;
      }
    }
    if (!put_key(key)) return kCannotTell;
    if (o == out) {
      if (out_cap < 2) return kCannotTell;
      *o++ = '"';
      *o++ = '"';
    }
    return o - out;
  }

  Cursor c_;
  int64_t len_;
  uint64_t serials_ = 0;
  std::string decoded_;  // escaped keys, decoded (allocated only for a body with one)
  size_t used_ = 0;
  size_t used_slots_ = 0;
  // kept per thread, their memory reused from body to body (looked up once: each use
  // of a thread_local in a shared library is a call)
  std::vector<Key>& keys_ = thread_keys();      // the open objects' keys, in order
  std::vector<Frame>& frames_ = thread_frames();  // the open objects and arrays
  std::vector<Slot> table_;                       // big objects' keys (allocated for one)

  static std::vector<Key>& thread_keys() {
    thread_local std::vector<Key> keys;
    return keys;
  }
  static std::vector<Frame>& thread_frames() {
    thread_local std::vector<Frame> frames;
    return frames;
  }
};

}  // namespace

extern "C" {

// The first key in ``body`` (``len`` bytes of JSON the caller has parsed) that repeats an
// earlier key of its object, in document order: its path written to ``out`` (members'
// keys joined by '.', array positions as [i]; UTF-8, a lone surrogate as its three
// "surrogatepass" bytes) and the path's length returned; 0 when no object repeats a
// key; -1 when it cannot tell (not JSON, nested past 2048, a path longer than
// ``out_cap``, a key that took too many probes): the caller checks it another way.
__attribute__((visibility("default"))) int64_t ctr_duplicate_key(const char* body, int64_t len,
                                                                 char* out, int64_t out_cap) {
  if (len < 0 || out_cap < 0) return kCannotTell;
  try {
    return DuplicateFinder(body, len).run(out, out_cap);
  } catch (...) {  // std::bad_alloc: no exception crosses into the caller (ctypes)
    return kCannotTell;
  }
}

}  // extern "C"
