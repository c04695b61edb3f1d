"""The thin_hubert student: exact sizes of the published students, MACs, shapes, padding, masking,
time reduction, fine-tuning contracts and initialisation from a fairseq HubertModel teacher."""

from __future__ import annotations

import math
from typing import Dict, List

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fairseq_kd.models.thin_hubert import (
    SplitLinear,
    ThinHubertConfig,
    ThinHubertModel,
)
from fairseq_kd.presets import MODEL_CONFIG_DIR, model_preset

HUBERT_CNN = dict(
    conv_channels=[512] * 7,
    conv_kernels=[10, 3, 3, 3, 3, 2, 2],
    conv_strides=[5, 2, 2, 2, 2, 2, 2],
    extractor_mode="default",
    conv_bias=False,
)
HUBERT_BASE = dict(
    **HUBERT_CNN,
    encoder_layers=12,
    encoder_embed_dim=768,
    encoder_ffn_embed_dim=3072,
    encoder_attention_heads=12,
)

# published sizes without distillation heads (docs/parameter_counts.md#published-sizes), in millions
EXPECTED_PARAMS_M = {
    "thin_deep": 21.20,
    "distilhubert": 23.49,
    "deep_12l_half_l2l": 26.87,
    "wide_3l_one_pred": 30.58,
    # the Deep-versus-Wide smaller students (sizes inferred, docs/papers.md#deep-versus-wide), SKILL, LightHuBERT
    "deep_12l_quarter_l2l": 9.93,
    "wide_3l_half_pred": 10.90,
    "deep_6l_half_l2l": 16.23,
    "skill_hubert_base": 26.87,
    "lighthubert_small": 26.87,
    # ARMHuBERT / MaskHuBERT / STaRHuBERT (docs/papers.md#armhubert-and-maskhubert, #starhubert);
    # MaskHuBERT's paper gives only 26.64 with heads: both counts are in tests/test_arm_star.py
    "armhubert": 22.02,
    "armhubert_s": 18.40,
    "maskhubert": 22.20,
    "starhubert": 22.31,
    "starhubert_l": 26.63,
}
# GMACs per 10 s of audio (docs/parameter_counts.md#compute)
EXPECTED_GMACS = {
    "hubert_base": 74.1, "distilhubert": 34.9, "thin_deep": 14.0, "deep_12l_half_l2l": 38.1
}
# the four presets as fairseq_kd/config/model/<name>.yaml writes them (docs/papers.md), read by
# the same reader as fairseq-kd-summary; the figures above are the papers', not the yaml's
PRESETS: Dict[str, dict] = {name: model_preset(name) for name in sorted(EXPECTED_PARAMS_M)}

# a tiny student with HuBERT's CNN geometry (20 ms frames, 400-sample receptive field);
# layer_norm extractor: fairseq's "default" GroupNorm normalises over time, padding included,
# so only this mode gives padded rows identical to the utterance alone
TINY = dict(
    conv_channels=[16] * 7,
    conv_kernels=[10, 3, 3, 3, 3, 2, 2],
    conv_strides=[5, 2, 2, 2, 2, 2, 2],
    extractor_mode="layer_norm",
    encoder_layers=3,
    encoder_embed_dim=32,
    encoder_ffn_embed_dim=64,
    encoder_attention_heads=4,
    conv_pos=8,
    conv_pos_groups=4,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    time_reduction_factor=2,
    time_reduction_layer=0,
    teacher_embed_dim=24,
    hint_layer_ids=[0, 1, 2, 3],
    hint_head_type="convt_linear",
    pred_layer_ids=[4, 8],
)
LENGTHS = [16000, 11000, 5000]  # 49, 34 and 15 CNN frames


def cnn_frames(samples: int) -> int:
    for k, s in zip(TINY["conv_kernels"], TINY["conv_strides"]):
        samples = (samples - k) // s + 1
    return samples


def tiny(**overrides) -> ThinHubertModel:
    torch.manual_seed(0)
    return ThinHubertModel(ThinHubertConfig(**{**TINY, **overrides}))


def meta_model(cfg: dict) -> ThinHubertModel:
    with torch.device("meta"):
        return ThinHubertModel(ThinHubertConfig(**cfg))


