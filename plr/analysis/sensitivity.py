"""``plr analyze sensitivity``: the PLR paper's Figure 2.

Test NDCG@20 and Recall@20 of PLR against one hyperparameter at a time, the
others at the base config: M (``num_streams``), T (``num_steps``, 1..5), lambda
(``kl_weight``, Eq. 11) and dropout. Every (parameter, value) is a run of one
generated ``plr benchmark`` suite (:mod:`plr.analysis.suites`; finished runs
are skipped, killed ones resume); a value equal to the base config is the
shared run ``base``. One line plot per parameter.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import UserError
from .common import Output, parse_values, pyplot
from .suites import base_config, run_variants

# name on the command line -> (model key, type, default values, axis label)
PARAMETERS = {
    "M": ("num_streams", int, [1, 2, 3, 4], "M (reasoning streams)"),
    "T": ("num_steps", int, [1, 2, 3, 4, 5], "T (reasoning steps)"),
    "lambda": ("kl_weight", float, [0.0, 0.05, 0.1, 0.2, 0.5], "lambda (KL weight, Eq. 11)"),
    "dropout": ("dropout", float, [0.1, 0.2, 0.3, 0.4, 0.5], "dropout"),
}
METRICS = ("ndcg@20", "recall@20")


def parse_grid(items: Optional[Sequence[str]]) -> Dict[str, List[Any]]:
    """``["M=1,2,4", "T=1,2"]`` -> ``{"M": [1, 2, 4], "T": [1, 2]}``; none: every parameter, default values."""
    if not items:
        return {name: list(p[2]) for name, p in PARAMETERS.items()}
    grid: Dict[str, List[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in PARAMETERS:
            raise UserError(f"--vary: expected NAME=V1,V2,... with NAME one of {list(PARAMETERS)}, got {item!r}",
                            "e.g. --vary M=1,2,4 --vary T=1,2,3")
        grid[name] = parse_values(values, f"--vary {name}", PARAMETERS[name][1])
    return grid


def sensitivity_runs(cfg: Dict[str, Any], grid: Dict[str, List[Any]]
                     ) -> Tuple[List[Tuple[str, Dict[str, Any]]], Dict[str, List[Tuple[Any, str]]]]:
    """The suite's runs ``[(name, model keys)]`` and, per parameter, ``[(value, run name)]``."""
    runs: List[Tuple[str, Dict[str, Any]]] = [("base", {})]
    points: Dict[str, List[Tuple[Any, str]]] = {}
    for name, values in grid.items():
        key = PARAMETERS[name][0]
        points[name] = []
        for value in values:
            same = cfg["model"].get(key) == value
            run = "base" if same else f"{name}-{value}"
            if not same and all(r != run for r, _ in runs):
                runs.append((run, {key: value}))
            points[name].append((value, run))
    return runs, points


def run_sensitivity(out, *, grid: Optional[Sequence[str]] = None, run: Optional[str] = None,
                    config_file: Optional[str] = None, overrides: Sequence[str] = (),
                    data: Optional[str] = None) -> Output:
    """Train the grid's runs (resuming, skipping finished ones), then write
    ``sensitivity.csv/json``, ``sensitivity-<param>.png`` and ``SUMMARY.md``."""
    cfg = base_config(run, config_file, overrides, data)
    values = parse_grid(grid)
    output = Output(out, "sensitivity")
    runs, points = sensitivity_runs(cfg, values)
    suite, finished = run_variants(output.dir, "sensitivity", cfg, runs, baseline="base")
    missing = sorted({r for r, _ in runs} - set(finished))
    if missing:
        raise UserError(f"sensitivity: run(s) {missing} did not finish", f"rerun the command (it resumes): "
                                                                          f"{output.dir}")
    rows = [{"parameter": name, "key": f"model.{PARAMETERS[name][0]}", "value": value, "run": r,
             **{m: finished[r]["test"][m] for m in METRICS}}
            for name, pts in points.items() for value, r in pts]
    output.csv(rows, "sensitivity")
    output.json({"base_config": cfg, "rows": rows}, "sensitivity")
    plt = pyplot()
    base = ", ".join(f"{n}={cfg['model'][p[0]]}" for n, p in PARAMETERS.items())
    lines = [f"Dataset `{cfg['data']['path']}`; one hyperparameter varied at a time, the others at the base "
             f"config ({base}); test metrics "
             f"of the best-validation checkpoint. Runs: `{suite.out}`.", ""]
    for name, pts in points.items():
        fig, ax = plt.subplots(figsize=(4.8, 3.4))
        xs = [v for v, _ in pts]
        for metric in METRICS:
            ax.plot(xs, [finished[r]["test"][metric] for _, r in pts], marker="o", label=metric)
        ax.set_xlabel(PARAMETERS[name][3])
        ax.set_ylabel("test metric")
        ax.set_title(f"PLR sensitivity to {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        output.figure(fig, f"sensitivity-{name}")
        lines += [f"**{name}** (`model.{PARAMETERS[name][0]}`): " + "; ".join(
            f"{v}: NDCG@20 {finished[r]['test']['ndcg@20']:.4f}, Recall@20 {finished[r]['test']['recall@20']:.4f}"
            for v, r in pts), "", f"![{name}](sensitivity-{name}.png)", ""]
    output.summary("Sensitivity (PLR paper, Figure 2)", lines)
    return output
