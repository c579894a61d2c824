// bnfx::ghost_batch_norm on CPU tensors: its CPU kernels (forward and backward, what the
// dispatcher runs below autograd) and its autograd kernel (AutogradCPU), registered with the
// dispatcher; other devices keep the op's Python layers (ghost_batch_norm.py).
//
// The kernels take every CPU call: contiguous and channels-last float/double input directly,
// other input through a contiguous float32/float64 copy (float16 and bfloat16 computed in
// float32, as the default body does), results in the input's dtype and layout
// (op_support_cpu.h's MathInput). They check their arguments as the Python op does, with its
// messages.
//
// The autograd kernel is one C++ node: it sends the forward below autograd (to these kernels,
// or to whatever a dispatch mode or a fake tensor calls for) and its backward calls
// bnfx::ghost_batch_norm_backward, with no Python on the way.

#include "batch_norm_cpu.h"
#include "op_support_cpu.h"

#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <tuple>

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using GhostOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using GhostSignature = GhostOutputs(const Tensor&, const OptionalTensor&, const OptionalTensor&,
                                    const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, c10::SymInt,
                                    std::optional<double>, double);
using GradOutputs = std::tuple<Tensor, Tensor, Tensor>;
using GhostBackwardSignature = GradOutputs(const Tensor&, const Tensor&, const OptionalTensor&, const Tensor&,
                                           const Tensor&, c10::SymInt, double);

// Composer's split (ghost_batch_norm.ghost_chunk_layout): the chunk size of ceil(B / g) chunks.
int64_t chunk_size_of(int64_t batch, int64_t ghost_batch_size) {
  const int64_t nchunks = (batch + ghost_batch_size - 1) / ghost_batch_size;
  return (batch + nchunks - 1) / nchunks;
}

int64_t chunk_count_of(int64_t batch, int64_t ghost_batch_size) { return (batch + ghost_batch_size - 1) / ghost_batch_size; }

// ghost_batch_norm.py's _check_args, with its messages; returns whether the input is empty.
bool check_ghost_args(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                      const OptionalTensor& running_mean, const OptionalTensor& running_var,
                      const OptionalTensor& num_batches_tracked, int64_t ghost_batch_size,
                      std::optional<double> momentum, double eps) {
  TORCH_CHECK_VALUE(ghost_batch_size >= 1, "ghost_batch_size must be a positive int, got ", ghost_batch_size);
  const int64_t batch = input.dim() ? input.size(0) : 0;
  if (input.dim() >= 2 && batch != 0) {
    const int64_t chunk_size = chunk_size_of(batch, ghost_batch_size), nchunks = chunk_count_of(batch, ghost_batch_size);
    int64_t per_sample = 1;
    for (int64_t d = 2; d < input.dim(); ++d) per_sample *= input.size(d);
    if ((batch - (nchunks - 1) * chunk_size) * per_sample == 1) {
      TORCH_CHECK_VALUE(nchunks != 1, "Expected more than 1 value per channel when training, got input size ",
                        bnfx_cpu::torch_size(input.sizes()));
      TORCH_CHECK_VALUE(false,
                        "ghost batch norm needs more than 1 value per channel in every ghost batch, got a ghost batch "
                        "of 1 sample of shape ",
                        bnfx_cpu::python_tuple(input.sizes().slice(1)), " (batch size ", batch,
                        ", ghost_batch_size=", ghost_batch_size,
                        ", split as input.chunk(ceil(batch / ghost_batch_size)) splits it); choose a batch size or "
                        "ghost_batch_size whose last ghost batch has 2 samples or more");
    }
  }
  return bnfx_cpu::check_args(input, weight, bias, running_mean, running_var, momentum, num_batches_tracked, eps);
}

GhostOutputs ghost_batch_norm_cpu(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                  const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                  const OptionalTensor& num_batches_tracked, c10::SymInt ghost_batch_size,
                                  std::optional<double> momentum, double eps) {
  const int64_t g = ghost_batch_size.expect_int();
  if (check_ghost_args(input, weight, bias, running_mean, running_var, num_batches_tracked, g, momentum, eps)) {
    // torch's batch norm of an empty input; an empty batch counts as one chunk
    const int64_t nchunks = chunk_count_of(input.size(0), g);
    auto stats = at::zeros({nchunks, input.size(1)}, input.options().dtype(bnfx_cpu::math_type(input)));
    auto [out, new_mean, new_var, new_tracked] =
        bnfx_cpu::empty_outputs(input, running_mean, running_var, num_batches_tracked,
                                std::max<int64_t>(nchunks, 1), input.scalar_type());
    return {out, new_mean, new_var, new_tracked, stats, stats.clone()};
  }
  const int64_t chunk_size = chunk_size_of(input.size(0), g);
  const bnfx_cpu::MathInput x(input);
  // out, mean, invstd, unbiased var
  auto r = bnfx_cpu::forward(x.values(), weight, bias, chunk_size * x.rows_per_sample(), eps);
  Tensor new_mean = input.new_empty({0}), new_var = input.new_empty({0});
  if (running_mean.has_value()) {
    auto state = bnfx_cpu::running_stats(*running_mean, *running_var, r[1], r[3], momentum, num_batches_tracked);
    new_mean = state[0];
    new_var = state[1];
  }
  const int64_t nchunks = r[1].size(0);
  Tensor new_tracked =
      num_batches_tracked.has_value() ? bnfx_cpu::counter_plus(*num_batches_tracked, nchunks) : input.new_empty({0});
  return {x.result(r[0]), new_mean, new_var, new_tracked, r[1], r[2]};
}

