"""plr_kernels.reasoning_steps: the T reasoning steps of M streams through all
L layers in one call (csrc/reasoning_steps.cpp), against its pure-PyTorch
reference in fp64 on odd sizes, padded prefix rows and edge cases, and inside
the models (PLR, ReaRec-ERL): the fused inference path gives what the
per-step loop gives, and runs exactly when it should. The op has no backward
(inference only); asking for one is an error."""

import importlib

import pytest
import torch

import plr_kernels
from plr import PLRModel
from plr.models import reasoning
from plr.models.rearec import ReaRecERLModel
from plr_kernels import _extension

rs = importlib.import_module("plr_kernels.reasoning_steps")  # the name plr_kernels.reasoning_steps is the op

pytestmark = pytest.mark.skipif(
    not _extension.has_kernel("reasoning_steps", "cpu"),
    reason=f"compiled CPU kernel of reasoning_steps unavailable: {_extension.extension_error() or 'not in this build'}",
)


def make_args(b, m, t, layers, heads, dh, n, inner, dtype, padding=True, seed=0, strided_prefix=False):
    g = torch.Generator().manual_seed(seed)
    d = heads * dh

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    weights = []
    for _ in range(layers):
        for _ in range(4):  # q, k, v, dense
            weights += [r(d, d, scale=d ** -0.5), r(d, scale=0.1)]
        weights += [1 + r(d, scale=0.1), r(d, scale=0.1)]  # attention LayerNorm
        weights += [r(inner, d, scale=d ** -0.5), r(inner, scale=0.1), r(d, inner, scale=inner ** -0.5),
                    r(d, scale=0.1)]
        weights += [1 + r(d, scale=0.1), r(d, scale=0.1)]  # feed-forward LayerNorm
    if strided_prefix:  # the encoder's layout: [B,N,H,Dh] viewed as [B,H,N,Dh]
        k_prefix = [r(b, n, heads, dh).transpose(1, 2) for _ in range(layers)]
        v_prefix = [r(b, n, heads, dh).transpose(1, 2) for _ in range(layers)]
    else:
        k_prefix = [r(b, heads, n, dh) for _ in range(layers)]
        v_prefix = [r(b, heads, n, dh) for _ in range(layers)]
    mask = None
    if padding:  # left padding: row i keeps its last n - i keys; the last row keeps none
        lengths = [max(n - i, 1) for i in range(b)]
        if b > 1:
            lengths[-1] = 0  # an all-padding prefix: the streams still see their own tokens
        mask = torch.arange(n)[None] >= torch.tensor([n - k for k in lengths])[:, None]
    return (r(b, m, d), r(t, d), 1 + r(d, scale=0.1), r(d, scale=0.1), weights, k_prefix, v_prefix, mask,
            heads, 1e-12 if dtype == torch.float64 else 1e-6)


def call(args, backend):
    h, step, nw, nb, w, kp, vp, mask, heads, eps = args
    with torch.no_grad():
        return plr_kernels.reasoning_steps(h, step, nw, nb, w, kp, vp, prefix_mask=mask, num_heads=heads, eps=eps,
                                           backend=backend)


def rel_err(got, want):
    assert got.shape == want.shape
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


SHAPES = [  # (B, M, T, L, H, Dh, N, F)
    (3, 3, 3, 2, 3, 4, 7, 10),
    (1, 1, 1, 1, 1, 5, 1, 3),
    (5, 2, 4, 3, 2, 8, 13, 17),
    (2, 8, 2, 2, 2, 3, 50, 6),
]


def test_the_order_of_the_weights_is_the_one_the_reference_reads():
    """make_args above builds 16 tensors per layer in step_weights' order."""
    args = make_args(2, 2, 2, 2, 2, 3, 5, 7, torch.float64)
    shapes = [tuple(w.shape) for w in args[4][:16]]
    assert shapes == [(6, 6), (6,)] * 4 + [(6,), (6,), (7, 6), (7,), (6, 7), (6,), (6,), (6,)]
    block = PLRModel(9, hidden_size=6, num_heads=2, inner_size=7).backbone.layers[0]
    assert [tuple(w.shape) for w in block.step_weights()] == shapes
    assert all(a is b for a, b in zip(block.step_weights(), [
        block.attention.query.weight, block.attention.query.bias, block.attention.key.weight,
        block.attention.key.bias, block.attention.value.weight, block.attention.value.bias,
        block.attention.dense.weight, block.attention.dense.bias, block.attention.norm.weight,
        block.attention.norm.bias, block.feed_forward.dense_in.weight, block.feed_forward.dense_in.bias,
        block.feed_forward.dense_out.weight, block.feed_forward.dense_out.bias, block.feed_forward.norm.weight,
        block.feed_forward.norm.bias]))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padding", [True, False])
