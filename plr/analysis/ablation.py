"""``plr analyze ablation``: the PLR paper's Table 3.

PLR with every component against PLR without one, each trained by the same
protocol (one generated ``plr benchmark`` suite, :mod:`plr.analysis.suites`):

* ``full``     the base config;
* ``no-mors``  ``model.mixture=mean``: the uniform mean over the streams
               instead of the MoRS gate (Eq. 9);
* ``no-rcl``   ``model.rcl_weight=0``: without the reasoning contrastive loss (Eq. 8);
* ``no-kl``    ``model.kl_weight=0``: without the diversity term (Eq. 7).

The table gives the test metrics and the paired t-test over test users of
each variant against ``full`` (``plr.significance``). A variant equal to the
base config (e.g. ``no-kl`` of a base with ``kl_weight: 0``) is refused.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import UserError
from .common import Output, pyplot
from .suites import DATASET, base_config, run_variants

VARIANTS: List[Tuple[str, str, Dict[str, Any]]] = [
    ("full", "PLR (full)", {}),
    ("no-mors", "w/o MoRS (Eq. 9: uniform mean over streams)", {"mixture": "mean"}),
    ("no-rcl", "w/o RCL (Eq. 8)", {"rcl_weight": 0.0}),
    ("no-kl", "w/o KL (Eq. 7)", {"kl_weight": 0.0}),
]


def ablation_variants(cfg: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    """``[(run name, model keys)]`` of the four variants of the base ``cfg``."""
    out = []
    for name, _, keys in VARIANTS:
        if keys and all(cfg["model"].get(k) == v for k, v in keys.items()):
            raise UserError(f"ablation: the base config already has {keys} (variant {name!r} would be the full "
                            f"model)", "ablate a full PLR config")
        out.append((name, keys))
    return out


def run_ablation(out, *, run: Optional[str] = None, config_file: Optional[str] = None,
                 overrides: Sequence[str] = (), data: Optional[str] = None) -> Output:
    """Train (or resume, or skip finished) the four variants, then write
    ``ablation.md/csv/json/png`` and ``SUMMARY.md`` into ``out``."""
    from ..reporting import markdown_table
    from ..significance import compare_runs

    cfg = base_config(run, config_file, overrides, data)
    output = Output(out, "ablation")
    suite, finished = run_variants(output.dir, "ablation", cfg, ablation_variants(cfg), baseline="full")
    missing = [name for name, _, _ in VARIANTS if name not in finished]
    if missing:
        raise UserError(f"ablation: run(s) {missing} did not finish", f"rerun the command (it resumes): {output.dir}")
    folder = suite.out / DATASET
    rows = []
    for name, label, _ in VARIANTS:
        test = finished[name]["test"]
        row = {"variant": name, "what": label, **{m: test[m] for m in suite.metrics}}
        for metric in suite.significance:
            if name != "full":
                t = compare_runs(folder / "full", folder / name, metric)
                row[f"{metric} vs full"] = f"{t.relative:+.1f}%"
                row[f"p ({metric})"] = f"{t.p:.3g}"
        rows.append(row)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    output.csv(rows, "ablation", columns)
    output.json({"base_config": cfg, "rows": rows, "runs": {n: str(folder / n) for n in finished}}, "ablation")
    _plot(output, rows, suite.metrics)
    table = markdown_table(rows, columns)
    output.summary("Ablation (PLR paper, Table 3)", [
        f"Dataset `{cfg['data']['path']}`; every variant trained by the base protocol "
        f"(train: {_protocol(cfg)}); test metrics of the best-validation checkpoint; paired t-tests over "
        f"{t.users} test users against `full` (relative difference; p).", "", table, "",
        f"Run directories: `{folder}`; the generated suite: `{output.dir / 'suite.yaml'}`.", "",
        "![ablation](ablation.png)"])
    return output


def _protocol(cfg: Dict[str, Any]) -> str:
    train = cfg["train"]
    keys = ("epochs", "batch_size", "lr", "patience", "max_steps_per_epoch", "seed")
    return ", ".join(f"{k}={train[k]}" for k in keys if train.get(k) is not None)


def _plot(output: Output, rows, metrics) -> None:
    plt = pyplot()
    shown = [m for m in metrics if m.endswith("@20")] or list(metrics)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / len(shown)
    for j, metric in enumerate(shown):
        xs = [i + (j - (len(shown) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r[metric] for r in rows], width, label=metric)
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows])
    ax.set_ylabel("test metric")
    ax.set_title("Ablation of PLR")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    output.figure(fig, "ablation")
