"""What the batch-norm ops' autograd formulas return, shared by every op."""

from __future__ import annotations

from torch import Tensor


def batch_norm_input_grads(grad_input: Tensor, grad_weight, grad_bias, weight, has_bias: bool, other_inputs: int):
    """``(grad_input, grad_weight, grad_bias, None, ...)`` for an op whose first three inputs
    are ``(input, weight, bias)``: None where weight or bias was None (the backward ops return
    empty tensors there), and for the ``other_inputs`` state and scalar inputs that follow."""
    if weight is None:
        grad_weight = grad_bias = None
    elif not has_bias:
        grad_bias = None
    return (grad_input, grad_weight, grad_bias) + (None,) * other_inputs
