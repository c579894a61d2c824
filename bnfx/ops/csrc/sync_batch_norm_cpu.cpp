// bnfx::sync_batch_norm on CPU tensors: its CPU kernels (forward and backward, what the
// dispatcher runs below autograd) and its autograd kernel (AutogradCPU), registered with the
// dispatcher; other devices keep the op's Python layers (sync_batch_norm.py).
//
// The kernels compute what the op's default body does, in C++ and with the C++ statistics
// (float64), one all-reduce per direction on the group's process group. They take every CPU
// call: contiguous float/double input directly, other input through a contiguous
// float32/float64 copy, results in the input's dtype and layout; they check their arguments as
// the Python op does, with its messages.
//
// The autograd kernel is one C++ node, as the ghost op's (ghost_batch_norm_cpu.cpp).

#include "batch_norm_cpu.h"
#include "op_support_cpu.h"

#include <torch/autograd.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using SyncOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using SyncSignature = SyncOutputs(const Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                                  const OptionalTensor&, const OptionalTensor&, std::optional<double>, double,
                                  c10::string_view);
using GradOutputs = std::tuple<Tensor, Tensor, Tensor>;
using SyncBackwardSignature = GradOutputs(const Tensor&, const Tensor&, const OptionalTensor&, const Tensor&,
                                          const Tensor&, const Tensor&, double, c10::string_view);

// The process group bnfx's Python side resolves with the same registry
// (torch_internals.resolve_process_group); an unknown name raises torch's error naming it.
c10::intrusive_ptr<c10d::ProcessGroup> group_named(c10::string_view group_name) {
  return c10d::resolve_process_group(std::string(group_name));
}

void all_reduce(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const Tensor& sums) {
  std::vector<Tensor> tensors{sums};
  group->allreduce(tensors)->wait();
}

// The op's forward on CPU, as its default body (sync_batch_norm.py) computes it: the statistics over the group
// from one all-reduce of [n, n (m - K), M2 + n (m - K)^2] shifted by K = running mean.
SyncOutputs forward_in_cpp(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const Tensor& input,
                             const OptionalTensor& weight, const OptionalTensor& bias,
                             const OptionalTensor& running_mean, const OptionalTensor& running_var,
                             const OptionalTensor& num_batches_tracked, std::optional<double> momentum, double eps) {
  const int64_t channels = input.size(1), count = channels == 0 ? 0 : input.numel() / channels;
  const auto f64 = input.options().dtype(at::kDouble);
  const Tensor shift = running_mean.has_value() ? running_mean->detach().to(at::kDouble) : at::zeros({channels}, f64);
  auto moments = bnfx_cpu::moments(input);  // mean, M2 [C] in double; zeros for an empty batch
  const Tensor offset = moments[0] - shift;
  const Tensor sums =
      at::cat({at::full({1}, count, offset.options()), offset * count, moments[1] + offset * offset * count});
  all_reduce(group, sums);
  const Tensor total = sums.slice(0, 0, 1);
  const Tensor shifted_mean = sums.slice(0, 1, 1 + channels) / total;
  const Tensor var = (sums.slice(0, 1 + channels) / total - shifted_mean * shifted_mean).clamp_(0);
  const Tensor mean = shift + shifted_mean;

  Tensor new_tracked = num_batches_tracked.has_value() ? *num_batches_tracked + 1 : mean.new_empty({0});
  Tensor new_mean = mean.new_empty({0}), new_var = mean.new_empty({0});
  if (running_mean.has_value()) {
    const Tensor unbiased = var * total / (total - 1);
    Tensor old_mean = running_mean->to(at::kDouble), old_var = running_var->to(at::kDouble);
    if (momentum.has_value()) {
      new_mean = at::lerp(old_mean, mean, *momentum);
      new_var = at::lerp(old_var, unbiased, *momentum);
    } else {  // cumulative average: this batch is number num_batches_tracked + 1
      const Tensor factor = 1.0 / (num_batches_tracked->to(at::kDouble) + 1);
      new_mean = at::lerp(old_mean, mean, factor);
      new_var = at::lerp(old_var, unbiased, factor);
    }
    const Tensor estimable = total > 1;  // a group batch of 0 or 1 value per channel keeps the statistics
    new_mean = at::where(estimable, new_mean, *running_mean).to(running_mean->scalar_type());
    new_var = at::where(estimable, new_var, *running_var).to(running_var->scalar_type());
  }

  Tensor scale = at::rsqrt(var + eps);
  if (weight.has_value()) scale = scale * weight->to(at::kDouble);
  const Tensor affine_shift = bias.has_value() ? bias->to(at::kDouble) : at::zeros_like(scale);
  const Tensor out = bnfx_cpu::normalize(input, mean, scale, affine_shift);
  const auto stat_type = input.scalar_type();  // float32 or float64: the statistics dtype
  return {out, new_mean, new_var, new_tracked, mean.to(stat_type), var.to(stat_type), total};
}