def padded_batch(lengths: List[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    source = torch.zeros(len(lengths), max(lengths))
    padding_mask = torch.ones(len(lengths), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        source[i, :n] = torch.randn(n, generator=g)
        padding_mask[i, :n] = False
    return source, padding_mask


# -- sizes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_match_published_sizes(name):
    model = meta_model(PRESETS[name])
    with_heads = ThinHubertModel.count_parameters(model, include_heads=True)
    model.remove_pretraining_modules()
    params = ThinHubertModel.count_parameters(model, include_heads=True)
    assert params == ThinHubertModel.count_parameters(model, include_heads=False)
    assert abs(params / 1e6 - EXPECTED_PARAMS_M[name]) < 0.005, params
    headless = not (PRESETS[name].get("hint_layer_ids") or PRESETS[name].get("pred_layer_ids"))  # STaRHuBERT
    assert with_heads > params or (headless and with_heads == params)


def test_hubert_base_shape_cross_check():
    model = meta_model(HUBERT_BASE)
    assert abs(ThinHubertModel.count_parameters(model, False) / 1e6 - 94.37) < 0.005


def test_distilhubert_prediction_heads_are_3_54m():
    model = meta_model(PRESETS["distilhubert"])
    heads = ThinHubertModel.count_parameters(model, True)
    heads -= ThinHubertModel.count_parameters(model, False)
    assert abs(heads / 1e6 - 3.54) < 0.005, heads


def test_fithubert_published_sizes_count_upsampler_and_heads():
    """22.49M = 21.20M + the unused ConvT up-sampler + the last head; FitW2V2 31.63M keeps all 12 heads."""
    model = meta_model(PRESETS["thin_deep"])
    upsampler = torch.nn.ConvTranspose1d(480, 480, kernel_size=2, stride=2, device="meta")
    upsampler_params = sum(p.numel() for p in upsampler.parameters())
    last_head = sum(p.numel() for p in model.hint_heads[str(12)].parameters())
    encoder = ThinHubertModel.count_parameters(model, include_heads=False)
    assert abs(upsampler_params / 1e6 - 0.46) < 0.005
    assert abs(last_head / 1e6 - 0.83) < 0.005
    assert abs((encoder + upsampler_params + last_head) / 1e6 - 22.49) < 0.005
    all_heads = ThinHubertModel.count_parameters(model, include_heads=True)
    assert abs((all_heads + upsampler_params) / 1e6 - 31.63) < 0.005


def test_macs_match_reference_and_ratios():
    gmacs = {
        name: ThinHubertModel.macs_per_second(cfg) * 10 / 1e9
        for name, cfg in [("hubert_base", HUBERT_BASE)] + list(PRESETS.items())
    }
    for name, expected in EXPECTED_GMACS.items():
        assert gmacs[name] == pytest.approx(expected, rel=0.02), (name, gmacs[name])
    assert gmacs["distilhubert"] / gmacs["hubert_base"] == pytest.approx(0.47, abs=0.01)
    assert gmacs["thin_deep"] / gmacs["hubert_base"] == pytest.approx(0.19, abs=0.01)
    breakdown = ThinHubertModel.macs_breakdown(PRESETS["thin_deep"])
    assert breakdown["cnn"] / 1e9 == pytest.approx(8.0, rel=0.02)


def test_model_summary_and_frame_rates():
    summary = ThinHubertModel.model_summary(PRESETS["distilhubert"])
    assert abs(summary["params"] / 1e6 - 23.49) < 0.005
    assert abs(summary["params_heads"] / 1e6 - 3.54) < 0.005
    assert summary["macs_per_10s"] / 1e9 == pytest.approx(34.9, rel=0.02)
    assert summary["output_frame_rate"] == 50.0
    assert ThinHubertModel.output_frame_rate(PRESETS["thin_deep"]) == 25.0


def test_yaml_presets_are_thin_hubert_configs_and_build_through_fairseq():
    from fairseq.models import MODEL_REGISTRY, build_model

    assert MODEL_REGISTRY["thin_hubert"] is ThinHubertModel
    assert sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml")) == sorted(PRESETS)  # each has its paper
    for name, cfg in PRESETS.items():
        path = MODEL_CONFIG_DIR / f"{name}.yaml"
        assert path.read_text().startswith("# @package _group_\n")
        assert OmegaConf.load(path)._name == "thin_hubert"
        # every key is a ThinHubertConfig field (the merge refuses unknown keys)
        OmegaConf.merge(OmegaConf.structured(ThinHubertConfig), cfg)
        with torch.device("meta"):
            model = build_model(OmegaConf.create({**cfg, "_name": "thin_hubert"}), task=None, from_checkpoint=True)
        assert isinstance(model, ThinHubertModel)
        model.remove_pretraining_modules()
        params = ThinHubertModel.count_parameters(model, include_heads=True)
        assert abs(params / 1e6 - EXPECTED_PARAMS_M[name]) < 0.005


def test_config_validation_names_the_keys():
    with pytest.raises(ValueError, match="conv_channels, conv_kernels and conv_strides"):
        ThinHubertModel(ThinHubertConfig(**{**TINY, "conv_kernels": [10, 3]}))
    with pytest.raises(ValueError, match="time_reduction_layer"):
        ThinHubertModel(ThinHubertConfig(**{**TINY, "time_reduction_layer": 3}))
    with pytest.raises(ValueError, match="hint_layer_ids"):
        ThinHubertModel(ThinHubertConfig(**{**TINY, "hint_layer_ids": [4]}))
    with pytest.raises(ValueError, match="hint_head_groups"):
        ThinHubertModel(ThinHubertConfig(**{**TINY, "hint_head_groups": [1]}))
    with pytest.raises(ValueError, match="group 1 mixes layers"):
        ThinHubertModel(
            ThinHubertConfig(**{**TINY, "hint_layer_ids": [0, 1], "hint_head_groups": [1, 1]})
        )


def test_fine_tuning_overrides_exist_as_config_fields():
    """hubert_ctc / wav2vec_ctc override these by name (CONTRACTS 2.1); missing names are dropped."""
    fields = set(ThinHubertConfig.__dataclass_fields__)
    overridden = {
        "dropout", "activation_dropout", "dropout_input", "attention_dropout", "mask_length",
        "mask_prob", "mask_selection", "mask_other", "no_mask_overlap", "mask_channel_length",
        "mask_channel_prob", "mask_channel_selection", "mask_channel_other",
        "no_mask_channel_overlap", "encoder_layerdrop", "feature_grad_mult", "encoder_embed_dim",
    }
    assert overridden <= fields, overridden - fields


# -- forward ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "factor,tr_layer,multiple,head_type",
    [(1, 0, 1, "convt_linear"), (2, 0, 1, "convt_linear"), (2, 1, 2, "convt_linear"),
     (3, 2, 1, "linear")],
)
def test_forward_shapes(factor, tr_layer, multiple, head_type):
    model = tiny(
        time_reduction_factor=factor,
        time_reduction_layer=tr_layer,
        required_seq_len_multiple=multiple,
        hint_head_type=head_type,
    ).eval()
    source, padding_mask = padded_batch(LENGTHS)
    with torch.no_grad():
        out = model(source, padding_mask=padding_mask)
    B, D, T = len(LENGTHS), 32, cnn_frames(max(LENGTHS))
    valid = torch.tensor([cnn_frames(n) for n in LENGTHS])
    assert len(out["hidden_states"]) == len(out["padding_masks"]) == 4
    for layer, (h, m) in enumerate(zip(out["hidden_states"], out["padding_masks"])):
        reduced = factor > 1 and layer - 1 >= tr_layer
        T_l = math.ceil(T / factor) if reduced else T
        assert h.shape == (B, T_l, D) and m.shape == (B, T_l)
        expected = torch.div(valid + factor - 1, factor, rounding_mode="floor") if reduced else valid
        assert torch.equal((~m).sum(-1), expected)
        upsampled = head_type == "convt_linear" or not reduced
        assert out["hints"][layer].shape == (B, T if upsampled else T_l, 24)
    assert out["x"] is out["hidden_states"][-1]
    assert out["padding_mask"] is out["padding_masks"][-1]
    assert sorted(out["preds"]) == [4, 8]
    assert out["preds"][8].shape == (B, out["x"].size(1), 24)
    if factor == 2:
        assert out["x"].size(1) == math.ceil(T / 2) == 25  # 49 frames (odd) -> 25


@pytest.mark.parametrize("tr_layer", [0, 1])
def test_padded_rows_match_each_utterance_alone(tr_layer):
    model = tiny(time_reduction_layer=tr_layer, required_seq_len_multiple=2).eval()
    source, padding_mask = padded_batch(LENGTHS)
    with torch.no_grad():
        batch = model(source, padding_mask=padding_mask)
        for i, n in enumerate(LENGTHS):
            alone = model(source[i : i + 1, :n])
            assert alone["padding_mask"] is None
            for layer, h in enumerate(alone["hidden_states"]):
                T_l = h.size(1)
                assert int((~batch["padding_masks"][layer][i]).sum()) == T_l
                torch.testing.assert_close(
                    batch["hidden_states"][layer][i, :T_l], h[0], atol=1e-5, rtol=1e-4
                )
            for layer, hint in alone["hints"].items():
                torch.testing.assert_close(
                    batch["hints"][layer][i, : hint.size(1)], hint[0], atol=1e-5, rtol=1e-4
                )
            for layer, pred in alone["preds"].items():
                torch.testing.assert_close(
                    batch["preds"][layer][i, : pred.size(1)], pred[0], atol=1e-5, rtol=1e-4
                )


def test_shortest_inputs_with_time_reduction():
    """0.05 s = 800 samples = 2 CNN frames -> 1 frame; 400 samples = 1 frame stays 1 frame."""
    model = tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 800))
        assert out["hidden_states"][0].shape[1] == 2 and out["x"].shape[1] == 1
        assert out["hints"][3].shape[1] == 2  # up-sampled back to the CNN rate
        source, padding_mask = padded_batch([800, 400])
        x, mask = model.extract_features(source, padding_mask=padding_mask)
    assert x.shape == (2, 1, 32)
    assert (~mask).sum(-1).tolist() == [1, 1]  # "all frames are padding" rule keeps the 1-frame input


