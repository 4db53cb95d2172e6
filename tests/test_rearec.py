"""ReaRec-ERL and ReaRec-PRL (plr.models.rearec) on the backbone interface."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import plr.backbones
import plr.models.rearec as rearec
from plr.backbones import causal_mask
from plr.cli import main
from plr.data import build_dataset, read_interactions
from plr.demo import synthetic_histories, write_sequences
from plr.losses import reasoning_contrastive_loss
from plr.models import SequentialRecommender, build_model
from plr.models.rearec import ReaRecERLModel, ReaRecPRLModel
from plr_kernels import reference

NUM_ITEMS = 37
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MODELS = [ReaRecERLModel, ReaRecPRLModel]


def small(cls, **overrides):
    args = dict(max_len=9, hidden_size=12, num_layers=2, num_heads=3, inner_size=17, num_steps=3, backend="torch")
    args.update(overrides)
    return cls(NUM_ITEMS, **args)


def deterministic(cls, **overrides):
    """No dropout anywhere: training-mode forwards are deterministic."""
    return small(cls, dropout=0.0, reasoning_dropout=0.0, **overrides).double().train()


def histories(batch=5, length=9):
    seq = torch.randint(1, NUM_ITEMS + 1, (batch, length))
    for row in range(batch):  # left padding of varied length, one full row, one single item
        seq[row, : min(row * 2, length - 1)] = 0
    return seq


def targets(batch=5):
    return torch.randint(1, NUM_ITEMS + 1, (batch,))


# -- reasoning: append-and-re-encode -------------------------------------------------


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("steps", [1, 3])
def test_cached_reasoning_equals_reencoding_the_extended_sequence(cls, steps):
    """ReaRec appends Dropout(LN(h_{k-1} + r_k)) to the sequence and re-runs the
    causal encoder; the KV-cached single stream must give the same h_k."""
    torch.manual_seed(0)
    model = small(cls, num_steps=steps).double().eval()
    seq = histories()
    bb = model.backbone
    with torch.no_grad():
        x = bb.input_embedding(seq)
        key_mask = seq != 0
        h_prev = bb.run_layers(x, causal_mask(key_mask))[0][:, -1:]
        h0, want = h_prev[:, 0], []
        for k in range(steps):
            x = torch.cat([x, model.reasoning_input(h_prev, k)], dim=1)
            key_mask = torch.cat([key_mask, torch.ones(5, 1, dtype=torch.bool)], dim=1)
            h_prev = bb.run_layers(x, causal_mask(key_mask))[0][:, -1:]
            want.append(h_prev[:, 0])
        out = model(seq)
    assert out.states.shape == (5, steps, 1, 12)
    torch.testing.assert_close(out.h0, h0, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.states[:, :, 0], torch.stack(want, 1), rtol=0, atol=1e-10)


# -- ERL -------------------------------------------------------------------------------


def test_erl_pools_the_mean_of_h0_and_every_step():
    torch.manual_seed(1)
    model = small(ReaRecERLModel).double().eval()
    seq = histories()
    with torch.no_grad():
        out = model(seq)
    by_hand = (out.h0 + out.states[:, 0, 0] + out.states[:, 1, 0] + out.states[:, 2, 0]) / 4
    torch.testing.assert_close(out.z_final, by_hand)
    torch.testing.assert_close(out.z_rea, by_hand)
    # recommend scores with the same mean
    scores, ids = model.recommend(seq, k=6)
    want_scores, want_ids = torch.topk(by_hand @ model.item_emb[1:].detach().T, 6)
    assert torch.equal(ids, want_ids + 1)
    torch.testing.assert_close(scores, want_scores)


def materialised_erl_loss(model, seq, target, detach):
    """CE(mean) - lambda * mean_{i!=j} KL(p_i || p_j) with every softmax written out."""
    out = model(seq)
    outputs = torch.cat([out.h0[:, None], out.states[:, :, 0]], dim=1)  # [B,K+1,d]
    items = model.item_emb[1:]  # the padding row is in no softmax
    logp = torch.log_softmax(outputs @ items.T / model.temperature, dim=-1)
    target_logp = logp.detach() if detach else logp
    k = outputs.shape[1]
    kl = sum((logp[:, i].exp() * (logp[:, i] - target_logp[:, j])).sum(-1)
             for i in range(k) for j in range(k) if i != j) / (k * (k - 1))
    ce = F.cross_entropy(out.z_final @ items.T / model.temperature, target - 1)
    return ce - model.kl_weight * kl.mean(), ce, kl.mean()


def test_erl_loss_subtracts_lambda_times_multi_pair_kl():
    torch.manual_seed(2)
    model = deterministic(ReaRecERLModel, kl_weight=0.3)
    seq, target = histories(), targets()
    loss, parts = model.compute_loss(seq, target)
    with torch.no_grad():
        out = model(seq)
        outputs = torch.cat([out.h0[:, None], out.states[:, :, 0]], dim=1)
        kl = reference.multi_pair_kl(outputs, model.item_emb, temperature=0.07, exclude_index=0,
                                     detach_target=True).mean()
        ce = reference.linear_cross_entropy(out.z_final, model.item_emb, target, temperature=0.07, exclude_index=0)
    assert parts["kl"] > 0
    torch.testing.assert_close(parts["kl"], kl)
    torch.testing.assert_close(parts["nip"], ce)
    torch.testing.assert_close(loss.detach(), ce - 0.3 * kl)
    _, want_ce, want_kl = materialised_erl_loss(model, seq, target, detach=True)
    torch.testing.assert_close(parts["kl"], want_kl.detach())
    torch.testing.assert_close(parts["nip"], want_ce.detach())


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("detach", [True, False])
def test_erl_gradient_detaches_the_kl_target_side(detach):
    """Gradients of the model's loss equal those of the materialised loss with
    log p_j under a stop-gradient, and differ from the undetached ones."""
    torch.manual_seed(3)
    model = deterministic(ReaRecERLModel, kl_weight=0.5, num_steps=2, kl_detach_target=detach)
    seq, target = histories(), targets()
    got = _grads(model, model.compute_loss(seq, target)[0])
    same = _grads(model, materialised_erl_loss(model, seq, target, detach=detach)[0])
    other = _grads(model, materialised_erl_loss(model, seq, target, detach=not detach)[0])
    for g, w in zip(got, same):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)
    assert max((g - o).abs().max().item() for g, o in zip(got, other)) > 1e-6


def test_erl_without_kl_is_cross_entropy_of_the_mean():
    torch.manual_seed(4)
    model = deterministic(ReaRecERLModel, kl_weight=0.0)
    seq, target = histories(), targets()
    loss, parts = model.compute_loss(seq, target)
    out = model(seq)
    torch.testing.assert_close(loss, F.cross_entropy(out.z_final @ model.item_emb[1:].T / 0.07, target - 1))
    assert parts["kl"] == 0


# -- PRL -------------------------------------------------------------------------------


def test_prl_temperature_schedule_by_hand():
    model = small(ReaRecPRLModel, temperature=0.5, temperature_decay=2.0, num_steps=3)
    assert model.step_temperatures() == pytest.approx([4.0, 2.0, 1.0, 0.5])
    model = small(ReaRecPRLModel, temperature=0.07, temperature_decay=1.5, num_steps=2)
    assert model.step_temperatures() == pytest.approx([0.1575, 0.105, 0.07])


def test_prl_loss_is_final_step_ce_plus_mean_of_earlier_annealed_ces():
    torch.manual_seed(5)
    model = deterministic(ReaRecPRLModel, temperature=0.2, temperature_decay=3.0, num_steps=2, noise_std=0.0,
                          pl_weight=0.7)
    seq, target = histories(), targets()
    loss, parts = model.compute_loss(seq, target)
    out = model(seq)
    outputs = [out.h0, out.states[:, 0, 0], out.states[:, 1, 0]]
    items = model.item_emb[1:]
    ce = [F.cross_entropy(o @ items.T / tau, target - 1) for o, tau in zip(outputs, [1.8, 0.6, 0.2])]
    torch.testing.assert_close(loss, ce[2] + 0.7 * (ce[0] + ce[1]) / 2)
    torch.testing.assert_close(parts["nip"], ce[2].detach())
    torch.testing.assert_close(parts["pl"], ((ce[0] + ce[1]) / 2).detach())


def test_prl_inference_uses_the_final_step():
    torch.manual_seed(6)
    model = small(ReaRecPRLModel).double().eval()
    seq = histories()
    with torch.no_grad():
        out = model(seq)
    torch.testing.assert_close(out.z_final, out.states[:, -1, 0], rtol=0, atol=0)
    assert (out.z_final - out.states[:, :-1, 0].mean(1)).abs().max() > 1e-6
    scores, ids = model.recommend(seq, k=5)
    want_scores, want_ids = torch.topk(out.z_final @ model.item_emb[1:].detach().T, 5)
    assert torch.equal(ids, want_ids + 1)
    torch.testing.assert_close(scores, want_scores)


def test_prl_noise_touches_the_reasoning_input_only_in_training():
    torch.manual_seed(7)
    model = small(ReaRecPRLModel, reasoning_dropout=0.0, noise_std=0.3).double()
    h = torch.randn(2000, 1, 12, dtype=torch.float64)
    clean = model.reasoning_input(h, 1)
    noisy = model.reasoning_input(h, 1, noise_std=0.3)
    assert (noisy - clean).std().item() == pytest.approx(0.3, rel=0.05)
    model.eval()
    torch.testing.assert_close(model.reasoning_input(h, 1, noise_std=0.3), clean, rtol=0, atol=0)
    # The clean forward never sees noise: eval outputs match a noise-free twin.
    twin = small(ReaRecPRLModel, reasoning_dropout=0.0, noise_std=0.0).double().eval()
    twin.load_state_dict(model.state_dict())
    seq = histories()
    torch.testing.assert_close(model(seq).z_final, twin(seq).z_final, rtol=0, atol=0)


def _count_reasoning_passes(monkeypatch):
    calls = []
    original = rearec.stream_reasoning

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(rearec, "stream_reasoning", counting)
    return calls


def test_prl_contrastive_term_with_noise(monkeypatch):
    torch.manual_seed(8)
    model = small(ReaRecPRLModel, noise_std=0.5, rcl_weight=0.4).double().train()
    calls = _count_reasoning_passes(monkeypatch)
    seq, target = histories(), targets()
    loss, parts = model.compute_loss(seq, target)
    assert len(calls) == 2  # clean + noisy reasoning pass
    assert parts["rcl"] > 0
    torch.testing.assert_close(loss.detach(), parts["nip"] + parts["pl"] + 0.4 * parts["rcl"])
    # The InfoNCE of a view with itself is lower than clean vs noisy: the noise matters.
    states = model(seq).states.detach()
    assert reasoning_contrastive_loss(states, states) < parts["rcl"]
    loss.backward()
    assert model.reasoning_position.weight.grad.abs().sum() > 0


def test_prl_without_noise_has_an_exact_zero_contrastive_term_at_every_epoch(monkeypatch, tmp_path):
    """The public PRL leaves its contrastive term undefined with noise off."""
    torch.manual_seed(9)
    model = small(ReaRecPRLModel, noise_std=0.0, rcl_weight=0.4).double().train()
    calls = _count_reasoning_passes(monkeypatch)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss, parts = model.compute_loss(histories(), targets())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert parts["rcl"] == 0 and torch.equal(loss.detach(), parts["nip"] + parts["pl"])
    assert len(calls) == 3  # the noisy pass never runs
    # Evaluation never runs it either, noise on or not.
    noisy = small(ReaRecPRLModel, noise_std=0.5).double().eval()
    calls.clear()
    _, parts = noisy.compute_loss(histories(), targets())
    assert parts["rcl"] == 0 and len(calls) == 1


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synthetic.txt"
    write_sequences(synthetic_histories(120, 40, num_interests=4, min_len=5, max_len=12, seed=3), path)
    return path


TINY = ["model.hidden_size=16", "model.inner_size=24", "model.num_heads=2", "model.dropout=0.2", "data.max_len=10",
        "data.format=sequences", "train.batch_size=32", "train.progress=false", "train.seed=5",
        "train.max_steps_per_epoch=3", "model.backend=torch"]


@pytest.mark.parametrize("name,extra", [
    ("erl", []),
    ("prl", []),
    ("prl", ["model.noise_std=0"]),  # several epochs with noise off: no crash
])
def test_cli_train_through_several_epochs(synthetic, tmp_path, name, extra):
    out = tmp_path / "run"
    sets = sum((["--set", s] for s in TINY + ["train.epochs=2"] + extra), [])
    assert main(["train", "--model", name, "--data", str(synthetic), "--out", str(out), *sets]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and 0 <= metrics["test"]["ndcg@10"] <= 1
    model = SequentialRecommender.load(str(out / "best.pt"))
    assert type(model) is {"erl": ReaRecERLModel, "prl": ReaRecPRLModel}[name]
    assert model.config()["hidden_size"] == 16


@pytest.mark.skipif(not (DATA / "ml-100k_recbole").is_dir(), reason="shared data not present")
@pytest.mark.parametrize("name", ["erl", "prl"])
def test_a_few_steps_on_real_data_lower_the_loss(name):
    ds = build_dataset(read_interactions(DATA / "ml-100k_recbole"), max_len=20)
    torch.manual_seed(10)
    model = build_model({"name": name, "hidden_size": 16, "num_heads": 2, "inner_size": 24, "dropout": 0.1,
                         "backend": "torch"}, ds.num_items, 20).train()
    item_seq, target = ds.train.gather(torch.randperm(len(ds.train))[:256])
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(12):
        loss, _ = model.compute_loss(item_seq, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


# -- any backbone, checkpoints, bad input ----------------------------------------------


class InterfaceOnlyBackbone(nn.Module):
    """A backbone that exposes only the plr.backbones interface (encode, layers,
    item_table, reset_padding), hiding the SASRec module behind other names."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self._inner = plr.backbones.SASRecBackbone(*args, **kwargs)
        self.layers = self._inner.layers

    def encode(self, item_seq):
        return self._inner.encode(item_seq)

    def item_table(self):
        return self._inner.item_table()

    def reset_padding(self):
        self._inner.reset_padding()


