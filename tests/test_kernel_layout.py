"""The layout of plr_kernels: every module imports on its own (no import
cycles), and every op's fused algebra equals the reference that states it as
the paper writes it."""

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import plr_kernels
from plr_kernels import reference as ref
from plr_kernels import vocab_pass

ROOT = Path(plr_kernels.__file__).resolve().parent.parent
MODULES = sorted(info.name for info in pkgutil.walk_packages(plr_kernels.__path__, prefix="plr_kernels.")
                 if info.name != "plr_kernels._C")

# One interpreter imports torch (and triton), then forks a child per module
# that imports that module first, nothing of plr_kernels before it: a cycle (a
# imports b imports a) fails as an ImportError / AttributeError of a partially
# initialised module in at least one of these orders. The package is entered
# without running its __init__ (which imports every op in one fixed order), so
# each child runs exactly the module and what it imports.
_PROBE = """
import importlib, os, sys, traceback, types
import torch
try:
    import triton  # noqa: F401
except ImportError:
    pass
root = sys.argv[1]
failed = []
for name in sys.argv[2:]:
    pid = os.fork()
    if pid == 0:
        try:
            package = types.ModuleType("plr_kernels")
            package.__path__ = [os.path.join(root, "plr_kernels")]
            sys.modules["plr_kernels"] = package
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED", " ".join(failed))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the probe forks a child per module")
def test_every_module_imports_alone():
    names = [n for n in MODULES if _has_triton() or not n.startswith("plr_kernels.triton")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT), *names], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    failed = run.stdout.strip().splitlines()[-1].split()[1:]
    assert len(names) >= 15 and not failed, (failed, run.stderr[-3000:])


def _imports_of(path: Path, module: str):
    """The plr_kernels modules that ``module`` (at ``path``) imports anywhere
    in its source, function bodies included (a lazy import is still a
    dependency)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("plr_kernels."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            elif node.module and node.module.startswith("plr_kernels"):
                base = node.module
            else:
                continue
            # "from . import a, b" names modules; "from .a import f" names a module's attribute.
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name in MODULES and name != module}


def test_no_import_cycles_in_the_source():
    # The package's __init__ is left out: it imports every op to export it.
    graph = {}
    for name in MODULES:
        rel = Path(*name.split(".")[1:])
        path = ROOT / "plr_kernels" / rel.with_suffix(".py")
        if not path.exists():
            path = ROOT / "plr_kernels" / rel / "__init__.py"
        if path.exists():
            graph[name] = _imports_of(path, name)
    assert graph["plr_kernels.multi_pair_kl"] >= {"plr_kernels.vocab_pass", "plr_kernels.reference"}
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(trail + [node, dep])
            if dep not in state:
                visit(dep, trail + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_module_list_covers_the_ops():
    for name in ("vocab_pass", "multi_pair_kl", "linear_cross_entropy", "reasoning_losses", "stream_attention",
                 "causal_stream_attention", "target_rank", "topk", "_checks", "_attention", "triton.vocab_pass"):
        assert f"plr_kernels.{name}" in MODULES


def _has_triton():
    import importlib.util

    return importlib.util.find_spec("triton") is not None


# -- PLR Eq. 7: the mu-form of plr_kernels/vocab_pass.py equals the literal mean of KL over pairs --


@pytest.mark.parametrize("b,k,v,d", [(1, 2, 2, 1), (3, 3, 7, 5), (2, 6, 97, 16)])
@pytest.mark.parametrize("exclude", [None, "first", "last"])
@pytest.mark.parametrize("detach_target", [False, True])
def test_mu_form_equals_the_literal_eq_7(b, k, v, d, exclude, detach_target):
    exclude_index = {None: None, "first": 0, "last": v - 1}[exclude]
    h = torch.randn(b, k, d, dtype=torch.float64, requires_grad=True)
    e = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    stats = vocab_pass.STATS["torch"]
    got = vocab_pass.multi_pair_kl_from(stats, h, e, 0.7, exclude_index, detach_target)
    want = ref.multi_pair_kl(h, e, temperature=0.7, exclude_index=exclude_index, detach_target=detach_target)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    w = torch.randn(b, dtype=torch.float64)
    for a, c in zip(torch.autograd.grad((got * w).sum(), (h, e)), torch.autograd.grad((want * w).sum(), (h, e))):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_reference_eq_7_is_the_mean_over_ordered_pairs():
    # Two states, two items: KL(p_1||p_2) and KL(p_2||p_1) by hand.
    h = torch.tensor([[[1.0], [-0.5]]], dtype=torch.float64)
    e = torch.tensor([[0.3], [2.0]], dtype=torch.float64)
    p = torch.softmax(h[0] @ e.T, dim=-1)
    kl12 = (p[0] * (p[0] / p[1]).log()).sum()
    kl21 = (p[1] * (p[1] / p[0]).log()).sum()
    torch.testing.assert_close(ref.multi_pair_kl(h, e)[0], (kl12 + kl21) / 2, rtol=1e-14, atol=0)


def test_cross_entropy_and_combined_losses_from_stats_equal_the_reference():
    b, k, v, d, tau = 3, 4, 11, 5, 0.3
    states = torch.randn(b, k, d, dtype=torch.float64, requires_grad=True)
    z = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    e = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    target = torch.randint(1, v, (b,))
    stats = vocab_pass.STATS["torch"]
    ce = vocab_pass.cross_entropy_from(stats, z, e, target, tau, 0)
    torch.testing.assert_close(ce, ref.linear_cross_entropy(z, e, target, temperature=tau, exclude_index=0,
                                                            reduction="none"), rtol=1e-12, atol=1e-13)
    kl, ce2 = vocab_pass.reasoning_losses_from(stats, states, z, e, target, tau, 0, False)
    torch.testing.assert_close(kl, ref.multi_pair_kl(states, e, temperature=tau, exclude_index=0),
                               rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ce2, ce, rtol=0, atol=0)
