// The C++ math of the bnfx ops' CPU kernels (ghost_batch_norm_cpu.cpp, sync_batch_norm_cpu.cpp),
// for contiguous float/double input [B, C, S]
// (S = product of the spatial sizes, 1 for [B, C] input). Chunk j holds samples
// [j * chunk_size, min(B, (j + 1) * chunk_size)). Each (chunk, channel) is reduced and
// normalized while its values are still in cache: the fused loop torch's own batch-norm
// kernel runs per channel, run per (chunk, channel).
//
// Numerics hold for input far from zero relative to its spread (x = 1e4 + 1e-2 randn in
// float: mean / std = 1e6):
// - Statistics accumulate in double, whatever the input type, as sums shifted by one of the
//   values being reduced, p: s1 = sum(x - p), s2 = sum((x - p)^2), in one pass over memory.
//   mean = p + s1 / n and n var = s2 - s1^2 / n lose to cancellation a factor
//   (mean - p)^2 / var of double's precision, at most n since p is one of the values.
// - Outputs never form x scale + (b - mean scale), whose terms are mean / std times larger
//   than the result. The mean is split into hi = T(mean) and lo = mean - hi; x - hi is exact
//   in T near the mean (Sterbenz) and lo joins the per-channel constant:
//   y = (x - hi) scale + (b - lo scale). The backward centers on the saved mean, T(mean),
//   and recovers its lo from the data.
// Statistics come back in the math type (double for moments).

#include "batch_norm_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

struct Layout {
  int64_t batch, channels, spatial, chunk_size, nchunks;
  int64_t begin(int64_t chunk) const { return chunk * chunk_size; }
  int64_t end(int64_t chunk) const { return std::min(batch, (chunk + 1) * chunk_size); }
  double count(int64_t chunk) const { return double(end(chunk) - begin(chunk)) * spatial; }
};

void check_per_channel(const char* name, const c10::optional<at::Tensor>& t, int64_t channels) {
  TORCH_CHECK(!t.has_value() || t->numel() == channels, name, " should contain ", channels, " elements not ",
              t.has_value() ? t->numel() : 0);
}

Layout layout_of(const at::Tensor& input, int64_t chunk_size) {
  TORCH_CHECK(input.dim() >= 2 && input.is_contiguous(), "input must be contiguous [B, C, ...]");
  TORCH_CHECK(chunk_size >= 1 || input.numel() == 0, "chunk_size must be positive, got ", chunk_size);
  const int64_t batch = input.size(0);
  return {batch, input.size(1), input.numel() / std::max<int64_t>(batch * input.size(1), 1), chunk_size,
          (batch + chunk_size - 1) / chunk_size};
}

// Mean and biased variance of n values from their sums shifted by p (see the top), given
// 1 / n: [B, C] input has a few rows per chunk, and divisions would cost as much as they do.
struct Stats {
  double mean, var;
};

Stats stats_of(double inv_n, double p, double s1, double s2) {
  const double offset = s1 * inv_n;
  return {p + offset, std::max(s2 * inv_n - offset * offset, 0.0)};
}

// A mean as hi + lo, hi in the input type (lo is 0 for double input).
template <typename T>
struct Center {
  T hi;
  double lo;
  explicit Center(double mean) : hi(T(mean)), lo(mean - double(T(mean))) {}
};

// Calls add(std::integral_constant<int, K>{}, r) for groups of K rows that cover [begin,
// end): K = kMax while it fits, then halves. Reducing K rows in one pass reads and writes
// the accumulators K times less often, which is what makes double accumulation no slower
// than float accumulation row by row.
template <int kMax, typename F>
void for_row_groups(int64_t begin, int64_t end, F&& add) {
  int64_t r = begin;
  for (; r + kMax <= end; r += kMax) add(std::integral_constant<int, kMax>{}, r);
  if constexpr (kMax > 1) {
    if (r < end) for_row_groups<kMax / 2>(r, end, add);
  }
}

// The loops over values, with restrict pointers so that they vectorize.

// Shifted sums of K spatial rows `stride` apart, n values each, added to s1 and s2.
template <int K, typename T>
void add_shifted_rows(const T* __restrict x, int64_t stride, int64_t n, double p, double& s1, double& s2) {
  double a1 = 0, a2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int k = 0; k < K; ++k) {
      const double d = double(x[k * stride + i]) - p;
      a1 += d;
      a2 += d * d;
    }
  }
  s1 += a1;
  s2 += a2;
}

