# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Bad settings fail here, before any section runs (the distillation check builds the students on
the ``meta`` device: no memory, no initialisation)."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Any, Mapping, Optional

import torch

from fairseq_kd.benchmark.config import (
    AMP_DTYPES,
    SAMPLE_RATE,
    SECTIONS,
    BenchmarkConfig,
    BenchmarkError,
    compose,
    training_overrides,
)
from fairseq_kd.benchmark.models import build_teacher, student_fields, teacher_config
from fairseq_kd.benchmark.training import build_task_model_criterion


def check_config(cfg: BenchmarkConfig, work_dir: Optional[str] = None) -> None:
    """Bad settings fail here, before any model is built."""
    unknown = [s for s in cfg.sections if s not in SECTIONS]
    if unknown:
        raise BenchmarkError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if cfg.amp not in AMP_DTYPES:
        raise BenchmarkError(f"amp must be one of {', '.join(AMP_DTYPES)}, not {cfg.amp!r}")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError(f"--device {cfg.device}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cpu" and cfg.amp != "none":
        raise BenchmarkError("--amp is for GPUs (CPU autocast slows these models down); use --amp none on a CPU")
    if cfg.batch < 1 or cfg.scaling_batch < 1 or cfg.repeats < 1 or cfg.warmup < 0:
        raise BenchmarkError("--batch, --scaling-batch and --repeats must be >= 1, --warmup >= 0")
    too_short = [s for s in [cfg.seconds, *cfg.lengths] if s * SAMPLE_RATE < 400]
    if too_short:
        raise BenchmarkError(f"utterances of {too_short} s are shorter than the CNN's receptive field (400 samples)")
    if not cfg.presets:
        raise BenchmarkError("no presets to benchmark (--presets)")
    if "loader" in cfg.sections and cfg.manifest:
        manifest = os.path.join(cfg.manifest, f"{cfg.split}.tsv")
        if not os.path.isfile(manifest):
            raise BenchmarkError(f"--manifest {cfg.manifest}: no {cfg.split}.tsv there (fairseq manifest folder expected)")
        if any(w < 0 for w in cfg.loader_workers):
            raise BenchmarkError(f"--loader-workers must be >= 0, got {cfg.loader_workers}")
    if "int8" in cfg.sections:
        if device.type != "cpu":
            raise BenchmarkError("the int8 section times onnxruntime's CPU kernels: run it with --device cpu")
        for module in ("onnx", "onnxscript", "onnxruntime"):
            if importlib.util.find_spec(module) is None:
                raise BenchmarkError(f"the int8 section needs {module}: pip install -e '.[export]'")
        if cfg.manifest and not os.path.isfile(os.path.join(cfg.manifest, "valid.tsv")):
            raise BenchmarkError(f"--manifest {cfg.manifest}: the int8 section reads its valid.tsv, which is missing")
    teacher_config(cfg.teacher_overrides)  # raises on unknown keys
    distils = "training" in cfg.sections or "memory" in cfg.sections
    teacher = build_teacher(cfg.teacher_overrides) if distils else None  # CPU, a few s for HuBERT Base
    for preset in cfg.presets:
        check_student(preset, student_fields(preset, cfg.overrides))
        if distils:
            overrides = training_overrides(cfg, preset, device, work_dir or tempfile.gettempdir())
            check_distillation(preset, compose(preset, overrides), teacher)


def check_student(preset: str, fields: Mapping[str, Any]) -> None:
    from fairseq_kd.models.thin_hubert import as_thin_hubert_config
    from fairseq_kd.models.thin_hubert import check_config as check_thin_hubert

    try:
        check_thin_hubert(as_thin_hubert_config(dict(fields)))
    except (ValueError, TypeError) as error:
        raise BenchmarkError(f"preset {preset}: {error} (fix it with --override {preset}:model.KEY=VALUE)") from None


def check_distillation(preset: str, train_cfg, teacher) -> None:
    """The preset's student, layer mapping and head width must fit the (possibly overridden)
    teacher: checked by building the real student and criterion through the task, as training
    does (the student on the ``meta`` device: its size does not matter here)."""
    try:
        with torch.device("meta"):
            build_task_model_criterion(train_cfg, teacher)
    except ValueError as error:  # TeacherError and the criterion's mapping errors are ValueErrors
        raise BenchmarkError(
            f"preset {preset}: {error} (fix it with --override {preset}:model.KEY=VALUE / "
            f"{preset}:criterion.KEY=VALUE, or --teacher-override KEY=VALUE)"
        ) from None
