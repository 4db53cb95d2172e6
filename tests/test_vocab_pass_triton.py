"""Triton vocabulary pass (plr_kernels/triton/vocab_pass.py) vs the reference: multi-pair KL (PLR Eq. 7),
next-item cross-entropy (L_NIP, PLR Eq. 11) and the combined one-pass entry point.

Runs under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py), so shapes are
tiny; V is never a multiple of the item block (32 interpreted), rows B*K are
never a multiple of the row block (16).
"""

import pytest
import torch

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("triton_device")

import plr_kernels as K  # noqa: E402
from plr_kernels import reference as ref  # noqa: E402
from plr_kernels.reasoning_losses import reasoning_losses  # noqa: E402

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 2e-4}


def rel_err(a, b, floor=1e-30):
    """||a - b|| / max(||b||, floor); ``floor`` where the truth is exactly 0 (V = 1)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(floor)).item()


def kl_inputs(b, k, v, d, dtype, scale=1.0):
    h = (scale * torch.randn(b, k, d, dtype=dtype)).requires_grad_()
    e = (scale * torch.randn(v, d, dtype=dtype)).requires_grad_()
    return h, e


def value_and_grads(fn, inputs, weight):
    out = fn(*inputs)
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    return out, grads


# V in {1, 7, 97, 1000} x K in {2, 3, 6}, both conventions, both dtypes: a
# covering set (every V with every dtype, every K, both detach values).
KL_CASES = [
    # (V, K, dtype, detach, temperature, exclude_index)
    (1, 2, torch.float64, False, 1.0, None),
    (1, 3, torch.float32, True, 0.5, None),
    (7, 2, torch.float32, False, 0.07, 0),
    (7, 6, torch.float64, True, 1.0, 3),
    (97, 3, torch.float64, False, 0.07, 0),
    (97, 3, torch.float64, True, 0.07, 0),
    (97, 6, torch.float32, True, 2.0, None),
    (97, 2, torch.float32, False, 0.3, 96),
    (1000, 3, torch.float64, True, 0.1, 0),
    (1000, 2, torch.float32, False, 0.07, 0),
]


@pytest.mark.parametrize("v,k,dtype,detach,tau,exclude", KL_CASES)
def test_multi_pair_kl_value_and_gradients(v, k, dtype, detach, tau, exclude):
    b, d = 3, 8
    h, e = kl_inputs(b, k, v, d, dtype)
    w = torch.randn(b, dtype=dtype)
    kw = dict(temperature=tau, exclude_index=exclude, detach_target=detach)
    out, (dh, de) = value_and_grads(lambda h, e: K.multi_pair_kl(h, e, backend="triton", **kw), (h, e), w)
    exp, (dh_r, de_r) = value_and_grads(lambda h, e: ref.multi_pair_kl(h, e, **kw), (h, e), w)
    assert out.shape == (b,) and out.dtype == dtype
    # With one item every p_k is the same point mass: KL and its gradient are 0.
    floor = 1.0 if v == 1 else 1e-30
    assert rel_err(out, exp, floor) < TOL[dtype]
    assert rel_err(dh, dh_r, floor) < GRAD_TOL[dtype]
    assert rel_err(de, de_r, floor) < GRAD_TOL[dtype]
    if exclude is not None:
        # The padding item is in no softmax: its row of dE is exactly zero.
        assert torch.count_nonzero(de[exclude]) == 0


def test_the_two_kl_conventions_differ_in_gradient_not_in_value():
    h, e = kl_inputs(2, 3, 29, 8, torch.float64)
    full = K.multi_pair_kl(h, e, temperature=0.2, backend="triton")
    sg = K.multi_pair_kl(h, e, temperature=0.2, detach_target=True, backend="triton")
    assert rel_err(full, sg) < 1e-12
    g_full = torch.autograd.grad(full.sum(), (h, e))
    g_sg = torch.autograd.grad(sg.sum(), (h, e))
    assert rel_err(g_full[0], g_sg[0]) > 1e-3 and rel_err(g_full[1], g_sg[1]) > 1e-3


def test_multi_pair_kl_gradcheck():
    # Full-gradient convention only: with detach_target the gradient is on
    # purpose not the derivative of the value (it is checked against autograd of
    # the reference above, in float64, to ~1e-15).
    h, e = kl_inputs(2, 3, 7, 4, torch.float64)
    fn = lambda h, e: K.multi_pair_kl(h, e, temperature=0.5, exclude_index=0, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, e), eps=1e-6, atol=1e-7, rtol=1e-5)


CE_CASES = [
    # (V, dtype, reduction, temperature, exclude_index)
    (1, torch.float64, "none", 1.0, None),
    (7, torch.float32, "mean", 0.07, 0),
    (97, torch.float64, "sum", 0.5, 0),
    (97, torch.float32, "none", 1.0, 50),
    (1000, torch.float64, "mean", 0.07, 0),
]


@pytest.mark.parametrize("v,dtype,reduction,tau,exclude", CE_CASES)
def test_linear_cross_entropy_value_and_gradients(v, dtype, reduction, tau, exclude):
    b, d = 5, 8
    z = torch.randn(b, d, dtype=dtype, requires_grad=True)
    e = torch.randn(v, d, dtype=dtype, requires_grad=True)
    low = 1 if exclude == 0 else 0
    target = torch.randint(low, v, (b,))
    if exclude is not None:
        target[target == exclude] = (exclude + 1) % v
    kw = dict(temperature=tau, exclude_index=exclude, reduction=reduction)
    w = torch.randn(b if reduction == "none" else (), dtype=dtype)
    out, (dz, de) = value_and_grads(lambda z, e: K.linear_cross_entropy(z, e, target, backend="triton", **kw),
                                    (z, e), w)
    exp, (dz_r, de_r) = value_and_grads(lambda z, e: ref.linear_cross_entropy(z, e, target, **kw), (z, e), w)
    assert out.shape == exp.shape and out.dtype == dtype
    assert rel_err(out, exp) < TOL[dtype]
    assert rel_err(dz, dz_r) < GRAD_TOL[dtype]
    assert rel_err(de, de_r) < GRAD_TOL[dtype]


def test_cross_entropy_gradient_is_mu_minus_target_embedding():
    # dCE/dz = (mu_z - e_y) / tau, with mu from the softmax over E.
    z = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    e = torch.randn(33, 8, dtype=torch.float64)
    target = torch.randint(1, 33, (4,))
    tau = 0.3
    (dz,) = torch.autograd.grad(K.linear_cross_entropy(z, e, target, temperature=tau, exclude_index=0,
                                                       reduction="sum", backend="triton"), (z,))
    logits = (z @ e.T / tau).detach()
    logits[:, 0] = float("-inf")
    mu = torch.softmax(logits, dim=-1) @ e
    assert rel_err(dz, (mu - e[target]) / tau) < 1e-12


def test_linear_cross_entropy_gradcheck():
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    e = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 6, 3])
    fn = lambda z, e: K.linear_cross_entropy(z, e, target, temperature=0.7, exclude_index=0,  # noqa: E731
                                             reduction="none", backend="triton")
    assert torch.autograd.gradcheck(fn, (z, e), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_logits_are_finite(dtype):
    # |logit| ~ 1e4 and beyond: online softmax must neither overflow nor give NaN.
    b, k, v, d = 2, 3, 97, 8
    h, e = kl_inputs(b, k, v, d, dtype, scale=12.0)
    z = (12.0 * torch.randn(b, d, dtype=dtype)).requires_grad_()
    target = torch.randint(1, v, (b,))
    with torch.no_grad():
        assert (h.detach() @ e.detach().T / 0.07).abs().max() > 1e4
    for detach in (False, True):
        kl, ce = reasoning_losses(h, z, e, target, temperature=0.07, exclude_index=0, detach_target=detach,
                                  backend="triton")
        kl_r = ref.multi_pair_kl(h, e, temperature=0.07, exclude_index=0, detach_target=detach)
        ce_r = ref.linear_cross_entropy(z, e, target, temperature=0.07, exclude_index=0, reduction="none")
        grads = torch.autograd.grad((kl + ce).sum(), (h, z, e))
        assert torch.isfinite(kl).all() and torch.isfinite(ce).all()
        assert all(torch.isfinite(g).all() for g in grads)
        assert rel_err(kl, kl_r) < 1e-4 and rel_err(ce, ce_r) < 1e-4


@pytest.mark.parametrize("dtype,detach", [(torch.float64, False), (torch.float64, True), (torch.float32, False)])
def test_reasoning_losses_equal_the_two_ops(dtype, detach):
    b, k, v, d = 3, 4, 97, 8
    states, e = kl_inputs(b, k, v, d, dtype)
    z = torch.randn(b, d, dtype=dtype, requires_grad=True)
    target = torch.randint(1, v, (b,))
    w1, w2 = torch.randn(b, dtype=dtype), torch.randn(b, dtype=dtype)
    kw = dict(temperature=0.2, exclude_index=0, detach_target=detach)
    kl, ce = reasoning_losses(states, z, e, target, backend="triton", **kw)
    grads = torch.autograd.grad((kl * w1 + ce * w2).sum(), (states, z, e))
    kl_r = ref.multi_pair_kl(states, e, **kw)
    ce_r = ref.linear_cross_entropy(z, e, target, temperature=0.2, exclude_index=0, reduction="none")
    grads_r = torch.autograd.grad((kl_r * w1 + ce_r * w2).sum(), (states, z, e))
    assert rel_err(kl, kl_r) < TOL[dtype] and rel_err(ce, ce_r) < TOL[dtype]
    for g, g_r in zip(grads, grads_r):
        assert rel_err(g, g_r) < GRAD_TOL[dtype]
    # backend="torch" is the reference pair.
    kl_t, ce_t = reasoning_losses(states, z, e, target, backend="torch", **kw)
    assert torch.equal(kl_t, kl_r) and torch.equal(ce_t, ce_r)


def test_reasoning_losses_gradcheck():
    states = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    e = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([2, 5])
    fn = lambda s, z, e: reasoning_losses(s, z, e, target, temperature=0.5, exclude_index=0,  # noqa: E731
                                          backend="triton")
    assert torch.autograd.gradcheck(fn, (states, z, e), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_reasoning_losses_checks_arguments():
    states, e = torch.randn(2, 3, 4), torch.randn(7, 4)
    with pytest.raises(ValueError, match=r"z: expected shape \[2, 4\]"):
        reasoning_losses(states, torch.randn(3, 4), e, torch.tensor([1, 2]), backend="triton")
    with pytest.raises(ValueError, match=r"K >= 2"):
        reasoning_losses(states[:, :1], torch.randn(2, 4), e, torch.tensor([1, 2]), backend="triton")


def test_vocab_stats_op_registration():
    # Schema, fake (meta) kernel and autograd registration of the custom op.
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    e = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, -1, 3, 8, -1])
    torch.library.opcheck(torch.ops.plr_kernels.vocab_stats_triton.default, (x, e, target, 0.5, 0, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    lse, mu, t = torch.ops.plr_kernels.vocab_stats_triton(x, e, target, 0.5, 0, True)
    logits = (x @ e.T / 0.5).detach()
    logits[:, 0] = float("-inf")
    assert rel_err(lse, torch.logsumexp(logits, -1)) < 1e-12
    assert rel_err(mu, torch.softmax(logits, -1) @ e.detach()) < 1e-12
    assert t[1] == 0 and rel_err(t[0], logits[0, 1]) < 1e-12


def test_torch_compile_traces_the_custom_op():
    h, e = kl_inputs(2, 3, 13, 4, torch.float64)
    fn = torch.compile(lambda h, e: K.multi_pair_kl(h, e, temperature=0.5, backend="triton"),
                       backend="aot_eager", fullgraph=True)
    out = fn(h, e)
    (dh,) = torch.autograd.grad(out.sum(), (h,))
    exp = ref.multi_pair_kl(h, e, temperature=0.5)
    (dh_r,) = torch.autograd.grad(exp.sum(), (h,))
    assert rel_err(out, exp) < 1e-12 and rel_err(dh, dh_r) < 1e-10


def test_triton_is_a_listed_backend_of_the_vocab_ops():
    from plr_kernels import linear_cross_entropy as _  # noqa: F401
    import importlib

    for name in ("multi_pair_kl", "linear_cross_entropy"):
        assert "triton" in importlib.import_module(f"plr_kernels.{name}").IMPLS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 arithmetic is wrong in the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_16_bit_and_fp32(dtype):
    b, k, v, d = 64, 4, 5003, 128
    h = torch.randn(b, k, d, device="cuda", dtype=dtype, requires_grad=True)
    z = torch.randn(b, d, device="cuda", dtype=dtype, requires_grad=True)
    e = (0.5 * torch.randn(v, d, device="cuda", dtype=dtype)).requires_grad_()
    target = torch.randint(1, v, (b,), device="cuda")
    kl, ce = reasoning_losses(h, z, e, target, temperature=0.5, exclude_index=0, backend="triton")
    grads = torch.autograd.grad((kl + ce).sum(), (h, z, e))
    hd, zd, ed = (t.detach().double().requires_grad_() for t in (h, z, e))
    kl_r = ref.multi_pair_kl(hd, ed, temperature=0.5, exclude_index=0)
    ce_r = ref.linear_cross_entropy(zd, ed, target, temperature=0.5, exclude_index=0, reduction="none")
    grads_r = torch.autograd.grad((kl_r + ce_r).sum(), (hd, zd, ed))
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    assert rel_err(kl, kl_r) < tol and rel_err(ce, ce_r) < tol
    for g, g_r in zip(grads, grads_r):
        assert g.dtype == dtype and rel_err(g, g_r) < tol


@pytest.mark.parametrize("detach", [False, True])
def test_plr_model_losses_with_triton_kernels(detach):
    # PLRModel(backend="triton") computes L_NIP and L_KL through the fused pass
    # (and the Triton stream attention); same loss and gradients as "torch".
    import importlib

    if "triton" not in importlib.import_module("plr_kernels.stream_attention").IMPLS:
        pytest.skip("no Triton stream_attention yet")
    from plr import PLRModel

    kw = dict(max_len=6, hidden_size=16, num_layers=1, num_heads=2, inner_size=32, dropout=0.0,
              num_streams=2, num_steps=2, kl_weight=0.5, kl_detach_target=detach, rcl_weight=0.0)
    torch.manual_seed(1)
    fused = PLRModel(40, backend="triton", **kw).double().eval()
    plain = PLRModel(40, backend="torch", **kw).double().eval()
    plain.load_state_dict(fused.state_dict())
    seq = torch.tensor([[0, 0, 3, 7, 9, 2], [1, 5, 5, 8, 30, 39], [0, 0, 0, 0, 0, 11]])
    target = torch.tensor([4, 17, 40])
    loss, parts = fused.compute_loss(seq, target)
    loss_r, parts_r = plain.compute_loss(seq, target)
    assert rel_err(parts["nip"], parts_r["nip"]) < 1e-10 and rel_err(parts["kl"], parts_r["kl"]) < 1e-10
    assert parts["kl"] > 0
    g = torch.autograd.grad(loss, list(fused.parameters()), allow_unused=True)
    g_r = torch.autograd.grad(loss_r, list(plain.parameters()), allow_unused=True)
    assert [a is None for a in g] == [b is None for b in g_r]
    flat = torch.cat([a.flatten() for a in g if a is not None])
    flat_r = torch.cat([b.flatten() for b in g_r if b is not None])
    assert rel_err(flat, flat_r) < 1e-10
