"""Training cost per epoch: SASRec and PLR, prefix vs sequence samples, eager
vs torch.compile, at two sizes, on Beauty, in one process and one run.

Time per epoch = (optimiser steps per epoch) x (median step time over
``--steps`` timed steps after ``--warmup`` untimed ones); a step is what
``plr.training.Trainer.train_step`` does (gather, forward + loss, backward,
Adam). Peak memory of one step: on the CPU the growth of the resident set's
high-water mark over the step (Linux ``/proc/self/clear_refs``), on CUDA
``max_memory_allocated`` above what was allocated before.
The configurations run interleaved (round-robin over the timed steps), so a
change in machine load hits all of them alike.

    python benchmarks/bench_training.py --data ../shared/data/amazon2014-beauty_seqrecbench
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import platform
import statistics
import time

import torch

from plr import config as config_mod
from plr.data import build_dataset, read_interactions
from plr.data.dataset import SequenceSamples
from plr.models import build_model

SIZES = {"d64": dict(hidden_size=64, max_len=20, batch_size=1024), "d256": dict(hidden_size=256, max_len=50,
                                                                               batch_size=256)}


class Config:
    def __init__(self, model, size, samples, compiled, precision, data, device):
        self.name = f"{model}/{size}/{samples}/{'compiled' if compiled else 'eager'}/{precision}"
        s = SIZES[size]
        model, _, overrides = model.partition(":")  # e.g. "plr:reg_rows=all;rcl_view=full"
        cfg = config_mod.shipped_config(model)["model"]
        cfg["hidden_size"] = s["hidden_size"]
        for item in filter(None, overrides.split(";")):
            key, _, value = item.partition("=")
            cfg[key] = config_mod.yaml_value(value)
        torch.manual_seed(0)
        self.model = build_model(cfg, data[size].num_items, s["max_len"]).to(device).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.samples = data[size].train if samples == "prefix" else SequenceSamples.from_prefix_samples(
            data[size].train)
        self.sequence = samples == "sequence"
        self.batch = s["batch_size"]
        self.steps_per_epoch = -(-len(self.samples) // self.batch)
        self.precision = precision
        self.device = device
        self.loss = self.model.sequence_loss if self.sequence else self.model.compute_loss
        if compiled:
            self.loss = torch.compile(self.loss, dynamic=True)
        self.order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(1))
        self.cursor = 0
        self.times = []

    def step(self):
        idx = self.order[self.cursor:self.cursor + self.batch]
        self.cursor = (self.cursor + self.batch) % max(1, len(self.samples) - self.batch)
        item_seq, target = self.samples.gather(idx)
        item_seq, target = item_seq.to(self.device), target.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            if self.sequence:
                loss, _ = self.loss(*self.model.prepare_sequences(item_seq, target))
            else:
                loss, _ = self.loss(item_seq, target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    def timed_step(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - t)

    def peak_memory(self) -> float:
        """MiB allocated at the high-water mark of one step, above what was live before it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.step()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        # CPU (Linux): the resident-set high-water mark over the step, reset before
        # it through /proc/self/clear_refs, minus the resident set before it.
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap memory back first
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        self.step()
        return (_status_kib("VmHWM") - before) / 1024


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--models", default="sasrec,plr",
                    help="comma-separated; a model may carry shipped-config overrides: 'plr:reg_rows=all;rcl_view=full'")
    ap.add_argument("--sizes", default="d64,d256")
    ap.add_argument("--samples", default="prefix,sequence")
    ap.add_argument("--exec", default="eager,compiled")
    ap.add_argument("--precision", default="fp32", help="fp32, bf16 or fp32,bf16")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    inter = read_interactions(args.data)
    sizes = args.sizes.split(",")
    data = {s: build_dataset(inter, max_len=SIZES[s]["max_len"]) for s in sizes}
    configs = [Config(m, s, smp, ex == "compiled", p, data, device) for m, s, smp, ex, p in itertools.product(
        args.models.split(","), sizes, args.samples.split(","), args.exec.split(","), args.precision.split(","))]
    started = time.perf_counter()
    for c in configs:  # warm-up (and compilation) first, untimed
        t = time.perf_counter()
        for _ in range(args.warmup):
            c.step()
        print(f"warm-up {c.name}: {time.perf_counter() - t:.1f} s", flush=True)
    for _ in range(args.steps):
        for c in configs:
            c.timed_step()
    rows = []
    for c in configs:
        med = statistics.median(c.times)
        rows.append(dict(config=c.name, steps_per_epoch=c.steps_per_epoch, median_step_s=round(med, 4),
                         epoch_s=round(med * c.steps_per_epoch, 1), peak_mib=round(c.peak_memory(), 1)))
        print(json.dumps(rows[-1]), flush=True)
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
               if device.type == "cpu" else torch.cuda.get_device_name(device))
    print(f"\nmachine: {machine}; torch {torch.__version__}; total {time.perf_counter() - started:.0f} s")
    print("\n| config | steps/epoch | median step (s) | epoch (s) | peak step memory (MiB) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['steps_per_epoch']} | {r['median_step_s']} | {r['epoch_s']} | {r['peak_mib']} |")
    by = {r["config"]: r["epoch_s"] for r in rows}
    print("\nratios (epoch time):")
    for key in by:
        model, size, samples, ex, p = key.split("/")
        if samples == "sequence" and f"{model}/{size}/prefix/{ex}/{p}" in by:
            print(f"  {model}/{size}/{ex}/{p}: prefix / sequence = {by[f'{model}/{size}/prefix/{ex}/{p}'] / by[key]:.2f}")
        if model != "sasrec" and f"sasrec/{size}/{samples}/{ex}/{p}" in by:
            print(f"  {size}/{samples}/{ex}/{p}: {model} / sasrec = {by[key] / by[f'sasrec/{size}/{samples}/{ex}/{p}']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
