// What the CPU layers of the bnfx ops (ghost_batch_norm_cpu.cpp, sync_batch_norm_cpu.cpp)
// share: the op contract's output layout, the argument checks the Python ops make (with their
// messages), the conversion of any CPU input to what the C++ math takes, and the autograd
// set-up.
#pragma once

#include "batch_norm_cpu.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/FuncTorchTLS.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>

#include <cstdio>
#include <initializer_list>
#include <optional>
#include <utility>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace bnfx_cpu {

// Where an op's saved outputs start: after the output and the three new-state outputs
// (bnfx/ops/batch_norm_contract.py's FIRST_SAVED; a test compares them).
constexpr size_t kFirstSavedOutput = 4;

// A shape as Python writes a tuple: "(5, 3)", "(3,)", "()".
inline std::string python_tuple(at::IntArrayRef sizes) {
  std::ostringstream text;
  text << "(";
  for (size_t i = 0; i < sizes.size(); ++i) text << (i ? ", " : "") << sizes[i];
  text << (sizes.size() == 1 ? ",)" : ")");
  return text.str();
}

// A size as torch.Size prints it: "torch.Size([1, 3])".
inline std::string torch_size(at::IntArrayRef sizes) {
  std::ostringstream text;
  text << "torch.Size([";
  for (size_t i = 0; i < sizes.size(); ++i) text << (i ? ", " : "") << sizes[i];
  text << "])";
  return text.str();
}

// A dtype as Python writes it: "torch.float32", "torch.int64".
inline std::string python_dtype(at::ScalarType type) {
  switch (type) {
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(type);
  }
}

// A float as Python's format(value, "g") writes it.
inline std::string python_g(double value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g", value);
  return text;
}

// batch_norm_contract.check_args: the checks every bnfx batch-norm op makes before any kernel
// runs, in torch's order, with its exception types and the same messages. Returns whether the
// input is empty (then, as torch, checked no further; sync checks sizes still, as the Python op).
inline bool check_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                       const std::optional<at::Tensor>& running_var, std::optional<double> momentum,
                       const std::optional<at::Tensor>& num_batches_tracked, double eps,
                       bool sizes_when_empty = false) {
  TORCH_CHECK_VALUE(input.dim() >= 2, "input must have at least 2 dimensions (N, C, ...), got shape ",
                    python_tuple(input.sizes()));
  TORCH_CHECK_VALUE(eps > 0, "batch_norm eps must be positive during training, but got ", python_g(eps));
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "running_mean and running_var must both be given or both be None");
  TORCH_CHECK_VALUE(!(running_mean.has_value() && !momentum.has_value() && !num_batches_tracked.has_value()),
                    "momentum=None (cumulative average) needs num_batches_tracked, got None");
  const bool empty = input.numel() == 0;
  if (empty && !sizes_when_empty) return true;
  const int64_t channels = input.size(1);
  const std::pair<const char*, const std::optional<at::Tensor>*> parameters[] = {
      {"running_mean", &running_mean}, {"running_var", &running_var}, {"weight", &weight}, {"bias", &bias}};
  for (const auto& [name, t] : parameters) {
    TORCH_CHECK(!t->has_value() || (*t)->numel() == channels, name, " should contain ", channels, " elements not ",
                (*t)->numel());
  }
  if (empty) return true;
  const auto type = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(at::isFloatingType(type) && at::elementSize(type) >= 2,
                              "\"batch_norm\" not implemented for ", python_dtype(type),
                              ": input must be float16, bfloat16, float32 or float64");
  const bool reduced = type == at::kHalf || type == at::kBFloat16;
  std::optional<at::ScalarType> common;
  bool mixed = false;
  for (const auto& [name, t] : parameters) {
    if (!t->has_value()) continue;
    const auto p = (*t)->scalar_type();
    mixed = mixed || (common.has_value() && *common != p) || !(p == type || (reduced && p == at::kFloat));
    common = p;
  }
  if (mixed) {
    std::string described;
    for (const auto& [name, t] : parameters) {
      if (t->has_value()) described += std::string(described.empty() ? "" : ", ") + name + " " + python_dtype((*t)->scalar_type());
    }
    TORCH_CHECK(false, "mixed dtype: input is ", python_dtype(type), " and ", described,
                "; weight, bias, running_mean and running_var must all have the input's dtype",
                reduced ? " or all float32" : "", ", as torch's batch norm requires");
  }
  return false;
}

