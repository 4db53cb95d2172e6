"""The ``plr`` command line (the commands: README.md).

    plr demo [--seed N] [--set key=value ...]        (--set: PLR's config only)
    plr train --model plr --data PATH [--config CFG.yaml] [--set key=value ...] [--out RUN_DIR] [--resume]
    plr train --model lares --data PATH [--phase both|spt|rpt] [--init SPT_RUN/best.pt] ...
    plr evaluate --checkpoint RUN_DIR/best.pt --data PATH [--split test|valid] [--exclude-history]
    plr recommend --checkpoint RUN_DIR/best.pt --history "12 55 7" [--k 10]
    plr compare RUN_A RUN_B [--metric ndcg@10]
    plr benchmark SUITE.yaml [--only RUN ...] [--out DIR] [--check | --report] [--skip-busy]
    plr analyze ablation|sensitivity|robustness|ceiling|attention|efficiency ...   (plr/analysis/)
    plr tune --model plr --data PATH --space SPACE.yaml --trials N --out DIR [--config CFG.yaml] [--set ...]
             [--add-trials DIR ...]
    plr serve --checkpoint RUN_DIR/best.pt [--host 127.0.0.1] [--port 8000] [--max-batch 64] [--max-wait-ms 2]
              [--batch-wait adaptive|always] [--threads N]
    plr data stats PATH
    plr data download amazon2023 --category Video_Games --dest DIR

User errors (plr.errors) print one line, ``plr: error: <what> — <how to fix>``,
with exit code 2; ``--debug`` (anywhere on the line) shows the traceback.
Ctrl-C stops a training run after saving its state (exit code 130).
``plr benchmark --skip-busy`` exits with code 3 when it left runs to other
processes (they are still training).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional

from . import __version__
from .errors import USER_ERRORS, UserError, one_line
from .data.loading import load_dataset
from .reporting import format_table


# -- commands ------------------------------------------------------------------------


def cmd_train(args) -> int:
    from . import config as config_mod
    from . import distributed
    from .training import train_run

    if args.resume and not args.out:
        raise UserError("--resume: needs the run to continue", "pass --out RUN_DIR")
    overrides = list(args.set or [])
    if args.backbone:
        overrides.insert(0, f"model.backbone={args.backbone}")
    if args.phase or args.init:
        from .models import model_class

        if getattr(model_class(args.model), "run_training", None) is None:
            raise UserError(f"--phase/--init apply to models trained in phases (lares), "
                            f"not to --model {args.model}", "drop --phase/--init")
        overrides[:0] = ([f"model.phase={args.phase}"] if args.phase else []) + \
            ([f"model.init_from={args.init}"] if args.init else [])
    cfg = config_mod.resolve(args.model, args.config, overrides, args.data)
    ctx = distributed.setup(cfg["train"]["device"])  # torchrun: join the process group (plr/distributed.py)
    try:
        if ctx.active and not args.out:
            raise UserError(f"--out: {ctx.world_size} processes (WORLD_SIZE) share one run directory; none given",
                            "pass --out RUN_DIR")
        dataset = load_dataset(cfg["data"])
        out = Path(args.out or f"runs/{cfg['model']['name']}-{dataset.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        args.run_dir = out  # for the resume hint after Ctrl-C
        say = print if ctx.is_main else (lambda *a, **k: None)
        say(f"plr train: {cfg['model']['name']} on {dataset.name} -> {out}"
            + (f" ({ctx.world_size} processes)" if ctx.active else ""))
        metrics = train_run(cfg, dataset, out, resume=args.resume, test=not args.no_test)
        splits = ("valid",) if args.no_test else ("valid", "test")
        say(format_table([{"split": s, **metrics[s]} for s in splits], ["split"] + list(metrics["valid"])))
    finally:
        distributed.teardown()
    return 0


def _checkpoint(path: str):
    """A checkpoint's model and extra data; refused if its weights are not all finite."""
    from .models import SequentialRecommender

    model, extra = SequentialRecommender.load_with_extra(path)
    bad = model.non_finite_weights()
    if bad:
        raise UserError(f"--checkpoint: {path} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s), "
                        f"e.g. {bad[0]}: the run that wrote it diverged", "retrain it (e.g. with a lower train.lr)")
    return model, extra


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate

    model, extra = _checkpoint(args.checkpoint)
    if args.readout is not None:
        if not hasattr(model, "readout"):
            raise UserError(f"--readout: only a PLR checkpoint has a readout; {args.checkpoint} holds a "
                            f"{type(model).__name__}", "drop --readout")
        model.readout = args.readout
    run_cfg = extra.get("run_config") or {}
    data_cfg = dict(run_cfg.get("data") or {"max_len": model.max_len, "split": "loo"})
    data_cfg["path"] = args.data
    dataset = load_dataset(data_cfg, parts=(args.split,))
    saved_ids = extra.get("item_raw_ids")
    now_ids = [None if r is None else str(r) for r in dataset.item_raw_ids]
    if saved_ids is not None and saved_ids != now_ids:
        raise UserError(f"--data: the items of {args.data} differ from those the checkpoint was trained on",
                        "evaluate on the dataset of the run")
    eval_cfg = run_cfg.get("eval") or {}
    result = evaluate(model, getattr(dataset, args.split), ks=eval_cfg.get("ks", [5, 10, 20, 50]),
                      exclude_history=args.exclude_history, ties=args.ties, progress=True)
    print(format_table([{"split": args.split, **result.metrics}], ["split"] + list(result.metrics)))
    return 0


