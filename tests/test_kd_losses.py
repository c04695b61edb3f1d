"""Behaviour of the pure distillation-loss functions (fairseq_kd.criterions.kd_losses)."""

from __future__ import annotations

import math

import pytest
import torch

from fairseq_kd.criterions.kd_losses import (
    align_to_teacher,
    cosine_per_frame,
    cosine_similarity_per_frame,
    count,
    hint_weights,
    l1_per_frame,
    l2_per_frame,
    layer_loss,
    logsig_cosine_per_frame,
    masked_sum,
    mean_of_layers,
)

LOG2 = math.log(2.0)
LOGSIG_PERFECT = math.log1p(math.exp(-1.0))  # -log sigmoid(1)


def frames(*vectors) -> torch.Tensor:
    """(1, T, D) tensor from T plain D-vectors."""
    return torch.tensor([list(vectors)], dtype=torch.float32)


def pad_mask(lengths, total: int) -> torch.Tensor:
    """(B, total) bool, True = padding (fairseq convention)."""
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


def close(a, b, tol: float = 1e-6) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=tol)


# -- per-frame terms, hand-computed ---------------------------------------------------------------
def test_orthogonal_vectors():
    s, t = frames([1.0, 0.0]), frames([0.0, 1.0])
    assert close(cosine_similarity_per_frame(s, t), [[0.0]])
    assert close(logsig_cosine_per_frame(s, t), [[LOG2]])
    assert close(cosine_per_frame(s, t), [[1.0]])
    assert close(l1_per_frame(s, t), [[1.0]])
    assert close(l2_per_frame(s, t), [[1.0]])


def test_parallel_and_opposite_vectors():
    s = frames([1.0, 1.0], [1.0, 2.0])
    t = frames([2.0, 2.0], [-1.0, -2.0])
    assert close(cosine_similarity_per_frame(s, t), [[1.0, -1.0]])
    assert close(cosine_per_frame(s, t), [[0.0, 2.0]])
    assert close(logsig_cosine_per_frame(s, t), [[LOGSIG_PERFECT, math.log1p(math.e)]])
    # |s - t| = [1, 1] and [2, 4]; means over D = 1 and 3; squares: [1, 1] -> 1, [4, 16] -> 10
    assert close(l1_per_frame(s, t), [[1.0, 3.0]])
    assert close(l2_per_frame(s, t), [[1.0, 10.0]])


def test_zero_vectors_do_not_nan():
    s = frames([3.0, 4.0], [0.0, 0.0]).requires_grad_()
    t = frames([0.0, 0.0], [0.0, 0.0])
    assert close(l1_per_frame(s, t), [[3.5, 0.0]])
    assert close(l2_per_frame(s, t), [[12.5, 0.0]])
    assert close(cosine_similarity_per_frame(s, t), [[0.0, 0.0]])
    loss = logsig_cosine_per_frame(s, t).sum() + cosine_per_frame(s, t).sum()
    assert close(loss, 2 * LOG2 + 2.0)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_half_precision_inputs_are_computed_in_float32():
    s = frames([3.0, 4.0], [0.0, 0.0]).half()
    t = frames([300.0, 400.0], [0.0, 0.0]).half()  # squared error 1e5 overflows fp16
    assert l2_per_frame(s, t).dtype == torch.float32
    assert close(l2_per_frame(s, t), [[(297.0**2 + 396.0**2) / 2, 0.0]], tol=1e-4)
    assert close(cosine_similarity_per_frame(s, t.bfloat16()), [[1.0, 0.0]], tol=1e-3)


# -- layer_loss ----------------------------------------------------------------------------------
def test_distilhubert_loss_on_identical_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16)
    valid = torch.ones(2, 7, dtype=torch.bool)
    out = layer_loss(x, x.clone(), valid, l1=1.0, cos=1.0, cos_type="logsig")
    assert set(out) == {"l1", "cos", "loss", "cos_sim", "frames"}
    assert out["frames"].item() == 14
    assert close(out["l1"], 0.0)
    assert close(out["cos"], 14 * LOGSIG_PERFECT, tol=1e-5)
    assert close(out["loss"] / out["frames"], LOGSIG_PERFECT, tol=1e-6)
    assert close(out["cos_sim"], 14.0, tol=1e-5)


def test_weighted_sum_of_terms_by_hand():
    # frame 1: orthogonal, |d| = [1, 1]; frame 2: identical
    s = frames([1.0, 0.0], [2.0, 2.0])
    t = frames([0.0, 1.0], [2.0, 2.0])
    valid = torch.ones(1, 2, dtype=torch.bool)
    out = layer_loss(s, t, valid, l1=0.5, l2=2.0, cos=3.0, cos_type="raw")
    assert close(out["l1"], 1.0) and close(out["l2"], 1.0) and close(out["cos"], 1.0)
    assert close(out["loss"], 0.5 * 1.0 + 2.0 * 1.0 + 3.0 * 1.0)
    assert close(out["cos_sim"], 1.0)  # 0 + 1
    only_l2 = layer_loss(s, t, valid, l2=1.0)
    assert set(only_l2) == {"l2", "loss", "cos_sim", "frames"}
    logsig = layer_loss(s, t, valid, cos=1.0)
    assert close(logsig["loss"], LOG2 + LOGSIG_PERFECT)