// batch_norm_contract.check_backward_args: a backward op's tensors against its input, same
// messages; ``saved`` pairs each saved statistic's name with the shape it must have.
inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& input,
                                const std::optional<at::Tensor>& weight,
                                std::initializer_list<std::pair<const char*, std::pair<at::Tensor, std::vector<int64_t>>>> saved) {
  TORCH_CHECK(input.dim() >= 2, "input must have at least 2 dimensions (N, C, ...), got shape ",
              python_tuple(input.sizes()));
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "grad_out should have the input's shape ", python_tuple(input.sizes()),
              ", got ", python_tuple(grad_out.sizes()));
  TORCH_CHECK(!weight.has_value() || input.numel() == 0 || weight->numel() == input.size(1),
              "weight should contain ", input.size(1),
              " elements not ", weight.has_value() ? weight->numel() : 0);
  for (const auto& [name, tensor_and_shape] : saved) {
    const auto& [t, shape] = tensor_and_shape;
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, " should have shape ", python_tuple(shape), ", got ",
                python_tuple(t.sizes()));
  }
}

// batch_norm_contract.empty_outputs: (out, new_running_mean, new_running_var,
// new_num_batches_tracked) for an empty input, as torch's batch norm gives them: an empty
// output, the statistics as they were, the counter moved by ``batches``.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_outputs(
    const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& num_batches_tracked,
    int64_t batches, at::ScalarType empty_type) {
  auto unchanged = [&](const std::optional<at::Tensor>& state) {
    return state.has_value() ? state->clone() : input.new_empty({0}, input.options().dtype(empty_type));
  };
  at::Tensor tracked = num_batches_tracked.has_value() ? *num_batches_tracked + batches : input.new_empty({0});
  return {at::empty_like(input), unchanged(running_mean), unchanged(running_var), tracked};
}

// batch_norm_contract.empty_input_grads: a backward op's outputs for an empty input.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_input_grads(const at::Tensor& input,
                                                                        const std::optional<at::Tensor>& weight) {
  if (!weight.has_value()) return {at::empty_like(input), input.new_empty({0}), input.new_empty({0})};
  return {at::empty_like(input), at::zeros_like(*weight), at::zeros_like(*weight)};
}

