"""BERT4Rec: the bidirectional backbone with its [MASK] token, the Cloze
training of BERT4RecModel, and PLR on the bert4rec backbone (items
bidirectional, reasoning tokens causal and stream-isolated)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from plr import PLRModel, SASRecModel
from plr.backbones import causal_mask
from plr.backbones.bert4rec import BERT4RecBackbone, bidirectional_mask
from plr.cli import main
from plr.data import build_dataset, read_interactions
from plr.models import SequentialRecommender, model_class
from plr.models.bert4rec import BERT4RecModel, cloze_mask

NUM_ITEMS = 40
MASK = NUM_ITEMS + 1
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ML100K = DATA / "ml-100k_recbole"
needs_ml100k = pytest.mark.skipif(not ML100K.is_dir(), reason="shared data (ml-100k_recbole) not present")


def small_bert4rec(**overrides):
    args = dict(max_len=9, hidden_size=12, num_layers=2, num_heads=3, inner_size=17, backend="torch")
    args.update(overrides)
    return BERT4RecModel(NUM_ITEMS, **args)


def small_plr(**overrides):
    args = dict(max_len=9, hidden_size=12, num_layers=2, num_heads=3, inner_size=17, num_streams=3,
                num_steps=3, backend="torch", backbone="bert4rec")
    args.update(overrides)
    return PLRModel(NUM_ITEMS, **args)


def histories(batch=5, length=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, NUM_ITEMS + 1, (batch, length), generator=gen)
    for row in range(batch):  # left padding of varied length (1 item at least), one full row
        seq[row, : row % length] = 0
    return seq


# -- the Cloze mask ------------------------------------------------------------------


def test_cloze_mask_hides_real_items_only_and_labels_them():
    seq = histories(batch=300, length=11)
    tokens, labels = cloze_mask(seq, MASK, 0.3, generator=torch.Generator().manual_seed(1))
    hidden = tokens == MASK
    assert hidden.any(dim=1).all()  # at least one per row
    assert not (hidden & (seq == 0)).any()  # padding never hidden
    assert torch.equal(tokens[~hidden], seq[~hidden])  # the rest untouched
    assert torch.equal(labels[hidden], seq[hidden])  # labels: the hidden items ...
    assert (labels[~hidden] == 0).all()  # ... and 0 everywhere else
    assert torch.equal(hidden, labels != 0)


def test_cloze_mask_ratio():
    """Each real item is hidden with probability r, plus the forced one when a row
    of n items drew none: E[fraction] = r + (1 - r)^n / n per row."""
    r, n_rows, length = 0.2, 4000, 13
    seq = histories(batch=n_rows, length=length, seed=2)
    tokens, _ = cloze_mask(seq, MASK, r, generator=torch.Generator().manual_seed(3))
    n = (seq != 0).sum(dim=1).double()
    expected_hidden = (r * n + (1 - r) ** n).sum()
    observed_hidden = (tokens == MASK).sum().double()
    # Binomial spread: sd ~ sqrt(sum n r (1-r)) ~ 120 here; allow ~4 sd.
    assert abs(observed_hidden - expected_hidden) < 4 * (n * r * (1 - r)).sum().sqrt(), (
        observed_hidden, expected_hidden)
    long_rows = n >= 12  # the forced item is rare there: the fraction is ~r
    assert abs((tokens[long_rows] == MASK).sum() / n[long_rows].sum() - r) < 0.03


def test_zero_ratio_hides_exactly_one_uniform_real_item():
    seq = torch.randint(1, NUM_ITEMS + 1, (2000, 6), generator=torch.Generator().manual_seed(4))
    seq[:, :2] = 0  # 4 real items per row
    tokens, labels = cloze_mask(seq, MASK, 0.0, generator=torch.Generator().manual_seed(5))
    hidden = tokens == MASK
    assert (hidden.sum(dim=1) == 1).all()
    counts = hidden.sum(dim=0)
    assert counts[:2].sum() == 0
    assert (counts[2:] > 2000 / 4 * 0.8).all() and (counts[2:] < 2000 / 4 * 1.2).all(), counts


def test_last_item_prob():
    seq = histories(batch=2000, length=8, seed=6)
    tokens, _ = cloze_mask(seq, MASK, 0.3, last_item_prob=1.0)
    assert torch.equal(tokens == MASK, F.one_hot(torch.full((2000,), 7), 8).bool())
    tokens, _ = cloze_mask(seq, MASK, 0.3, last_item_prob=0.5, generator=torch.Generator().manual_seed(7))
    hidden = tokens == MASK
    only_last = (hidden[:, -1] & (hidden.sum(dim=1) == 1)).double()
    # P(only the last) = 0.5 + 0.5 * P(the random mask of a row of n items hid only
    # its last one) = 0.5 + 0.5 * (r (1-r)^(n-1) + (1-r)^n / n).
    n, r = (seq != 0).sum(dim=1).double(), 0.3
    p = 0.5 + 0.5 * (r * (1 - r) ** (n - 1) + (1 - r) ** n / n)
    assert abs(only_last.sum() - p.sum()) < 4 * (p * (1 - p)).sum().sqrt(), (only_last.sum(), p.sum())
    # and the rows not hiding only the last one are ordinary random masks
    assert hidden[only_last == 0].sum(dim=1).double().mean() > 1.5


@pytest.mark.parametrize("name,value", [("mask_ratio", 1.5), ("mask_ratio", -0.1), ("last_item_prob", 2.0)])
def test_cloze_mask_rejects_bad_probabilities(name, value):
    kwargs = {"mask_ratio": 0.2, "last_item_prob": 0.0, name: value}
    with pytest.raises(ValueError, match=f"{name}: expected a probability in \\[0, 1\\], got {value}"):
        cloze_mask(histories(), MASK, **kwargs)
    with pytest.raises(ValueError, match=name):
        small_bert4rec(**{name: value})


def test_cloze_sequence_is_history_plus_target_oldest_dropped():
    model = small_bert4rec(mask_ratio=0.0, last_item_prob=1.0)
    seq, target = histories(), torch.randint(1, NUM_ITEMS + 1, (5,))
    tokens, labels = model.cloze_batch(seq, target)
    assert tokens.shape == (5, 9)
    assert torch.equal(tokens[:, :-1], seq[:, 1:])
    assert (tokens[:, -1] == MASK).all() and torch.equal(labels[:, -1], target)


# -- the backbone ---------------------------------------------------------------------


def test_item_table_leaves_out_the_mask_token():
    model = small_bert4rec()
    bb = model.backbone
    assert bb.mask_token == MASK == model.mask_token
    assert bb.item_embedding.weight.shape == (NUM_ITEMS + 2, 12)
    assert model.item_emb.shape == (NUM_ITEMS + 1, 12)
    assert (model.item_emb[0] == 0).all()
    assert bb.position_embedding.weight.shape == (10, 12)  # max_len + 1
    # recommend() ranks items only: all NUM_ITEMS ids, never the [MASK].
    _, ids = model.recommend(histories(), k=NUM_ITEMS)
    assert torch.equal(ids.sort(dim=1).values, torch.arange(1, NUM_ITEMS + 1).expand(5, -1))


def test_bidirectional_mask():
    key_mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    mask = bidirectional_mask(key_mask)
    assert torch.equal(mask[1], torch.ones(4, 4, dtype=torch.bool))
    want = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0], want)


def test_encode_appends_the_mask_token_and_h0_is_its_output():
    model = small_bert4rec().double().eval()
    bb, seq = model.backbone, histories()
    with torch.no_grad():
        enc = bb.encode(seq)
        assert enc.hidden.shape == (5, 10, 12) and enc.key_mask.shape == (5, 10)
        assert len(enc.keys) == 2 and enc.keys[0].shape == (5, 3, 10, 4)
        assert torch.equal(enc.key_mask, torch.cat([seq != 0, torch.ones(5, 1, dtype=torch.bool)], 1))
        tokens = torch.cat([seq, torch.full((5, 1), MASK)], dim=1)
        torch.testing.assert_close(model(seq).h0, bb.encode_tokens(tokens).hidden[:, -1], rtol=0, atol=0)
        torch.testing.assert_close(model(seq).z_final, model(seq).h0, rtol=0, atol=0)
        before = model(seq).h0.clone()
        bb.item_embedding.weight[MASK] += torch.randn(12, dtype=torch.float64)  # h_0 reads the [MASK] row ...
        after = model(seq).h0
        assert (after - before).abs().max() > 1e-3
        # ... a [MASK] is no padding: an arbitrary token sequence may hold several.
        assert torch.isfinite(bb.encode_tokens(torch.where(seq > 20, MASK, seq)).hidden).all()


def test_bidirectional_unlike_sasrec():
    """Changing the newest item changes the output at the oldest item under
    BERT4Rec; under SASRec's causal mask it cannot."""
    seq = histories()
    changed = seq.clone()
    changed[:, -1] = changed[:, -1] % NUM_ITEMS + 1
    first = (seq != 0).long().argmax(dim=1)  # the oldest real item of each row
    rows = torch.arange(5)
    for model_cls, moves in ((BERT4RecModel, True), (SASRecModel, False)):
        torch.manual_seed(0)
        model = model_cls(NUM_ITEMS, max_len=9, hidden_size=12, num_heads=3, inner_size=17, backend="torch")
        model = model.double().eval()
        with torch.no_grad():
            a = model.backbone.encode(seq).hidden[rows, first]
            b = model.backbone.encode(changed).hidden[rows, first]
        multi = (seq != 0).sum(dim=1) > 1  # rows where the oldest item is not the changed one
        delta = (a - b).abs().amax(dim=1)[multi]
        assert (delta > 1e-6).all() if moves else (delta == 0).all(), (model_cls, delta)


