"""Every rule that turns samples into frames, once: lengths, rates, receptive field, padding masks,
time reduction and repeating reduced frames back to the CNN rate.

Pure arithmetic on torch tensors (no fairseq, no model classes), so the student, the teacher, the
losses, the fine-tuning checks and the standalone export all count frames the same way. Python
ints and numpy arrays go through the same tensor code on the CPU (no device sync).

Conventions:

* A CNN is described by its ``specs``: ``(dim, kernel, stride)`` per conv layer, as fairseq's
  ``conv_feature_layers``. Convolutions are unpadded: ``floor((L - k) / s) + 1`` frames per layer.
* Padding masks are fairseq's: ``True`` = padding, right-padded rows (every mask fairseq's audio
  datasets make is right-padded, so a mask is equivalent to its rows' lengths).
* **Time reduction by r** maps frames ``[j*r, (j+1)*r)`` to reduced frame ``j``. A reduced frame is
  valid if *any* of its source frames is (an utterance of ``n`` frames keeps ``ceil(n / r)``), and
  its value is made from the valid source frames only (padded ones are zeroed before the student's
  reduction conv, and left out of the teacher's pooled mean). One rule for the student's reduction,
  the pooled teacher targets of the losses and the CTC length check, because:
  it drops no audio (the last, partial group still counts: ``floor(n / r)`` would drop up to r - 1
  frames of speech and give a one-frame utterance no frame at all, which CTC cannot align), and a
  padded row gives exactly what the utterance gives alone (its partial group sees the same valid
  frames either way).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

ConvSpecs = Sequence[Tuple[int, int, int]]
Lengths = Union[Tensor, np.ndarray, Sequence[int], int]


# -- the CNN ------------------------------------------------------------------------------------------
def conv_specs(model: nn.Module) -> List[Tuple[int, int, int]]:
    """``(dim, kernel, stride)`` of each CNN layer of a wav2vec 2.0 / HuBERT / thin_hubert model, read
    from its built ``feature_extractor`` (the first module of every block is its Conv1d)."""
    specs = []
    for block in model.feature_extractor.conv_layers:
        conv = block[0]
        specs.append((conv.out_channels, conv.kernel_size[0], conv.stride[0]))
    return specs


def specs_from_fields(channels: Sequence[int], kernels: Sequence[int], strides: Sequence[int]) -> List[Tuple[int, int, int]]:
    """Specs from thin_hubert's ``conv_channels`` / ``conv_kernels`` / ``conv_strides``."""
    return [(int(c), int(k), int(s)) for c, k, s in zip(channels, kernels, strides)]


def samples_per_frame(specs: ConvSpecs) -> int:
    """The CNN's hop in samples (320 for HuBERT's CNN: 20 ms at 16 kHz)."""
    hop = 1
    for _, _, stride in specs:
        hop *= stride
    return hop


def receptive_field(specs: ConvSpecs) -> int:
    """Samples seen by one frame: the shortest input that yields a frame (400 for HuBERT's CNN)."""
    field, hop = 1, 1
    for _, kernel, stride in specs:
        field += (kernel - 1) * hop
        hop *= stride
    return field


def _floor_div(x, d: int):
    """Floor division of non-negative-or-not integer lengths: tensors stay tensors (on their
    device, traceable), ints and arrays are computed with numpy on the host (no device read)."""
    if isinstance(x, Tensor):
        return torch.div(x, d, rounding_mode="floor")
    return np.floor_divide(x, d)


def _clamp0(x):
    return x.clamp(min=0) if isinstance(x, Tensor) else np.maximum(x, 0)


def _lengths(lengths: Lengths):
    return lengths.long() if isinstance(lengths, Tensor) else np.asarray(lengths, dtype=np.int64)


def conv_output_lengths(lengths: Lengths, specs: ConvSpecs):
    """Frames produced by the unpadded conv stack: ``floor((L - k) / s) + 1`` per layer.

    Args:
        lengths: input lengths in samples: a tensor (kept on its device; a long tensor comes
            back), or ints / a sequence / a numpy array (computed on the host; an int64 numpy
            array or scalar comes back)
        specs: ``(dim, kernel, stride)`` per layer
    Returns:
        frames per input, clamped at 0 for inputs shorter than the receptive field
    """
    lengths = _lengths(lengths)
    for _, kernel, stride in specs:
        lengths = _clamp0(_floor_div(lengths - kernel, stride) + 1)  # 0 frames stay 0 frames
    return lengths


def output_lengths(lengths: Lengths, specs: ConvSpecs, reduction: int = 1):
    """Frames at a model's output: the conv stack, then time reduction by ``reduction``."""
    return reduced_lengths(conv_output_lengths(lengths, specs), reduction)


# -- padding masks --------------------------------------------------------------------------------------
def lengths_to_padding_mask(lengths: Tensor, num_frames: int) -> Tensor:
    """(B,) valid frames -> (B, T) bool, True = pad."""
    frames = torch.arange(num_frames, device=lengths.device)
    return frames.unsqueeze(0) >= lengths.unsqueeze(1)


