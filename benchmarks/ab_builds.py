"""Training-step time of two checkouts (two builds of plr_kernels), side by side.

For a kernel change, the one figure that matters is the time of a real
training step before and after it. This runs the same steps with checkout A
and checkout B, each imported from its own tree with its own compiled
``plr_kernels._C`` (a checkout without a build of its own is refused),
alternating A and B for ``--rounds`` rounds: each round a fresh process per
checkout times ``--steps`` steps of ``Trainer.train_step`` after ``--warmup``
untimed ones (same config, same data, same seed), so machine load drifts hit
both alike. It prints the median step time of each, per model configuration,
and the ratio A / B.

    python benchmarks/ab_builds.py --a ../old-checkout --b . \\
        --data ../shared/data/amazon2014-beauty_seqrecbench \\
        --model sasrec --model "plr model.num_streams=4 model.num_steps=5"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# Run inside each checkout: time the steps, print one JSON line.
CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from plr_kernels import _extension
from plr import config
from plr.data import load_dataset
from plr.training import Trainer
model, data, steps, warmup, sets = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
cfg = config.resolve(model, None, sets, data)
trainer = Trainer(cfg, load_dataset(cfg["data"]), "/tmp/ab-builds-unused", log_to_console=False)
order, bs = trainer.epoch_order(0), cfg["train"]["batch_size"]
times = []
for i in range(warmup + steps):
    started = time.perf_counter()
    trainer.train_step(order[i * bs:(i + 1) * bs])
    if i >= warmup:
        times.append(time.perf_counter() - started)
ext = _extension.extension()
print(json.dumps({"kernels": ext.__file__ if ext is not None else _extension.extension_error(), "times": times}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="checkout A (the baseline)")
    parser.add_argument("--b", required=True, help="checkout B (the change)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", action="append", required=True,
                        help='a model name, optionally followed by config keys: "plr model.num_streams=4"')
    parser.add_argument("--set", action="append", default=["model.hidden_size=64", "model.inner_size=128",
                                                           "data.max_len=20", "train.batch_size=256",
                                                           "train.progress=false"],
                        help="config keys for every model (default: the converged protocol's size)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    results = {}
    for spec in args.model:
        model, *keys = spec.split()
        for _ in range(args.rounds):
            for name, tree in (("A", args.a), ("B", args.b)):
                env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "OMP_NUM_THREADS": "1"}
                out = subprocess.run([sys.executable, "-c", CHILD, model, str(Path(args.data).resolve()),
                                      str(args.steps), str(args.warmup), *args.set, *keys],
                                     env=env, cwd=tree, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"checkout {name} ({tree}) failed on {spec!r}:\n{out.stderr[-2000:]}")
                line = json.loads(out.stdout.strip().splitlines()[-1])
                if not Path(line["kernels"]).resolve().is_relative_to(Path(tree).resolve()):
                    raise SystemExit(f"checkout {name}: plr_kernels._C came from {line['kernels']!r}, not from "
                                     f"{tree} (build it there: python setup.py build_ext --inplace)")
                results.setdefault(spec, {}).setdefault(name, []).extend(line["times"])
        a, b = (statistics.median(results[spec][k]) for k in ("A", "B"))
        print(f"{spec}: A {a * 1e3:.1f} ms/step, B {b * 1e3:.1f} ms/step, A/B {a / b:.2f} "
              f"({len(results[spec]['A'])} steps each, {args.rounds} rounds interleaved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
