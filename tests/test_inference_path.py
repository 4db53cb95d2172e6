"""The inference fast path of the reasoning steps (plr/transformer.py
``MultiHeadAttention._step_qkv``, plr/models/reasoning.py) computes exactly
what the training path computes: the same outputs, in fp64 and fp32, for every
backend that runs here, and it follows weight updates. The batched GEMM of the
fast path is the same product as the three Linears, but BLAS may block it
differently, so results agree to a few ulps (measured: bit-identical in most
cases, 1 ulp in one), not always bit for bit."""

import pytest
import torch

import plr_kernels
from plr import PLRModel
from plr_kernels import _extension, reference
from plr.models.rearec import ReaRecERLModel

BACKENDS = ["torch", "auto"]


def histories(batch, length, num_items, seed):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, num_items + 1, (batch, length), generator=g)
    starts = torch.randint(0, length, (batch, 1), generator=g)  # left padding of random length
    return torch.where(torch.arange(length)[None] < starts, 0, seq)


def outputs(model, seq, grad):
    with torch.set_grad_enabled(grad):
        out = model(seq)
    return out.states.detach(), out.z_final.detach()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernels", BACKENDS)
@pytest.mark.parametrize("batch,streams,steps,hidden", [(1, 1, 1, 8), (3, 2, 2, 32), (13, 8, 3, 32), (5, 3, 2, 10)])
def test_no_grad_path_equals_the_autograd_path_bitwise(dtype, kernels, batch, streams, steps, hidden):
    torch.manual_seed(batch + steps)
    model = PLRModel(97, num_streams=streams, num_steps=steps, max_len=11, hidden_size=hidden, num_heads=2,
                     inner_size=24, backend=kernels).to(dtype).eval()
    seq = histories(batch, 11, 97, seed=batch)
    fast, slow = outputs(model, seq, grad=False), outputs(model, seq, grad=True)
    eps = torch.finfo(dtype).eps
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=8 * eps, atol=8 * eps)


def test_rearec_no_grad_path_equals_the_autograd_path():
    torch.manual_seed(1)
    model = ReaRecERLModel(50, max_len=9, hidden_size=16, num_heads=2, inner_size=20, num_steps=3,
                           backend="torch").double().eval()
    seq = histories(4, 9, 50, seed=4)
    with torch.no_grad():
        fast = model(seq).z_final
    assert torch.equal(fast, model(seq).z_final.detach())


def test_stacked_projection_follows_weight_changes():
    torch.manual_seed(2)
    model = PLRModel(40, num_streams=2, num_steps=2, max_len=6, hidden_size=16, num_heads=2, inner_size=20,
                     backend="torch").double()
    seq = histories(3, 6, 40, seed=3)
    model.eval()
    outputs(model, seq, grad=False)  # builds the stacked q/k/v weights
    # an optimizer step (in place) must be seen by the next no-grad call
    model.train()
    loss, _ = model.compute_loss(seq, torch.tensor([1, 2, 3]))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss.backward()
    opt.step()
    model.eval()
    fast, slow = outputs(model, seq, grad=False), outputs(model, seq, grad=True)
    assert torch.equal(fast[1], slow[1])
    # load_state_dict (in place copy) and a dtype change (new storage)
    other = PLRModel(40, num_streams=2, num_steps=2, max_len=6, hidden_size=16, num_heads=2, inner_size=20,
                     backend="torch").double().eval()
    model.load_state_dict(other.state_dict())
    assert torch.equal(outputs(model, seq, grad=False)[1], outputs(other, seq, grad=True)[1])
    model.float()
    fast, slow = outputs(model, seq, grad=False), outputs(model, seq, grad=True)
    assert fast[1].dtype == torch.float32 and torch.equal(fast[1], slow[1])
    # the cache is no state: checkpoints keep their layout
    assert not any("qkv" in key for key in model.state_dict())


@pytest.mark.skipif(not _extension.has_kernel("stream_attention_fwd", "CPU"), reason="plr_kernels._C not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_cpu_kernel_reads_a_strided_prefix_in_place_with_the_same_result(dtype, dropout_p):
    """The encoder's prefix K/V are head-split views [B,N,H,D] -> [B,H,N,D]; the
    CPU forward reads them without copying and gives the bits of the contiguous call."""
    g = torch.Generator().manual_seed(7)
    b, h, m, n, s, d = 3, 2, 5, 97, 2, 33

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    q, ks, vs = rnd(b, h, m, d), rnd(b, h, m, s, d), rnd(b, h, m, s, d)
    kp, vp = rnd(b, n, h, d).transpose(1, 2), rnd(b, n, h, d).transpose(1, 2)
    assert not kp.is_contiguous()
    mask = torch.rand(b, n, generator=g) > 0.3
    mask[1] = False  # a fully padded prefix row
    args = dict(prefix_mask=mask, dropout_p=dropout_p, seed=11, backend="cpu")
    strided = plr_kernels.stream_attention(q, kp, vp, ks, vs, **args)
    assert torch.equal(strided, plr_kernels.stream_attention(q, kp.contiguous(), vp.contiguous(), ks, vs, **args))
    if dtype == torch.float64 and dropout_p == 0.0:
        want = reference.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask)
        torch.testing.assert_close(strided, want, rtol=1e-12, atol=1e-12)
