"""Markdown table of finished `plr train` runs, with paired t-tests.

    python benchmarks/results_table.py RUN_DIR [RUN_DIR ...] [--baseline RUN_DIR]

Each RUN_DIR holds metrics.json and test_ranks.csv. Rows are grouped by
dataset; the t-test (plr.significance, on per-user NDCG@10) compares each
run with the first run of its dataset (or --baseline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from plr.significance import compare_runs


def paired(base: Path, run: Path, metric: str = "ndcg@10"):
    res = compare_runs(base, run, metric)
    return res.relative, res.t, res.p


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--baseline", type=Path)
    args = parser.parse_args()
    print("| dataset | model | R@10 | N@10 | R@20 | N@20 | epochs (best) | train time | vs first: N@10 | t | p |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    first = {}
    for run in args.runs:
        m = json.loads((run / "metrics.json").read_text())
        base = args.baseline or first.setdefault(m["dataset"], run)
        if base == run:
            cmp_ = ("—", "—", "—")
        else:
            rel, t, p = paired(base, run)
            cmp_ = (f"{rel:+.1f}%", f"{t:.2f}", f"{p:.2g}")
        test = m["test"]
        print(f"| {m['dataset']} | {run.name} | {test['recall@10']:.4f} | {test['ndcg@10']:.4f} | "
              f"{test['recall@20']:.4f} | {test['ndcg@20']:.4f} | {m['epochs']} ({m['best_epoch']}) | "
              f"{m['train_seconds'] / 60:.1f} min | {cmp_[0]} | {cmp_[1]} | {cmp_[2]} |")


if __name__ == "__main__":
    main()
