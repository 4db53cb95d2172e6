"""PLRModel against PLR Eq. 3-11 (plr/models/plr.py)."""

import pytest
import torch
import torch.nn.functional as F

from plr import PLRModel, SASRecModel
from plr.backbones import causal_mask
from plr.losses import reasoning_contrastive_loss

NUM_ITEMS = 40


def small_plr(**overrides):
    args = dict(max_len=9, hidden_size=12, num_layers=2, num_heads=3, inner_size=17, num_streams=3,
                num_steps=3, backend="torch")
    args.update(overrides)
    return PLRModel(NUM_ITEMS, **args)


def histories(batch=5, length=9):
    seq = torch.randint(1, NUM_ITEMS + 1, (batch, length))
    for row in range(batch):  # left padding of varied length, one full row
        seq[row, : row % length] = 0
    return seq


def sequence_targets(model, seq, target):
    """Sequence mode's inputs for ``histories()``: the prepared rows and the next
    item after every position (``target`` after the last, 0 on padding)."""
    seq_full = model.prepare(seq)
    tgt = torch.where(seq_full.roll(-1, dims=1) > 0, seq_full.roll(-1, dims=1), 0)
    tgt[:, -1] = target
    tgt[seq_full == 0] = 0
    return seq_full, tgt


# -- reasoning over the shared prefix KV cache ---------------------------------------


def stream_isolated_mask(key_mask, num_streams, steps):
    """[B, N + steps*M, N + steps*M]: prefix causal; token (s, m) sees the valid
    prefix and tokens (s' <= s, m) of its own stream, itself included."""
    b, n = key_mask.shape
    m = num_streams
    total = n + steps * m
    mask = torch.zeros(b, total, total, dtype=torch.bool)
    mask[:, :n, :n] = causal_mask(key_mask)
    for s in range(steps):
        for stream in range(m):
            row = n + s * m + stream
            mask[:, row, :n] = key_mask
            for earlier in range(s + 1):
                mask[:, row, n + earlier * m + stream] = True
    return mask


def reason_by_recompute(model, item_seq):
    """Brute force: at every step rerun the whole extended sequence (prefix + all
    reasoning tokens so far) through every layer under the explicit mask."""
    bb = model.backbone
    key_mask = item_seq != 0
    n, m = item_seq.shape[1], model.num_streams
    x_prefix = bb.input_embedding(item_seq)
    h0 = bb.run_layers(x_prefix, causal_mask(key_mask))[0][:, -1]
    h_prev = h0[:, None] + model.trigger_tokens[None]
    inputs, states = [], []
    for t in range(model.num_steps):
        inputs.append(model.reasoning_input(h_prev, t))
        x = torch.cat([x_prefix] + inputs, dim=1)
        out = bb.run_layers(x, stream_isolated_mask(key_mask, m, t + 1))[0]
        h_prev = out[:, n + t * m: n + (t + 1) * m]
        states.append(h_prev)
    return torch.stack(states, dim=1)


@pytest.mark.parametrize("streams,steps", [(1, 1), (3, 3), (4, 2)])
def test_cached_reasoning_equals_recomputing_the_extended_sequence(streams, steps):
    model = small_plr(num_streams=streams, num_steps=steps).double().eval()
    seq = histories()
    with torch.no_grad():
        cached = model(seq).states
        brute = reason_by_recompute(model, seq)
    assert cached.shape == (5, steps, streams, 12)
    torch.testing.assert_close(cached, brute, rtol=0, atol=1e-10)


def test_streams_are_isolated():
    model = small_plr().double().eval()
    seq = histories()
    with torch.no_grad():
        before = model(seq).states.clone()
        model.trigger_tokens[1] += torch.randn(12, dtype=torch.float64)
        after = model(seq).states
    for stream in (0, 2):
        torch.testing.assert_close(after[:, :, stream], before[:, :, stream], rtol=0, atol=1e-12)
    assert (after[:, :, 1] - before[:, :, 1]).abs().max() > 1e-3


