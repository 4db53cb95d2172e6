"""The same suite runs trained with several seeds: one Markdown table.

    python benchmarks/seed_table.py FOLDER [FOLDER ...] --runs sasrec erl plr-norcl [--baseline sasrec]
        [--metrics ndcg@10 recall@20]

Each FOLDER is one dataset's folder of one suite (``OUT/<dataset>``), trained
with one seed (the seed is read from each run's ``config.yaml``), e.g. the
folders of ``benchmarks/suites/converged.yaml`` and
``converged-seed2025.yaml``. Per run and seed: the test metrics and the paired
t-test against the baseline run of the same folder (``plr.significance``);
then per run the mean and sample standard deviation over the seeds, the
mean of the per-seed relative differences, and Welch's t-test of the per-seed
means against the baseline's (the variation a training seed brings, which the
per-user test of one seed does not see). A run missing from a folder (not
finished) is left out of that seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional

import yaml
from scipy import stats

from plr.reporting import markdown_table
from plr.significance import compare_runs


def _finished(run_dir: Path) -> bool:
    path = run_dir / "metrics.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("test"))  # "test": null = not read


def _test_metrics(folders: List[Path], run: str) -> List[Dict[str, float]]:
    """The test metrics of ``run`` in each folder where it has finished."""
    return [json.loads((f / run / "metrics.json").read_text())["test"] for f in folders if _finished(f / run)]


def seed_rows(folders: List[Path], runs: List[str], baseline: str, metrics: List[str]) -> List[Dict[str, str]]:
    """Rows of the table: per run, one per seed, then the run's summary row, whose
    test across seeds is Welch's t-test of the per-seed means against the
    baseline's (``scipy.stats.ttest_ind``, ``equal_var=False``; 2 seeds each at least)."""
    rows: List[Dict[str, str]] = []
    base_seeds = _test_metrics(folders, baseline)
    for run in runs:
        seeds: List[Dict[str, float]] = []
        for folder in folders:
            run_dir = folder / run
            if not _finished(run_dir):
                continue
            test = json.loads((run_dir / "metrics.json").read_text())["test"]
            seed = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["seed"]
            row = {"run": run, "seed": str(seed)}
            values: Dict[str, float] = {}
            for metric in metrics:
                values[metric] = test[metric]
                row[metric] = f"{test[metric]:.4f}"
                if run != baseline and _finished(folder / baseline):
                    res = compare_runs(folder / baseline, run_dir, metric)
                    values[f"rel {metric}"] = res.relative
                    row[f"vs {baseline} {metric}"] = f"{res.relative:+.1f}% (p={res.p:.2g})"
            seeds.append(values)
            rows.append(row)
        if not seeds:
            continue
        row = {"run": f"**{run}**", "seed": f"mean of {len(seeds)}"}
        for metric in metrics:
            xs = [s[metric] for s in seeds]
            sd = f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else ""
            row[metric] = f"{statistics.fmean(xs):.4f}{sd}"
            rels = [s[f"rel {metric}"] for s in seeds if f"rel {metric}" in s]
            cell = [f"{statistics.fmean(rels):+.1f}% (mean)"] if rels else []
            base = [b[metric] for b in base_seeds]
            if run != baseline and len(xs) > 1 and len(base) > 1:
                cell.append(f"across seeds p={stats.ttest_ind(xs, base, equal_var=False).pvalue:.2g}")
            if cell:
                row[f"vs {baseline} {metric}"] = "; ".join(cell)
        rows.append(row)
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--baseline", default="sasrec")
    parser.add_argument("--metrics", nargs="+", default=["ndcg@10", "recall@20"])
    args = parser.parse_args(argv)
    for folder in args.folders:
        if not folder.is_dir():
            parser.error(f"folders: expected a suite's dataset folder, got {str(folder)!r} (not a directory)")
    rows = seed_rows(args.folders, args.runs, args.baseline, args.metrics)
    columns = ["run", "seed", *args.metrics, *(f"vs {args.baseline} {m}" for m in args.metrics)]
    print(markdown_table(rows, [c for c in columns if any(c in r for r in rows)]))


if __name__ == "__main__":
    main()
