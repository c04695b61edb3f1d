# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Interleaved timing: every function once per round, forward then reverse order, and medians of
the per-round ratios, so that the load of a shared machine and clock drift cancel out."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch

from fairseq_kd.benchmark.config import AMP_DTYPES


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work; only the timer calls it, never the timed code."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device
) -> Dict[str, List[float]]:
    """Seconds per call of every function, ``repeats`` rounds after ``warmup`` untimed rounds.

    Each round calls every function once, in forward then reverse order on alternate rounds,
    so a slow drift of the machine's speed weighs on all of them alike.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of the per-round ratios (each pair was timed in the same round)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def paired_ratio_range(numerator: Sequence[float], denominator: Sequence[float]) -> Tuple[float, float]:
    """Lowest and highest per-round ratio: the spread around ``paired_ratio``."""
    ratios = [n / d for n, d in zip(numerator, denominator)]
    return min(ratios), max(ratios)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def autocast(device: torch.device, amp: str):
    """torch's autocast to the ``--amp`` dtype, or nothing for ``none``."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
