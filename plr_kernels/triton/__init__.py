"""Triton kernels of plr_kernels (CUDA; CPU tests run them under TRITON_INTERPRET=1).

Each module holds the ``@triton.jit`` kernels of one op (math only) and their
host launchers; autograd and ``torch.library`` registration live in the op's
module one level up.
"""
