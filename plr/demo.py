"""``plr demo``: SASRec vs PLR on a seeded synthetic multi-interest log.

The generator (``synthetic_histories``): the catalogue is cut into
``num_interests`` clusters of consecutive item ids. Each user holds two
interests and a cursor in each. At every step the user stays with the current
interest with probability 0.8 (else switches to the other one); within an
interest the next item is the cursor's successor with probability 0.7 (the
cluster has an order, like episodes of a series) and a uniformly random item
of the cluster otherwise. So a good model must track *which* of two interests
is active and where the user is in it -- the multi-interest structure that
parallel reasoning streams are meant to capture. Lengths are uniform in
[min_len, max_len].
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List

import numpy as np


def synthetic_histories(num_users: int, num_items: int, num_interests: int = 10, min_len: int = 8,
                        max_len: int = 30, seed: int = 0) -> List[List[int]]:
    """Item-id sequences (ids 1..num_items), one per user; see the module doc."""
    if num_items < num_interests:
        raise ValueError(f"num_items: expected at least num_interests={num_interests}, got {num_items}")
    rng = np.random.default_rng(seed)
    size = num_items // num_interests
    out = []
    for _ in range(num_users):
        interests = rng.choice(num_interests, size=2, replace=False)
        cursor = rng.integers(0, size, size=2)
        active = 0
        seq = []
        for _ in range(int(rng.integers(min_len, max_len + 1))):
            if rng.random() > 0.8:
                active = 1 - active
            if rng.random() < 0.7:
                cursor[active] = (cursor[active] + 1) % size
            else:
                cursor[active] = rng.integers(0, size)
            seq.append(1 + int(interests[active]) * size + int(cursor[active]))
        out.append(seq)
    return out


def write_sequences(histories: List[List[int]], path: Path) -> None:
    """``user i1 i2 ...`` lines, the format ``plr.data`` reads as "sequences"."""
    with open(path, "w") as f:
        for user, seq in enumerate(histories, start=1):
            f.write(f"{user} " + " ".join(map(str, seq)) + "\n")


def run_demo(args, out_dir: Path) -> int:
    from . import config as config_mod
    from .data import load_dataset
    from .reporting import format_table
    from .significance import compare_runs
    from .training import train_run

    out_dir.mkdir(parents=True, exist_ok=True)
    data_path = out_dir / "synthetic.txt"
    write_sequences(synthetic_histories(args.users, args.items, seed=args.seed), data_path)
    overrides = [f"model.hidden_size={args.hidden}", f"model.inner_size={2 * args.hidden}", "model.dropout=0.2",
                 "data.max_len=30", "data.format=sequences", f"train.epochs={args.epochs}", "train.batch_size=256",
                 f"train.patience={args.epochs}", f"train.seed={args.seed}", "train.progress=true"]
    dataset = load_dataset(config_mod.resolve("sasrec", None, overrides, str(data_path))["data"])
    print(f"plr demo: {dataset.num_users} synthetic users, {dataset.num_items} items, "
          f"{len(dataset.train)} training samples (leave-one-out, full ranking)")
    rows, runs = [], {}
    plr_overrides = list(getattr(args, "set", None) or [])  # --set: PLR's config only
    for name in ("sasrec", "plr"):
        cfg = config_mod.resolve(name, None, overrides + (plr_overrides if name == "plr" else []), str(data_path))
        label = "SASRec"
        if name == "plr":
            label = f"PLR (M={cfg['model']['num_streams']}, T={cfg['model']['num_steps']})"
            if plr_overrides:
                label += " with " + ", ".join(plr_overrides)
        start = time.perf_counter()
        metrics = train_run(cfg, dataset, out_dir / name, log_to_console=False)
        runs[label] = out_dir / name
        rows.append({"model": label, **{k: metrics["test"][k] for k in ("recall@10", "ndcg@10", "recall@20",
                                                                         "ndcg@20")},
                     "best epoch": metrics["best_epoch"], "seconds": round(time.perf_counter() - start, 1)})
    print(format_table(rows, list(rows[0])))
    res = compare_runs(*runs.values(), metric="ndcg@10")
    print(f"PLR - SASRec, test NDCG@10: {res.diff:+.4f} (paired t-test over {res.users} users: "
          f"t = {res.t:.2f}, p = {res.p:.2g})")
    return 0
