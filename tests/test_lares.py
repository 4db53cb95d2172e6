"""LARES: architecture, depth and initial-state sampling, SPT (TLA, SLA) and RPT
(GRPO) terms against hand computations, short trainings on real data, the
phase mechanics through the command line, checkpoints."""

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import plr_kernels
from conftest import benchmark_script, cli_error
from plr import config
from plr.cli import build_parser, main
from plr.data import build_dataset, read_interactions
from plr.data.dataset import TrainSamples
from plr.demo import synthetic_histories, write_sequences
from plr.evaluation import per_user_metric
from plr.models import SequentialRecommender, build_model
from plr.models.lares import LARESModel, sample_depth, truncated_normal_state
from plr.models.lares_objectives import (exact_kl, group_advantages, grpo_policy_loss, k3_kl, ranking_reward, sla_loss,
                                         tla_loss, tla_positive_mask)

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ML100K = DATA / "ml-100k_recbole"
TINY = dict(max_len=8, hidden_size=16, inner_size=32, num_heads=2, dropout=0.1, backend="torch")


def tiny_model(num_items=40, **kw):
    return LARESModel(num_items, **{**TINY, **kw})


def random_batch(b=5, n=8, num_items=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, num_items + 1, (b, n), generator=gen)
    seq[0, : n - 1] = 0  # a history of one item
    if b > 2:
        seq[2, :3] = 0  # a padded history
    return seq, torch.randint(1, num_items + 1, (b,), generator=gen)


# -- depth and initial state ------------------------------------------------------------


def test_training_depth_varies_around_the_mean_and_inference_depth_is_fixed():
    torch.manual_seed(1)
    depths = np.array([sample_depth(4.0, 0.5, 100) for _ in range(4000)])
    assert depths.min() >= 1 and len(set(depths.tolist())) > 5
    # E[k] = mean_depth; std of k ~ 2.4, so the mean of 4000 draws is within 0.15 w.h.p.
    assert abs(depths.mean() - 4.0) < 0.15, depths.mean()
    capped = [sample_depth(6.0, 1.0, 5) for _ in range(500)]
    assert max(capped) == 5 and min(capped) >= 1

    model = tiny_model(mean_depth=3.0, max_depth=6, eval_depth=4)
    seq, _ = random_batch()
    seen = {model(seq).states.shape[1] for _ in range(40)}
    assert len(seen) >= 3 and max(seen) <= 6
    model.eval()
    assert {model(seq).states.shape[1] for _ in range(5)} == {4}
    with pytest.raises(ValueError, match="mean_depth"):
        tiny_model(mean_depth=1.0)


def test_initial_state_is_a_truncated_normal():
    torch.manual_seed(2)
    std, cut = 0.5, 2.0
    x = truncated_normal_state((40000,), std, cut, dtype=torch.float64)
    assert x.abs().max() <= cut * std and x.abs().max() > 0.95 * cut * std
    expected = stats.truncnorm(-cut, cut, scale=std)
    assert abs(x.std().item() - expected.std()) < 0.01 and abs(x.mean().item()) < 0.01
    assert stats.kstest(x.numpy(), expected.cdf).pvalue > 1e-3

    model = tiny_model(init_std=0.3, init_truncation=1.5)
    e = torch.zeros(4, 8, 16)
    a, b = model.initial_state(e), model.initial_state(e)
    assert not torch.equal(a, b) and a.abs().max() <= 0.45
    model.eval()  # inference starts from one fixed draw: deterministic
    assert torch.equal(model.initial_state(e), model.initial_state(e))
    assert model.initial_state(e).abs().max() <= 0.45
    seq, _ = random_batch()
    assert torch.equal(model(seq).z_final, model(seq).z_final)


