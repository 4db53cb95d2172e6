"""In-tree PEP 517 backend: setuptools.build_meta, but compiling against the
torch of the environment being installed into.

Why: with build isolation, pip builds in a fresh environment and would install
its own torch there (the newest allowed, e.g. a CUDA 2.14.1) while the user
runs, say, torch 2.13.0+cpu; an extension compiled against one torch does not
load in another. pip runs these hooks with the *target* interpreter
(sys.executable) but hides its site-packages through PYTHONPATH,
PYTHONNOUSERSITE and a sitecustomize in the build environment. So we ask that
interpreter, with those variables removed, where its torch is; if it has one,
its site-packages directory goes at the END of sys.path (the build
environment's setuptools and ninja still win) and torch is not requested. If
it has none (fresh environment, `python -m build`), torch is requested as a
build dependency, and the runtime dependency resolves to the same capped
version. PLR_BUILD_ISOLATED_TORCH=1 skips the probe (always the build
environment's torch).
"""
import json
import os
import subprocess
import sys

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403  (every other hook as is)

_PROBE = r"""
import importlib.metadata, importlib.util, json, os
spec = importlib.util.find_spec("torch")
if spec is None or not spec.origin:
    print(json.dumps(None))
else:
    print(json.dumps({"site": os.path.dirname(os.path.dirname(spec.origin)),
                      "version": importlib.metadata.version("torch")}))
"""

# The variables through which pip points the interpreter at the build
# environment (PYTHONPATH carries its sitecustomize). PIP_* variables only
# configure pip itself, never the interpreter, so they can stay.
_HIDING_VARS = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME", "PYTHONSAFEPATH")

_target_torch = "unset"


def _log(msg):
    print(f"[plr build] {msg}", file=sys.stderr, flush=True)


def target_torch():
    """{'site': dir, 'version': str} of the target environment's torch, or None."""
    global _target_torch
    if _target_torch != "unset":
        return _target_torch
    _target_torch = None
    if os.environ.get("PLR_BUILD_ISOLATED_TORCH"):
        _log("PLR_BUILD_ISOLATED_TORCH is set: using the build environment's torch")
        return None
    env = {k: v for k, v in os.environ.items() if k not in _HIDING_VARS}
    try:
        res = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                             text=True, timeout=120)
        info = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        info = None
    if info:
        _target_torch = info
    return _target_torch


def _use_target_torch():
    info = target_torch()
    if info is None:
        return False
    if info["site"] not in sys.path:
        sys.path.append(info["site"])
    return True


def _requires(hook, config_settings):
    reqs = list(hook(config_settings))
    info = target_torch()
    if info is None:
        _log(f"no torch found for {sys.executable}: requesting torch in the build environment")
        reqs.append("torch")
    else:
        _log(f"target environment has torch {info['version']} at {info['site']}")
    return reqs


def get_requires_for_build_wheel(config_settings=None):
    _use_target_torch()  # setup.py runs in this hook too
    return _requires(_orig.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings=None):
    _use_target_torch()
    return _requires(_orig.get_requires_for_build_editable, config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _use_target_torch()
    return _orig.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _use_target_torch()
    return _orig.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def _check_torch():
    _use_target_torch()
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "plr: building plr_kernels._C needs torch, but none is importable "
            f"({e}). Install torch first, or let pip's build isolation fetch it.") from e
    # setup.py reports the torch it compiles against.


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _check_torch()
    return _orig.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _check_torch()
    return _orig.build_editable(wheel_directory, config_settings, metadata_directory)
