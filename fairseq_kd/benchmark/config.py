# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The benchmark's settings, constants and error, and what it adds to a preset's overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import torch

SAMPLE_RATE = 16_000
SECTIONS = ("inference", "training", "memory", "scaling", "loader", "int8")
# int8 exports two real-size ONNX students (minutes): only when asked for
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "int8")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# issue 5's CPU targets: student forward time / teacher forward time, and update overhead
CPU_TIME_TARGETS = {"thin_deep": 0.25, "distilhubert": 0.5}
# issue 17's int8 targets: int8 student under onnxruntime / fp32 eager teacher, same run
INT8_TIME_TARGETS = {"thin_deep": 0.12, "distilhubert": 0.30}
OVERHEAD_TARGET = 0.10
# DistilHuBERT's schedule (docs/papers.md#distilhubert-training): 200k updates of 24 utterances cropped to
# 250k samples; LibriSpeech 960 h has 281,241 training utterances (12.3 s on average)
DISTILHUBERT_UPDATES = 200_000
DISTILHUBERT_BATCH = 24
DISTILHUBERT_CROP_SECONDS = 250_000 / SAMPLE_RATE
LIBRISPEECH_MEAN_SECONDS = 960.9 * 3600 / 281_241
TEACHER_NAME = "hubert_base"


class BenchmarkError(ValueError):
    """A benchmark setting that cannot be run; the message says how to fix it."""


@dataclass
class BenchmarkConfig:
    presets: List[str] = field(default_factory=lambda: ["thin_deep", "distilhubert"])
    device: str = "cpu"
    amp: str = "none"  # autocast dtype of the inference forwards on a GPU: none, bf16, fp16
    batch: int = 2
    seconds: float = 10.0
    lengths: List[float] = field(default_factory=lambda: [2.0, 5.0, 10.0, 15.0])
    scaling_batch: int = 1
    repeats: int = 5
    warmup: int = 1
    sections: List[str] = field(default_factory=lambda: list(DEFAULT_SECTIONS))
    # loader section: fairseq's batch iterator over a manifest folder, with these DataLoader workers
    manifest: Optional[str] = None
    split: str = "train"
    loader_workers: List[int] = field(default_factory=lambda: [0, 2])
    # HubertConfig fields of the teacher (KEY=VALUE) and preset overrides ([PRESET:]group.KEY=VALUE)
    teacher_overrides: List[str] = field(default_factory=list)
    overrides: List[str] = field(default_factory=list)
    threads: Optional[int] = None
    seed: int = 1


def split_overrides(overrides: Sequence[str], preset: str) -> List[str]:
    """The ``group.KEY=VALUE`` overrides that apply to ``preset`` (``PRESET:`` prefix or none)."""
    selected = []
    for item in overrides:
        name, sep, rest = item.partition(":")
        if sep and "=" not in name:
            if name == preset:
                selected.append(rest)
        else:
            selected.append(item)
    return selected


def training_overrides(cfg: BenchmarkConfig, preset: str, device: torch.device, work_dir: str) -> List[str]:
    """What the benchmark sets on top of the preset, then the user's ``--override`` entries."""
    cpu = device.type == "cpu"
    return [
        f"common.cpu={str(cpu).lower()}",
        f"common.fp16={str(not cpu and cfg.amp != 'none').lower()}",  # the presets' fp16 on a GPU
        f"common.seed={cfg.seed}",
        "distributed_training.distributed_world_size=1",
        "dataset.num_workers=0",
        f"task.data={work_dir}",
        f"task.teacher_path=in_memory_random_{TEACHER_NAME}",
        f"checkpoint.save_dir={work_dir}",
    ] + split_overrides(cfg.overrides, preset)


def compose(preset: str, overrides: Sequence[str]) -> Any:
    """The preset composed as ``fairseq-hydra-train --config-name PRESET`` does (cached)."""
    from fairseq_kd.presets import PresetError, compose_preset

    try:
        return compose_preset(preset, overrides)
    except PresetError as error:
        raise BenchmarkError(str(error)) from None
