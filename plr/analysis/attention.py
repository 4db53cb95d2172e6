"""``plr analyze attention``: the PLR paper's Figure 5 (attention maps).

For a few chosen test users, the attention of each stream at each reasoning
step over the history and over the stream's own reasoning tokens, with the
MoRS gate weights (Eq. 9). The probabilities are the debug output of the
reference stream attention op (``plr_kernels.reference.stream_attention(...,
return_probs=True)``, recorded by :func:`plr.models.reasoning.record_attention`),
so the model runs with ``backend="torch"``; heads are averaged, one layer shown.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..models.reasoning import record_attention
from .common import Output, load_checkpoint, matching_dataset, pyplot, with_backend

CLASSES = ("PLRModel", "ReaRecERLModel", "ReaRecPRLModel")


@torch.no_grad()
def attention_maps(model, item_seq: torch.Tensor) -> Dict[str, Any]:
    """Attention of every reasoning step for the histories ``item_seq [B, L]``.

    Returns ``probs``: per step t (0-based) and layer, ``[B,H,M,N+t+1]`` (the N
    prefix positions of the padded history, then the stream's tokens 1..t+1),
    ``gate [B,M]`` (uniform for ReaRec's single stream) and the ``ModelOutput``."""
    model = with_backend(model, "torch")
    seq = model.prepare(item_seq)
    with record_attention() as steps:
        out = model.forward_prepared(seq)
    gate = out.gate if out.gate is not None else torch.ones(seq.shape[0], 1, dtype=out.h0.dtype)
    return {"probs": steps, "gate": gate, "output": out, "item_seq": seq}


def user_rows(dataset, users: Optional[Sequence[str]], count: int) -> List[int]:
    """Row indices into ``dataset.test`` of the raw ``users`` (default: the first ``count`` test users)."""
    test_users = dataset.test.user.tolist()
    if not users:
        return list(range(min(count, len(test_users))))
    raw_to_internal = {str(r): i for i, r in enumerate(dataset.user_raw_ids)}
    rows = []
    for raw in users:
        internal = raw_to_internal.get(str(raw))
        if internal is None or internal not in test_users:
            raise UserError(f"--users: {raw!r} is not a test user of the dataset",
                            f"e.g. --users {' '.join(str(dataset.user_raw_ids[u]) for u in test_users[:3])}")
        rows.append(test_users.index(internal))
    return rows


def run_attention(out, checkpoint: str, *, data: Optional[str] = None, users: Optional[Sequence[str]] = None,
                  count: int = 3, layer: int = -1) -> Output:
    """Writes ``attention-<user>.png/json`` per user and ``SUMMARY.md``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"--num-users: expected an int >= 1, got {count!r}")
    model, extra, label = load_checkpoint(checkpoint, CLASSES, kind="attention")
    num_layers = len(model.backbone.layers)
    if not -num_layers <= layer < num_layers:
        raise UserError(f"--layer: expected a layer in [{-num_layers}, {num_layers - 1}], got {layer}")
    dataset = matching_dataset(model, extra, data, str(checkpoint))
    rows = user_rows(dataset, users, count)
    maps = attention_maps(model, dataset.test.item_seq[rows])
    output = Output(out, "attention")
    plt = pyplot()
    lines = [f"Model `{label}` ({type(model).__name__}); layer {layer % num_layers} of {num_layers}, mean over "
             "heads; reference op's attention probabilities.", ""]
    for b, row in enumerate(rows):
        raw_user = str(dataset.user_raw_ids[int(dataset.test.user[row])])
        seq = maps["item_seq"][b]
        valid = (seq > 0).nonzero().flatten().tolist()
        steps = maps["probs"]
        T = len(steps)
        M = steps[0][layer].shape[2]
        matrix = np.full((T * M, len(valid) + T), np.nan)
        for t in range(T):
            p = steps[t][layer][b].mean(dim=0).double()  # [M, N+t+1], mean over heads
            n = seq.shape[0]
            for m in range(M):
                matrix[t * M + m, :len(valid)] = p[m, valid].numpy()
                matrix[t * M + m, len(valid):len(valid) + t + 1] = p[m, n:].numpy()
        gate = maps["gate"][b].double().tolist()
        items = [str(dataset.item_raw_ids[int(seq[j])]) for j in valid]
        labels = [f"t{t + 1} m{m + 1}" for t in range(T) for m in range(M)]
        fig, (ax, gax) = plt.subplots(1, 2, figsize=(9.0, 1.2 + 0.45 * T * M),
                                      gridspec_kw={"width_ratios": [6, 1]})
        image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_yticks(range(T * M), labels, fontsize=7)
        ticks = list(range(0, len(valid), max(1, len(valid) // 10))) + list(range(len(valid), len(valid) + T))
        ax.set_xticks(ticks, [f"-{len(valid) - j}" if j < len(valid) else f"r{j - len(valid) + 1}" for j in ticks],
                      fontsize=7)
        ax.set_xlabel("history position (-1 = most recent) | own reasoning tokens")
        ax.set_title(f"user {raw_user}: attention per (step, stream)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.04)
        gax.barh(range(len(gate)), gate)
        gax.set_yticks(range(len(gate)), [f"m{m + 1}" for m in range(len(gate))], fontsize=7)
        gax.invert_yaxis()
        gax.set_xlim(0, 1)
        gax.set_title("gate (Eq. 9)", fontsize=9)
        fig.tight_layout()
        name = f"attention-{_safe(raw_user)}"
        output.figure(fig, name)
        output.json({"user": raw_user, "layer": layer % num_layers, "rows": labels,
                     "columns": items + [f"r{t + 1}" for t in range(T)], "attention": matrix, "gate": gate,
                     "history_items": items}, name)
        top = np.nanargmax(matrix[:, :len(valid)], axis=1) if valid else []
        lines += [f"**user {raw_user}** ({len(valid)} history items): gate "
                  + ", ".join(f"m{m + 1}={g:.3f}" for m, g in enumerate(gate)) + "; most attended history item "
                  "per (step, stream): " + ", ".join(f"{lab}: {items[j]} (pos -{len(valid) - j})"
                                                     for lab, j in zip(labels, top)), "",
                  f"![user {raw_user}]({name}.png)", ""]
    output.summary("Attention maps (PLR paper, Figure 5)", lines)
    return output


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
