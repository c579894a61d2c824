// bnfx::sync_batch_norm on CPU tensors: its CPU kernels (forward and backward, what the
// dispatcher runs below autograd) and its autograd kernel (AutogradCPU), registered with the
// dispatcher; other devices keep the op's Python layers (sync_batch_norm.py).
//
// The kernels compute what the op's default body does, in C++ and with the C++ statistics
// (float64), one all-reduce per direction on the group's process group. They take every CPU
// call: contiguous and channels-last float/double input directly, other input through a
// contiguous float32/float64 copy, results in the input's dtype and layout
// (op_support_cpu.h's MathInput); they check their arguments as
// the Python op does, with its messages.
//
// The autograd kernel is one C++ node, as the ghost op's (ghost_batch_norm_cpu.cpp).

#include "batch_norm_cpu.h"
#include "op_support_cpu.h"

#include <torch/autograd.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using SyncOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using SyncSignature = SyncOutputs(const Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                                  const OptionalTensor&, const OptionalTensor&, std::optional<double>, double,
                                  c10::string_view, const OptionalTensor&, int64_t);
using GradOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using SyncBackwardSignature = GradOutputs(const Tensor&, const Tensor&, const OptionalTensor&, const Tensor&,
                                          const Tensor&, const Tensor&, double, c10::string_view,
                                          const OptionalTensor&, int64_t);
using MismatchSignature = void(c10::ArrayRef<double>, c10::ArrayRef<double>, int64_t, int64_t, c10::string_view,
                               c10::string_view);

// What each all-reduce carries after its sums, as collective_tags.py writes it: the site's two
// tags (swapped in the backward) and the collective's position in the chain (``order``).
constexpr int64_t kTagBits = 20, kSlots = 3;

std::vector<double> own_slots(int64_t site, bool forward, const OptionalTensor& order) {
  const double first = double(site & ((int64_t(1) << kTagBits) - 1)), second = double(site >> kTagBits);
  const double position = order.has_value() && order->defined() ? order->item<double>() : 0.0;
  return forward ? std::vector<double>{first, second, position} : std::vector<double>{second, first, position};
}

// The slots after the all-reduce, at s[offset..offset + kSlots): each ``world`` times this
// rank's, or the mismatch error (collective_tags.raise_mismatch, one message for every kernel).
// Returns the order the next collective takes: one after this one's position.
Tensor checked_order(const double* s, const std::vector<double>& own, int64_t world, int64_t site, bool forward,
                     c10::string_view group_name, const at::TensorOptions& options) {
  std::vector<double> reduced(s, s + kSlots);
  for (int64_t i = 0; i < kSlots; ++i) {
    if (reduced[i] != own[i] * double(world)) {
      static const auto mismatch = bnfx_cpu::typed_op<MismatchSignature>("bnfx::collective_mismatch");
      mismatch.call(reduced, own, world, site, forward ? "forward" : "backward", group_name);
      TORCH_CHECK(false, "bnfx: sync batch-norm collectives do not match across the ranks of ", group_name);
    }
  }
  return at::full({1}, reduced[kSlots - 1] / double(world) + 1.0, options.dtype(at::kDouble));
}

// The process group bnfx's Python side resolves with the same registry
// (torch_internals.resolve_process_group); an unknown name raises torch's error naming it.
c10::intrusive_ptr<c10d::ProcessGroup> group_named(c10::string_view group_name) {
  return c10d::resolve_process_group(std::string(group_name));
}

void all_reduce(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const Tensor& sums) {
  std::vector<Tensor> tensors{sums};
  group->allreduce(tensors)->wait();
}

// An optional [C] tensor's values as double; none for None.
std::vector<double> doubles(const OptionalTensor& t) {
  return t.has_value() ? bnfx_cpu::scaled_values(*t, 1.0) : std::vector<double>();
}

// torch.lerp's formula (ATen/native/Lerp.h), so the running statistics move as torch moves them.
double lerp(double self, double end, double weight) {
  return std::abs(weight) < 0.5 ? self + weight * (end - self) : end - (end - self) * (1 - weight);
}

