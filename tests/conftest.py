"""Test-wide setup.

Triton kernels run on the CPU through the interpreter; the variable must be
set before anything imports triton (its limits: ARCHITECTURE.md, "Testing").
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


def cli_error(capsys, argv):
    """Run ``plr.cli.main(argv)``, expect a user error: exit code 2 and one
    ``plr: error: ...`` line on stderr (returned)."""
    from plr.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    lines = [line for line in err if line.startswith("plr: error: ")]
    assert len(lines) == 1, err
    return lines[0]