def test_extract_features_returns_output_rate_and_lengths():
    model = tiny().eval()
    source, padding_mask = padded_batch(LENGTHS)
    with torch.no_grad():
        x, mask = model.extract_features(source, padding_mask=padding_mask, mask=False)
        full = model(source, padding_mask=padding_mask)
        x1, mask1 = model.extract_features(source, padding_mask=padding_mask, layer=0)
        x_none, mask_none = model.extract_features(source)
    assert x.shape == (3, 25, 32) and mask.shape == (3, 25) and mask.dtype == torch.bool
    assert (~mask).long().sum(-1).tolist() == [math.ceil(cnn_frames(n) / 2) for n in LENGTHS]
    torch.testing.assert_close(x, full["x"])
    assert x1.shape == (3, 49, 32) and (~mask1).sum(-1).tolist() == [cnn_frames(n) for n in LENGTHS]
    assert mask_none is None and x_none.shape == (3, 25, 32)


def test_mask_changes_outputs_in_train_mode():
    model = tiny(mask_prob=0.5, mask_length=2).train()
    source, padding_mask = padded_batch(LENGTHS)
    np.random.seed(0)
    plain = model(source, padding_mask=padding_mask, mask=False)
    masked = model(source, padding_mask=padding_mask, mask=True)
    idx = masked["mask_indices"]
    assert plain["mask_indices"] is None and idx.shape == (3, 49)
    assert idx.sum(-1).min() >= 2 and not idx[plain["padding_masks"][0]].any()  # never on padding
    feats = masked["hidden_states"][0]
    torch.testing.assert_close(feats[idx], model.mask_emb.detach().expand(int(idx.sum()), -1))
    torch.testing.assert_close(feats[~idx], plain["hidden_states"][0][~idx])
    assert not torch.allclose(masked["x"], plain["x"])
    x, _ = model.extract_features(source, padding_mask=padding_mask, mask=True)
    assert not torch.allclose(x, plain["x"])


