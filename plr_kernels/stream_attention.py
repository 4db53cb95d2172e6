"""Stream-isolated causal attention over a shared prefix KV cache (DESIGN 4.1).

One reasoning step of one layer of PLR (Eq. 4-5): the query of stream m at
step t attends to every valid prefix key and to its own stream's keys 1..t,
never to another stream. The fused kernels read the prefix once for all M
streams; the reference expands nothing either but materialises the weights.

Backends: ``triton`` (CUDA; CPU under TRITON_INTERPRET=1), ``cpu`` (the C++
kernel of csrc/stream_attention.cpp, forward and backward), ``cuda`` (the
compiled CUDA forward, inference only) and ``torch`` (the reference). The
compiled ops ``torch.ops.plr_kernels.stream_attention_fwd/_bwd`` get their
autograd here; every backend draws the same dropout mask for the same seed.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

from . import _checks, _dispatch, _extension, reference


def _reference(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed):
    return reference.stream_attention(
        q, k_prefix, v_prefix, k_stream, v_stream,
        prefix_mask=prefix_mask, scale=scale, dropout_p=dropout_p, seed=seed,
    )


IMPLS = {"torch": _reference}


# -- Autograd shared by the Triton and the compiled forward ops, both
# (q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed)
# -> (o, lse), with a backward op taking (grad_o, those tensors, o, lse, scale,
# dropout_p, seed) -> the five input gradients.


def _setup_context(ctx, inputs, output):
    q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed = inputs
    ctx.save_for_backward(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, *output, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p


def _backward_through(backward_op):
    def backward(ctx, do, _dlse):
        # lse is an auxiliary output (the softmax statistics); it carries no gradient.
        q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, o, lse, seed = ctx.saved_tensors
        grads = backward_op(do, q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, o, lse, ctx.scale,
                            ctx.dropout_p, seed)
        return (*grads, None, None, None, None)

    return backward


# -- Triton: kernels in plr_kernels/triton/stream_attention.py, wrapped as
# torch.library custom ops (fake tensors for torch.compile, autograd through
# the backward kernel). triton is imported on first use, not with plr_kernels.

_FWD = "plr_kernels::stream_attention_triton_fwd"
_BWD = "plr_kernels::stream_attention_triton_bwd"


def _kernels():
    from .triton import stream_attention as kernels

    return kernels


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _seed_tensor(seed: Optional[int], dropout_p: float, device) -> Optional[torch.Tensor]:
    """The dropout seed as a 1-element int64 tensor (a tensor, so that a new
    seed per call neither recompiles under torch.compile nor syncs the GPU).
    ``None`` draws it from torch's global generator (torch.manual_seed)."""
    if dropout_p == 0.0:
        return None
    if seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    seed = int(seed) & (2**64 - 1)  # Philox keys on 64 bits; keep them, two's complement
    return torch.tensor([seed - 2**64 if seed >= 2**63 else seed], dtype=torch.int64, device=device)


def triton_dropout_mask(b: int, h: int, m: int, n: int, s: int, dropout_p: float, seed: int,
                        device="cpu") -> torch.Tensor:
    """Debug path: the bool keep-mask ``[B,H,M,N+S]`` (prefix keys first) that
    ``stream_attention(..., dropout_p=p, seed=seed, backend="triton")`` uses,
    for ``reference.stream_attention(..., dropout_mask=...)``."""
    return _kernels().dropout_mask(b, h, m, n, s, dropout_p, _seed_tensor(seed, 1.0, torch.device(device)))


