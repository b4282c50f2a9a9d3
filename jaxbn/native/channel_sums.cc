// Per-channel reductions for batch norm as XLA FFI CPU kernels.
//
// Every array is viewed as [outer, C, inner] (row-major) and reduced over outer and inner,
// leaving one value per channel c: NHWC activations are [N*H*W, C, 1], NCL ones [N, C, L].
//
//   jaxbn_channel_moments(x)         -> mean[C], m2[C]        m2 = Σ (x - mean)²
//   jaxbn_channel_dot(g, x, mean)    -> Σ g·(x - mean)[C], Σ g[C]
//
// Why by hand: XLA:CPU's reduction fusions materialize `x - mean` (and a half-to-float convert)
// before reducing and take the two sums in separate passes. Here each kernel reads its inputs
// once, in their own dtype (float32, bfloat16 or float16), and sums in float.
//
// Accuracy: values are summed in float over blocks of 32 rows and the block sums in double;
// the moments are taken around a per-channel shift (the channel's first value), so
// `randn + 1e4` in float32 still gives var ≈ 1 without a second pass over x.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockRows = 32;  // rows summed in float before adding into double

inline float to_float(float v) { return v; }
inline float to_float(_Float16 v) { return static_cast<float>(v); }
struct BFloat16 {
  uint16_t bits;
};
inline float to_float(BFloat16 v) {  // bfloat16 is the high half of a float32
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

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

// Sums two per-channel series over [outer, C, inner]: s1[c] += a(i), s2[c] += b(i), where
// term(c, offset, &a, &b) gives both terms for element offset of channel c. Splits the work
// over outer when it is long, else over channels; returns the totals in double.
template <typename Term>
void channel_sums(ffi::ThreadPool& pool, int64_t outer, int64_t C, int64_t inner,
                  const Term& term, std::vector<double>& s1, std::vector<double>& s2) {
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
      // Channels innermost: vectorize across channels, rows in float blocks.
      std::vector<float> b1(C), b2(C);
      for (int64_t o = o_lo; o < o_hi; o += kBlockRows) {
        std::fill(b1.begin() + c_lo, b1.begin() + c_hi, 0.0f);
        std::fill(b2.begin() + c_lo, b2.begin() + c_hi, 0.0f);
        const int64_t end = std::min(o_hi, o + kBlockRows);
        for (int64_t r = o; r < end; ++r) {
          const int64_t base = r * C;
          for (int64_t c = c_lo; c < c_hi; ++c) {
            float a, b;
            term(c, base + c, a, b);
            b1[c] += a;
            b2[c] += b;
          }
        }
        for (int64_t c = c_lo; c < c_hi; ++c) {
          d1[c] += b1[c];
          d2[c] += b2[c];
        }
      }
    } else {
      // Each (row, channel) is a contiguous run of `inner` values.
      for (int64_t o = o_lo; o < o_hi; ++o) {
        for (int64_t c = c_lo; c < c_hi; ++c) {
          const int64_t base = (o * C + c) * inner;
          for (int64_t i0 = 0; i0 < inner; i0 += kBlockRows * 8) {
            const int64_t end = std::min(inner, i0 + kBlockRows * 8);
            float b1 = 0.0f, b2 = 0.0f;
            for (int64_t i = i0; i < end; ++i) {
              float a, b;
              term(c, base + i, a, b);
              b1 += a;
              b2 += b;
            }
            d1[c] += b1;
            d2[c] += b2;
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

template <typename T>
ffi::Error Moments(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> mean,
                   ffi::Result<ffi::AnyBuffer> m2) {
  const auto dims = x.dimensions();
  const int64_t outer = dims[0], C = dims[1], inner = dims[2];
  const T* xp = reinterpret_cast<const T*>(x.untyped_data());
  std::vector<float> shift(C, 0.0f);
  if (outer * inner > 0) {
    // An infinite shift would turn x - shift into inf - inf: use 0 there instead, so an
    // infinite value gives an infinite mean as the two-pass formula does.
    for (int64_t c = 0; c < C; ++c) {
      const float first = to_float(xp[c * inner]);
      shift[c] = std::isfinite(first) ? first : 0.0f;
    }
  }
  const float* sp = shift.data();
  std::vector<double> s1, s2;
  channel_sums(
      pool, outer, C, inner,
      [xp, sp](int64_t c, int64_t i, float& a, float& b) {
        const float v = to_float(xp[i]) - sp[c];
        a = v;
        b = v * v;
      },
      s1, s2);
  const double n = static_cast<double>(outer) * static_cast<double>(inner);
  float* mean_out = reinterpret_cast<float*>(mean->untyped_data());
  float* m2_out = reinterpret_cast<float*>(m2->untyped_data());
  for (int64_t c = 0; c < C; ++c) {
    const double offset = n > 0 ? s1[c] / n : 0.0;
    mean_out[c] = static_cast<float>(sp[c] + offset);
    const double m2_value = s2[c] - s1[c] * offset;
    m2_out[c] = static_cast<float>(m2_value < 0.0 ? 0.0 : m2_value);  // keeps NaN
  }
  return ffi::Error::Success();
}

template <typename T>
ffi::Error Dot(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer x,
               ffi::Buffer<ffi::F32> mean, ffi::Result<ffi::AnyBuffer> sum_gx,
               ffi::Result<ffi::AnyBuffer> sum_g) {
  const auto dims = x.dimensions();
  const int64_t outer = dims[0], C = dims[1], inner = dims[2];
  const T* gp = reinterpret_cast<const T*>(g.untyped_data());
  const T* xp = reinterpret_cast<const T*>(x.untyped_data());
  const float* mp = mean.typed_data();
  std::vector<double> s1, s2;
  channel_sums(
      pool, outer, C, inner,
      [gp, xp, mp](int64_t c, int64_t i, float& a, float& b) {
        const float gv = to_float(gp[i]);
        a = gv * (to_float(xp[i]) - mp[c]);
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

ffi::Error MomentsAny(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> mean,
                      ffi::Result<ffi::AnyBuffer> m2) {
  switch (x.element_type()) {
    case ffi::F32: return Moments<float>(pool, x, mean, m2);
    case ffi::BF16: return Moments<BFloat16>(pool, x, mean, m2);
    case ffi::F16: return Moments<_Float16>(pool, x, mean, m2);
    default: return ffi::Error::InvalidArgument("jaxbn_channel_moments: unsupported dtype");
  }
}

ffi::Error DotAny(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer x,
                  ffi::Buffer<ffi::F32> mean, ffi::Result<ffi::AnyBuffer> sum_gx,
                  ffi::Result<ffi::AnyBuffer> sum_g) {
  if (g.element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("jaxbn_channel_dot: g and x differ in dtype");
  }
  switch (x.element_type()) {
    case ffi::F32: return Dot<float>(pool, g, x, mean, sum_gx, sum_g);
    case ffi::BF16: return Dot<BFloat16>(pool, g, x, mean, sum_gx, sum_g);
    case ffi::F16: return Dot<_Float16>(pool, g, x, mean, sum_gx, sum_g);
    default: return ffi::Error::InvalidArgument("jaxbn_channel_dot: unsupported dtype");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxbn_channel_moments, MomentsAny,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxbn_channel_dot, DotAny,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
