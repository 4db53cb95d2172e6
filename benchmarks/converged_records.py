"""Records of ``benchmarks/converged.sh`` that outlive the machine it runs on.

A search and its final runs take more worker-hours than a session has, and a
later session may get a new machine without ``runs/``. ``save`` copies what is
worth keeping into the repository, ``restore`` puts the final runs back:

    python benchmarks/converged_records.py save runs/converged benchmarks/results [--checkpoints]
    python benchmarks/converged_records.py restore benchmarks/results runs/converged

``save`` writes
- ``converged-tuning/``: every trial of ``OUT/tune`` (``benchmarks/tuning_table.py
  --copy-to``: config, log, metrics), the queue's logs and marks, ``driver.log``
  (a new machine's logs are added after the recorded ones);
- ``converged-final/<dataset>/<run>/``: each run of ``OUT/final``, finished (config,
  log, ``metrics.json`` with its test metrics, ``test_ranks.csv`` for the t-tests),
  diverged (config, log, ``DIVERGED``) or unfinished (config, log), and the report;
- ``converged-exclude/``: the same for ``OUT/exclude`` (the suite evaluated with the
  history excluded);
- ``converged-seeds/<seed>/``: the same for each ``OUT/seeds/<seed>`` (the suites
  ``converged-seed<seed>.yaml``: chosen configurations trained with another seed);
- ``converged-tuning/ablation/<run>/``: each single-change run trained by hand in
  ``OUT/ablation`` (``plr train --no-test``; config, log, metrics, no checkpoints).

With ``--checkpoints`` (a few times a session: a new machine resumes from the last one) the unfinished trials and runs
keep their checkpoints too: ``plr tune --add-trials`` and ``restore`` resume them;
each search's best finished trial keeps its ``best.pt``, so that the final
run on Beauty adopts it on a new machine rather than training it again; and each
finished final run keeps its ``best.pt``, for analyses of the chosen models
(``plr analyze history``, ``ceiling``) without training them again.

``restore`` copies each recorded run that ``OUT/final`` (``exclude``, ``seeds/<seed>``) lacks back into it:
a finished one is then skipped by ``plr benchmark`` (and counted in the report),
an unfinished one resumed from its checkpoint. Nothing already in ``OUT`` is
overwritten.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tuning_table  # noqa: E402  (benchmarks/ is not a package)

KEPT = ("config.yaml", "train.log", "metrics.json", "test_ranks.csv", "DIVERGED")
REPORT = ("RESULTS.md", "results.json", "curves-*.png", "gains.png")  # plr.benchmark.write_report


def finished(run_dir: Path) -> bool:
    """A final run is finished once its metrics.json holds test metrics, or once it
    diverged (``DIVERGED``: it has no test result and is not trained again;
    plr.benchmark.run_status)."""
    if (run_dir / "DIVERGED").is_file():
        return True
    try:
        return bool(json.loads((run_dir / "metrics.json").read_text()).get("test"))
    except (OSError, ValueError):
        return False


def append_log(source: Path, dest: Path) -> None:
    """Copy a log that grows; a log of a new machine (not a continuation of the
    recorded one) is added after the recorded one, which is kept."""
    text = source.read_text()
    old = dest.read_text() if dest.is_file() else ""
    # This machine's part of the record: the earliest line from which the record is a prefix of ``text``.
    start = next((i for i in [0, *(j + 1 for j, c in enumerate(old) if c == "\n")]
                  if text.startswith(old[i:])), len(old))
    dest.write_text(old[:start] + text)


SUITES = {"final": "converged-final", "exclude": "converged-exclude"}  # OUT/<key> -> RESULTS/<value>
SEEDS = ("seeds", "converged-seeds")  # OUT/seeds/<seed> -> RESULTS/converged-seeds/<seed>: one suite per seed


def suite_folders(out: Path, results: Path, listed: Path) -> list:
    """``(OUT folder, records folder)`` of every suite: final, exclude, and one per
    seed folder found under ``listed`` (``out`` to save, ``results`` to restore)."""
    pairs = [(out / k, results / v) for k, v in SUITES.items()]
    seeds = listed / (SEEDS[0] if listed == out else SEEDS[1])
    if seeds.is_dir():
        pairs += [(out / SEEDS[0] / d.name, results / SEEDS[1] / d.name) for d in sorted(seeds.iterdir())
                  if d.is_dir()]
    return pairs


def save_final(final: Path, dest: Path, checkpoints: bool) -> int:
    """Copy every run of a suite's ``out`` (``final/<dataset>/<run>``), with the
    checkpoints of the unfinished ones and the ``best.pt`` of the finished ones if
    ``checkpoints``; returns how many."""
    count = 0
    for run_dir in sorted(p.parent for p in final.glob("*/*/config.yaml")):
        tuning_table.copy_run(run_dir, dest / run_dir.relative_to(final), KEPT, finished(run_dir), checkpoints,
                              keep=("best.pt",))
        count += 1
    for pattern in REPORT:
        for f in final.glob(pattern):
            shutil.copy2(f, dest / f.name)
    return count


def restore_final(records: Path, final: Path) -> int:
    """Copy each recorded run that ``final`` lacks back into it; returns how many."""
    count = 0
    for record in sorted(p.parent for p in records.glob("*/*/config.yaml")):
        target = final / record.relative_to(records)
        if target.exists():
            continue
        shutil.copytree(record, target)
        count += 1
    return count


def save(out: Path, results: Path, checkpoints: bool = False) -> None:
    tuning = results / "converged-tuning"
    if (out / "tune").is_dir():
        tuning_table.main([str(out / "tune"), "--copy-to", str(tuning), *(["--checkpoints"] if checkpoints else [])])
    if (out / "queue").is_dir():
        (tuning / "queue").mkdir(parents=True, exist_ok=True)
        for f in (out / "queue").iterdir():
            if f.suffix == ".log":
                append_log(f, tuning / "queue" / f.name)
            elif f.suffix in (".done", ".failed"):
                shutil.copy2(f, tuning / "queue" / f.name)
    if (out / "driver.log").is_file():
        append_log(out / "driver.log", tuning / "driver.log")
    for run_dir in sorted(p.parent for p in (out / "ablation").glob("*/config.yaml")):
        tuning_table.copy_run(run_dir, tuning / "ablation" / run_dir.name, ("config.yaml", "train.log", "metrics.json"),
                              finished=True, checkpoints=False)
    for folder, records in suite_folders(out, results, out):
        if folder.is_dir():
            print(f"{folder.relative_to(out)}: {save_final(folder, records, checkpoints)} runs recorded")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save", help="OUT -> records in RESULTS")
    s.add_argument("out", type=Path)
    s.add_argument("results", type=Path)
    s.add_argument("--checkpoints", action="store_true",
                   help="the unfinished runs' checkpoints and the finished ones' best.pt too (a few times a session, the last one "
                        "near its end: each save of a "
                        "changed checkpoint adds its whole size to the repository's history)")
    r = sub.add_parser("restore", help="the final (exclude, seeds) runs recorded in RESULTS -> OUT")
    r.add_argument("results", type=Path)
    r.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.command == "save":
        if not args.out.is_dir():
            raise SystemExit(f"out: expected the OUT folder of benchmarks/converged.sh, got {args.out}")
        save(args.out, args.results, args.checkpoints)
    else:
        for folder, records in suite_folders(args.out, args.results, args.results):
            n = restore_final(records, folder) if records.is_dir() else 0
            print(f"restore: {n} recorded {folder.relative_to(args.out)} runs copied into {folder}")


if __name__ == "__main__":
    main()
