"""``plr analyze ceiling``: the PLR paper's Figure 4 (performance ceiling).

Every reasoning state is scored on its own and the best one is taken per user
(an oracle that knows the target), against the model's own aggregation:

* PLR: the T*M states h_{t,m} (every step of every stream), each scored as the
  model's ``readout`` would score it in place of z_rea: ``h_0 + h_{t,m}``
  (Eq. 10, ``readout: final``) or ``h_{t,m}`` (``readout: rea``);
* ReaRec (ERL, PRL): the step outputs o_0 = h_0, o_1..o_K (every step).

Reported per model: the model's own score, the best single state for all
users, the oracle over the states alone and the oracle over the states and the
model's own output (the ceiling; per user it is >= the model's own score by
construction). The oracle takes each user's lowest (best) rank, which is the
best value of every rank-based metric at once.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

import plr_kernels

from ..errors import UserError
from ..evaluation import metrics_from_ranks, per_user_metric
from ..models.base import PADDING
from .common import Output, check_labels, eval_settings, load_checkpoint, matching_dataset, pyplot, unique_label

CLASSES = ("PLRModel", "ReaRecERLModel", "ReaRecPRLModel")


def candidate_vectors(model, seq: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """``(own [B,d], states [B,K,d], names [K])`` for prepared histories ``seq``."""
    out = model.forward_prepared(seq)
    own = model.inference_vector(out)
    if type(model).__name__ == "PLRModel":
        if model.readout == "h0":
            raise UserError("checkpoint: a PLR model with readout 'h0' scores no reasoning state",
                            "use a checkpoint with readout final or rea")
        T, M = out.states.shape[1:3]
        states = out.states.flatten(1, 2)  # [B, T*M, d], step-major
        if model.readout == "final":
            states = out.h0[:, None, :] + states  # Eq. 10 with h_{t,m} in place of z_rea
        names = [f"t{t + 1}/m{m + 1}" for t in range(T) for m in range(M)]
    else:
        states = model.step_outputs(out.h0, out.states)  # o_0..o_K
        names = [f"step{k}" for k in range(states.shape[1])]
    return own, states, names


@torch.no_grad()
def state_ranks(model, samples, *, batch_size: int, exclude_history: bool, ties: str, desc: str
                ) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """``(own ranks [U], state ranks [U, K], names)`` of the targets of ``samples``."""
    own_all, state_all, names = [], [], None
    device = model.device
    for start in tqdm(range(0, len(samples.target), batch_size), desc=desc, leave=False):
        seq = model.prepare(samples.item_seq[start:start + batch_size].to(device))
        target = samples.target[start:start + batch_size].to(device)
        own, states, names = candidate_vectors(model, seq)
        exclude = seq if exclude_history else None
        kw = dict(exclude_index=PADDING, exclude_items=exclude, ties=ties, backend=model.backend)
        own_all.append(plr_kernels.target_rank(own, model.item_emb, target, **kw).cpu())
        state_all.append(torch.stack([plr_kernels.target_rank(states[:, k].contiguous(), model.item_emb, target, **kw)
                                      for k in range(states.shape[1])], dim=1).cpu())
    return torch.cat(own_all).numpy(), torch.cat(state_all).numpy(), names


def run_ceiling(out, checkpoints: Sequence[str], *, data: Optional[str] = None,
                metrics: Sequence[str] = ("ndcg@20", "recall@20"), labels: Optional[Sequence[str]] = None) -> Output:
    """Writes ``ceiling.csv/json/png``, per-user ranks ``ceiling-<model>-ranks.csv`` and ``SUMMARY.md``."""
    from ..reporting import markdown_table

    if not checkpoints:
        raise UserError("--checkpoint: expected at least one run directory or checkpoint")
    labels = check_labels(checkpoints, labels)
    output = Output(out, "ceiling")
    rows, detail = [], {}
    for i, path in enumerate(checkpoints):
        model, extra, label = load_checkpoint(path, CLASSES, kind="ceiling")
        settings = eval_settings(extra)
        test = matching_dataset(model, extra, data, str(path)).test
        own, states, names = state_ranks(model, test, batch_size=settings["batch_size"],
                                         exclude_history=settings["exclude_history"], ties=settings["ties"],
                                         desc=f"ceiling {label}")
        oracle_states = states.min(axis=1)
        ceiling = np.minimum(oracle_states, own)
        ks = sorted(set(settings["ks"]) | {int(m.partition("@")[2]) for m in metrics if "@" in m})
        per_state = {n: metrics_from_ranks(states[:, k], ks) for k, n in enumerate(names)}
        entry = {"own": metrics_from_ranks(own, ks), "oracle_states": metrics_from_ranks(oracle_states, ks),
                 "ceiling": metrics_from_ranks(ceiling, ks), "states": per_state}
        name = labels[i] if labels else unique_label(label, detail)
        detail[name] = entry
        for metric in metrics:
            best_state = max(names, key=lambda n: per_state[n][metric])
            rows.append({"model": name, "class": type(model).__name__, "metric": metric,
                         "own": entry["own"][metric], "best single state": per_state[best_state][metric],
                         "best state": best_state, "oracle (states)": entry["oracle_states"][metric],
                         "ceiling (states + own)": entry["ceiling"][metric],
                         "users improved": int((per_user_metric(ceiling, metric) >
                                                per_user_metric(own, metric)).sum()),
                         "users": int(len(own))})
        output.csv([{"user": int(u), "own": int(o), **{n: int(s) for n, s in zip(names, srow)},
                     "ceiling": int(c)} for u, o, srow, c in zip(test.user.tolist(), own, states, ceiling)],
                   f"ceiling-{name}-ranks")
    output.csv(rows, "ceiling")
    output.json({"models": detail, "rows": rows}, "ceiling")
    _plot(output, rows, metrics)
    output.summary("Performance ceiling (PLR paper, Figure 4)", [
        "Each reasoning state scored on its own (PLR: every step of every stream, as the readout would score it; "
        "ReaRec: every step output o_0..o_K); the oracle takes the best rank per user. `ceiling` includes the "
        "model's own output among the candidates, so per user it is >= the model's own score.", "",
        markdown_table(rows, list(rows[0])), "", "![ceiling](ceiling.png)"])
    return output


def _plot(output: Output, rows, metrics) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    bars = ("own", "best single state", "oracle (states)", "ceiling (states + own)")
    for ax, metric in zip(axes[0], metrics):
        sel = [r for r in rows if r["metric"] == metric]
        width = 0.8 / len(bars)
        for j, bar in enumerate(bars):
            ax.bar([i + (j - 1.5) * width for i in range(len(sel))], [r[bar] for r in sel], width, label=bar)
        ax.set_xticks(range(len(sel)), [r["model"] for r in sel], fontsize=8)
        ax.set_ylabel(f"test {metric}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Performance ceiling of the reasoning states")
    fig.tight_layout()
    output.figure(fig, "ceiling")
