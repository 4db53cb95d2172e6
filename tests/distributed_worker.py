"""What tests/test_distributed.py runs in each process under torchrun.

    python -m torch.distributed.run --nproc-per-node 2 ... tests/distributed_worker.py plr train ...
        ``python -m plr train ...``, with every file this rank opens for writing
        (open, os.replace, tempfile.mkstemp) listed in ``$PLR_TEST_WRITES/rank<RANK>.txt``
        and its process id in ``$PLR_TEST_WRITES/pid-rank<RANK>``
    python -m torch.distributed.run --nproc-per-node 2 ... tests/distributed_worker.py grads OUT_DIR
        in float64: one ``Trainer.train_step`` per case of ``CASES`` on a global batch
        (gradients and loss values saved to ``OUT_DIR/<case>-rank<R>.pt``), the sharded
        validation ranks of an untrained model, each rank's RNG state after setup, and
        the error of resuming ``OUT_DIR/one-process-state`` (written by one process)
"""

import builtins
import os
import runpy
import sys
import tempfile
from pathlib import Path

import torch

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k_recbole"
BASE = ["model.hidden_size=16", "model.inner_size=32", "model.dropout=0.0", "data.max_len=12",
        "train.progress=false", "train.seed=3", "train.device=cpu", "train.batch_size=8"]
# name -> (model, overrides, global batch of sample indices)
CASES = {
    "sasrec-sequence": ("sasrec", [], [5, 900, 17, 3000, 42, 7, 1234]),  # shards of 3 and 4 sequences
    "sasrec-one-sample": ("sasrec", [], [77]),  # rank 1 holds none of it
    # reg_rows=all: L_KL over every row (with "batch" each rank draws its own rows)
    "plr-sequence": ("plr", ["model.reasoning_dropout=0.0", "model.rcl_weight=0.0", "model.reg_rows=all"], [5, 900, 17, 3000, 42, 7, 15639]),
    "plr-prefix": ("plr", ["model.reasoning_dropout=0.0", "model.rcl_weight=0.0", "train.samples=prefix"],
                   [11, 5000, 123, 80000, 9, 4321, 600, 70000, 2]),
    "plr-sequence-rcl": ("plr", ["model.reasoning_dropout=0.0", "model.rcl_weight=1.0", "model.reg_rows=all"],
                         [5, 900, 17, 3000, 42, 7, 8000]),
}


def case_config(name):
    from plr import config

    model, extra, _ = CASES[name]
    return config.resolve(model, None, BASE + extra, str(ML100K))


def record_writes(folder: str, rank: str) -> None:
    (Path(folder) / f"pid-rank{rank}").write_text(str(os.getpid()))  # for the test to kill this process
    log = open(Path(folder) / f"rank{rank}.txt", "a", buffering=1)
    real_open, real_replace, real_mkstemp = builtins.open, os.replace, tempfile.mkstemp

    def logged_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            log.write(f"open {os.path.abspath(file)}\n")
        return real_open(file, mode, *args, **kwargs)

    def logged_replace(src, dst, *args, **kwargs):
        log.write(f"replace {os.path.abspath(dst)}\n")
        return real_replace(src, dst, *args, **kwargs)

    def logged_mkstemp(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        log.write(f"mkstemp {path}\n")
        return fd, path

    builtins.open, os.replace, tempfile.mkstemp = logged_open, logged_replace, logged_mkstemp


def grads(out_dir: Path) -> None:
    from plr import distributed
    from plr.data.loading import load_dataset
    from plr.errors import UserError
    from plr.training import Trainer

    torch.set_default_dtype(torch.float64)
    ctx = distributed.setup("cpu")
    rank = ctx.rank
    dataset = load_dataset(case_config("sasrec-sequence")["data"])
    for name, (_, _, idx) in CASES.items():
        trainer = Trainer(case_config(name), dataset, out_dir / "runs" / name, log_to_console=False)
        if name == "sasrec-sequence":
            torch.save(torch.get_rng_state(), out_dir / f"rng-rank{rank}.pt")
            result = ctx.evaluate(trainer.model, dataset.valid, ks=[5, 10], batch_size=100)
            torch.save({"ranks": torch.from_numpy(result.ranks), "metrics": result.metrics},
                       out_dir / f"eval-rank{rank}.pt")
        values = trainer.train_step(torch.tensor(idx))
        torch.save({"grads": {k: p.grad for k, p in trainer.model.named_parameters()}, "values": values},
                   out_dir / f"{name}-rank{rank}.pt")
    # A training state written by one process (the test wrote it there) is refused.
    trainer = Trainer(case_config("sasrec-sequence"), dataset, out_dir / "one-process-state", log_to_console=False)
    try:
        trainer.load_state()
        message = "loaded"
    except UserError as exc:
        message = str(exc)
    (out_dir / f"resume-rank{rank}.txt").write_text(message)
    distributed.teardown()


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "plr":
        record_writes(os.environ["PLR_TEST_WRITES"], os.environ["RANK"])
        sys.argv = ["plr", *rest]
        runpy.run_module("plr", run_name="__main__", alter_sys=True)
    elif mode == "grads":
        grads(Path(rest[0]))
    else:
        raise SystemExit(f"mode: expected plr or grads, got {mode!r}")