def test_layer_loss_rejects_bad_arguments():
    x = torch.zeros(1, 3, 4)
    valid = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="at least one"):
        layer_loss(x, x, valid)
    with pytest.raises(ValueError, match="cos_type"):
        layer_loss(x, x, valid, cos=1.0, cos_type="cosine")
    with pytest.raises(ValueError, match=">= 0"):
        layer_loss(x, x, valid, l1=-1.0)
    with pytest.raises(ValueError, match="align_to_teacher"):
        layer_loss(x, torch.zeros(1, 4, 4), valid, l1=1.0)
    with pytest.raises(ValueError, match="valid"):
        layer_loss(x, x, valid.float(), l1=1.0)


def test_sums_scale_with_frames():
    torch.manual_seed(1)
    s, t = torch.randn(3, 9, 8), torch.randn(3, 9, 8)
    mask = pad_mask([9, 5, 2], 9)
    a, b, v = align_to_teacher(s, t, mask)
    one = layer_loss(a, b, v, l1=1.0, l2=0.3, cos=1.0)
    a2, b2, v2 = align_to_teacher(torch.cat([s, s]), torch.cat([t, t]), torch.cat([mask, mask]))
    two = layer_loss(a2, b2, v2, l1=1.0, l2=0.3, cos=1.0)
    assert one["frames"].item() == 16 and two["frames"].item() == 32
    for key in ("l1", "l2", "cos", "loss", "cos_sim"):
        assert close(two[key], 2 * one[key], tol=1e-5), key
    assert close(two["loss"] / two["frames"], one["loss"] / one["frames"], tol=1e-6)


# -- padding and gradients ------------------------------------------------------------------------
@pytest.mark.parametrize("garbage", [1e30, float("inf"), float("nan")])
def test_padding_content_changes_nothing(garbage):
    torch.manual_seed(2)
    lengths = [6, 3]
    s, t = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    mask = pad_mask(lengths, 6)

    def run(fill: float):
        sp = s.masked_fill(mask[..., None], fill).requires_grad_()
        tp = t.masked_fill(mask[..., None], fill)
        a, b, v = align_to_teacher(sp, tp, mask)
        out = layer_loss(a, b, v, l1=1.0, l2=1.0, cos=1.0)
        out["loss"].backward()
        return out, sp.grad

    clean, clean_grad = run(0.0)
    dirty, dirty_grad = run(garbage)
    for key in clean:
        assert torch.isfinite(dirty[key]).all(), key
        assert close(dirty[key], clean[key]), key
    assert torch.equal(dirty_grad, clean_grad)
    assert (dirty_grad[mask] == 0).all() and dirty_grad[~mask].abs().sum() > 0


def test_padding_frames_are_not_counted():
    s = torch.ones(1, 4, 2)
    t = torch.ones(1, 4, 2)
    t[0, 2:] = 5.0  # differs only in the two padded frames
    _, _, v = align_to_teacher(s, t, pad_mask([2], 4))
    out = layer_loss(s, t, v, l1=1.0, l2=1.0)
    assert out["frames"].item() == 2
    assert close(out["loss"], 0.0)


def test_gradient_reaches_student_not_teacher():
    torch.manual_seed(3)
    s = torch.randn(2, 5, 4, requires_grad=True)
    t = torch.randn(2, 5, 4)  # a teacher target produced under no_grad
    a, b, v = align_to_teacher(s, t, pad_mask([5, 4], 5))
    assert not b.requires_grad
    layer_loss(a, b, v, l1=1.0, cos=1.0)["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0

    # even an unfrozen teacher is never trained through the loss
    t2 = torch.randn(2, 10, 4, requires_grad=True)
    s2 = torch.randn(2, 5, 4, requires_grad=True)
    _, b2, _ = align_to_teacher(s2, t2, None)
    assert not b2.requires_grad
    layer_loss(s2, t2[:, :5], torch.ones(2, 5, dtype=torch.bool), l2=1.0)["loss"].backward()
    assert t2.grad is None and s2.grad is not None


def test_masked_sum_and_count():
    per_frame = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 8.0, 16.0]])
    valid = torch.tensor([[True, True, False], [False, True, True]])
    assert close(masked_sum(per_frame, valid), 1 + 2 + 8 + 16)
    assert count(valid).item() == 4
    with pytest.raises(ValueError):
        masked_sum(per_frame, valid[:, :2])