def test_padding_does_not_change_the_encoding():
    """Right-aligned positions and masked padding: a history padded to 9 or to
    6 slots gives the same h_0; padded rows stay finite."""
    model = small_bert4rec().double().eval()
    seq = histories()[3:]  # rows with >= 3 leading padding slots
    with torch.no_grad():
        full = model.backbone.encode(seq)
        short = model.backbone.encode(seq[:, 3:])
    assert torch.isfinite(full.hidden).all()
    torch.testing.assert_close(short.hidden[:, -1], full.hidden[:, -1], rtol=0, atol=1e-12)
    torch.testing.assert_close(short.hidden, full.hidden[:, 3:], rtol=0, atol=1e-12)


def test_backbone_shape_errors():
    bb = small_bert4rec().backbone
    with pytest.raises(ValueError, match=r"item_seq: expected shape \[batch, length <= max_len = 9\], got \[2, 10\]"):
        bb.encode(torch.ones(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens: expected shape \[batch, length <= max_len \+ 1 = 10\]"):
        bb.encode_tokens(torch.ones(2, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="backbone: BERT4RecModel runs on the 'bert4rec' backbone only, got 'sasrec'"):
        BERT4RecModel(NUM_ITEMS, backbone="sasrec")


# -- BERT4RecModel losses ---------------------------------------------------------------


def test_cloze_loss_is_cross_entropy_at_the_masked_positions():
    model = small_bert4rec(dropout=0.0).double().train()
    seq, target = histories(), torch.randint(1, NUM_ITEMS + 1, (5,))
    torch.manual_seed(11)
    loss, parts = model.compute_loss(seq, target)
    torch.manual_seed(11)  # the same draws: the mask is the first random op of compute_loss
    tokens, labels = model.cloze_batch(seq, target)
    hidden = model.backbone.encode_tokens(tokens).hidden
    at = labels != 0
    logits = hidden[at] @ model.item_emb[1:].T / model.temperature
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels[at] - 1))
    assert torch.equal(parts["nip"], loss.detach())
    assert at.sum() >= 5


def test_eval_loss_is_next_item_cross_entropy_of_h0():
    model = small_bert4rec().double().eval()
    seq, target = histories(), torch.randint(1, NUM_ITEMS + 1, (5,))
    loss, _ = model.compute_loss(seq, target)
    logits = model(seq).h0 @ model.item_emb[1:].T / model.temperature
    torch.testing.assert_close(loss, F.cross_entropy(logits, target - 1))


def test_bert4rec_gradients_reach_every_parameter():
    model = small_bert4rec(dropout=0.1).double().train()
    loss, _ = model.compute_loss(histories(), torch.randint(1, NUM_ITEMS + 1, (5,)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.backbone.item_embedding.weight.grad[MASK].abs().sum() > 0  # the [MASK] row learns
    assert (model.backbone.item_embedding.weight.grad[0] == 0).all()  # padding row does not


# -- PLR on the bert4rec backbone -------------------------------------------------------


def extended_mask(key_mask, num_streams, steps):
    """[B, N' + steps*M, ...] with N' = N + 1 (items + [MASK]): the prefix is
    bidirectional over its valid tokens; token (s, m) sees the valid prefix and
    the tokens (s' <= s, m) of its own stream, itself included."""
    b, n = key_mask.shape
    m = num_streams
    total = n + steps * m
    mask = torch.zeros(b, total, total, dtype=torch.bool)
    mask[:, :n, :n] = bidirectional_mask(key_mask)
    for s in range(steps):
        for stream in range(m):
            row = n + s * m + stream
            mask[:, row, :n] = key_mask
            for earlier in range(s + 1):
                mask[:, row, n + earlier * m + stream] = True
    return mask


def reason_by_recompute(model, item_seq):
    """At every step rerun [items, MASK, reasoning tokens so far] through every
    layer under the explicit mask (no KV cache)."""
    bb = model.backbone
    tokens = torch.cat([item_seq, torch.full_like(item_seq[:, :1], bb.mask_token)], dim=1)
    key_mask = tokens != 0
    n, m = tokens.shape[1], model.num_streams
    x_prefix = bb.input_embedding(tokens)
    h0 = bb.run_layers(x_prefix, bidirectional_mask(key_mask))[0][:, -1]
    h_prev = h0[:, None] + model.trigger_tokens[None]
    inputs, states = [], []
    for t in range(model.num_steps):
        inputs.append(model.reasoning_input(h_prev, t))
        out = bb.run_layers(torch.cat([x_prefix] + inputs, dim=1), extended_mask(key_mask, m, t + 1))[0]
        torch.testing.assert_close(out[:, n - 1], h0, rtol=0, atol=1e-12)  # reasoning never leaks into the prefix
        h_prev = out[:, n + t * m: n + (t + 1) * m]
        states.append(h_prev)
    return h0, torch.stack(states, dim=1)


@pytest.mark.parametrize("streams,steps", [(1, 1), (3, 3), (4, 2)])
def test_plr_cached_reasoning_equals_recomputing_the_extended_sequence(streams, steps):
    model = small_plr(num_streams=streams, num_steps=steps).double().eval()
    assert isinstance(model.backbone, BERT4RecBackbone)
    seq = histories()
    with torch.no_grad():
        out = model(seq)
        h0, brute = reason_by_recompute(model, seq)
    assert out.states.shape == (5, steps, streams, 12)
    torch.testing.assert_close(out.h0, h0, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.states, brute, rtol=0, atol=1e-10)


def test_plr_streams_are_isolated_and_prefix_is_bidirectional():
    model = small_plr().double().eval()
    seq = histories()
    with torch.no_grad():
        before = model(seq).states.clone()
        model.trigger_tokens[1] += torch.randn(12, dtype=torch.float64)
        after = model(seq).states
    for stream in (0, 2):
        torch.testing.assert_close(after[:, :, stream], before[:, :, stream], rtol=0, atol=1e-12)
    assert (after[:, :, 1] - before[:, :, 1]).abs().max() > 1e-3
    # The reasoning tokens attend to the [MASK] token of the prefix.
    with torch.no_grad():
        model.backbone.item_embedding.weight[MASK] += torch.randn(12, dtype=torch.float64)
        moved = model(seq).states
    assert (moved - after).abs().max() > 1e-3


def test_plr_on_bert4rec_gradients_reach_every_parameter():
    model = small_plr(dropout=0.1).double().train()
    loss, parts = model.compute_loss(histories(), torch.randint(1, NUM_ITEMS + 1, (5,)))
    assert set(parts) == {"nip", "kl", "rcl"}
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# -- checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: small_bert4rec(mask_ratio=0.3, last_item_prob=0.25), small_plr])
def test_save_load_round_trip(make, tmp_path):
    model = make().eval()
    with torch.no_grad():
        model.backbone.item_embedding.weight.add_(0.1 * torch.randn_like(model.backbone.item_embedding.weight))
    path = tmp_path / "model.pt"
    model.save(str(path))
    loaded = SequentialRecommender.load(str(path)).eval()
    assert type(loaded) is type(model) and isinstance(loaded.backbone, BERT4RecBackbone)
    assert loaded.config() == model.config()
    seq = histories()
    torch.testing.assert_close(loaded(seq).z_final, model(seq).z_final, rtol=0, atol=0)
    if isinstance(model, BERT4RecModel):
        assert (loaded.mask_ratio, loaded.last_item_prob) == (0.3, 0.25)


# -- training on real data ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ml100k():
    return build_dataset(read_interactions(str(ML100K)), max_len=20, split="loo")


@needs_ml100k
@pytest.mark.parametrize("name,extra", [("bert4rec", {}), ("plr", {"backbone": "bert4rec", "num_streams": 2,
                                                                   "num_steps": 2})])
def test_loss_decreases_on_ml100k(ml100k, name, extra):
    torch.manual_seed(0)
    model = model_class(name)(ml100k.num_items, max_len=ml100k.max_len, hidden_size=16, num_heads=2,
                              inner_size=32, dropout=0.1, backend="torch", **extra).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.randperm(len(ml100k.train), generator=torch.Generator().manual_seed(0))
    nips = []
    for step in range(20):
        seq, target = ml100k.train.gather(order[step * 128:(step + 1) * 128])
        loss, parts = model.compute_loss(seq, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        nips.append(parts["nip"].item())
    first, last = sum(nips[:4]) / 4, sum(nips[-4:]) / 4
    assert last < first - 0.2, nips


@needs_ml100k
@pytest.mark.parametrize("argv,cls", [(["--model", "bert4rec"], BERT4RecModel),
                                      (["--model", "plr", "--backbone", "bert4rec"], PLRModel)])
def test_cli_trains_bert4rec_and_plr_on_bert4rec(argv, cls, tmp_path, capsys):
    out = tmp_path / "run"
    sets = ["train.epochs=1", "train.max_steps_per_epoch=3", "train.batch_size=64", "train.progress=false",
            "model.hidden_size=16", "model.inner_size=32", "data.max_len=12",
            "eval.batch_size=1024"]
    code = main(["train", *argv, "--data", str(ML100K), "--out", str(out), *sum((["--set", s] for s in sets), [])])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["ndcg@10"] <= 1.0 and metrics["epochs"] == 1
    model = SequentialRecommender.load(str(out / "best.pt"))
    assert type(model) is cls and isinstance(model.backbone, BERT4RecBackbone)
    assert model.backbone.max_len == 12
