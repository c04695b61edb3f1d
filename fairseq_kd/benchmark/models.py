# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The random-weight models: fairseq's ``HubertModel`` as the HuBERT Base teacher (``HubertConfig``'s
defaults are HuBERT Base), the students from the presets; their sizes and analytic MACs."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import torch

from fairseq_kd.benchmark.config import SAMPLE_RATE, TEACHER_NAME, BenchmarkError, split_overrides


def _parse_value(text: str) -> Any:
    """yaml typing, as on hydra's command line; what yaml cannot read stays a string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def teacher_config(overrides: Sequence[str] = ()):
    """The teacher's config, ``model`` (``_name: hubert``) and ``task`` sections: fairseq's
    ``HubertConfig`` defaults (HuBERT Base) with ``KEY=VALUE`` overrides, frozen as a loaded teacher
    is (``FROZEN_MODEL_FIELDS``: no dropout, layerdrop or length padding)."""
    from fairseq.models.hubert.hubert import HubertConfig
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fairseq_kd.encoders.pretrained import FROZEN_MODEL_FIELDS, apply_model_overrides

    model_cfg = HubertConfig(label_rate=50.0)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not hasattr(model_cfg, key):
            raise BenchmarkError(
                f"teacher override {item!r}: expected KEY=VALUE with KEY a HubertConfig field "
                "(e.g. encoder_layers=4)"
            )
        setattr(model_cfg, key, _parse_value(value))
    task_cfg = HubertPretrainingConfig(data="unused", labels=["km"], label_rate=50.0,
                                       sample_rate=SAMPLE_RATE, normalize=False)
    try:
        cfg = OmegaConf.create({
            "model": {**OmegaConf.to_container(OmegaConf.structured(model_cfg), enum_to_str=True), "_name": "hubert"},
            "task": {**OmegaConf.to_container(OmegaConf.structured(task_cfg), enum_to_str=True),
                     "_name": "hubert_pretraining"},
        })
    except OmegaConfBaseException as error:  # a value of the wrong type
        raise BenchmarkError(f"--teacher-override {' '.join(overrides)}: {error}") from None
    apply_model_overrides(cfg, FROZEN_MODEL_FIELDS)
    OmegaConf.set_struct(cfg, True)  # as hydra gives it: fairseq's getattr(cfg, key, default) needs it
    return cfg


def build_teacher(overrides: Sequence[str] = (), device: Any = "cpu"):
    """A random-weight HuBERT Base (fairseq's ``HubertModel``) as a ``FrozenTeacher``."""
    from fairseq.models.hubert.hubert import HubertModel

    from fairseq_kd.teacher import FrozenTeacher

    cfg = teacher_config(overrides)
    model = HubertModel(cfg.model, cfg.task, [None])  # no label dictionary: no label embeddings
    model.remove_pretraining_modules()
    teacher = FrozenTeacher(model, kind="hubert", normalize=False, path=f"<random {TEACHER_NAME}>", cfg=cfg)
    return teacher.to(device)


def student_fields(preset: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """thin_hubert fields of a preset (name or yaml) with ``model.KEY=VALUE`` overrides."""
    from fairseq_kd.presets import PresetError, model_fields

    model_overrides = [o for o in split_overrides(overrides, preset) if o.startswith("model.")]
    try:
        return model_fields(preset, model_overrides)
    except PresetError as error:
        raise BenchmarkError(str(error)) from None


def build_student(preset: str, overrides: Sequence[str] = (), heads: bool = False, device: Any = "cpu"):
    from fairseq_kd.models.thin_hubert import ThinHubertModel, as_thin_hubert_config

    model = ThinHubertModel(as_thin_hubert_config(student_fields(preset, overrides)))
    if not heads:
        model.remove_pretraining_modules()
    return model.to(device)


def teacher_macs(teacher_cfg, seconds: float) -> float:
    """Analytic MACs of the teacher (``teacher_config``'s result) on ``seconds`` of audio."""
    from omegaconf import OmegaConf

    from fairseq_kd.models.thin_hubert import ThinHubertModel
    from fairseq_kd.presets import thin_fields_from_fairseq

    fields = thin_fields_from_fairseq(OmegaConf.to_container(teacher_cfg.model))
    return sum(ThinHubertModel.macs_breakdown(fields, seconds).values())


def student_macs(fields: Mapping[str, Any], seconds: float) -> float:
    from fairseq_kd.models.thin_hubert import ThinHubertModel

    return sum(ThinHubertModel.macs_breakdown(dict(fields), seconds).values())


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
