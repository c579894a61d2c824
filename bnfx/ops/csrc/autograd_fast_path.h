// What the C++ autograd kernels of the bnfx ops (ghost_autograd_cpu.cpp, sync_autograd_cpu.cpp)
// check before they compute a call in C++ rather than send it below autograd to the op's
// registered kernels.
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <atomic>
#include <optional>
#include <vector>

namespace bnfx_cpu {

// Off while the ops run their default bodies (device_kernels.default_bodies("cpu")).
extern std::atomic<bool> fast_path_enabled;

// Nothing above the kernels wants to see the call: no TorchDispatchMode (FakeTensorMode,
// make_fx, bnfx.recompute_statistics), no Python dispatch.
inline bool no_dispatch_modes() {
  return fast_path_enabled.load(std::memory_order_relaxed) && c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python);
}

// A tensor the C++ kernels can read directly: dense, on the CPU, not a subclass or wrapper.
inline bool plain_cpu(const at::Tensor& t) {
  const auto python = c10::DispatchKeySet(
      {c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot, c10::DispatchKey::Functionalize});
  return t.device().is_cpu() && t.layout() == at::kStrided && !t.key_set().has_any(python);
}

inline bool plain_cpu(const std::optional<at::Tensor>& t) { return !t.has_value() || plain_cpu(*t); }

// The optional arguments every bnfx batch-norm op takes are plain, and the state ones make a
// call the op accepts (both running statistics or neither; a counter for momentum=None).
inline bool plain_arguments(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                            const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum) {
  for (const auto* t : {&weight, &bias, &running_mean, &running_var, &num_batches_tracked}) {
    if (!plain_cpu(*t)) return false;
  }
  return running_mean.has_value() == running_var.has_value() &&
         !(running_mean.has_value() && !momentum.has_value() && !num_batches_tracked.has_value());
}

// Where an op's saved outputs start: after the output and the three new-state outputs
// (bnfx/ops/batch_norm_contract.py's FIRST_SAVED; a test compares them).
constexpr size_t kFirstSavedOutput = 4;

// What a forward keeps for its backward: every output but the first is state or statistics,
// not differentiable (and gets no zero gradient); saved are the input, the weight and the
// outputs from ``first_saved`` on.
inline void keep_for_backward(torch::autograd::AutogradContext* ctx, const std::vector<at::Tensor>& outputs,
                              size_t first_saved, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, double eps) {
  ctx->mark_non_differentiable(std::vector<at::Tensor>(outputs.begin() + 1, outputs.end()));
  ctx->set_materialize_grads(false);
  std::vector<at::Tensor> saved{input, weight.value_or(at::Tensor())};
  saved.insert(saved.end(), outputs.begin() + first_saved, outputs.end());
  ctx->save_for_backward(saved);
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["has_weight"] = weight.has_value();
  ctx->saved_data["has_bias"] = bias.has_value();
}

// A backward's gradients for the op's 9 inputs: input, then weight and bias where given.
inline std::vector<at::Tensor> input_gradients(const at::Tensor& grad_input, const at::Tensor& grad_weight,
                                               const at::Tensor& grad_bias, bool has_weight, bool has_bias) {
  std::vector<at::Tensor> grads(9);
  grads[0] = grad_input;
  if (has_weight) {
    grads[1] = grad_weight;
    if (has_bias) grads[2] = grad_bias;
  }
  return grads;
}

// Input the C++ kernels take: plain, contiguous float or double, [B, C, ...].
inline bool kernel_input(const at::Tensor& input) {
  return plain_cpu(input) && input.dim() >= 2 && input.is_contiguous() &&
         (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble);
}

}  // namespace bnfx_cpu
