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
    "masking_distill_loss",
    "temporal_gram",
    "tgm_loss",
    "gram_bytes",
    "attention_map_loss",
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
    match_dim: bool = True,
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
        match_dim: False lets D differ (Ds vs Dt), for losses that compare frames with frames
            within each model (temporal Gram matrices), never student with teacher features.

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
    if student.shape[0] != teacher.shape[0] or (match_dim and student.shape[2] != teacher.shape[2]):
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


# -- masking distillation (ARMHuBERT / MaskHuBERT) -------------------------------------------------
def masking_distill_loss(
    student: Tensor,
    unmasked_teacher: Tensor,
    masked_teacher: Tensor,
    valid: Tensor,
    mask_indices: Tensor,
    l1: float = 0.0,
    l2: float = 1.0,
) -> Dict[str, Tensor]:
    """Masking distillation of one student output (docs/papers.md#armhubert-and-maskhubert).

    The student saw masked input. Its **masked** frames regress onto the teacher run on the
    **unmasked** input, its **unmasked** frames onto the teacher run on the **masked** input
    (same mask positions, the teacher's own mask embedding).

    Args:
        student: (B, T, D) student output for the masked input (after any head).
        unmasked_teacher, masked_teacher: (B, T, D) teacher targets; detached here.
        valid: (B, T) bool, True = the frame counts (padding never does).
        mask_indices: (B, T) bool, True = the frame was replaced by the mask embedding.
        l1, l2: weights of the per-frame L1 and MSE (mean over D) terms.

    Returns sums over frames (fairseq divides by ``sample_size`` = all valid frames, which is the
    paper's normalisation: each term divided by B * T, not by its own frame count):
        "masked" / "unmasked": the weighted per-frame loss summed over valid masked / unmasked
        frames; "loss": their sum; "masked_frames", "frames": counts (int64).
    """
    if not (student.shape == unmasked_teacher.shape == masked_teacher.shape) or student.dim() != 3:
        raise ValueError(
            f"student {tuple(student.shape)}, unmasked_teacher {tuple(unmasked_teacher.shape)} and "
            f"masked_teacher {tuple(masked_teacher.shape)} must be equal (B, T, D) shapes"
        )
    _check_mask("valid", valid, student)
    _check_mask("mask_indices", mask_indices, student)
    if l1 < 0 or l2 < 0 or not (l1 > 0 or l2 > 0):
        raise ValueError(f"masking_distill_loss needs l1, l2 >= 0 and one of them > 0, got {l1}, {l2}")
    masked = valid & mask_indices
    unmasked = valid & ~mask_indices
    student = _zero_invalid(student, valid)
    # each frame's target: the unmasked teacher where masked, the masked teacher elsewhere
    target = torch.where(mask_indices.unsqueeze(-1), unmasked_teacher.detach(), masked_teacher.detach())
    target = _zero_invalid(target, valid)
    per_frame = student.new_zeros(valid.shape, dtype=torch.float32)
    if l1 > 0:
        per_frame = per_frame + l1 * l1_per_frame(student, target)
    if l2 > 0:
        per_frame = per_frame + l2 * l2_per_frame(student, target)
    out = {"masked": masked_sum(per_frame, masked), "unmasked": masked_sum(per_frame, unmasked)}
    out["loss"] = out["masked"] + out["unmasked"]
    out["masked_frames"] = count(masked)
    out["frames"] = count(valid)
    return out


# -- temporal Gram matrices (STaRHuBERT) -----------------------------------------------------------
GRAM_NORMALIZE = ("frame", "none")


def temporal_gram(a: Tensor, b: Tensor, valid: Tensor, normalize: str = "frame") -> Tensor:
    """Temporal Gram matrix G[t, f] = <a_t, b_f> summed over channels: (B, T, Da), (B, T, Db) -> (B, T, T).

    ``a is b`` gives the layer-wise TGM of one layer; a layer's input and output give its
    intra-layer TGM (then Da = Db). Padded frames never enter: their rows and columns are 0.
    ``normalize``: "frame" L2-normalises every frame first (entries are cosine similarities,
    in [-1, 1], independent of the width and scale of the features), "none" is the raw product.
    Memory: B * T^2 floats (4 B each in float32): 750 x 750 (15 s at 50 Hz) is 2.25 MB per
    utterance and matrix.
    """
    _check_hidden("a", a)
    _check_hidden("b", b)
    if a.shape[:2] != b.shape[:2] or a.shape[2] != b.shape[2]:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must be equal (B, T, D) shapes")
    _check_mask("valid", valid, a)
    if normalize not in GRAM_NORMALIZE:
        raise ValueError(f"normalize must be one of {GRAM_NORMALIZE}, got {normalize!r}")
    a, b = _zero_invalid(_as_float(a), valid), _zero_invalid(_as_float(b), valid)
    if normalize == "frame":
        a = a / a.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)
        b = b / b.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)
    return a @ b.transpose(1, 2)


