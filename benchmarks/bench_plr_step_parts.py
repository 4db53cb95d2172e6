"""What a sequence-mode PLR training step costs, part by part, against SASRec:
the same batch of sequences through SASRec and PLR variants that switch the
regularisers off or make them cheaper (``reg_rows``, ``rcl_view``), in one
process, interleaved, median step time (forward + loss + backward + Adam).

    python benchmarks/bench_plr_step_parts.py --data ../shared/data/amazon2014-beauty_seqrecbench
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from plr import config as config_mod
from plr.data import build_dataset, read_interactions
from plr.data.dataset import SequenceSamples
from plr.models import build_model

VARIANTS = {
    "sasrec": ("sasrec", {}),
    "plr (defaults)": ("plr", {}),
    "plr, old objective (reg_rows all, rcl_view full)": ("plr", {"reg_rows": "all", "rcl_view": "full"}),
    "plr, reg_rows all": ("plr", {"reg_rows": "all"}),
    "plr, rcl_view full": ("plr", {"rcl_view": "full"}),
    "plr, no L_RCL": ("plr", {"rcl_weight": 0}),
    "plr, no L_KL, no L_RCL": ("plr", {"rcl_weight": 0, "kl_weight": 0}),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256, help="sequences per step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = build_dataset(read_interactions(args.data), max_len=args.max_len)
    samples = SequenceSamples.from_prefix_samples(data.train)
    models = {}
    for name, (model, over) in VARIANTS.items():
        cfg = config_mod.shipped_config(model)["model"]
        cfg.update(hidden_size=args.hidden, inner_size=2 * args.hidden, **over)
        torch.manual_seed(0)
        m = build_model(cfg, data.num_items, args.max_len).train()
        models[name] = (m, torch.optim.Adam(m.parameters(), 1e-3))
    idx = torch.randperm(len(samples), generator=torch.Generator().manual_seed(1))[:args.batch]
    item_seq, target = samples.gather(idx)
    times = {k: [] for k in models}
    for rep in range(args.steps + 1):
        for name, (m, opt) in models.items():
            t = time.perf_counter()
            loss, _ = m.sequence_loss(*m.prepare_sequences(item_seq, target))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["sasrec"])
    print(f"d={args.hidden}, max_len {args.max_len}, {args.batch} sequences, {args.threads} thread(s)")
    print("| model | median step (s) | / SASRec |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {statistics.median(ts) / base:.2f} |")


if __name__ == "__main__":
    main()