if _dispatch.triton_importable():

    @torch.library.custom_op(_FWD, mutates_args=())
    def _triton_fwd(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor, k_stream: torch.Tensor,
                    v_stream: torch.Tensor, prefix_mask: Optional[torch.Tensor], scale: float, dropout_p: float,
                    seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        return _kernels().forward(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed)

    @_triton_fwd.register_fake
    def _(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))

    @torch.library.custom_op(_BWD, mutates_args=())
    def _triton_bwd(do: torch.Tensor, q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
                    k_stream: torch.Tensor, v_stream: torch.Tensor, prefix_mask: Optional[torch.Tensor],
                    o: torch.Tensor, lse: torch.Tensor, scale: float, dropout_p: float,
                    seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
        return _kernels().backward(do, q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, o, lse, scale,
                                   dropout_p, seed)

    @_triton_bwd.register_fake
    def _(do, q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, o, lse, scale, dropout_p, seed):
        return (q.new_empty(q.shape), q.new_empty(k_prefix.shape), q.new_empty(v_prefix.shape),
                q.new_empty(k_stream.shape), q.new_empty(v_stream.shape))

    _triton_fwd.register_autograd(_backward_through(_triton_bwd), setup_context=_setup_context)

    def _triton(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        o, _ = torch.ops.plr_kernels.stream_attention_triton_fwd(
            q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p,
            _seed_tensor(seed, dropout_p, q.device))
        return o

    IMPLS["triton"] = _triton


# -- Compiled kernels of plr_kernels._C: torch.ops.plr_kernels.stream_attention_fwd
# / _bwd (schemas in csrc/ops.cpp, CPU kernels in csrc/stream_attention.cpp,
# fakes in _extension.py). Autograd is registered on the C++ op from here, the
# backward calling stream_attention_bwd; only when the loaded build has the op.

_COMPILED_FWD = "plr_kernels::stream_attention_fwd"


def _compiled_op_exists() -> bool:
    if _extension.extension() is None:
        return False
    try:
        torch._C._dispatch_find_schema_or_throw(_COMPILED_FWD, "")
    except RuntimeError:
        return False
    return True


def _compiled_fwd(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, _ = torch.ops.plr_kernels.stream_attention_fwd(
        q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p,
        _seed_tensor(seed, dropout_p, q.device))
    return o


def _cuda(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed):
    # The CUDA kernel (csrc/cuda/) is a forward for inference: there is no CUDA
    # stream_attention_bwd, and attention dropout only matters in training.
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k_prefix, v_prefix, k_stream, v_stream))
    if needs_grad or dropout_p > 0.0:
        why = "a gradient is required" if needs_grad else f"dropout_p={dropout_p} > 0"
        raise _dispatch.BackendUnavailableError(
            f"backend='cuda' cannot run stream_attention here: {why}, but the CUDA kernel is "
            "inference-only (no backward, no dropout); use backend='triton' (or 'auto') for "
            "training, or call it under torch.no_grad() with dropout_p=0")
    return _compiled_fwd(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed)


def cpu_dropout_mask(b: int, h: int, m: int, n: int, s: int, dropout_p: float, seed: int) -> torch.Tensor:
    """Debug path: the bool keep-mask ``[B,H,M,N+S]`` (prefix keys first) that
    ``stream_attention(..., dropout_p=p, seed=seed, backend="cpu")`` uses, for
    ``reference.stream_attention(..., dropout_mask=...)``.

    Read off the compiled forward itself: with q = 0 every probability is
    1/(N+S), and with value rows the unit vectors e_j, o[..., j] =
    keep_j / ((N+S)(1-p)), which is > 0 exactly where key j is kept. Builds
    B*H*N*(N+S) values: meant for tests on small shapes.
    """
    if not _extension.has_kernel("stream_attention_fwd", "cpu"):
        raise _dispatch.BackendUnavailableError(
            f"cpu_dropout_mask needs the compiled CPU kernel: {_extension.extension_error() or 'not built'}")
    if not 0.0 < dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in (0, 1), got {dropout_p!r}")
    width = n + s
    eye = torch.eye(width, dtype=torch.float32)
    o, _ = torch.ops.plr_kernels.stream_attention_fwd(
        torch.zeros(b, h, m, width), torch.zeros(b, h, n, width), eye[:n].expand(b, h, n, width),
        torch.zeros(b, h, m, s, width), eye[n:].expand(b, h, m, s, width), None, 1.0, float(dropout_p),
        _seed_tensor(seed, dropout_p, torch.device("cpu")))
    return o > 0


if _compiled_op_exists():

    torch.library.register_autograd(_COMPILED_FWD, _backward_through(torch.ops.plr_kernels.stream_attention_bwd),
                                    setup_context=_setup_context)

# Listed even without a build: _dispatch checks that the loaded _C has the
# kernel for the device, and its error then says why it is missing.
IMPLS["cpu"] = _compiled_fwd
IMPLS["cuda"] = _cuda


@torch.compiler.assume_constant_result
def _backend_name(backend: str, device_type: str, device_index: Optional[int], inference: bool) -> str:
    """The IMPLS entry that runs for ``backend`` on the device. A trace-time
    constant under torch.compile: which kernels _C holds cannot change while
    the process runs, and the lookup (torch._C dispatcher queries) is not
    traceable by dynamo."""
    return _resolve_backend_name(backend, device_type, device_index, inference, _dispatch.triton_interpreting())


# ``auto`` on a GPU for inference (no gradient, no dropout): the compiled CUDA
# forward first. Measured on an H100 (benchmarks/RESULTS.md, issue 6; bf16,
# H=2, D=128, N=50): 0.042 / 0.048 ms against Triton's 0.235 / 0.191 ms at
# B=64, M=1 / 8, and 0.110 / 0.192 against 0.202 / 0.185 at B=1024.
_CUDA_INFERENCE_ORDER = ("cuda", "triton")


@functools.lru_cache(maxsize=None)
def _resolve_backend_name(backend: str, device_type: str, device_index: Optional[int], inference: bool,
                          interpreting: bool) -> str:
    """``_backend_name``, resolved once per (backend, device, inference, TRITON_INTERPRET):
    the dispatcher queries cost more than a small reasoning step's kernel."""
    impl = _dispatch.resolve("stream_attention", backend, torch.device(device_type, device_index), IMPLS,
                             kernel="stream_attention_fwd",
                             cuda_order=_CUDA_INFERENCE_ORDER if inference else None)
    return next(name for name, fn in IMPLS.items() if fn is impl)


def check_stream_attention_args(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed):
    _checks.check_tensor("q", q, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    b, h, m, d = q.shape
    n = k_prefix.shape[2] if isinstance(k_prefix, torch.Tensor) and k_prefix.dim() == 4 else None
    for name, t in (("k_prefix", k_prefix), ("v_prefix", v_prefix)):
        _checks.check_tensor(name, t, ndim=4, shape=(b, h, n, d), device=q.device)
    s = k_stream.shape[3] if isinstance(k_stream, torch.Tensor) and k_stream.dim() == 5 else None
    for name, t in (("k_stream", k_stream), ("v_stream", v_stream)):
        _checks.check_tensor(name, t, ndim=5, shape=(b, h, m, s, d), device=q.device)
    if s == 0:
        raise ValueError("k_stream: expected S >= 1 (the current reasoning token is its own key), got S=0")
    _checks.check_same_dtype(
        ("q", "k_prefix", "v_prefix", "k_stream", "v_stream"), (q, k_prefix, v_prefix, k_stream, v_stream)
    )
    if prefix_mask is not None:
        _checks.check_tensor("prefix_mask", prefix_mask, dtypes=(torch.bool,), shape=(b, n), device=q.device)
    _checks.check_attention_scalars(scale, dropout_p, seed)


def stream_attention(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    k_stream: torch.Tensor,
    v_stream: torch.Tensor,
    *,
    prefix_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    causal_prefix: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of M stream queries over a shared prefix and their own streams.

    Args:
        q: ``[B, H, M, D]`` queries of the current step, one per stream.
        k_prefix, v_prefix: ``[B, H, N, D]`` the prefix KV cache, shared by all streams.
        k_stream, v_stream: ``[B, H, M, S, D]`` each stream's own reasoning
            tokens so far, the current one included (S >= 1).
        prefix_mask: ``[B, N]`` bool, True = valid key (None: all valid).
        scale: softmax scale, default ``1/sqrt(D)``.
        dropout_p: attention dropout on the probabilities (training).
        seed: seed of the dropout mask (None: the global generator).
        causal_prefix: the same step for every prefix end of one encoder
            pass (training on all prefixes of a sequence): ``q [B,H,N,M,D]``,
            ``k_stream, v_stream [B,H,N,M,S,D]``, ``k_prefix, v_prefix
            [B,H,N,D]`` read once per (b, h); query (b,h,n,m) attends to the
            valid prefix keys j <= n and to ``k_stream[b,h,n,m]``; returns
            ``o [B,H,N,M,D]``. See
            :func:`plr_kernels.causal_stream_attention.causal_stream_attention`.
        backend: ``auto | triton | cuda | cpu | torch``. ``triton``: CUDA
            tensors (or CPU tensors under ``TRITON_INTERPRET=1``), forward and
            backward; ``cpu``: the compiled C++ kernel for CPU tensors, forward
            and backward; ``cuda``: the compiled CUDA kernel, inference only
            (raises when a gradient is needed or ``dropout_p > 0``: train with
            ``triton``); ``torch``: the reference. ``auto`` picks, for CUDA
            tensors, ``cuda`` when no gradient is needed and ``dropout_p`` is 0
            (it measured fastest), else ``triton``; ``cpu`` for CPU tensors
            when ``plr_kernels._C`` is built; else ``torch``. The same ``seed`` gives the same dropout
            mask on ``triton`` and ``cpu``.

    Returns:
        ``o [B, H, M, D]`` (``[B, H, N, M, D]`` with ``causal_prefix``).
    """
    if not isinstance(causal_prefix, bool):
        raise TypeError(f"causal_prefix: expected a bool, got {type(causal_prefix).__name__}")
    if causal_prefix:
        from .causal_stream_attention import causal_stream_attention

        return causal_stream_attention(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask=prefix_mask,
                                       scale=scale, dropout_p=dropout_p, seed=seed, backend=backend)
    check_stream_attention_args(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed)
    inference = dropout_p == 0.0 and not (torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k_prefix, v_prefix, k_stream, v_stream)))
    impl = IMPLS[_backend_name(backend, q.device.type, q.device.index, inference)]
    return impl(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, float(dropout_p), seed)


# The causal-prefix form (stream_attention(..., causal_prefix=True)) registers
# its custom ops on import; it reuses the autograd helpers above.
from . import causal_stream_attention as _causal  # noqa: E402,F401
