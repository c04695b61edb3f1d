# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The data-loading section: audio-seconds per second from fairseq's batch iterator."""

from __future__ import annotations

import time
from typing import Any, Dict

import torch

from fairseq_kd.benchmark.config import SAMPLE_RATE, BenchmarkConfig, compose, training_overrides


def loader_section(cfg: BenchmarkConfig, work_dir: str) -> Dict[str, Any]:
    """Audio-seconds per second that fairseq's batch iterator delivers from ``manifest``, with each
    number of DataLoader workers, batched as each preset batches (crops, batch size, max_tokens).

    Audio is read and decoded for real (soundfile), so this is the rate the data side can feed an
    update; compare it with the distillation throughput.
    """
    from fairseq import tasks

    rows: Dict[str, Any] = {}
    for preset in cfg.presets:
        overrides = training_overrides(cfg, preset, torch.device("cpu"), work_dir)
        overrides = [o for o in overrides if not o.startswith("task.data=")]
        train_cfg = compose(preset, overrides + [f"task.data={cfg.manifest}", "task.validate_audio=false"])
        task = tasks.setup_task(train_cfg.task)
        task.load_dataset(cfg.split)
        dataset = task.dataset(cfg.split)
        rows[preset] = {}
        load_epoch(task, dataset, train_cfg, 0, cfg.seed)  # untimed: the page cache and libsndfile warm up
        for workers in cfg.loader_workers:
            rows[preset][str(workers)] = load_epoch(task, dataset, train_cfg, workers, cfg.seed)
    return {"manifest": cfg.manifest, "split": cfg.split, "presets": rows}


def load_epoch(task, dataset, train_cfg, workers: int, seed: int) -> Dict[str, float]:
    """One epoch through fairseq's iterator; the rate counts from the first batch on (the workers'
    start-up is paid once per epoch, which on a real corpus is thousands of batches)."""
    iterator = task.get_batch_iterator(
        dataset, max_tokens=train_cfg.dataset.max_tokens, max_sentences=train_cfg.dataset.batch_size,
        num_workers=workers, seed=seed, epoch=1,
    ).next_epoch_itr(shuffle=True)
    start = time.perf_counter()
    first, samples, first_samples, batches = None, 0, 0, 0
    for batch in iterator:
        mask = batch["net_input"].get("padding_mask")
        samples += batch["net_input"]["source"].numel() - (int(mask.sum()) if mask is not None else 0)
        if first is None:
            first, first_samples = time.perf_counter(), samples
        batches += 1
    end = time.perf_counter()
    if batches > 1:  # from the first batch on
        rate = (samples - first_samples) / SAMPLE_RATE / (end - first)
    else:  # a one-batch split: start-up included
        rate = samples / SAMPLE_RATE / max(end - start, 1e-9)
    return {"audio_s_per_s": rate, "first_batch_s": (first or end) - start, "batches": batches}
