// The C++ math (batch_norm_cpu.cpp) the ops' CPU kernels (ghost_batch_norm_cpu.cpp,
// sync_batch_norm_cpu.cpp) compute with.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace bnfx_cpu {

// ``t`` as ``type``: ``t`` itself, with no dispatch, where it already is.
inline at::Tensor as_type(const at::Tensor& t, at::ScalarType type) {
  return t.scalar_type() == type ? t : t.to(type);
}

// Ghost batch norm on contiguous float/double input [B, C, ...], chunks of chunk_size samples.
// Returns (out, mean, invstd, unbiased_var), statistics [nchunks, C] in the math type.
std::vector<at::Tensor> forward(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, int64_t chunk_size, double eps);
// Returns (grad_input, sum_dy, sum_dy_xmu), sums [nchunks, C] in the math type.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& input,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                 const at::Tensor& invstd, int64_t chunk_size);
// Composer's running statistics after the chunks' (mean, unbiased_var) [nchunks, C].
std::vector<at::Tensor> running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                      const at::Tensor& means, const at::Tensor& unbiased_vars,
                                      std::optional<double> momentum,
                                      const std::optional<at::Tensor>& num_batches_tracked);

// A new contiguous tensor of ``sizes`` and ``options`` (any floating dtype) holding ``values``.
at::Tensor tensor_of(const std::vector<double>& values, at::IntArrayRef sizes, const at::TensorOptions& options);
// A new tensor of ``like``'s shape, dtype and device holding ``values``.
at::Tensor tensor_like(const at::Tensor& like, const std::vector<double>& values);

// ``scale`` times the values of a tensor of any floating type, as double.
std::vector<double> scaled_values(const at::Tensor& t, double scale);

// The weight and bias gradients from the chunks' sums: (grad_weight, grad_bias) in weight's dtype.
std::vector<at::Tensor> affine_grads(const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, const at::Tensor& invstd,
                                     const at::Tensor& weight);

// bnfx::sync_batch_norm's local work, per-channel values [C] in double.
void moments(const at::Tensor& input, std::vector<double>& mean, std::vector<double>& m2);
at::Tensor normalize(const at::Tensor& input, const std::vector<double>& mean, const std::vector<double>& scale,
                     const std::vector<double>& shift);
// ``mean``: the saved mean, or nullptr for the uncentered form.
at::Tensor affine_grad(const at::Tensor& grad_out, const at::Tensor& input, const std::vector<double>& a,
                       const std::vector<double>& k, const std::vector<double>& c0, const std::vector<double>* mean);

}  // namespace bnfx_cpu