// Shifted sums of K rows of [B, C] input `stride` apart, n channels each, added to the
// per-channel s1 and s2.
template <int K, typename T>
void add_shifted_columns(double* __restrict s1, double* __restrict s2, const T* __restrict x, int64_t stride,
                         const T* __restrict p, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const double q = p[c];
    double a1 = 0, a2 = 0;
    for (int k = 0; k < K; ++k) {
      const double d = double(x[k * stride + c]) - q;
      a1 += d;
      a2 += d * d;
    }
    s1[c] += a1;
    s2[c] += a2;
  }
}

// A (chunk, channel block)'s statistics and normalization coefficients from its shifted sums,
// as stats_of and Center compute them, over restrict arrays: [B, C] input with small chunks has
// as many statistics as values, and this loop vectorizes only written this way.
template <typename T, typename A>
void block_coefficients(int64_t nc, double inv_n, double unbiased, double eps, const T* __restrict p,
                        const double* __restrict s1, const double* __restrict s2, const T* __restrict w,
                        const T* __restrict b, A* __restrict mean, A* __restrict invstd, A* __restrict var,
                        T* __restrict hi, A* __restrict scale, A* __restrict shift) {
  for (int64_t c = 0; c < nc; ++c) {
    const double offset = s1[c] * inv_n, m = double(p[c]) + offset;
    const double v = std::max(s2[c] * inv_n - offset * offset, 0.0);
    const T h = T(m);
    // invstd in the math type: float input takes a float square root and division (twice
    // double's lanes; the invstd returned is float either way, and torch's is computed so)
    const A is = A(1) / std::sqrt(A(v) + A(eps));
    const double ws = w ? double(is) * double(w[c]) : double(is);
    mean[c] = m;
    invstd[c] = is;
    var[c] = v * unbiased;
    hi[c] = h;
    scale[c] = ws;
    shift[c] = (b ? double(b[c]) : 0.0) - (m - double(h)) * ws;
  }
}

template <typename T, typename A>
void normalize_row(T* __restrict out, const T* __restrict x, const T* __restrict hi, const A* __restrict scale,
                   const A* __restrict shift, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = T((x[c] - hi[c]) * scale[c] + shift[c]);
}

// The backward's sums, of terms without a common offset (x - mean is exact in T near the
// mean), accumulate in the math type: over up to kGradRowsPerTotal rows of [B, C] input, K
// rows `stride` apart at a time (the accumulators stay in registers across them, as
// add_shifted_columns's do), and over a group of spatial rows; their totals in double.
template <int K, typename T, typename A>
void add_grad_columns(A* __restrict sum_dy, A* __restrict sum_dy_xmu, A* __restrict sum_xmu, const T* __restrict dy,
                      const T* __restrict x, int64_t stride, const T* __restrict mean, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    A a0 = 0, a1 = 0, a2 = 0;
    for (int k = 0; k < K; ++k) {
      const A d = x[k * stride + c] - mean[c];
      a0 += dy[k * stride + c];
      a1 += dy[k * stride + c] * d;
      a2 += d;
    }
    sum_dy[c] += a0;
    sum_dy_xmu[c] += a1;
    sum_xmu[c] += a2;
  }
}

// The same sums over K spatial rows `stride` apart, n values each.
template <int K, typename T>
void add_grad_rows(const T* __restrict dy, const T* __restrict x, int64_t stride, int64_t n, T mean, double& sum_dy,
                   double& sum_dy_xmu, double& sum_xmu) {
  using A = at::opmath_type<T>;
  A a0 = 0, a1 = 0, a2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int k = 0; k < K; ++k) {
      const A d = x[k * stride + i] - mean;
      a0 += dy[k * stride + i];
      a1 += dy[k * stride + i] * d;
      a2 += d;
    }
  }
  sum_dy += a0;
  sum_dy_xmu += a1;
  sum_xmu += a2;
}

// dx = a (dy - mean(dy) - (x - mu) invstd^2 mean(dy (x - mu))), mu the chunk's mean, as
// a dy - k (x - m) + c around the saved mean m. m is mu rounded to T: the rounding,
// lo = mu - m = mean(x - m), is recovered from the data when within an ulp of m, and
// otherwise (a mean other than the chunk's) m is taken as it is.
struct Coefficients {
  double a, k, c;
};

template <typename T>
Coefficients grad_coefficients(double inv_n, T m, double sum_xmu, double sum_dy, double sum_dy_xmu, double invstd,
                               double weight) {
  const double lo = sum_xmu * inv_n;
  const double residual = std::abs(lo) <= std::abs(double(m)) * std::numeric_limits<T>::epsilon() ? lo : 0.0;
  const double a = invstd * weight;
  const double k = a * invstd * invstd * (sum_dy_xmu - residual * sum_dy) * inv_n;
  return {a, k, k * residual - a * sum_dy * inv_n};
}

