"""Per-layer features of a teacher and its students on a manifest, for CKA and the probes.

Hidden states come only from ``FrozenTeacher.hidden_states`` (teacher) and ``ThinHubertModel.encode``
(students), one utterance at a time (no padding). A student layer is put on the teacher's frames
by ``criterions/kd_losses.align_to_teacher`` (rate detection, pooling of the teacher over a time
reduction, off-by-one trimming): the student layer and the teacher's stacked layers are zero-padded
to one width for the call and sliced apart afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq_kd.criterions.kd_losses import align_to_teacher
from fairseq_kd.data.manifest import ManifestRow, read_manifest, read_waveform
from fairseq_kd.teacher import FrozenTeacher


@dataclass
class LayerFeatures:
    """``layers[l][u]``: (T_l, D) frames of layer l (0 = CNN feature after the projection) for utterance u."""

    name: str
    layers: List[List[Tensor]] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        """Transformer layers (``layers`` also holds layer 0)."""
        return len(self.layers) - 1

    def add(self, states: Sequence[Tensor]) -> None:
        if not self.layers:
            self.layers = [[] for _ in states]
        for store, state in zip(self.layers, states):
            store.append(state[0].detach().float().cpu())

    def pooled(self, layer: int) -> Tensor:
        """(utterances, D): each utterance's frames averaged (the speaker probe's input)."""
        return torch.stack([x.mean(0) for x in self.layers[layer]])


@dataclass
class AlignedPairs:
    """For each student layer l: its frames ``student[l]`` (N_l, Ds) and the teacher's layers on the
    same N_l frames, ``teacher[l][k]`` (N_l, Dt), over all utterances."""

    student: List[Tensor]
    teacher: List[List[Tensor]]


def read_audio(root: Path, row: ManifestRow) -> Tensor:
    return read_waveform(root, row).unsqueeze(0)


def normalized(source: Tensor, normalize: bool) -> Tensor:
    return F.layer_norm(source, source.shape) if normalize else source


def aligned(student: Tensor, teacher_states: Sequence[Tensor]) -> tuple:
    """One student layer (1, Ts, Ds) and every teacher layer (1, Tt, Dt) on the same frames."""
    stacked = torch.cat(list(teacher_states), dim=-1)
    width = max(student.size(-1), stacked.size(-1))
    s, t, valid = align_to_teacher(
        F.pad(student, (0, width - student.size(-1))), F.pad(stacked, (0, width - stacked.size(-1))), None
    )
    s, t = s[valid][:, : student.size(-1)], t[valid][:, : stacked.size(-1)]
    return s, list(t.split(teacher_states[0].size(-1), dim=-1))


@torch.no_grad()
def collect_features(
    manifest: str,
    teacher: FrozenTeacher,
    students: Dict[str, torch.nn.Module],
    student_normalize: Dict[str, bool],
    max_utterances: Optional[int] = None,
    indices: Optional[Sequence[int]] = None,
) -> tuple:
    """Returns ``(rows, teacher LayerFeatures, {name: LayerFeatures}, {name: AlignedPairs})`` for the
    manifest's rows ``indices`` (default: the first ``max_utterances``)."""
    root, rows = read_manifest(manifest)
    rows = rows[:max_utterances] if indices is None else [rows[i] for i in indices]
    teacher_feats = LayerFeatures("teacher")
    feats = {name: LayerFeatures(name) for name in students}
    pairs_s: Dict[str, List[List[Tensor]]] = {name: [] for name in students}
    pairs_t: Dict[str, List[List[List[Tensor]]]] = {name: [] for name in students}
    for row in rows:
        wav = read_audio(root, row)
        t_states, _ = teacher.hidden_states(normalized(wav, teacher.normalize), None)
        teacher_feats.add(t_states)
        for name, model in students.items():
            states = model.encode(normalized(wav, student_normalize[name]))["hidden_states"]
            feats[name].add(states)
            if not pairs_s[name]:
                pairs_s[name] = [[] for _ in states]
                pairs_t[name] = [[[] for _ in t_states] for _ in states]
            for l, state in enumerate(states):
                s, ts = aligned(state.float(), t_states)
                pairs_s[name][l].append(s)
                for k, t in enumerate(ts):
                    pairs_t[name][l][k].append(t)
    pairs = {
        name: AlignedPairs(
            [torch.cat(x) for x in pairs_s[name]],
            [[torch.cat(t) for t in layer] for layer in pairs_t[name]],
        )
        for name in students
    }
    return rows, teacher_feats, feats, pairs


__all__ = ["AlignedPairs", "LayerFeatures", "aligned", "collect_features", "normalized", "read_audio"]