def test_channel_masking():
    model = tiny(mask_prob=0.0, mask_channel_prob=0.5, mask_channel_length=4).train()
    source = torch.randn(2, 8000)
    np.random.seed(0)
    plain = model(source)
    masked = model(source, mask=True)
    assert masked["mask_indices"] is None
    zeroed = (masked["hidden_states"][0] == 0).all(1)  # (B, D): channels zero on every frame
    assert zeroed.any(-1).all() and not (plain["hidden_states"][0] == 0).all(1).any()
    assert not torch.allclose(masked["x"], plain["x"])


@pytest.mark.parametrize("mult", [0.0, 0.1])
def test_feature_grad_mult(mult):
    model = tiny(feature_grad_mult=mult).train()
    x, _ = model.extract_features(torch.randn(2, 4000))
    x.pow(2).mean().backward()
    cnn_grads = [p.grad for p in model.feature_extractor.parameters()]
    if mult == 0.0:  # frozen: run under no_grad, like hubert.py
        assert all(g is None for g in cnn_grads)
    else:
        assert all(g is not None for g in cnn_grads)
    assert model.post_extract_proj.weight.grad is not None


def test_strict_load_after_removing_heads():
    """CONTRACTS 2.2: nulled heads keep their checkpoint keys ignorable under strict loading."""
    full_state = tiny().state_dict()
    assert any(k.startswith("hint_heads.") for k in full_state)
    assert any(k.startswith("pred_head.") for k in full_state)
    model = tiny(hint_head_groups=[0, 1, 1, 1])  # different heads: must not matter once removed
    model.remove_pretraining_modules()
    assert model.hint_heads is None and model.pred_head is None
    model.load_state_dict(full_state, strict=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, full_state[name])
    out = model.eval()(torch.randn(1, 3200))
    assert out["hints"] == {} and out["preds"] == {}
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict({**full_state, "teacher.weight": torch.zeros(1)}, strict=True)