# -- adapters ------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["add", "concat", "gate"])
def test_adapter_variants(adapter):
    model = tiny_model(adapter=adapter)
    s, e = torch.randn(3, 8, 16), torch.randn(3, 8, 16)
    out = model.combine(s, e)
    assert out.shape == (3, 8, 16)
    if adapter == "add":
        assert model.adapter is None and torch.equal(out, s + e)
    elif adapter == "concat":
        assert torch.allclose(out, torch.cat([s, e], -1) @ model.adapter.weight.T + model.adapter.bias)
    else:
        g = torch.sigmoid(model.adapter(torch.cat([s, e], -1)))
        assert torch.allclose(out, g * s + (1 - g) * e)
        with torch.no_grad():
            model.adapter.weight.zero_()
            model.adapter.bias.fill_(30.0)  # g -> 1: the state passes
            assert torch.allclose(model.combine(s, e), s, atol=1e-6)
            model.adapter.bias.fill_(-30.0)  # g -> 0: the pre-block output passes
            assert torch.allclose(model.combine(s, e), e, atol=1e-6)
    seq, target = random_batch()
    out = model(seq)
    assert out.z_final.shape == (5, 16) and out.states.shape[2:] == (1, 16)
    assert torch.isfinite(out.z_final).all()
    loss, parts = model.compute_loss(seq, target)
    loss.backward()
    assert all(p.grad is not None for p in model.core.parameters())
    with pytest.raises(ValueError, match="adapter: expected one of"):
        tiny_model(adapter="sum")


def test_truncated_backprop_keeps_the_forward_and_cuts_the_graph():
    seq, _ = random_batch()
    weight = torch.randn(16)
    grads = {}
    for n in (None, 1):
        model = tiny_model(backprop_steps=n, dropout=0.0)
        torch.manual_seed(3)
        model.load_state_dict(tiny_model(dropout=0.0).state_dict())
        torch.manual_seed(4)
        h0, reps = model.recur(model.prepare(seq), 3)
        early = torch.autograd.grad((reps[:, :2] * weight).sum(), list(model.parameters()), retain_graph=True,
                                    allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in early) == (n is None)
        (reps[:, -1] * weight).sum().backward()  # (a plain sum of a LayerNorm output is constant)
        grads[n] = (reps.detach(), model.core[0].feed_forward.dense_in.weight.grad.clone())
    assert torch.allclose(grads[None][0], grads[1][0])
    assert grads[1][1].abs().max() > 1e-4 and not torch.allclose(grads[None][1], grads[1][1])


# -- SPT: trajectory- and step-level alignment ----------------------------------------


def test_tla_positives_are_exactly_the_pairs_sharing_the_target():
    target = torch.tensor([5, 3, 5, 7, 3, 5])
    mask = tla_positive_mask(target)
    expected = {(0, 2), (2, 0), (0, 5), (5, 0), (2, 5), (5, 2), (1, 4), (4, 1)}
    assert {tuple(p) for p in mask.nonzero().tolist()} == expected


def test_tla_loss_against_a_hand_computation_and_without_positives():
    torch.manual_seed(5)
    z = torch.randn(6, 4, dtype=torch.float64)
    target = torch.tensor([5, 3, 5, 7, 3, 5])
    tau = 0.5
    loss, anchors = tla_loss(z, target, tau)
    zn = z / z.norm(dim=1, keepdim=True)
    per_anchor = []
    for i in range(6):
        pos = [j for j in range(6) if j != i and target[j] == target[i]]
        if not pos:
            continue
        den = sum(math.exp(float(zn[i] @ zn[k]) / tau) for k in range(6) if k != i)
        per_anchor.append(np.mean([-math.log(math.exp(float(zn[i] @ zn[j]) / tau) / den) for j in pos]))
    assert anchors == 5 and loss.item() == pytest.approx(np.mean(per_anchor), rel=1e-12)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: tla_loss(x, target, tau)[0], (z,))

    # No two rows share a target: the term is 0, has no anchors, and backward is clean.
    loss, anchors = tla_loss(z, torch.arange(1, 7), tau)
    assert anchors == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_tla_partners_come_from_the_training_data_with_the_same_target():
    flat = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 4])
    start = torch.tensor([0, 3, 6, 9])
    end = torch.tensor([3, 6, 9, 11])
    target = torch.tensor([9, 9, 9, 4])  # target 4 has a single sequence: no partner
    samples = TrainSamples(flat, start, end, target, max_len=8)
    model = tiny_model(num_items=12)
    model.attach_training_data(samples)
    seq, tgt = samples.gather(torch.tensor([0, 1, 2, 3]))
    torch.manual_seed(6)
    for _ in range(10):
        partner_seq, partner_tgt = model.draw_partners(seq, tgt)
        assert partner_tgt.tolist() == [9, 9, 9]
        assert not (partner_seq == seq[:3]).all(dim=1).any()  # a DIFFERENT sequence
        own = {tuple(s.tolist()) for s in seq[:3]}
        assert all(tuple(s.tolist()) in own for s in partner_seq)
    loss, parts = model.compute_loss(seq, tgt)
    assert parts["tla_anchors"].item() == 6  # 3 rows + 3 partners, all with target 9
    assert model.draw_partners(seq[3:], tgt[3:]) is None


