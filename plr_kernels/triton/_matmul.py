"""fp64 tile products for the Triton kernels.

The kernels take fp64 inputs so that tests can compare them with the fp64
reference. On the GPU, ``tl.dot`` of fp64 tiles fails to lower (triton 3.6 on
sm_90: "ConvertTritonGPUToLLVM" on the fp64 MMA layout), so fp64 tiles are
multiplied as a broadcast product summed over the shared axis instead -- slow
and register hungry, but fp64 is a testing precision only.
"""

import triton
import triton.language as tl


@triton.jit
def dot_f64(a, b):
    """``a [P, K] @ b [K, Q]`` in fp64 without tensor cores."""
    return tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, F64: tl.constexpr):
    """``tl.dot(a, b)`` for 16/32-bit tiles, :func:`dot_f64` for fp64 ones."""
    if F64:
        return dot_f64(a, b)
    else:
        return tl.dot(a, b, input_precision=PRECISION)
