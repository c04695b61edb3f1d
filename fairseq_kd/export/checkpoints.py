# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Read the student out of a distillation or fine-tuned CTC checkpoint, or say why it cannot.

Accepted (``cfg.model._name`` of the fairseq checkpoint):

- ``thin_hubert`` / ``thin_hubert_w2v``: a distillation checkpoint (``fairseq-hydra-train
  --config-name thin_deep|distilhubert|...``); the distillation heads are dropped.
- ``hubert_ctc`` / ``wav2vec_ctc`` whose ``w2v_args`` hold a ``thin_hubert`` student (written by
  ``kd_audio_finetuning``): the fine-tuned encoder ``w2v_encoder.w2v_model.*``, without the CTC
  output layer.

Everything else stops with a message naming the file and what to pass instead: a teacher (fairseq
``hubert`` / ``wav2vec2`` / ``data2vec_audio``, or a CTC model fine-tuned from one), an unknown
model, a config the weights do not match, a missing, truncated or non-fairseq file.
"""

import os
import zipfile
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping

import torch

from fairseq_kd.encoders.pretrained import CTC_MODELS, STUDENT_MODELS, encoder_state, model_name, read_checkpoint
from fairseq_kd.models.thin_hubert import HEAD_MODULES, ThinHubertConfig, ThinHubertModel, check_config

TEACHER_MODELS = ("hubert", "wav2vec2", "data2vec_audio")
EXPORT_HELP = (
    "pass a distillation checkpoint (checkpoint_best.pt / checkpoint_last.pt written by "
    "fairseq-hydra-train --config-name thin_deep|distilhubert|...) or a CTC model fine-tuned from "
    "one (fairseq-hydra-train --config-name finetune_base_*)"
)


class ExportInputError(ValueError):
    """A file that cannot be exported as a student, with what to pass instead."""


@dataclass
class LoadedStudent:
    model: ThinHubertModel  # eval mode, distillation heads removed
    path: str
    source: str  # "distillation", "hubert_ctc" or "wav2vec_ctc"
    normalize: bool
    sample_rate: int
    model_cfg: Dict[str, Any]  # the thin_hubert fields the model was built from


def read_student_checkpoint(path: str) -> Dict[str, Any]:
    """The project's checked reader (``encoders/pretrained.read_checkpoint``), after refusing this
    command's own outputs (a standalone ``.pt2`` archive, an ONNX file) with what to pass instead."""
    path = os.fspath(path)
    if os.path.isfile(path) and _is_standalone_archive(path):
        raise ExportInputError(
            f"{path} is already a standalone student written by fairseq-kd-export (load it with "
            f"fairseq_kd/s3prl_upstream/runtime.py); to export again, {EXPORT_HELP}"
        )
    if os.path.isfile(path) and path.endswith(".onnx"):
        raise ExportInputError(f"{path} is an ONNX model: export from the fairseq checkpoint instead; {EXPORT_HELP}")
    return read_checkpoint(path, path, EXPORT_HELP, ExportInputError)


def _is_standalone_archive(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/extra/fairseq_kd.json") for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def load_student(path: str) -> LoadedStudent:
    """The student of a distillation or fine-tuned checkpoint, built and strictly loaded, in eval mode."""
    path = os.fspath(path)
    state = read_student_checkpoint(path)
    name = model_name(state["cfg"])
    if name in TEACHER_MODELS:
        raise ExportInputError(
            f"{path} holds a fairseq {name!r} model: a teacher (or another pre-trained model), not a "
            f"distilled student. Distil it first (fairseq-hydra-train --config-name thin_deep "
            f"task.teacher_path={path} ...), then {EXPORT_HELP}"
        )
    if name not in STUDENT_MODELS + CTC_MODELS:
        raise ExportInputError(f"{path} holds a {name!r} model, not a distilled student: {EXPORT_HELP}")
    fix = f"not from a distilled thin_hubert student; fairseq-kd-export writes students only: {EXPORT_HELP}"
    found = encoder_state(state, path, ExportInputError, STUDENT_MODELS, fix)
    del state
    source = "distillation" if found.source == "pretrained" else found.source
    student_cfg, weights, normalize = found.cfg.model, found.weights, found.normalize
    model_cfg = _student_config(student_cfg, path)
    model = ThinHubertModel(model_cfg)
    model.remove_pretraining_modules()
    _load_weights(model, weights, path)
    model.eval()
    return LoadedStudent(
        model=model,
        path=path,
        source=source,
        normalize=bool(normalize),
        sample_rate=found.sample_rate,
        model_cfg={f.name: getattr(model_cfg, f.name) for f in fields(model_cfg)},
    )


def _student_config(student_cfg: Mapping[str, Any], path: str) -> ThinHubertConfig:
    known = {f.name for f in fields(ThinHubertConfig)}
    plain = {k: _plain(v) for k, v in student_cfg.items() if k != "_name"}
    unknown = sorted(set(plain) - known)
    if unknown:
        raise ExportInputError(
            f"{path}: the student config has keys thin_hubert does not know: {unknown} (written by "
            f"another version of fairseq_kd?); export it with the fairseq_kd version that trained it"
        )
    cfg = ThinHubertConfig(**plain)
    try:
        check_config(cfg)
    except ValueError as error:
        raise ExportInputError(
            f"{path}: the student config is invalid: {error}; the checkpoint was edited: export the "
            f"checkpoint_*.pt written by training, unchanged"
        ) from None
    return cfg


def _plain(value: Any) -> Any:
    # OmegaConf containers (the cfg of a loaded checkpoint) -> plain python
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with fairseq
        pass
    return value


def _load_weights(model: ThinHubertModel, weights: Dict[str, torch.Tensor], path: str) -> None:
    # heads were set to None: their keys are ignorable under strict loading (thin_hubert.py)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in weights)
    unexpected = sorted(k for k in weights if k not in own and k.split(".", 1)[0] not in HEAD_MODULES)
    shapes = sorted(
        f"{k}: checkpoint {tuple(weights[k].shape)} vs config {tuple(v.shape)}"
        for k, v in own.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or shapes:
        problems = []
        if shapes:
            problems.append(f"{len(shapes)} shape mismatches, e.g. {shapes[:3]}")
        if missing:
            problems.append(f"{len(missing)} weights missing, e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected weights, e.g. {unexpected[:3]}")
        raise ExportInputError(
            f"{path}: the weights do not match the student config stored with them ("
            + "; ".join(problems)
            + "); the checkpoint was edited or mixes two runs: export the checkpoint_*.pt written by "
            "training, unchanged"
        )
    model.load_state_dict(weights, strict=True)
