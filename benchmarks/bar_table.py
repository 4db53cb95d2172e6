"""Which runs of a suite clear a bar: better than the baseline with p < alpha in
every metric, on at least N datasets. One Markdown table.

    python benchmarks/bar_table.py REPORT_DIR [--metrics ndcg@10 recall@20]
        [--alpha 0.05] [--need 2] [--runs plr plr-norcl]

REPORT_DIR is the folder of a suite's report (``plr benchmark SUITE --report``),
holding ``results.json``: its ``vs_baseline`` entries are the paired t-tests
over test users of every run against the suite's baseline (relative difference
of the means, 95% interval, p; ``plr.benchmark``). Rows are runs, columns
datasets; a cell gives each metric's relative difference and p, marked **won**
when every metric is higher than the baseline's with p < alpha. The last
column counts the datasets won, against the number with the run's test result,
and says whether that meets ``--need``, cannot, or is open (the datasets without
a result could still decide it, if the run is trained there). Issue 11's bar is the default: PLR
above SASRec with p < 0.05 in NDCG@10 and Recall@20 on two datasets of three.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

from plr.reporting import markdown_table


def _tests(report: Dict) -> Dict[str, Dict[str, Dict[str, Dict]]]:
    """dataset -> run -> metric -> {relative_pct, p, ...}, from results.json."""
    return {name: ds.get("vs_baseline", {}) for name, ds in report["datasets"].items()}


def bar_rows(report: Dict, metrics: List[str], alpha: float, need: int,
             runs: Optional[List[str]] = None) -> List[Dict[str, str]]:
    """One row per run compared with the baseline somewhere (or per ``runs``, in
    that order). A dataset counts as won when, for every metric, the relative
    difference is positive and p < alpha; a dataset without the run's test result
    (not finished, or not in the suite there) is shown as "no result" and counts
    neither way."""
    tests = _tests(report)
    order = runs or list(dict.fromkeys(r for by_run in tests.values() for r in by_run))
    rows = []
    for run in order:
        row: Dict[str, str] = {"run": run}
        won = tested = 0
        for dataset, by_run in tests.items():
            if run not in by_run:
                row[dataset] = "no result"
                continue
            tested += 1
            parts, ok = [], True
            for metric in metrics:
                t = by_run[run][metric]
                parts.append(f"{metric} {t['relative_pct']:+.1f}% (p={t['p']:.2g})")
                ok = ok and t["relative_pct"] > 0 and t["p"] < alpha
            won += ok
            row[dataset] = ("**won**: " if ok else "") + "; ".join(parts)
        missing = len(tests) - tested
        if won >= need:
            verdict = "meets the bar"
        elif won + missing >= need:  # the datasets without a result could still decide it
            verdict = f"open ({missing} without a result)"
        else:
            verdict = "below the bar"
        row["datasets won"] = f"{won} of {tested} with a result: {verdict}"
        rows.append(row)
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", type=Path, help="folder of a suite's report (holds results.json)")
    parser.add_argument("--metrics", nargs="+", default=["ndcg@10", "recall@20"])
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--need", type=int, default=2, help="datasets a run must win (default 2)")
    parser.add_argument("--runs", nargs="+", help="these runs, in this order (default: every compared run)")
    args = parser.parse_args(argv)
    path = args.report / "results.json"
    if not path.is_file():
        parser.error(f"report: expected a folder holding results.json (plr benchmark SUITE --report), got {args.report}")
    report = json.loads(path.read_text())
    tested = {m for by_run in _tests(report).values() for t in by_run.values() for m in t}
    if tested and set(args.metrics) - tested:
        parser.error(f"--metrics: expected metrics the report tested ({', '.join(sorted(tested))}), "
                     f"got {', '.join(sorted(set(args.metrics) - tested))}")
    rows = bar_rows(report, args.metrics, args.alpha, args.need, args.runs)
    datasets = list(report["datasets"])
    print(f"Against the baseline of `{report['suite']}`: won = every one of {', '.join(args.metrics)} "
          f"higher with p < {args.alpha:g} (paired t-test over test users); the bar is {args.need} datasets.\n")
    print(markdown_table(rows, ["run", *datasets, "datasets won"]))


if __name__ == "__main__":
    main()
