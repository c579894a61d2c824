// bnfx::ghost_batch_norm's autograd kernel for CPU tensors, registered with the dispatcher
// (AutogradCPU; other devices keep the op's Python autograd).
//
// A call pays for itself only on large input: through Python, a forward and its backward cost
// several times what torch's own batch norm does on a small layer. Here one C++ autograd
// node carries the call, and where the C++ kernels take it (plain contiguous float/double CPU
// tensors, concrete sizes, no dispatch mode, a valid call) the forward, the running
// statistics and the backward run in C++ without Python. Every other call (fake tensors,
// functionalization, TorchDispatchModes, other layouts and dtypes, arguments the op refuses)
// goes below autograd to the op's registered kernels, which do what they did before:
// check, compute or trace it; its backward calls bnfx::ghost_batch_norm_backward.

#include "autograd_fast_path.h"
#include "batch_norm_cpu.h"

#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using bnfx_cpu::plain_cpu;

// The chunk size when the C++ kernels take the call, else nullopt. The conditions under which
// the op raises (see _check_args in ghost_batch_norm.py) are left to its Python checks.
std::optional<int64_t> fast_chunk_size(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                       const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                       const OptionalTensor& num_batches_tracked, const c10::SymInt& ghost_batch_size,
                                       std::optional<double> momentum) {
  const auto g = ghost_batch_size.maybe_as_int();
  if (!bnfx_cpu::no_dispatch_modes() || !g || *g < 1 || !bnfx_cpu::kernel_input(input)) return std::nullopt;
  if (!bnfx_cpu::plain_arguments(weight, bias, running_mean, running_var, num_batches_tracked, momentum)) {
    return std::nullopt;
  }
  const int64_t batch = input.size(0), channels = input.size(1);
  if (batch == 0 || channels == 0) return std::nullopt;
  const int64_t nchunks = (batch + *g - 1) / *g, chunk_size = (batch + nchunks - 1) / nchunks;
  const int64_t last = batch - (nchunks - 1) * chunk_size;
  if (last * (input.numel() / (batch * channels)) == 1) return std::nullopt;
  return chunk_size;
}

const c10::OperatorHandle& ghost_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bnfx::ghost_batch_norm", "");
  return op;
}

const c10::OperatorHandle& ghost_backward_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bnfx::ghost_batch_norm_backward", "");
  return op;
}

using GhostSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, c10::SymInt, std::optional<double>, double);
using GhostBackwardSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptionalTensor&,
                                                                  const Tensor&, const Tensor&, c10::SymInt, double);

class GhostBatchNorm : public torch::autograd::Function<GhostBatchNorm> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
                               c10::SymInt ghost_batch_size, std::optional<double> momentum, double eps) {
    const auto chunk_size = fast_chunk_size(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                            ghost_batch_size, momentum);
    variable_list outputs;
    if (chunk_size) {
      auto stats = bnfx_cpu::forward(input, weight, bias, *chunk_size, eps);  // out, mean, invstd, unbiased var
      Tensor new_mean = input.new_empty({0}), new_var = input.new_empty({0});
      if (running_mean.has_value()) {
        auto state = bnfx_cpu::running_stats(*running_mean, *running_var, stats[1], stats[3], momentum,
                                             num_batches_tracked);
        new_mean = state[0];
        new_var = state[1];
      }
      const int64_t nchunks = stats[1].size(0);
      Tensor new_tracked = num_batches_tracked.has_value() ? *num_batches_tracked + nchunks : input.new_empty({0});
      outputs = {stats[0], new_mean, new_var, new_tracked, stats[1], stats[2]};
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto r = ghost_op().typed<GhostSignature>().call(input, weight, bias, running_mean, running_var,
                                                       num_batches_tracked, ghost_batch_size, momentum, eps);
      outputs = {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r), std::get<5>(r)};
    }
    bnfx_cpu::keep_for_backward(ctx, outputs, bnfx_cpu::kFirstSavedOutput, input, weight, bias, eps);  // saves mean, invstd
    ctx->saved_data["chunk_size"] = chunk_size ? *chunk_size : int64_t(-1);
    ctx->saved_data["ghost_batch_size"] = ghost_batch_size;
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return variable_list(9);  // only the state outputs were used
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &save_mean = saved[2], &save_invstd = saved[3];
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const OptionalTensor weight = has_weight ? OptionalTensor(saved[1]) : std::nullopt;
    const int64_t chunk_size = ctx->saved_data["chunk_size"].toInt();
    Tensor grad_input, grad_weight, grad_bias;
    if (chunk_size > 0 && plain_cpu(grad_out) && grad_out.scalar_type() == input.scalar_type()) {
      auto r = bnfx_cpu::backward(grad_out, input, weight, save_mean, save_invstd, chunk_size);
      grad_input = r[0];
      if (has_weight) {  // r[1], r[2]: per-chunk sum(dy), sum(dy (x - mean)) [nchunks, C]
        grad_weight = (r[2] * save_invstd).sum(0).to(weight->scalar_type());
        grad_bias = r[1].sum(0).to(weight->scalar_type());
      }
    } else {
      std::tie(grad_input, grad_weight, grad_bias) = ghost_backward_op().typed<GhostBackwardSignature>().call(
          grad_out, input, weight, save_mean, save_invstd, ctx->saved_data["ghost_batch_size"].toSymInt(),
          ctx->saved_data["eps"].toDouble());
    }
    return bnfx_cpu::input_gradients(grad_input, grad_weight, grad_bias, has_weight,
                                     ctx->saved_data["has_bias"].toBool());
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ghost_batch_norm_autograd(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& running_mean,
    const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked, c10::SymInt ghost_batch_size,
    std::optional<double> momentum, double eps) {
  auto o = GhostBatchNorm::apply(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                 std::move(ghost_batch_size), momentum, eps);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfx, AutogradCPU, m) { m.impl("ghost_batch_norm", TORCH_FN(ghost_batch_norm_autograd)); }