def tgm_loss(
    student_a: Tensor,
    student_b: Tensor,
    teacher_a: Tensor,
    teacher_b: Tensor,
    valid: Tensor,
    normalize: str = "frame",
) -> Dict[str, Tensor]:
    """MSE between the student's and the teacher's temporal Gram matrices of one layer (pair).

    Args:
        student_a, student_b: (B, T, Ds) student states (the same tensor twice for a layer-wise
            TGM; a layer's input and output for an intra-layer TGM).
        teacher_a, teacher_b: (B, T, Dt) teacher states at the same frames (Dt may differ from
            Ds: a TGM is T x T whatever the width, so no projection head is needed); detached.
        valid: (B, T) bool, True = the frame counts.
        normalize: see :func:`temporal_gram`.

    Returns "loss": sum over utterances of n_b * mean over its n_b x n_b valid entries of
    (G_s - G_t)^2, so that dividing by the frames (``sample_size``) gives the frame-weighted mean
    of each utterance's Gram MSE (the plain mean over (B, T, T) when nothing is padded);
    "frames": the valid frames (int64).
    """
    g_s = temporal_gram(student_a, student_b, valid, normalize)
    with torch.no_grad():
        g_t = temporal_gram(teacher_a.detach(), teacher_b.detach(), valid, normalize)
    pairs = (valid.unsqueeze(2) & valid.unsqueeze(1)).float()  # (B, T, T)
    lengths = valid.sum(-1).float()  # (B,)
    per_utt = ((g_s - g_t).pow(2) * pairs).sum((1, 2)) / (lengths * lengths).clamp_min(1.0)
    return {"loss": (per_utt * lengths).sum(), "frames": count(valid)}


def gram_bytes(frames: int, batch: int = 1, matrices: int = 1, bytes_per_value: int = 4) -> int:
    """Memory of ``matrices`` T x T Gram matrices for ``batch`` utterances of ``frames`` frames."""
    return int(frames) * int(frames) * int(batch) * int(matrices) * int(bytes_per_value)


def attention_map_loss(student_maps: Tensor, teacher_maps: Tensor, valid: Tensor) -> Dict[str, Tensor]:
    """KL(teacher || student) between head-averaged attention maps, summed over query frames.

    Args:
        student_maps, teacher_maps: (B, H, T, T) or (B, T, T) attention weights (rows sum to 1
            over the valid keys); head counts may differ: each is averaged over its own heads.
        valid: (B, T) bool, True = the frame counts; padded queries never count and padded keys
            are dropped and the rows re-normalised.

    Returns "loss": sum over valid query frames of sum_f p_t log(p_t / p_s); "frames".
    """
    def averaged(maps: Tensor) -> Tensor:
        maps = _as_float(maps)
        return maps.mean(dim=1) if maps.dim() == 4 else maps

    s, t = averaged(student_maps), averaged(teacher_maps.detach())
    if s.shape != t.shape or s.dim() != 3 or s.shape[1] != s.shape[2]:
        raise ValueError(f"attention maps must be (B, [H,] T, T) of the same T, got {tuple(student_maps.shape)} "
                         f"and {tuple(teacher_maps.shape)}")
    if tuple(valid.shape) != tuple(s.shape[:2]) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool {tuple(s.shape[:2])} tensor, got {valid.dtype} {tuple(valid.shape)}")
    keys = valid.unsqueeze(1)  # (B, 1, T)
    s = s.masked_fill(~keys, 0.0)
    t = t.masked_fill(~keys, 0.0)
    s = s / s.sum(-1, keepdim=True).clamp_min(COS_EPS)
    t = t / t.sum(-1, keepdim=True).clamp_min(COS_EPS)
    per_query = torch.where(t > 0, t * (t.clamp_min(COS_EPS).log() - s.clamp_min(COS_EPS).log()),
                            torch.zeros_like(t)).sum(-1)
    return {"loss": masked_sum(per_query, valid), "frames": count(valid)}