// A (chunk, channel block)'s grad_coefficients from its sums, over restrict arrays (as
// block_coefficients in the forward): [B, C] input with small chunks has as many coefficients
// as values, and only this form vectorizes. Also stores the sums the op returns.
template <typename T, typename A, typename S>
void block_grad_coefficients(int64_t nc, double inv_n, const T* __restrict m, const S* __restrict s_x,
                             const S* __restrict s_dy, const S* __restrict s_dyx, const A* __restrict invstd,
                             const T* __restrict w, A* __restrict sum_dy, A* __restrict sum_dy_xmu, A* __restrict fa,
                             A* __restrict fk, A* __restrict fc) {
  const double ulp = std::numeric_limits<T>::epsilon();
  for (int64_t c = 0; c < nc; ++c) {
    const double lo = s_x[c] * inv_n, is = invstd[c], dy = s_dy[c];
    const double residual = std::abs(lo) <= std::abs(double(m[c])) * ulp ? lo : 0.0;
    const double a = w ? is * double(w[c]) : is;
    const double k = a * is * is * (s_dyx[c] - residual * dy) * inv_n;
    sum_dy[c] = s_dy[c];
    sum_dy_xmu[c] = s_dyx[c];
    fa[c] = a;
    fk[c] = k;
    fc[c] = k * residual - a * dy * inv_n;
  }
}

template <typename A>
void add_to_totals(int64_t nc, double* __restrict t_dy, double* __restrict t_dyx, double* __restrict t_x,
                   A* __restrict s_dy, A* __restrict s_dyx, A* __restrict s_x) {
  for (int64_t c = 0; c < nc; ++c) {
    t_dy[c] += s_dy[c];
    t_dyx[c] += s_dyx[c];
    t_x[c] += s_x[c];
    s_dy[c] = s_dyx[c] = s_x[c] = 0;
  }
}

// dx = a dy - k (x - center) + c0, per-channel coefficients; center 0 unless kCentered.
template <bool kCentered = true, typename T, typename A>
void grad_row(T* __restrict dx, const T* __restrict dy, const T* __restrict x, const T* __restrict center,
              const A* __restrict a, const A* __restrict k, const A* __restrict c0, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dx[c] = T(a[c] * dy[c] - k[c] * (kCentered ? x[c] - center[c] : x[c]) + c0[c]);
}

// [B, C] input: each chunk is a block of rows, reduced and normalized in blocks of channels
// whose accumulators stay in L1, shifted by the chunk's first row.
constexpr int64_t kChannelBlock = 256;

int64_t channel_blocks(int64_t channels) { return (channels + kChannelBlock - 1) / kChannelBlock; }

// Values a thread takes at least: the grain torch's own kernels use (ATen's internal
// GRAIN_SIZE, not part of its API, so stated here).
constexpr int64_t kGrainValues = 32768;

// at::parallel_for over tasks of about `values_per_task` values each, kGrainValues values per
// thread at least: small layers run on the calling thread, since waking the pool costs more
// than their whole kernel.
template <typename F>
void parallel_tasks(int64_t ntasks, int64_t values_per_task, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(values_per_task, 1));
  at::parallel_for(0, ntasks, grain, f);
}

template <typename T>
void forward_rows(const Layout& l, const T* x, const T* w, const T* b, double eps, T* out, at::opmath_type<T>* mean,
                  at::opmath_type<T>* invstd, at::opmath_type<T>* var) {
  using A = at::opmath_type<T>;
  const int64_t C = l.channels, nblocks = channel_blocks(C);
  parallel_tasks(l.nchunks * nblocks, l.chunk_size * std::min(C, kChannelBlock), [&](int64_t first, int64_t last) {
    double s1[kChannelBlock], s2[kChannelBlock];
    T hi[kChannelBlock];
    A scale[kChannelBlock], shift[kChannelBlock];
    for (int64_t task = first; task < last; ++task) {
      const int64_t j = task / nblocks, c0 = task % nblocks * kChannelBlock, nc = std::min(kChannelBlock, C - c0);
      const double n = l.count(j), inv_n = 1.0 / n, unbiased = n / (n - 1);
      const T *xb = x + c0, *p = xb + l.begin(j) * C;
      std::fill(s1, s1 + nc, 0.0);
      std::fill(s2, s2 + nc, 0.0);
      for_row_groups<8>(l.begin(j), l.end(j), [&](auto k, int64_t r) {
        add_shifted_columns<decltype(k)::value>(s1, s2, xb + r * C, C, p, nc);
      });
      block_coefficients(nc, inv_n, unbiased, eps, p, s1, s2, w ? w + c0 : nullptr, b ? b + c0 : nullptr,
                         mean + j * C + c0, invstd + j * C + c0, var + j * C + c0, hi, scale, shift);
      for (int64_t r = l.begin(j); r < l.end(j); ++r) normalize_row(out + c0 + r * C, xb + r * C, hi, scale, shift, nc);
    }
  });
}

