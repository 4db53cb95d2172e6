"""train.compile and train.precision: the sequence-mode loss traces as one
graph (no graph breaks), and bf16 autocast training tracks fp32 training."""

from pathlib import Path

import pytest
import torch

from plr.data import build_dataset, read_interactions
from plr.data.dataset import SequenceSamples
from plr.models import model_class

from test_sequence_mode import TINY, V, L, sequence_batch

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k_recbole"


@pytest.mark.parametrize("name,args", [("sasrec", {}), ("plr", dict(num_streams=2, num_steps=2,
                                                                  reasoning_dropout=0.0))])
def test_sequence_loss_compiles_without_graph_breaks(name, args):
    """fullgraph=True fails on any graph break; the "eager" backend keeps the
    test fast (dynamo's trace is what is checked; inductor: benchmarks)."""
    torch._dynamo.reset()
    model = model_class(name)(V, max_len=L, backend="auto", **TINY, **args).train()
    inputs = model.prepare_sequences(*sequence_batch())
    compiled = torch.compile(model.sequence_loss, fullgraph=True, backend="eager", dynamic=True)
    torch.manual_seed(0)  # the same draws (PLR's reg_rows) in both calls
    loss_c, _ = compiled(*inputs)
    torch.manual_seed(0)
    loss_e, _ = model.sequence_loss(*inputs)
    assert torch.allclose(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    grads_c = torch.autograd.grad(loss_c, list(model.parameters()), allow_unused=True)
    grads_e = torch.autograd.grad(loss_e, list(model.parameters()), allow_unused=True)
    for gc, ge in zip(grads_c, grads_e):
        assert (gc is None) == (ge is None)
        if gc is not None:
            assert torch.allclose(gc, ge, rtol=1e-5, atol=1e-6)


def _train(precision: str, steps: int = 30):
    ds = build_dataset(read_interactions(str(ML100K)), max_len=20)
    seqs = SequenceSamples.from_prefix_samples(ds.train)
    torch.manual_seed(0)
    model = model_class("plr")(ds.num_items, max_len=20, hidden_size=32, num_layers=1, num_heads=2, inner_size=32,
                               dropout=0.1, backend="auto", rcl_weight=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(steps):
        item_seq, target = seqs.gather(order[step * 32:(step + 1) * 32])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = model.compute_sequence_loss(item_seq, target)
        assert loss.dtype == torch.float32  # fp32 loss statistics under autocast
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    return losses


@pytest.mark.skipif(not ML100K.is_dir(), reason="shared data (ml-100k_recbole) not present")
def test_bf16_training_tracks_fp32():
    """30 Adam steps of a small PLR on ml-100k: the mean loss of the last 10
    steps under bf16 autocast is within 2% of fp32's, and both went down."""
    fp32, bf16 = _train("fp32"), _train("bf16")
    tail32, tail16 = sum(fp32[-10:]) / 10, sum(bf16[-10:]) / 10
    assert tail32 < fp32[0] - 0.3 and tail16 < bf16[0] - 0.3
    assert abs(tail16 - tail32) <= 0.02 * tail32, (tail16, tail32)
