"""How close a distilled student is to its teacher, on held-out audio.

Per distilled output (``h4``: the hint head on student layer 4, ``p8``: the prediction of teacher
layer 8), the mean over all valid frames of the cosine similarity between the student's output and
its teacher target, paired exactly as the training criterion pairs them (``build_targets``).
"""

from typing import Any, Dict, Optional, Tuple

import torch
from omegaconf import OmegaConf

from fairseq_kd.criterions.kd_losses import align_to_teacher, cosine_similarity_per_frame
from fairseq_kd.criterions.layer_distill import LayerDistillConfig, build_targets, student_output, teacher_target
from fairseq_kd.data.manifest import read_manifest, read_waveform
from fairseq_kd.encoders.pretrained import build_encoder, read_checkpoint
from fairseq_kd.teacher import FrozenTeacher, initialise_student

LOAD_HELP = "give a distillation checkpoint (checkpoint_best.pt / checkpoint_last.pt of fairseq-hydra-train)"


def load_distilled(checkpoint: str) -> Tuple[torch.nn.Module, Any]:
    """A distilled student *with* its distillation heads, in eval mode, and its training config;
    the teacher is not loaded. (``fairseq_kd.export.load_student`` drops the heads.)"""
    state = read_checkpoint(checkpoint, f"student checkpoint {checkpoint}", LOAD_HELP)
    cfg = state["cfg"]
    model = build_encoder(cfg, state["model"], f"student checkpoint {checkpoint}", ValueError, keep_heads=True)
    model.eval()
    return model, cfg


def initialised_student(cfg, teacher: Optional[FrozenTeacher] = None) -> torch.nn.Module:
    """The student a distillation checkpoint's ``cfg`` starts from, with its heads, in eval mode:
    built with the run's seed (``common.seed``) and, when ``teacher`` is given, the parts the
    config copies from the teacher copied as ``distill_hubert`` does. Without ``teacher``: the
    same architecture at random initialisation (the undistilled twin). The random tensors follow
    the same procedure as the run's but are not bit-identical to them (the trainer draws from
    the generator before building the model)."""
    torch.manual_seed(int(cfg.common.seed))
    model = build_encoder(cfg, None, "student config", ValueError, keep_heads=True)
    if teacher is not None:
        initialise_student(model, cfg.model, teacher)
    model.eval()
    return model


def criterion_config(cfg) -> LayerDistillConfig:
    """The checkpoint's criterion settings on top of the generic criterion's defaults; the student's
    outputs come from its model config (checkpoints written before the criterion stored them lack
    ``criterion.hint_layer_ids``)."""
    base = OmegaConf.structured(LayerDistillConfig)
    saved = {k: v for k, v in OmegaConf.to_container(cfg.criterion).items() if k in base and k != "_name"}
    saved["hint_layer_ids"] = list(cfg.model.hint_layer_ids)
    saved["pred_layer_ids"] = list(cfg.model.pred_layer_ids)
    return OmegaConf.merge(base, saved)


@torch.no_grad()
def similarity_to_teacher(
    model, cfg, teacher: FrozenTeacher, manifest: str, max_utterances: Optional[int] = None
) -> Dict[str, float]:
    """Mean frame-level cosine similarity of every distilled output to its teacher target."""
    targets = build_targets(criterion_config(cfg))
    root, rows = read_manifest(manifest)
    sums = {t.name: 0.0 for t in targets}
    frames = {t.name: 0 for t in targets}
    for row in rows[:max_utterances]:
        source = read_waveform(root, row, normalize=bool(cfg.task.normalize)).unsqueeze(0)
        student = model(source=source)
        teacher_states, teacher_mask = teacher.hidden_states(source, None)
        for target in targets:
            s, t, valid = align_to_teacher(
                student_output(student, target).float(),
                teacher_target(teacher_states, target.teacher_layers),
                teacher_mask,
            )
            cos = cosine_similarity_per_frame(s, t)
            sums[target.name] += float(cos[valid].sum())
            frames[target.name] += int(valid.sum())
    return {name: sums[name] / max(frames[name], 1) for name in sums}
