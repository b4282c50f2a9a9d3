// Per-channel reductions for batch norm as XLA FFI CPU kernels.
//
// Every array arrives flat, with attributes outer, channels (C) and inner: it is read as
// [outer, C, inner] (row-major) and reduced over outer and inner, leaving one value per channel
// c: NHWC activations are [N*H*W, C, 1], NCL ones [N, C, L]. (Flat, so that XLA never copies
// an operand to meet a layout constraint.)
//
//   jaxbn_channel_moments(x)         -> mean[C], m2[C]        m2 = Σ (x - mean)²
//   jaxbn_channel_dot(g, x, mean)    -> Σ g·(x - mean)[C], Σ g[C]
//
// Why by hand: XLA:CPU's reduction fusions materialize `x - mean` (and a half-to-float convert)
// before reducing and take the two sums in separate passes. Here each kernel reads its inputs
// once, in their own dtype (float32, bfloat16 or float16), and sums in float.
//
// Accuracy: values are summed in float over blocks of 32 rows and the block sums in double;
// the moments are taken around a per-channel shift (the mean of the channel's first 32 values),
// so `randn + 1e4` in float32 still gives var ≈ 1 without a second pass over x. When a shift
// lies more than 3 standard deviations from its channel's mean, x gets that second pass.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;      // one vector: 16 floats (AVX-512; narrower ISAs split it)
constexpr int64_t kBlockRows = 32;  // terms summed in float before adding into double
constexpr double kFarShift = 3.0;     // in standard deviations: see Moments
constexpr int64_t kMaxVectors = 8;  // vectors of channels summed at once (2·8 registers)

using Vec = float __attribute__((vector_size(kLanes * sizeof(float))));

struct BFloat16 {
  uint16_t bits;
};

// Loads one value, or kLanes consecutive values, as float.
template <typename V>
struct Load;

template <>
struct Load<float> {
  static float from(const float* p) { return *p; }
  static float from(const _Float16* p) { return static_cast<float>(*p); }
  static float from(const BFloat16* p) {  // bfloat16 is the high half of a float32
    const uint32_t bits = static_cast<uint32_t>(p->bits) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  }
};

template <>
struct Load<Vec> {
  static Vec from(const float* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static Vec from(const _Float16* p) {
#if defined(__AVX512F__)
    // GCC turns __builtin_convertvector from _Float16 into 16 scalar converts; F16C does 16.
    const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return reinterpret_cast<const Vec&>(v);
#elif defined(__F16C__)
    Vec out;
    const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
    std::memcpy(&out, &lo, sizeof(lo));
    std::memcpy(reinterpret_cast<char*>(&out) + sizeof(lo), &hi, sizeof(hi));
    return out;
#else
    using Half = _Float16 __attribute__((vector_size(kLanes * sizeof(_Float16))));
    Half h;
    std::memcpy(&h, p, sizeof(h));
    return __builtin_convertvector(h, Vec);
#endif
  }
  static Vec from(const BFloat16* p) {
    using U16 = uint16_t __attribute__((vector_size(kLanes * sizeof(uint16_t))));
    using U32 = uint32_t __attribute__((vector_size(kLanes * sizeof(uint32_t))));
    U16 h;
    std::memcpy(&h, p, sizeof(h));
    const U32 bits = __builtin_convertvector(h, U32) << 16;
    Vec v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  }
};

// Runs fn(task) for task in [0, tasks) on the caller and XLA's intra-op thread pool. The
// caller claims tasks too, so it never waits on a pool thread that is busy elsewhere; a pool
// thread that starts late finds nothing left and returns.
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t tasks, const Fn& fn) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, tasks](const Fn& f) {
    for (int64_t t; (t = shared->next.fetch_add(1)) < tasks;) {
      f(t);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  auto fn_copy = std::make_shared<Fn>(fn);  // outlives this call if a helper starts late
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work, fn_copy] { work(*fn_copy); });
  work(fn);
  while (shared->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

// Rows [o, end) of channels [c, c + N·kLanes), N vectors of accumulators in registers.
template <int N, typename Term>
inline void sum_rows(const Term& term, const float* params, int64_t C, int64_t o, int64_t end,
                     int64_t c, double* d1, double* d2) {
  Vec param[N], va[N], vb[N];
  for (int v = 0; v < N; ++v) {
    param[v] = Load<Vec>::from(params + c + v * kLanes);
    va[v] = Vec{};
    vb[v] = Vec{};
  }
  for (int64_t r = o; r < end; ++r) {
    for (int v = 0; v < N; ++v) {
      Vec a, b;
      term(param[v], r * C + c + v * kLanes, a, b);
      va[v] += a;
      vb[v] += b;
    }
  }
  for (int v = 0; v < N; ++v) {
    for (int64_t l = 0; l < kLanes; ++l) {
      d1[c + v * kLanes + l] += va[v][l];
      d2[c + v * kLanes + l] += vb[v][l];
    }
  }
}

// Calls fn(std::integral_constant<int, n>) for a runtime n in [1, kMaxVectors].
template <typename Fn>
inline void with_vectors(int64_t n, const Fn& fn) {
  switch (n) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    case 6: return fn(std::integral_constant<int, 6>{});
    case 7: return fn(std::integral_constant<int, 7>{});
    default: return fn(std::integral_constant<int, 8>{});
  }
}