def valid_lengths(padding_mask: Tensor) -> Tensor:
    """(B, T) bool, True = pad (right-padded) -> (B,) long valid entries per row."""
    return (~padding_mask).long().sum(-1)


def frames_padding_mask(padding_mask: Optional[Tensor], specs: ConvSpecs, num_frames: int) -> Optional[Tensor]:
    """Frame padding mask from a sample padding mask, exact for any length.

    A frame is valid iff its whole receptive field lies inside the utterance. fairseq's HuBERT
    instead reshapes the sample mask into ``num_frames`` chunks, which is off for lengths that are
    not a multiple of the hop.

    Args:
        padding_mask: (B, S) bool, True = pad (right padding), or None
        specs: ``(dim, kernel, stride)`` per conv layer
        num_frames: T, the number of frames the conv stack produced for S samples
    Returns:
        (B, T) bool, True = pad, or None when ``padding_mask`` is None
    """
    if padding_mask is None:
        return None
    return lengths_to_padding_mask(conv_output_lengths(valid_lengths(padding_mask), specs), num_frames)


# -- time reduction ------------------------------------------------------------------------------------
def reduced_lengths(lengths: Lengths, factor: int):
    """Valid frames after time reduction by ``factor``: ``ceil(n / r)`` (see the module docstring).
    Tensors, ints and arrays as :func:`conv_output_lengths`."""
    lengths = _lengths(lengths)
    return lengths if factor == 1 else _floor_div(lengths + (factor - 1), factor)


def reduced_num_frames(num_frames: int, factor: int) -> int:
    """Frames of a reduced sequence: the input is right-padded to a multiple of ``factor``.

    Written with non-negative operands only: on a traced (symbolic) length, ``-(-T // r)``
    becomes a truncating division in ONNX and loses the partial group.
    """
    return (num_frames + factor - 1) // factor


def reduce_padding_mask(padding_mask: Optional[Tensor], factor: int) -> Optional[Tensor]:
    """(B, T) -> (B, ceil(T / r)): a reduced frame is padding only if all its source frames are.

    Computed from the rows' lengths rather than by reshaping the mask, which is the same for
    right-padded masks and lets ``torch.export`` trace it for any length.
    """
    if padding_mask is None or factor == 1:
        return padding_mask
    kept = reduced_lengths(valid_lengths(padding_mask), factor)
    return lengths_to_padding_mask(kept, reduced_num_frames(padding_mask.size(1), factor))


def pad_to_multiple_of(x: Tensor, factor: int) -> Tensor:
    """Right-pad (B, T, C) with zero frames to a multiple of ``factor`` frames.

    Always one ``pad`` call (of 0 frames when T is a multiple already): a branch on T would make
    ``torch.export`` specialise the standalone program on the length's parity.
    """
    return torch.nn.functional.pad(x, (0, 0, 0, (-x.size(1)) % factor))


def pool_frames(x: Tensor, valid: Tensor, factor: int) -> Tuple[Tensor, Tensor]:
    """Average groups of ``factor`` frames over their valid frames: (B, T, D) -> (B, ceil(T / r), D).

    The teacher's side of time reduction (a 20 ms teacher against a 40 ms student): a pooled
    frame is valid if any of its source frames is, and is the mean of the valid ones, so a padded
    row pools to what the utterance pools to alone.

    Args:
        x: (B, T, D); valid: (B, T) bool, True = the frame counts
    Returns:
        (B, T', D) pooled frames (zero where no source frame is valid), (B, T') bool valid
    """
    b, _, d = x.shape
    weights = pad_to_multiple_of(valid.unsqueeze(-1).to(x.dtype), factor)
    x = pad_to_multiple_of(x.masked_fill(~valid.unsqueeze(-1), 0.0), factor)
    groups = x.size(1) // factor
    sums = x.reshape(b, groups, factor, d).sum(2)
    counts = weights.reshape(b, groups, factor, 1).sum(2)
    return sums / counts.clamp(min=1), counts.squeeze(-1) > 0


def repeat_frames(x: Tensor, factor: int, num_frames: int) -> Tensor:
    """Back to the CNN rate: each reduced frame repeated ``factor`` times (no new values), cut to
    ``num_frames``: (B, T', D) -> (B, num_frames, D). ``x[:, ::factor]`` recovers the input."""
    if factor == 1:
        return x[:, :num_frames]
    return x.repeat_interleave(factor, dim=1)[:, :num_frames]


__all__ = [
    "ConvSpecs",
    "conv_output_lengths",
    "conv_specs",
    "frames_padding_mask",
    "lengths_to_padding_mask",
    "output_lengths",
    "pad_to_multiple_of",
    "pool_frames",
    "receptive_field",
    "reduce_padding_mask",
    "reduced_lengths",
    "reduced_num_frames",
    "repeat_frames",
    "samples_per_frame",
    "specs_from_fields",
    "valid_lengths",
]