// The op's backward on CPU, as its default body computes it: one all-reduce of
// [sum(dy), sum(dy x_hat)], then dx = a dy - k (x - mean) + c; returns (grad_input,
// sum(dy x_hat), sum(dy)).
GradOutputs backward_in_cpp(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                                   const Tensor& grad_out, const Tensor& input,
                                                   const OptionalTensor& weight, const Tensor& save_mean,
                                                   const Tensor& save_var, const Tensor& count, double eps) {
  Tensor sum_dy, sum_dy_xhat;
  if (input.numel() == 0) {
    sum_dy = save_mean.new_zeros({input.size(1)});
    sum_dy_xhat = save_mean.new_zeros({input.size(1)});
  } else {
    auto local = at::native_batch_norm_backward(grad_out, input, {}, save_mean, save_var, {}, {}, false, eps,
                                                {false, true, true});
    sum_dy_xhat = std::get<1>(local);
    sum_dy = std::get<2>(local);
  }
  const Tensor sums = at::stack({sum_dy, sum_dy_xhat}).to(save_mean.scalar_type());
  all_reduce(group, sums);
  const Tensor invstd = at::rsqrt(save_var + eps);
  const Tensor a = weight.has_value() ? invstd * weight->to(invstd.scalar_type()) : invstd;
  const Tensor means = sums / count.to(sums.scalar_type());
  const Tensor mean_dy = means[0], mean_dy_xhat = means[1];
  const Tensor grad_input =
      bnfx_cpu::affine_grad(grad_out, input, a, a * invstd * mean_dy_xhat, -a * mean_dy, save_mean);
  return {grad_input, sum_dy_xhat, sum_dy};
}

SyncOutputs sync_batch_norm_cpu(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                const OptionalTensor& num_batches_tracked, std::optional<double> momentum, double eps,
                                c10::string_view group_name) {
  bnfx_cpu::check_args(input, running_mean, running_var, momentum, num_batches_tracked);
  const auto group = group_named(group_name);
  auto [out, new_mean, new_var, new_tracked, save_mean, save_var, count] =
      forward_in_cpp(group, bnfx_cpu::kernel_input(input, bnfx_cpu::math_type(input)), weight, bias, running_mean,
                     running_var, num_batches_tracked, momentum, eps);
  return {bnfx_cpu::like_input(out, input), new_mean, new_var, new_tracked, save_mean, save_var, count};
}

GradOutputs sync_batch_norm_backward_cpu(const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight,
                                         const Tensor& save_mean, const Tensor& save_var, const Tensor& count,
                                         double eps, c10::string_view group_name) {
  const auto type = bnfx_cpu::math_type(input);
  auto [grad_input, grad_weight, grad_bias] =
      backward_in_cpp(group_named(group_name), bnfx_cpu::kernel_input(grad_out, type),
                      bnfx_cpu::kernel_input(input, type), weight, save_mean, save_var, count, eps);
  return bnfx_cpu::backward_outputs(bnfx_cpu::like_input(grad_input, input), input, weight, grad_weight, grad_bias);
}

class SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
                               std::optional<double> momentum, double eps, const std::string& group_name) {
    static const auto op = bnfx_cpu::typed_op<SyncSignature>("bnfx::sync_batch_norm");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, new_mean, new_var, new_tracked, save_mean, save_var, count] = op.call(
        input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, group_name);
    variable_list outputs{out, new_mean, new_var, new_tracked, save_mean, save_var, count};
    bnfx_cpu::keep_for_backward(ctx, outputs, input, weight, bias, eps);  // saves mean, var, count
    ctx->saved_data["group_name"] = group_name;
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = bnfx_cpu::typed_op<SyncBackwardSignature>("bnfx::sync_batch_norm_backward");
    auto call = [&](const auto& grad_out, const auto& input, const auto& weight, const auto& saved) {
      return op.call(grad_out, input, weight, saved[0], saved[1], saved[2], ctx->saved_data["eps"].toDouble(),
                     ctx->saved_data["group_name"].toStringRef());
    };
    return bnfx_cpu::backward_through(ctx, grads, call);
  }
};

SyncOutputs sync_batch_norm_autograd(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                     const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                     const OptionalTensor& num_batches_tracked, std::optional<double> momentum,
                                     double eps, c10::string_view group_name) {
  auto o = SyncBatchNorm::apply(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                                std::string(group_name));
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfx, CPU, m) {
  m.impl("sync_batch_norm", TORCH_FN(sync_batch_norm_cpu));
  m.impl("sync_batch_norm_backward", TORCH_FN(sync_batch_norm_backward_cpu));
}

TORCH_LIBRARY_IMPL(bnfx, AutogradCPU, m) { m.impl("sync_batch_norm", TORCH_FN(sync_batch_norm_autograd)); }