// The op's forward on CPU, as its default body (sync_batch_norm.py) computes it: the statistics
// over the group from one all-reduce of [n, n (m - K), M2 + n (m - K)^2] shifted by K = running
// mean. The per-channel arithmetic around the all-reduce runs in loops over plain arrays, and
// each output is written once in its dtype: on small layers a dozen small tensor ops (each
// an allocation or a conversion) would cost more than the collective.
SyncOutputs forward_in_cpp(const c10::intrusive_ptr<c10d::ProcessGroup>& group, c10::string_view group_name,
                           const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                           const OptionalTensor& running_mean, const OptionalTensor& running_var,
                           const OptionalTensor& num_batches_tracked, std::optional<double> momentum, double eps,
                           const OptionalTensor& order, int64_t site) {
  const int64_t channels = input.size(1), count = channels == 0 ? 0 : input.numel() / channels;
  std::vector<double> m, m2;  // [C]; zeros for an empty batch
  bnfx_cpu::moments(input, m, m2);
  const auto shift = doubles(running_mean), old_var = doubles(running_var), w = doubles(weight), b = doubles(bias);
  // the op checked these (op_support_cpu.h); checked again before any indexing
  for (const auto* values : {&shift, &old_var, &w, &b}) {
    TORCH_CHECK(values->empty() || int64_t(values->size()) == channels, "per-channel tensors must have ", channels,
                " elements, got ", values->size());
  }
  // [n, n (m - K), M2 + n (m - K)^2, n m, the slots]: the layout of every kernel's all-reduce
  const Tensor sums = at::empty({1 + 3 * channels + kSlots}, input.options().dtype(at::kDouble));
  double* s = sums.mutable_data_ptr<double>();
  s[0] = double(count);
  for (int64_t c = 0; c < channels; ++c) {
    const double offset = m[c] - (shift.empty() ? 0.0 : shift[c]);
    s[1 + c] = offset * count;
    s[1 + channels + c] = m2[c] + offset * offset * count;
    s[1 + 2 * channels + c] = m[c] * count;
  }
  const auto own = own_slots(site, /*forward=*/true, order);
  std::copy(own.begin(), own.end(), s + 1 + 3 * channels);
  all_reduce(group, sums);
  const Tensor next_order = checked_order(s + 1 + 3 * channels, own, group->getSize(), site, true, group_name,
                                          input.options());

  const double total = s[0];
  std::vector<double> mean(channels), var(channels), scale(channels), affine_shift(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const double shifted_mean = s[1 + c] / total;
    // std::max keeps a nan (an empty group batch), as torch's clamp does
    var[c] = std::max(s[1 + channels + c] / total - shifted_mean * shifted_mean, 0.0);
    mean[c] = s[1 + 2 * channels + c] / total;  // from the raw sums, as every kernel
    scale[c] = 1.0 / std::sqrt(var[c] + eps) * (w.empty() ? 1.0 : w[c]);
    affine_shift[c] = b.empty() ? 0.0 : b[c];
  }

  Tensor new_tracked =
      num_batches_tracked.has_value() ? bnfx_cpu::counter_plus(*num_batches_tracked, 1) : sums.new_empty({0});
  Tensor new_mean = sums.new_empty({0}), new_var = sums.new_empty({0});
  if (running_mean.has_value()) {
    // cumulative average (momentum=None): this batch is number num_batches_tracked + 1
    const double factor = momentum.has_value() ? *momentum : 1.0 / (num_batches_tracked->item<double>() + 1);
    std::vector<double> next_mean(channels), next_var(channels);
    for (int64_t c = 0; c < channels; ++c) {
      // a group batch of 0 or 1 value per channel keeps the statistics (no variance estimate)
      next_mean[c] = total > 1 ? lerp(shift[c], mean[c], factor) : shift[c];
      next_var[c] = total > 1 ? lerp(old_var[c], var[c] * total / (total - 1), factor) : old_var[c];
    }
    new_mean = bnfx_cpu::tensor_like(*running_mean, next_mean);
    new_var = bnfx_cpu::tensor_like(*running_var, next_var);
  }

  const Tensor out = bnfx_cpu::normalize(input, mean, scale, affine_shift);
  // the statistics in the math type, float32 or float64, as the default body saves them
  return {out, new_mean, new_var, new_tracked, bnfx_cpu::tensor_of(mean, {channels}, input.options()),
          bnfx_cpu::tensor_of(var, {channels}, input.options()), sums.slice(0, 0, 1), next_order};
}

