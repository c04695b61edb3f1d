"""The frozen teacher on real (tiny) fairseq HuBERT / wav2vec 2.0 checkpoints.

Shows: the architecture is read from the file; layer outputs equal fairseq's own forward (no frame
lost or added, odd frame counts kept); padded rows equal the utterances run alone; eval mode,
no_grad and frozen weights hold whatever the trainer does; bf16/fp16 work; the teacher never lands
in a state_dict; every bad input is refused with the file named.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import waves
from fairseq import checkpoint_utils
from fairseq_checkpoints import (
    MISSING_DATA_DIR,
    make_hubert_checkpoint,
    make_legacy_args_checkpoint,
    make_wav2vec2_checkpoint,
    rewrite_checkpoint,
)
from fairseq_kd.encoders.frames import conv_output_lengths
from fairseq_kd.teacher import FrozenTeacher, TeacherError, check_layers

MAKERS = {"hubert": make_hubert_checkpoint, "wav2vec2": make_wav2vec2_checkpoint}
ONE_SECOND = 16_000  # -> 49 frames with the 320-sample hop: odd on purpose


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture(scope="module")
def hubert_ckpt(ckpt_dir) -> Path:
    return make_hubert_checkpoint(ckpt_dir / "hubert.pt")


@pytest.fixture(scope="module")
def hubert_teacher(hubert_ckpt) -> FrozenTeacher:
    return FrozenTeacher.from_checkpoint(str(hubert_ckpt))


def fairseq_model(path: Path) -> nn.Module:
    """The checkpoint loaded plainly by fairseq, with no teacher settings."""
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    return models[0].eval()


# -- architecture comes from the file -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hubert", "wav2vec2"])
@pytest.mark.parametrize(
    "arch",
    [
        dict(layers=2, embed_dim=64, ffn_dim=128, heads=4),
        dict(layers=3, embed_dim=48, ffn_dim=96, heads=2, normalize=True,
             conv_layers="[(32,10,5)] + [(32,3,2)] * 2 + [(32,2,2)]"),
    ],
)
def test_architecture_is_read_from_the_checkpoint(tmp_path, kind, arch):
    path = MAKERS[kind](tmp_path / f"{kind}.pt", **arch)
    teacher = FrozenTeacher.from_checkpoint(str(path))
    conv = [(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2
    if "conv_layers" in arch:
        conv = [(32, 10, 5)] + [(32, 3, 2)] * 2 + [(32, 2, 2)]
    assert teacher.kind == kind and teacher.path == str(path)
    assert (teacher.num_layers, teacher.embed_dim) == (arch["layers"], arch["embed_dim"])
    assert teacher.conv_layers == conv
    assert teacher.normalize is arch.get("normalize", False)
    assert teacher.samples_per_frame == (320 if "conv_layers" not in arch else 40)
    # the task's data dir of the checkpoint does not exist, and that does not matter
    assert teacher.cfg.task.data == MISSING_DATA_DIR and not os.path.exists(MISSING_DATA_DIR)

    source, _, _ = waves(3_000, 3_000)
    hidden, frame_mask = teacher.hidden_states(source, None)
    frames = int(conv_output_lengths(torch.tensor([3_000]), conv)[0])
    assert frame_mask is None
    assert len(hidden) == arch["layers"] + 1
    assert all(h.shape == (2, frames, arch["embed_dim"]) and h.dtype == torch.float32 for h in hidden)


# -- same numbers as fairseq, no frame lost or added -------------------------------------------------
@pytest.mark.parametrize("kind", ["hubert", "wav2vec2"])
@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_last_layer_equals_fairseq_extract_features(tmp_path, kind, layer_norm_first):
    path = MAKERS[kind](tmp_path / f"{kind}.pt", layer_norm_first=layer_norm_first)
    teacher = FrozenTeacher.from_checkpoint(str(path))
    reference = fairseq_model(path)
    source, _, _ = waves(ONE_SECOND, ONE_SECOND)

    hidden, _ = teacher.hidden_states(source, None)
    with torch.no_grad():
        out = reference.extract_features(source, None, mask=False)
    last = out[0] if kind == "hubert" else out["x"]
    assert last.shape == hidden[-1].shape == (2, 49, 64)
    torch.testing.assert_close(hidden[-1], last, atol=1e-5, rtol=0)


def test_every_hubert_layer_equals_fairseq_output_layer(hubert_ckpt, hubert_teacher):
    reference = fairseq_model(hubert_ckpt)
    source, _, _ = waves(ONE_SECOND, 9_000)
    hidden, _ = hubert_teacher.hidden_states(source, None)
    with torch.no_grad():
        # layer 0: fairseq's "features" = CNN -> layer_norm -> post_extract_proj
        layer0, _ = reference.extract_features(source, None, ret_conv=True)
        torch.testing.assert_close(hidden[0], layer0, atol=1e-5, rtol=0)
        for layer in range(1, hubert_teacher.num_layers + 1):  # output_layer is 1-based
            out, _ = reference.extract_features(source, None, output_layer=layer)
            torch.testing.assert_close(hidden[layer], out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("samples", [ONE_SECOND, 16_319, 16_320, 401, 400 + 320 * 6 + 17])
def test_odd_frame_counts_are_kept(hubert_ckpt, hubert_teacher, samples):
    # the checkpoint was trained with required_seq_len_multiple=2; the teacher pads nothing
    assert checkpoint_utils.load_checkpoint_to_cpu(str(hubert_ckpt))["cfg"].model.required_seq_len_multiple == 2
    assert hubert_teacher.model.encoder.required_seq_len_multiple == 1
    expected = (samples - 400) // 320 + 1  # receptive field 400, hop 320
    hidden, _ = hubert_teacher.hidden_states(torch.randn(1, samples), None)
    assert {h.size(1) for h in hidden} == {expected}
    assert int(conv_output_lengths(torch.tensor([samples]), hubert_teacher.conv_layers)[0]) == expected


# -- padding ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hubert", "wav2vec2"])
@pytest.mark.parametrize("extractor_mode", ["default", "layer_norm"])
def test_padded_rows_equal_the_utterances_alone(tmp_path, kind, extractor_mode):
    path = MAKERS[kind](tmp_path / f"{kind}.pt", extractor_mode=extractor_mode, layers=2)
    teacher = FrozenTeacher.from_checkpoint(str(path))
    lengths = [ONE_SECOND, 11_111, 4_321]
    source, mask, rows = waves(*lengths, seed=3)

    hidden, frame_mask = teacher.hidden_states(source, mask)
    valid = conv_output_lengths(torch.tensor(lengths), teacher.conv_layers)
    assert frame_mask.shape == (3, 49)
    assert torch.equal((~frame_mask).sum(-1), valid)
    for i, row in enumerate(rows):
        alone, alone_mask = teacher.hidden_states(row.unsqueeze(0), None)
        assert alone_mask is None and alone[0].size(1) == valid[i]
        for layer, (batched, single) in enumerate(zip(hidden, alone)):
            torch.testing.assert_close(
                batched[i, : valid[i]], single[0], atol=1e-5, rtol=0, msg=f"row {i} layer {layer}"
            )


def test_plain_fairseq_cnn_lets_padding_into_group_norm(hubert_teacher):
    # why the teacher masks the group-norm statistics: fairseq's own CNN on the padded batch
    # differs from the utterance alone (the test above would otherwise prove nothing)
    source, _, rows = waves(ONE_SECOND, 4_321)
    cnn = hubert_teacher.model.feature_extractor
    with torch.no_grad():
        batched, alone = cnn(source)[1], cnn(rows[1].unsqueeze(0))[0]
    assert not torch.allclose(batched[:, : alone.size(1)], alone, atol=1e-3)


def test_all_false_mask_equals_no_mask(hubert_teacher):
    source, _, _ = waves(8_000, 8_000)
    no_mask, _ = hubert_teacher.hidden_states(source, None)
    with_mask, frame_mask = hubert_teacher.hidden_states(source, torch.zeros_like(source, dtype=torch.bool))
    assert frame_mask is not None and not frame_mask.any()
    for a, b in zip(no_mask, with_mask):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_too_short_input_is_refused(hubert_teacher):
    source, mask, _ = waves(8_000, 399)
    with pytest.raises(TeacherError, match="receptive field"):
        hubert_teacher.hidden_states(source, mask)


# -- frozen: eval, no grad, not in any state_dict ------------------------------------------------------
def test_eval_is_enforced_even_after_train(tmp_path):
    path = make_hubert_checkpoint(tmp_path / "h.pt", dropout=0.3)  # dropouts + layerdrop in cfg
    teacher = FrozenTeacher.from_checkpoint(str(path))
    source, _, _ = waves(ONE_SECOND)

    teacher.holder.train()  # what fairseq's trainer does to its modules every step
    assert not teacher.holder.training and not teacher.model.training
    first, _ = teacher.hidden_states(source, None)
    teacher.model.train()  # even bypassing the holder: hidden_states puts it back in eval
    second, _ = teacher.hidden_states(source, None)
    assert not teacher.model.training
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert teacher.model.encoder.layerdrop == 0


def test_frozen_no_grad_and_usable_by_a_student_loss(hubert_teacher):
    assert not any(p.requires_grad for p in hubert_teacher.model.parameters())
    source = torch.randn(2, 8_000, requires_grad=True)
    with torch.enable_grad():
        hidden, _ = hubert_teacher.hidden_states(source, None)
    assert all(h.grad_fn is None and not h.requires_grad for h in hidden)
    assert not any(h.is_inference() for h in hidden)
    # a loss op that saves the target for backward (fails on inference_mode tensors)
    weight = torch.ones(hubert_teacher.embed_dim, requires_grad=True)
    (weight * hidden[1]).pow(2).sum().backward()
    assert weight.grad is not None and source.grad is None


def test_teacher_is_not_in_the_state_dict_of_its_owner(hubert_teacher):
    class Criterion(nn.Module):
        def __init__(self, teacher: FrozenTeacher):
            super().__init__()
            self.teacher = teacher
            self.head = nn.Linear(4, 4)

    criterion = Criterion(hubert_teacher)
    assert set(criterion.state_dict()) == {"head.weight", "head.bias"}
    assert len(list(criterion.parameters())) == 2
    criterion.train().half()  # the trainer's calls do not reach the teacher
    assert not hubert_teacher.model.training
    assert all(p.dtype == torch.float32 for p in hubert_teacher.model.parameters())


# -- dtypes -----------------------------------------------------------------------------------------
def test_callers_autocast_does_not_change_the_teacher_dtype(hubert_teacher):
    source, mask, _ = waves(ONE_SECOND, 9_000)
    ref, _ = hubert_teacher.hidden_states(source, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a trainer running with --amp
        out, _ = hubert_teacher.hidden_states(source, mask)
    for r, o in zip(ref, out):
        assert torch.equal(r, o)


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_is_close_to_fp32(hubert_ckpt, hubert_teacher, dtype, torch_dtype):
    half = FrozenTeacher.from_checkpoint(str(hubert_ckpt), dtype=dtype)
    assert half.model.encoder.layers[0].fc1.weight.dtype == torch_dtype
    source, mask, _ = waves(ONE_SECOND, 9_000)
    ref, ref_mask = hubert_teacher.hidden_states(source, mask)
    out, out_mask = half.hidden_states(source, mask)
    assert torch.equal(ref_mask, out_mask)
    for r, o in zip(ref, out):
        assert o.dtype == torch.float32
        valid = ~out_mask
        cos = nn.functional.cosine_similarity(r[valid], o[valid], dim=-1)
        assert cos.min() > 0.99, (dtype, cos.min())


# -- other checkpoint layouts ---------------------------------------------------------------------------
def test_legacy_args_checkpoint_loads_like_the_hydra_one(tmp_path, hubert_teacher):
    # wav2vec_small.pt layout: state["args"] is an argparse.Namespace, no cfg
    legacy = make_legacy_args_checkpoint(
        tmp_path / "wav2vec_small_like.pt", kind="wav2vec2", legacy_serialization=True
    )
    assert legacy.read_bytes()[:2] == b"\x80\x02"  # torch's pre-zip format, not a zip archive
    state = torch.load(str(legacy), weights_only=False)
    assert "cfg" not in state and state["args"].arch == "wav2vec2"
    teacher = FrozenTeacher.from_checkpoint(str(legacy))
    hydra = FrozenTeacher.from_checkpoint(str(make_wav2vec2_checkpoint(tmp_path / "w.pt")))
    assert (teacher.kind, teacher.num_layers, teacher.embed_dim) == ("wav2vec2", 2, 64)
    assert teacher.model.encoder.required_seq_len_multiple == 1
    source, _, _ = waves(ONE_SECOND)
    for a, b in zip(teacher.hidden_states(source, None)[0], hydra.hidden_states(source, None)[0]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # same seed, same weights


def test_old_hubert_checkpoint_without_task_state_or_seq_len_key(tmp_path, hubert_ckpt, hubert_teacher):
    def strip(state):
        del state["task_state"]  # dictionaries would then be read from label_dir, which is gone
        del state["cfg"]["model"]["required_seq_len_multiple"]  # fairseq's default would be 2
        return state

    old = rewrite_checkpoint(hubert_ckpt, tmp_path / "old.pt", strip)
    teacher = FrozenTeacher.from_checkpoint(str(old))
    assert teacher.model.encoder.required_seq_len_multiple == 1
    source, _, _ = waves(ONE_SECOND)
    for a, b in zip(teacher.hidden_states(source, None)[0], hubert_teacher.hidden_states(source, None)[0]):
        assert torch.equal(a, b)


# -- bad input: refused before any model is built, file named --------------------------------------------
def _edit_model_name(name):
    def edit(state):
        state["cfg"]["model"]["_name"] = name
        return state

    return edit


def _flip_middle_bytes(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    dst.write_bytes(bytes(data))
    return dst


def _drop(*keys):
    def edit(state):
        for key in keys:
            state.pop(key, None)
        return state

    return edit


@pytest.mark.parametrize(
    "make_bad,match",
    [
        (lambda src, dst: dst, "does not exist"),
        (lambda src, dst: dst.write_bytes(b"this is not a checkpoint" * 10) and dst, "not a PyTorch checkpoint"),
        (lambda src, dst: dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2]) and dst, "truncated"),
        (_flip_middle_bytes, "corrupt"),  # torch.load alone would load wrong weights silently
        (lambda src, dst: torch.save({"weights": torch.zeros(2)}, dst) or dst, "not a fairseq training checkpoint"),
        (lambda src, dst: rewrite_checkpoint(src, dst, _drop("model")), "no model weights"),
        (lambda src, dst: rewrite_checkpoint(src, dst, _drop("cfg", "args")), "neither a 'cfg' nor an 'args'"),
        (lambda src, dst: rewrite_checkpoint(src, dst, _edit_model_name("hubert_ctc")), "fine-tuned CTC model"),
        (lambda src, dst: rewrite_checkpoint(src, dst, _edit_model_name("wav2vec_ctc")), "pre-trained checkpoint it was fine-tuned"),
        (lambda src, dst: rewrite_checkpoint(src, dst, _edit_model_name("thin_hubert")), "distilled student"),
        (lambda src, dst: rewrite_checkpoint(src, dst, _edit_model_name("transformer_lm")), "supported teachers"),
    ],
    ids=["missing", "garbage", "truncated", "corrupt", "plain-torch", "no-model", "no-cfg", "hubert_ctc",
         "wav2vec_ctc", "thin_hubert", "other-model"],
)
def test_bad_checkpoints_are_refused_with_the_file_named(tmp_path, hubert_ckpt, make_bad, match):
    bad = make_bad(hubert_ckpt, tmp_path / "bad_teacher.pt")
    with pytest.raises(TeacherError, match=match) as error:
        FrozenTeacher.from_checkpoint(str(bad))
    assert str(tmp_path / "bad_teacher.pt") in str(error.value)
    assert isinstance(error.value, ValueError)


def test_bad_dtype_is_refused(hubert_ckpt):
    with pytest.raises(TeacherError, match="fp32"):
        FrozenTeacher.from_checkpoint(str(hubert_ckpt), dtype="int8")


def test_check_layers(hubert_teacher):
    assert check_layers(hubert_teacher, range(3), "criterion.teacher_layers") == [0, 1, 2]
    for bad in ([0, 3], [-1], [True]):
        with pytest.raises(TeacherError, match="criterion.teacher_layers") as error:
            check_layers(hubert_teacher, bad, "criterion.teacher_layers")
        assert hubert_teacher.path in str(error.value) and "0 (CNN" in str(error.value)