// The backward's [B, C] sums run in the math type over this many rows at most, then join
// double totals: a chunk of channels-last input is thousands of rows, and a float sum over
// all of them would lose digits that the spatial path's double totals keep.
constexpr int64_t kGradRowsPerTotal = 64;

template <typename T>
void backward_rows(const Layout& l, const T* dy, const T* x, const T* w, const at::opmath_type<T>* mean,
                   const at::opmath_type<T>* invstd, T* dx, at::opmath_type<T>* sum_dy, at::opmath_type<T>* sum_dy_xmu) {
  using A = at::opmath_type<T>;
  const int64_t C = l.channels, nblocks = channel_blocks(C);
  parallel_tasks(l.nchunks * nblocks, l.chunk_size * std::min(C, kChannelBlock), [&](int64_t first, int64_t last) {
    T m[kChannelBlock];
    A s_dy[kChannelBlock], s_dyx[kChannelBlock], s_x[kChannelBlock], fa[kChannelBlock], fk[kChannelBlock],
        fc[kChannelBlock];
    double t_dy[kChannelBlock], t_dyx[kChannelBlock], t_x[kChannelBlock];
    for (int64_t task = first; task < last; ++task) {
      const int64_t j = task / nblocks, c0 = task % nblocks * kChannelBlock, nc = std::min(kChannelBlock, C - c0);
      const double inv_n = 1.0 / l.count(j);
      for (int64_t c = 0; c < nc; ++c) {
        m[c] = T(mean[j * C + c0 + c]);
        s_dy[c] = s_dyx[c] = s_x[c] = 0;
      }
      auto add_rows = [&](int64_t begin, int64_t end) {
        for_row_groups<8>(begin, end, [&](auto k, int64_t r) {
          add_grad_columns<decltype(k)::value>(s_dy, s_dyx, s_x, dy + c0 + r * C, x + c0 + r * C, C, m, nc);
        });
      };
      const T* w_block = w ? w + c0 : nullptr;
      if (l.end(j) - l.begin(j) <= kGradRowsPerTotal) {  // small chunks: the sums as they are
        add_rows(l.begin(j), l.end(j));
        block_grad_coefficients(nc, inv_n, m, s_x, s_dy, s_dyx, invstd + j * C + c0, w_block, sum_dy + j * C + c0,
                                sum_dy_xmu + j * C + c0, fa, fk, fc);
      } else {
        std::fill(t_dy, t_dy + nc, 0.0);
        std::fill(t_dyx, t_dyx + nc, 0.0);
        std::fill(t_x, t_x + nc, 0.0);
        for (int64_t r0 = l.begin(j); r0 < l.end(j); r0 += kGradRowsPerTotal) {
          add_rows(r0, std::min(l.end(j), r0 + kGradRowsPerTotal));
          add_to_totals(nc, t_dy, t_dyx, t_x, s_dy, s_dyx, s_x);  // and zeroes the sums
        }
        block_grad_coefficients(nc, inv_n, m, t_x, t_dy, t_dyx, invstd + j * C + c0, w_block, sum_dy + j * C + c0,
                                sum_dy_xmu + j * C + c0, fa, fk, fc);
      }
      for (int64_t r = l.begin(j); r < l.end(j); ++r)
        grad_row(dx + c0 + r * C, dy + c0 + r * C, x + c0 + r * C, m, fa, fk, fc, nc);
    }
  });
}

// Spatial input: one task per (chunk, channel), its rows of S values strided by C S.
template <typename T>
void forward_impl(const Layout& l, const T* x, const T* w, const T* b, double eps, T* out, at::opmath_type<T>* mean,
                  at::opmath_type<T>* invstd, at::opmath_type<T>* var) {
  using A = at::opmath_type<T>;
  const int64_t C = l.channels, S = l.spatial;
  parallel_tasks(l.nchunks * C, l.chunk_size * S, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t j = task / C, c = task % C;
      const double n = l.count(j), p = S > 0 ? double(x[(l.begin(j) * C + c) * S]) : 0.0;
      double s1 = 0, s2 = 0;
      for_row_groups<4>(l.begin(j), l.end(j), [&](auto k, int64_t r) {
        add_shifted_rows<decltype(k)::value>(x + (r * C + c) * S, C * S, S, p, s1, s2);
      });
      const Stats s = stats_of(1.0 / n, p, s1, s2);
      const Center<T> center(s.mean);
      const double is = 1.0 / std::sqrt(s.var + eps), ws = is * (w ? double(w[c]) : 1.0);
      mean[task] = s.mean;
      invstd[task] = is;
      var[task] = s.var * n / (n - 1);
      const T hi = center.hi;
      const A scale = ws, shift = (b ? double(b[c]) : 0.0) - center.lo * ws;
      for (int64_t r = l.begin(j); r < l.end(j); ++r) {
        const T* __restrict xr = x + (r * C + c) * S;
        T* __restrict yr = out + (r * C + c) * S;
        for (int64_t i = 0; i < S; ++i) yr[i] = T((xr[i] - hi) * scale + shift);
      }
    }
  });
}

