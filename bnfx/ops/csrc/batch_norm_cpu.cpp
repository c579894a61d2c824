// CPU kernels of bnfx::ghost_batch_norm, and the local statistics of bnfx::sync_batch_norm,
// for contiguous float/double input [B, C, S]
// (S = product of the spatial sizes, 1 for [B, C] input). Chunk j holds samples
// [j * chunk_size, min(B, (j + 1) * chunk_size)). Each (chunk, channel) is reduced and
// normalized while its values are still in cache: the fused loop torch's own batch-norm
// kernel runs per channel, run per (chunk, channel). Spatial input accumulates each row in
// the math type (float for float) and rows in double; [B, C] input, whose chunks are a few
// rows, accumulates in the math type. Statistics come back in the math type.

#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Layout {
  int64_t batch, channels, spatial, chunk_size, nchunks;
  int64_t begin(int64_t chunk) const { return chunk * chunk_size; }
  int64_t end(int64_t chunk) const { return std::min(batch, (chunk + 1) * chunk_size); }
  double count(int64_t chunk) const { return double(end(chunk) - begin(chunk)) * spatial; }
};

Layout layout_of(const at::Tensor& input, int64_t chunk_size) {
  TORCH_CHECK(input.dim() >= 2 && input.is_contiguous(), "input must be contiguous [B, C, ...]");
  const int64_t batch = input.size(0);
  return {batch, input.size(1), input.numel() / std::max<int64_t>(batch * input.size(1), 1), chunk_size,
          (batch + chunk_size - 1) / chunk_size};
}

// Spatial rows are short: they accumulate in the input's math type, rows add up in double.
template <typename T>
double row_sum(const T* x, int64_t n) {
  at::opmath_type<T> acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += x[i];
  return acc;
}

template <typename T>
double row_centered_squares(const T* x, int64_t n, at::opmath_type<T> mean) {
  at::opmath_type<T> acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    const auto d = x[i] - mean;
    acc += d * d;
  }
  return acc;
}

// Row loops over the contiguous channels of [B, C] input, with restrict pointers so that
// they vectorize.
template <typename T, typename A>
void add_row(A* __restrict sum, const T* __restrict x, int64_t n) {
  for (int64_t c = 0; c < n; ++c) sum[c] += x[c];
}

template <typename T, typename A>
void add_centered_squares(A* __restrict squares, const T* __restrict x, const A* __restrict mean, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const A d = x[c] - mean[c];
    squares[c] += d * d;
  }
}

template <typename T, typename A>
void affine_row(T* __restrict out, const T* __restrict x, const A* __restrict scale, const A* __restrict shift,
                int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = T(x[c] * scale[c] + shift[c]);
}

template <typename T, typename A>
void add_grad_sums(A* __restrict sum_dy, A* __restrict sum_dy_xmu, const T* __restrict dy, const T* __restrict x,
                   const A* __restrict mean, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    sum_dy[c] += dy[c];
    sum_dy_xmu[c] += dy[c] * (x[c] - mean[c]);
  }
}

template <typename T, typename A>
void grad_row(T* __restrict dx, const T* __restrict dy, const T* __restrict x, const A* __restrict a,
              const A* __restrict k, const A* __restrict c0, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dx[c] = T(a[c] * dy[c] - k[c] * x[c] + c0[c]);
}

