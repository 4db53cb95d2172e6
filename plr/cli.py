"""The ``plr`` command line (DESIGN.md section 8).

    plr demo
    plr train --model plr --data PATH [--config CFG.yaml] [--set key=value ...] [--out RUN_DIR] [--resume]
    plr train --model lares --data PATH [--phase both|spt|rpt] [--init SPT_RUN/best.pt] ...
    plr evaluate --checkpoint RUN_DIR/best.pt --data PATH [--split test|valid] [--exclude-history]
    plr recommend --checkpoint RUN_DIR/best.pt --history "12 55 7" [--k 10]
    plr compare RUN_A RUN_B [--metric ndcg@10]
    plr serve --checkpoint RUN_DIR/best.pt [--host 127.0.0.1] [--port 8000] [--max-batch 64] [--max-wait-ms 2]
    plr data stats PATH
    plr data download amazon2023 --category Video_Games --dest DIR
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from . import __version__


def _load_dataset(data_cfg: dict):
    from .data import build_dataset, read_interactions

    if not data_cfg.get("path"):
        raise SystemExit("plr: --data PATH is required (or data.path in the config)")
    inter = read_interactions(data_cfg["path"], fmt=data_cfg.get("format", "auto"))
    return build_dataset(inter, max_len=data_cfg["max_len"], split=data_cfg["split"],
                         min_rating=data_cfg.get("min_rating"), k_core=data_cfg.get("k_core"),
                         split_time=data_cfg.get("split_time"))


def format_table(rows: List[dict], columns: List[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


# -- commands ------------------------------------------------------------------------


def cmd_train(args) -> int:
    from . import config as config_mod
    from .training import train_run

    if args.resume and not args.out:
        raise SystemExit("plr train: --resume needs --out RUN_DIR (the run to continue)")
    overrides = list(args.set or [])
    if args.backbone:
        overrides.insert(0, f"model.backbone={args.backbone}")
    if args.phase or args.init:
        from .models import model_class

        if getattr(model_class(args.model), "run_training", None) is None:
            raise SystemExit(f"plr train: --phase/--init apply to models trained in phases (lares), "
                             f"not to --model {args.model}")
        overrides[:0] = ([f"model.phase={args.phase}"] if args.phase else []) + \
            ([f"model.init_from={args.init}"] if args.init else [])
    cfg = config_mod.resolve(args.model, args.config, overrides, args.data)
    dataset = _load_dataset(cfg["data"])
    out = Path(args.out or f"runs/{cfg['model']['name']}-{dataset.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"plr train: {cfg['model']['name']} on {dataset.name} -> {out}")
    metrics = train_run(cfg, dataset, out, resume=args.resume)
    print(format_table([{"split": s, **metrics[s]} for s in ("valid", "test")],
                       ["split"] + list(metrics["test"])))
    return 0


def _checkpoint(path: str):
    from .models import SequentialRecommender

    return SequentialRecommender.load_with_extra(path)


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate

    model, extra = _checkpoint(args.checkpoint)
    run_cfg = extra.get("run_config") or {}
    data_cfg = dict(run_cfg.get("data") or {"max_len": model.max_len, "split": "loo"})
    data_cfg["path"] = args.data
    dataset = _load_dataset(data_cfg)
    saved_ids = extra.get("item_raw_ids")
    now_ids = [None if r is None else str(r) for r in dataset.item_raw_ids]
    if saved_ids is not None and saved_ids != now_ids:
        raise SystemExit(f"plr evaluate: the items of {args.data} differ from those the checkpoint was trained on")
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
        raise SystemExit("plr recommend: --history needs at least one item id")
    try:
        ids = catalog.to_internal(tokens)
    except UnknownItemsError as e:
        raise SystemExit(f"plr recommend: --history has item ids unknown to the checkpoint: {e.missing[:5]}")
    seq = torch.tensor([ids[-model.max_len:]], dtype=torch.long)
    scores, items = model.recommend(seq, k=args.k, exclude_history=args.exclude_history)
    raw, values, titles = catalog.describe(scores[0].tolist(), items[0].tolist())
    rows = [{"rank": rank, "item": item, "score": score, "title": title}
            for rank, (item, score, title) in enumerate(zip(raw, values, titles), start=1)]
    print(format_table(rows, ["rank", "item", "score", "title"]))
    return 0


def cmd_serve(args) -> int:
    from .serving.app import serve  # plr/serving/app.py (FastAPI + uvicorn: pip install ".[serve]")

    return serve(args.checkpoint, host=args.host, port=args.port, max_batch=args.max_batch,
                 max_wait_ms=args.max_wait_ms, device=args.device)


def cmd_compare(args) -> int:
    import numpy as np
    from scipy import stats

    from .evaluation import per_user_metric
    from .training import load_ranks

    a, b = load_ranks(Path(args.run_a) / "test_ranks.csv"), load_ranks(Path(args.run_b) / "test_ranks.csv")
    users = sorted(set(a) & set(b))
    if len(users) < 2:
        raise SystemExit("plr compare: the runs share fewer than two test users")
    ma = per_user_metric(np.array([a[u] for u in users]), args.metric)
    mb = per_user_metric(np.array([b[u] for u in users]), args.metric)
    t, p = stats.ttest_rel(mb, ma)
    rel = (mb.mean() - ma.mean()) / ma.mean() * 100 if ma.mean() > 0 else float("nan")
    print(format_table([{"run": args.run_a, args.metric: float(ma.mean())},
                        {"run": args.run_b, args.metric: float(mb.mean())}], ["run", args.metric]))
    print(f"paired t-test over {len(users)} users: B - A = {mb.mean() - ma.mean():+.4f} ({rel:+.1f}%), "
          f"t = {t:.3f}, p = {p:.3g}")
    return 0


def cmd_data_stats(args) -> int:
    from .data import dataset_stats, format_stats

    print(format_stats(dataset_stats(args.path)))
    return 0


def cmd_data_download(args) -> int:
    from .data import download_amazon2023

    if args.source != "amazon2023":
        raise SystemExit(f"plr data download: expected source amazon2023, got {args.source!r}")
    for path in download_amazon2023(args.category, args.dest, force=args.force):
        print(path)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        return run_demo(args, Path(args.out) if args.out else Path(tmp))


# -- parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .backbones import BACKBONES
    from .models import MODELS

    parser = argparse.ArgumentParser(prog="plr", description="Parallel Latent Reasoning for sequential recommendation")
    parser.add_argument("--version", action="version", version=f"plr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train SASRec and PLR on embedded synthetic data and compare them")
    demo.add_argument("--users", type=int, default=2000)
    demo.add_argument("--items", type=int, default=500)
    demo.add_argument("--epochs", type=int, default=5)
    demo.add_argument("--hidden", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", help="keep the two run directories here")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train a model on an interaction log")
    train.add_argument("--model", required=True, help=" | ".join(MODELS))
    train.add_argument("--backbone", help=f"sequence encoder: {' | '.join(BACKBONES)} (default: the config's)")
    train.add_argument("--data", help="dataset file or folder (see plr data stats)")
    train.add_argument("--config", help="YAML config merged over the model's shipped defaults")
    train.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    train.add_argument("--out", help="run directory (default runs/<model>-<data>-<time>)")
    train.add_argument("--resume", action="store_true", help="continue the training state in --out")
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
    srv.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    srv.set_defaults(func=cmd_serve)

    cmp_ = sub.add_parser("compare", help="paired t-test between the per-user test metrics of two runs")
    cmp_.add_argument("run_a")
    cmp_.add_argument("run_b")
    cmp_.add_argument("--metric", default="ndcg@10")
    cmp_.set_defaults(func=cmd_compare)

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


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