def cmd_recommend(args) -> int:
    import torch

    from .serving.catalog import ItemCatalog, UnknownItemsError

    model, extra = _checkpoint(args.checkpoint)
    catalog = ItemCatalog(model.num_items) if args.internal_ids else \
        ItemCatalog.from_checkpoint_extra(model.num_items, extra)
    tokens = args.history.replace(",", " ").split()
    if not tokens:
        raise UserError("--history: needs at least one item id", 'e.g. --history "12 55 7"')
    try:
        ids = catalog.to_internal(tokens)
    except UnknownItemsError as e:
        hint = (f"internal ids are 1..{model.num_items}" if args.internal_ids
                else "use raw ids of the training data (or --internal-ids)")
        raise UserError(f"--history: item ids unknown to the checkpoint: {e.missing[:5]}", hint) from None
    most = model.num_items - (len(set(ids)) if args.exclude_history else 0)
    if not 1 <= args.k <= model.num_items:
        raise UserError(f"--k: expected an int in [1, {model.num_items}] (the number of items), got {args.k}")
    seq = torch.tensor([ids[-model.max_len:]], dtype=torch.long)
    scores, items = model.recommend(seq, k=args.k, exclude_history=args.exclude_history)
    raw, values, titles = catalog.describe(scores[0].tolist(), items[0].tolist())
    rows = [{"rank": rank, "item": item, "score": score, "title": title}
            for rank, (item, score, title) in enumerate(zip(raw, values, titles), start=1)]
    print(format_table(rows, ["rank", "item", "score", "title"]))
    if len(rows) < args.k:
        print(f"plr recommend: only {len(rows)} candidate item(s) left (of --k {args.k}; "
              f"{model.num_items - most} excluded as history)", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from .serving.app import serve  # plr/serving/app.py (FastAPI + uvicorn: pip install ".[serve]")

    return serve(args.checkpoint, host=args.host, port=args.port, max_batch=args.max_batch,
                 max_wait_ms=args.max_wait_ms, device=args.device, threads=args.threads, wait=args.batch_wait)


def cmd_compare(args) -> int:
    from .significance import compare_runs

    for run in (args.run_a, args.run_b):
        if (Path(run) / "best.pt").is_file():
            _checkpoint(str(Path(run) / "best.pt"))  # refuses a diverged run
    res = compare_runs(args.run_a, args.run_b, args.metric)
    print(format_table([{"run": args.run_a, args.metric: res.mean_a},
                        {"run": args.run_b, args.metric: res.mean_b}], ["run", args.metric]))
    print(f"paired t-test over {res.users} users: B - A = {res.diff:+.4f} ({res.relative:+.1f}%), "
          f"95% interval [{res.ci_low:+.4f}, {res.ci_high:+.4f}], t = {res.t:.3f}, p = {res.p:.3g}")
    return 0


def cmd_benchmark(args) -> int:
    from .benchmark import SuiteError, find_reusable, load_suite, run_status, run_suite, write_report

    suite = load_suite(args.suite, out=args.out, only=args.only)  # a SuiteError is a one-line user error
    unknown = sorted(set(args.only or []) - set(suite.run_names))
    if unknown:
        raise SuiteError(f"--only: expected runs of the suite {suite.run_names}, got {unknown}")
    if args.check:
        def status(run) -> str:
            state = run_status(run)
            source = find_reusable(run, suite.reuse) if state == "new" and run.source is None else None
            return f"new, adopts {source}" if source is not None else state

        print(format_table([{"run": r.name, "model": r.cfg["model"]["name"], "dataset": r.dataset,
                             "status": status(r), "directory": str(r.run_dir)} for r in suite.runs],
                           ["run", "model", "dataset", "status", "directory"]))
        return 0
    path = write_report(suite) if args.report else run_suite(suite, only=args.only, skip_busy=args.skip_busy)
    print(f"plr benchmark: report in {path}")
    mine = [r for r in suite.runs if not args.only or r.name in args.only]
    diverged = [r for r in mine if run_status(r) == "diverged"]
    if diverged:
        print(f"plr benchmark: {len(diverged)} run(s) diverged, without a test result (see the report): "
              + ", ".join(f"{r.name} on {r.dataset}" for r in diverged), file=sys.stderr)
    left = [r for r in mine if run_status(r) not in ("done", "diverged")]
    if args.skip_busy and left:
        print(f"plr benchmark: {len(left)} run(s) left to other processes: "
              + ", ".join(f"{r.name} on {r.dataset}" for r in left))
        return 3
    return 0


def cmd_tune(args) -> int:
    from . import config as config_mod
    from .tuning import check_space, format_best, load_space, tune

    cfg = config_mod.resolve(args.model, args.config, list(args.set or []), args.data)
    space = load_space(args.space)  # a SpaceError is a one-line user error
    check_space(cfg, space)
    dataset = load_dataset(cfg["data"])
    print(f"plr tune: {args.model} on {dataset.name}, {args.trials} trials on validation {cfg['eval']['metric']} "
          f"-> {args.out}")
    best = tune(cfg, dataset, space, args.out, args.trials, add_from=args.add_trials or ())
    for line in format_best(best, cfg["eval"]["metric"], Path(args.out)):
        print(line)
    return 0


def cmd_data_stats(args) -> int:
    from .data import dataset_stats, format_stats

    print(format_stats(dataset_stats(args.path)))
    return 0


def cmd_data_download(args) -> int:
    from .data import download_amazon2023

    if args.source != "amazon2023":
        raise UserError(f"source: expected amazon2023, got {args.source!r}")
    for path in download_amazon2023(args.category, args.dest, force=args.force):
        print(path)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        return run_demo(args, Path(args.out) if args.out else Path(tmp))


# -- parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .registry import BACKBONES, MODELS

    parser = argparse.ArgumentParser(prog="plr", description="Parallel Latent Reasoning for sequential recommendation")
    parser.add_argument("--version", action="version", version=f"plr {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors (also accepted after the command)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train SASRec and PLR on embedded synthetic data and compare them")
    demo.add_argument("--users", type=int, default=2000)
    demo.add_argument("--items", type=int, default=500)
    demo.add_argument("--epochs", type=int, default=5)
    demo.add_argument("--hidden", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", help="keep the two run directories here")
    demo.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                      help="override a value of PLR's config (SASRec runs as shipped), e.g. model.rcl_weight=1")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train a model on an interaction log")
    train.add_argument("--model", required=True, help=" | ".join(MODELS))
    train.add_argument("--backbone", help=f"sequence encoder: {' | '.join(BACKBONES)} (default: the config's)")
    train.add_argument("--data", help="dataset file or folder (see plr data stats)")
    train.add_argument("--config", help="YAML config merged over the model's shipped defaults")
    train.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    train.add_argument("--out", help="run directory (default runs/<model>-<data>-<time>)")
    train.add_argument("--resume", action="store_true", help="continue the training state in --out")
    train.add_argument("--no-test", action="store_true",
                       help="never read the test split: early stopping and the report on validation only "
                            "(diagnosis and hand tuning; metrics.json then has \"test\": null)")
    train.add_argument("--phase", choices=["both", "spt", "rpt"],
                       help="lares only (= --set model.phase=...): both = SPT then RPT in one run "
                            "(RUN/spt, RUN/rpt; default), spt = self-supervised pre-training only, "
                            "rpt = GRPO post-training only, from --init")
    train.add_argument("--init", metavar="CHECKPOINT",
                       help="lares --phase rpt (= --set model.init_from=...): the SPT model to start "
                            "from and to keep as the frozen KL reference, e.g. SPT_RUN/best.pt")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="full-ranking metrics of a checkpoint")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", required=True)
    ev.add_argument("--split", choices=["test", "valid"], default="test")
    ev.add_argument("--exclude-history", action="store_true", help="mask the history items (not the paper protocol)")
    ev.add_argument("--ties", choices=["optimistic", "pessimistic"], default="optimistic")
    ev.add_argument("--readout", choices=["final", "rea", "h0"], default=None,
                    help="PLR: score with z_final = h_0 + z_rea (Eq. 10), z_rea or h_0 instead of the "
                         "checkpoint's readout")
    ev.set_defaults(func=cmd_evaluate)

    rec = sub.add_parser("recommend", help="top-K items for a history")
    rec.add_argument("--checkpoint", required=True)
    rec.add_argument("--history", required=True, help='item ids, oldest first, e.g. "12 55 7"')
    rec.add_argument("--k", type=int, default=10)
    rec.add_argument("--exclude-history", action="store_true")
    rec.add_argument("--internal-ids", action="store_true", help="ids are the model's 1..num_items, not raw ids")
    rec.set_defaults(func=cmd_recommend)

    srv = sub.add_parser("serve", help="serve a checkpoint over HTTP (POST /recommend), micro-batched")
    srv.add_argument("--checkpoint", required=True)
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    srv.add_argument("--port", type=int, default=8000, help="0 = any free port (printed)")
    srv.add_argument("--max-batch", type=int, default=64, help="most requests per forward (1 = no batching)")
    srv.add_argument("--max-wait-ms", type=float, default=2.0, help="longest a batch waits for more requests")
    srv.add_argument("--batch-wait", choices=("adaptive", "always"), default="adaptive",
                     help="adaptive: a batch waits only while concurrent clients are seen (a lone client "
                          "is answered at once); always: every batch waits up to --max-wait-ms")
    srv.add_argument("--threads", type=int, default=None,
                     help="the model's intra-op threads (default: all cores but one, kept for the HTTP loop)")
    srv.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    srv.set_defaults(func=cmd_serve)

    cmp_ = sub.add_parser("compare", help="paired t-test between the per-user test metrics of two runs")
    cmp_.add_argument("run_a")
    cmp_.add_argument("run_b")
    cmp_.add_argument("--metric", default="ndcg@10")
    cmp_.set_defaults(func=cmd_compare)

    bench = sub.add_parser("benchmark", help="run a suite of (model, dataset, config) runs and write the table")
    bench.add_argument("suite", help="suite YAML (see plr.benchmark)")
    bench.add_argument("--only", nargs="+", action="extend", metavar="RUN", help="run only these runs of the suite")
    bench.add_argument("--out", help="put the run directories and the report here instead of the suite's out")
    bench.add_argument("--skip-busy", action="store_true",
                       help="leave a run that another process is training to it (exit code 3 if any is left), so "
                            "that several processes share a suite")
    mode = bench.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="check the suite and list its runs, train nothing")
    mode.add_argument("--report", action="store_true", help="rewrite the report from the finished runs only")
    bench.set_defaults(func=cmd_benchmark)

    from .analysis.commands import add_analyze_parser

    add_analyze_parser(sub)

    tn = sub.add_parser("tune", help="hyperparameter search on the validation split (Optuna)")
    tn.add_argument("--model", required=True, help=" | ".join(MODELS))
    tn.add_argument("--data", help="dataset file or folder")
    tn.add_argument("--space", required=True, help="search space YAML (see plr.tuning)")
    tn.add_argument("--trials", type=int, required=True, help="finished trials in total (a resumed study counts "
                                                              "the earlier ones)")
    tn.add_argument("--out", required=True, help="study directory (resumable)")
    tn.add_argument("--config", help="YAML config merged over the model's shipped defaults")
    tn.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    tn.add_argument("--add-trials", action="append", metavar="DIR",
                    help="finished trials of an earlier search of this space (run directories, or a folder of them, "
                         "e.g. its committed records) added to the study before searching")
    tn.set_defaults(func=cmd_tune)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    st = data.add_parser("stats", help="users, items, interactions, sparsity, lengths")
    st.add_argument("path")
    st.set_defaults(func=cmd_data_stats)
    dl = data.add_parser("download", help="fetch a public benchmark")
    dl.add_argument("source", help="amazon2023")
    dl.add_argument("--category", required=True)
    dl.add_argument("--dest", required=True)
    dl.add_argument("--force", action="store_true")
    dl.set_defaults(func=cmd_data_download)
    return parser


