"""The compiled extension plr_kernels._C: built, loadable, registered, matched
to the imported torch, and strict about its inputs.

These tests need the package installed (`pip install .`); they fail, rather
than skip, when the extension is missing, so a broken build cannot pass CI.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plr_kernels import _extension

REPO = Path(__file__).resolve().parents[1]
op = torch.ops.plr_kernels.target_rank if _extension.extension() is not None else None


def test_extension_loads():
    assert _extension.extension() is not None, _extension.extension_error()
    assert _extension.extension_error() is None


def test_build_info_matches_imported_torch():
    info = _extension.build_info()
    assert info["TORCH_VERSION"] == torch.__version__
    assert info["TORCH_CUDA_VERSION"] == torch.version.cuda
    assert isinstance(info["WITH_CUDA"], bool)


def test_cpu_kernel_registered():
    assert _extension.has_kernel("target_rank", "cpu")
    assert _extension.has_kernel("target_rank", "CPU")
    assert not _extension.has_kernel("no_such_op", "cpu")


def test_cuda_kernel_registered_when_built():
    info = _extension.build_info()
    if not (torch.version.cuda and info.get("WITH_CUDA")):
        pytest.skip("extension built without CUDA kernels")
    assert _extension.has_kernel("target_rank", "cuda")
    assert info["CUDA_ARCH_LIST"]


def test_version_mismatch_is_reported(monkeypatch):
    # _load() checks the recorded version before loading anything.
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    module, err = _extension._load()
    assert module is None
    assert "compiled against torch" in err and "0.0.0+other" in err
    assert "pip install --force-reinstall --no-deps ." in err


def test_source_checkout_uses_installed_build():
    """`python -m pytest` in the repo imports plr_kernels from the checkout,
    which has no build; the installed extension must be found anyway."""
    if list((REPO / "plr_kernels").glob("_C.*")):
        pytest.skip("the checkout holds an in-place build")
    code = ("import plr_kernels, plr_kernels._extension as x; "
            "print(plr_kernels.__file__); print(x.extension().__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    if not out[0].startswith(str(REPO)):
        pytest.skip("plr_kernels is installed in editable mode")
    assert not out[1].startswith(str(REPO))


def test_fake_kernel_gives_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        z = torch.empty(5, 8)
        out = op(z, torch.empty(11, 8), torch.zeros(5, dtype=torch.int64), -1, None, False)
    assert out.shape == (5,) and out.dtype == torch.int64


def test_opcheck():
    z, e = torch.randn(3, 4), torch.randn(9, 4)
    t = torch.tensor([0, 4, 8])
    ex = torch.tensor([[1, -1], [2, 4], [8, 8]])
    for args in [(z, e, t, -1, None, False), (z, e, t, 2, ex, True)]:
        torch.library.opcheck(op, args)


def _args(B=3, V=9, d=4):
    return dict(z=torch.randn(B, d), item_emb=torch.randn(V, d),
                target=torch.randint(0, V, (B,)), exclude_index=-1, exclude_items=None,
                pessimistic=False)


@pytest.mark.parametrize(
    "change,name",
    [
        (dict(z=torch.randn(3, 4, 1)), "z"),
        (dict(item_emb=torch.randn(9, 5)), "item_emb"),
        (dict(item_emb=torch.randn(9, 4, dtype=torch.float64)), "item_emb"),
        (dict(z=torch.randn(3, 4).int(), item_emb=torch.randn(9, 4).int()), "z"),
        (dict(target=torch.zeros(3, dtype=torch.int32)), "target"),
        (dict(target=torch.zeros(4, dtype=torch.int64)), "target"),
        (dict(target=torch.tensor([0, 9, 1])), "target"),
        (dict(target=torch.tensor([0, -1, 1])), "target"),
        (dict(exclude_index=-2), "exclude_index"),
        (dict(exclude_items=torch.zeros(3, 2, dtype=torch.int32)), "exclude_items"),
        (dict(exclude_items=torch.zeros(2, 2, dtype=torch.int64)), "exclude_items"),
        (dict(exclude_items=torch.zeros(3, dtype=torch.int64)), "exclude_items"),
        (dict(exclude_items=torch.tensor([[0], [9], [1]])), "exclude_items"),
    ],
)
def test_bad_inputs_name_the_argument(change, name):
    args = {**_args(), **change}
    with pytest.raises(RuntimeError, match=rf"target_rank: {name} "):
        op(**args)