// The type the C++ math computes in: double for double input, float for the rest (float16 and
// bfloat16 as the ops' default bodies compute them: statistics and outputs in float32, rounded
// once at the end).
inline at::ScalarType math_type(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ``counter + n`` for a batch counter (num_batches_tracked): an int64 scalar written directly.
inline at::Tensor counter_plus(const at::Tensor& counter, int64_t n) {
  if (counter.scalar_type() != at::kLong || counter.numel() != 1 || !counter.is_contiguous()) return counter + n;
  auto next = at::empty_like(counter);
  next.mutable_data_ptr<int64_t>()[0] = counter.const_data_ptr<int64_t>()[0] + n;
  return next;
}

// A CPU kernel's input as the C++ math reads it (contiguous [B, C, S] or [B, C] rows, in the
// math type), and the math's results back in the input's dtype and layout, as the default
// bodies return them (``torch.empty_like(input)``).
//
// Channels-last input, [B, C, S...] whose memory is [B, S..., C] (convolutions under
// inductor's layout optimization, models in torch.channels_last, transposed sequences), is
// read as the rows of [B S, C], a view: the math's [B, C] path takes it with no copy, where a
// contiguous copy would cost a pass over the input and another over each result. A sample is
// then S rows. Other layouts are read through a contiguous copy.
class MathInput {
 public:
  explicit MathInput(const at::Tensor& input) : input_(input), type_(math_type(input)) {
    const at::Tensor t = as_type(input, type_);
    rows_ = input.dim() >= 3 && !t.is_contiguous() && t.movedim(1, -1).is_contiguous();
    values_ = rows_ ? as_rows(t) : t.contiguous();
    rows_per_sample_ = rows_ ? values_.size(0) / input.size(0) : 1;
  }

  const at::Tensor& values() const { return values_; }
  // How many rows of values() one sample is: S for channels-last input, else 1.
  int64_t rows_per_sample() const { return rows_per_sample_; }

  // Another tensor of the input's shape (the output gradient), read as values() is.
  at::Tensor read(const at::Tensor& t) const {
    const at::Tensor typed = as_type(t, type_);
    return rows_ ? as_rows(typed) : typed.contiguous();
  }

  // A result of the math, laid out as values() is, in the input's dtype and layout.
  at::Tensor result(const at::Tensor& math_out) const {
    const at::Tensor out = rows_ ? math_out.view(input_.movedim(1, -1).sizes()).movedim(-1, 1) : math_out;
    if (out.scalar_type() == input_.scalar_type() && out.strides() == input_.strides()) return out;
    return at::empty_like(input_).copy_(out);
  }

 private:
  static at::Tensor as_rows(const at::Tensor& t) { return t.movedim(1, -1).reshape({-1, t.size(1)}); }

  at::Tensor input_, values_;
  at::ScalarType type_;
  bool rows_ = false;
  int64_t rows_per_sample_ = 1;
};

// What a forward keeps for its backward: every output but the first is state or statistics,
// not differentiable (and gets no zero gradient); saved are the input, the weight and the
// outputs from kFirstSavedOutput on.
inline void keep_for_backward(torch::autograd::AutogradContext* ctx, const std::vector<at::Tensor>& outputs,
                              const at::Tensor& input, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, double eps) {
  ctx->mark_non_differentiable(std::vector<at::Tensor>(outputs.begin() + 1, outputs.end()));
  ctx->set_materialize_grads(false);
  std::vector<at::Tensor> saved{input, weight.value_or(at::Tensor())};
  saved.insert(saved.end(), outputs.begin() + kFirstSavedOutput, outputs.end());
  ctx->save_for_backward(saved);
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["has_weight"] = weight.has_value();
  ctx->saved_data["has_bias"] = bias.has_value();
}

// bnfx::<name> (``name`` qualified), for the autograd kernels to call through the dispatcher.
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Whether an autograd kernel's call needs the op's differentiable composite,
// bnfx::<op>_composite (higher_order_autograd.py), instead of its C++ node, which has no
// forward-mode formula and which torch.func refuses: a torch.func transform is running, or an
// argument carries a forward-mode tangent.
inline bool needs_composite(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias) {
  // torch.func's own test of a C++ node (custom_function.h): it throws while a transform runs
  if (const auto& functorch = at::functorch::functorchTLSAccessor()) {
    try {
      functorch->checkSupportsCppAutogradFunction();
    } catch (const c10::Error&) {
      return true;
    }
  }
  auto has_tangent = [](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() && t->_fw_grad(/*level=*/0).defined();
  };
  return has_tangent(input) || has_tangent(weight) || has_tangent(bias);
}

// An autograd kernel's backward: ``call_backward_op(grad_out, input, weight, saved outputs)``
// calls the op's backward op, below autograd unless a graph of the backward is asked for
// (create_graph: then the backward op's own autograd says it has none). Returns the gradients
// of the op's 9 inputs: input, then weight and bias where given.
template <typename CallBackwardOp>
torch::autograd::variable_list backward_through(torch::autograd::AutogradContext* ctx,
                                                const torch::autograd::variable_list& grads,
                                                CallBackwardOp&& call_backward_op) {
  torch::autograd::variable_list input_grads(9);
  if (!grads[0].defined()) return input_grads;  // only the state outputs were used
  const auto saved = ctx->get_saved_variables();
  const bool has_weight = ctx->saved_data["has_weight"].toBool();
  const std::optional<at::Tensor> weight = has_weight ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  if (!at::GradMode::is_enabled()) below_autograd.emplace();
  auto [grad_input, grad_weight, grad_bias] =
      call_backward_op(grads[0], saved[0], weight, std::vector<at::Tensor>(saved.begin() + 2, saved.end()));
  input_grads[0] = grad_input;
  if (has_weight) {
    input_grads[1] = grad_weight;
    if (ctx->saved_data["has_bias"].toBool()) input_grads[2] = grad_bias;
  }
  return input_grads;
}

// A backward kernel's outputs for an op called without a weight: no weight or bias gradients.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> no_affine_grads(const at::Tensor& grad_input,
                                                                      const at::Tensor& input) {
  return {grad_input, input.new_empty({0}), input.new_empty({0})};
}

// The weight and bias gradients a backward kernel returns: empty where there is no weight.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_outputs(const at::Tensor& grad_input,
                                                                       const at::Tensor& input,
                                                                       const std::optional<at::Tensor>& weight,
                                                                       const at::Tensor& grad_weight,
                                                                       const at::Tensor& grad_bias) {
  if (!weight.has_value()) return no_affine_grads(grad_input, input);
  return {grad_input, grad_weight.to(weight->scalar_type()), grad_bias.to(weight->scalar_type())};
}

}  // namespace bnfx_cpu
