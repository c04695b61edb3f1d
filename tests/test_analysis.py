"""fairseq_kd/analysis: linear CKA, the constant-budget family solver, layer clustering, probe splits.

Pure functions, no audio: hand-computed CKA and its invariances, family members against parameter
counts computed by hand (docs/papers.md#deep-versus-wide) and against ThinHubertModel.model_summary.
"""

from __future__ import annotations

import math

import pytest
import torch

from fairseq_kd.analysis.cka import CKAError, cka_matrix, linear_cka
from fairseq_kd.analysis.clustering import ClusterError, cluster_layers, hint_spec, lighthubert_spec, overrides
from fairseq_kd.analysis.family import (
    HUBERT_BASE, FamilyError, criterion_block, solve_family, spread_layers, student_fields, transformer_layer_params,
)
from fairseq_kd.analysis.probes import ProbeError, read_speakers, select_rows, split_by_speaker
from fairseq_kd.models.thin_hubert import ThinHubertModel
from fairseq_kd.presets import model_preset


# -- CKA -------------------------------------------------------------------------------------------
def test_cka_hand_computed():
    # 1-D: centred x = (-1, 0, 1), y = (-1, 1, 0): (x.y)^2 / (|x|^2 |y|^2) = 1 / 4
    assert linear_cka([[1.0], [2.0], [3.0]], [[1.0], [3.0], [2.0]]) == pytest.approx(0.25)
    # 2-D against 1-D: X = [[1,0],[0,1],[-1,0],[0,-1]] (centred), y = (1,0,-1,0):
    # Y^T X = (2, 0) -> 4; X^T X = 2 I -> ||.||_F = 2 sqrt 2; Y^T Y = 2 -> 4 / (2 sqrt 2 * 2) = 1 / sqrt 2
    x = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]
    assert linear_cka(x, [[1.0], [0.0], [-1.0], [0.0]]) == pytest.approx(1 / math.sqrt(2))
    assert linear_cka(x, x) == pytest.approx(1.0)


def test_cka_invariances_and_matrix():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(16, 8, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(200, 8, generator=gen, dtype=torch.float64)
    base = linear_cka(x, y)
    assert 0.0 < base < 1.0
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))  # orthogonal
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-9)
    assert linear_cka(3.7 * x, 0.01 * y) == pytest.approx(base, rel=1e-9)  # isotropic scaling
    assert linear_cka(x + 5.0, y - 2.0) == pytest.approx(base, rel=1e-9)  # centring
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x))
    # not invariant to an arbitrary invertible (anisotropic) map
    assert abs(linear_cka(x * torch.linspace(0.1, 10, 16, dtype=torch.float64), y) - base) > 1e-3
    m = cka_matrix([x, y], [x, y])
    assert m.shape == (2, 2) and m[0, 0] == pytest.approx(1.0) and m[0, 1] == pytest.approx(base)


def test_cka_bad_input():
    with pytest.raises(CKAError, match="fewer frames than features"):
        linear_cka(torch.randn(10, 64), torch.randn(10, 8))
    with pytest.raises(CKAError, match="same frames"):
        linear_cka(torch.randn(100, 4), torch.randn(99, 4))
    with pytest.raises(CKAError, match="constant"):
        linear_cka(torch.ones(10, 2), torch.randn(10, 2))


# -- constant-budget families ----------------------------------------------------------------------
def hand_layer(d: int, f: int) -> int:
    attention = 4 * (d * d + d)  # q, k, v, out with biases
    ffn = d * f + f + f * d + d
    norms = 2 * 2 * d
    return attention + ffn + norms