# Commands that train: SIGTERM stops them as Ctrl-C does (training state saved in last.pt).
STOPPABLE = ("train", "tune", "benchmark", "demo")


@contextlib.contextmanager
def stop_on_sigterm(active: bool = True):
    """While active, SIGTERM (``kill PID``, a scheduler's or a session's stop) raises
    KeyboardInterrupt, so a training stops with its state saved as on Ctrl-C. A background
    job started from a script ignores SIGINT (POSIX shells do that for ``cmd &``), so SIGTERM
    is the way to stop it gracefully; a second SIGTERM kills at once. The previous handler
    comes back on exit (main() also runs inside other programs, e.g. the tests)."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; user errors print one line and return 2 (plr.errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    from .distributed import check_command
    from .guards import TrainingDiverged

    try:
        check_command(args.command)  # only plr train runs under torchrun
        with stop_on_sigterm(args.command in STOPPABLE):
            return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        run_dir = getattr(args, "run_dir", None)
        if args.command == "train" and run_dir is not None and (Path(run_dir) / "last.pt").is_file():
            again = [a for a in argv if a != "--resume"]
            if "--out" not in again:
                again += ["--out", str(run_dir)]
            print(f"plr: interrupted — training state saved in {Path(run_dir) / 'last.pt'}; continue with: "
                  f"plr {' '.join(again)} --resume", file=sys.stderr)
        else:
            print("plr: interrupted", file=sys.stderr)
        return 130
    except (TrainingDiverged, *USER_ERRORS) as exc:
        if debug:
            raise
        text = one_line(exc)
        if isinstance(exc, TrainingDiverged) and getattr(args, "run_dir", None) is not None:
            text += f" (last good state in {Path(args.run_dir) / 'last.pt'}, best.pt untouched)"
        print(f"plr: error: {text}", file=sys.stderr)
        if not isinstance(exc, (UserError, TrainingDiverged)):
            print("plr: (run with --debug for the traceback)", file=sys.stderr)
        return 2
    # Anything else is an internal error (a bug): Python prints its traceback.


if __name__ == "__main__":
    sys.exit(main())
