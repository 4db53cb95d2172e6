"""Loading of the compiled extension ``plr_kernels._C``, which never fails.

``import plr_kernels`` must work where the extension is missing or broken (a
source checkout, a torch upgraded after the install): the ops then fall back
to the reference or, when a compiled backend is asked for by name, raise an
error that quotes :func:`extension_error`.

The extension is looked for next to this file, else in the installed ``plr``
distribution: running from a source checkout (``python -m pytest`` in the
repository, a notebook in it) imports this package from the checkout, which
holds no build, while ``pip install .`` put one in site-packages.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Tuple

import torch

_REINSTALL = "reinstall with `pip install --force-reinstall --no-deps .`"
_state: Optional[Tuple[Optional[ModuleType], Optional[str]]] = None


def _so_in(directory: Path) -> Optional[Path]:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = directory / f"_C{suffix}"
        if path.is_file():
            return path
    return None


def _installed_dir() -> Optional[Path]:
    """plr_kernels/ of the installed distribution, when it holds a build."""
    # Every "plr" on sys.path: the checkout's own plr.egg-info (left by the
    # in-tree build) comes first and lists no binary.
    for dist in importlib.metadata.distributions(name="plr"):
        for f in dist.files or ():
            if f.parts[:1] == ("plr_kernels",) and f.name.startswith("_C."):
                path = Path(dist.locate_file(f)).resolve()
                if path.is_file():
                    return path.parent
    return None


def _build_info(directory: Path) -> dict:
    path = directory / "_build_info.py"
    if not path.is_file():
        return {}
    ns: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), ns)
    return ns


def _load() -> Tuple[Optional[ModuleType], Optional[str]]:
    here = Path(__file__).resolve().parent
    directory = here if _so_in(here) else _installed_dir()
    so = _so_in(directory) if directory else None
    if so is None:
        return None, "not built: plr_kernels._C is missing; install with `pip install .`"
    info = _build_info(directory)
    built = info.get("TORCH_VERSION")
    # Checked before loading: a build for another torch can fail with undefined
    # symbols or, worse, load and misbehave.
    if built is not None and built != torch.__version__:
        return None, (f"plr_kernels._C was compiled against torch {built} but torch "
                      f"{torch.__version__} is imported; {_REINSTALL}")
    try:
        if directory == here:
            module = importlib.import_module("plr_kernels._C")
        else:
            spec = importlib.util.spec_from_file_location("plr_kernels._C", so)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules["plr_kernels._C"] = module
    except ImportError as e:
        return None, f"plr_kernels._C ({so}) failed to load: {e}; {_REINSTALL}"
    return module, None


def compiled_op_exists(qualname: str) -> bool:
    """Whether the loaded ``plr_kernels._C`` defines the op ``qualname``
    ("plr_kernels::<op>", any device). The op modules register the fakes and
    the autograd of their compiled ops only then (csrc/ops.cpp names each
    op's module)."""
    if extension() is None:
        return False
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
    except RuntimeError:
        return False
    return True


def extension() -> Optional[ModuleType]:
    """The loaded ``plr_kernels._C`` module, or None (see :func:`extension_error`)."""
    global _state
    if _state is None:
        _state = _load()
    return _state[0]


def extension_error() -> Optional[str]:
    """Why the extension is unavailable, or None when it is loaded."""
    extension()
    return _state[1]


def build_info() -> dict:
    """What ``setup.py`` recorded: TORCH_VERSION, TORCH_CUDA_VERSION, WITH_CUDA,
    CUDA_ARCH_LIST (empty when the extension is not loaded)."""
    module = extension()
    if module is None:
        return {}
    info = _build_info(Path(module.__file__).resolve().parent)
    return {k: v for k, v in info.items() if k.isupper()}


# A trace-time constant for torch.compile: which kernels _C holds cannot change
# while the process runs, and dynamo cannot trace the dispatcher query.
@torch.compiler.assume_constant_result
def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether ``torch.ops.plr_kernels.<op_name>`` has a compiled kernel for
    ``device_type`` ("cpu"/"CPU", "cuda"/"CUDA")."""
    if extension() is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(
            f"plr_kernels::{op_name}", device_type.upper())
    except RuntimeError:  # no such op
        return False


# Loaded on import so that `import plr_kernels` is enough for
# torch.ops.plr_kernels.* to exist; failures only set extension_error().
extension()
