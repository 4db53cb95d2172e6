"""Test-wide setup.

Triton kernels run on the CPU through the interpreter; the variable must be
set before anything imports triton (DESIGN.md section 6).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def triton_device():
    """Tests written for Triton create their tensors on the default device:
    the CPU under the interpreter, the GPU where Triton compiles for real."""
    if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available():
        with torch.device("cuda"):
            yield
    else:
        yield
