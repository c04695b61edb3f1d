# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Read the student out of a distillation or fine-tuned CTC checkpoint, or say why it cannot.

Accepted (``cfg.model._name`` of the fairseq checkpoint):

- ``thin_hubert`` / ``thin_hubert_w2v``: a distillation checkpoint (``fairseq-hydra-train
  --config-name thin_deep|distilhubert|...``); the distillation heads are dropped, or kept with
  ``keep_heads`` (for ``fairseq-kd-export --outputs heads``), together with the teacher layer(s)
  each head learnt (:func:`head_targets`, the criterion's own mapping).
- ``hubert_ctc`` / ``wav2vec_ctc`` whose ``w2v_args`` hold a ``thin_hubert`` student (written by
  ``kd_audio_finetuning``): the fine-tuned encoder ``w2v_encoder.w2v_model.*``, without the CTC
  output layer.

Everything else stops with a message naming the file and what to pass instead: a teacher (fairseq
``hubert`` / ``wav2vec2`` / ``data2vec_audio``, or a CTC model fine-tuned from one), an unknown
model, a config the weights do not match, a missing, truncated or non-fairseq file.
"""

import os
import zipfile
from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Any, Dict, List, Mapping, Optional

import torch

from fairseq_kd.criterions.layer_distill import DistillTarget, build_targets
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
    model: ThinHubertModel  # eval mode, distillation heads removed unless kept (``head_targets``)
    path: str
    source: str  # "distillation", "hubert_ctc" or "wav2vec_ctc"
    normalize: bool
    sample_rate: int
    model_cfg: Dict[str, Any]  # the thin_hubert fields the model was built from
    # the kept heads' outputs in teacher-layer order (empty: no heads, or they were dropped)
    head_targets: List[DistillTarget] = field(default_factory=list)
    criterion: Optional[str] = None  # the distillation criterion's _name (None: a fine-tuned checkpoint)


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


def load_student(path: str, keep_heads: bool = False) -> LoadedStudent:
    """The student of a distillation or fine-tuned checkpoint, built and strictly loaded, in eval mode.

    ``keep_heads``: keep the distillation heads of a distillation checkpoint that has them (a CTC
    checkpoint holds the encoder only), with ``head_targets`` saying which teacher layer(s) each learnt.
    """
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
    heads = keep_heads and source == "distillation" and has_heads(model)
    criterion_cfg = found.cfg.get("criterion", None) if source == "distillation" else None
    targets = head_targets(model_cfg, criterion_cfg, path) if heads else []
    if not heads:
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
        head_targets=targets,
        criterion=criterion_cfg.get("_name", None) if criterion_cfg is not None else None,
    )


def has_heads(model: ThinHubertModel) -> bool:
    return model.hint_heads is not None or model.pred_head is not None


def head_targets(model_cfg: ThinHubertConfig, criterion_cfg: Any, path: str) -> List[DistillTarget]:
    """Each distillation head's output and the teacher layer(s) it learnt, in teacher-layer order.

    The pairing is the criterion's own (``layer_distill.build_targets``: ``criterion.hint_targets``,
    or a hint learns the teacher layer of its student layer's id; a prediction head its listed
    layer), so that the export describes the heads exactly as training used them.
    """
    hint_targets = []
    if criterion_cfg is not None and criterion_cfg.get("hint_targets", None):
        hint_targets = [str(t) for t in _plain(criterion_cfg["hint_targets"])]
    spec = SimpleNamespace(
        hint_layer_ids=list(model_cfg.hint_layer_ids), pred_layer_ids=list(model_cfg.pred_layer_ids),
        hint_targets=hint_targets, layer_weights=[], hint_weight=None,  # weights do not matter here
    )
    try:
        targets = build_targets(spec)
    except ValueError as error:
        raise ExportInputError(
            f"{path}: the distillation heads cannot be paired with teacher layers ({error}); the checkpoint "
            f"was edited: export the checkpoint_*.pt written by training, unchanged"
        ) from None
    # stable: heads learning the same teacher layer keep the config's order
    return sorted(targets, key=lambda target: list(target.teacher_layers))



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
