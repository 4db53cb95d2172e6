"""Backend choice by measurement, for ops whose fastest backend depends on the
device and the shape (``topk`` on a GPU: the compiled CUDA kernel or
``torch.topk`` over the score matrix; which wins depends on B, V, k).

``fastest(key, candidates, device)`` times every candidate on the call's own
arguments (warm-up, then the median of a few synchronised runs), remembers the
winner under ``key`` and returns its name; later calls with the same key
return it without timing. Candidates compute the same result (the same op
contract), so the choice changes the time, not the answer beyond float
rounding. ``choices()`` reports what was picked (benchmarks print it).
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Callable, Dict, Hashable

import torch

_CHOICES: Dict[Hashable, str] = {}
_LOCK = threading.Lock()


def _median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> float:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fastest(key: Hashable, candidates: Dict[str, Callable[[], Any]], device: torch.device,
            warmup: int = 2, reps: int = 5) -> str:
    """The name of the fastest of ``candidates`` (name -> zero-argument call),
    measured once per ``key``; on equal times the first listed wins."""
    if not candidates:
        raise ValueError("candidates: expected at least one backend to time, got none")
    with _LOCK:
        if key in _CHOICES and _CHOICES[key] in candidates:
            return _CHOICES[key]
        if len(candidates) == 1:
            best = next(iter(candidates))
        else:
            times = {name: _median_seconds(fn, device, warmup, reps) for name, fn in candidates.items()}
            best = min(times, key=times.get)
        _CHOICES[key] = best
        return best


def choices() -> Dict[Hashable, str]:
    """Every choice made so far: key -> backend name."""
    with _LOCK:
        return dict(_CHOICES)


def clear() -> None:
    """Forget every choice (the next call of each key measures again)."""
    with _LOCK:
        _CHOICES.clear()


def size_bucket(n: int) -> int:
    """``n`` rounded up to a power of two: shapes that share a choice."""
    return 1 << max(0, int(n) - 1).bit_length()
