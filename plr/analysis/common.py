"""What every ``plr analyze`` kind shares: checkpoints and the dataset they
were trained on, the run directory of the analysis, figures with their numbers
beside them, and the Markdown summary."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from ..errors import UserError

PNG_DPI = 100


def checkpoint_path(path) -> Path:
    """A run directory (its ``best.pt``) or a checkpoint file -> the checkpoint file."""
    from ..training import BEST

    path = Path(path)
    if path.is_dir():
        if not (path / BEST).is_file():
            raise UserError(f"checkpoint: the run directory {path} holds no {BEST}",
                            "name a finished run directory or a checkpoint file")
        return path / BEST
    if not path.is_file():
        raise UserError(f"checkpoint: no run directory or checkpoint at {str(path)!r}",
                        "name a run directory (RUN_DIR) or a checkpoint (RUN_DIR/best.pt)")
    return path


def load_checkpoint(path, classes: Optional[Sequence[str]] = None, kind: str = "analyze"):
    """``(model, extra, label)`` of a run directory or checkpoint, in eval mode.

    ``classes``: the model class names the analysis ``kind`` accepts; another
    one is refused naming the class. Non-finite weights are refused."""
    from ..models import SequentialRecommender

    file = checkpoint_path(path)
    model, extra = SequentialRecommender.load_with_extra(str(file))
    name = type(model).__name__
    if classes is not None and name not in classes:
        raise UserError(f"checkpoint: {file} holds a {name}; plr analyze {kind} needs one of {list(classes)}",
                        "name a checkpoint of a model with latent reasoning" if kind in ("ceiling", "attention")
                        else "name a checkpoint of a supported model")
    bad = model.non_finite_weights()
    if bad:
        raise UserError(f"checkpoint: {file} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s), "
                        f"e.g. {bad[0]}", "retrain that run")
    model.eval()
    return model, extra, run_label(file)


def run_label(file: Path) -> str:
    """``RUN_DIR/best.pt`` -> ``RUN_DIR``'s name; another file -> its stem."""
    return file.parent.name if file.name == "best.pt" else file.stem


def check_labels(checkpoints: Sequence[str], labels: Optional[Sequence[str]]) -> Optional[List[str]]:
    """``--labels``: one distinct name per checkpoint (None: the run directories' names)."""
    if labels is None:
        return None
    labels = [str(label) for label in labels]
    if len(labels) != len(checkpoints) or len(set(labels)) != len(labels):
        raise UserError(f"--labels: expected {len(checkpoints)} distinct names (one per --checkpoint), got {labels}")
    return labels


def check_cutoff_metrics(metrics: Sequence[str]) -> None:
    """``--metrics``: each ``recall@K`` or ``ndcg@K`` with K >= 1."""
    for m in metrics:
        kind, _, k = m.partition("@")
        if not (kind in ("recall", "ndcg") and k.isdigit() and int(k) >= 1):
            raise UserError(f"--metrics: expected recall@K or ndcg@K, got {m!r}", "e.g. --metrics ndcg@10 recall@20")


def unique_label(label: str, taken) -> str:
    """``label``, or ``label-2``, ``label-3``... if it is taken."""
    out, i = label, 1
    while out in taken:
        i += 1
        out = f"{label}-{i}"
    return out


def with_backend(model, backend: str):
    """The same model (same weights) with another plr_kernels ``backend``."""
    if model.backend == backend:
        return model
    other = type(model)(**{**model.config(), "backend": backend})
    other.load_state_dict(model.state_dict())
    return other.eval()


def matching_dataset(model, extra: Dict[str, Any], data: Optional[str], file_label: str,
                     parts: Sequence[str] = ("test",)):
    """The dataset a checkpoint was trained on: ``data`` (a path; default: the
    run's own ``data.path``) read with the run's data settings, refused when its
    item vocabulary differs from the checkpoint's."""
    from ..data import load_dataset

    run_cfg = extra.get("run_config") or {}
    data_cfg = dict(run_cfg.get("data") or {"max_len": model.max_len, "split": "loo"})
    if data is not None:
        data_cfg["path"] = str(data)
    if not data_cfg.get("path"):
        raise UserError(f"--data: the checkpoint {file_label} does not say which dataset it was trained on",
                        "pass --data PATH")
    dataset = load_dataset(data_cfg, parts=tuple(parts))
    saved = extra.get("item_raw_ids")
    now = [None if r is None else str(r) for r in dataset.item_raw_ids]
    if saved is not None and saved != now:
        raise UserError(f"--data: the items of {data_cfg['path']} ({len(now) - 1} items) differ from those "
                        f"{file_label} was trained on ({len(saved) - 1} items)",
                        "analyze a checkpoint on the dataset of its run")
    if dataset.num_items != model.num_items:
        raise UserError(f"--data: {data_cfg['path']} has {dataset.num_items} items, the checkpoint "
                        f"{file_label} scores {model.num_items}", "analyze a checkpoint on the dataset of its run")
    return dataset


def eval_settings(extra: Dict[str, Any]) -> Dict[str, Any]:
    """The run's evaluation settings (ks, batch size, history exclusion, ties)."""
    ev = (extra.get("run_config") or {}).get("eval") or {}
    return dict(ks=ev.get("ks", [5, 10, 20, 50]), batch_size=ev.get("batch_size", 1024),
                exclude_history=ev.get("exclude_history", False), ties=ev.get("ties", "optimistic"))


class Output:
    """The run directory of one analysis: figures (PNG) with their numbers
    (CSV/JSON) beside them, and ``SUMMARY.md``."""

    def __init__(self, out, kind: str):
        self.dir = Path(out) if out else Path("runs") / "analysis" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kind = kind
        self.files: List[Path] = []
        self.lines: List[str] = []

    def path(self, name: str) -> Path:
        return self.dir / name

    def figure(self, fig, name: str) -> Path:
        """Save a matplotlib figure as ``name.png`` and close it."""
        import matplotlib.pyplot as plt

        path = self.dir / f"{name}.png"
        fig.savefig(path, dpi=PNG_DPI)
        plt.close(fig)
        self.files.append(path)
        return path

    def csv(self, rows: List[Dict[str, Any]], name: str, columns: Optional[List[str]] = None) -> Path:
        path = self.dir / f"{name}.csv"
        columns = columns or list(dict.fromkeys(k for r in rows for k in r))
        tmp = path.with_name(f".tmp-{path.name}")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.files.append(path)
        return path

    def json(self, obj: Any, name: str) -> Path:
        path = self.dir / f"{name}.json"
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text(json.dumps(obj, indent=2, default=_plain))
        os.replace(tmp, path)
        self.files.append(path)
        return path

    def summary(self, title: str, lines: Iterable[str]) -> Path:
        """Write ``SUMMARY.md``: the title, ``lines`` and the list of files."""
        body = [f"# {title}", "", *lines, "", "Files: " + ", ".join(f"`{p.name}`" for p in self.files), ""]
        path = self.dir / "SUMMARY.md"
        path.write_text("\n".join(body))
        self.files.append(path)
        return path


def _plain(value):
    """JSON for numpy scalars and arrays."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def parse_values(text: str, where: str, cast=float) -> List[Any]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; the error names ``where``."""
    try:
        values = [cast(v) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UserError(f"{where}: expected comma-separated {cast.__name__} values, got {text!r}") from None
    if not values:
        raise UserError(f"{where}: expected at least one value, got {text!r}")
    return values