@pytest.mark.parametrize("cls", MODELS)
def test_runs_on_any_backbone_of_the_interface(cls, monkeypatch):
    monkeypatch.setitem(plr.backbones.BACKBONES, "interface_only", (__name__, "InterfaceOnlyBackbone"))
    torch.manual_seed(11)
    model = small(cls, backbone="interface_only").double()
    ref = small(cls).double()
    ref.load_state_dict({k.replace("backbone._inner.", "backbone."): v for k, v in model.state_dict().items()})
    seq, target = histories(), targets()
    model.eval(), ref.eval()
    torch.testing.assert_close(model(seq).z_final, ref(seq).z_final, rtol=0, atol=0)
    loss, _ = model.train().compute_loss(seq, target)
    loss.backward()
    assert model.item_emb.grad[1:].abs().sum() > 0 and model.item_emb.grad[0].abs().sum() == 0


@pytest.mark.parametrize("cls", MODELS)
def test_save_load_round_trip(cls, tmp_path):
    torch.manual_seed(12)
    model = small(cls, num_steps=2, dropout=0.3).eval()
    path = tmp_path / "m.pt"
    model.save(str(path))
    loaded = SequentialRecommender.load(str(path)).eval()
    assert type(loaded) is cls and loaded.config() == model.config()
    seq = histories()
    torch.testing.assert_close(loaded(seq).z_final, model(seq).z_final, rtol=0, atol=0)
    other = ReaRecPRLModel if cls is ReaRecERLModel else ReaRecERLModel
    with pytest.raises(TypeError, match=cls.__name__):
        other.load(str(path))


