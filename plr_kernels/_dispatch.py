"""Backend selection, per op: ``auto | triton | cuda | cpu | torch``.

``auto`` picks Triton for CUDA tensors when a Triton kernel exists for the op,
then the compiled CUDA kernel, else the reference (an op may pass its own
order, ``cuda_order``: stream_attention's inference puts the CUDA kernel
first; topk on a GPU times its candidates, plr_kernels/_autotune.py); for CPU tensors the compiled
C++ kernel when ``plr_kernels._C`` is built and has the op, else the reference.
A backend asked for by name that cannot run is an error, never a silent
fallback.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch

from . import _extension

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")


class BackendUnavailableError(RuntimeError):
    """The backend asked for by name cannot run this op on these tensors."""


def _compiled_kernel(op: str, device_type: str):
    """The ``torch.ops.plr_kernels.<op>`` callable if ``_C`` has it for the device."""
    if _extension.extension() is None or not _extension.has_kernel(op, device_type):
        return None
    return getattr(torch.ops.plr_kernels, op)


def available(op: str, impls: Dict[str, Callable], device: torch.device,
              kernel: Optional[str] = None) -> Dict[str, Callable]:
    """Backends that can run ``op`` on ``device`` now, by name. ``kernel`` is
    the ``torch.ops.plr_kernels`` op the compiled backends call (default ``op``)."""
    kernel = kernel or op
    found = {"torch": impls["torch"]}
    if device.type == "cpu" and "cpu" in impls and _compiled_kernel(kernel, "CPU") is not None:
        found["cpu"] = impls["cpu"]
    if device.type == "cuda" and "cuda" in impls and _compiled_kernel(kernel, "CUDA") is not None:
        found["cuda"] = impls["cuda"]
    if "triton" in impls and (device.type == "cuda" or (device.type == "cpu" and triton_interpreting())):
        found["triton"] = impls["triton"]
    return found


def triton_interpreting() -> bool:
    """Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (tests only:
    ``auto`` never picks the interpreter, it is orders of magnitude slower)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve(op: str, backend: str, device: torch.device, impls: Dict[str, Callable],
            kernel: Optional[str] = None, cuda_order: Optional[tuple] = None) -> Callable:
    """The implementation of ``op`` to run for ``backend`` on ``device``.

    ``impls`` maps backend names to callables; the ``torch`` entry is required.
    ``kernel``: the compiled ``torch.ops.plr_kernels`` op behind the ``cpu`` /
    ``cuda`` entries when its name is not ``op`` (e.g. ``vocab_forward``).
    ``cuda_order``: the preference of ``auto`` for CUDA tensors when it is
    not the default (triton, cuda, torch).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    found = available(op, impls, device, kernel)
    if backend == "auto":
        if device.type == "cuda":
            order = tuple(cuda_order or ("triton", "cuda")) + ("torch",)
        else:
            order = ("cpu", "torch")
        return next(found[name] for name in order if name in found)
    if backend in found:
        return found[backend]
    raise BackendUnavailableError(_why_unavailable(op, backend, device, impls))


def _why_unavailable(op: str, backend: str, device: torch.device, impls) -> str:
    head = f"backend={backend!r} cannot run {op} on {device.type} tensors: "
    if backend not in impls:
        return head + f"plr_kernels has no {backend} implementation of {op} (it has: {sorted(impls)})"
    if backend in ("cpu", "cuda"):
        want = "cpu" if backend == "cpu" else "cuda"
        if device.type != want:
            return head + f"the {backend} kernel needs {want} tensors"
        err = _extension.extension_error()
        if err:
            return head + f"the compiled extension plr_kernels._C is unavailable ({err})"
        return head + f"plr_kernels._C was built without a {backend} kernel for {op}"
    if not triton_importable():
        return head + "triton is not installed (pip install triton; it comes with CUDA builds of torch)"
    return head + "the triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)"


def triton_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None