// Sums two per-channel series over [outer, C, inner] into s1, s2 (double, length C).
//
// term(param, offset, a, b) sets both terms for the element(s) at `offset`; it is called with
// V = float for one element or V = Vec for kLanes consecutive ones, `param` holding the
// channel's parameter (its shift or mean) for each lane. `params` has one value per channel.
// The work is split over outer when it is long, else over channels.
template <typename Term>
void channel_sums(ffi::ThreadPool& pool, int64_t outer, int64_t C, int64_t inner,
                  const float* params, const Term& term, std::vector<double>& s1,
                  std::vector<double>& s2) {
  s1.assign(C, 0.0);
  s2.assign(C, 0.0);
  if (outer == 0 || C == 0 || inner == 0) return;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const bool by_rows = outer >= 4 * threads || C < 4 * threads;
  const int64_t tasks = by_rows ? std::min<int64_t>(outer, 8 * threads)
                                : std::min<int64_t>(C, 8 * threads);
  std::vector<double> part1(by_rows ? tasks * C : 0), part2(by_rows ? tasks * C : 0);
  parallel_for(pool, tasks, [&](int64_t t) {
    const int64_t n = by_rows ? outer : C;
    const int64_t lo = n * t / tasks, hi = n * (t + 1) / tasks;
    const int64_t o_lo = by_rows ? lo : 0, o_hi = by_rows ? hi : outer;
    const int64_t c_lo = by_rows ? 0 : lo, c_hi = by_rows ? C : hi;
    double* d1 = by_rows ? &part1[t * C] : s1.data();
    double* d2 = by_rows ? &part2[t * C] : s2.data();
    if (inner == 1) {
      // Channels innermost: lanes are kLanes neighbouring channels of one row. Up to
      // kMaxVectors vectors of channels are summed together in registers while the rows of a
      // block stream by in order, then added into double.
      for (int64_t o = o_lo; o < o_hi; o += kBlockRows) {
        const int64_t end = std::min(o_hi, o + kBlockRows);
        int64_t c = c_lo;
        while (c + kLanes <= c_hi) {
          const int64_t vectors = std::min<int64_t>(kMaxVectors, (c_hi - c) / kLanes);
          with_vectors(vectors, [&](auto count) {
            sum_rows<decltype(count)::value>(term, params, C, o, end, c, d1, d2);
          });
          c += vectors * kLanes;
        }
        for (; c < c_hi; ++c) {
          float fa = 0.0f, fb = 0.0f;
          for (int64_t r = o; r < end; ++r) {
            float a, b;
            term(params[c], r * C + c, a, b);
            fa += a;
            fb += b;
          }
          d1[c] += fa;
          d2[c] += fb;
        }
      }
    } else {
      // Each (row, channel) is a contiguous run of `inner` values: lanes walk along it.
      for (int64_t o = o_lo; o < o_hi; ++o) {
        for (int64_t c = c_lo; c < c_hi; ++c) {
          const int64_t base = (o * C + c) * inner;
          const float p = params[c];
          const Vec param = Vec{} + p;
          // Four independent accumulators per series hide the latency of the vector adds.
          constexpr int64_t kUnroll = 4;
          int64_t i = 0;
          while (i + kLanes <= inner) {
            const int64_t block_end = std::min(inner, i + kBlockRows * kLanes * kUnroll);
            Vec va[kUnroll] = {}, vb[kUnroll] = {};
            for (; i + kUnroll * kLanes <= block_end; i += kUnroll * kLanes) {
              for (int64_t u = 0; u < kUnroll; ++u) {
                Vec a, b;
                term(param, base + i + u * kLanes, a, b);
                va[u] += a;
                vb[u] += b;
              }
            }
            for (; i + kLanes <= block_end; i += kLanes) {
              Vec a, b;
              term(param, base + i, a, b);
              va[0] += a;
              vb[0] += b;
            }
            const Vec sa = (va[0] + va[1]) + (va[2] + va[3]);
            const Vec sb = (vb[0] + vb[1]) + (vb[2] + vb[3]);
            for (int64_t l = 0; l < kLanes; ++l) {
              d1[c] += sa[l];
              d2[c] += sb[l];
            }
          }
          for (; i < inner; ++i) {
            float a, b;
            term(p, base + i, a, b);
            d1[c] += a;
            d2[c] += b;
          }
        }
      }
    }
  });
  if (by_rows) {
    for (int64_t t = 0; t < tasks; ++t) {
      for (int64_t c = 0; c < C; ++c) {
        s1[c] += part1[t * C + c];
        s2[c] += part2[t * C + c];
      }
    }
  }
}

