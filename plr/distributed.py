"""Multi-process training: ``torchrun --nproc-per-node N -m plr train ...``.

Each process (rank) holds a replica of the model, wrapped in
``torch.nn.parallel.DistributedDataParallel`` (gloo on the CPU, nccl on CUDA,
one GPU per process: ``cuda:LOCAL_RANK``). What the trainer (plr.training)
does with it:

* ``train.batch_size`` is the *global* batch. Every rank draws the same epoch
  order (the seed does not depend on the rank) and takes its contiguous slice
  of each global batch (:meth:`Context.shard`), so the shards of one step are
  a partition of exactly the one-process batch.
* The loss of every model is a mean over its targets (prefix mode: the B
  samples; sequence mode: the R prefix ends). Ranks may hold different numbers
  of targets, so a plain average of per-rank means is not the global mean:
  each rank's loss is scaled by ``n_rank * world / n_total`` (one all_reduce of
  the target counts, :meth:`Context.global_mean`) before DDP averages the
  gradients, which makes the gradient that of the global mean
  ``sum_r n_r L_r / n_total``. That equals the one-process gradient on the
  concatenated batch for every loss that is a mean of per-target terms
  (L_NIP, the KL term of PLR Eq. 7, ...). The in-batch negatives of a
  contrastive term (PLR Eq. 8, ``plr.losses``) are taken within a rank's own
  shard: with ``rcl_weight > 0`` the gradient is the target-weighted mean of
  the per-shard losses, not the one-process loss of the whole batch.
* The loss values the guard checks (plr.guards) and the history logs are the
  global means, so every rank stops at the same step.
* Dropout: rank 0 keeps the one-process RNG stream, rank r > 0 is reseeded
  from ``(train.seed, r)``; ``last.pt`` holds every rank's RNG state, so a
  resumed run draws the same masks. It must be resumed with the same number
  of processes.
* Evaluation shards the users into contiguous blocks, one per rank, and
  gathers the per-user ranks back in the one-process order: the metrics are
  those of one process.
* Rank 0 alone writes checkpoints, the config, the log, ``metrics.json`` and
  the progress bar; the others wait at a barrier. The run directory must be on
  a file system every rank sees (one machine, or a shared file system).
  Ctrl-C does not save a state (the ranks stop at different points): ``last.pt``
  is the last periodic one (``train.save_every_steps``), resumed exactly.
* Only ``plr train`` runs as several processes; models that train in phases of
  their own (LARES) run as one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import UserError

ENV_HINT = "launch with torchrun --nproc-per-node N -m plr train ..."


def _env_int(name: str, default=None):
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise UserError(f"{name}: WORLD_SIZE={os.environ.get('WORLD_SIZE')} asks for several processes, "
                            f"but {name} is not set", ENV_HINT)
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{name}: expected an integer, got {raw!r}", ENV_HINT) from None


def world_size_from_env() -> int:
    """``WORLD_SIZE`` (1 when unset)."""
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise UserError(f"WORLD_SIZE: expected an integer >= 1, got {world}", ENV_HINT)
    return world


def check_command(command: str) -> None:
    """Only ``plr train`` runs as several processes."""
    if command != "train" and world_size_from_env() > 1:
        raise UserError(f"plr {command}: runs as one process, but WORLD_SIZE={os.environ['WORLD_SIZE']}",
                        "only plr train runs under torchrun; run the others without it")


def setup(device_name: str) -> "Context":
    """Join the process group that ``torchrun`` describes in the environment
    (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)
    for training on ``train.device = device_name``: gloo for the CPU, nccl for
    CUDA (each process on ``cuda:LOCAL_RANK``). One process: nothing to join."""
    world = world_size_from_env()
    if world == 1 or dist.is_initialized():
        return current()
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise UserError(f"RANK: expected an integer in [0, {world - 1}] (WORLD_SIZE={world}), got {rank}", ENV_HINT)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise UserError(f"{name}: WORLD_SIZE={world} asks for several processes, but {name} is not set",
                            ENV_HINT)
    if not dist.is_available():
        raise UserError(f"WORLD_SIZE={world}: this torch build has no torch.distributed",
                        "install a torch build with distributed support, or run one process")
    from .training import resolve_device

    device = resolve_device(device_name)
    if device.type == "cuda":
        if device.index is not None:
            raise UserError(f"train.device: with several processes each one uses cuda:LOCAL_RANK, got {device_name!r}",
                            "set train.device=auto or cuda (choose GPUs with CUDA_VISIBLE_DEVICES)")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK: process {local_rank} of this machine needs cuda:{local_rank}, but torch "
                            f"sees {torch.cuda.device_count()} CUDA device(s)",
                            "start at most one process per GPU (--nproc-per-node)")
        if not dist.is_nccl_available():
            raise UserError(f"train.device: {device_name!r} with WORLD_SIZE={world} needs the nccl backend, which "
                            "this torch build lacks", "set train.device=cpu (gloo) or install a CUDA torch build")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        if not dist.is_gloo_available():
            raise UserError(f"train.device: 'cpu' with WORLD_SIZE={world} needs the gloo backend, which this torch "
                            "build lacks", "install a torch build with gloo, or run one process")
        backend = "gloo"
    dist.init_process_group(backend, init_method="env://", world_size=world, rank=rank,
                            timeout=timedelta(minutes=30))
    return current()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> "Context":
    """The process group this process trains in (one process when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Context()
    return Context(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)),
                   dist.get_backend())


