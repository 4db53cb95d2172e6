"""The causal-prefix form of stream_attention (plr_kernels/causal_stream_attention.py):
the reference against a loop over positions through the non-causal reference,
the public API's routing and argument errors. Backend tests:
tests/test_causal_stream_attention_kernels.py.
"""

import importlib

import pytest
import torch

import plr_kernels as K
from plr_kernels import reference as ref

csa = importlib.import_module("plr_kernels.causal_stream_attention")


def rel_err(got, want):
    assert got.shape == want.shape
    if want.numel() == 0:
        return 0.0
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def causal_inputs(b, h, n, m, s, d, dtype=torch.float64, padding="partial", requires_grad=True):
    """Left-padded prefixes: row i starts at position i ("full": row 0 has no valid key at all)."""
    def t(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)

    q, kp, vp = t(b, h, n, m, d), t(b, h, n, d), t(b, h, n, d)
    ks, vs = t(b, h, n, m, s, d), t(b, h, n, m, s, d)
    mask = None
    if padding != "none":
        first = torch.tensor([min(i, n - 1) for i in range(b)])
        mask = torch.arange(n)[None, :] >= first[:, None]
        if padding == "full":
            mask[0] = False
    return (q, kp, vp, ks, vs), mask


def loop_over_positions(q, kp, vp, ks, vs, mask, dropout_mask=None, **kw):
    """Position n through the non-causal reference with prefix_mask cut at n."""
    b, h, n, m, d = q.shape
    outs = []
    for pos in range(n):
        cut = torch.arange(n) <= pos
        pm = cut[None, :].expand(b, n) if mask is None else mask & cut[None, :]
        dm = None if dropout_mask is None else dropout_mask[:, :, pos]
        outs.append(ref.stream_attention(q[:, :, pos], kp, vp, ks[:, :, pos], vs[:, :, pos], prefix_mask=pm,
                                         dropout_mask=dm, **kw))
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("s", [1, 2])
@pytest.mark.parametrize("padding", ["none", "partial", "full"])
def test_reference_equals_loop_over_positions(n, m, s, padding):
    args, mask = causal_inputs(3, 2, n, m, s, 5, padding=padding)
    got = ref.stream_attention(*args, prefix_mask=mask, causal_prefix=True)
    want = loop_over_positions(*args, mask)
    assert got.shape == (3, 2, n, m, 5)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-13
    do = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, args, do), torch.autograd.grad(want, args, do)):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-12


def test_reference_dropout_mask_and_lse():
    b, h, n, m, s, d, p = 2, 2, 7, 3, 2, 5, 0.3
    args, mask = causal_inputs(b, h, n, m, s, d, padding="full")
    keep = torch.rand(b, h, n, m, n + s) >= p
    got, lse = ref.stream_attention(*args, prefix_mask=mask, dropout_p=p, dropout_mask=keep, causal_prefix=True,
                                    return_lse=True)
    want = loop_over_positions(*args, mask, dropout_mask=keep, dropout_p=p)
    assert rel_err(got, want) < 1e-13
    # lse of the pre-dropout softmax, finite on the fully padded row (its own stream).
    _, lse_plain = ref.stream_attention(*args, prefix_mask=mask, causal_prefix=True, return_lse=True)
    assert lse.dtype == torch.float64 and lse.shape == (b, h, n, m) and torch.equal(lse, lse_plain)
    assert torch.isfinite(lse).all()
    # The seeded mask is reproducible and differs between seeds.
    run = lambda sd: ref.stream_attention(*args, dropout_p=p, seed=sd, causal_prefix=True)  # noqa: E731
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


def test_never_attends_to_other_streams_or_later_keys():
    """Perturbing a later prefix key or another (n', m') stream changes nothing at (n, m)."""
    args, mask = causal_inputs(1, 1, 5, 2, 2, 4, padding="none", requires_grad=False)
    q, kp, vp, ks, vs = args
    base = K.stream_attention(*args, causal_prefix=True, backend="torch")
    kp2, vs2 = kp.clone(), vs.clone()
    kp2[:, :, 3:] += 10.0  # keys 3, 4: visible from n >= 3 only
    vs2[:, :, 2, 1] += 10.0  # stream 1 of position 2 only
    got = K.stream_attention(q, kp2, vp, ks, vs2, causal_prefix=True, backend="torch")
    assert torch.equal(got[:, :, :3, 0], base[:, :, :3, 0])
    assert torch.equal(got[:, :, :2], base[:, :, :2])
    assert not torch.allclose(got[:, :, 2, 1], base[:, :, 2, 1])
    assert not torch.allclose(got[:, :, 3:], base[:, :, 3:])


def test_public_api_routes_the_causal_form():
    args, mask = causal_inputs(2, 2, 7, 3, 2, 8, dtype=torch.float32, padding="partial")
    want = ref.stream_attention(*args, prefix_mask=mask, causal_prefix=True)
    for backend in ("torch", "auto"):
        got = K.stream_attention(*args, prefix_mask=mask, causal_prefix=True, backend=backend)
        assert rel_err(got, want) < 2e-6
    # The non-causal form is unchanged by the new keyword.
    q1 = args[0][:, :, 0].detach()
    got = K.stream_attention(q1, *[a.detach() for a in args[1:3]], args[3][:, :, 0].detach(),
                             args[4][:, :, 0].detach(), prefix_mask=mask, causal_prefix=False, backend="torch")
    assert got.shape == (2, 2, 3, 8)


def test_argument_errors_name_the_argument():
    (q, kp, vp, ks, vs), mask = causal_inputs(2, 1, 3, 2, 2, 4, padding="partial", requires_grad=False)
    call = lambda *a, **kw: K.stream_attention(*a, causal_prefix=True, backend="torch", **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"q: expected a 5-d tensor, got shape \(2, 1, 2, 4\)"):
        call(q[:, :, 0], kp, vp, ks, vs)
    with pytest.raises(ValueError, match=r"k_prefix: expected shape \[2, 1, 3, 4\], got \[2, 1, 4, 4\]"):
        call(q, torch.randn(2, 1, 4, 4, dtype=q.dtype), vp, ks, vs)
    with pytest.raises(ValueError, match=r"k_stream: expected a 6-d tensor"):
        call(q, kp, vp, ks[:, :, 0], vs)
    with pytest.raises(ValueError, match=r"v_stream: expected shape \[2, 1, 3, 2, 2, 4\], got \[2, 1, 3, 2, 1, 4\]"):
        call(q, kp, vp, ks, vs[..., :1, :])
    with pytest.raises(ValueError, match="k_stream: expected S >= 1"):
        call(q, kp, vp, ks[..., :0, :], vs[..., :0, :])
    with pytest.raises(TypeError, match="v_prefix: expected dtype float64"):
        call(q, kp, vp.float(), ks, vs)
    with pytest.raises(ValueError, match=r"prefix_mask: expected shape \[2, 3\], got \[2, 4\]"):
        call(q, kp, vp, ks, vs, prefix_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p: expected a float in"):
        call(q, kp, vp, ks, vs, dropout_p=1.0)
    with pytest.raises(ValueError, match="scale: expected a positive number"):
        call(q, kp, vp, ks, vs, scale=0.0)
    with pytest.raises(TypeError, match="causal_prefix: expected a bool"):
        K.stream_attention(q, kp, vp, ks, vs, causal_prefix=1)
    with pytest.raises(ValueError, match="backend: expected one of"):
        K.stream_attention(q, kp, vp, ks, vs, causal_prefix=True, backend="numpy")
