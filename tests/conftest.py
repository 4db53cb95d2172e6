"""Test-wide setup.

Triton kernels run on the CPU through the interpreter; the variable must be
set before anything imports triton (its limits: ARCHITECTURE.md, "Testing").
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def benchmark_script(name: str):
    """The module of ``benchmarks/<name>.py`` (a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def poll_training_state(proc, state_path, ready, timeout, interval=0.02):
    """Poll ``state_path`` (a run's ``last.pt``) while ``proc`` runs; return its
    training state as soon as ``ready(state)`` holds, or None when ``proc``
    ended or ``timeout`` seconds passed first (for kill-and-resume tests)."""
    import time

    import torch

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if state_path.is_file():
            try:
                state = torch.load(state_path, weights_only=True)["state"]
            except Exception:  # noqa: BLE001 - being replaced right now; atomic, so retry
                state = None
            if state and ready(state):
                return state
        time.sleep(interval)
    return None
