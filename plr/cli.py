"""The ``plr`` command line.

``plr demo`` runs the whole pipeline on an embedded synthetic default: it
trains SASRec and PLR for a few steps, ranks held-out next items over the full
item table with ``plr_kernels.target_rank`` and prints top-K recommendations.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import List, Optional

import torch

import plr_kernels

from . import PLRModel, SASRecModel, __version__


def synthetic_histories(num_users: int, num_items: int, length: int, num_interests: int, seed: int):
    """Users mix ``num_interests`` item clusters; each next item stays in the
    current cluster with probability 0.8 and follows the cluster's item order
    (item i -> i + 1), so both short-term order and several interests matter.
    Returns ``[num_users, length + 1]`` ids in ``[1, num_items]``."""
    gen = torch.Generator().manual_seed(seed)
    cluster_size = num_items // num_interests
    seqs = torch.empty(num_users, length + 1, dtype=torch.long)
    own = torch.randint(0, num_interests, (num_users, 2), generator=gen)  # two interests per user
    current = own[:, 0].clone()
    pos = torch.randint(0, cluster_size, (num_users,), generator=gen)
    for t in range(length + 1):
        switch = torch.rand(num_users, generator=gen) > 0.8
        current = torch.where(switch, torch.where(current == own[:, 0], own[:, 1], own[:, 0]), current)
        jump = torch.rand(num_users, generator=gen) > 0.7
        pos = torch.where(jump, torch.randint(0, cluster_size, (num_users,), generator=gen), (pos + 1) % cluster_size)
        seqs[:, t] = 1 + current * cluster_size + pos
    return seqs


def run_demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    seqs = synthetic_histories(args.users, args.items, args.max_len, 4, args.seed)
    history, target = seqs[:, :-1], seqs[:, -1]
    split = int(0.9 * args.users)
    common = dict(max_len=args.max_len, hidden_size=args.hidden, num_layers=2, num_heads=2,
                  inner_size=args.hidden * 2, dropout=0.1)
    models = {"SASRec": SASRecModel(args.items, **common),
              "PLR (M=2, T=2)": PLRModel(args.items, num_streams=2, num_steps=2, **common)}
    print(f"plr {__version__} demo: {args.users} synthetic users, {args.items} items, "
          f"compiled kernels: {plr_kernels.extension_error() or 'loaded'}")
    print(f"{'model':<16}{'loss start':>12}{'loss end':>10}{'NDCG@10':>9}{'Recall@10':>11}{'seconds':>9}")
    for name, model in models.items():
        start = time.perf_counter()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        first = last = math.nan
        model.train()
        for step in range(args.steps):
            idx = torch.randint(0, split, (args.batch,))
            loss, _ = model.compute_loss(history[idx], target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = loss.item() if step == 0 else first
            last = loss.item()
        model.eval()
        with torch.no_grad():
            z = model(history[split:]).z_final
            ranks = plr_kernels.target_rank(z, model.item_emb, target[split:], exclude_index=0)
        hit = ranks <= 10
        ndcg = torch.where(hit, 1.0 / torch.log2(ranks.double() + 1), torch.zeros(())).mean().item()
        print(f"{name:<16}{first:>12.4f}{last:>10.4f}{ndcg:>9.4f}{hit.double().mean().item():>11.4f}"
              f"{time.perf_counter() - start:>9.1f}")
    _, ids = models["PLR (M=2, T=2)"].recommend(history[split:split + 1], k=10)
    print(f"PLR top-10 for held-out user {split}: {ids[0].tolist()} (true next item {int(target[split])})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plr", description="Parallel Latent Reasoning for sequential recommendation")
    parser.add_argument("--version", action="version", version=f"plr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train SASRec and PLR on embedded synthetic data and compare them")
    demo.add_argument("--users", type=int, default=2000)
    demo.add_argument("--items", type=int, default=400)
    demo.add_argument("--max-len", type=int, default=20)
    demo.add_argument("--hidden", type=int, default=32)
    demo.add_argument("--steps", type=int, default=150)
    demo.add_argument("--batch", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
