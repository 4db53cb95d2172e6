"""Training loop: Adam, early stopping on a validation metric, atomic and
resumable checkpoints, a run directory with the resolved config, a log,
``metrics.json`` and per-user test ranks.

Under ``torchrun`` every process runs a Trainer on its shard of each global
batch (plr.distributed: DDP, gradients of the global mean loss, sharded
evaluation, rank 0 writes the run directory).

Resumption is exact: the order of the training samples of epoch ``e`` comes
from a generator seeded with ``(seed, e)``, and ``last.pt`` holds the model,
the optimiser, torch's RNG state (dropout) and the position inside the epoch,
so a run killed at any point and resumed ends with the same weights and
metrics as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from tqdm.auto import tqdm

from . import config as config_mod
from . import distributed, guards
from .data import check_usable
from .deprecations import fill_legacy_model_values
from .errors import UserError
from .evaluation import target_in_history_share
from .run_lock import run_dir_lock
from .models import build_model, model_class
from .data.dataset import SequenceSamples
from .models.base import SequentialRecommender, atomic_torch_save

LAST = "last.pt"
BEST = "best.pt"
STATE_FORMAT = "plr-train-state-v1"


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write ``path`` whole or not at all (a temporary file of this process, renamed)."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_file_atomic(source: Path, dest: Path) -> None:
    """Copy ``source`` to ``dest`` whole or not at all (a temporary file, renamed)."""
    tmp = dest.with_name(f".tmp-{os.getpid()}-{dest.name}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, dest)


def dataset_extra(dataset, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """What a checkpoint needs to serve raw item ids and rebuild the dataset."""
    return {"run_config": cfg, "dataset": dataset.name,
            "item_raw_ids": [None if r is None else str(r) for r in dataset.item_raw_ids],
            "item_titles": list(dataset.item_titles)}


def resolve_device(name: str) -> torch.device:
    """``train.device``: ``auto`` is CUDA when a GPU is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"train.device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device: {name!r} asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"train.device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    return device