// [B, C] input: each chunk is a block of rows, whose sums accumulate in the math type.
template <typename T>
void forward_rows(const Layout& l, const T* x, const T* w, const T* b, double eps, T* out, at::opmath_type<T>* mean,
                  at::opmath_type<T>* invstd, at::opmath_type<T>* var) {
  using A = at::opmath_type<T>;
  const int64_t C = l.channels;
  at::parallel_for(0, l.nchunks, 1, [&](int64_t first, int64_t last) {
    std::vector<A> sum(C), squares(C), m(C), scale(C), shift(C);
    for (int64_t j = first; j < last; ++j) {
      const double n = l.count(j);
      std::fill(sum.begin(), sum.end(), A(0));
      std::fill(squares.begin(), squares.end(), A(0));
      for (int64_t r = l.begin(j); r < l.end(j); ++r) add_row(sum.data(), x + r * C, C);
      for (int64_t c = 0; c < C; ++c) m[c] = sum[c] / n;
      for (int64_t r = l.begin(j); r < l.end(j); ++r) add_centered_squares(squares.data(), x + r * C, m.data(), C);
      for (int64_t c = 0; c < C; ++c) {
        const double v = squares[c] / n, is = 1.0 / std::sqrt(v + eps);
        const double ws = is * (w ? double(w[c]) : 1.0);
        mean[j * C + c] = m[c];
        invstd[j * C + c] = is;
        var[j * C + c] = v * n / (n - 1);
        scale[c] = ws;
        shift[c] = (b ? double(b[c]) : 0.0) - double(m[c]) * ws;
      }
      for (int64_t r = l.begin(j); r < l.end(j); ++r) affine_row(out + r * C, x + r * C, scale.data(), shift.data(), C);
    }
  });
}

template <typename T>
void backward_rows(const Layout& l, const T* dy, const T* x, const T* w, const at::opmath_type<T>* mean,
                   const at::opmath_type<T>* invstd, T* dx, at::opmath_type<T>* sum_dy, at::opmath_type<T>* sum_dy_xmu) {
  using A = at::opmath_type<T>;
  const int64_t C = l.channels;
  at::parallel_for(0, l.nchunks, 1, [&](int64_t first, int64_t last) {
    std::vector<A> s_dy(C), s_dyx(C), fa(C), fk(C), fc(C);
    for (int64_t j = first; j < last; ++j) {
      const double n = l.count(j);
      const A* m = mean + j * C;
      std::fill(s_dy.begin(), s_dy.end(), A(0));
      std::fill(s_dyx.begin(), s_dyx.end(), A(0));
      for (int64_t r = l.begin(j); r < l.end(j); ++r) add_grad_sums(s_dy.data(), s_dyx.data(), dy + r * C, x + r * C, m, C);
      for (int64_t c = 0; c < C; ++c) {
        const double is = invstd[j * C + c];
        const double a = is * (w ? double(w[c]) : 1.0), k = s_dyx[c] / n * is * is;
        sum_dy[j * C + c] = s_dy[c];
        sum_dy_xmu[j * C + c] = s_dyx[c];
        fa[c] = a;
        fk[c] = a * k;
        fc[c] = a * (k * m[c] - s_dy[c] / n);
      }
      for (int64_t r = l.begin(j); r < l.end(j); ++r)
        grad_row(dx + r * C, dy + r * C, x + r * C, fa.data(), fk.data(), fc.data(), C);
    }
  });
}

template <typename T>
void forward_impl(const Layout& l, const T* x, const T* w, const T* b, double eps, T* out, at::opmath_type<T>* mean,
                  at::opmath_type<T>* invstd, at::opmath_type<T>* var) {
  const int64_t C = l.channels, S = l.spatial;
  at::parallel_for(0, l.nchunks * C, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t j = task / C, c = task % C;
      double sum = 0, squares = 0;
      for (int64_t r = l.begin(j); r < l.end(j); ++r) sum += row_sum(x + (r * C + c) * S, S);
      const double m = sum / l.count(j);
      for (int64_t r = l.begin(j); r < l.end(j); ++r)
        squares += row_centered_squares(x + (r * C + c) * S, S, at::opmath_type<T>(m));
      const double v = squares / l.count(j);
      const double is = 1.0 / std::sqrt(v + eps);
      mean[task] = m;
      invstd[task] = is;
      var[task] = v * l.count(j) / (l.count(j) - 1);
      const double ws = is * (w ? double(w[c]) : 1.0);
      const at::opmath_type<T> scale = ws, shift = (b ? double(b[c]) : 0.0) - m * ws;
      for (int64_t r = l.begin(j); r < l.end(j); ++r) {
        const T* xr = x + (r * C + c) * S;
        T* yr = out + (r * C + c) * S;
        for (int64_t i = 0; i < S; ++i) yr[i] = T(xr[i] * scale + shift);
      }
    }
  });
}

