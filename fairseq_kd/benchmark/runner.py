# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The whole run: checks, then the selected sections in order, with the load average of each."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from typing import Any, Callable, Dict

import torch

from fairseq_kd.benchmark.checks import check_config
from fairseq_kd.benchmark.config import BenchmarkConfig
from fairseq_kd.benchmark.inference import inference_section, scaling_section
from fairseq_kd.benchmark.int8 import int8_section
from fairseq_kd.benchmark.loader import loader_section
from fairseq_kd.benchmark.machine import loadavg, machine_info, set_threads
from fairseq_kd.benchmark.memory import memory_section
from fairseq_kd.benchmark.models import build_student, build_teacher, student_fields
from fairseq_kd.benchmark.training import training_section


def run_benchmark(cfg: BenchmarkConfig, progress: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the selected sections; returns the figures (what ``--out`` writes as JSON)."""
    with tempfile.TemporaryDirectory() as work_dir:  # task.data / save_dir: never read, never written
        return _run(cfg, progress, work_dir)


def _run(cfg: BenchmarkConfig, progress: Callable[[str], None], work_dir: str) -> Dict[str, Any]:
    check_config(cfg, work_dir)
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    result: Dict[str, Any] = {"machine": machine_info(device), "config": asdict(cfg), "load": {}}
    fields = {name: student_fields(name, cfg.overrides) for name in cfg.presets}
    started = time.perf_counter()

    def stamp(section: str) -> None:
        result["load"][section] = loadavg()
        progress(f"[{time.perf_counter() - started:6.1f}s] {section} (load average {result['load'][section]})")

    teacher = None
    if {"inference", "scaling", "training", "int8"} & set(cfg.sections):
        teacher = build_teacher(cfg.teacher_overrides, device)
    if {"inference", "scaling"} & set(cfg.sections):
        students = {name: build_student(name, cfg.overrides, device=device) for name in cfg.presets}
        if "inference" in cfg.sections:
            stamp("inference")
            result["inference"] = inference_section(cfg, teacher, students, fields, device)
        if "scaling" in cfg.sections:
            stamp("scaling")
            result["scaling"] = scaling_section(cfg, teacher, students, device)
        del students
    if "training" in cfg.sections:
        stamp("training")
        result["training"] = training_section(cfg, teacher, device, work_dir)
        audio = cfg.batch * cfg.seconds
        result["throughput"] = {
            preset: {**{k: row[k] for k in ("audio_s_per_s", "schedule_days_15_6s", "schedule_days_12_3s")},
                     # the teacher's forward alone on the same batch: the ceiling of any distillation
                     "teacher_forward_audio_s_per_s": audio / row["parts_s"]["teacher_forward"]}
            for preset, row in result["training"]["presets"].items()
        }
    if "int8" in cfg.sections:
        stamp("int8")
        result["int8"] = int8_section(cfg, teacher, work_dir)
    del teacher
    if "loader" in cfg.sections and cfg.manifest:
        stamp("loader")
        result["loader"] = loader_section(cfg, work_dir)
        for preset, row in result.get("throughput", {}).items():  # can the data side keep up?
            row["loader_headroom"] = {w: r["audio_s_per_s"] / row["audio_s_per_s"]
                                      for w, r in result["loader"]["presets"][preset].items()}
    if "memory" in cfg.sections:
        stamp("memory")
        result["memory"] = memory_section(cfg, work_dir)
    stamp("done")
    result["wall_s"] = time.perf_counter() - started
    return result