# -- frame-rate alignment -------------------------------------------------------------------------
@pytest.mark.parametrize("r", [2, 3])
def test_repeated_teacher_pools_back_exactly(r):
    torch.manual_seed(4)
    x = torch.randn(2, 10, 6)
    teacher = x.repeat_interleave(r, dim=1)  # (2, 10r, 6): same content at r x the frame rate
    a, b, v = align_to_teacher(x, teacher, None)
    assert b.shape == x.shape and v.all()
    assert torch.allclose(b, x, atol=1e-6)
    assert torch.equal(a, x)


def test_pooled_frame_is_valid_if_any_frame_is_and_averages_the_valid_ones():
    """The student's time-reduction rule (encoders/frames.py): n valid frames pool to ceil(n / r)."""
    teacher = torch.arange(8, dtype=torch.float32).reshape(1, 8, 1).repeat(2, 1, 1)
    teacher[1, 5:] = 1e6  # whatever the padding holds
    # utterance 0: 8 valid frames -> 4 pooled; utterance 1: 5 valid -> 2 whole pairs + frame 4 alone
    mask = pad_mask([8, 5], 8)
    _, b, v = align_to_teacher(torch.zeros(2, 4, 1), teacher, mask)
    assert v.tolist() == [[True] * 4, [True, True, True, False]]
    assert b[0, :, 0].tolist() == [0.5, 2.5, 4.5, 6.5]
    assert b[1, :, 0].tolist() == [0.5, 2.5, 4.0, 0.0]  # the mixed pair is its valid frame; no leak


def test_pooled_padded_row_equals_the_utterance_alone():
    torch.manual_seed(5)
    teacher = torch.randn(2, 9, 3)
    _, batch, valid = align_to_teacher(torch.zeros(2, 5, 3), teacher, pad_mask([9, 7], 9))
    _, alone, alone_valid = align_to_teacher(torch.zeros(1, 4, 3), teacher[1:, :7], None)
    assert valid[1].tolist() == [True] * 4 + [False] and alone_valid.all()
    assert torch.allclose(batch[1, :4], alone[0], atol=1e-7)


@pytest.mark.parametrize(
    "ts, tt, expected_t",
    [(50, 51, 50), (51, 50, 50), (50, 50, 50), (50, 101, 50), (50, 100, 50), (50, 99, 50), (49, 99, 49),
     (50, 151, 50)],
)
def test_off_by_one_lengths_are_trimmed(ts, tt, expected_t):
    s, t = torch.randn(2, ts, 4), torch.randn(2, tt, 4)
    a, b, v = align_to_teacher(s, t, torch.zeros(2, tt, dtype=torch.bool))
    assert a.shape == b.shape == (2, expected_t, 4)
    assert v.shape == (2, expected_t) and v.all()
    assert torch.equal(a, s[:, :expected_t])


def test_trailing_teacher_frame_at_2x_is_dropped():
    x = torch.randn(1, 50, 3)
    teacher = torch.cat([x.repeat_interleave(2, dim=1), torch.full((1, 1, 3), 1e6)], dim=1)  # Tt=101
    _, b, v = align_to_teacher(x, teacher, None)
    assert torch.allclose(b, x, atol=1e-6) and v.all()


def test_student_mask_excludes_student_padding():
    # per-utterance off-by-one: teacher has 5 valid frames, the student only 4
    s, t = torch.randn(1, 5, 3), torch.randn(1, 5, 3)
    _, _, v = align_to_teacher(s, t, pad_mask([5], 5), student_mask=pad_mask([4], 5))
    assert v.tolist() == [[True, True, True, True, False]]


def test_forced_rate():
    x = torch.randn(1, 2, 3)
    _, b, _ = align_to_teacher(x, x.repeat_interleave(2, dim=1)[:, :3], None)  # Ts=2, Tt=3: same rate
    assert b.shape[1] == 2
    _, b, _ = align_to_teacher(x, x.repeat_interleave(2, dim=1), None, rate=2)
    assert torch.allclose(b, x, atol=1e-6)


@pytest.mark.parametrize(
    "s_shape, t_shape, match",
    [
        ((2, 50, 8), (2, 60, 8), "frame rates"),  # teacher 10 frames longer, not a multiple
        ((2, 60, 8), (2, 50, 8), "frame rates"),  # student longer by more than one frame
        ((2, 100, 8), (2, 50, 8), "frame rates"),  # student at a higher rate
        ((2, 50, 8), (2, 130, 8), "frame rates"),  # 2.6x
        ((2, 50, 8), (2, 50, 16), "feature dim"),
        ((3, 50, 8), (2, 50, 8), "batch size"),
        ((2, 50), (2, 50, 8), r"\(B, T, D\)"),
    ],
)
def test_irreconcilable_shapes_raise(s_shape, t_shape, match):
    with pytest.raises(ValueError, match=match) as err:
        align_to_teacher(torch.zeros(s_shape), torch.zeros(t_shape), None)
    assert str(tuple(s_shape)) in str(err.value) or str(tuple(t_shape)) in str(err.value)
    if len(s_shape) == 3:
        assert str(tuple(s_shape)) in str(err.value) and str(tuple(t_shape)) in str(err.value)