def test_layerdrop_in_train_mode_only():
    model = tiny(encoder_layerdrop=1.0).train()
    source = torch.randn(2, 8000)
    out = model(source)
    hs = out["hidden_states"]
    # every layer dropped: layer 1 is the time-reduced encoder input, the others pass it through
    assert torch.equal(hs[2], hs[1]) and torch.equal(hs[3], hs[1])
    out["x"].sum().backward()
    assert all(p.grad is None for p in model.encoder.layers.parameters())

    model.eval()
    with torch.no_grad():
        a, b = model(source), model(source)
    assert not torch.allclose(a["hidden_states"][2], a["hidden_states"][1])
    for h1, h2 in zip(a["hidden_states"], b["hidden_states"]):
        assert torch.equal(h1, h2)


def test_dropout_makes_train_mode_stochastic_and_eval_deterministic():
    model = tiny(dropout=0.1, attention_dropout=0.1, dropout_input=0.1)
    source = torch.randn(1, 4000)
    model.train()
    assert not torch.allclose(model(source)["x"], model(source)["x"])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(source)["x"], model(source)["x"])


def test_pre_ln_last_hidden_state_includes_final_layer_norm():
    model = tiny(layer_norm_first=True).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4000))
        x, _ = model.extract_features(torch.randn(1, 4000), layer=2)
    assert out["x"] is out["hidden_states"][-1]
    torch.testing.assert_close(out["x"].mean(-1), torch.zeros_like(out["x"][..., 0]), atol=1e-5, rtol=0)
    assert x.shape[-1] == 32


# -- heads -----------------------------------------------------------------------------------------
def test_split_linear_is_n_independent_linears():
    torch.manual_seed(0)
    split = SplitLinear(6, 3, 5)
    x = torch.randn(2, 4, 18)
    y = split(x)
    assert y.shape == (2, 4, 3, 5)
    for n in range(3):
        ref = x[..., n * 6 : (n + 1) * 6] @ split.weight[n] + split.bias[n]
        torch.testing.assert_close(y[:, :, n], ref)


def test_shared_and_identity_initialised_hint_heads():
    model = tiny(
        time_reduction_factor=1,
        hint_layer_ids=[1, 2, 3],
        hint_head_groups=[7, 7, 9],
        hint_head_type="linear",
        hint_identity_init=True,
        teacher_embed_dim=48,
    )
    assert sorted(model.hint_heads.keys()) == ["7", "9"]
    w = model.hint_heads["7"].proj.weight
    assert torch.equal(w, torch.eye(48, 32))
    assert torch.equal(model.hint_heads["7"].proj.bias, torch.zeros(48))
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 4000))
    torch.testing.assert_close(out["hints"][1][..., :32], out["hidden_states"][1])