def split_bounds(n: int, world: int) -> List[int]:
    """Boundaries of ``world`` contiguous blocks of ``n`` items, sizes differing by at most one."""
    return [n * r // world for r in range(world + 1)]


class _LossForward(nn.Module):
    """DDP all-reduces the gradients of what its ``forward`` computed; the
    trainer's losses are methods of the model (``sequence_loss``,
    ``compute_loss``, maybe compiled), so this module's forward calls them."""

    def __init__(self, model: nn.Module, losses: Sequence[Callable]):
        super().__init__()
        self.model = model
        self._losses = list(losses)

    def forward(self, which: int, *args):
        return self._losses[which](*args)


@dataclass(frozen=True)
class Context:
    """This process's place in the group: ``world_size`` processes, this one ``rank``."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str = ""

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run directory (rank 0)."""
        return self.rank == 0

    def comm_device(self, device: torch.device) -> torch.device:
        return device if self.backend == "nccl" else torch.device("cpu")

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: ``cuda:LOCAL_RANK`` for CUDA with several processes."""
        return torch.device("cuda", self.local_rank) if self.active and device.type == "cuda" else device

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise UserError(f"train.batch_size: is the global batch, split evenly over the {self.world_size} "
                            f"processes (WORLD_SIZE); expected a multiple of {self.world_size}, got {batch_size}",
                            f"e.g. --set train.batch_size={max(1, batch_size // self.world_size) * self.world_size}")

    def seed_dropout(self, seed: int) -> None:
        """Rank 0 keeps the one-process RNG stream; rank r > 0 draws its own dropout masks from ``(seed, r)``."""
        if self.rank > 0:
            torch.manual_seed(seed * 1_000_003 + 7919 * self.rank)

    def shard(self, idx: torch.Tensor) -> Tuple[torch.Tensor, bool]:
        """This rank's contiguous slice of the global batch ``idx`` and whether it
        holds any of it. A rank left without samples (a last batch smaller than
        the world) computes the loss of the batch's first sample with weight 0,
        since every rank must take part in the backward pass."""
        if not self.active:
            return idx, True
        bounds = split_bounds(len(idx), self.world_size)
        part = idx[bounds[self.rank]:bounds[self.rank + 1]]
        return (part, True) if len(part) else (idx[:1], False)

    def wrap_losses(self, model: nn.Module, *losses: Callable) -> Tuple[Callable, ...]:
        """``losses`` (functions of the model's parameters) called through one
        DistributedDataParallel module, so that their backward all-reduces (means)
        the gradients over the ranks; unchanged with one process."""
        if not self.active:
            return losses
        ddp = nn.parallel.DistributedDataParallel(
            _LossForward(model, losses), device_ids=[self.local_rank] if self.backend == "nccl" else None,
            static_graph=True)  # the same parameters take part in every step (found once, not every step)
        return tuple((lambda *args, _i=i: ddp(_i, *args)) for i in range(len(losses)))

    def global_mean(self, loss: torch.Tensor, parts: Dict[str, torch.Tensor], n: int
                    ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor], int]:
        """``(global loss, loss to backpropagate, global parts, global n)`` of one
        step from this rank's ``loss`` and ``parts`` (means over its ``n`` targets):
        the global values are the means over all ranks' targets (one all_reduce),
        and the loss to backpropagate is ``loss * n * world / n_total``, whose DDP
        gradient average is the gradient of the global mean."""
        if not self.active:
            return loss, loss, parts, n
        keys = list(parts)
        values = torch.stack([loss.detach(), *(parts[k].detach() for k in keys)]).to(torch.float64)
        stats = torch.cat([torch.tensor([float(n)], dtype=torch.float64, device=values.device), values * n])
        stats = stats.to(self.comm_device(loss.device))
        dist.all_reduce(stats)
        total = int(round(float(stats[0])))
        means = stats[1:] / total
        scaled = loss * (n * self.world_size / total)
        return means[0], scaled, {k: means[i + 1] for i, k in enumerate(keys)}, total

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather_objects(self, obj: Any) -> List[Any]:
        """``obj`` of every rank, in rank order (``[obj]`` with one process)."""
        if not self.active:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def evaluate(self, model, samples, **kwargs):
        """``plr.evaluation.evaluate`` with the users sharded over the ranks: each
        rank ranks a contiguous block, the ranks are gathered back into the
        one-process order, and the metrics come from all of them."""
        from .evaluation import EvalResult, NonFiniteScores, evaluate, metrics_from_ranks, rank_targets

        if not self.active:
            return evaluate(model, samples, **kwargs)
        ks = kwargs.pop("ks", (5, 10, 20, 50))
        bounds = split_bounds(len(samples), self.world_size)
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        failure = None
        try:
            ranks = rank_targets(model, samples.item_seq[lo:hi], samples.target[lo:hi], **kwargs)
        except NonFiniteScores as exc:
            failure, ranks = str(exc), torch.empty(0, dtype=torch.int64)
        width = max(b - a for a, b in zip(bounds, bounds[1:]))
        comm = self.comm_device(model.device)
        mine = torch.full((width + 1,), -1, dtype=torch.int64, device=comm)
        mine[0] = int(failure is not None)  # slot 0: this rank's scores were non-finite
        mine[1:1 + len(ranks)] = ranks.to(comm)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        failed = [r for r, g in enumerate(gathered) if int(g[0])]
        if failed:
            raise NonFiniteScores(failure or f"{kwargs.get('desc', 'evaluate')}: the model's scores are non-finite "
                                             f"(NaN or inf) on rank(s) {failed}; the model has diverged")
        merged = torch.cat([g[1:1 + b - a].cpu() for g, a, b in zip(gathered, bounds, bounds[1:])]).numpy()
        return EvalResult(metrics_from_ranks(merged, ks), np.asarray(samples.user), merged)