def test_sla_loss_against_a_hand_computation():
    torch.manual_seed(7)
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    tau = 0.7
    an, bn = F.normalize(a, dim=1), F.normalize(b, dim=1)
    sim = (an @ bn.T / tau).numpy()
    fwd = np.mean([-sim[i, i] + np.log(np.exp(sim[i]).sum()) for i in range(4)])
    bwd = np.mean([-sim[i, i] + np.log(np.exp(sim[:, i]).sum()) for i in range(4)])
    assert sla_loss(a, b, tau).item() == pytest.approx(0.5 * (fwd + bwd), rel=1e-12)
    assert sla_loss(a, a, 0.1) < sla_loss(a, b, 0.1)
    assert torch.autograd.gradcheck(lambda x, y: sla_loss(x, y, tau), (a.requires_grad_(), b.requires_grad_()))


# -- RPT: reward, advantages, policy term, KL ------------------------------------------


def test_reward_matches_the_evaluation_metrics():
    ranks = torch.arange(1, 31)
    for metric in ("recall@10", "ndcg@10"):
        assert np.allclose(ranking_reward(ranks, metric).numpy(), per_user_metric(ranks.numpy(), metric))
    with pytest.raises(ValueError, match="reward"):
        ranking_reward(ranks, "mrr")


def test_group_advantages_against_a_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.0, 0.3], [1.0, 0.5, 0.3]], dtype=torch.float64)  # [G=3, B=3]
    adv = group_advantages(rewards, eps=0.0 + 1e-12)
    for b in range(2):
        col = rewards[:, b].tolist()
        mean = sum(col) / 3
        std = math.sqrt(sum((r - mean) ** 2 for r in col) / 3)
        assert adv[:, b].tolist() == pytest.approx([(r - mean) / std for r in col], rel=1e-9)
    assert adv[:, 2].tolist() == [0.0, 0.0, 0.0]  # equal rewards: no signal
    assert adv.sum(dim=0).abs().max() < 1e-9


def test_policy_loss_gradient_sign_and_value():
    logp = torch.log(torch.tensor([[[0.2, 0.1]], [[0.3, 0.2]]], dtype=torch.float64)).requires_grad_()  # [G=2,B=1,T=2]
    adv = group_advantages(torch.tensor([[1.0], [0.0]], dtype=torch.float64))
    loss = grpo_policy_loss(logp, adv)
    expected = -(adv[0, 0] * (math.log(0.2) + math.log(0.1)) + adv[1, 0] * (math.log(0.3) + math.log(0.2))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    loss.backward()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()
    # Raising the log-prob of the high-reward rollout lowers the loss; of the low-reward one raises it.
    with torch.no_grad():
        up_good, up_bad = logp.clone(), logp.clone()
        up_good[0] += 0.1
        up_bad[1] += 0.1
        assert grpo_policy_loss(up_good, adv) < loss < grpo_policy_loss(up_bad, adv)


def test_kl_terms_against_hand_computations():
    p, q = 0.5, 0.25
    assert k3_kl(torch.tensor(math.log(p)), torch.tensor(math.log(q))).item() == pytest.approx(
        q / p - math.log(q / p) - 1, rel=1e-6)
    assert k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0
    inf = float("-inf")
    logits_p = torch.tensor([[inf, 0.0, 0.0]], dtype=torch.float64)  # padding, then p = (1/2, 1/2)
    logits_q = torch.tensor([[inf, 0.0, math.log(3.0)]], dtype=torch.float64)  # q = (1/4, 3/4)
    hand = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert exact_kl(logits_p, logits_q).item() == pytest.approx(hand, rel=1e-12)
    x = torch.randn(3, 5, dtype=torch.float64)
    y = torch.randn(3, 5, dtype=torch.float64)
    assert torch.allclose(exact_kl(x, x), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(exact_kl(x, y), F.kl_div(F.log_softmax(y, 1), F.log_softmax(x, 1), log_target=True,
                                                   reduction="none").sum(1))
    padded = logits_p.clone().requires_grad_()
    exact_kl(padded, logits_q).sum().backward()
    assert torch.isfinite(padded.grad).all()
    assert torch.autograd.gradcheck(lambda a: exact_kl(a, y), (x.requires_grad_(),))


@pytest.mark.parametrize("kl_kind", ["k3", "exact"])
def test_rpt_loss_wiring(kl_kind):
    # Without noise (no dropout, s_0 = 0) the policy equals its frozen reference: KL = 0.
    spt = tiny_model(dropout=0.0, init_std=0.0)
    model = tiny_model(dropout=0.0, init_std=0.0, phase="rpt", kl_kind=kl_kind, group_size=3)
    seq, target = random_batch()
    with pytest.raises(RuntimeError, match="start_rpt"):
        model.compute_loss(seq, target)
    model.start_rpt(spt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), spt.state_dict().values()))
    assert not any(p.requires_grad for p in model.spt_reference.parameters())
    loss, parts = model.compute_loss(seq, target)
    assert parts["kl"].abs().item() < 1e-5
    # Identical rollouts: every advantage is 0, so is the policy term.
    assert parts["policy"].item() == 0.0
    model.eval()
    ranks = plr_kernels.target_rank(model(seq).z_final, model.item_emb, target, exclude_index=0, backend="torch")
    assert parts["reward"].item() == pytest.approx(ranking_reward(ranks, "ndcg@10").mean().item(), abs=1e-6)
    with pytest.raises(TypeError, match="spt_model"):
        model.start_rpt(torch.nn.Linear(2, 2))


