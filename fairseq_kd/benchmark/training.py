# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The training section: one ``distill_hubert`` update through fairseq's own ``Trainer.train_step``
with the preset's task, criterion, model and optimizer, against its three parts timed alone
(teacher forward, student forward + backward, optimizer step); and the throughput it implies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

import torch

from fairseq_kd.benchmark.config import (
    DISTILHUBERT_BATCH,
    DISTILHUBERT_CROP_SECONDS,
    DISTILHUBERT_UPDATES,
    LIBRISPEECH_MEAN_SECONDS,
    OVERHEAD_TARGET,
    SAMPLE_RATE,
    BenchmarkConfig,
    compose,
    training_overrides,
)
from fairseq_kd.benchmark.timing import median, paired_ratio, time_interleaved


@dataclass
class Distillation:
    """One preset's real training objects, with the in-memory teacher."""

    trainer: Any
    task: Any
    model: torch.nn.Module
    criterion: Any
    sample: Dict[str, Any]


def build_task_model_criterion(train_cfg: Any, teacher):
    """The preset's ``distill_hubert`` task with the given teacher, then the student and the
    criterion built through it, as ``fairseq_cli.train`` does (both check themselves against the
    teacher: head width, layer ids, the criterion's layer mapping)."""
    from fairseq import tasks

    task = tasks.setup_task(train_cfg.task, teacher=teacher)  # the in-memory teacher, not task.teacher_path
    model = task.build_model(train_cfg.model)
    criterion = task.build_criterion(train_cfg.criterion)
    return task, model, criterion


def build_distillation(
    cfg: BenchmarkConfig, preset: str, teacher, device: torch.device, work_dir: str, train_cfg: Any = None
) -> Distillation:
    """Task, student, criterion and fairseq ``Trainer`` of a preset; the teacher is the given one.

    The preset is composed like ``fairseq-hydra-train --config-name PRESET`` (every group: task,
    model, criterion, optimizer, lr scheduler, clipping); the batch is what fairseq's padded
    collater makes of ``batch`` utterances of ``seconds``.
    """
    from fairseq.trainer import Trainer

    if train_cfg is None:
        train_cfg = compose(preset, training_overrides(cfg, preset, device, work_dir))
    task, model, criterion = build_task_model_criterion(train_cfg, teacher)
    trainer = Trainer(train_cfg, task, model, criterion)
    source = torch.randn(cfg.batch, int(cfg.seconds * SAMPLE_RATE), device=device)
    sample = {
        "id": torch.arange(cfg.batch, device=device),
        "net_input": {"source": source, "padding_mask": torch.zeros_like(source, dtype=torch.bool)},
    }
    return Distillation(trainer, task, trainer.model, trainer.criterion, sample)


def part_fns(dist: Distillation) -> Dict[str, Callable[[], Any]]:
    """The update, and its three parts alone on the same batch."""
    trainer, model = dist.trainer, dist.model
    net_input = dist.sample["net_input"]
    teacher = dist.task.teacher
    dtype = next(model.parameters()).dtype  # fp16 when the trainer cast the student

    def update():
        trainer.train_step([dist.sample])

    def teacher_forward():
        teacher.hidden_states(net_input["source"].float(), net_input["padding_mask"])

    def student_forward_backward():
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(source=net_input["source"].to(dtype), padding_mask=net_input["padding_mask"])
        # the distillation heads' outputs; a headless student (STaRHuBERT's Gram losses) its layers
        outputs = list(out["hints"].values()) + list(out["preds"].values()) or out["hidden_states"][1:]
        torch.stack([o.float().mean() for o in outputs]).sum().backward()

    def optimizer_step():
        trainer.optimizer.step()

    return {"update": update, "teacher_forward": teacher_forward,
            "student_forward_backward": student_forward_backward, "optimizer_step": optimizer_step}


def training_section(cfg: BenchmarkConfig, teacher, device, work_dir: str) -> Dict[str, Any]:
    rows: Dict[str, Any] = {}
    for preset in cfg.presets:
        dist = build_distillation(cfg, preset, teacher, device, work_dir)
        times = time_interleaved(part_fns(dist), cfg.repeats, max(cfg.warmup, 1), device)
        parts = [a + b + c for a, b, c in zip(times["teacher_forward"], times["student_forward_backward"],
                                              times["optimizer_step"])]
        update = median(times["update"])
        audio = cfg.batch * cfg.seconds
        rows[preset] = {
            "update_s": update,
            "parts_s": {k: median(v) for k, v in times.items() if k != "update"},
            "overhead": paired_ratio(times["update"], parts) - 1.0,
            "target": OVERHEAD_TARGET,
            "audio_s_per_s": audio / update,
            "times_s": times,
        }
        rows[preset]["target_met"] = rows[preset]["overhead"] <= OVERHEAD_TARGET
        rows[preset].update(distilhubert_schedule(audio / update))
        del dist
    return {"batch": cfg.batch, "seconds": cfg.seconds, "presets": rows}


def distilhubert_schedule(audio_s_per_s: float) -> Dict[str, float]:
    """Days for DistilHuBERT's 200k updates of 24 utterances at this throughput."""
    per_update_max = DISTILHUBERT_BATCH * DISTILHUBERT_CROP_SECONDS
    per_update_mean = DISTILHUBERT_BATCH * LIBRISPEECH_MEAN_SECONDS
    return {
        "schedule_days_15_6s": DISTILHUBERT_UPDATES * per_update_max / audio_s_per_s / 86400,
        "schedule_days_12_3s": DISTILHUBERT_UPDATES * per_update_mean / audio_s_per_s / 86400,
    }
