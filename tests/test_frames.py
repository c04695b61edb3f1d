"""encoders/frames.py: the one place where samples become frames, checked against real modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fairseq_kd.encoders.frames import (
    conv_output_lengths,
    conv_specs,
    frames_padding_mask,
    output_lengths,
    pool_frames,
    receptive_field,
    reduce_padding_mask,
    reduced_lengths,
    repeat_frames,
    samples_per_frame,
)

HUBERT_CNN = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


def real_convs(specs):
    return nn.Sequential(*[nn.Conv1d(1 if i == 0 else d, d, k, s) for i, (d, k, s) in enumerate(specs)])


def test_conv_output_lengths_match_real_convs():
    layers = [(4, 10, 5), (4, 3, 2), (4, 3, 2), (4, 2, 2)]
    convs = real_convs(layers)
    lengths = torch.tensor([0, 5, 10, 59, 60, 99, 100, 101, 777, 1_000])
    got = conv_output_lengths(lengths, layers)
    for n, frames in zip(lengths.tolist(), got.tolist()):
        try:
            expected = convs(torch.zeros(1, 1, n)).size(-1) if n else 0
        except RuntimeError:  # input shorter than a kernel: torch refuses, we say 0 frames
            expected = 0
        assert frames == expected, n


def test_ints_numpy_and_tensors_give_the_same_lengths():
    lengths = [400, 16_000, 16_319, 16_320, 12_345]
    as_tensor = conv_output_lengths(torch.tensor(lengths), HUBERT_CNN)
    assert conv_output_lengths(np.array(lengths), HUBERT_CNN).tolist() == as_tensor.tolist()
    assert conv_output_lengths(lengths, HUBERT_CNN).tolist() == as_tensor.tolist()
    assert int(conv_output_lengths(16_000, HUBERT_CNN)) == 49
    assert as_tensor.tolist()[:2] == [1, 49]


def test_receptive_field_and_hop_of_hubert_cnn():
    assert receptive_field(HUBERT_CNN) == 400 and samples_per_frame(HUBERT_CNN) == 320
    convs = real_convs([(2, k, s) for _, k, s in HUBERT_CNN])
    assert convs(torch.zeros(1, 1, 400)).size(-1) == 1
    with pytest.raises(RuntimeError):
        convs(torch.zeros(1, 1, 399))


def test_conv_specs_reads_a_built_cnn():
    from fairseq.models.wav2vec.wav2vec2 import ConvFeatureExtractionModel

    cnn = ConvFeatureExtractionModel([(8, 10, 5), (8, 3, 2)], dropout=0.0, mode="default")
    holder = nn.Module()
    holder.feature_extractor = cnn
    assert conv_specs(holder) == [(8, 10, 5), (8, 3, 2)]


def test_frames_padding_mask():
    layers = [(4, 10, 5), (4, 3, 2)]
    assert frames_padding_mask(None, layers, 7) is None
    sample_mask = torch.arange(40).unsqueeze(0) >= torch.tensor([[40], [23]])
    frame_mask = frames_padding_mask(sample_mask, layers, 3)
    # 40 samples -> 7 -> 3 frames; 23 samples -> 3 -> 1 frame
    assert frame_mask.tolist() == [[False, False, False], [False, True, True]]


@pytest.mark.parametrize("r", [2, 3])
def test_reduced_mask_is_the_all_padding_rule(r):
    """From lengths (export-friendly) equals the reshape-and-all definition on right padding."""
    mask = torch.arange(11).unsqueeze(0) >= torch.tensor([[11], [7], [1], [0]])
    got = reduce_padding_mask(mask, r)
    padded = torch.nn.functional.pad(mask, (0, (-11) % r), value=True)
    assert torch.equal(got, padded.view(4, -1, r).all(-1))
    assert got.size(1) == -(-11 // r)
    assert (~got).sum(-1).tolist() == [-(-n // r) for n in (11, 7, 1, 0)]
    assert reduced_lengths([11, 7, 1, 0], r).tolist() == [-(-n // r) for n in (11, 7, 1, 0)]


def test_output_lengths_compose_conv_and_reduction():
    assert output_lengths([16_000, 16_320], HUBERT_CNN, 2).tolist() == [25, 25]
    assert output_lengths([16_000], HUBERT_CNN, 1).tolist() == [49]


def test_pool_frames_keeps_partial_groups_of_valid_frames():
    x = torch.arange(10, dtype=torch.float32).reshape(1, 10, 1).repeat(2, 1, 1)
    x[1, 5:] = float("nan")  # padding may hold anything
    valid = torch.arange(10).unsqueeze(0) < torch.tensor([[10], [5]])
    pooled, pooled_valid = pool_frames(x, valid, 3)
    assert pooled_valid.tolist() == [[True] * 4, [True, True, False, False]]
    assert pooled[0, :, 0].tolist() == [1.0, 4.0, 7.0, 9.0]  # the last group is frame 9 alone
    assert pooled[1, :2, 0].tolist() == [1.0, 3.5] and torch.isfinite(pooled).all()


def test_repeat_frames_inverts_with_a_stride():
    x = torch.randn(2, 5, 3)
    up = repeat_frames(x, 2, 9)
    assert up.shape == (2, 9, 3)
    assert torch.equal(up[:, ::2], x) and torch.equal(up[:, 1::2], x[:, :4])
    assert torch.equal(repeat_frames(x, 1, 4), x[:, :4])
