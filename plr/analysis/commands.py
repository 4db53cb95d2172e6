"""The ``plr analyze KIND ...`` subcommands (added to the parser of plr.cli)."""

from __future__ import annotations



def _report(output) -> int:
    print(f"plr analyze {output.kind}: wrote {len(output.files)} files to {output.dir} "
          f"(summary: {output.dir / 'SUMMARY.md'})")
    return 0


def cmd_analyze(args) -> int:
    kind = args.kind
    if kind == "ablation":
        from .ablation import run_ablation

        return _report(run_ablation(args.out, run=args.run, config_file=args.config, overrides=args.set or [],
                                    data=args.data))
    if kind == "sensitivity":
        from .sensitivity import run_sensitivity

        return _report(run_sensitivity(args.out, grid=args.vary, run=args.run, config_file=args.config,
                                       overrides=args.set or [], data=args.data))
    if kind == "robustness":
        from .robustness import run_robustness

        return _report(run_robustness(args.out, args.checkpoint, data=args.data, rates=args.rates, seed=args.seed,
                                      metric=args.metric, labels=args.labels))
    if kind == "ceiling":
        from .ceiling import run_ceiling

        return _report(run_ceiling(args.out, args.checkpoint, data=args.data, labels=args.labels))
    if kind == "attention":
        from .attention import run_attention

        return _report(run_attention(args.out, args.checkpoint, data=args.data, users=args.users,
                                     count=args.num_users, layer=args.layer))
    if kind == "groups":
        from .groups import run_groups

        return _report(run_groups(args.out, args.runs, data=args.data, metrics=args.metrics, bins=args.bins,
                                  labels=args.labels))
    if kind == "history":
        from .history import run_history

        return _report(run_history(args.out, args.checkpoint, data=args.data, split=args.split, metrics=args.metrics,
                                   seed=args.seed, labels=args.labels))
    from .efficiency import run_efficiency

    return _report(run_efficiency(args.out, args.checkpoint or (), like=args.like, models=args.models,
                                  batch_size=args.batch_size, repeats=args.repeats, labels=args.labels))


def add_analyze_parser(sub) -> None:
    """``plr analyze KIND``: one sub-parser per kind of plr.analysis."""
    analyze = sub.add_parser("analyze", help="the PLR paper's analyses: ablation, sensitivity, robustness, "
                                             "ceiling, attention, efficiency; groups, history (figures + tables)")
    kinds = analyze.add_subparsers(dest="kind", required=True)

    def common(p, help_out: str = "output directory (default runs/analysis/KIND-TIME)", labels: bool = False):
        p.add_argument("--out", help=help_out)
        if labels:
            p.add_argument("--labels", nargs="+", metavar="NAME",
                           help="a name per model in tables and figures (default: the run directories' names)")
        p.set_defaults(func=cmd_analyze)

    for kind, text in (("ablation", "Table 3: PLR vs w/o MoRS, w/o RCL, w/o KL, same protocol, paired t-tests"),
                       ("sensitivity", "Figure 2: NDCG@20 / Recall@20 against M, T, lambda, dropout")):
        p = kinds.add_parser(kind, help=text)
        p.add_argument("--run", help="base config: a trained PLR run directory (its config.yaml) or checkpoint")
        p.add_argument("--data", help="dataset (default: the --run's)")
        p.add_argument("--config", help="base config YAML over plr/configs/plr.yaml (instead of --run)")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a base config value")
        if kind == "sensitivity":
            p.add_argument("--vary", action="append", metavar="NAME=V1,V2,...",
                           help="a parameter (M, T, lambda, dropout) and its values; repeatable "
                                "(default: all four at the paper's ranges)")
        common(p, "output directory: suite.yaml, runs/, figures, SUMMARY.md (rerun to resume)")

    p = kinds.add_parser("robustness", help="Figure 3: NDCG@20 when a share of every test history is dropped")
    p.add_argument("--checkpoint", nargs="+", required=True, help="run directories or checkpoints")
    p.add_argument("--data", help="dataset (default: each run's)")
    p.add_argument("--rates", nargs="+", type=float, default=[0.1, 0.2, 0.3], help="drop rates (0 is added)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dropped items")
    p.add_argument("--metric", default="ndcg@20")
    common(p, labels=True)

    p = kinds.add_parser("ceiling", help="Figure 4: best reasoning state per user (oracle) vs the model")
    p.add_argument("--checkpoint", nargs="+", required=True, help="PLR / ReaRec run directories or checkpoints")
    p.add_argument("--data", help="dataset (default: each run's)")
    common(p, labels=True)

    p = kinds.add_parser("attention", help="Figure 5: attention maps of the streams, gate weights")
    p.add_argument("--checkpoint", required=True, help="a PLR / ReaRec run directory or checkpoint")
    p.add_argument("--data", help="dataset (default: the run's)")
    p.add_argument("--users", nargs="+", metavar="USER", help="raw test user ids (default: the first --num-users)")
    p.add_argument("--num-users", type=int, default=3)
    p.add_argument("--layer", type=int, default=-1, help="layer shown (default: the last)")
    common(p)

    p = kinds.add_parser("groups", help="the paired test of finished runs per user group: history length, "
                                        "target popularity (the first run is the reference)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run directories (test_ranks.csv); the "
                                                              "first is the reference, e.g. SASRec")
    p.add_argument("--data", help="dataset (default: the runs')")
    p.add_argument("--metrics", nargs="+", default=["ndcg@10", "recall@20"], help="default: %(default)s")
    p.add_argument("--bins", type=int, default=4, help="quantile groups per grouping (default: %(default)s)")
    common(p, labels=True)

    p = kinds.add_parser("history", help="how often the top of the list is an item of the history, and the "
                                         "metrics with the history excluded (paired t-test)")
    p.add_argument("--checkpoint", nargs="+", required=True, help="run directories or checkpoints")
    p.add_argument("--data", help="dataset (default: each run's)")
    p.add_argument("--split", default="valid", choices=["valid", "test"],
                   help="split diagnosed (default: %(default)s, which leaves the test split unread)")
    p.add_argument("--metrics", nargs="+", default=["ndcg@10", "recall@20"], help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="seed of the training-mode (dropout) pass")
    common(p, labels=True)

    p = kinds.add_parser("efficiency", help="Table 4: FLOPs and latency per sample, relative cost")
    p.add_argument("--checkpoint", nargs="+", help="models to compare (run directories or checkpoints)")
    p.add_argument("--like", metavar="CHECKPOINT", help="build fresh --models at the size of this checkpoint")
    p.add_argument("--models", nargs="+", default=["sasrec", "erl", "plr"], help="with --like (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="histories per timed call")
    p.add_argument("--repeats", type=int, default=30, help="timed rounds")
    common(p, labels=True)


__all__ = ["add_analyze_parser", "cmd_analyze"]