@pytest.mark.parametrize("strided_prefix", [False, True])
def test_compiled_equals_reference_fp64(shape, padding, strided_prefix):
    b, m, t, layers, heads, dh, n, inner = shape
    args = make_args(b, m, t, layers, heads, dh, n, inner, torch.float64, padding=padding, seed=sum(shape),
                     strided_prefix=strided_prefix)
    got, want = call(args, "cpu"), call(args, "torch")
    assert got.shape == (b, t, m, heads * dh)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_compiled_in_low_precision_is_close_to_fp64(dtype, tol):
    args64 = make_args(4, 3, 3, 2, 2, 8, 11, 20, torch.float64, seed=7)
    args = tuple([a.to(dtype) for a in x] if isinstance(x, list) else
                 (x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for x in args64)
    assert rel_err(call(args, "cpu"), call(args64, "torch")) < tol


def test_the_first_step_alone_is_one_step_of_the_loop():
    """T=1 of the op equals the first of T=3 (the steps run in order, each sees only the past)."""
    args = make_args(3, 2, 3, 2, 2, 4, 6, 9, torch.float64, seed=3)
    full = call(args, "cpu")
    first = call(args[:1] + (args[1][:1],) + args[2:], "cpu")
    assert torch.equal(first[:, 0], full[:, 0])


def test_empty_batch_and_autograd_and_bad_input_errors():
    args = make_args(0, 2, 2, 1, 2, 4, 5, 6, torch.float64, padding=False)
    assert call(args, "cpu").shape == (0, 2, 2, 8)
    args = make_args(2, 2, 2, 2, 2, 4, 5, 6, torch.float64)
    h, step, nw, nb, w, kp, vp, mask, heads, eps = args
    with pytest.raises(RuntimeError, match="inference only"):
        plr_kernels.reasoning_steps(h.requires_grad_(), step, nw, nb, w, kp, vp, prefix_mask=mask, num_heads=heads,
                                    eps=eps)
    h = h.detach()
    with pytest.raises(ValueError, match=r"layer_weights: expected 16 tensors per layer \(32 for L=2\), got 31"):
        call((h, step, nw, nb, w[:-1], kp, vp, mask, heads, eps), "cpu")
    with pytest.raises(ValueError, match="num_heads: expected an int >= 1 dividing d=8, got 3"):
        call((h, step, nw, nb, w, kp, vp, mask, 3, eps), "cpu")
    with pytest.raises(ValueError, match=r"step_emb: expected shape \[T >= 1, d=8\], got \[2, 7\]"):
        call((h, step[:, :7], nw, nb, w, kp, vp, mask, heads, eps), "cpu")
    bad = list(w)
    bad[16 + 10] = bad[16 + 10][:5]  # layer 1's dense_in.weight with 5 rows instead of 6
    with pytest.raises(RuntimeError, match=r"layer_weights\[26\] \(layer 1 dense_in.weight\) must have shape"):
        call((h, step, nw, nb, bad, kp, vp, mask, heads, eps), "cpu")
    with pytest.raises(RuntimeError, match=r"k_prefix\[1\] and v_prefix\[1\] must have shape"):
        call((h, step, nw, nb, w, [kp[0], kp[1][:, :1]], vp, mask, heads, eps), "cpu")
    with pytest.raises(RuntimeError, match="prefix_mask"):
        call((h, step, nw, nb, w, kp, vp, mask[:, :3], heads, eps), "cpu")
    with pytest.raises(ValueError, match="backend"):
        call(args, "gpu")


def test_fake_and_schema():
    args = make_args(3, 2, 2, 2, 2, 4, 5, 6, torch.float32, seed=1)
    h, step, nw, nb, w, kp, vp, mask, heads, eps = args
    torch.library.opcheck(torch.ops.plr_kernels.reasoning_steps, (h, step, nw, nb, w, kp, vp, mask, heads, eps),
                          test_utils=("test_schema", "test_faketensor"))


# -- inside the models ---------------------------------------------------------------


def histories(batch, length, num_items, seed):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, num_items + 1, (batch, length), generator=g)
    starts = torch.randint(0, length, (batch, 1), generator=g)
    return torch.where(torch.arange(length)[None] < starts, 0, seq)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused op made by plr/models/reasoning.py."""
    calls = []
    real = plr_kernels.reasoning_steps

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(reasoning.plr_kernels, "reasoning_steps", counting)
    return calls


@pytest.mark.parametrize("make", [
    lambda: PLRModel(61, num_streams=3, num_steps=3, max_len=9, hidden_size=12, num_heads=3, inner_size=10),
    lambda: PLRModel(61, num_streams=1, num_steps=1, max_len=9, hidden_size=8, num_heads=2, inner_size=5,
                     num_layers=1),
    lambda: ReaRecERLModel(61, num_steps=2, max_len=9, hidden_size=12, num_heads=2, inner_size=10),
], ids=["plr", "plr-1x1", "erl"])
def test_models_fused_inference_equals_the_per_step_loop(make, fused_calls):
    torch.manual_seed(0)
    model = make().double().eval()
    seq = histories(6, 9, 61, seed=1)
    with torch.no_grad():
        fused = model(seq)
        assert len(fused_calls) == 1
        model.backend = "torch"
        loop = model(seq)
        assert len(fused_calls) == 1  # backend="torch" runs the per-step loop
        model.backend = "auto"
    assert (fused.states - loop.states).abs().max() < 1e-12
    assert (fused.z_final - loop.z_final).abs().max() < 1e-12
    scores, items = model.recommend(seq, k=5)
    model.backend = "torch"
    want_scores, want_items = model.recommend(seq, k=5)
    assert torch.equal(items, want_items) and (scores - want_scores).abs().max() < 1e-12


def test_the_fused_path_runs_only_at_inference(fused_calls):
    torch.manual_seed(0)
    model = PLRModel(61, num_streams=2, num_steps=2, max_len=9, hidden_size=12, num_heads=3, inner_size=10).double()
    seq = histories(4, 9, 61, seed=2)
    model.train()
    with torch.no_grad():
        model(seq)  # dropout on: the per-step loop
    model.eval()
    model(seq)  # autograd on: the per-step loop
    with torch.no_grad(), reasoning.record_attention():
        model.backend = "torch"
        model(seq)  # recording attention: the reference loop
        model.backend = "auto"
    assert fused_calls == []
    with torch.no_grad():
        model(seq)
    assert fused_calls == [(4, 2, 12)]


def test_both_thread_counts_give_the_same_states():
    """The cpu backend runs with all threads or one (whichever measured faster):
    both are the same computation up to the BLAS blocking of a GEMM."""
    args = make_args(9, 4, 2, 2, 2, 16, 20, 40, torch.float32, seed=5)
    threads = torch.get_num_threads()
    with torch.no_grad():
        all_threads = rs._compiled(*args)
        one_thread = rs._one_thread(args)
    assert torch.get_num_threads() == threads  # restored
    assert rel_err(one_thread, all_threads) < 1e-6


def test_float16_models_keep_the_per_step_loop(fused_calls):
    """The fused kernel takes float32, float64 and bfloat16; a float16 model
    on a CPU runs the per-step loop (whose stream attention has a float16 kernel)."""
    torch.manual_seed(0)
    model = PLRModel(61, num_streams=2, num_steps=2, max_len=9, hidden_size=12, num_heads=3, inner_size=10).eval()
    seq = histories(3, 9, 61, seed=4)
    with torch.no_grad():
        want = model(seq).z_final
        half = model.half()(seq).z_final
    assert fused_calls == [(3, 2, 12)]  # the float32 call only
    assert (half.float() - want).abs().max() < 0.05