template <typename T>
void backward_impl(const Layout& l, const T* dy, const T* x, const T* w, const at::opmath_type<T>* mean,
                   const at::opmath_type<T>* invstd, T* dx, at::opmath_type<T>* sum_dy, at::opmath_type<T>* sum_dy_xmu) {
  using A = at::opmath_type<T>;
  const int64_t C = l.channels, S = l.spatial;
  parallel_tasks(l.nchunks * C, l.chunk_size * S, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t j = task / C, c = task % C;
      const T m = T(mean[task]);
      double s_dy = 0, s_dyx = 0, s_x = 0;
      for_row_groups<4>(l.begin(j), l.end(j), [&](auto k, int64_t r) {
        add_grad_rows<decltype(k)::value>(dy + (r * C + c) * S, x + (r * C + c) * S, C * S, S, m, s_dy, s_dyx, s_x);
      });
      sum_dy[task] = s_dy;
      sum_dy_xmu[task] = s_dyx;
      const Coefficients k =
          grad_coefficients<T>(1.0 / l.count(j), m, s_x, s_dy, s_dyx, invstd[task], w ? double(w[c]) : 1.0);
      const A fa = k.a, fk = k.k, fc = k.c;
      for (int64_t r = l.begin(j); r < l.end(j); ++r) {
        const T* __restrict xr = x + (r * C + c) * S;
        const T* __restrict gr = dy + (r * C + c) * S;
        T* __restrict dr = dx + (r * C + c) * S;
        for (int64_t i = 0; i < S; ++i) dr[i] = T(fa * gr[i] - fk * (xr[i] - m) + fc);
      }
    }
  });
}

// bnfx::sync_batch_norm's local work on contiguous input: the statistics each rank
// contributes before the all-reduce, and the input gradient once the sums are global.

// Per-channel mean and sum of squared deviations, in double, in one pass over memory,
// shifted by the channel's first value.
template <typename T>
void moments_impl(const Layout& l, const T* x, double* mean, double* m2) {
  const int64_t C = l.channels, S = l.spatial;
  const double n = double(l.batch) * S;
  parallel_tasks(C, l.batch * S, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const double p = x[c * S];
      double s1 = 0, s2 = 0;
      for_row_groups<4>(0, l.batch, [&](auto k, int64_t r) {
        add_shifted_rows<decltype(k)::value>(x + (r * C + c) * S, C * S, S, p, s1, s2);
      });
      const Stats s = stats_of(1.0 / n, p, s1, s2);
      mean[c] = s.mean;
      m2[c] = s.var * n;
    }
  });
}

template <typename T>
void moments_rows(const Layout& l, const T* x, double* mean, double* m2) {
  const int64_t C = l.channels;
  const double n = double(l.batch);
  parallel_tasks(channel_blocks(C), l.batch * std::min(C, kChannelBlock), [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      const int64_t c0 = block * kChannelBlock, nc = std::min(kChannelBlock, C - c0);
      const T* p = x + c0;
      for_row_groups<8>(0, l.batch, [&](auto k, int64_t r) {
        add_shifted_columns<decltype(k)::value>(mean + c0, m2 + c0, p + r * C, C, p, nc);
      });
      for (int64_t c = 0; c < nc; ++c) {
        const Stats s = stats_of(1.0 / n, p[c], mean[c0 + c], m2[c0 + c]);
        mean[c0 + c] = s.mean;
        m2[c0 + c] = s.var * n;
      }
    }
  });
}

}  // namespace

namespace bnfx_cpu {

// Fills mean and m2 [C] (double); zeros for an empty batch.
void moments(const at::Tensor& input, std::vector<double>& mean, std::vector<double>& m2) {
  mean.assign(input.size(1), 0.0);
  m2.assign(input.size(1), 0.0);
  if (input.numel() == 0) return;
  const Layout l = layout_of(input, input.size(0));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "bnfx_moments", [&] {
    auto run = l.spatial == 1 ? moments_rows<scalar_t> : moments_impl<scalar_t>;
    run(l, input.const_data_ptr<scalar_t>(), mean.data(), m2.data());
  });
}

