"""Side-by-side timing: every implementation of a case runs in interleaved rounds in one process, and each
reports the median of its rounds, so machine noise hits all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_side_by_side(
    fns: dict[str, Callable[[], object]],
    device: str = "cpu",
    min_rounds: int = 3,
    max_rounds: int = 25,
    target_s: float = 0.5,
    slow_s: float = 3.0,
) -> dict[str, dict]:
    """Median seconds per call of each fn. After one warm-up call each, rounds run every fn once, until each
    fn has `min_rounds` rounds and `target_s` seconds in total (at most `max_rounds`). A fn whose warm-up
    took longer than `slow_s` is timed once more only (reported with rounds=1)."""
    warm = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        _sync(device)
        warm[name] = time.perf_counter() - t0
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(max_rounds):
        active = [n for n in fns if not (warm[n] > slow_s and samples[n])]
        active = [n for n in active if r < min_rounds or sum(samples[n]) < target_s]
        if not active:
            break
        for name in active:
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
    return {
        n: {"median_s": statistics.median(s), "min_s": min(s), "rounds": len(s)} for n, s in samples.items()
    }