def test_single_stream_is_rearec_reasoning():
    """M=1 with a zero trigger is ReaRec's reasoning: append h_{t-1} + r_t to the
    sequence and run the ordinary causal SASRec encoder over it."""
    model = small_plr(num_streams=1, num_steps=3).double().eval()
    with torch.no_grad():
        model.trigger_tokens.zero_()
    seq = histories()
    bb = model.backbone
    with torch.no_grad():
        x = bb.input_embedding(seq)
        key_mask = seq != 0
        h_prev = bb.run_layers(x, causal_mask(key_mask))[0][:, -1:]
        want = []
        for t in range(3):
            x = torch.cat([x, model.reasoning_input(h_prev, t)], dim=1)
            key_mask = torch.cat([key_mask, torch.ones(5, 1, dtype=torch.bool)], dim=1)
            h_prev = bb.run_layers(x, causal_mask(key_mask))[0][:, -1:]
            want.append(h_prev[:, 0])
        out = model(seq)
    torch.testing.assert_close(out.states[:, :, 0], torch.stack(want, 1), rtol=0, atol=1e-10)
    torch.testing.assert_close(out.gate, torch.ones(5, 1, dtype=torch.float64))


# -- aggregation, scoring, losses ------------------------------------------------------


def test_aggregation_follows_eq_6_9_10():
    model = small_plr().double().eval()
    seq = histories()
    with torch.no_grad():
        out = model(seq)
        gate = torch.softmax(model.gate(out.h0), dim=-1)
    torch.testing.assert_close(out.gate, gate)
    z_rea = (gate[:, :, None] * out.states.mean(1)).sum(1)
    torch.testing.assert_close(out.z_rea, z_rea)
    torch.testing.assert_close(out.z_final, out.h0 + z_rea)


def test_training_scores_with_z_rea_and_eq_10_inference_with_z_final():
    model = small_plr(dropout=0.0, reasoning_dropout=0.0, kl_weight=0.0, rcl_weight=0.0,
                      readout="final").double().train()
    seq, target = histories(), torch.randint(1, NUM_ITEMS + 1, (5,))
    loss, parts = model.compute_loss(seq, target)
    out = model(seq)
    logits = out.z_rea @ model.item_emb[1:].T / model.temperature
    torch.testing.assert_close(loss, F.cross_entropy(logits, target - 1))
    logits_final = out.z_final @ model.item_emb[1:].T / model.temperature
    assert (loss - F.cross_entropy(logits_final, target - 1)).abs() > 1e-6
    values, ids = model.recommend(seq, k=5)
    want_values, want_ids = torch.topk(out.z_final.detach() @ model.item_emb[1:].detach().T, 5)
    assert torch.equal(ids, want_ids + 1)
    torch.testing.assert_close(values, want_values)
    assert model.training  # recommend restores the mode


@pytest.mark.parametrize("kl_weight", [0.0, 0.3])
@pytest.mark.parametrize("sequence", [False, True])
def test_nip_readout_final_trains_the_vector_inference_scores(kl_weight, sequence):
    """nip_readout="final": L_NIP is the cross-entropy of z_final = h_0 + z_rea
    (the vector ranking scores), in both modes and with the KL's fused pass."""
    from plr_kernels import reference

    seq, target = histories(), torch.randint(1, NUM_ITEMS + 1, (5,))
    model = small_plr(dropout=0.0, reasoning_dropout=0.0, kl_weight=kl_weight, rcl_weight=0.0,
                      kl_form="literal", nip_readout="final", reg_rows="all").double().train()
    if sequence:
        seq_full, tgt = sequence_targets(model, seq, target)
        loss, parts = model.compute_sequence_loss(seq_full, tgt)
        rows = [(b, n) for b in range(seq_full.shape[0]) for n in range(seq_full.shape[1]) if tgt[b, n] > 0]
        prefixes = torch.stack([torch.cat([seq_full.new_zeros(seq_full.shape[1] - 1 - n), seq_full[b, :n + 1]])
                                for b, n in rows])
        seq, target = prefixes, torch.stack([tgt[b, n] for b, n in rows])
    else:
        loss, parts = model.compute_loss(seq, target)
    out = model(seq)
    nip = reference.linear_cross_entropy(out.z_final, model.item_emb, target, temperature=model.temperature,
                                         exclude_index=0)
    torch.testing.assert_close(parts["nip"], nip.detach())
    kl = reference.multi_pair_kl(out.states.flatten(1, 2), model.item_emb, temperature=model.temperature,
                                 exclude_index=0).mean() if kl_weight else 0.0
    torch.testing.assert_close(loss.detach(), (nip - kl_weight * kl).detach())
    rea = reference.linear_cross_entropy(out.z_rea, model.item_emb, target, temperature=model.temperature,
                                         exclude_index=0)
    assert (nip - rea).abs() > 1e-6  # the two readouts are different losses
    with pytest.raises(ValueError, match=r"nip_readout.*'h0'"):
        small_plr(nip_readout="h0")


