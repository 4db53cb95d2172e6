"""The public functional API of plr_kernels: backend dispatch and argument checks."""

import importlib

import pytest
import torch

import plr_kernels as K
from plr_kernels import reference as ref


def rank_inputs(b=3, v=11, d=4):
    return torch.randn(b, d, dtype=torch.float64), torch.randn(v, d, dtype=torch.float64), torch.randint(1, v, (b,))


def test_public_ops_equal_the_reference_with_backend_torch():
    z, e, target = rank_inputs()
    h = torch.randn(3, 4, 4, dtype=torch.float64)
    assert torch.equal(K.target_rank(z, e, target, exclude_index=0, backend="torch"),
                       ref.target_rank(z, e, target, exclude_index=0))
    assert torch.equal(K.topk(z, e, 3, backend="torch")[1], ref.topk(z, e, 3)[1])
    torch.testing.assert_close(K.multi_pair_kl(h, e, temperature=0.5, backend="torch"),
                               ref.multi_pair_kl(h, e, temperature=0.5))
    torch.testing.assert_close(K.linear_cross_entropy(z, e, target, reduction="none", backend="torch"),
                               ref.linear_cross_entropy(z, e, target, reduction="none"))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backends_on_cpu_tensors_are_clear_errors(backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # outside the tests, triton needs CUDA tensors
    z, e, target = rank_inputs()
    with pytest.raises(K.BackendUnavailableError, match=rf"backend='{backend}'.*target_rank.*cpu tensors"):
        K.target_rank(z, e, target, backend=backend)


def test_backend_without_implementation_is_an_error_not_a_fallback():
    h, e = torch.randn(2, 3, 4), torch.randn(7, 4)
    with pytest.raises(K.BackendUnavailableError, match=r"no cuda implementation of multi_pair_kl"):
        K.multi_pair_kl(h, e, backend="cuda")
    with pytest.raises(ValueError, match=r"backend: expected one of .*'fast'"):
        K.multi_pair_kl(h, e, backend="fast")


def test_auto_uses_the_compiled_cpu_kernel_when_built():
    z, e, target = rank_inputs()
    from plr_kernels import _dispatch

    tr_module = importlib.import_module("plr_kernels.target_rank")  # the name plr_kernels.target_rank is the op

    chosen = _dispatch.resolve("target_rank", "auto", z.device, tr_module.IMPLS)
    if K.extension_error() is None:
        assert chosen is tr_module._compiled
        assert torch.equal(K.target_rank(z, e, target, backend="cpu"), ref.target_rank(z, e, target))
    else:
        assert chosen is tr_module._reference
        with pytest.raises(K.BackendUnavailableError, match=r"plr_kernels._C is unavailable"):
            K.target_rank(z, e, target, backend="cpu")


@pytest.mark.parametrize("call,match", [
    (lambda z, e, t: K.target_rank(z.float(), e, t), r"item_emb: expected dtype float32 \(as z\)"),
    (lambda z, e, t: K.target_rank(z, e[:, :2], t), r"item_emb: expected shape \[\*, 4\], got \[11, 2\]"),
    (lambda z, e, t: K.target_rank(z, e, t + 20), r"target: expected ids in \[0, 10\], got"),
    (lambda z, e, t: K.target_rank(z, e, t.int()), r"target: expected dtype in \(int64\), got int32"),
    (lambda z, e, t: K.target_rank(z, e, t, exclude_index=11), r"exclude_index: expected None or an id in \[0, 10\]"),
    (lambda z, e, t: K.target_rank(z, e, t, exclude_index=int(t[0])), r"target: expected no entry equal to"),
    (lambda z, e, t: K.target_rank(z, e, t, ties="random"), r"ties: expected one of"),
    (lambda z, e, t: K.target_rank(z, e, t, exclude_items=torch.zeros(2, 3, dtype=torch.long)),
     r"exclude_items: expected 3 rows"),
    (lambda z, e, t: K.target_rank(z, e, t, exclude_items=torch.full((3, 2), 11)), r"exclude_items: expected ids below"),
    (lambda z, e, t: K.topk(z, e, 11, exclude_index=0), r"k: expected an int in \[1, 10\]"),
    (lambda z, e, t: K.linear_cross_entropy(z, e, t, temperature=0), r"temperature: expected a positive number"),
    (lambda z, e, t: K.linear_cross_entropy(z, e, t, reduction="max"), r"reduction: expected one of"),
    (lambda z, e, t: K.linear_cross_entropy(z[0], e, t), r"z: expected a 2-d tensor"),
    (lambda z, e, t: K.multi_pair_kl(z[:, None], e), r"h: expected K >= 2 states"),
    (lambda z, e, t: K.multi_pair_kl([1.0], e), r"h: expected a torch.Tensor, got list"),
])
def test_bad_arguments_name_the_argument(call, match):
    z, e, target = rank_inputs()
    with pytest.raises((ValueError, TypeError), match=match):
        call(z, e, target)


def test_stream_attention_checks_shapes():
    q, kp, vp = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 5, 4), torch.randn(2, 1, 5, 4)
    ks, vs = torch.randn(2, 1, 3, 2, 4), torch.randn(2, 1, 3, 2, 4)
    assert K.stream_attention(q, kp, vp, ks, vs).shape == (2, 1, 3, 4)
    with pytest.raises(ValueError, match=r"v_prefix: expected shape \[2, 1, 5, 4\], got \[2, 1, 6, 4\]"):
        K.stream_attention(q, kp, torch.randn(2, 1, 6, 4), ks, vs)
    with pytest.raises(ValueError, match=r"k_stream: expected shape \[2, 1, 3, 2, 4\], got \[2, 1, 2, 2, 4\]"):
        K.stream_attention(q, kp, vp, torch.randn(2, 1, 2, 2, 4), vs)
    with pytest.raises(TypeError, match=r"prefix_mask: expected dtype in \(bool\)"):
        K.stream_attention(q, kp, vp, ks, vs, prefix_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"dropout_p: expected a float in \[0, 1\), got 1.0"):
        K.stream_attention(q, kp, vp, ks, vs, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"k_stream: expected S >= 1"):
        K.stream_attention(q, kp, vp, ks[:, :, :, :0], vs[:, :, :, :0])
