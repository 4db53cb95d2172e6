"""Input checks of the models: each error names the argument, the expected
and the received value."""

from __future__ import annotations

import torch

INT_DTYPES = (torch.int64, torch.int32)


def check_item_seq(item_seq, num_items: int, max_len: int) -> torch.Tensor:
    """Validate left-padded histories ``[B, L]`` (L <= max_len) and return them
    as int64 left-padded to ``max_len``."""
    if not isinstance(item_seq, torch.Tensor):
        raise TypeError(f"item_seq: expected a torch.Tensor of item ids, got {type(item_seq).__name__}")
    if item_seq.dtype not in INT_DTYPES:
        raise TypeError(f"item_seq: expected an int64 or int32 tensor of item ids, got dtype {item_seq.dtype}")
    if item_seq.dim() != 2:
        raise ValueError(f"item_seq: expected shape [batch, length], got {list(item_seq.shape)}")
    b, length = item_seq.shape
    if b == 0 or length == 0:
        raise ValueError(f"item_seq: expected a non-empty batch of histories, got shape {list(item_seq.shape)}")
    if length > max_len:
        raise ValueError(
            f"item_seq: expected histories of at most max_len={max_len} items (keep the last {max_len}), got {length}"
        )
    lo, hi = int(item_seq.min()), int(item_seq.max())
    if lo < 0:
        raise ValueError(f"item_seq: expected ids in [0, {num_items}] (0 = padding), got a negative id {lo}")
    if hi > num_items:
        raise ValueError(f"item_seq: expected ids in [0, {num_items}] (0 = padding), got {hi}")
    item_seq = item_seq.long()
    valid = item_seq != 0
    empty = (~valid).all(dim=1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0, 0])
        raise ValueError(f"item_seq: expected at least one item per history, got an all-padding row {row}")
    if length > 1 and bool((valid[:, 1:] < valid[:, :-1]).any()):
        row = int((valid[:, 1:] < valid[:, :-1]).any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"item_seq: expected left-padded histories (padding 0 only before the first item), "
            f"got padding after an item in row {row}"
        )
    if length < max_len:
        item_seq = torch.nn.functional.pad(item_seq, (max_len - length, 0))
    return item_seq


def check_target(target, batch: int, num_items: int, device) -> torch.Tensor:
    """Next-item targets ``[B]`` with ids in ``[1, num_items]``."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected a torch.Tensor of item ids, got {type(target).__name__}")
    if target.dtype not in INT_DTYPES:
        raise TypeError(f"target: expected an int64 or int32 tensor, got dtype {target.dtype}")
    if target.shape != (batch,):
        raise ValueError(f"target: expected shape [{batch}] (one per history), got {list(target.shape)}")
    if target.device != device:
        raise ValueError(f"target: expected a tensor on {device} (as item_seq), got {target.device}")
    lo, hi = int(target.min()), int(target.max())
    if lo < 1 or hi > num_items:
        raise ValueError(f"target: expected ids in [1, {num_items}], got {lo if lo < 1 else hi}")
    return target.long()


def check_sequence_target(target, item_seq: torch.Tensor, num_items: int) -> torch.Tensor:
    """Sequence-mode targets ``[B, L]`` aligned with the histories ``item_seq
    [B, L]`` (before padding to max_len): the next item after each position,
    0 = no target; a target only where there is an item. Returned as int64."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected a torch.Tensor of item ids, got {type(target).__name__}")
    if target.dtype not in INT_DTYPES:
        raise TypeError(f"target: expected an int64 or int32 tensor, got dtype {target.dtype}")
    if target.shape != item_seq.shape:
        raise ValueError(f"target: expected shape {list(item_seq.shape)} (one per position of item_seq), "
                         f"got {list(target.shape)}")
    if target.device != item_seq.device:
        raise ValueError(f"target: expected a tensor on {item_seq.device} (as item_seq), got {target.device}")
    lo, hi = int(target.min()), int(target.max())
    if lo < 0 or hi > num_items:
        raise ValueError(f"target: expected ids in [0, {num_items}] (0 = no target), got {lo if lo < 0 else hi}")
    if hi == 0:
        raise ValueError("target: expected at least one target (a nonzero id), got none")
    if bool(((target != 0) & (item_seq == 0)).any()):
        raise ValueError("target: expected targets only at positions holding an item, got one at a padding position")
    return target.long()


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def check_probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")
    return float(value)
