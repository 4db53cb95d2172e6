"""Sequence training mode (``train.samples: sequence``): one encoder pass per
sequence gives the loss of every prefix.

Exactness: with dropout off, in float64, ``compute_sequence_loss`` on a batch
of sequences equals ``compute_loss`` on the same targets fed as per-prefix
samples (in the same row-major order), loss and every parameter gradient, to
1e-10. What is compared is mathematically equal: L_NIP and L_KL per target
are the same functions of the same prefix; the in-batch RCL / PRL
contrastive terms are equal because the prefix batch holds exactly the R
prefixes of the sequence batch (PLR's two views coincide at dropout 0; PRL's
noise is drawn in the same order from the same seed).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from plr.data import build_dataset, read_interactions
from plr.data.dataset import SequenceSamples
from plr.models import SequentialRecommender, model_class

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ML100K = DATA / "ml-100k_recbole"
needs_ml100k = pytest.mark.skipif(not ML100K.is_dir(), reason="shared data (ml-100k_recbole) not present")

V, L = 23, 7
TINY = dict(hidden_size=8, num_layers=2, num_heads=2, inner_size=12, dropout=0.0)
MODELS = {
    "sasrec": {},
    "erl": dict(num_steps=2, reasoning_dropout=0.0),
    "prl": dict(num_steps=2, reasoning_dropout=0.0, noise_std=0.1),
    "plr": dict(num_streams=3, num_steps=2, rcl_weight=1.0, reasoning_dropout=0.0, reg_rows="all"),
}


def sequence_batch(lengths=(7, 3, 1, 5, 6), one_target_per_row=False):
    """Left-padded sequences of the given input lengths, the next item as the
    target at each position, one target masked out (with ``one_target_per_row``
    a single target per row, at a random position: R <= B, where the in-batch
    contrastive terms are one group, as a prefix batch)."""
    gen = torch.Generator().manual_seed(3)
    seq = torch.zeros(len(lengths), L, dtype=torch.long)
    tgt = torch.zeros_like(seq)
    for b, n in enumerate(lengths):
        items = torch.randint(1, V + 1, (n + 1,), generator=gen)
        seq[b, L - n:], tgt[b, L - n:] = items[:n], items[1:]
    tgt[0, 3] = 0
    if one_target_per_row:
        keep = torch.zeros_like(tgt, dtype=torch.bool)
        for b, n in enumerate(lengths):
            keep[b, L - n + int(torch.randint(0, n, (1,), generator=gen))] = True
        tgt = tgt * keep
    return seq, tgt


def as_prefix_samples(seq, tgt):
    """The same targets as per-prefix samples, row-major (b, then n)."""
    rows = tgt.nonzero(as_tuple=True)
    hist = torch.zeros(len(rows[0]), L, dtype=torch.long)
    for r, (b, n) in enumerate(zip(*rows)):
        h = seq[b, :n + 1]
        h = h[h != 0]
        hist[r, L - len(h):] = h
    return hist, tgt[rows]


CASES = [(name, False) for name in MODELS] + [("plr", True), ("prl", True)]


@pytest.mark.parametrize("layout", ["packed", "dense"])
@pytest.mark.parametrize("kernels", ["torch", "auto"])
@pytest.mark.parametrize("name,contrastive", CASES)
def test_sequence_loss_equals_prefix_loss_and_gradients(name, contrastive, kernels, layout, monkeypatch):
    """All targets of a batch (R > B: the contrastive terms off), or one per
    row (R <= B: PLR's L_RCL and PRL's contrastive term on, one group). Both
    layouts of the reasoning rows (plr/models/reasoning.py): the R rows as a
    batch of their own (``rows_as_batch``, the CPU's at M >= 2) and the causal
    [B,H,N,...] layout (the CUDA one, and the CPU's at M = 1)."""
    import plr.models.reasoning as reasoning

    monkeypatch.setattr(reasoning, "PACKED_ROWS_DEVICES", ("cpu",) if layout == "packed" else ())
    monkeypatch.setattr(reasoning, "PACKED_ROWS_MIN_STREAMS", 1)
    args = dict(MODELS[name])
    if name == "plr" and not contrastive:
        args["rcl_weight"] = 0.0
    if name == "prl" and not contrastive:
        args["noise_std"] = 0.0
    torch.manual_seed(1)
    model = model_class(name)(V, max_len=L, backend=kernels, **TINY, **args).double()
    model.train()
    seq, tgt = sequence_batch(one_target_per_row=contrastive)
    hist, target = as_prefix_samples(seq, tgt)
    params = list(model.parameters())
    torch.manual_seed(5)
    loss_s, parts_s = model.compute_sequence_loss(seq, tgt)
    grads_s = torch.autograd.grad(loss_s, params, allow_unused=True)
    torch.manual_seed(5)
    loss_p, parts_p = model.compute_loss(hist, target)
    grads_p = torch.autograd.grad(loss_p, params, allow_unused=True)
    assert loss_s.dtype == torch.float64
    assert abs(loss_s.item() - loss_p.item()) < 1e-10
    for key in parts_p:
        assert abs(parts_s[key].item() - parts_p[key].item()) < 1e-10, key
    if contrastive:
        assert parts_s["rcl"].item() > 0  # the contrastive term is on and compared
    else:
        assert int((tgt != 0).sum()) > seq.shape[0]
    checked = 0
    for p, gs, gp in zip(params, grads_s, grads_p):
        assert (gs is None) == (gp is None)
        if gs is not None:
            assert torch.allclose(gs, gp, rtol=0, atol=1e-10), p.shape
            checked += int(gs.abs().max() > 0)
    assert checked >= len(params) // 2  # most gradients are nonzero, so the comparison bites


def test_reg_rows_batch_regularises_b_random_rows(monkeypatch):
    """PLR ``reg_rows="batch"``: L_NIP over all R rows of the sequence batch,
    L_KL and L_RCL over the B rows drawn, each exactly what a prefix batch of
    those B prefixes gives (loss, parts and every gradient, fp64, 1e-10)."""
    torch.manual_seed(1)
    args = dict(MODELS["plr"], kl_weight=0.5, reg_rows="batch")
    model = model_class("plr")(V, max_len=L, backend="torch", **TINY, **args).double().train()
    seq, tgt = sequence_batch()
    hist, target = as_prefix_samples(seq, tgt)
    r, b = len(target), seq.shape[0]
    assert r > b
    pick = torch.tensor([9, 0, 4, 13, 6])  # the rows the step "draws"
    drawn = []
    real_randperm = torch.randperm

    def fake_randperm(n, *a, **kw):
        drawn.append(n)
        return torch.cat([pick, torch.tensor([i for i in range(n) if i not in pick.tolist()])])
    monkeypatch.setattr(torch, "randperm", fake_randperm)
    params = list(model.parameters())
    loss_s, parts_s = model.compute_sequence_loss(seq, tgt)
    monkeypatch.setattr(torch, "randperm", real_randperm)
    assert drawn == [r]
    grads_s = torch.autograd.grad(loss_s, params, allow_unused=True)
    # L_NIP of every row: the sequence loss of the same model without regularisers
    model.kl_weight, model.rcl_weight = 0.0, 0.0
    nip_all, _ = model.compute_sequence_loss(seq, tgt)
    grads_nip = torch.autograd.grad(nip_all, params, allow_unused=True)
    # L_KL and L_RCL of the drawn rows: a prefix batch of exactly those prefixes
    model.kl_weight, model.rcl_weight = 0.5, 1.0
    loss_p, parts_p = model.compute_loss(hist[pick], target[pick])
    reg_p = loss_p - parts_p["nip"]
    grads_reg = torch.autograd.grad(loss_p, params, allow_unused=True)
    assert abs(parts_s["nip"].item() - nip_all.item()) < 1e-10
    assert abs(parts_s["kl"].item() - parts_p["kl"].item()) < 1e-10 and parts_p["kl"].item() > 0
    assert abs(parts_s["rcl"].item() - parts_p["rcl"].item()) < 1e-10 and parts_p["rcl"].item() > 0
    assert abs(loss_s.item() - (nip_all.item() + reg_p.item())) < 1e-10
    # gradients: d(loss_s) = d(nip_all) + d(loss_p) - d(nip of the B prefixes)
    model.kl_weight, model.rcl_weight = 0.0, 0.0
    nip_p, _ = model.compute_loss(hist[pick], target[pick])
    grads_nip_p = torch.autograd.grad(nip_p, params, allow_unused=True)
    for p, gs, gn, gr, gq in zip(params, grads_s, grads_nip, grads_reg, grads_nip_p):
        zero = torch.zeros_like(p)
        want = (zero if gn is None else gn) + (zero if gr is None else gr) - (zero if gq is None else gq)
        assert torch.allclose(zero if gs is None else gs, want, rtol=0, atol=1e-10), p.shape


def test_reg_rows_is_checked():
    with pytest.raises(ValueError, match=r"reg_rows: expected one of \['all', 'batch'\], got 'some'"):
        model_class("plr")(V, max_len=L, reg_rows="some", **TINY)


@pytest.mark.parametrize("group_size", [1, 4, 7, 30])
def test_grouped_contrastive_loss_is_the_mean_over_groups(group_size):
    from plr.losses import grouped_contrastive_loss, reasoning_contrastive_loss

    a, b = torch.randn(2, 13, 2, 3, 5, dtype=torch.float64).unbind(0)
    order = torch.randperm(13)
    got = grouped_contrastive_loss(a, b, order, group_size)
    chunks = order.split(group_size)
    want = sum(len(c) * reasoning_contrastive_loss(a[c], b[c]) for c in chunks) / 13
    assert abs(got.item() - want.item()) < 1e-12
    if group_size >= 13:  # one group: the plain in-batch loss, whatever the order
        assert abs(got.item() - reasoning_contrastive_loss(a, b).item()) < 1e-12


def test_sequence_loss_is_not_prefix_loss_with_end_anchored_positions():
    """Control: with positions counted over the left-padded array the two
    modes differ, so the exactness above rests on start-anchored positions."""
    torch.manual_seed(1)
    model = model_class("sasrec")(V, max_len=L, backend="torch", backbone_args={"positions": "end"}, **TINY).double()
    seq, tgt = sequence_batch()
    hist, target = as_prefix_samples(seq, tgt)
    with torch.no_grad():
        with pytest.raises(ValueError, match="train.samples: 'sequence' needs a causal backbone"):
            model.compute_sequence_loss(seq, tgt)
        model.backbone.causal_sequences = True  # force it, to show the difference
        diff = model.compute_sequence_loss(seq, tgt)[0] - model.compute_loss(hist, target)[0]
    assert abs(diff.item()) > 1e-6


def test_v1_checkpoints_keep_end_anchored_positions(tmp_path):
    torch.manual_seed(2)
    legacy = model_class("plr")(V, max_len=L, backend="torch", backbone_args={"positions": "end"}, **TINY).eval()
    hist, _ = as_prefix_samples(*sequence_batch())
    expected = legacy(hist).z_final
    path = tmp_path / "v1.pt"
    legacy.save(str(path))
    payload = torch.load(path, weights_only=True)
    payload["format"] = "plr-checkpoint-v1"
    payload["config"]["backbone_args"] = None  # as v1 wrote it
    torch.save(payload, path)
    loaded = SequentialRecommender.load(str(path)).eval()
    assert loaded.backbone.positions == "end" and not loaded.supports_sequences()
    assert torch.allclose(loaded(hist).z_final, expected, atol=1e-6)
    fresh = model_class("plr")(V, max_len=L, backend="torch", **TINY)
    fresh.load_state_dict(loaded.state_dict())
    assert not torch.allclose(fresh.eval()(hist).z_final, expected, atol=1e-4)  # the start-anchored default differs
    loaded.save(str(path))  # a re-save keeps the legacy positions in its config
    assert SequentialRecommender.load(str(path)).backbone.positions == "end"


@pytest.mark.parametrize("bad,match", [
    (lambda s, t: t[:, 1:], r"target: expected shape \[5, 7\]"),
    (lambda s, t: t.float(), "target: expected an int64 or int32 tensor"),
    (lambda s, t: t.clamp_max(0), r"target: expected at least one target"),
    (lambda s, t: torch.where(s == 0, 1, t), "target: expected targets only at positions holding an item"),
    (lambda s, t: t + 100, r"target: expected ids in \[0, 23\]"),
])
def test_bad_sequence_targets_say_what_is_wrong(bad, match):
    model = model_class("sasrec")(V, max_len=L, backend="torch", **TINY)
    seq, tgt = sequence_batch()
    with pytest.raises((ValueError, TypeError), match=match):
        model.compute_sequence_loss(seq, bad(seq, tgt))


def test_bidirectional_backbone_refuses_sequence_mode():
    model = model_class("plr")(V, max_len=L, backend="torch", backbone="bert4rec", **TINY)
    with pytest.raises(ValueError, match="train.samples: 'sequence' needs a causal backbone.*use 'prefix'"):
        model.compute_sequence_loss(*sequence_batch())


@needs_ml100k
@pytest.mark.parametrize("max_len", [20, 7])
def test_sequence_samples_hold_every_prefix_target_once(max_len):
    """On a real dataset: the windows hold exactly the prefix samples' targets;
    a target of a sequence of <= max_len + 1 items sees its prefix sample's
    history, a later one a suffix of it of >= max_len // 2 + 1 items."""
    ds = build_dataset(read_interactions(str(ML100K)), max_len=max_len)
    seqs = SequenceSamples.from_prefix_samples(ds.train)
    assert seqs.num_targets() == len(ds.train)
    assert len(seqs) > ds.num_users  # ml-100k users are long: windows are cut
    item_seq, target = seqs.gather(torch.arange(len(seqs)))
    w, c = target.nonzero(as_tuple=True)
    t = seqs.end[w] - max_len + c  # flat index of each target
    # Every prefix sample's (user, target index) exactly once.
    big = int(ds.train.flat.shape[0]) + 1
    key_s = (seqs.user[w] * big + t).numpy()
    key_p = (ds.train.user * big + ds.train.end).numpy()
    assert len(np.unique(key_s)) == len(key_s) == len(key_p)
    order = np.argsort(key_p)
    i = torch.from_numpy(order[np.searchsorted(key_p, key_s, sorter=order)])
    assert np.array_equal(key_p[i.numpy()], key_s)
    assert torch.equal(target[w, c], ds.train.target[i])
    assert torch.equal(item_seq[w, c], ds.train.flat[t - 1])  # the input before each target
    len_s = t - seqs.start[w]  # history of the target inside its window
    len_p = ds.train.end[i] - ds.train.start[i]  # its prefix sample's (truncated to max_len)
    assert bool((len_s <= len_p).all()) and bool((len_s >= torch.clamp(len_p, max=max_len // 2 + 1)).all())
    first_window = seqs.first_target[w] == seqs.start[w] + 1
    assert torch.equal(len_s[first_window], len_p[first_window])
    assert bool((~first_window).any())
    for r in range(0, len(seqs), max(1, len(seqs) // 40)):  # windows hold the flat slice, left-padded
        real = item_seq[r][item_seq[r] != 0]
        assert torch.equal(real, ds.train.flat[seqs.start[r]:seqs.end[r] - 1])


def test_sequence_samples_refuse_given_histories():
    from plr.data.dataset import TrainSamples

    flat = torch.tensor([1, 2, 3, 4])
    samples = TrainSamples(flat, torch.tensor([0, 2]), torch.tensor([2, 4]), torch.tensor([7, 9]), 5,
                           user=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="train.samples: 'sequence' needs training samples that are the prefixes"):
        SequenceSamples.from_prefix_samples(samples)
