"""Pure tensor functions for layer-to-layer distillation losses (no fairseq imports, no state).

Conventions used throughout:

* Hidden states are batch-first: ``(B, T, D)``.
* Padding masks follow fairseq: ``True`` = padding. The ``valid`` masks returned and consumed here
  are the opposite (``True`` = the frame counts); ``align_to_teacher`` does the conversion once.
* Losses are **sums over valid frames**, not means. A fairseq criterion returns
  ``(loss, sample_size, logging_output)`` and fairseq divides by ``sample_size`` (here: the number of
  valid frames) *after* summing across GPUs and accumulated batches, so summing here gives the exact
  per-frame mean over the whole update however frames are spread over workers. Per-frame terms are
  means over ``D`` so that ``sum / frames`` equals the usual ``mean over (B, T, D)`` of the papers
  (DistilHuBERT's L1, FitHuBERT's MSE), restricted to non-padded frames.
* Padded frames never count, whatever they contain: both inputs are zero-filled there before any
  arithmetic, so even inf/NaN in padding cannot reach the loss or the student's gradient.
* Teacher targets carry no gradient: they are detached here, so an accidentally unfrozen teacher is
  never trained by the distillation loss.
* Loss terms are computed in float32 even for fp16/bf16 inputs (DistilHuBERT also keeps the
  teacher in fp32): squared errors overflow fp16 and the cosine eps underflows it.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq_kd.encoders.frames import pool_frames

__all__ = [
    "COS_EPS",
    "align_to_teacher",
    "mean_of_layers",
    "l1_per_frame",
    "l2_per_frame",
    "cosine_similarity_per_frame",
    "cosine_per_frame",
    "logsig_cosine_per_frame",
    "masked_sum",
    "count",
    "layer_loss",
    "hint_weights",
]

COS_EPS = 1e-8  # floor on each vector norm; zero vectors (e.g. zero-filled padding) give cos = 0


# -- frame alignment ------------------------------------------------------------------------------
def _check_hidden(name: str, x: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be (B, T, D), got shape {tuple(x.shape)}")


def _check_mask(name: str, mask: Tensor, hidden: Tensor) -> None:
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"{name} must be a bool (B, T) = {tuple(hidden.shape[:2])} tensor, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )


def _detect_rate(ts: int, tt: int) -> Optional[int]:
    """Integer r with teacher length ~ r * student length, or None.

    Same rate wins whenever the lengths are within one frame, so very short inputs
    (e.g. Ts=1, Tt=2) are treated as off-by-one, not as 2x; pass ``rate`` to override.
    """
    if abs(tt - ts) <= 1:
        return 1
    r = int(round(tt / ts))
    if r >= 2 and abs(tt - r * ts) <= r:
        return r
    return None


def align_to_teacher(
    student: Tensor,
    teacher: Tensor,
    teacher_mask: Optional[Tensor],
    *,
    student_mask: Optional[Tensor] = None,
    rate: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Bring a student layer and a teacher target to the same frames.

    Args:
        student: (B, Ts, D) student hidden states (after any projection head).
        teacher: (B, Tt, D) teacher hidden states; detached here.
        teacher_mask: (B, Tt) bool, True = padding, or None (no padding).
        student_mask: (B, Ts) bool, True = padding, or None. Pass it when per-utterance lengths
            can differ by a frame between the two CNNs; otherwise the teacher's mask alone
            decides, and a student padding frame could count.
        rate: force the teacher/student frame-rate ratio instead of detecting it.

    Frame rates: if Tt is about r * Ts for an integer r >= 2 (``|Tt - r*Ts| <= r``), the teacher
    is average-pooled over non-overlapping groups of r frames (e.g. a 20 ms teacher for a student
    with a 40 ms time-reduction layer) by the project's one time-reduction rule
    (``encoders/frames.pool_frames``): a pooled frame is valid if any of its source frames is, and
    averages the valid ones, exactly as the student's reduced frames are kept.
    Then both are trimmed to the shorter length, which absorbs the off-by-one lengths that two
    different CNN front-ends produce. Student and teacher (and r, if given) must then agree to
    within one frame; a student at a *higher* rate than the teacher is not handled (upsample
    it first, as FitHuBERT's ConvTranspose heads do).

    Returns:
        (student, teacher, valid): (B, T, D), (B, T, D) and (B, T) bool with True = the frame
        counts. Padded frames of both outputs are zero-filled.

    Raises:
        ValueError (naming both shapes) on rank, batch or D mismatch, or irreconcilable lengths.
    """
    _check_hidden("student", student)
    _check_hidden("teacher", teacher)
    shapes = f"student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
    if student.shape[0] != teacher.shape[0] or student.shape[2] != teacher.shape[2]:
        raise ValueError(f"batch size and feature dim must match: {shapes}")
    ts, tt = student.shape[1], teacher.shape[1]
    if ts == 0 or tt == 0:
        raise ValueError(f"empty sequence: {shapes}")

    teacher = teacher.detach()
    if teacher_mask is None:
        t_valid = torch.ones(teacher.shape[:2], dtype=torch.bool, device=teacher.device)
    else:
        _check_mask("teacher_mask", teacher_mask, teacher)
        t_valid = ~teacher_mask
    if student_mask is None:
        s_valid = torch.ones(student.shape[:2], dtype=torch.bool, device=student.device)
    else:
        _check_mask("student_mask", student_mask, student)
        s_valid = ~student_mask

    r = _detect_rate(ts, tt) if rate is None else rate
    if r is None or r < 1:
        raise ValueError(f"cannot reconcile frame rates (no integer teacher/student ratio): {shapes}")
    if r > 1:
        teacher, t_valid = pool_frames(teacher, t_valid, r)
    if abs(teacher.shape[1] - ts) > 1:
        raise ValueError(
            f"cannot reconcile frame rates: after pooling the teacher by {r} it has "
            f"{teacher.shape[1]} frames vs {ts} student frames (more than one apart): {shapes}"
        )

    t = min(ts, teacher.shape[1])
    valid = t_valid[:, :t] & s_valid[:, :t]
    student, teacher = _zero_invalid(student[:, :t], valid), _zero_invalid(teacher[:, :t], valid)
    return student, teacher, valid