template <bool kCentered, typename T>
void affine_grad_impl(const Layout& l, const T* dy, const T* x, const T* hi, const at::opmath_type<T>* a,
                      const at::opmath_type<T>* k, const at::opmath_type<T>* c0, T* dx) {
  using A = at::opmath_type<T>;
  const int64_t C = l.channels, S = l.spatial;
  if (S == 1) {
    parallel_tasks(l.batch, C, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) grad_row<kCentered>(dx + r * C, dy + r * C, x + r * C, hi, a, k, c0, C);
    });
    return;
  }
  parallel_tasks(l.batch * C, S, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const int64_t c = row % C;
      const T h = hi[c];
      const A a_c = a[c], k_c = k[c], c_c = c0[c];
      const T *__restrict gr = dy + row * S, *__restrict xr = x + row * S;
      T* __restrict dr = dx + row * S;
      for (int64_t i = 0; i < S; ++i) dr[i] = T(a_c * gr[i] - k_c * (kCentered ? xr[i] - h : xr[i]) + c_c);
    }
  });
}

// grad_input = a dy - k x + c0 with per-channel coefficients [C], one pass. Given the mean
// [C] (in double, which keeps the digits that T(mean) drops), the centered form
// a dy - k (x - mean) + c0 instead, where no term grows with mean / std.
at::Tensor affine_grad(const at::Tensor& grad_out, const at::Tensor& input, const std::vector<double>& a,
                       const std::vector<double>& k, const std::vector<double>& c0, const std::vector<double>* mean) {
  auto dx = at::empty_like(input);
  if (input.numel() == 0) return dx;
  const Layout l = layout_of(input, input.size(0));
  const int64_t C = l.channels;
  TORCH_CHECK(int64_t(a.size()) == C && int64_t(k.size()) == C && int64_t(c0.size()) == C &&
                  (mean == nullptr || int64_t(mean->size()) == C),
              "a, k, c0 and mean must have one value per channel (", C, ")");
  auto dy = grad_out.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "bnfx_affine_grad", [&] {
    using A = at::opmath_type<scalar_t>;
    std::vector<A> fa(C), fk(C), fc(C);
    std::vector<scalar_t> hi(C, scalar_t(0));
    for (int64_t c = 0; c < C; ++c) {
      fa[c] = A(a[c]);
      fk[c] = A(k[c]);
      fc[c] = A(c0[c]);
      if (mean != nullptr) {
        const Center<scalar_t> center((*mean)[c]);
        hi[c] = center.hi;
        fc[c] = A(c0[c] + k[c] * center.lo);
      }
    }
    auto run = mean != nullptr ? affine_grad_impl<true, scalar_t> : affine_grad_impl<false, scalar_t>;
    run(l, dy.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), hi.data(), fa.data(), fk.data(),
        fc.data(), dx.mutable_data_ptr<scalar_t>());
  });
  return dx;
}

// out = (x - mean) scale + shift with per-channel mean (double), scale and shift [C]: sync
// batch norm's normalization with the group's statistics. The mean is split as in the ghost
// forward, y = (x - hi) scale + (shift - lo scale), so no term grows with mean / std.
at::Tensor normalize(const at::Tensor& input, const std::vector<double>& mean, const std::vector<double>& scale,
                     const std::vector<double>& shift) {
  auto out = at::empty_like(input);
  if (input.numel() == 0) return out;
  const Layout l = layout_of(input, input.size(0));
  const int64_t C = l.channels, S = l.spatial;
  TORCH_CHECK(int64_t(mean.size()) == C && int64_t(scale.size()) == C && int64_t(shift.size()) == C,
              "mean, scale and shift must have one value per channel (", C, ")");
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "bnfx_normalize", [&] {
    using A = at::opmath_type<scalar_t>;
    std::vector<scalar_t> hi(C);
    std::vector<A> fs(C), fb(C);
    for (int64_t c = 0; c < C; ++c) {
      const Center<scalar_t> center(mean[c]);
      hi[c] = center.hi;
      fs[c] = A(scale[c]);
      fb[c] = A(shift[c] - center.lo * scale[c]);
    }
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    if (S == 1) {
      parallel_tasks(l.batch, C, [&](int64_t first, int64_t last) {
        for (int64_t r = first; r < last; ++r) normalize_row(y + r * C, x + r * C, hi.data(), fs.data(), fb.data(), C);
      });
      return;
    }
    parallel_tasks(l.batch * C, S, [&](int64_t first, int64_t last) {
      for (int64_t row = first; row < last; ++row) {
        const int64_t c = row % C;
        const scalar_t h = hi[c];
        const A s_c = fs[c], b_c = fb[c];
        const scalar_t* __restrict xr = x + row * S;
        scalar_t* __restrict yr = y + row * S;
        for (int64_t i = 0; i < S; ++i) yr[i] = scalar_t((xr[i] - h) * s_c + b_c);
      }
    });
  });
  return out;
}

