"""How close a distilled student is to its teacher, on held-out audio.

Per distilled output (``h4``: the hint head on student layer 4, ``p8``: the prediction of teacher
layer 8), the mean over all valid frames of the cosine similarity between the student's output and
its teacher target, exactly as the training criterion pairs them.
"""

from typing import Dict, Optional

import soundfile as sf
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from fairseq_kd.criterions.kd_losses import align_to_teacher, cosine_similarity_per_frame
from fairseq_kd.criterions.layer_distill import LayerDistillConfig, build_targets, teacher_target
from fairseq_kd.data.manifest import read_manifest
from fairseq_kd.teacher import FrozenTeacher


def load_student(checkpoint: str):
    """A distilled student with its heads, and its training config; the teacher is not loaded."""
    from fairseq import checkpoint_utils

    models, cfg, _task = checkpoint_utils.load_model_ensemble_and_task([checkpoint])
    model = models[0]
    model.eval()
    return model, cfg


def criterion_config(cfg) -> LayerDistillConfig:
    """The checkpoint's criterion settings on top of the generic criterion's defaults."""
    base = OmegaConf.structured(LayerDistillConfig)
    saved = {k: v for k, v in OmegaConf.to_container(cfg.criterion).items() if k in base and k != "_name"}
    return OmegaConf.merge(base, saved)


@torch.no_grad()
def similarity_to_teacher(
    model, cfg, teacher: FrozenTeacher, manifest: str, max_utterances: Optional[int] = None
) -> Dict[str, float]:
    """Mean frame-level cosine similarity of every distilled output to its teacher target."""
    targets = build_targets(criterion_config(cfg), cfg.model)
    root, rows = read_manifest(manifest)
    sums = {t.name: 0.0 for t in targets}
    frames = {t.name: 0 for t in targets}
    for row in rows[:max_utterances]:
        wav, _ = sf.read(str(root / row.path), dtype="float32")
        source = torch.from_numpy(wav).unsqueeze(0)
        if cfg.task.normalize:
            source = F.layer_norm(source, source.shape)
        student = model(source=source)
        teacher_states, teacher_mask = teacher.hidden_states(source, None)
        for target in targets:
            s, t, valid = align_to_teacher(
                student[target.kind][target.key].float(),
                teacher_target(teacher_states, target.teacher_layers),
                teacher_mask,
            )
            cos = cosine_similarity_per_frame(s, t)
            sums[target.name] += float(cos[valid].sum())
            frames[target.name] += int(valid.sum())
    return {name: sums[name] / max(frames[name], 1) for name in sums}