template <typename T>
void backward_impl(const Layout& l, const T* dy, const T* x, const T* w, const at::opmath_type<T>* mean,
                   const at::opmath_type<T>* invstd, T* dx, at::opmath_type<T>* sum_dy, at::opmath_type<T>* sum_dy_xmu) {
  const int64_t C = l.channels, S = l.spatial;
  at::parallel_for(0, l.nchunks * C, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t j = task / C, c = task % C;
      const at::opmath_type<T> m = mean[task];
      double s_dy = 0, s_dyx = 0;
      for (int64_t r = l.begin(j); r < l.end(j); ++r) {
        const T* xr = x + (r * C + c) * S;
        const T* gr = dy + (r * C + c) * S;
        at::opmath_type<T> a0 = 0, a1 = 0;
        for (int64_t i = 0; i < S; ++i) {
          a0 += gr[i];
          a1 += gr[i] * (xr[i] - m);
        }
        s_dy += a0;
        s_dyx += a1;
      }
      sum_dy[task] = s_dy;
      sum_dy_xmu[task] = s_dyx;
      const double n = l.count(j), is = invstd[task];
      const double a = is * (w ? double(w[c]) : 1.0);
      const double k = s_dyx / n * is * is;
      // dx = a (dy - mean(dy) - (x - mean) k)
      const at::opmath_type<T> fa = a, fk = a * k, fc = a * (k * mean[task] - s_dy / n);
      for (int64_t r = l.begin(j); r < l.end(j); ++r) {
        const T* xr = x + (r * C + c) * S;
        const T* gr = dy + (r * C + c) * S;
        T* dr = dx + (r * C + c) * S;
        for (int64_t i = 0; i < S; ++i) dr[i] = T(fa * gr[i] - fk * xr[i] + fc);
      }
    }
  });
}

// bnfx::sync_batch_norm's local work on contiguous input: the statistics each rank
// contributes before the all-reduce, and the input gradient once the sums are global.

// Per-channel mean and sum of squared deviations, in double, in one pass over memory: each
// spatial row is reduced twice while in cache, and rows are merged with Chan's formula.
template <typename T>
void moments_impl(const Layout& l, const T* x, double* mean, double* m2) {
  const int64_t C = l.channels, S = l.spatial;
  at::parallel_for(0, C, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      double n = 0, m = 0, q = 0;
      for (int64_t r = 0; r < l.batch; ++r) {
        const T* row = x + (r * C + c) * S;
        const double row_mean = row_sum(row, S) / S;
        const double row_m2 = row_centered_squares(row, S, at::opmath_type<T>(row_mean));
        const double delta = row_mean - m, total = n + S;
        m += delta * S / total;
        q += row_m2 + delta * delta * n * S / total;
        n = total;
      }
      mean[c] = m;
      m2[c] = q;
    }
  });
}

template <typename T>
void moments_rows(const Layout& l, const T* x, double* mean, double* m2) {
  const int64_t C = l.channels;
  for (int64_t r = 0; r < l.batch; ++r) add_row(mean, x + r * C, C);
  for (int64_t c = 0; c < C; ++c) mean[c] /= double(l.batch);
  for (int64_t r = 0; r < l.batch; ++r) add_centered_squares(m2, x + r * C, mean, C);
}

// Returns (mean, m2), [C] in double; zeros for an empty batch.
std::vector<at::Tensor> moments(const at::Tensor& input) {
  auto mean = at::zeros({input.size(1)}, input.options().dtype(at::kDouble));
  auto m2 = at::zeros_like(mean);
  if (input.size(0) == 0) return {mean, m2};
  const Layout l = layout_of(input, input.size(0));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "bnfx_moments", [&] {
    auto run = l.spatial == 1 ? moments_rows<scalar_t> : moments_impl<scalar_t>;
    run(l, input.const_data_ptr<scalar_t>(), mean.mutable_data_ptr<double>(), m2.mutable_data_ptr<double>());
  });
  return {mean, m2};
}

