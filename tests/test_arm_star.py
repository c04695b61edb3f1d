"""ARMHuBERT / MaskHuBERT / STaRHuBERT (docs/papers.md#armhubert-and-maskhubert, #starhubert):
attention-map reuse against an explicit computation, padding, layer_grad_scale, the five presets at
the published sizes, masking distillation and temporal Gram losses against hand-computed values,
the teacher's masked pass, bad config, export of a reuse student, and learning on the mini corpus."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import CPU, MANIFESTS, console_script, json_logs, run
from fairseq_checkpoints import make_hubert_checkpoint
from fairseq_kd.criterions.kd_losses import (
    attention_map_loss,
    gram_bytes,
    masking_distill_loss,
    temporal_gram,
    tgm_loss,
)
from fairseq_kd.models.thin_hubert import ThinHubertConfig, ThinHubertModel, layer_grad_multipliers
from fairseq_kd.presets import model_preset

# published sizes in millions: (without heads, with heads) (docs/papers.md#armhubert-and-maskhubert,
# #starhubert); MaskHuBERT's paper gives only the count with heads, STaRHuBERT's models have none
PUBLISHED_M = {
    "armhubert": (22.02, 26.45),
    "armhubert_s": (18.40, 22.39),
    "maskhubert": (None, 26.64),
    "starhubert": (22.31, 22.31),
    "starhubert_l": (26.63, 26.63),
}

TINY = dict(
    conv_channels=[16] * 7, conv_kernels=[10, 3, 3, 3, 3, 2, 2], conv_strides=[5, 2, 2, 2, 2, 2, 2],
    extractor_mode="layer_norm", encoder_layers=4, encoder_embed_dim=32, encoder_ffn_embed_dim=48,
    encoder_attention_heads=4, conv_pos=8, conv_pos_groups=4, dropout=0.0, attention_dropout=0.0,
    activation_dropout=0.0, reuse_pattern=[True, False, True, False],
)


def tiny(**edits) -> ThinHubertModel:
    torch.manual_seed(0)
    return ThinHubertModel(ThinHubertConfig(**{**TINY, **edits})).eval()


# -- attention-map reuse ---------------------------------------------------------------------------
def explicit_encoder(model: ThinHubertModel, x: torch.Tensor) -> list:
    """The transformer layers written out with explicit softmax(Q K^T / sqrt(d)) weights (post-LN)."""
    enc = model.encoder
    x = enc.layer_norm(x + enc.pos_conv(x.transpose(1, 2)).transpose(1, 2))
    outputs, weights = [], None
    for layer, computes in zip(enc.layers, enc.reuse_pattern):
        attn = layer.self_attn
        B, T, C = x.shape
        heads = lambda y: y.view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)
        if computes:
            q, k = heads(attn.q_proj(x)), heads(attn.k_proj(x))
            weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim), dim=-1)
        mixed = (weights @ heads(attn.v_proj(x))).transpose(1, 2).reshape(B, T, C)
        x = layer.self_attn_layer_norm(x + attn.out_proj(mixed))
        x = layer.final_layer_norm(x + layer.fc2(F.gelu(layer.fc1(x))))
        outputs.append(x)
    return outputs


def test_reuse_equals_explicit_reference_and_has_no_qk():
    model = tiny()
    assert model.encoder.layers[1].self_attn.q_proj is None and model.encoder.layers[1].self_attn.k_proj is None
    assert model.encoder.layers[2].self_attn.q_proj is not None
    wav = torch.randn(2, 8000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        res = model.encode(wav)
        reference = explicit_encoder(model, res["hidden_states"][0])
    for got, want in zip(res["hidden_states"][1:], reference):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_computing_layer_equals_fairseqs_layer():
    from fairseq.models.wav2vec.wav2vec2 import TransformerSentenceEncoderLayer

    model = tiny()
    ours = model.encoder.layers[0]
    stock = TransformerSentenceEncoderLayer(32, 48, 4, 0.0, 0.0, 0.0, "gelu", False).eval()
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(7, 2, 32)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    with torch.no_grad():
        torch.testing.assert_close(ours(x, mask)[0][:, 0], stock(x, self_attn_padding_mask=mask)[0][:, 0],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x, mask)[0][:5, 1], stock(x, self_attn_padding_mask=mask)[0][:5, 1],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("multiple", [1, 4])
def test_reuse_padded_rows_equal_each_utterance_alone(multiple):
    model = tiny(layer_grad_scale=True, required_seq_len_multiple=multiple)
    lengths = [16000, 9000, 3000]
    wav = torch.randn(3, 16000, generator=torch.Generator().manual_seed(2))
    pad = torch.arange(16000)[None] >= torch.tensor(lengths)[:, None]
    with torch.no_grad():
        batch = model.encode(wav, padding_mask=pad)
        for row, n in enumerate(lengths):
            alone = model.encode(wav[row:row + 1, :n])
            for got, want in zip(batch["hidden_states"], alone["hidden_states"]):
                torch.testing.assert_close(got[row, : want.size(1)], want[0], atol=1e-5, rtol=1e-5)


def test_layer_grad_scale_multipliers():
    assert layer_grad_multipliers(12)[0] == 12 / 13 and layer_grad_multipliers(12)[-1] == 1 / 2
    wav = torch.randn(1, 4000, generator=torch.Generator().manual_seed(3))
    grads = []
    for scale in (False, True):
        model = tiny(encoder_layers=1, reuse_pattern=[], layer_grad_scale=scale)
        model.encode(wav)["hidden_states"][-1].sum().backward()
        grads.append(model.encoder.layers[0].fc2.bias.grad.clone())
    # the one layer's exposed output carries m (1 - m) = 1/2 * 1/2 of the gradient
    torch.testing.assert_close(grads[1], 0.25 * grads[0])


def test_reuse_config_errors_name_the_key():
    for edits, words in (
        (dict(reuse_pattern=[False, True, True, True]), "reuse_pattern[0]"),
        (dict(reuse_pattern=[True, False]), "has 2 entries but model.encoder_layers is 4"),
        (dict(reuse_pattern=[True, "maybe", True, True]), "true/false"),
        (dict(time_reduction_factor=2, time_reduction_layer=1), "model.time_reduction_layer=1"),
    ):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            ThinHubertModel(ThinHubertConfig(**{**TINY, **edits}))


def test_reuse_student_exports_standalone():
    from fairseq_kd.export.standalone import export_program, parity

    model = tiny(extractor_mode="default", layer_grad_scale=True)
    program = export_program(model, example_samples=8000).module()
    gen = torch.Generator().manual_seed(4)
    for wavs, lengths in ((torch.randn(3, 9000, generator=gen), torch.tensor([9000, 5000, 800])),
                          (torch.randn(1, 800, generator=gen), torch.tensor([800]))):
        assert parity(model, program, wavs, lengths) < 1e-4


# -- presets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_new_presets_match_published_sizes(name):
    summary = ThinHubertModel.model_summary(model_preset(name))
    without, with_heads = PUBLISHED_M[name]
    if without is not None:
        assert round(summary["params"] / 1e6, 2) == without
    assert round(summary["params_with_heads"] / 1e6, 2) == with_heads


def test_summary_prints_both_counts(capsys):
    from fairseq_kd.cli.summary import main

    assert main(["armhubert"]) in (0, None)
    out = capsys.readouterr().out
    assert "22.02 M" in out and "26.45 M" in out


# -- masking distillation --------------------------------------------------------------------------
def test_masking_distill_loss_hand_computed():
    student = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [0.0, 0.0], [9.0, 9.0]]])
    unmasked_t = torch.tensor([[[0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])
    masked_t = torch.tensor([[[5.0, 5.0], [2.0, 2.0], [0.0, 2.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, True, False]])  # frame 3 is padding, whatever it holds
    mask = torch.tensor([[True, False, True, True]])
    out = masking_distill_loss(student, unmasked_t, masked_t, valid, mask, l2=1.0)
    # masked frames 0, 2 vs the unmasked teacher: (1 + 0) / 2 + (1 + 1) / 2 = 1.5
    # unmasked frame 1 vs the masked teacher: (0 + 4) / 2 = 2
    assert out["masked"].item() == pytest.approx(1.5) and out["unmasked"].item() == pytest.approx(2.0)
    assert out["loss"].item() == pytest.approx(3.5)
    assert out["masked_frames"].item() == 2 and out["frames"].item() == 3
    l1 = masking_distill_loss(student, unmasked_t, masked_t, valid, mask, l1=1.0, l2=0.0)
    assert l1["loss"].item() == pytest.approx(0.5 + 1.0 + 2.0 / 2)


def test_teacher_masked_pass(tmp_path):
    from fairseq_kd.teacher import FrozenTeacher

    teacher = FrozenTeacher.from_checkpoint(make_hubert_checkpoint(tmp_path / "t.pt", layers=2))
    wav = torch.randn(2, 8000, generator=torch.Generator().manual_seed(5))
    pad = torch.zeros(2, 8000, dtype=torch.bool)
    pad[1, 6000:] = True
    plain, _ = teacher.hidden_states(wav, pad)
    none = torch.zeros(plain[0].shape[:2], dtype=torch.bool)
    same, _ = teacher.masked_hidden_states(wav, pad, none)
    for a, b in zip(plain, same):
        torch.testing.assert_close(a, b)
    some = none.clone()
    some[:, 3:6] = True
    masked, _ = teacher.masked_hidden_states(wav, pad, some)
    emb = teacher.model.mask_emb
    torch.testing.assert_close(masked[0][:, 3:6], emb.expand(2, 3, -1).float())
    torch.testing.assert_close(masked[0][:, :3], plain[0][:, :3])
    assert not (masked[-1] - plain[-1]).abs().max() < 1e-6 and not masked[-1].requires_grad
    assert not teacher.holder.training


class _Task(SimpleNamespace):
    pass


def _masked_cfg(**edits):
    from fairseq_kd.criterions.layer_distill import MaskedHintConfig

    base = dict(hint_layer_ids=[1, 2], pred_layer_ids=[], mask_prob=0.8, mask_length=10,
                mask_selection="uniform", time_reduction_factor=1, conv_channels=[16] * 7,
                conv_kernels=[10, 3, 3, 3, 3, 2, 2], conv_strides=[5, 2, 2, 2, 2, 2, 2])
    return OmegaConf.structured(MaskedHintConfig(**{**base, **edits}))


@pytest.mark.parametrize("edits, min_size, key", [
    (dict(mask_prob=0.0), 16000, "model.mask_prob=0.0"),
    (dict(mask_prob=1.0), 16000, "model.mask_prob=1.0"),
    (dict(), 4000, "task.min_sample_size=4000"),
    (dict(time_reduction_factor=2), 16000, "model.time_reduction_factor=2"),
    (dict(cos_weight=1.0), 16000, "criterion.cos_weight"),
])
def test_masking_bad_settings_are_named(tmp_path, edits, min_size, key):
    from fairseq_kd.criterions.layer_distill import MaskedHintCriterion
    from fairseq_kd.teacher import FrozenTeacher

    teacher = FrozenTeacher.from_checkpoint(make_hubert_checkpoint(tmp_path / "t.pt", layers=2))
    task = _Task(teacher=teacher, cfg=SimpleNamespace(min_sample_size=min_size))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        MaskedHintCriterion(_masked_cfg(**edits), task)


# -- temporal Gram matrices ------------------------------------------------------------------------
def test_temporal_gram_and_tgm_loss_hand_computed():
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [7.0, 7.0]]])
    valid = torch.tensor([[True, True, False]])
    raw = temporal_gram(a, a, valid, normalize="none")
    torch.testing.assert_close(raw[0], torch.tensor([[1.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))
    cos = temporal_gram(a, a, valid, normalize="frame")
    c = 1 / math.sqrt(2)
    torch.testing.assert_close(cos[0, :2, :2], torch.tensor([[1.0, c], [c, 1.0]]))
    # student Gram [[1,1],[1,2]] vs teacher (3 channels: widths may differ) [[1,0],[0,1]]:
    # squared errors 0, 1, 1, 1 over 4 valid pairs -> 0.75, times 2 frames
    teacher = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    out = tgm_loss(a, a, teacher, teacher, valid, normalize="none")
    assert out["loss"].item() == pytest.approx(1.5) and out["frames"].item() == 2
    # intra-layer: student input a, output b
    b = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]]])
    g = temporal_gram(a, b, valid, normalize="none")[0, :2, :2]
    torch.testing.assert_close(g, torch.tensor([[0.0, 2.0], [1.0, 2.0]]))
    assert gram_bytes(750) == 750 * 750 * 4 == 2_250_000


def test_tgm_padding_never_counts():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 4, requires_grad=True), torch.randn(2, 6, 8)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    dirty_s = s.detach().clone()
    dirty_s[1, 4:] = float("nan")
    dirty_t = t.clone()
    dirty_t[1, 4:] = 1e6
    a = tgm_loss(s, s, t, t, valid)["loss"]
    b = tgm_loss(dirty_s, dirty_s, dirty_t, dirty_t, valid)["loss"]
    assert torch.isfinite(b) and a.item() == pytest.approx(b.item(), rel=1e-6)
    alone = tgm_loss(s[1:, :4], s[1:, :4], t[1:, :4], t[1:, :4], valid[1:, :4])["loss"]
    first = tgm_loss(s[:1], s[:1], t[:1], t[:1], valid[:1])["loss"]
    assert a.item() == pytest.approx((first + alone).item(), rel=1e-6)
    a.backward()
    assert torch.all(s.grad[1, 4:] == 0)


def test_attention_map_loss_hand_computed():
    student = torch.tensor([[[0.5, 0.5, 0.0], [0.25, 0.75, 0.0], [0.3, 0.3, 0.4]]])
    teacher = torch.tensor([[[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.1, 0.1, 0.8]]])
    valid = torch.tensor([[True, True, False]])
    out = attention_map_loss(student, teacher, valid)
    assert out["loss"].item() == pytest.approx(math.log(2.0)) and out["frames"].item() == 2
    # per-head maps are averaged first
    heads = torch.stack([teacher, teacher], dim=1)
    assert attention_map_loss(student, heads, valid)["loss"].item() == pytest.approx(math.log(2.0))


def test_recorded_attention_maps_equal_fairseqs_own_weights():
    """The map recomputed from a real fairseq layer's recorded attention input equals the
    head-averaged weights fairseq's MultiheadAttention returns itself (need_weights=True), padded
    keys masked."""
    from fairseq.models.wav2vec.wav2vec2 import TransformerSentenceEncoderLayer
    from fairseq_kd.encoders.layers import attention_inputs, head_averaged_attention

    torch.manual_seed(0)
    layer = TransformerSentenceEncoderLayer(embedding_dim=32, ffn_embedding_dim=48, num_attention_heads=4,
                                            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0).eval()
    x = torch.randn(7, 2, 32)  # (T, B, C)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    with attention_inputs([layer]) as seen:
        layer(x, self_attn_padding_mask=mask)
    query, key_mask = seen[0]
    assert torch.equal(query, x) and torch.equal(key_mask, mask)
    ours = head_averaged_attention(layer.self_attn, query, key_mask)
    _, theirs = layer.self_attn(query=x, key=x, value=x, key_padding_mask=mask, need_weights=True)
    assert ours.shape == (2, 7, 7) and torch.allclose(ours, theirs, atol=1e-6)
    assert torch.all(ours[1, :, 5:] == 0)


def test_reusing_layer_map_is_its_computing_layers():
    from fairseq_kd.criterions.temporal_relation import attention_source
    from fairseq_kd.encoders.layers import attention_inputs, head_averaged_attention

    model = tiny()  # reuse_pattern [True, False, True, False]
    layers = model.encoder.layers
    assert [attention_source(layers, i) for i in range(4)] == [0, 0, 2, 2]
    source = torch.randn(2, 4000)
    with attention_inputs(layers) as seen:
        model(source=source, padding_mask=None)
    assert sorted(seen) == [0, 1, 2, 3]  # every layer ran (reusing ones record too)
    query, mask = seen[2]
    explicit = layers[2].self_attn.attention_weights(query, mask).mean(dim=1)
    assert torch.allclose(head_averaged_attention(layers[2].self_attn, query, mask), explicit, atol=1e-6)
    with pytest.raises(ValueError, match="no q_proj / k_proj"):
        head_averaged_attention(layers[1].self_attn, *seen[1])


def test_gram_layers_that_do_not_exist_are_named():
    from fairseq_kd.criterions.temporal_relation import TemporalGramConfig, check_gram_config

    cfg = OmegaConf.structured(TemporalGramConfig(encoder_layers=12, time_reduction_factor=1,
                                                  gram_layers=[0, 13], intra_layers=[1]))
    with pytest.raises(ValueError, match=r"criterion\.gram_layers: layer\(s\) \[13\]"):
        check_gram_config(cfg)
    cfg = OmegaConf.structured(TemporalGramConfig(encoder_layers=12, time_reduction_factor=1,
                                                  gram_layers=[], intra_layers=[0]))
    with pytest.raises(ValueError, match=r"criterion\.intra_layers: layer\(s\) \[0\]"):
        check_gram_config(cfg)
    for bad in ([0], [13]):
        cfg = OmegaConf.structured(TemporalGramConfig(encoder_layers=12, time_reduction_factor=1,
                                                      gram_layers=[], attention_layers=bad))
        with pytest.raises(ValueError, match=rf"criterion\.attention_layers: layer\(s\) \{bad}"):
            check_gram_config(cfg)


# -- training: every new preset, shrunk, learns on the mini corpus ---------------------------------
SHRUNK = [
    "model.encoder_layers=2", "model.encoder_embed_dim=64", "model.encoder_ffn_embed_dim=64",
    "model.encoder_attention_heads=4", "model.teacher_embed_dim=64",
    "model.conv_channels=[32,32,32,32,32,32,64,64,64]", "model.dropout=0.0", "model.attention_dropout=0.0",
    "model.activation_dropout=0.0", "model.dropout_input=0.0",
]
# Shrunk, armhubert_s is armhubert and starhubert_l is starhubert; maskhubert is armhubert without
# reuse (its masking path is armhubert's). Two variants keep the runtime small (2 x 2 runs).
VARIANTS = {
    "armhubert": ["model.hint_layer_ids=[1,2]", "model.reuse_pattern=[true,false]"],
    "starhubert": ["criterion.gram_layers=[0,1,2]", "criterion.intra_layers=[1,2]", "criterion.attention_layers=[1,2]"],
}


def _valid(stdout: str) -> Dict[str, float]:
    record = json_logs(stdout, "valid")[-1]
    return {k[len("valid_"):]: float(v) for k, v in record.items() if k.startswith("valid_")}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_shrunk_preset_learns(tmp_path, name):
    teacher = make_hubert_checkpoint(tmp_path / "teacher.pt", layers=2, embed_dim=64, ffn_dim=64, heads=4)
    save_dir = tmp_path / name
    cmd = [
        console_script("fairseq-hydra-train"), "--config-name", name, f"task.data={MANIFESTS}",
        f"task.teacher_path={teacher}", *SHRUNK, *VARIANTS[name], *CPU, "task.max_sample_size=24000",
        "dataset.batch_size=4", "optimization.update_freq=[1]", "optimization.lr=[0.003]",
        "lr_scheduler.warmup_updates=3", "+lr_scheduler.total_num_update=25", "common.log_format=json",
        "common.log_interval=10", f"checkpoint.save_dir={save_dir}", f"hydra.run.dir={save_dir}",
        "dataset.validate_interval=100",
    ]
    before = _valid(run([*cmd, "optimization.max_update=1"], cwd=tmp_path).stdout)
    after = _valid(run([*cmd, "optimization.max_update=25"], cwd=tmp_path).stdout)
    print(name, "held-out before/after:", before, after)
    if name == "starhubert":  # no heads: the held-out Gram MSE of every layer falls
        for key in ("gram_1", "gram_2", "intra_1", "intra_2", "attn_1", "attn_2"):
            assert after[key] < 0.75 * before[key], (before, after)
    else:
        for layer in ("h1", "h2"):
            assert after[f"cos_sim_{layer}"] > before[f"cos_sim_{layer}"] + 0.2, (before, after)