def test_rpt_kl_reference_replays_the_rollouts_noise():
    """kl_reference=same_noise runs the frozen SPT model on the rollouts' own s_0 draws and
    dropout masks: at RPT's start (same weights) the KL is 0 although the rollouts are noisy;
    eval mode (fixed s_0, no dropout) is not. Neither moves the global RNG past the rollouts."""
    seq, target = random_batch()
    parts, rng_after = {}, {}
    for reference in ("same_noise", "eval"):
        torch.manual_seed(3)  # the same SPT weights
        spt = tiny_model(dropout=0.3, init_std=1.0).double()
        model = tiny_model(dropout=0.3, init_std=1.0, phase="rpt", group_size=3, kl_reference=reference).double()
        model.start_rpt(spt)
        torch.manual_seed(11)
        parts[reference] = model.compute_loss(seq, target)[1]
        rng_after[reference] = torch.get_rng_state()
    assert abs(parts["same_noise"]["kl"].item()) < 1e-12
    assert parts["eval"]["kl"].item() > 1e-3
    assert torch.equal(rng_after["same_noise"], rng_after["eval"])
    for key in ("policy", "reward", "logp"):  # the same rollouts either way
        assert parts["same_noise"][key].item() == parts["eval"][key].item()
    # The replay is of the noise, not of the weights: once the policy moves, the KL does too.
    with torch.no_grad():
        model.item_emb.mul_(1.5)
    model.kl_reference = "same_noise"
    assert model.compute_loss(seq, target)[1]["kl"].item() > 1e-6
    with pytest.raises(ValueError, match="kl_reference"):
        tiny_model(kl_reference="train")


def test_a_lares_run_config_without_kl_reference_resumes_as_it_ran():
    """Runs written before kl_reference existed took the KL in eval mode."""
    from plr.training import same_config

    saved = config.resolve("lares", None, [], str(ML100K))
    del saved["model"]["kl_reference"]
    assert same_config(saved)["model"]["kl_reference"] == "eval"
    assert config.resolve("lares", None, [], str(ML100K))["model"]["kl_reference"] == "same_noise"


# -- short trainings on real data -----------------------------------------------------


@pytest.fixture(scope="module")
def ml100k():
    if not ML100K.is_dir():
        pytest.skip("shared data not present")
    return build_dataset(read_interactions(str(ML100K)), max_len=20, split="loo")


def eval_on(model, seq, target):
    """(mean log p(target), median rank, mean reciprocal rank) in eval mode."""
    model.eval()
    with torch.no_grad():
        z = model(seq).z_final
        logp = -model.cross_entropy(z, target).item()
        rank = plr_kernels.target_rank(z, model.item_emb, target, exclude_index=0, backend="torch")
    model.train()
    return logp, rank.double().median().item(), (1.0 / rank.double()).mean().item()