def test_real_size_fithubert_forward_one_second():
    torch.manual_seed(0)
    model = ThinHubertModel(ThinHubertConfig(**PRESETS["thin_deep"])).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 16000))
    assert out["x"].shape == (2, 25, 480)
    assert len(out["hints"]) == 12 and out["hints"][12].shape == (2, 49, 768)


# -- initialisation from a fairseq HubertModel -----------------------------------------------------
def tiny_teacher():
    from fairseq.models.hubert.hubert import HubertConfig, HubertModel
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

    torch.manual_seed(1)
    cfg = HubertConfig(
        label_rate=50.0,
        extractor_mode="layer_norm",
        conv_feature_layers="[(16,10,5)] + [(16,3,2)] * 4 + [(16,2,2)] * 2",
        encoder_layers=4,
        encoder_embed_dim=32,
        encoder_ffn_embed_dim=64,
        encoder_attention_heads=4,
        conv_pos=8,
        conv_pos_groups=4,
    )
    return HubertModel(cfg, HubertPretrainingConfig(labels=["km"]), [None]), cfg


def test_init_from_teacher_copies_exactly_what_matches():
    teacher, teacher_cfg = tiny_teacher()
    teacher_state = teacher.state_dict()
    student = tiny()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    copied = student.init_from_teacher(
        teacher_state, teacher_cfg, init_cnn=True, init_pos_conv=True, init_layers=2
    )
    after = student.state_dict()
    copied_prefixes = (
        "feature_extractor.", "layer_norm.", "post_extract_proj.", "encoder.pos_conv.",
        "encoder.layer_norm.", "encoder.layers.0.", "encoder.layers.1.",
    )
    assert set(copied) == {k for k in after if k.startswith(copied_prefixes)}
    assert "encoder.pos_conv.0.weight_g" in copied and "encoder.layers.1.fc2.weight" in copied
    for name, tensor in after.items():
        if name in copied:
            assert torch.equal(tensor, teacher_state[name]), name
        else:  # layer 2, time reduction, mask_emb and heads untouched
            assert torch.equal(tensor, before[name]), name
    # the copied part computes what the teacher computes
    source = torch.randn(1, 4000)
    with torch.no_grad():
        t_x, _ = teacher.eval().extract_features(source, mask=False, output_layer=2)
        student_ref = tiny(time_reduction_factor=1).eval()
        student_ref.init_from_teacher(teacher_state, teacher_cfg, True, True, 2)
        s_x, _ = student_ref.extract_features(source, layer=2)
    torch.testing.assert_close(s_x, t_x, atol=1e-5, rtol=1e-4)


def test_init_from_teacher_raises_on_shape_mismatch_and_copies_nothing():
    teacher, teacher_cfg = tiny_teacher()
    student = tiny(encoder_embed_dim=48, encoder_attention_heads=4)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    expected = (r"cannot copy encoder\.pos_conv\.0\.\S+: student shape \(48,\S*\) != teacher shape \(32,.*\): "
                r"set model\.encoder_embed_dim / conv_pos / conv_pos_groups to the teacher's")
    with pytest.raises(ValueError, match=expected):
        student.init_from_teacher(
            teacher.state_dict(), teacher_cfg, init_cnn=True, init_pos_conv=True
        )
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    # CNN of the same shapes but another width: the CNN is copied, post_extract_proj kept
    copied = student.init_from_teacher(teacher.state_dict(), teacher_cfg, init_cnn=True)
    assert copied and all(n.startswith(("feature_extractor.", "layer_norm.")) for n in copied)
    # a thin CNN cannot take the teacher's
    thin = tiny(conv_channels=[8] * 7)
    with pytest.raises(ValueError, match=r"feature_extractor\.conv_layers\.0\.0\.weight"):
        thin.init_from_teacher(teacher.state_dict(), teacher_cfg, init_cnn=True)
    with pytest.raises(ValueError, match="init_layers=4 exceeds the student's 3 layers"):
        tiny().init_from_teacher(teacher.state_dict(), teacher_cfg, init_layers=4)
