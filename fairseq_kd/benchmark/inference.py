# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The inference and scaling sections: students' forwards (heads removed) against the teacher's,
in eval mode under ``torch.inference_mode``, with the analytic MACs ratio."""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping

import torch

from fairseq_kd.benchmark.config import CPU_TIME_TARGETS, SAMPLE_RATE, TEACHER_NAME, BenchmarkConfig
from fairseq_kd.benchmark.models import count_params, student_macs, teacher_config, teacher_macs
from fairseq_kd.benchmark.timing import autocast, median, paired_ratio, time_interleaved


def inference_fns(
    teacher_model, students: Mapping[str, torch.nn.Module], source: torch.Tensor, device, amp: str
) -> Dict[str, Callable[[], Any]]:
    def run(forward):
        def call():
            with torch.inference_mode(), autocast(device, amp):
                return forward()

        return call

    fns = {TEACHER_NAME: run(lambda: teacher_model.extract_features(source, padding_mask=None, mask=False))}
    for name, model in students.items():
        fns[name] = run(lambda model=model: model.extract_features(source, padding_mask=None, mask=False))
    return fns


def inference_section(cfg: BenchmarkConfig, teacher, students, fields, device) -> Dict[str, Any]:
    source = torch.randn(cfg.batch, int(cfg.seconds * SAMPLE_RATE), device=device)
    teacher_model = teacher.model.eval()
    for model in students.values():
        model.eval()
    times = time_interleaved(inference_fns(teacher_model, students, source, device, cfg.amp),
                             cfg.repeats, cfg.warmup, device)
    t_macs = teacher_macs(teacher_config(cfg.teacher_overrides), cfg.seconds)
    audio = cfg.batch * cfg.seconds
    rows = {TEACHER_NAME: {
        "median_s": median(times[TEACHER_NAME]), "ms_per_audio_s": 1e3 * median(times[TEACHER_NAME]) / audio,
        "time_ratio": 1.0, "macs_ratio": 1.0, "gmacs": t_macs * cfg.batch / 1e9,
        "params": count_params(teacher_model), "times_s": times[TEACHER_NAME],
    }}
    for name, model in students.items():
        macs = student_macs(fields[name], cfg.seconds)
        rows[name] = {
            "median_s": median(times[name]), "ms_per_audio_s": 1e3 * median(times[name]) / audio,
            "time_ratio": paired_ratio(times[name], times[TEACHER_NAME]),
            "macs_ratio": macs / t_macs, "gmacs": macs * cfg.batch / 1e9,
            "params": count_params(model), "times_s": times[name],
        }
        target = CPU_TIME_TARGETS.get(name) if device.type == "cpu" else None
        if target is not None:
            rows[name]["target"] = target
            rows[name]["target_met"] = rows[name]["time_ratio"] <= target
    return {"batch": cfg.batch, "seconds": cfg.seconds, "models": rows}


def scaling_section(cfg: BenchmarkConfig, teacher, students, device) -> Dict[str, Any]:
    teacher_model = teacher.model.eval()
    result: Dict[str, Any] = {"batch": cfg.scaling_batch, "lengths": {}}
    for seconds in cfg.lengths:
        source = torch.randn(cfg.scaling_batch, int(seconds * SAMPLE_RATE), device=device)
        times = time_interleaved(inference_fns(teacher_model, students, source, device, cfg.amp),
                                 cfg.repeats, cfg.warmup, device)
        audio = cfg.scaling_batch * seconds
        result["lengths"][str(seconds)] = {
            name: {"ms_per_audio_s": 1e3 * median(t) / audio,
                   "time_ratio": paired_ratio(t, times[TEACHER_NAME])}
            for name, t in times.items()
        }
    return result