struct View {
  int64_t outer, C, inner;
};

template <typename T>
ffi::Error Moments(ffi::ThreadPool pool, View view, ffi::AnyBuffer x,
                   ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::AnyBuffer> m2) {
  const int64_t outer = view.outer, C = view.C, inner = view.inner;
  const T* xp = reinterpret_cast<const T*>(x.untyped_data());
  // The shift: the mean of each channel's first (up to) kBlockRows finite values, which is
  // close to the channel's mean unless the data is pathological — then see below.
  std::vector<float> shift(C, 0.0f);
  for (int64_t c = 0; c < C; ++c) {
    double total = 0.0;
    int64_t taken = 0;
    for (int64_t o = 0; o < outer && taken < kBlockRows; ++o) {
      for (int64_t i = 0; i < inner && taken < kBlockRows; ++i) {
        const float value = Load<float>::from(xp + (o * C + c) * inner + i);
        if (std::isfinite(value)) {
          total += value;
          ++taken;
        }
      }
    }
    shift[c] = taken > 0 ? static_cast<float>(total / taken) : 0.0f;
  }
  const double n = static_cast<double>(outer) * static_cast<double>(inner);
  std::vector<double> s1, s2;
  auto sum_around_shift = [&] {
    channel_sums(
        pool, outer, C, inner, shift.data(),
        [xp](auto param, int64_t i, auto& a, auto& b) {
          using V = decltype(param);
          const V v = Load<V>::from(xp + i) - param;
          a = v;
          b = v * v;
        },
        s1, s2);
  };
  sum_around_shift();
  // A shift far from its channel's mean (outliers among the first values) makes the float
  // block sums of squares lose digits. Then x is summed once more around the mean just found:
  // the two-pass algorithm, paid for only where it is needed.
  bool again = false;
  for (int64_t c = 0; c < C && n > 0; ++c) {
    const double offset = s1[c] / n, var = std::max(0.0, s2[c] / n - offset * offset);
    if (std::isfinite(offset) && offset * offset > kFarShift * kFarShift * var) {
      shift[c] = static_cast<float>(shift[c] + offset);
      again = true;
    }
  }
  if (again) sum_around_shift();
  float* mean_out = reinterpret_cast<float*>(mean->untyped_data());
  float* m2_out = reinterpret_cast<float*>(m2->untyped_data());
  for (int64_t c = 0; c < C; ++c) {
    const double offset = n > 0 ? s1[c] / n : 0.0;
    mean_out[c] = static_cast<float>(shift[c] + offset);
    const double m2_value = s2[c] - s1[c] * offset;
    m2_out[c] = static_cast<float>(m2_value < 0.0 ? 0.0 : m2_value);  // keeps NaN
  }
  return ffi::Error::Success();
}

