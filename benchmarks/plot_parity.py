"""Quality parity of sequence vs prefix samples (issue 12): validation
NDCG@10 against cumulative training seconds, from the run directories of
``benchmarks/suites/parity-beauty.yaml`` (each ``metrics.json`` history has
``train_seconds`` per epoch; evaluation time is excluded).

    python benchmarks/plot_parity.py runs/parity/beauty --out benchmarks/figures/parity-beauty.png

Prints, per model, the time each mode needed to reach the best validation
value of prefix mode (or that it did not), and writes the numbers beside the
figure as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(run_dir: Path, metric: str):
    hist = json.loads((run_dir / "metrics.json").read_text())["history"]
    if not hist or "train_seconds" not in hist[0]:
        raise SystemExit(f"{run_dir}: its history has no train_seconds (a run from before they were recorded)")
    return [h["train_seconds"] for h in hist], [h[f"valid_{metric}"] for h in hist]


def first_reaching(xs, ys, level):
    return next((x for x, y in zip(xs, ys) if y >= level), None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="the suite's dataset folder, holding <model>-prefix/ and <model>-sequence/")
    ap.add_argument("--metric", default="ndcg@10")
    ap.add_argument("--out", required=True, help="PNG path (a .json of the numbers goes beside it)")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(args.runs)
    # runs <model>-prefix, <model>-sequence and optionally <model>-sequence-<tag> (e.g. another batch size)
    models = sorted({d.name.split("-")[0] for d in root.iterdir() if (d / "metrics.json").is_file()})
    data, summary = {}, {}
    fig, axes = plt.subplots(1, len(models), figsize=(5.0 * len(models), 3.6), dpi=90, squeeze=False)
    for ax, model in zip(axes[0], models):
        runs = sorted(d.name for d in root.iterdir() if d.name.split("-")[0] == model
                      and (d / "metrics.json").is_file())
        for name in runs:
            xs, ys = curve(root / name, args.metric)
            data[name] = {"train_seconds": xs, f"valid_{args.metric}": ys}
            ax.plot(xs, ys, "o-", label=name[len(model) + 1:])
        if f"{model}-prefix" in data:
            best_prefix = max(data[f"{model}-prefix"][f"valid_{args.metric}"])
            t_p = first_reaching(*data[f"{model}-prefix"].values(), best_prefix)
            summary[model] = {"best_prefix": best_prefix, "prefix_seconds": t_p}
            for name in runs:
                if name.startswith(f"{model}-sequence"):
                    t_s = first_reaching(*data[name].values(), best_prefix)
                    summary[model][f"{name}_seconds"] = t_s
                    print(f"{model}: prefix mode's best valid {args.metric} {best_prefix:.4f} reached after "
                          f"{t_p:.0f} s (prefix) and " + (f"{t_s:.0f} s ({name})" if t_s is not None else
                                                          f"never ({name})"))
        ax.set_title(model)
        ax.set_xlabel("training seconds")
        ax.set_ylabel(f"valid {args.metric}")
        ax.legend()
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    out.with_suffix(".json").write_text(json.dumps({"curves": data, "parity": summary}, indent=2))
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