def hand_student(depth: int, d: int, f: int) -> int:
    """HuBERT CNN (4,200,448) + LayerNorm(512) + proj 512 -> d + mask_emb + pos conv (weight-normed,
    16 groups, kernel 128: d*d/16*128 + g (128) + bias d) + encoder LayerNorm + layers."""
    cnn = 512 * 10 + 4 * 512 * 512 * 3 + 2 * 512 * 512 * 2 + 2 * 512
    return cnn + 2 * 512 + (512 * d + d) + d + (d * d // 16 * 128 + 128 + d) + 2 * d + depth * hand_layer(d, f)


def test_family_reproduces_the_papers_students():
    assert transformer_layer_params(768, 3072) == hand_layer(768, 3072) == 7_087_872
    assert transformer_layer_params(384, 1536) == hand_layer(384, 1536) == 1_774_464
    wide, deep = solve_family([3, 12])  # default budget: the paper's 21.3 M, HuBERT Base's 12 heads
    assert (wide.width, wide.ffn, wide.method, wide.transformer_params) == (768, 3072, "pred", 3 * 7_087_872)
    assert (deep.width, deep.ffn, deep.method, deep.transformer_params) == (384, 1536, "l2l", 12 * 1_774_464)
    base = model_preset("deep_12l_half_l2l")
    for member, published in ((wide, 30_58), (deep, 26_87)):
        fields = student_fields(member, HUBERT_BASE, base)
        summary = ThinHubertModel.model_summary(fields)
        assert summary["params"] == hand_student(member.depth, member.width, member.ffn)
        assert round(summary["params"] / 1e4) == published
    wide_fields = student_fields(wide, HUBERT_BASE, base)
    assert wide_fields["pred_layer_ids"] == [4, 8, 12] and wide_fields["init_teacher_layers"] == 3
    deep_fields = student_fields(deep, HUBERT_BASE, base)
    assert deep_fields["hint_layer_ids"] == list(range(1, 13)) and deep_fields["init_teacher_layers"] == 0
    assert criterion_block(deep, 12)["hint_targets"] == [str(i) for i in range(1, 13)]


def test_family_at_a_smaller_budget_and_the_small_presets():
    # the paper's smaller students (sizes inferred, docs/papers.md#deep-versus-wide)
    for name, (depth, d, f, size) in {"deep_12l_quarter_l2l": (12, 192, 768, 9_934_144),
                                      "wide_3l_half_pred": (3, 384, 1536, 10_903_168),
                                      "deep_6l_half_l2l": (6, 384, 1536, 16_226_560)}.items():
        assert hand_student(depth, d, f) == size
        assert ThinHubertModel.model_summary(model_preset(name))["params"] == size, name
    # 12 x 192 and 3 x 384 hold the same ~5.3 M transformer parameters: one family
    quarter, half = solve_family([12, 3], budget=5.33e6, heads=6, ffn_ratios=[4.0], method="l2l")
    assert (quarter.width, quarter.ffn, half.width, half.ffn) == (192, 768, 384, 1536)
    assert spread_layers(8, 12) == [2, 3, 5, 6, 8, 9, 11, 12] and spread_layers(3, 12) == [4, 8, 12]


def test_family_bad_input():
    with pytest.raises(FamilyError, match="positive layer counts.*bad: \\[0, -2\\]"):
        solve_family([3, 0, -2])
    with pytest.raises(FamilyError, match="(?s)no depth can meet the budget.*narrowest width"):
        solve_family([3, 12], budget=1e4)
    with pytest.raises(FamilyError, match="(?s)some depths cannot meet.*1-layer"):
        solve_family([1, 12], budget=21.3e6, max_width=1024)


# -- clustering and probe bookkeeping --------------------------------------------------------------
def test_cluster_layers_and_specs():
    # two blocks of similar layers: {1, 2, 3} and {4, 5}
    cka = torch.full((5, 5), 0.2)
    cka[:3, :3] = 0.9
    cka[3:, 3:] = 0.8
    cka.fill_diagonal_(1.0)
    groups = cluster_layers(cka, [1, 2, 3, 4, 5], 2)
    assert groups == [[1, 2, 3], [4, 5]]
    spec = hint_spec(groups, 4)
    assert spec == {"hint_layer_ids": [2, 4], "hint_targets": ["1+2+3", "4+5"]}
    assert overrides(spec) == ["model.hint_layer_ids=[2,4]", "criterion.hint_targets=['1+2+3','4+5']"]
    assert lighthubert_spec(12, 12) == {"hint_layer_ids": [12], "hint_targets": ["5+6+7+8+9+10+11+12"]}
    with pytest.raises(ClusterError, match="into 6 groups"):
        cluster_layers(cka, [1, 2, 3, 4, 5], 6)


def test_probe_rows_and_missing_speaker_labels(tmp_path):
    speakers = ["a", "b", "a", "c", "b", "a", "c"]
    assert split_by_speaker(speakers, 7) == ([0, 1, 3, 5], [2, 4, 6])
    assert select_rows(speakers, 7, 4) == [0, 1, 2, 4, 5]  # whole speakers a and b
    manifest = tmp_path / "x.tsv"
    manifest.write_text("/audio\nu1.flac\t16000\n")
    with pytest.raises(ProbeError, match="x.spk does not exist.*--no-speaker-probe"):
        read_speakers(str(manifest), [None])
