"""plr_kernels._autotune: the backend choice by measurement behind topk's
``auto`` on a GPU (exercised here with CPU callables of very different cost)."""

import time

import pytest
import torch

from plr_kernels import _autotune


@pytest.fixture(autouse=True)
def _fresh():
    _autotune.clear()
    yield
    _autotune.clear()


def test_fastest_picks_the_faster_and_measures_once_per_key():
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.02)

    def fast():
        calls["fast"] += 1

    cpu = torch.device("cpu")
    assert _autotune.fastest("k1", {"slow": slow, "fast": fast}, cpu, warmup=1, reps=3) == "fast"
    assert calls == {"slow": 4, "fast": 4}
    assert _autotune.fastest("k1", {"slow": slow, "fast": fast}, cpu) == "fast"
    assert calls == {"slow": 4, "fast": 4}  # remembered, not timed again
    assert _autotune.choices() == {"k1": "fast"}
    assert _autotune.fastest("k2", {"fast": fast, "slow": slow}, cpu, warmup=0, reps=1) == "fast"


def test_a_single_candidate_is_not_timed_and_no_candidate_is_an_error():
    def never():
        raise AssertionError("timed")

    assert _autotune.fastest("only", {"cuda": never}, torch.device("cpu")) == "cuda"
    with pytest.raises(ValueError, match="candidates: expected at least one backend"):
        _autotune.fastest("none", {}, torch.device("cpu"))


def test_size_bucket():
    assert [_autotune.size_bucket(n) for n in (0, 1, 2, 3, 64, 65, 1000)] == [1, 1, 2, 4, 64, 128, 1024]