def _zero_invalid(x: Tensor, valid: Tensor) -> Tensor:
    """Zero padded frames so that inf/NaN there cannot leak through arithmetic or gradients
    (``where`` alone still back-propagates 0 * NaN = NaN through the unselected branch)."""
    return x.masked_fill(~valid.unsqueeze(-1), 0.0)


def mean_of_layers(layers: Sequence[Tensor]) -> Tensor:
    """Average of several teacher layers, each (B, T, D) -> (B, T, D).

    LightHuBERT-style targets (data2vec: the mean of the teacher's last 8 layers). Plain mean,
    no per-layer normalisation.
    """
    if len(layers) == 0:
        raise ValueError("mean_of_layers needs at least one layer")
    shapes = {tuple(x.shape) for x in layers}
    if len(shapes) != 1:
        raise ValueError(f"all layers must have the same shape, got {sorted(shapes)}")
    return torch.stack(list(layers), dim=0).mean(dim=0)


# -- per-frame terms: (B, T, D) x (B, T, D) -> (B, T) ---------------------------------------------
def _as_float(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def l1_per_frame(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over D of |s - t|: (B, T, D) -> (B, T). DistilHuBERT / DPHuBERT / LightHuBERT L1."""
    return (_as_float(student) - _as_float(teacher)).abs().mean(dim=-1)


def l2_per_frame(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over D of (s - t)^2, i.e. FitHuBERT's MSE: (B, T, D) -> (B, T)."""
    return (_as_float(student) - _as_float(teacher)).pow(2).mean(dim=-1)


def cosine_similarity_per_frame(student: Tensor, teacher: Tensor, eps: float = COS_EPS) -> Tensor:
    """cos(s_t, t_t) over D: (B, T, D) -> (B, T).

    Each norm is floored at ``eps`` separately, so a zero vector gives cos = 0 and a finite
    gradient (the zero-filled padding frames rely on this).
    """
    s, t = _as_float(student), _as_float(teacher)
    dot = (s * t).sum(dim=-1)
    norms = s.norm(dim=-1).clamp_min(eps) * t.norm(dim=-1).clamp_min(eps)
    return dot / norms


def cosine_per_frame(student: Tensor, teacher: Tensor) -> Tensor:
    """Raw cosine distance 1 - cos: (B, T, D) -> (B, T), in [0, 2].

    DPHuBERT (``cos_type raw``) minimises -cos; 1 - cos differs by a constant, so the gradient
    is the same and a perfect match scores 0.
    """
    return 1.0 - cosine_similarity_per_frame(student, teacher)


def logsig_cosine_per_frame(student: Tensor, teacher: Tensor) -> Tensor:
    """DistilHuBERT's -log sigmoid(cos): (B, T, D) -> (B, T).

    Never reaches 0: log(1 + e^-1) ~ 0.3133 for a perfect match, log 2 for orthogonal vectors.
    """
    return -F.logsigmoid(cosine_similarity_per_frame(student, teacher))


# -- reductions ----------------------------------------------------------------------------------
def masked_sum(per_frame: Tensor, valid: Tensor) -> Tensor:
    """Scalar sum of per_frame (B, T) over frames where valid (B, T) bool is True."""
    if per_frame.shape != valid.shape:
        raise ValueError(f"per_frame {tuple(per_frame.shape)} and valid {tuple(valid.shape)} differ")
    return torch.where(valid, per_frame, torch.zeros_like(per_frame)).sum()


def count(valid: Tensor) -> Tensor:
    """Number of valid frames in valid (B, T) bool, as a scalar int64 tensor."""
    return valid.sum()


_COS_TERMS = {"logsig": logsig_cosine_per_frame, "raw": cosine_per_frame}


def layer_loss(
    student: Tensor,
    teacher: Tensor,
    valid: Tensor,
    l1: float = 0.0,
    l2: float = 0.0,
    cos: float = 0.0,
    cos_type: str = "logsig",
) -> Dict[str, Tensor]:
    """Weighted distillation loss of one student layer against one teacher target.

    Args:
        student, teacher: (B, T, D), already aligned (see ``align_to_teacher``); teacher detached.
        valid: (B, T) bool, True = the frame counts.
        l1, l2, cos: weights of the L1, MSE and cosine terms; a term with weight 0 is skipped.
        cos_type: "logsig" (-log sigmoid(cos), DistilHuBERT) or "raw" (1 - cos, DPHuBERT).

    Returns a dict of scalar tensors, all **sums over valid frames** (never means: fairseq
    divides by ``sample_size`` = frames after reducing across GPUs and batches):
        "l1" / "l2" / "cos": the *unweighted* sum of each enabled term (for logging),
        "loss": sum of weight * term over the enabled terms (the one to back-propagate),
        "cos_sim": sum of the plain cosine similarity (detached, for logging),
        "frames": number of valid frames (int64).
    DistilHuBERT for one layer is ``l1=1, cos=1, cos_type="logsig"``; FitHuBERT is ``l2=w``.
    """
    if student.shape != teacher.shape or student.dim() != 3:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "must be equal (B, T, D) shapes; use align_to_teacher first")
    _check_mask("valid", valid, student)
    if cos_type not in _COS_TERMS:
        raise ValueError(f"cos_type must be one of {sorted(_COS_TERMS)}, got {cos_type!r}")
    weights = {"l1": l1, "l2": l2, "cos": cos}
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"loss weights must be >= 0, got {weights}")
    if not any(w > 0 for w in weights.values()):
        raise ValueError("layer_loss needs at least one of l1, l2, cos > 0")

    student = _zero_invalid(student, valid)
    teacher = _zero_invalid(teacher.detach(), valid)
    terms = {"l1": l1_per_frame, "l2": l2_per_frame, "cos": _COS_TERMS[cos_type]}

    out: Dict[str, Tensor] = {}
    loss = student.new_zeros((), dtype=torch.float32)
    for name, w in weights.items():
        if w > 0:
            out[name] = masked_sum(terms[name](student, teacher), valid)
            loss = loss + w * out[name]
    out["loss"] = loss
    with torch.no_grad():
        out["cos_sim"] = masked_sum(cosine_similarity_per_frame(student, teacher), valid)
    out["frames"] = count(valid)
    return out


def hint_weights(num_outputs: int, hint_weight: float = 0.1, last_weight: float = 1.0) -> List[float]:
    """FitHuBERT's per-output weights: ``hint_weight`` on outputs 1..N-1, ``last_weight`` on output N."""
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    return [float(hint_weight)] * (num_outputs - 1) + [float(last_weight)]