// The op's backward on CPU, as its default body computes it: one all-reduce of
// [sum(dy), sum(dy x_hat), the slots], then dx = a dy - k (x - mean) + c (per-channel
// coefficients from one loop); returns (grad_input, sum(dy x_hat), sum(dy), the next order).
GradOutputs backward_in_cpp(const c10::intrusive_ptr<c10d::ProcessGroup>& group, c10::string_view group_name,
                            const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight,
                            const Tensor& save_mean, const Tensor& save_var, const Tensor& count, double eps,
                            const OptionalTensor& order, int64_t site) {
  const int64_t channels = input.size(1);
  Tensor sum_dy, sum_dy_xhat;
  if (input.numel() == 0) {
    sum_dy = save_mean.new_zeros({channels});
    sum_dy_xhat = save_mean.new_zeros({channels});
  } else {
    auto local = at::native_batch_norm_backward(grad_out, input, {}, save_mean, save_var, {}, {}, false, eps,
                                                {false, true, true});
    sum_dy_xhat = std::get<1>(local);
    sum_dy = std::get<2>(local);
  }
  std::vector<double> local_sums = bnfx_cpu::scaled_values(sum_dy, 1.0);
  const auto local_dy_xhat = bnfx_cpu::scaled_values(sum_dy_xhat, 1.0);
  local_sums.insert(local_sums.end(), local_dy_xhat.begin(), local_dy_xhat.end());
  const auto own = own_slots(site, /*forward=*/false, order);
  local_sums.insert(local_sums.end(), own.begin(), own.end());
  const Tensor sums = bnfx_cpu::tensor_of(local_sums, {2 * channels + kSlots}, save_mean.options().dtype(at::kDouble));
  all_reduce(group, sums);
  const Tensor next_order = checked_order(sums.const_data_ptr<double>() + 2 * channels, own, group->getSize(), site,
                                          false, group_name, save_mean.options());
  const auto reduced = doubles(sums), saved_var = doubles(save_var), w = doubles(weight), mean = doubles(save_mean);
  TORCH_CHECK(int64_t(saved_var.size()) == channels && int64_t(mean.size()) == channels &&
                  (w.empty() || int64_t(w.size()) == channels),
              "per-channel tensors must have ", channels, " elements");
  const double n = count.item<double>();
  std::vector<double> a(channels), k(channels), c0(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const double invstd = 1.0 / std::sqrt(saved_var[c] + eps);
    a[c] = invstd * (w.empty() ? 1.0 : w[c]);
    k[c] = a[c] * invstd * (reduced[channels + c] / n);  // a invstd mean(dy x_hat)
    c0[c] = -a[c] * (reduced[c] / n);                    // -a mean(dy)
  }
  return {bnfx_cpu::affine_grad(grad_out, input, a, k, c0, &mean), sum_dy_xhat, sum_dy, next_order};
}

SyncOutputs sync_batch_norm_cpu(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                const OptionalTensor& num_batches_tracked, std::optional<double> momentum, double eps,
                                c10::string_view group_name, const OptionalTensor& order, int64_t site) {
  const auto group = group_named(group_name);
  // a group of one is torch's batch norm, which refuses one value per channel (with peers, a
  // rank's single value is a legal share): sync_batch_norm.py's _refuse_one_value_alone
  TORCH_CHECK_VALUE(!(input.dim() >= 2 && input.numel() == input.size(1) && group->getSize() == 1),
                    "Expected more than 1 value per channel when training, got input size ",
                    bnfx_cpu::torch_size(input.sizes()));
  // sizes checked on an empty share too: a rank must refuse what its peers refuse
  bnfx_cpu::check_args(input, weight, bias, running_mean, running_var, momentum, num_batches_tracked, eps,
                       /*sizes_when_empty=*/true);
  const bnfx_cpu::MathInput x(input);
  auto [out, new_mean, new_var, new_tracked, save_mean, save_var, count, next_order] =
      forward_in_cpp(group, group_name, x.values(), weight, bias, running_mean, running_var, num_batches_tracked,
                     momentum, eps, order, site);
  return {x.result(out), new_mean, new_var, new_tracked, save_mean, save_var, count, next_order};
}

