"""``plr analyze robustness``: the PLR paper's Figure 3.

Trained checkpoints re-evaluated, without retraining, on test histories from
which a share of the items was dropped at random: for drop rate r, each
history of n items loses ``min(round(r * n), n - 1)`` items (round half to even; at least one item
stays), chosen uniformly by a seeded generator; the kept items keep their
order and the target is unchanged. Rate 0 is the plain evaluation. One plot:
NDCG@20 against the drop rate, a line per model.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..evaluation import metrics_from_ranks, rank_targets
from .common import Output, check_labels, eval_settings, load_checkpoint, matching_dataset, pyplot, unique_label

DEFAULT_RATES = (0.0, 0.1, 0.2, 0.3)


def drop_items(item_seq: torch.Tensor, rate: float, seed: int) -> torch.Tensor:
    """``item_seq [U, L]`` left-padded -> the same histories with a share ``rate``
    of each row's items dropped at random (seeded), kept items in order, left-padded."""
    if not 0.0 <= rate < 1.0:
        raise UserError(f"--rates: expected drop rates in [0, 1), got {rate}")
    if rate == 0.0:
        return item_seq.clone()
    valid = item_seq > 0
    n = valid.sum(dim=1)
    n_drop = torch.minimum(torch.round(n.double() * rate).long(), (n - 1).clamp(min=0))
    gen = torch.Generator().manual_seed(int(seed))
    keys = torch.rand(item_seq.shape, generator=gen, dtype=torch.float64)
    keys = keys.masked_fill(~valid, 2.0)  # padding never dropped (it is not an item)
    order = keys.argsort(dim=1)  # the n_drop smallest keys of a row are its dropped items
    drop = torch.zeros_like(valid)
    drop.scatter_(1, order, torch.arange(item_seq.shape[1])[None, :].expand_as(order) < n_drop[:, None])
    keep = valid & ~drop
    length = item_seq.shape[1]
    position = torch.arange(length)[None, :].expand_as(item_seq)
    # kept items to the right end in their order, everything else (value 0) to the left
    pack = torch.argsort(torch.where(keep, length + position, position - length), dim=1, stable=True)
    return torch.where(keep, item_seq, torch.zeros_like(item_seq)).gather(1, pack)


def run_robustness(out, checkpoints: Sequence[str], *, data: Optional[str] = None,
                   rates: Sequence[float] = DEFAULT_RATES, seed: int = 0, metric: str = "ndcg@20",
                   labels: Optional[Sequence[str]] = None) -> Output:
    """Evaluate every checkpoint at every drop rate; writes ``robustness.csv/json/png`` and ``SUMMARY.md``."""
    from ..evaluation import metric_names

    if not checkpoints:
        raise UserError("--checkpoint: expected at least one run directory or checkpoint")
    kind, _, k = metric.partition("@")
    if not (metric == "mrr" or (kind in ("recall", "ndcg") and k.isdigit() and int(k) >= 1)):
        raise UserError(f"--metric: expected recall@K, ndcg@K or mrr, got {metric!r}", "e.g. --metric ndcg@20")
    labels = check_labels(checkpoints, labels)
    rates = sorted(set([0.0, *[float(r) for r in rates]]))
    for r in rates:
        if not 0.0 <= r < 1.0:
            raise UserError(f"--rates: expected drop rates in [0, 1), got {r}")
    output = Output(out, "robustness")
    rows, curves, datasets = [], {}, {}
    for i, path in enumerate(checkpoints):
        model, extra, label = load_checkpoint(path, kind="robustness")
        settings = eval_settings(extra)
        if metric not in metric_names(settings["ks"]):
            settings["ks"] = sorted(set(settings["ks"]) | {int(k)})
        key = (data, str((extra.get("run_config") or {}).get("data")))
        if key not in datasets:
            datasets.clear()
            datasets[key] = matching_dataset(model, extra, data, str(path))
        test = datasets[key].test
        name = labels[i] if labels else unique_label(label, curves)
        curves[name] = []
        for rate in tqdm(rates, desc=f"robustness {name}", leave=False):
            seq = drop_items(test.item_seq, rate, seed)
            ranks = rank_targets(model, seq, test.target, batch_size=settings["batch_size"],
                                 exclude_history=settings["exclude_history"], ties=settings["ties"]).numpy()
            metrics = metrics_from_ranks(ranks, settings["ks"])
            kept = (seq > 0).sum(1).double().mean().item()
            rows.append({"model": name, "class": type(model).__name__, "drop_rate": rate,
                         "mean_history": round(kept, 3), **metrics})
            curves[name].append(metrics[metric])
    output.csv(rows, "robustness")
    output.json({"seed": seed, "rates": rates, "metric": metric, "rows": rows,
                 "checkpoints": [str(c) for c in checkpoints]}, "robustness")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, values in curves.items():
        ax.plot([100 * r for r in rates], values, marker="o", label=name)
    ax.set_xlabel("items dropped from each test history (%)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title("Robustness to missing history items")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    output.figure(fig, "robustness")
    from ..reporting import markdown_table

    table = [{"model": n, **{f"{100 * r:g}%": v for r, v in zip(rates, vals)},
              "change at max": f"{(vals[-1] / vals[0] - 1) * 100:+.1f}%" if vals[0] > 0 else "n/a"}
             for n, vals in curves.items()]
    output.summary("Robustness (PLR paper, Figure 3)", [
        f"Test {metric} without retraining when each test history loses a share of its items at random "
        f"(seed {seed}; at least one item kept; targets kept).", "",
        markdown_table(table, list(table[0])), "", "![robustness](robustness.png)"])
    return output
