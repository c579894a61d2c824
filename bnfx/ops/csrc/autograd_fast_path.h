// What the C++ autograd kernels of the bnfx ops (ghost_autograd_cpu.cpp, sync_autograd_cpu.cpp)
// check before they compute a call in C++ rather than send it below autograd to the op's
// registered kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <atomic>
#include <optional>

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

// Input the C++ kernels take: plain, contiguous float or double, [B, C, ...].
inline bool kernel_input(const at::Tensor& input) {
  return plain_cpu(input) && input.dim() >= 2 && input.is_contiguous() &&
         (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble);
}

}  // namespace bnfx_cpu