class Trainer:
    """Trains ``cfg["model"]`` on ``dataset`` into ``run_dir``.

    ``dataset`` is a ``plr.data.SequenceDataset``: ``train.gather(idx)`` gives
    a batch of (history, next item) samples; ``valid`` / ``test`` are
    full-ranking evaluation samples.
    """

    def __init__(self, cfg: Dict[str, Any], dataset, run_dir, *, log_to_console: bool = True):
        self.cfg = config_mod.check(cfg)
        self.train_cfg = config_mod.section(self.cfg, "train")
        self.eval_cfg = config_mod.section(self.cfg, "eval")
        # Samples to train and validate on (the test split: in fit, which may never read it).
        self.data_source = repr(getattr(dataset, "name", "dataset"))
        check_usable(dataset, self.data_source, parts=("train", "valid"))
        self.dataset = dataset
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_to_console = log_to_console
        self.dist = distributed.current()  # one process, or this rank of a torchrun group
        self.dist.check_batch_size(self.train_cfg.batch_size)
        torch.manual_seed(self.train_cfg.seed)
        self.model: SequentialRecommender = build_model(self.cfg["model"], dataset.num_items, dataset.max_len)
        # Backbones that read more than ids (item text, UniSRec) take it from the dataset.
        if hasattr(self.model.backbone, "attach_dataset"):
            self.model.backbone.attach_dataset(dataset)
        self.model.to(self.dist.device(resolve_device(self.train_cfg.device)))
        self.dist.seed_dropout(self.train_cfg.seed)
        self.train_samples = self._train_samples(dataset)
        self._sequence_loss, self._prefix_loss = self.model.sequence_loss, self.model.compute_loss
        if self.train_cfg.compile:
            # The sequence-mode loss traces without graph breaks (tests/test_compiled_training.py);
            # R (targets per batch) varies, hence dynamic shapes. Prefix mode's input checks break the graph.
            self._sequence_loss = torch.compile(self.model.sequence_loss, dynamic=True)
            self._prefix_loss = torch.compile(self.model.compute_loss, dynamic=True)
        # Several processes: the losses run through DDP (their backward averages the gradients).
        self._sequence_loss, self._prefix_loss = self.dist.wrap_losses(self.model, self._sequence_loss,
                                                                       self._prefix_loss)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.train_cfg.lr,
                                          weight_decay=self.train_cfg.weight_decay)
        self.state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_metric": -math.inf,
                      "best_epoch": -1, "bad_epochs": 0, "history": [], "train_seconds": 0.0,
                      "finished": False}

    def _train_samples(self, dataset):
        """``dataset.train`` (prefix samples) or its sequences (``train.samples: sequence``;
        ``auto``: sequence where the model supports it)."""
        if self.train_cfg.samples == "auto":
            self.train_cfg.samples = "sequence" if self.model.supports_sequences() else "prefix"
        if self.train_cfg.samples == "prefix":
            return dataset.train
        if not self.model.supports_sequences():
            raise ValueError(f"train.samples: 'sequence' needs a causal backbone with start-anchored positions and a "
                             f"model that implements it (sasrec, erl, prl, plr on the sasrec backbone); got "
                             f"{self.cfg['model']['name']} on {type(self.model.backbone).__name__}; set "
                             f"train.samples=prefix")
        return SequenceSamples.from_prefix_samples(dataset.train)

    # -- bookkeeping ---------------------------------------------------------------

    def log(self, msg: str) -> None:
        if not self.dist.is_main:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        with open(self.run_dir / "train.log", "a") as f:
            f.write(line + "\n")
        if self.log_to_console:
            tqdm.write(line)

    def save_state(self) -> None:
        # Every rank's RNG state (dropout), written by rank 0; the others wait.
        rng = self.dist.gather_objects(torch.get_rng_state())
        cuda_rng = self.dist.gather_objects(torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])
        if self.dist.is_main:
            atomic_torch_save({"format": STATE_FORMAT, "model": self.model.state_dict(),
                               "optimizer": self.optimizer.state_dict(), "rng": rng[0], "cuda_rng": cuda_rng[0],
                               "rng_per_rank": rng, "cuda_rng_per_rank": cuda_rng,
                               "state": self.state, "config": self.cfg}, self.run_dir / LAST)
        self.dist.barrier()

    def load_state(self) -> bool:
        """Resume from ``run_dir/last.pt``; False if there is none."""
        path = self.run_dir / LAST
        if not path.is_file():
            return False
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("format") != STATE_FORMAT:
            raise ValueError(f"run_dir: {path} is not a plr training state")
        if same_config(saved["config"]) != self.cfg:
            raise ValueError(f"run_dir: {path} was written with another config; resume with the same "
                             f"config (see {self.run_dir / 'config.yaml'}) or use a new --out")
        rngs = saved.get("rng_per_rank", [saved["rng"]])
        if len(rngs) != self.dist.world_size:
            raise UserError(f"run_dir: {path} was written by {len(rngs)} process(es), this run has "
                            f"{self.dist.world_size} (WORLD_SIZE); an exact resume needs every process's RNG state",
                            f"resume with {len(rngs)} process(es) (torchrun --nproc-per-node {len(rngs)}) "
                            "or use a new --out")
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(rngs[self.dist.rank])
        cuda_rng = saved.get("cuda_rng_per_rank", [saved.get("cuda_rng")])[self.dist.rank]
        if cuda_rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_rng)
        self.state = saved["state"]
        return True

    # -- training ------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.train_cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_samples), generator=gen)

    def steps_per_epoch(self) -> int:
        steps = math.ceil(len(self.train_samples) / self.train_cfg.batch_size)
        cap = self.train_cfg.max_steps_per_epoch
        return min(steps, cap) if cap else steps

    def train_step(self, idx: torch.Tensor) -> Dict[str, float]:
        """One optimiser step on samples ``idx``; returns the loss parts and
        ``targets`` (how many next-item targets the step trained on). With several
        processes ``idx`` is the global batch: this rank trains on its shard, the
        returned values are over all shards (plr.distributed)."""
        idx, has_samples = self.dist.shard(idx)
        item_seq, target = self.train_samples.gather(idx)
        device = self.model.device
        item_seq, target = item_seq.to(device), target.to(device)
        # bf16: autocast runs the linear layers and attention in bf16; the weights
        # stay fp32 (Adam's master copy), LayerNorm outputs and so the vocabulary
        # pass (loss statistics) stay fp32.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.train_cfg.precision == "bf16"):
            if self.train_cfg.samples == "sequence":
                args = self.model.prepare_sequences(item_seq, target)
                loss, parts = self._sequence_loss(*args)
                n_targets = int(args[2].shape[0])
            else:
                loss, parts = self._prefix_loss(item_seq, target)
                n_targets = int(target.shape[0])
        loss, local_loss, parts, n_targets = self.dist.global_mean(loss, parts, n_targets * has_samples)
        values = guards.check_step(loss, parts, epoch=self.state["epoch"], step=self.state["step_in_epoch"],
                                   limit=self.train_cfg.divergence_limit)  # before the weights change
        self.optimizer.zero_grad(set_to_none=True)
        local_loss.backward()
        if self.train_cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip)
        self.optimizer.step()
        return {**values, "targets": n_targets}

    def run_epoch(self, epoch: int) -> Dict[str, float]:
        """One epoch; the losses are means over its targets (comparable between
        ``train.samples`` modes: each step's loss is a mean over its targets). The
        running sums live in ``state`` (saved in ``last.pt``), so an epoch resumed
        mid-way reports the means over all of its steps."""
        order = self.epoch_order(epoch)
        bs, steps = self.train_cfg.batch_size, self.steps_per_epoch()
        if self.state["step_in_epoch"] == 0:
            self.state.update(epoch_sums={}, epoch_targets=0)
        sums: Dict[str, float] = self.state.setdefault("epoch_sums", {})
        bar = tqdm(range(self.state["step_in_epoch"], steps), desc=f"epoch {epoch}", leave=False,
                   disable=None if self.train_cfg.progress and self.dist.is_main else True,
                   initial=self.state["step_in_epoch"], total=steps)
        started = time.perf_counter()
        for step in bar:
            parts = self.train_step(order[step * bs:(step + 1) * bs])
            n = parts.pop("targets")
            self.state["epoch_targets"] = self.state.get("epoch_targets", 0) + n
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * n
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
            self.state["step_in_epoch"] = step + 1
            self.state["global_step"] += 1
            if (step + 1) % self.train_cfg.save_every_steps == 0 and step + 1 < steps:
                self.state["train_seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                self.save_state()
        self.state["train_seconds"] += time.perf_counter() - started
        return {k: v / max(1, self.state["epoch_targets"]) for k, v in sums.items()}

    def fit(self, resume: bool = False, test: bool = True, validate_start: bool = False) -> Dict[str, Any]:
        """Train until ``epochs`` or early stopping, then test the best model
        (``test=False``: never read the test split, e.g. while tuning on validation;
        ``metrics.json`` then has ``"test": null``).

        ``validate_start``: the starting weights (a phase that continues a trained
        model, e.g. LARES's RPT) are validated before the first update and compete
        as epoch -1: if no epoch beats them, ``best.pt`` holds them, and patience
        counts from them (``metrics.json``: ``"best_epoch": -1``, ``"start_valid"``).

        A step whose loss is non-finite or diverges (plr.guards) and Ctrl-C stop
        the run with ``last.pt`` holding the last good state (resumable). With
        several processes Ctrl-C does not save (the ranks stop at different points,
        a collective save could hang): ``last.pt`` is the last periodic state."""
        if test:  # before any training: a run that cannot be tested fails now, not at its end
            check_usable(self.dataset, self.data_source, parts=("test",))
        try:
            return self._fit(resume, test, validate_start)
        except (guards.TrainingDiverged, KeyboardInterrupt) as exc:
            if self.state.get("finished"):
                raise
            if isinstance(exc, KeyboardInterrupt) and self.dist.active:
                self.log(f"interrupted; the last periodic training state is in {self.run_dir / LAST}")
                raise
            self.save_state()
            where = f"epoch {self.state['epoch']}, step {self.state['step_in_epoch']}"
            self.log(f"stopped at {where}: {exc}" if isinstance(exc, guards.TrainingDiverged)
                     else f"interrupted at {where}; training state saved in {self.run_dir / LAST}")
            raise

    def _fit(self, resume: bool, test: bool, validate_start: bool = False) -> Dict[str, Any]:
        if resume and self.load_state():
            self.log(f"resumed at epoch {self.state['epoch']}, step {self.state['step_in_epoch']}")
        elif resume:
            self.log(f"--resume: no training state in {self.run_dir}, starting from scratch")
        elif (self.run_dir / LAST).exists():
            raise FileExistsError(f"run_dir: {self.run_dir} already holds a training state; "
                                  "pass --resume to continue it, or choose another --out")
        metric = self.eval_cfg.metric
        n_params = sum(p.numel() for p in self.model.parameters())
        samples = (f"{len(self.dataset.train):,} training samples" if self.train_cfg.samples == "prefix" else
                   f"{len(self.train_samples):,} training sequences ({self.train_samples.num_targets():,} targets)")
        self.log(f"model {self.cfg['model']['name']} ({n_params:,} parameters), {samples}, "
                 f"{self.steps_per_epoch()} steps/epoch")
        valid = getattr(self.dataset, "valid", None)
        if not self.eval_cfg.exclude_history and valid is not None and len(valid.target) and \
                target_in_history_share(valid) == 0.0:
            self.log("note: no validation target is an item of its history, and eval.exclude_history is false, so "
                     "every history item competes with the target (models often rank the last one first: plr "
                     "analyze history measures it); eval.exclude_history: true removes them")
        if validate_start and "start_valid" not in self.state:
            if self.state["global_step"] == 0:
                valid = self.validate()
                self.state["start_valid"] = valid
                improved = self.keep_if_better(valid, epoch=-1)
                self.log(f"epoch -1 (the starting weights, before any update): valid {metric}={valid[metric]:.4f}"
                         + (" *" if improved else ""))
                self.save_state()
            else:  # a state saved mid-training by a version without this option: the start is gone
                self.log("validate_start: the run resumed after its first update; its starting weights "
                         "were not validated and do not compete")
        while not self.state["finished"] and self.state["epoch"] < self.train_cfg.epochs:
            epoch = self.state["epoch"]
            losses = self.run_epoch(epoch)
            valid = self.validate()
            improved = self.keep_if_better(valid, epoch)
            if not improved:
                self.state["bad_epochs"] += 1
            # train_seconds: cumulative training time (evaluation excluded) at the end of the epoch
            self.state["history"].append({"epoch": epoch, **losses, "train_seconds": round(self.state["train_seconds"], 2),
                                          **{f"valid_{k}": v for k, v in valid.items()}})
            self.log(f"epoch {epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in losses.items())
                     + f" | valid {metric}={valid[metric]:.4f}" + (" *" if improved else ""))
            self.state.update(epoch=epoch + 1, step_in_epoch=0)
            if self.state["bad_epochs"] >= self.train_cfg.patience:
                self.log(f"early stop: no better valid {metric} for {self.train_cfg.patience} epochs")
                self.state["finished"] = True
            self.save_state()
        self.state["finished"] = True
        self.save_state()
        if not test:
            metrics = self.summary(None)
            if self.dist.is_main:
                write_json_atomic(metrics, self.run_dir / "metrics.json")
            return metrics
        return self.test()

    def validate(self) -> Dict[str, float]:
        """The model's metrics on the validation split."""
        return self.dist.evaluate(self.model, self.dataset.valid, ks=self.eval_cfg.ks,
                                  batch_size=self.eval_cfg.batch_size,
                                  exclude_history=self.eval_cfg.exclude_history, ties=self.eval_cfg.ties).metrics

    def keep_if_better(self, valid: Dict[str, float], epoch: int) -> bool:
        """Early stopping's bookkeeping: a better (finite) validation metric makes the
        weights the best so far (``best.pt``). Returns whether they were."""
        score = valid[self.eval_cfg.metric]
        if not (math.isfinite(score) and score > self.state["best_metric"]):
            return False
        self.state.update(best_metric=score, best_epoch=epoch, bad_epochs=0, best_valid=valid)
        if self.dist.is_main:  # the others wait at save_state's barrier
            self.model.save(str(self.run_dir / BEST), extra=dataset_extra(self.dataset, self.cfg))
        return True

    def summary(self, test_metrics) -> Dict[str, Any]:
        """The content of ``metrics.json``."""
        out = {"valid": self.state.get("best_valid", {}), "test": test_metrics,
               "best_epoch": self.state["best_epoch"], "epochs": self.state["epoch"],
               "train_seconds": round(self.state["train_seconds"], 2), "model": self.cfg["model"]["name"],
               "dataset": self.dataset.name, "history": self.state["history"]}
        if "start_valid" in self.state:
            out["start_valid"] = self.state["start_valid"]
        return out

    def test(self) -> Dict[str, Any]:
        """Reload the best checkpoint, evaluate on the test samples, write metrics.json."""
        self.dist.barrier()  # rank 0 has written best.pt
        if not (self.run_dir / BEST).is_file():
            raise UserError(f"run_dir: no best checkpoint in {self.run_dir} after {self.state['epoch']} epoch(s)",
                            "train at least one epoch (train.epochs >= 1)")
        best = SequentialRecommender.load(str(self.run_dir / BEST))
        best.to(self.model.device)
        result = self.dist.evaluate(best, self.dataset.test, ks=self.eval_cfg.ks, batch_size=self.eval_cfg.batch_size,
                                    exclude_history=self.eval_cfg.exclude_history, ties=self.eval_cfg.ties)
        metrics = self.summary(result.metrics)
        if self.dist.is_main:
            save_ranks(self.run_dir / "test_ranks.csv", result.users, result.ranks)
            write_json_atomic(metrics, self.run_dir / "metrics.json")
        self.log("test " + " ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
        return metrics


def save_ranks(path: Path, users: np.ndarray, ranks: np.ndarray) -> None:
    """Per-user ranks, for paired significance tests between runs."""
    tmp = path.with_name(f".tmp-{path.name}")
    np.savetxt(tmp, np.stack([np.asarray(users), np.asarray(ranks)], axis=1).astype(np.int64),
               fmt="%d", delimiter=",", header="user,rank", comments="")
    os.replace(tmp, path)


def load_ranks(path) -> Dict[int, int]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run: no per-user ranks at {path} (was the run finished?)")
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    return dict(zip(data[:, 0].tolist(), data[:, 1].tolist()))


def train_run(cfg: Dict[str, Any], dataset, run_dir, *, resume: bool = False,
              log_to_console: bool = True, test: bool = True) -> Dict[str, Any]:
    """Save the resolved config into ``run_dir`` and train.

    A model class with a ``run_training`` static method (several training phases,
    e.g. LARES) runs its own phases with the same arguments instead. ``test=False``
    never reads the test split (``Trainer.fit``)."""
    custom = getattr(model_class(config_mod.check(cfg)["model"]["name"]), "run_training", None)
    ctx = distributed.current()
    if custom is not None and ctx.active:
        raise UserError(f"model: {cfg['model']['name']} trains in phases of its own and runs as one process, "
                        f"not {ctx.world_size} (WORLD_SIZE)", "run it without torchrun")
    if custom is not None:
        with run_dir_lock(run_dir):
            return custom(cfg, dataset, run_dir, resume=resume, log_to_console=log_to_console, test=test)
    run_dir = Path(run_dir)
    # The ranks of one job share run_dir: rank 0 holds its lock (plr.run_lock).
    with run_dir_lock(run_dir) if ctx.is_main else contextlib.nullcontext():
        check_run_dir(run_dir, config_mod.check(cfg), resume)
        run_dir.mkdir(parents=True, exist_ok=True)
        if ctx.is_main:
            config_mod.save(config_mod.check(cfg), run_dir / "config.yaml")
        ctx.barrier()  # every rank has checked run_dir before rank 0 writes into it
        return Trainer(cfg, dataset, run_dir, log_to_console=log_to_console).fit(resume=resume, test=test)


def same_config(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A saved run config with the defaults of keys added since it was written
    filled in (model keys: with what the run did, plr.deprecations), so that a
    newer plr resumes an older run of the same settings."""
    try:
        return fill_legacy_model_values(config_mod.check(saved))
    except ValueError:
        return saved


def check_run_dir(run_dir: Path, cfg: Dict[str, Any], resume: bool) -> None:
    """Refuse, before anything is written, a run directory that holds another
    run (without ``resume``) or a training state of another config (with it)."""
    last = Path(run_dir) / LAST
    if not last.is_file():
        return
    if not resume:
        raise FileExistsError(f"run_dir: {run_dir} already holds a training state; "
                              "pass --resume to continue it, or choose another --out")
    try:
        saved = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise UserError(f"run_dir: {last} is not a readable plr training state ({type(exc).__name__})",
                        "choose another --out") from None
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
        raise UserError(f"run_dir: {last} is not a plr training state", "choose another --out")
    old = same_config(saved["config"])
    if old != cfg:
        changed = sorted(f"{sec}.{k}" for sec in set(cfg) | set(old)
                         for k in set(cfg.get(sec, {})) | set(old.get(sec, {}))
                         if cfg.get(sec, {}).get(k) != old.get(sec, {}).get(k))
        raise UserError(f"run_dir: {last} was written with another config (changed: {changed})",
                        f"resume with the same config (see {Path(run_dir) / 'config.yaml'}) or use a new --out")