def test_forced_rate_that_does_not_fit_raises():
    with pytest.raises(ValueError, match="frame rates"):
        align_to_teacher(torch.zeros(1, 50, 2), torch.zeros(1, 50, 2), None, rate=2)


def test_bad_mask_raises():
    with pytest.raises(ValueError, match="teacher_mask"):
        align_to_teacher(torch.zeros(1, 5, 2), torch.zeros(1, 5, 2), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="teacher_mask"):
        align_to_teacher(torch.zeros(1, 5, 2), torch.zeros(1, 5, 2), torch.zeros(1, 5))


# -- targets and weights --------------------------------------------------------------------------
def test_mean_of_layers():
    a, b, c = torch.full((1, 2, 3), 1.0), torch.full((1, 2, 3), 2.0), torch.full((1, 2, 3), 6.0)
    assert torch.equal(mean_of_layers([a, b, c]), torch.full((1, 2, 3), 3.0))
    assert torch.equal(mean_of_layers([a]), a)
    with pytest.raises(ValueError):
        mean_of_layers([])
    with pytest.raises(ValueError):
        mean_of_layers([a, torch.zeros(1, 3, 3)])


def test_hint_weights():
    assert hint_weights(12) == [0.1] * 11 + [1.0]
    assert hint_weights(1) == [1.0]
    assert hint_weights(3, hint_weight=0.5, last_weight=2.0) == [0.5, 0.5, 2.0]
    with pytest.raises(ValueError):
        hint_weights(0)


# -- property: batched masked sums == per-utterance sums on the unpadded sequences -----------------
def reference_sums(s: torch.Tensor, t: torch.Tensor, r: int):
    """Independent per-utterance reference on unpadded (L, D) / (r*L + e, D) tensors."""
    n = s.shape[0]
    t = t[: n * r].reshape(n, r, -1).mean(dim=1)
    d = s - t
    cos = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    return {
        "l1": d.abs().mean(-1).sum(),
        "l2": d.pow(2).mean(-1).sum(),
        "cos": -torch.nn.functional.logsigmoid(cos).sum(),
        "cos_sim": cos.sum(),
        "frames": n,
    }


@pytest.mark.parametrize("seed", range(6))
def test_masked_sums_equal_per_utterance_sums(seed):
    torch.manual_seed(seed)
    r = [1, 2, 3][seed % 3]
    batch = int(torch.randint(1, 5, ()).item())
    dim = int(torch.randint(1, 9, ()).item())
    s_len = torch.randint(3, 20, (batch,)).tolist()
    extra = torch.randint(0, r, (batch,)).tolist() if r > 1 else [0] * batch  # leftover teacher frames
    t_len = [r * n + e for n, e in zip(s_len, extra)]
    ts, tt = max(s_len), max(t_len)

    student = torch.randn(batch, ts, dim)
    teacher = torch.randn(batch, tt, dim)
    s_mask, t_mask = pad_mask(s_len, ts), pad_mask(t_len, tt)
    student = student.masked_fill(s_mask[..., None], 1e30).requires_grad_()  # garbage in padding
    teacher = teacher.masked_fill(t_mask[..., None], -1e30)

    a, b, v = align_to_teacher(student, teacher, t_mask, student_mask=s_mask)
    got = layer_loss(a, b, v, l1=1.0, l2=0.5, cos=2.0)
    got["loss"].backward()

    want = {k: 0.0 for k in ("l1", "l2", "cos", "cos_sim", "frames")}
    for i in range(batch):
        s_i = student.detach()[i, : s_len[i]].clone().requires_grad_()
        ref = reference_sums(s_i, teacher[i, : t_len[i]], r)
        (ref["l1"] + 0.5 * ref["l2"] + 2.0 * ref["cos"]).backward()
        assert torch.allclose(student.grad[i, : s_len[i]], s_i.grad, atol=1e-5)
        assert (student.grad[i, s_len[i]:] == 0).all()
        for k in want:
            want[k] = want[k] + (ref[k].detach() if torch.is_tensor(ref[k]) else ref[k])

    assert got["frames"].item() == want["frames"] == sum(s_len)
    for k in ("l1", "l2", "cos", "cos_sim"):
        assert close(got[k], want[k], tol=1e-4), k
    assert close(got["loss"], want["l1"] + 0.5 * want["l2"] + 2.0 * want["cos"], tol=1e-4)