@pytest.mark.parametrize("cls,kwargs,match", [
    (ReaRecERLModel, {"num_steps": 0}, r"num_steps.*>= 1.*got 0"),
    (ReaRecERLModel, {"kl_weight": -0.1}, r"kl_weight.*>= 0.*-0.1"),
    (ReaRecERLModel, {"kl_detach_target": "yes"}, r"kl_detach_target.*'yes'"),
    (ReaRecERLModel, {"reasoning_dropout": 1.5}, r"reasoning_dropout"),
    (ReaRecPRLModel, {"temperature_decay": 0}, r"temperature_decay.*> 0.*got 0"),
    (ReaRecPRLModel, {"noise_std": -1}, r"noise_std.*>= 0.*got -1"),
    (ReaRecPRLModel, {"rcl_weight": "a"}, r"rcl_weight.*'a'"),
    (ReaRecPRLModel, {"rcl_temperature": 0.0}, r"rcl_temperature.*> 0.*0.0"),
    (ReaRecPRLModel, {"temperature": 0}, r"temperature.*positive.*0"),
    (ReaRecPRLModel, {"backbone": "lstm"}, r"backbone.*'lstm'"),
])
def test_bad_config_names_the_argument(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        small(cls, **kwargs)


@pytest.mark.parametrize("cls", MODELS)
def test_bad_targets_and_histories_name_the_argument(cls):
    model = small(cls)
    with pytest.raises(ValueError, match=r"target.*\[1, 37\].*got 0"):
        model.compute_loss(histories(2), torch.tensor([3, 0]))
    with pytest.raises(ValueError, match=r"item_seq.*\[0, 37\].*38"):
        model(torch.tensor([[1, 2, NUM_ITEMS + 1]]))


@pytest.mark.parametrize("cls", MODELS)
def test_triton_kernels_match_the_torch_reference(cls):
    """backend="triton" (interpreted on CPU: stream attention, the fused vocabulary
    pass, linear cross-entropy) against backend="torch", float64, loss and gradients."""
    torch.manual_seed(13)
    args = dict(num_steps=2, hidden_size=8, num_heads=2, inner_size=9, dropout=0.0, reasoning_dropout=0.0)
    fused = small(cls, backend="triton", **args).double().train()
    ref = small(cls, backend="torch", **args).double().train()
    ref.load_state_dict(fused.state_dict())
    seq, target = histories(3), targets(3)
    torch.manual_seed(14)
    loss_fused, parts_fused = fused.compute_loss(seq, target)
    torch.manual_seed(14)
    loss_ref, parts_ref = ref.compute_loss(seq, target)
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-10, atol=1e-12)
    assert all(v != 0 for v in parts_ref.values())  # the KL / contrastive terms are exercised
    for g, w in zip(_grads(fused, loss_fused), _grads(ref, loss_ref)):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name,cls", [("erl", ReaRecERLModel), ("prl", ReaRecPRLModel)])
def test_shipped_configs_follow_the_rearec_defaults_and_build_the_model(name, cls):
    from plr import config

    cfg = config.resolve(name, None, ["model.hidden_size=16", "model.inner_size=8"])
    m = config.shipped_config(name)["model"]
    assert (m["hidden_size"], m["num_layers"], m["num_heads"], m["inner_size"], m["dropout"]) == (256, 2, 2, 300, 0.5)
    assert (m["temperature"], m["num_steps"], m["backbone"]) == (0.07, 2, "sasrec")
    model = build_model(cfg["model"], 30, 10)
    assert type(model) is cls
    # every shipped key reaches the model unchanged
    assert all(model.config()[k] == v for k, v in cfg["model"].items() if k != "name")