GradOutputs sync_batch_norm_backward_cpu(const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight,
                                         const Tensor& save_mean, const Tensor& save_var, const Tensor& count,
                                         double eps, c10::string_view group_name, const OptionalTensor& order,
                                         int64_t site) {
  const std::vector<int64_t> channels{input.dim() >= 2 ? input.size(1) : 0};
  bnfx_cpu::check_backward_args(grad_out, input, weight,
                                {{"save_mean", {save_mean, channels}}, {"save_var", {save_var, channels}},
                                 {"count", {count, {1}}}});
  const bnfx_cpu::MathInput x(input);
  auto [grad_input, grad_weight, grad_bias, next_order] =
      backward_in_cpp(group_named(group_name), group_name, x.read(grad_out), x.values(), weight, save_mean, save_var,
                      count, eps, order, site);
  auto grads = bnfx_cpu::backward_outputs(x.result(grad_input), input, weight, grad_weight, grad_bias);
  return std::tuple_cat(grads, std::make_tuple(next_order));
}

class SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
                               std::optional<double> momentum, double eps, const std::string& group_name,
                               const OptionalTensor& order, int64_t site) {
    static const auto op = bnfx_cpu::typed_op<SyncSignature>("bnfx::sync_batch_norm");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, new_mean, new_var, new_tracked, save_mean, save_var, count, next_order] = op.call(
        input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, group_name, order, site);
    // saves mean, var, count; the chain's link (the last output) stays differentiable: its
    // gradient orders the backward collectives
    bnfx_cpu::keep_for_backward(ctx, {out, new_mean, new_var, new_tracked, save_mean, save_var, count}, input, weight,
                                bias, eps);
    ctx->saved_data["group_name"] = group_name;
    ctx->saved_data["site"] = site;
    ctx->saved_data["has_order"] = order.has_value() && order->defined();
    return {out, new_mean, new_var, new_tracked, save_mean, save_var, count, next_order};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = bnfx_cpu::typed_op<SyncBackwardSignature>("bnfx::sync_batch_norm_backward");
    const Tensor& link = grads[7];  // the gradient of the chain's link: the next site's backward order
    Tensor next_link = link;        // passed on as it is where only the state was used
    auto call = [&](const auto& grad_out, const auto& input, const auto& weight, const auto& saved) {
      auto [grad_input, grad_weight, grad_bias, order] =
          op.call(grad_out, input, weight, saved[0], saved[1], saved[2], ctx->saved_data["eps"].toDouble(),
                  ctx->saved_data["group_name"].toStringRef(), link.defined() ? OptionalTensor(link) : std::nullopt,
                  ctx->saved_data["site"].toInt());
      next_link = order;
      return std::make_tuple(grad_input, grad_weight, grad_bias);
    };
    auto input_grads = bnfx_cpu::backward_through(ctx, grads, call);
    input_grads.resize(11);  // order and site follow the 9 arguments backward_through knows
    if (ctx->saved_data["has_order"].toBool()) input_grads[9] = next_link;
    return input_grads;
  }
};

SyncOutputs sync_batch_norm_autograd(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                     const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                     const OptionalTensor& num_batches_tracked, std::optional<double> momentum,
                                     double eps, c10::string_view group_name, const OptionalTensor& order,
                                     int64_t site) {
  if (bnfx_cpu::needs_composite(input, weight, bias)) {
    static const auto composite = bnfx_cpu::typed_op<SyncSignature>("bnfx::sync_batch_norm_composite");
    return composite.call(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                          group_name, order, site);
  }
  auto o = SyncBatchNorm::apply(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                                std::string(group_name), order, site);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfx, CPU, m) {
  m.impl("sync_batch_norm", TORCH_FN(sync_batch_norm_cpu));
  m.impl("sync_batch_norm_backward", TORCH_FN(sync_batch_norm_backward_cpu));
}

TORCH_LIBRARY_IMPL(bnfx, AutogradCPU, m) { m.impl("sync_batch_norm", TORCH_FN(sync_batch_norm_autograd)); }