// Returns (out, mean, invstd, unbiased_var), statistics [nchunks, C] in the math type.
std::vector<at::Tensor> forward(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias, int64_t chunk_size, double eps) {
  const Layout l = layout_of(input, chunk_size);
  // the op checked these (op_support_cpu.h); checked again before any pointer arithmetic
  check_per_channel("weight", weight, l.channels);
  check_per_channel("bias", bias, l.channels);
  auto out = at::empty_like(input);
  at::Tensor mean, invstd, var;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "bnfx_ghost_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mean = at::empty({l.nchunks, l.channels}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    invstd = at::empty_like(mean);
    var = at::empty_like(mean);
    at::Tensor w = weight.has_value() ? as_type(*weight, input.scalar_type()).contiguous() : at::Tensor();
    at::Tensor b = bias.has_value() ? as_type(*bias, input.scalar_type()).contiguous() : at::Tensor();
    auto run = l.spatial == 1 ? forward_rows<scalar_t> : forward_impl<scalar_t>;
    run(l, input.const_data_ptr<scalar_t>(), w.defined() ? w.const_data_ptr<scalar_t>() : nullptr,
        b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, eps, out.mutable_data_ptr<scalar_t>(),
        mean.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
  });
  return {out, mean, invstd, var};
}

// Returns (grad_input, sum_dy, sum_dy_xmu), sums [nchunks, C] in the math type, centered on
// the mean given (the saved one).
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& input,
                                 const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                 const at::Tensor& invstd, int64_t chunk_size) {
  const Layout l = layout_of(input, chunk_size);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "grad_out must have the input's shape");
  TORCH_CHECK(mean.numel() == l.nchunks * l.channels && invstd.numel() == l.nchunks * l.channels,
              "saved statistics must have one value per chunk and channel (", l.nchunks, " x ", l.channels, ")");
  check_per_channel("weight", weight, l.channels);
  auto dy = grad_out.contiguous();
  auto dx = at::empty_like(input);
  at::Tensor sum_dy, sum_dy_xmu;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "bnfx_ghost_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    auto m = as_type(mean, acc_type).contiguous(), is = as_type(invstd, acc_type).contiguous();
    sum_dy = at::empty({l.nchunks, l.channels}, input.options().dtype(acc_type));
    sum_dy_xmu = at::empty_like(sum_dy);
    at::Tensor w = weight.has_value() ? as_type(*weight, input.scalar_type()).contiguous() : at::Tensor();
    auto run = l.spatial == 1 ? backward_rows<scalar_t> : backward_impl<scalar_t>;
    run(l, dy.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
        w.defined() ? w.const_data_ptr<scalar_t>() : nullptr, m.const_data_ptr<acc_t>(), is.const_data_ptr<acc_t>(),
        dx.mutable_data_ptr<scalar_t>(), sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xmu.mutable_data_ptr<acc_t>());
  });
  return {dx, sum_dy, sum_dy_xmu};
}

// ``scale`` times the values of a tensor of any floating type, as double: small per-channel
// arithmetic in plain loops, not in tensor ops, which cost more than it does.
std::vector<double> scaled_values(const at::Tensor& t, double scale) {
  const auto values = t.contiguous();
  std::vector<double> out(values.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "bnfx_scaled_values", [&] {
    const scalar_t* p = values.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = scale * double(p[i]);
  });
  return out;
}

// A new tensor of ``like``'s shape, dtype and device holding ``values``.
at::Tensor tensor_like(const at::Tensor& like, const std::vector<double>& values) {
  return tensor_of(values, like.sizes(), like.options());
}

// A new contiguous tensor of ``sizes`` and ``options`` holding ``values``.
at::Tensor tensor_of(const std::vector<double>& values, at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
  TORCH_CHECK(t.numel() == int64_t(values.size()), "tensor_of: ", values.size(), " values for ", t.numel(),
              " elements");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "bnfx_tensor_like", [&] {
    scalar_t* p = t.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < values.size(); ++i) p[i] = scalar_t(values[i]);
  });
  return t;
}