template <typename T>
ffi::Error Dot(ffi::ThreadPool pool, View view, ffi::AnyBuffer g, ffi::AnyBuffer x,
               ffi::Buffer<ffi::F32> mean, ffi::Result<ffi::AnyBuffer> sum_gx,
               ffi::Result<ffi::AnyBuffer> sum_g) {
  const int64_t outer = view.outer, C = view.C, inner = view.inner;
  const T* gp = reinterpret_cast<const T*>(g.untyped_data());
  const T* xp = reinterpret_cast<const T*>(x.untyped_data());
  const float* mp = mean.typed_data();
  std::vector<double> s1, s2;
  channel_sums(
      pool, outer, C, inner, mp,
      [gp, xp](auto param, int64_t i, auto& a, auto& b) {
        using V = decltype(param);
        const V gv = Load<V>::from(gp + i);
        a = gv * (Load<V>::from(xp + i) - param);
        b = gv;
      },
      s1, s2);
  float* gx_out = reinterpret_cast<float*>(sum_gx->untyped_data());
  float* g_out = reinterpret_cast<float*>(sum_g->untyped_data());
  for (int64_t c = 0; c < C; ++c) {
    gx_out[c] = static_cast<float>(s1[c]);
    g_out[c] = static_cast<float>(s2[c]);
  }
  return ffi::Error::Success();
}

// The view must cover the buffer exactly: a mismatch is a bug on the Python side, and reading
// past the end must never happen.
ffi::Error check_view(const char* name, const View& view, const ffi::AnyBuffer& buffer) {
  if (view.outer < 0 || view.C < 0 || view.inner < 0 ||
      view.outer * view.C * view.inner != static_cast<int64_t>(buffer.element_count())) {
    return ffi::Error::InvalidArgument(std::string(name) + ": view does not match the buffer");
  }
  return ffi::Error::Success();
}

ffi::Error MomentsAny(ffi::ThreadPool pool, int64_t outer, int64_t channels, int64_t inner,
                      ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> mean,
                      ffi::Result<ffi::AnyBuffer> m2) {
  const View view{outer, channels, inner};
  if (auto error = check_view("jaxbn_channel_moments", view, x); error.failure()) return error;
  switch (x.element_type()) {
    case ffi::F32: return Moments<float>(pool, view, x, mean, m2);
    case ffi::BF16: return Moments<BFloat16>(pool, view, x, mean, m2);
    case ffi::F16: return Moments<_Float16>(pool, view, x, mean, m2);
    default: return ffi::Error::InvalidArgument("jaxbn_channel_moments: unsupported dtype");
  }
}

ffi::Error DotAny(ffi::ThreadPool pool, int64_t outer, int64_t channels, int64_t inner,
                  ffi::AnyBuffer g, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> mean,
                  ffi::Result<ffi::AnyBuffer> sum_gx, ffi::Result<ffi::AnyBuffer> sum_g) {
  const View view{outer, channels, inner};
  if (auto error = check_view("jaxbn_channel_dot", view, x); error.failure()) return error;
  if (g.element_type() != x.element_type() || g.element_count() != x.element_count() ||
      static_cast<int64_t>(mean.element_count()) != channels) {
    return ffi::Error::InvalidArgument("jaxbn_channel_dot: g, x and mean do not match");
  }
  switch (x.element_type()) {
    case ffi::F32: return Dot<float>(pool, view, g, x, mean, sum_gx, sum_g);
    case ffi::BF16: return Dot<BFloat16>(pool, view, g, x, mean, sum_gx, sum_g);
    case ffi::F16: return Dot<_Float16>(pool, view, g, x, mean, sum_gx, sum_g);
    default: return ffi::Error::InvalidArgument("jaxbn_channel_dot: unsupported dtype");
  }
}

// Both handlers take XLA's thread pool and the [outer, C, inner] view first.
auto bind_with_view() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Attr<int64_t>("outer")
      .Attr<int64_t>("channels")
      .Attr<int64_t>("inner");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxbn_channel_moments, MomentsAny,
                              bind_with_view()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxbn_channel_dot, DotAny,
                              bind_with_view()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
