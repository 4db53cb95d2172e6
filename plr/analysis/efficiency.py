"""``plr analyze efficiency``: the PLR paper's Table 4.

For models of the same size (trained checkpoints, or fresh models of the
named kinds built at the size of one checkpoint with ``--like``):

* FLOPs per sample, counted by ``torch.utils.flop_counter.FlopCounterMode``
  over one inference pass (encoder, reasoning, aggregation) on histories of
  ``max_len`` real items, run with ``backend="torch"`` and the math SDPA so
  every matrix product is an aten op the counter sees; and with the scoring of the whole item
  table (``z E^T``) added. No hand counts.
* Inference latency per sample of ``model.recommend`` (top-10 over all items,
  the model's own kernels), timed in one process with the models interleaved
  round by round; the median per model and the ratio to the first model
  (SASRec, when present, is put first).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ..errors import UserError
from .common import Output, check_labels, load_checkpoint, pyplot, unique_label, with_backend

SIZE_KEYS = ("max_len", "hidden_size", "num_layers", "num_heads", "inner_size", "dropout", "attn_dropout",
             "layer_norm_eps", "temperature", "backend", "backbone", "backbone_args")


def like_models(checkpoint: str, names: Sequence[str]) -> List[Tuple[str, Any]]:
    """Fresh models ``names`` (plr.models.MODELS) at the size of ``checkpoint``
    (its item count and backbone keys; reasoning keys at each model's defaults,
    or the checkpoint's own for a model of its class)."""
    from ..models import MODELS, model_class

    base, _, _ = load_checkpoint(checkpoint, kind="efficiency")
    cfg = base.config()
    out = []
    for name in names:
        if name not in MODELS:
            raise UserError(f"--models: expected names among {sorted(MODELS)}, got {name!r}")
        cls = model_class(name)
        keys = dict(cfg) if cls is type(base) else {k: cfg[k] for k in SIZE_KEYS if k in cfg}
        keys.pop("num_items", None)
        torch.manual_seed(0)
        out.append((name, cls(base.num_items, **keys).eval()))
    return out


def histories(model, batch: int, seed: int = 0) -> torch.Tensor:
    """``[batch, max_len]`` random full-length histories (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.num_items + 1, (batch, model.max_len), generator=gen)


@torch.no_grad()
def flops_per_sample(model, batch: int = 8) -> Dict[str, float]:
    """``{"forward", "with_scoring"}``: FLOPs per sample of one inference pass
    (FlopCounterMode; the reference kernels, and the encoder's SDPA on its math
    backend -- the fused CPU SDPA is invisible to the counter -- so that each
    product is counted, the full N x N attention matrix as computed)."""
    ref = with_backend(model, "torch")
    seq = ref.prepare(histories(ref, batch))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
        z = ref.inference_vector(ref.forward_prepared(seq))
    with FlopCounterMode(display=False) as scoring:
        z @ ref.item_emb.T
    total = forward.get_total_flops()
    return {"forward": total / batch, "with_scoring": (total + scoring.get_total_flops()) / batch}


@torch.no_grad()
def latencies(models: Sequence[Any], batch: int, repeats: int, warmup: int = 3) -> List[List[float]]:
    """Seconds per call of ``model.recommend(k=10)`` for each model, interleaved round by round."""
    seqs = [histories(m, batch) for m in models]
    for _ in range(warmup):
        for m, s in zip(models, seqs):
            m.recommend(s, k=10)
    times: List[List[float]] = [[] for _ in models]
    for _ in tqdm(range(repeats), desc="latency", leave=False):
        for i, (m, s) in enumerate(zip(models, seqs)):
            start = time.perf_counter()
            m.recommend(s, k=10)
            times[i].append(time.perf_counter() - start)
    return times


def run_efficiency(out, checkpoints: Sequence[str] = (), *, like: Optional[str] = None,
                   models: Sequence[str] = ("sasrec", "erl", "plr"), batch_size: int = 64, repeats: int = 30,
                   flop_batch: int = 8, labels: Optional[Sequence[str]] = None) -> Output:
    """Writes ``efficiency.csv/json/png`` and ``SUMMARY.md``."""
    from ..reporting import markdown_table

    if bool(checkpoints) == (like is not None):
        raise UserError("efficiency: expected either --checkpoint CKPT... or --like CKPT --models NAME...",
                        "e.g. --like runs/plr/best.pt --models sasrec erl plr")
    for name, value in (("--batch-size", batch_size), ("--repeats", repeats)):
        if value < 1:
            raise UserError(f"{name}: expected an int >= 1, got {value}")
    if like is not None:
        entries = like_models(like, models)
        labels = check_labels(models, labels)
    else:
        labels = check_labels(checkpoints, labels)
        entries = []
        for path in checkpoints:
            model, _, label = load_checkpoint(path, kind="efficiency")
            entries.append((unique_label(label, {n for n, _ in entries}), model))
    if labels:
        entries = [(label, model) for label, (_, model) in zip(labels, entries)]
    sizes = {(m.backbone.__class__.__name__, m.max_len, m.item_emb.shape[1], len(m.backbone.layers))
             for _, m in entries}
    if len(sizes) > 1:
        raise UserError(f"efficiency: the models differ in size (backbone, max_len, hidden, layers): {sorted(sizes)}",
                        "compare models of the same size")
    entries.sort(key=lambda e: type(e[1]).__name__ != "SASRecModel")
    output = Output(out, "efficiency")
    flops = [flops_per_sample(m, flop_batch) for _, m in tqdm(entries, desc="flops", leave=False)]
    times = latencies([m for _, m in entries], batch_size, repeats)
    medians = [statistics.median(t) / batch_size for t in times]
    rows = []
    for (name, model), f, med, t in zip(entries, flops, medians, times):
        rows.append({"model": name, "class": type(model).__name__,
                     "M": getattr(model, "num_streams", 1 if hasattr(model, "num_steps") else 0),
                     "T": getattr(model, "num_steps", 0),
                     "params": sum(p.numel() for p in model.parameters()),
                     "MFLOPs/sample": f["forward"] / 1e6, "relative FLOPs": f["forward"] / flops[0]["forward"],
                     "MFLOPs/sample with scoring": f["with_scoring"] / 1e6,
                     "relative FLOPs with scoring": f["with_scoring"] / flops[0]["with_scoring"],
                     "latency ms/sample": med * 1e3, "relative latency": med / medians[0],
                     "latency IQR ms/sample": (statistics.quantiles(t, n=4)[2] - statistics.quantiles(t, n=4)[0])
                     / batch_size * 1e3 if len(t) >= 2 else 0.0})
    output.csv(rows, "efficiency")
    output.json({"batch_size": batch_size, "repeats": repeats, "flop_batch": flop_batch, "rows": rows,
                 "threads": torch.get_num_threads(), "torch": torch.__version__}, "efficiency")
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2))
    for ax, key, title in ((axes[0], "relative FLOPs", "FLOPs per sample"),
                           (axes[1], "relative latency", "latency per sample")):
        ax.bar([r["model"] for r in rows], [r[key] for r in rows])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{title} (relative to {rows[0]['model']})", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    output.figure(fig, "efficiency")
    m0 = entries[0][1]
    output.summary("Efficiency (PLR paper, Table 4)", [
        f"Same size: {m0.backbone.__class__.__name__}, d={m0.item_emb.shape[1]}, L={len(m0.backbone.layers)} "
        f"layers, max_len={m0.max_len}, {m0.num_items} items. FLOPs: torch.utils.flop_counter over one "
        f"inference pass on {flop_batch} full-length histories (reference kernels); latency: median of "
        f"{repeats} interleaved calls of recommend(k=10) on batches of {batch_size}, {torch.get_num_threads()} "
        "torch threads, one process.", "", markdown_table(rows, list(rows[0])), "", "![efficiency](efficiency.png)"])
    return output