// grad_weight += sum_dy_xmu_j invstd_j and grad_bias += sum_dy_j over the rows j of [n, C]
// sums, through restrict pointers (as add_weighted_rows).
template <typename T>
void add_affine_rows(double* __restrict grad_weight, double* __restrict grad_bias, const T* __restrict sum_dy,
                     const T* __restrict sum_dy_xmu, const T* __restrict invstd, int64_t n, int64_t channels) {
  for (int64_t j = 0; j < n; ++j) {
    const T *__restrict dy = sum_dy + j * channels, *__restrict dyx = sum_dy_xmu + j * channels;
    const T* __restrict is = invstd + j * channels;
    for (int64_t c = 0; c < channels; ++c) {
      grad_weight[c] += double(dyx[c]) * double(is[c]);
      grad_bias[c] += double(dy[c]);
    }
  }
}

// mean += w_j means_j and var += w_j vars_j over the rows j of [n, C] statistics, row by row
// (each read once, in order), through restrict pointers so that the loop vectorizes: [B, C]
// input with small chunks has as many statistics as values.
template <typename T>
void add_weighted_rows(double* __restrict mean, double* __restrict var, const T* __restrict means,
                       const T* __restrict vars, const double* __restrict weight, int64_t n, int64_t channels) {
  for (int64_t j = 0; j < n; ++j) {
    const double w = weight[j];
    const T* __restrict mj = means + j * channels;
    const T* __restrict vj = vars + j * channels;
    for (int64_t c = 0; c < channels; ++c) {
      mean[c] += w * double(mj[c]);
      var[c] += w * double(vj[c]);
    }
  }
}

// Composer's running-statistics updates, one per chunk in order with momentum / nchunks, in
// closed form and in double: chunk j weighs f (1 - f)^(n - 1 - j) with f = momentum / n, the
// old value (1 - f)^n. Without momentum each chunk is one batch of the cumulative average after
// the num_batches_tracked batches before. Returns (new_running_mean, new_running_var) in the
// running statistics' dtype: the default body's arithmetic, without its dozen small ops.
std::vector<at::Tensor> running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                      const at::Tensor& means, const at::Tensor& unbiased_vars,
                                      c10::optional<double> momentum,
                                      const c10::optional<at::Tensor>& num_batches_tracked) {
  const int64_t n = means.size(0), channels = means.size(1);
  std::vector<double> chunk_weight(n);
  double keep;
  if (momentum.has_value()) {
    const double f = *momentum / n;
    keep = std::pow(1.0 - f, n);
    for (int64_t j = 0; j < n; ++j) chunk_weight[j] = f * std::pow(1.0 - f, n - 1 - j);
  } else {
    TORCH_CHECK(num_batches_tracked.has_value(), "momentum=None (cumulative average) needs num_batches_tracked");
    const double seen = num_batches_tracked->item<double>(), total = seen + n;
    keep = seen / total;
    std::fill(chunk_weight.begin(), chunk_weight.end(), 1.0 / total);
  }
  std::vector<double> new_mean = scaled_values(running_mean, keep), new_var = scaled_values(running_var, keep);
  TORCH_CHECK(int64_t(new_mean.size()) == channels && int64_t(new_var.size()) == channels,
              "running statistics must have one value per channel (", channels, ")");
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "bnfx_running_stats", [&] {
    auto m = means.contiguous(), v = as_type(unbiased_vars, means.scalar_type()).contiguous();
    add_weighted_rows(new_mean.data(), new_var.data(), m.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                      chunk_weight.data(), n, channels);
  });
  return {tensor_like(running_mean, new_mean), tensor_like(running_var, new_var)};
}

// grad_weight = sum_j sum_dy_xmu_j invstd_j and grad_bias = sum_j sum_dy_j over the chunks' [n, C]
// sums, accumulated in double, in ``weight``'s dtype.
std::vector<at::Tensor> affine_grads(const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, const at::Tensor& invstd,
                                     const at::Tensor& weight) {
  const int64_t n = sum_dy.size(0), channels = sum_dy.size(1);
  std::vector<double> grad_weight(channels, 0.0), grad_bias(channels, 0.0);
  AT_DISPATCH_FLOATING_TYPES(sum_dy.scalar_type(), "bnfx_affine_grads", [&] {
    const auto type = sum_dy.scalar_type();
    auto dy = sum_dy.contiguous(), dyx = as_type(sum_dy_xmu, type).contiguous();
    auto is = as_type(invstd, type).contiguous();
    add_affine_rows(grad_weight.data(), grad_bias.data(), dy.const_data_ptr<scalar_t>(),
                    dyx.const_data_ptr<scalar_t>(), is.const_data_ptr<scalar_t>(), n, channels);
  });
  return {tensor_like(weight, grad_weight), tensor_like(weight, grad_bias)};
}

}  // namespace bnfx_cpu
