"""``plr analyze groups``: where one model beats another, user group by user group.

The paired comparison of a results table (each finished run's ``test_ranks.csv``)
broken down by two properties of a test sample:

* ``history``: how many interactions precede the target (leave-one-out split: the
  user's whole history, of which the model sees the last ``data.max_len``; another
  split: the items the model sees);
* ``popularity``: how often the target item occurs in the training split.

Groups are quantiles over the test samples (about equal sizes; samples with the same
value stay in one group), so the paired t-test of every group has comparable power.
Nothing is run through a model: only the ranks and the dataset are read, so the
breakdown costs seconds even for runs that took hours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import UserError
from .common import Output, check_cutoff_metrics, check_labels, pyplot, unique_label

GROUPINGS = {"history": "interactions before the target",
             "popularity": "training count of the target item"}
DEFAULT_METRICS = ("ndcg@10", "recall@20")


def quantile_groups(values: np.ndarray, bins: int) -> np.ndarray:
    """Group index ``[N]`` in ``0..G-1`` (``G <= bins``): quantile bins of ``values``; equal
    values share a group, so heavy ties give fewer, larger groups."""
    if bins < 1:
        raise UserError(f"--bins: expected a positive number of groups, got {bins}")
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1], method="lower"))
    group = np.searchsorted(edges, values, side="left")  # group i: edges[i-1] < value <= edges[i]
    return np.unique(group, return_inverse=True)[1].reshape(-1)  # without empty groups


def _run_data(run: Path) -> Dict:
    from .. import config as config_mod

    for name in ("test_ranks.csv", "config.yaml"):
        if not (run / name).is_file():
            raise UserError(f"runs: {run} holds no {name}", "name finished run directories (they hold "
                                                            "test_ranks.csv and config.yaml)")
    return dict(config_mod.load_yaml(run / "config.yaml").get("data") or {})


def run_groups(out, runs: Sequence[str], *, data: Optional[str] = None, metrics: Sequence[str] = DEFAULT_METRICS,
               bins: int = 4, labels: Optional[Sequence[str]] = None) -> Output:
    """Compare ``runs[1:]`` with ``runs[0]`` (the reference) in each group; writes
    ``groups.csv/json/png`` and ``SUMMARY.md``."""
    from ..data import load_dataset
    from ..evaluation import per_user_metric
    from ..reporting import markdown_table
    from ..significance import paired_test
    from ..training import load_ranks

    if len(runs) < 2:
        raise UserError(f"runs: expected a reference run and at least one other, got {len(runs)}")
    check_cutoff_metrics(metrics)
    labels = check_labels(runs, labels)
    paths = [Path(r) for r in runs]
    settings = [_run_data(p) for p in paths]
    keys = ("path", "max_len", "split", "min_rating", "k_core", "split_time")
    for p, s in zip(paths[1:], settings[1:]):
        differ = [k for k in keys if s.get(k) != settings[0].get(k) and not (k == "path" and data)]
        if differ:
            raise UserError(f"runs: {p} was split differently from {paths[0]} (data.{differ[0]}: "
                            f"{s.get(differ[0])!r} vs {settings[0].get(differ[0])!r})",
                            "compare runs of one dataset, split the same way")
    data_cfg = {**settings[0], **({"path": str(data)} if data else {})}
    dataset = load_dataset(data_cfg, parts=("test",))
    test = dataset.test
    users = test.user.numpy()
    if len(np.unique(users)) != len(users):
        raise UserError(f"--data: {data_cfg.get('path')} has several test samples per user (split "
                        f"{data_cfg.get('split')!r}); test_ranks.csv holds one rank per user",
                        "group runs of a leave-one-out split")
    # leave-one-out: the test target is each user's last interaction
    history = (np.asarray(dataset.seq_lengths)[users] - 1 if dataset.split == "loo"
               else (test.item_seq > 0).sum(dim=1).numpy())
    values = {"history": history,
              "popularity": np.asarray(dataset.item_popularity)[test.target.numpy()]}
    names: List[str] = []
    ranks = []
    for i, p in enumerate(paths):
        r = load_ranks(p / "test_ranks.csv")
        missing = set(r) - set(users.tolist())
        if missing or len(r) != len(users):
            raise UserError(f"runs: the test ranks of {p} ({len(r)} users) are not those of "
                            f"{data_cfg.get('path')} ({len(users)} test users)", "pass the run's dataset as --data")
        names.append(labels[i] if labels else unique_label(p.name, names))
        ranks.append(np.array([r[u] for u in users.tolist()]))

    rows = []
    for grouping, vals in values.items():
        group = quantile_groups(vals, bins)
        for g in [-1, *range(int(group.max()) + 1)]:
            sel = np.ones(len(users), bool) if g < 0 else group == g
            lo, hi = int(vals[sel].min()), int(vals[sel].max())
            span = "all" if g < 0 else (str(lo) if lo == hi else f"{lo}-{hi}")
            by_user = [dict(zip(users[sel].tolist(), rk[sel].tolist())) for rk in ranks]  # paired_test's input
            for m in metrics:
                row = {"grouping": grouping, "group": span, "users": int(sel.sum()), "metric": m,
                       names[0]: float(per_user_metric(ranks[0][sel], m).mean())}
                for name, rk, other in zip(names[1:], ranks[1:], by_user[1:]):
                    # a group of one user has no t-test
                    res = paired_test(by_user[0], other, m) if sel.sum() >= 2 else None
                    row[name] = float(per_user_metric(rk[sel], m).mean())
                    row[f"{name} vs {names[0]} (%)"] = None if res is None else res.relative
                    row[f"{name} p"] = None if res is None else res.p
                rows.append(row)

    output = Output(out, "groups")
    output.csv(rows, "groups")
    output.json({"runs": [str(p) for p in paths], "labels": names, "reference": names[0], "bins": bins,
                 "data": data_cfg, "rows": rows}, "groups")
    _figure(output, rows, names, metrics)
    seen = "" if dataset.split == "loo" else f" (split {dataset.split!r}: the items seen, at most max_len)"
    lines = [f"Each run against **{names[0]}** (paired t-test over the users of each group; groups are "
             f"quantiles of the test users, at most {bins} per grouping). Dataset: `{data_cfg.get('path')}`"
             f"{seen}. Each p-value is that of its group alone, not corrected for the number of groups "
             f"and metrics tested: among many groups, some p < 0.05 arise by chance.", ""]
    for grouping, text in GROUPINGS.items():
        lines += [f"## By {text}", ""]
        table = []
        for row in (r for r in rows if r["grouping"] == grouping):
            cells = {"group": row["group"], "users": row["users"], "metric": row["metric"],
                     names[0]: f"{row[names[0]]:.4f}"}
            for name in names[1:]:
                rel, p = row[f"{name} vs {names[0]} (%)"], row[f"{name} p"]
                cells[name] = f"{row[name]:.4f}" + ("" if rel is None else f" ({rel:+.1f}%, p={p:.2g})")
            table.append(cells)
        lines += [markdown_table(table, list(table[0])), ""]
    lines.append("![groups](groups.png)")
    output.summary("Where the models differ: by history length and target popularity", lines)
    return output


def _figure(output: Output, rows, names: Sequence[str], metrics: Sequence[str]) -> None:
    """A panel per (grouping, metric): each model's mean per group; ``*`` over a bar whose
    difference from the reference has p < 0.05."""
    plt = pyplot()
    fig, axes = plt.subplots(len(GROUPINGS), len(metrics), figsize=(4.2 * len(metrics), 3.3 * len(GROUPINGS)),
                             squeeze=False)
    width = 0.8 / len(names)
    for i, (grouping, text) in enumerate(GROUPINGS.items()):
        for j, m in enumerate(metrics):
            ax = axes[i][j]
            sub = [r for r in rows if r["grouping"] == grouping and r["metric"] == m and r["group"] != "all"]
            x = np.arange(len(sub))
            for n, name in enumerate(names):
                heights = [r[name] for r in sub]
                ax.bar(x + (n - (len(names) - 1) / 2) * width, heights, width, label=name)
                for xi, r, h in zip(x, sub, heights):
                    p = r.get(f"{name} p")
                    if p is not None and p < 0.05:
                        ax.text(xi + (n - (len(names) - 1) / 2) * width, h, "*", ha="center", va="bottom")
            ax.set_xticks(x, [f"{r['group']}\n({r['users']})" for r in sub], fontsize=7)
            ax.set_xlabel(text, fontsize=8)
            ax.set_ylabel(f"test {m}")
            ax.grid(axis="y", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"Per group (* p < 0.05 against {names[0]}; users in brackets)", fontsize=9)
    fig.tight_layout()
    output.figure(fig, "groups")
