// bnfx::sync_batch_norm's autograd kernel for CPU tensors (AutogradCPU; other devices keep the
// op's Python autograd), as ghost_autograd_cpu.cpp is the ghost op's: one C++ autograd node,
// and where the C++ kernels take the call, the op's CPU kernel (sync_batch_norm.py, _CpuKernels)
// step for step in C++, the same ATen calls in the same order and the same one all-reduce per
// direction, so the result is the same to the bit. Every other call goes below autograd to the
// op's registered kernels; its backward calls bnfx::sync_batch_norm_backward.

#include "autograd_fast_path.h"
#include "batch_norm_cpu.h"

#include <torch/autograd.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <tuple>

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using bnfx_cpu::plain_cpu;

using SyncSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, std::optional<double>, double, c10::string_view);
using SyncBackwardSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptionalTensor&,
                                                                 const Tensor&, const Tensor&, const Tensor&, double,
                                                                 c10::string_view);

const c10::OperatorHandle& sync_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bnfx::sync_batch_norm", "");
  return op;
}

const c10::OperatorHandle& sync_backward_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bnfx::sync_batch_norm_backward", "");
  return op;
}

// The process group, when the C++ kernels take the call; the op's Python checks and errors
// (a bad argument, an unknown group) are left to its registered kernels.
c10::intrusive_ptr<c10d::ProcessGroup> fast_group(const Tensor& input, const OptionalTensor& weight,
                                                  const OptionalTensor& bias, const OptionalTensor& running_mean,
                                                  const OptionalTensor& running_var,
                                                  const OptionalTensor& num_batches_tracked,
                                                  std::optional<double> momentum, const std::string& group_name) {
  if (!bnfx_cpu::no_dispatch_modes() || !bnfx_cpu::kernel_input(input) || input.size(1) == 0) return {};
  if (!bnfx_cpu::plain_arguments(weight, bias, running_mean, running_var, num_batches_tracked, momentum)) return {};
  try {
    return c10d::resolve_process_group(group_name);
  } catch (const c10::Error&) {
    return {};
  }
}

void all_reduce(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const Tensor& sums) {
  std::vector<Tensor> tensors{sums};
  group->allreduce(tensors)->wait();
}

// The op's forward on CPU, as sync_batch_norm.py computes it: the statistics over the group
// from one all-reduce of [n, n (m - K), M2 + n (m - K)^2] shifted by K = running mean.
variable_list forward_in_cpp(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const Tensor& input,
                             const OptionalTensor& weight, const OptionalTensor& bias,
                             const OptionalTensor& running_mean, const OptionalTensor& running_var,
                             const OptionalTensor& num_batches_tracked, std::optional<double> momentum, double eps) {
  const int64_t channels = input.size(1), count = input.numel() / channels;
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

// The op's backward on CPU, as sync_batch_norm.py computes it: one all-reduce of
// [sum(dy), sum(dy x_hat)], then dx = a dy - k (x - mean) + c.
std::tuple<Tensor, Tensor, Tensor> backward_in_cpp(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
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
  if (!weight.has_value()) return {grad_input, Tensor(), Tensor()};
  return {grad_input, sum_dy_xhat.to(weight->scalar_type()), sum_dy.to(weight->scalar_type())};
}

class SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
                               std::optional<double> momentum, double eps, const std::string& group_name) {
    const auto group =
        fast_group(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, group_name);
    variable_list outputs;
    if (group) {
      outputs = forward_in_cpp(group, input, weight, bias, running_mean, running_var, num_batches_tracked,
                               momentum, eps);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto r = sync_op().typed<SyncSignature>().call(input, weight, bias, running_mean, running_var,
                                                     num_batches_tracked, momentum, eps, group_name);
      outputs = {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r),
                 std::get<4>(r), std::get<5>(r), std::get<6>(r)};
    }
    bnfx_cpu::keep_for_backward(ctx, outputs, bnfx_cpu::kFirstSavedOutput, input, weight, bias, eps);  // saves mean, var, count
    ctx->saved_data["in_cpp"] = bool(group);
    ctx->saved_data["group_name"] = group_name;
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return variable_list(9);  // only the state outputs were used
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &save_mean = saved[2], &save_var = saved[3], &count = saved[4];
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const OptionalTensor weight = has_weight ? OptionalTensor(saved[1]) : std::nullopt;
    const double eps = ctx->saved_data["eps"].toDouble();
    const std::string group_name = ctx->saved_data["group_name"].toStringRef();
    Tensor grad_input, grad_weight, grad_bias;
    if (ctx->saved_data["in_cpp"].toBool() && bnfx_cpu::no_dispatch_modes() && plain_cpu(grad_out) &&
        grad_out.scalar_type() == input.scalar_type()) {
      std::tie(grad_input, grad_weight, grad_bias) = backward_in_cpp(
          c10d::resolve_process_group(group_name), grad_out, input, weight, save_mean, save_var, count, eps);
    } else {
      std::tie(grad_input, grad_weight, grad_bias) = sync_backward_op().typed<SyncBackwardSignature>().call(
          grad_out, input, weight, save_mean, save_var, count, eps, group_name);
    }
    return bnfx_cpu::input_gradients(grad_input, grad_weight, grad_bias, has_weight,
                                     ctx->saved_data["has_bias"].toBool());
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> sync_batch_norm_autograd(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& running_mean,
    const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked, std::optional<double> momentum,
    double eps, c10::string_view group_name) {
  auto o = SyncBatchNorm::apply(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                                std::string(group_name));
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfx, AutogradCPU, m) { m.impl("sync_batch_norm", TORCH_FN(sync_batch_norm_autograd)); }