@pytest.fixture(scope="module")
def spt_trained(ml100k):
    torch.manual_seed(0)
    model = LARESModel(ml100k.num_items, max_len=20, hidden_size=32, inner_size=64, dropout=0.1, backend="torch")
    model.attach_training_data(ml100k.train)
    gen = torch.Generator().manual_seed(0)
    held_seq, held_target = ml100k.train.gather(torch.randperm(len(ml100k.train), generator=gen)[:256])
    before = eval_on(model, held_seq, held_target)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ce, tla_anchors = [], []
    for _ in range(25):
        seq, target = ml100k.train.gather(torch.randint(len(ml100k.train), (128,), generator=gen))
        loss, parts = model.compute_loss(seq, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ce.append(parts["ce"].item())
        tla_anchors.append(parts["tla_anchors"].item())
    return model, before, eval_on(model, held_seq, held_target), ce, tla_anchors, gen


def test_spt_trains_on_real_data(spt_trained):
    _, before, after, ce, tla_anchors, _ = spt_trained
    assert np.mean(ce[-5:]) < np.mean(ce[:5]) - 0.5, ce
    assert after[0] > before[0] + 0.5 and after[1] < before[1], (before, after)  # held-out log p and rank
    assert min(tla_anchors) > 0  # sampled partners give every batch TLA positives


def expected_rollout_reward(model, seq, target, repeats=8, seed=123, per_sequence=False):
    """The GRPO objective: mean NDCG@10 reward over ``repeats`` stochastic rollouts
    (train mode: random s_0 and dropout) of each sequence, from a fixed seed."""
    rng = torch.get_rng_state()
    torch.manual_seed(seed)
    with torch.no_grad():
        z = model.recur(model.prepare(seq.repeat(repeats, 1)), model.rpt_depth)[1][:, -1]
        rank = plr_kernels.target_rank(z, model.item_emb, target.repeat(repeats), exclude_index=0, backend="torch")
    torch.set_rng_state(rng)
    reward = ranking_reward(rank, "ndcg@10").view(repeats, -1).mean(0)
    return reward if per_sequence else reward.mean().item()


def rpt_objective(model, seq, target, seed=5):
    """The RPT loss (policy + beta KL) under fixed rollout noise (s_0, dropout)."""
    rng = torch.get_rng_state()
    torch.manual_seed(seed)
    with torch.no_grad():
        loss = model.compute_loss(seq, target)[0].item()
    torch.set_rng_state(rng)
    return loss


def test_rpt_trains_on_real_data(ml100k, spt_trained):
    """RPT steps on ml-100k lower the GRPO loss they optimise and leave the KL
    reference untouched. (They need not raise the expected NDCG@10: the
    advantages are zero-mean per group and also push the target's log-prob
    DOWN in the rollouts that missed; on ml-100k the expected reward of these
    sequences fell -- recorded in benchmarks/RESULTS.md, not asserted.)"""
    spt, *_, gen = spt_trained
    # GRPO learns only where the G rollouts of a sequence disagree: train on the
    # 32 sequences (of 1024 drawn) whose rollouts hit the top 10 most often.
    pool_seq, pool_target = ml100k.train.gather(torch.randint(len(ml100k.train), (1024,), generator=gen))
    spt.train()
    hits = expected_rollout_reward(spt, pool_seq, pool_target, seed=7, per_sequence=True)
    spt.eval()
    chosen = hits.argsort(descending=True)[:32]
    assert (hits[chosen] > 0).all()
    seq, target = pool_seq[chosen], pool_target[chosen]
    torch.manual_seed(0)
    model = LARESModel(**{**spt.config(), "phase": "rpt", "group_size": 8})
    model.start_rpt(spt)
    model.train()
    reward_before, loss_before = expected_rollout_reward(model, seq, target), rpt_objective(model, seq, target)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(15):
        loss, parts = model.compute_loss(seq, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and parts["kl"] >= 0 and 0 <= parts["reward"] <= 1
    assert rpt_objective(model, seq, target) < loss_before
    frozen = expected_rollout_reward(model.spt_reference.train(), seq, target)
    model.spt_reference.eval()
    assert frozen == pytest.approx(reward_before)  # the reference stayed the SPT model


# -- command line, phases, checkpoints --------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synthetic.txt"
    write_sequences(synthetic_histories(200, 40, num_interests=4, min_len=5, max_len=10, seed=1), path)
    return path


CLI_TINY = ["model.hidden_size=16", "model.inner_size=32", "model.dropout=0.1", "model.backend=torch",
            "model.group_size=2", "data.max_len=10", "data.format=sequences", "train.batch_size=32",
            "train.epochs=1", "train.max_steps_per_epoch=3", "train.progress=false", "eval.batch_size=256"]


def cli_args(path, out, *extra):
    return ["train", "--model", "lares", "--data", str(path), "--out", str(out),
            *sum((["--set", s] for s in CLI_TINY), []), *extra]


def test_one_command_runs_both_phases(synthetic, tmp_path, capsys):
    out = tmp_path / "both"
    assert main(cli_args(synthetic, out, "--set", "model.rpt_epochs=2")) == 0
    for phase in ("spt", "rpt"):
        for name in ("config.yaml", "train.log", "metrics.json", "best.pt", "last.pt", "test_ranks.csv"):
            assert (out / phase / name).is_file(), (phase, name)
    assert config.load_yaml(out / "spt" / "config.yaml")["model"]["phase"] == "spt"
    assert config.load_yaml(out / "rpt" / "config.yaml")["train"]["epochs"] == 2
    assert config.load_yaml(out / "rpt" / "config.yaml")["train"]["lr"] == pytest.approx(1e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    rpt = json.loads((out / "rpt" / "metrics.json").read_text())
    spt = json.loads((out / "spt" / "metrics.json").read_text())
    assert metrics["phase"] == "both" and metrics["test"] == rpt["test"] and rpt["epochs"] == 2
    assert metrics["spt"]["test"] == spt["test"]
    # RPT validates its start, the SPT model, before any update: the same weights score the same.
    assert rpt["start_valid"] == spt["valid"]
    assert metrics["valid"]["ndcg@10"] >= spt["valid"]["ndcg@10"]  # never below the SPT model: it competes as epoch -1
    assert metrics["train_seconds"] == pytest.approx(spt["train_seconds"] + rpt["train_seconds"], abs=0.02)
    best = LARESModel.load(str(out / "best.pt"))
    assert best.phase == "rpt"
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(synthetic)]) == 0
    assert f"{metrics['test']['ndcg@10']:.4f}" in capsys.readouterr().out  # eval is deterministic
    # A finished run resumes to the same result; without --resume it is not overwritten.
    assert main(cli_args(synthetic, out, "--set", "model.rpt_epochs=2", "--resume")) == 0
    assert json.loads((out / "metrics.json").read_text())["test"] == metrics["test"]
    assert "--resume" in cli_error(capsys, cli_args(synthetic, out, "--set", "model.rpt_epochs=2"))


def test_two_phase_runs_and_phase_errors(synthetic, tmp_path, capsys):
    spt_run, rpt_run = tmp_path / "spt", tmp_path / "rpt"
    assert main(cli_args(synthetic, spt_run, "--phase", "spt")) == 0
    assert (spt_run / "best.pt").is_file() and (spt_run / "metrics.json").is_file()
    assert not (spt_run / "spt").exists()
    assert main(cli_args(synthetic, rpt_run, "--phase", "rpt", "--init", str(spt_run / "best.pt"))) == 0
    metrics = json.loads((rpt_run / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"recall@10", "ndcg@10"}
    assert LARESModel.load(str(rpt_run / "best.pt")).phase == "rpt"
    saved = config.load_yaml(rpt_run / "config.yaml")["model"]
    assert saved["phase"] == "rpt" and "init_from" not in saved
    # The same through --set.
    assert main(cli_args(synthetic, tmp_path / "rpt2", "--set", "model.phase=rpt",
                         "--set", f"model.init_from={spt_run / 'best.pt'}")) == 0
    assert "model.init_from" in cli_error(capsys, cli_args(synthetic, tmp_path / "x", "--phase", "rpt"))
    assert "model.init_from" in cli_error(capsys, cli_args(synthetic, tmp_path / "y", "--phase", "rpt", "--init",
                                                           str(tmp_path / "none.pt")))
    # RPT with other model settings than the SPT checkpoint: a clear error, and the
    # SPT run's config.yaml is the way to repeat them.
    assert re.search(r"hidden_size=16 vs 24.*--config SPT_RUN/config.yaml",
                     cli_error(capsys, cli_args(synthetic, tmp_path / "w", "--phase", "rpt", "--init",
                                                str(spt_run / "best.pt"), "--set", "model.hidden_size=24")))
    assert main(["train", "--model", "lares", "--data", str(synthetic), "--out", str(tmp_path / "rpt3"),
                 "--config", str(spt_run / "config.yaml"), "--phase", "rpt", "--init", str(spt_run / "best.pt")]) == 0
    assert "model.phase" in cli_error(capsys, cli_args(synthetic, tmp_path / "z", "--set", "model.phase=sft"))
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--phase" in help_text and "--init" in help_text and "SPT" in help_text
    assert "--phase/--init" in cli_error(capsys, ["train", "--model", "sasrec", "--data", synthetic, "--phase", "spt"])


def test_save_load_round_trip(tmp_path):
    model = build_model({"name": "lares", "hidden_size": 16, "inner_size": 32, "adapter": "gate",
                         "num_core_layers": 2, "backend": "torch"}, num_items=30, max_len=8)
    model.eval()
    seq, _ = random_batch(num_items=30)
    model.save(str(tmp_path / "m.pt"), extra={"note": "x"})
    loaded, extra = SequentialRecommender.load_with_extra(str(tmp_path / "m.pt"))
    assert isinstance(loaded, LARESModel) and extra == {"note": "x"} and loaded.config() == model.config()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    loaded.eval()
    assert torch.equal(loaded(seq).z_final, model(seq).z_final)
    assert torch.equal(loaded.recommend(seq, k=5)[1], model.recommend(seq, k=5)[1])


def test_both_phases_resume_after_a_kill_during_rpt(synthetic, tmp_path):
    extra = ["--set", "train.epochs=2", "--set", "train.save_every_steps=1", "--set", "train.max_steps_per_epoch=4",
             "--set", "train.patience=100"]
    assert main(cli_args(synthetic, tmp_path / "full", *extra)) == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "plr.cli", *cli_args(synthetic, out, *extra)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_path, killed = out / "rpt" / "last.pt", None
    deadline = time.time() + 300
    try:
        while killed is None and time.time() < deadline and proc.poll() is None:
            if state_path.is_file():
                try:
                    state = torch.load(state_path, weights_only=True)["state"]
                except Exception:  # noqa: BLE001 - being replaced (atomic rename): retry
                    state = None
                if state and state["global_step"] >= 2 and not state["finished"]:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    killed = state
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed is not None, f"not killed during RPT (rc={proc.returncode}): {proc.stderr.read().decode()[-2000:]}"
    assert not (out / "metrics.json").exists()
    assert main(cli_args(synthetic, out, *extra, "--resume")) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    timeless = lambda spt: {k: v for k, v in spt.items() if k != "train_seconds"}  # noqa: E731
    assert resumed["test"] == full["test"] and timeless(resumed["spt"]) == timeless(full["spt"])
    a = LARESModel.load(str(tmp_path / "full" / "best.pt")).state_dict()
    b = LARESModel.load(str(out / "best.pt")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_of_the_old_rule_is_reselected_with_its_spt_model(synthetic, tmp_path):
    """benchmarks/lares_spt_competes.py: a run finished before the SPT model competed as
    RPT's epoch -1 (simulated: its start_valid removed, its RPT epochs scored below the
    SPT model) gets the SPT checkpoint and metrics; a run that read its test split is refused."""
    script = benchmark_script("lares_spt_competes")
    out = tmp_path / "run"
    assert main(cli_args(synthetic, out, "--no-test", "--set", "model.rpt_epochs=2")) == 0
    spt = json.loads((out / "spt" / "metrics.json").read_text())
    rpt_path = out / "rpt" / "metrics.json"
    rpt = json.loads(rpt_path.read_text())
    old = {**rpt, "best_epoch": 0, "valid": {k: v / 2 for k, v in spt["valid"].items()},
           "history": [{**h, "valid_ndcg@10": spt["valid"]["ndcg@10"] / 2} for h in rpt["history"]]}
    del old["start_valid"]
    rpt_path.write_text(json.dumps(old))
    assert "replaces RPT's best" in script.reselect(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["valid"] == spt["valid"] and metrics["best_epoch"] == -1 and metrics["start_valid"] == spt["valid"]
    assert (out / "best.pt").read_bytes() == (out / "spt" / "best.pt").read_bytes()
    assert "already" in script.reselect(out)  # once is enough
    # A run whose RPT beat its SPT model is left as it is.
    better = {**old, "valid": {k: v * 2 for k, v in spt["valid"].items()}}
    rpt_path.write_text(json.dumps(better))
    assert "nothing to change" in script.reselect(out)
    rpt_path.write_text(json.dumps({**old, "test": {"ndcg@10": 0.1}}))
    with pytest.raises(SystemExit, match="test split"):
        script.reselect(out)