// grad_input = a dy - k x + c0 with per-channel coefficients [C] (in double), one pass.
at::Tensor affine_grad(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& a, const at::Tensor& k,
                       const at::Tensor& c0) {
  auto dx = at::empty_like(input);
  if (input.numel() == 0) return dx;
  const Layout l = layout_of(input, input.size(0));
  auto dy = grad_out.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "bnfx_affine_grad", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    auto fa = a.to(acc).contiguous(), fk = k.to(acc).contiguous(), fc = c0.to(acc).contiguous();
    const A *pa = fa.const_data_ptr<A>(), *pk = fk.const_data_ptr<A>(), *pc = fc.const_data_ptr<A>();
    const scalar_t *g = dy.const_data_ptr<scalar_t>(), *x = input.const_data_ptr<scalar_t>();
    scalar_t* d = dx.mutable_data_ptr<scalar_t>();
    const int64_t C = l.channels, S = l.spatial;
    if (S == 1) {
      at::parallel_for(0, l.batch, 1, [&](int64_t first, int64_t last) {
        for (int64_t r = first; r < last; ++r) grad_row(d + r * C, g + r * C, x + r * C, pa, pk, pc, C);
      });
      return;
    }
    at::parallel_for(0, l.batch * C, 1, [&](int64_t first, int64_t last) {
      for (int64_t row = first; row < last; ++row) {
        const int64_t c = row % C;
        const A a_c = pa[c], k_c = pk[c], c_c = pc[c];
        const scalar_t *gr = g + row * S, *xr = x + row * S;
        scalar_t* dr = d + row * S;
        for (int64_t i = 0; i < S; ++i) dr[i] = scalar_t(a_c * gr[i] - k_c * xr[i] + c_c);
      }
    });
  });
  return dx;
}

// Returns (out, mean, invstd, unbiased_var), statistics [nchunks, C] in the math type.
std::vector<at::Tensor> forward(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias, int64_t chunk_size, double eps) {
  const Layout l = layout_of(input, chunk_size);
  auto out = at::empty_like(input);
  at::Tensor mean, invstd, var;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "bnfx_ghost_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mean = at::empty({l.nchunks, l.channels}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    invstd = at::empty_like(mean);
    var = at::empty_like(mean);
    at::Tensor w = weight.has_value() ? weight->contiguous().to(input.scalar_type()) : at::Tensor();
    at::Tensor b = bias.has_value() ? bias->contiguous().to(input.scalar_type()) : at::Tensor();
    auto run = l.spatial == 1 ? forward_rows<scalar_t> : forward_impl<scalar_t>;
    run(l, input.const_data_ptr<scalar_t>(), w.defined() ? w.const_data_ptr<scalar_t>() : nullptr,
        b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, eps, out.mutable_data_ptr<scalar_t>(),
        mean.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
  });
  return {out, mean, invstd, var};
}

// Returns (grad_input, sum_dy, sum_dy_xmu), sums [nchunks, C] in the math type.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& input,
                                 const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                 const at::Tensor& invstd, int64_t chunk_size) {
  const Layout l = layout_of(input, chunk_size);
  auto dy = grad_out.contiguous();
  auto dx = at::empty_like(input);
  at::Tensor sum_dy, sum_dy_xmu;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "bnfx_ghost_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    auto m = mean.to(acc_type).contiguous(), is = invstd.to(acc_type).contiguous();
    sum_dy = at::empty({l.nchunks, l.channels}, input.options().dtype(acc_type));
    sum_dy_xmu = at::empty_like(sum_dy);
    at::Tensor w = weight.has_value() ? weight->contiguous().to(input.scalar_type()) : at::Tensor();
    auto run = l.spatial == 1 ? backward_rows<scalar_t> : backward_impl<scalar_t>;
    run(l, dy.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
        w.defined() ? w.const_data_ptr<scalar_t>() : nullptr, m.const_data_ptr<acc_t>(), is.const_data_ptr<acc_t>(),
        dx.mutable_data_ptr<scalar_t>(), sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xmu.mutable_data_ptr<acc_t>());
  });
  return {dx, sum_dy, sum_dy_xmu};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "ghost batch norm forward on contiguous CPU input");
  m.def("backward", &backward, "ghost batch norm backward on contiguous CPU input");
  m.def("moments", &moments, "per-channel mean and centered sum of squares of contiguous CPU input");
  m.def("affine_grad", &affine_grad, "a dy - k x + c0 with per-channel coefficients, contiguous CPU input");
}