GradOutputs ghost_batch_norm_backward_cpu(const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight,
                                          const Tensor& save_mean, const Tensor& save_invstd,
                                          c10::SymInt ghost_batch_size, double eps) {
  const int64_t g = ghost_batch_size.expect_int();
  TORCH_CHECK_VALUE(g >= 1, "ghost_batch_size must be a positive int, got ", g);
  const std::vector<int64_t> stats_shape{input.dim() >= 2 ? chunk_count_of(input.size(0), g) : 0,
                                         input.dim() >= 2 ? input.size(1) : 0};
  bnfx_cpu::check_backward_args(grad_out, input, weight,
                                {{"save_mean", {save_mean, stats_shape}}, {"save_invstd", {save_invstd, stats_shape}}});
  if (input.numel() == 0) return bnfx_cpu::empty_input_grads(input, weight);
  const bnfx_cpu::MathInput x(input);
  const int64_t chunk_size = chunk_size_of(input.size(0), g);
  // grad_input, then per-chunk sum(dy) and sum(dy (x - mean)) [nchunks, C]
  auto r = bnfx_cpu::backward(x.read(grad_out), x.values(), weight, save_mean, save_invstd,
                              chunk_size * x.rows_per_sample());
  const Tensor grad_input = x.result(r[0]);
  if (!weight.has_value()) return bnfx_cpu::no_affine_grads(grad_input, input);
  auto affine = bnfx_cpu::affine_grads(r[1], r[2], save_invstd, *weight);
  return {grad_input, affine[0], affine[1]};
}

class GhostBatchNorm : public torch::autograd::Function<GhostBatchNorm> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
                               c10::SymInt ghost_batch_size, std::optional<double> momentum, double eps) {
    static const auto op = bnfx_cpu::typed_op<GhostSignature>("bnfx::ghost_batch_norm");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, new_mean, new_var, new_tracked, save_mean, save_invstd] = op.call(
        input, weight, bias, running_mean, running_var, num_batches_tracked, ghost_batch_size, momentum, eps);
    variable_list outputs{out, new_mean, new_var, new_tracked, save_mean, save_invstd};
    bnfx_cpu::keep_for_backward(ctx, outputs, input, weight, bias, eps);  // saves mean, invstd
    ctx->saved_data["ghost_batch_size"] = ghost_batch_size;
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = bnfx_cpu::typed_op<GhostBackwardSignature>("bnfx::ghost_batch_norm_backward");
    auto call = [&](const auto& grad_out, const auto& input, const auto& weight, const auto& saved) {
      return op.call(grad_out, input, weight, saved[0], saved[1], ctx->saved_data["ghost_batch_size"].toSymInt(),
                     ctx->saved_data["eps"].toDouble());
    };
    return bnfx_cpu::backward_through(ctx, grads, call);
  }
};

GhostOutputs ghost_batch_norm_autograd(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                       const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                       const OptionalTensor& num_batches_tracked, c10::SymInt ghost_batch_size,
                                       std::optional<double> momentum, double eps) {
  if (bnfx_cpu::needs_composite(input, weight, bias)) {
    static const auto composite = bnfx_cpu::typed_op<GhostSignature>("bnfx::ghost_batch_norm_composite");
    return composite.call(input, weight, bias, running_mean, running_var, num_batches_tracked, ghost_batch_size,
                          momentum, eps);
  }
  auto o = GhostBatchNorm::apply(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                 std::move(ghost_batch_size), momentum, eps);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfx, CPU, m) {
  m.impl("ghost_batch_norm", TORCH_FN(ghost_batch_norm_cpu));
  m.impl("ghost_batch_norm_backward", TORCH_FN(ghost_batch_norm_backward_cpu));
}

TORCH_LIBRARY_IMPL(bnfx, AutogradCPU, m) { m.impl("ghost_batch_norm", TORCH_FN(ghost_batch_norm_autograd)); }
