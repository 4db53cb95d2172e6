"""``plr analyze history``: how much of the top of the list goes to items the user
already has, and what the metrics become once they are excluded.

Full ranking scores every item, the history's too (the protocol of the official
ReaRec code, ``eval.exclude_history: false``). On data without repeats (Amazon
Beauty has none) a history item is never the target, so every one of them ranked
above the target costs rank places. A model that echoes its input (``h_0`` of
the last position carries that item's embedding through the residual stream, and
the score ``z . E_v / tau`` of the tied table rewards it) can spend rank 1 on it.

Per checkpoint, on one split (``valid`` by default, so that the test split is
not read for a diagnosis):

* ``target in history``: the share of samples whose target is in the visible
  history (a property of the data: at 0, excluding the history cannot hurt);
* ``top-1 in history`` / ``top-1 is last item``: the share of samples whose
  first recommendation is a history item / the last one, in eval mode;
* ``history mass``: the mean softmax probability ``sum_{v in history}
  softmax(z . E / tau)_v`` of the distinct history items, in eval mode and in
  training mode (dropout on, one seeded draw): the training mode is what the
  loss sees; what eval mode adds to it comes from switching dropout off;
* each metric without and with the history excluded from the candidates
  (``exclude_history``), the relative change and its paired t-test over samples.

Only the checkpoint is run, so the diagnosis costs one evaluation pass per mode.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..evaluation import per_user_metric, rank_targets, target_in_history_share
from ..models.base import PADDING
from .common import (Output, check_cutoff_metrics, check_labels, eval_settings, load_checkpoint, matching_dataset,
                     pyplot, unique_label)

SPLITS = ("valid", "test")
DEFAULT_METRICS = ("ndcg@10", "recall@20")


@torch.no_grad()
def history_shares(model, samples, *, batch_size: int, training: bool, seed: int, desc: str) -> Dict[str, float]:
    """``top-1 in history``, ``top-1 is last item`` and ``history mass`` of ``samples``
    (``.item_seq [N, L]`` left-padded, ``.target [N]``) with the model in training
    mode (dropout on; ``seed`` fixes the draw) or eval mode."""
    was_training = model.training
    model.train(training)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    top_hist = top_last = mass = 0.0
    n = len(samples.target)
    try:
        for start in tqdm(range(0, n, batch_size), desc=desc, leave=False, disable=None):
            seq = model.prepare(samples.item_seq[start:start + batch_size].to(model.device))
            z = model.inference_vector(model.forward_prepared(seq))
            logits = z @ model.item_emb.T / model.temperature  # [B, V+1], column 0 the padding item
            logits[:, PADDING] = -torch.inf
            in_history = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, seq, True)
            in_history[:, PADDING] = False
            top = logits.argmax(dim=1)
            top_hist += float(in_history.gather(1, top[:, None]).sum())
            top_last += float((top == seq[:, -1]).sum())  # left-padded: the last column is the last item
            mass += float((torch.softmax(logits, dim=1) * in_history).sum())
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return {"top-1 in history": top_hist / n, "top-1 is last item": top_last / n, "history mass": mass / n}


def run_history(out, checkpoints: Sequence[str], *, data: Optional[str] = None, split: str = "valid",
                metrics: Sequence[str] = DEFAULT_METRICS, seed: int = 0,
                labels: Optional[Sequence[str]] = None) -> Output:
    """Writes ``history.csv/json/png`` and ``SUMMARY.md``."""
    from ..reporting import markdown_table
    from ..significance import paired_test

    if not checkpoints:
        raise UserError("--checkpoint: expected at least one run directory or checkpoint")
    if split not in SPLITS:
        raise UserError(f"--split: expected one of {list(SPLITS)}, got {split!r}")
    check_cutoff_metrics(metrics)
    labels = check_labels(checkpoints, labels)
    output = Output(out, "history")
    rows: List[Dict] = []
    names: List[str] = []
    for i, path in enumerate(checkpoints):
        model, extra, label = load_checkpoint(path, kind="history")
        name = labels[i] if labels else unique_label(label, names)
        names.append(name)
        settings = eval_settings(extra)
        samples = getattr(matching_dataset(model, extra, data, str(path), parts=(split,)), split)
        seq, target = samples.item_seq, samples.target
        row = {"model": name, "class": type(model).__name__, "split": split, "samples": int(len(target)),
               "target in history": target_in_history_share(samples)}
        for mode, training in (("eval", False), ("train", True)):
            shares = history_shares(model, samples, batch_size=settings["batch_size"], training=training, seed=seed,
                                    desc=f"history {name} ({mode} mode)")
            row.update({f"{key} ({mode})": value for key, value in shares.items()})
        ranks = {excluded: rank_targets(model, seq, target, batch_size=settings["batch_size"],
                                        exclude_history=excluded, ties=settings["ties"],
                                        desc=f"history {name}").numpy() for excluded in (False, True)}
        by_sample = {excluded: dict(enumerate(r.tolist())) for excluded, r in ranks.items()}  # paired per sample
        for m in metrics:
            res = paired_test(by_sample[False], by_sample[True], m)
            row[m] = float(per_user_metric(ranks[False], m).mean())
            row[f"{m} excluding history"] = float(per_user_metric(ranks[True], m).mean())
            row[f"{m} change (%)"] = res.relative
            row[f"{m} p"] = res.p
        rows.append(row)

    output.csv(rows, "history")
    output.json({"checkpoints": [str(c) for c in checkpoints], "split": split, "seed": seed, "rows": rows},
                "history")
    _figure(output, rows, metrics)
    table = [{"model": r["model"], "target in history": f"{r['target in history']:.1%}",
              "top-1 in history (eval / train)": f"{r['top-1 in history (eval)']:.1%} / "
                                                 f"{r['top-1 in history (train)']:.1%}",
              "top-1 is last item (eval)": f"{r['top-1 is last item (eval)']:.1%}",
              "history mass (eval / train)": f"{r['history mass (eval)']:.3f} / {r['history mass (train)']:.3f}",
              **{m: f"{r[m]:.4f} -> {r[f'{m} excluding history']:.4f} ({r[f'{m} change (%)']:+.1f}%, "
                    f"p={r[f'{m} p']:.2g})" for m in metrics}} for r in rows]
    output.summary("What the top of the list spends on the history", [
        f"Split `{split}`. `top-1 in history`: share of samples whose first recommendation is an item of their "
        "visible history. `history mass`: mean softmax probability (at the model's temperature) of the distinct "
        f"history items; `train` is one training-mode pass (dropout on, seed {seed}). Metrics: without -> with "
        "the history excluded from the candidates (paired t-test over samples).", "",
        markdown_table(table, list(table[0])), "", "![history](history.png)"])
    return output


def _figure(output: Output, rows, metrics: Sequence[str]) -> None:
    """Left: the share of top-1 recommendations that are history items, eval vs
    training mode. Then one panel per metric: without vs with the history excluded."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(4.0 * (1 + len(metrics)), 3.6), squeeze=False)
    x = np.arange(len(rows))
    panels = [("top-1 in history", [("eval mode", "top-1 in history (eval)"), ("training mode (dropout)",
                                                                            "top-1 in history (train)")])]
    panels += [(m, [("all items", m), ("history excluded", f"{m} excluding history")]) for m in metrics]
    for ax, (title, bars) in zip(axes[0], panels):
        for j, (label, key) in enumerate(bars):
            ax.bar(x + (j - 0.5) * 0.4, [r[key] for r in rows], 0.4, label=label)
        ax.set_xticks(x, [r["model"] for r in rows], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"History items at the top of the list ({rows[0]['split']} split)", fontsize=9)
    fig.tight_layout()
    output.figure(fig, "history")