def test_loss_is_eq_11_with_kl_subtracted():
    model = small_plr(kl_weight=0.3, rcl_weight=0.5, kl_form="literal").double().train()
    seq, target = histories(), torch.randint(1, NUM_ITEMS + 1, (5,))
    torch.manual_seed(1)
    loss, parts = model.compute_loss(seq, target)
    assert parts["kl"] > 0 and parts["rcl"] > 0
    torch.testing.assert_close(loss.detach(), parts["nip"] + 0.5 * parts["rcl"] - 0.3 * parts["kl"])
    model_add = small_plr(kl_weight=0.3, rcl_weight=0.0, kl_objective="consistency").double().eval()
    loss_add, parts_add = model_add.compute_loss(seq, target)
    torch.testing.assert_close(loss_add.detach(), parts_add["nip"] + 0.3 * parts_add["kl"])
    assert parts_add["rcl"] == 0  # no second view outside training


def test_bounded_kl_form_subtracts_c_tanh_of_each_users_kl():
    from plr_kernels import reference

    seq, target = histories(), torch.randint(1, NUM_ITEMS + 1, (5,))
    torch.manual_seed(0)
    probe = small_plr().double().eval()
    out = probe(seq)
    kl = reference.multi_pair_kl(out.states.flatten(1, 2), probe.item_emb, temperature=probe.temperature,
                                 exclude_index=0).detach()
    c = float(kl.median())  # both regimes of tanh are exercised
    torch.manual_seed(0)
    model = small_plr(kl_weight=0.3, rcl_weight=0.0, kl_margin=c).double().eval()
    loss, parts = model.compute_loss(seq, target)
    torch.testing.assert_close(parts["kl"], kl.mean())
    torch.testing.assert_close(loss.detach(), parts["nip"] - 0.3 * (c * torch.tanh(kl / c)).mean())
    literal = small_plr(kl_weight=0.3, rcl_weight=0.0, kl_form="literal")
    literal.load_state_dict(model.state_dict())
    assert float(literal.double().eval().compute_loss(seq, target)[0].detach()) < float(loss.detach())


@pytest.mark.parametrize("kl_temperature", [1.0, 0.3])
def test_kl_temperature_is_eq_7s_own(kl_temperature):
    from plr_kernels import reference

    model = small_plr(kl_weight=0.3, rcl_weight=0.0, kl_form="literal", kl_temperature=kl_temperature)
    model = model.double().eval()
    seq, target = histories(), torch.randint(1, NUM_ITEMS + 1, (5,))
    loss, parts = model.compute_loss(seq, target)
    out = model(seq)
    kl = reference.multi_pair_kl(out.states.flatten(1, 2), model.item_emb, temperature=kl_temperature,
                                 exclude_index=0)
    nip = reference.linear_cross_entropy(out.z_rea, model.item_emb, target, temperature=model.temperature,
                                         exclude_index=0)
    torch.testing.assert_close(parts["kl"], kl.mean())
    torch.testing.assert_close(parts["nip"], nip)
    torch.testing.assert_close(loss.detach(), nip - 0.3 * kl.mean())


