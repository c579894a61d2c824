"""bnfx's CUDA kernels, written in Triton: ``kernels`` (the ``@triton.jit`` functions),
``launchers`` (take tensors, choose grid and blocks), ``aot`` (compile every variant ahead of
time: ``python -m bnfx.ops.triton aot``). Importing this package does not import Triton."""