def test_bounded_form_is_bounded_below_where_the_literal_one_runs_away():
    """Minimising the literal PLR Eq. 11 (-lambda * L_KL) drives the loss below any
    bound by pushing the streams' distributions apart; the bounded form never
    goes below -lambda * c."""
    seq, target = histories(), torch.randint(1, NUM_ITEMS + 1, (5,))
    lowest = {}
    for form in ("literal", "bounded"):
        torch.manual_seed(0)
        model = small_plr(kl_weight=1.0, rcl_weight=0.0, kl_form=form, kl_margin=2.0, dropout=0.0,
                          reasoning_dropout=0.0).double().train()
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        lowest[form] = float("inf")
        for _ in range(120):
            loss, _ = model.compute_loss(seq, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            lowest[form] = min(lowest[form], float(loss.detach()))
    assert lowest["literal"] < -10.0, lowest
    assert lowest["bounded"] >= -1.0 * 2.0 - 1e-9, lowest


@pytest.mark.parametrize("readout", ["final", "rea", "h0"])
def test_readout_picks_the_vector_that_ranking_scores(readout):
    import plr_kernels

    model = small_plr(readout=readout).double().eval()
    seq = histories()
    out = model(seq)
    want = {"final": out.h0 + out.z_rea, "rea": out.z_rea, "h0": out.h0}[readout]
    torch.testing.assert_close(model.inference_vector(out), want)
    values, ids = model.recommend(seq, k=4)
    want_values, _ = plr_kernels.topk(want, model.item_emb, 4, exclude_index=0, backend="torch")
    torch.testing.assert_close(values, want_values)


def test_default_readout_scores_the_vector_training_scores():
    """The defaults score z_rea at inference, the vector L_NIP trains (see plr/models/plr.py)."""
    model = small_plr()
    assert (model.readout, model.nip_readout) == ("rea", "rea")
    from plr import config

    assert config.resolve("plr", None, [], "x")["model"]["readout"] == "rea"


def test_rcl_temperature_reaches_eq_8():
    model = small_plr(kl_weight=0.0, rcl_weight=1.0, rcl_temperature=0.2, dropout=0.0, attn_dropout=0.0,
                      reasoning_dropout=0.0).double().train()
    seq, target = histories(), torch.randint(1, NUM_ITEMS + 1, (5,))
    _, parts = model.compute_loss(seq, target)
    states = model(seq).states
    torch.testing.assert_close(parts["rcl"], reasoning_contrastive_loss(states, states, temperature=0.2))


def test_gradients_reach_triggers_rpe_gate_and_item_table():
    model = small_plr(num_streams=2, num_steps=2).double().train()
    loss, _ = model.compute_loss(histories(), torch.randint(1, NUM_ITEMS + 1, (5,)))
    loss.backward()
    for name, grad in [("trigger_tokens", model.trigger_tokens.grad),
                       ("reasoning_position", model.reasoning_position.weight.grad),
                       ("gate", model.gate.weight.grad),
                       ("item_embedding", model.item_emb.grad)]:
        assert grad is not None, name
        assert (grad.abs().sum(-1) > 0).all() if name != "item_embedding" else grad[1:].abs().sum() > 0, name
    assert model.item_emb.grad[0].abs().sum() == 0  # the padding row never learns


def test_reasoning_contrastive_loss_by_hand():
    a, b = torch.randn(4, 2, 3, 5, dtype=torch.float64), torch.randn(4, 2, 3, 5, dtype=torch.float64)
    total = 0.0
    for t in range(2):
        for m in range(3):
            sim = F.cosine_similarity(a[:, None, t, m], b[None, :, t, m], dim=-1)
            for r in range(4):
                total += -torch.log_softmax(sim[r], 0)[r] - torch.log_softmax(sim[:, r], 0)[r]
    want = total / (2 * 2 * 3 * 4)
    torch.testing.assert_close(reasoning_contrastive_loss(a, b), want)


# -- baseline, checkpoints, recommend --------------------------------------------------


def test_sasrec_scores_with_h0():
    model = SASRecModel(NUM_ITEMS, max_len=9, hidden_size=8, num_layers=1, num_heads=2, inner_size=9,
                        dropout=0.0, backend="torch").double()
    seq, target = histories(), torch.randint(1, NUM_ITEMS + 1, (5,))
    loss, _ = model.compute_loss(seq, target)
    out = model(seq)
    torch.testing.assert_close(out.z_final, out.h0)
    torch.testing.assert_close(loss, F.cross_entropy(out.h0 @ model.item_emb[1:].T / 0.07, target - 1))


def test_short_histories_are_left_padded_to_max_len():
    model = small_plr().double().eval()
    seq = histories(3, 9)[:, 4:]
    padded = F.pad(seq, (4, 0))
    torch.testing.assert_close(model(seq).z_final, model(padded).z_final, rtol=0, atol=0)


def test_recommend_excludes_padding_and_history(tmp_path):
    model = small_plr().eval()
    seq = histories()
    _, ids = model.recommend(seq, k=NUM_ITEMS - 9, exclude_history=True)
    for row in range(5):
        picked = set(ids[row].tolist()) - {-1}
        assert 0 not in picked and not picked & set(seq[row].tolist())
    path = tmp_path / "m.pt"
    model.save(str(path))
    loaded = PLRModel.load(str(path)).eval()
    torch.testing.assert_close(loaded(seq).z_final, model(seq).z_final, rtol=0, atol=0)
    with pytest.raises(TypeError, match="PLRModel"):
        SASRecModel.load(str(path))


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("seq,match", [
    (torch.tensor([[0, 1, NUM_ITEMS + 1]]), r"item_seq.*\[0, 40\].*41"),
    (torch.tensor([[0, -3, 2]]), r"item_seq.*negative id -3"),
    (torch.tensor([[0.0, 1.0, 2.0]]), r"item_seq.*dtype"),
    (torch.tensor([1, 2, 3]), r"item_seq.*shape \[batch, length\]"),
    (torch.tensor([[1, 2, 3], [0, 0, 0]]), r"item_seq.*all-padding row 1"),
    (torch.tensor([[1, 0, 3]]), r"item_seq.*left-padded.*row 0"),
    (torch.ones(1, 10, dtype=torch.long), r"item_seq.*max_len=9.*10"),
    ([[1, 2]], r"item_seq.*torch.Tensor"),
])
def test_bad_histories_name_the_argument(seq, match):
    with pytest.raises((ValueError, TypeError), match=match):
        small_plr()(seq)


def test_bad_targets_and_configs_name_the_argument():
    model = small_plr()
    seq = histories(2)
    with pytest.raises(ValueError, match=r"target.*\[1, 40\].*got 0"):
        model.compute_loss(seq, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match=r"target.*shape \[2\]"):
        model.compute_loss(seq, torch.tensor([3]))
    with pytest.raises(ValueError, match=r"num_streams.*>= 1.*got 0"):
        small_plr(num_streams=0)
    with pytest.raises(ValueError, match=r"num_steps"):
        small_plr(num_steps=-1)
    with pytest.raises(ValueError, match=r"backend.*'gpu'"):
        small_plr(backend="gpu")
    with pytest.raises(ValueError, match=r"kl_objective"):
        small_plr(kl_objective="up")
    with pytest.raises(ValueError, match=r"kl_form.*'capped'"):
        small_plr(kl_form="capped")
    with pytest.raises(ValueError, match=r"kl_margin.*0"):
        small_plr(kl_margin=0)
    with pytest.raises(ValueError, match=r"kl_temperature.*-1"):
        small_plr(kl_temperature=-1.0)
    with pytest.raises(ValueError, match=r"rcl_temperature"):
        small_plr(rcl_temperature=0.0)
    with pytest.raises(ValueError, match=r"readout.*'z'"):
        small_plr(readout="z")
    with pytest.raises(ValueError, match=r"hidden_size.*num_heads=3"):
        small_plr(hidden_size=13)


@pytest.mark.parametrize("sequence", [False, True])
def test_reasoning_rcl_view_reuses_the_prefix_encoding(sequence, monkeypatch):
    """rcl_view="reasoning": one encoder pass; with dropout off both views equal the
    full second pass (so the two RCL values agree exactly)."""
    seq, target = histories(), torch.randint(1, NUM_ITEMS + 1, (5,))
    values = {}
    for view in ("full", "reasoning"):
        torch.manual_seed(0)
        model = small_plr(kl_weight=0.1, rcl_weight=1.0, rcl_view=view, dropout=0.0, attn_dropout=0.0,
                          reasoning_dropout=0.0).double().train()
        calls = []
        encode = model.backbone.encode
        monkeypatch.setattr(model.backbone, "encode", lambda s: calls.append(1) or encode(s))
        if sequence:
            loss, parts = model.compute_sequence_loss(*sequence_targets(model, seq, target))
        else:
            loss, parts = model.compute_loss(seq, target)
        values[view] = (loss.detach(), parts["rcl"])
        assert len(calls) == (2 if view == "full" else 1)
    torch.testing.assert_close(values["full"], values["reasoning"])


def test_reasoning_rcl_view_redraws_dropout_in_the_reasoning_only():
    model = small_plr(kl_weight=0.0, rcl_weight=1.0, rcl_view="reasoning", dropout=0.0, attn_dropout=0.0,
                      reasoning_dropout=0.5).double().train()
    _, parts = model.compute_loss(histories(), torch.randint(1, NUM_ITEMS + 1, (5,)))
    model.reasoning_dropout.p = 0.0
    _, same = model.compute_loss(histories(), torch.randint(1, NUM_ITEMS + 1, (5,)))
    assert parts["rcl"] != same["rcl"]
    with pytest.raises(ValueError, match=r"rcl_view.*'half'"):
        small_plr(rcl_view="half")
