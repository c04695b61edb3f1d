"""DPHuBERT-style structured pruning (fairseq_kd/models/pruning.py) on real fairseq modules."""

import math

import pytest
import torch
import torch.nn as nn

from fairseq.models.wav2vec.wav2vec2 import (
    ConvFeatureExtractionModel,
    TransformerSentenceEncoderLayer,
)

from fairseq_kd.models import pruning as P

D, HEADS, FFN = 128, 4, 96  # head_dim = 32 here: formulas take head_dim
HD = D // HEADS
CONV = [(16, 10, 5), (12, 3, 2), (8, 2, 2)]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_layer() -> TransformerSentenceEncoderLayer:
    torch.manual_seed(0)
    layer = TransformerSentenceEncoderLayer(
        embedding_dim=D, ffn_embedding_dim=FFN, num_attention_heads=HEADS,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    return layer.eval()


def make_cnn(bias: bool = False) -> ConvFeatureExtractionModel:
    torch.manual_seed(0)
    return ConvFeatureExtractionModel(CONV, dropout=0.0, mode="default", conv_bias=bias).eval()


# HardConcrete


def test_hard_concrete_train_samples_in_unit_interval_and_grad_flows():
    torch.manual_seed(0)
    hc = P.HardConcrete(50, init_mean=0.5).train()
    s = hc()
    assert s.shape == (50,) and bool(((s >= 0) & (s <= 1)).all())
    assert bool((s == 0).any() or (s == 1).any())  # the stretch makes exact 0/1 reachable
    (s.sum() + hc.l0_norm()).backward()
    assert hc.log_alpha.grad is not None and hc.log_alpha.grad.abs().sum() > 0


def test_hard_concrete_eval_mask_is_deterministic_with_expected_zeros():
    hc = P.HardConcrete(10).eval()
    with torch.no_grad():
        hc.log_alpha.copy_(torch.linspace(-6, 6, 10))
    m1, m2 = hc(), hc()
    assert torch.equal(m1, m2)
    expected_zeros = round(10 - hc.l0_norm().item())
    assert int((m1 == 0).sum()) == expected_zeros > 0
    assert bool((m1[:expected_zeros] == 0).all())  # the smallest log_alphas go
    kept = m1[expected_zeros:]
    assert torch.allclose(kept, torch.sigmoid(hc.log_alpha[expected_zeros:] / hc.beta * 0.8))


def test_l0_prob_formula_and_monotone():
    hc = P.HardConcrete(7)
    with torch.no_grad():
        hc.log_alpha.copy_(torch.linspace(-3, 3, 7))
    p = hc.l0_prob()
    ref = torch.sigmoid(hc.log_alpha - (2 / 3) * math.log(0.1 / 1.1))
    assert torch.allclose(p, ref)
    assert bool((p[1:] > p[:-1]).all())
    # P(s != 0) matches Monte-Carlo samples
    torch.manual_seed(0)
    hc.train()
    freq = torch.stack([hc() for _ in range(4000)]).ne(0).float().mean(0)
    assert torch.allclose(freq, p.detach(), atol=0.03)


def test_default_init_keeps_everything():
    hc = P.HardConcrete(12).eval()
    assert bool((hc() > 0.9).all())


# expected parameter count


def test_expected_params_equals_actual_for_integer_masks():
    cnn = make_cnn()
    masks = [P.mask_from_pruned(16, [0, 3, 5]), P.mask_from_pruned(12, [1]),
             P.mask_from_pruned(8, [2, 7])]
    pruned_cnn, _, _ = P.materialise_conv_stack(cnn, masks)
    kept = [13, 11, 6]
    assert n_params(pruned_cnn) == P.conv_stack_params(kept, [k for _, k, _ in CONV])
    assert n_params(cnn) == P.conv_stack_params([16, 12, 8], [10, 3, 2])

    cnn_b = make_cnn(bias=True)
    pruned_b, _, _ = P.materialise_conv_stack(cnn_b, masks)
    assert n_params(pruned_b) == P.conv_stack_params(kept, [10, 3, 2], conv_bias=True)

    layer = make_layer()
    heads = P.mask_from_pruned(HEADS, [1, 2])
    units = P.mask_from_pruned(FFN, list(range(0, FFN, 3)))
    small = P.materialise_layer(layer, heads, units)
    h, f = 2, FFN - len(range(0, FFN, 3))
    assert n_params(layer) == P.attention_params(HEADS, D, HD) + P.ffn_params(FFN, D)
    assert n_params(small) == P.attention_params(h, D, HD) + P.ffn_params(f, D)

    # feature projection: HuBERT's layer_norm over channels + post_extract_proj
    proj = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, D))
    assert n_params(proj) == P.feature_projection_params(6, D)

    whole = n_params(pruned_cnn) + n_params(proj) + 2 * n_params(small) + 1234
    assert whole == P.expected_num_params(kept, [10, 3, 2], [h, h], [f, f], D,
                                          head_dim=HD, fixed=1234)


def test_expected_params_differentiable_in_log_alpha():
    hcs = [P.HardConcrete(c) for c, _, _ in CONV]
    head_hc, unit_hc = P.HardConcrete(HEADS), P.HardConcrete(FFN)
    total = P.expected_num_params([h.l0_norm() for h in hcs], [10, 3, 2],
                                  [head_hc.l0_norm()], [unit_hc.l0_norm()], D, head_dim=HD)
    total.backward()
    assert all(h.log_alpha.grad.abs().sum() > 0 for h in hcs + [head_hc, unit_hc])


def test_expected_params_hubert_base_shape():
    # the unpruned formula reproduces a real HuBERT Base-shaped encoder (built on meta)
    from fairseq_kd.models.thin_hubert import ThinHubertConfig, ThinHubertModel

    with torch.device("meta"):
        model = ThinHubertModel(ThinHubertConfig())
    fixed = sum(p.numel() for n, p in model.named_parameters()
                if n.startswith(("mask_emb", "encoder.pos_conv", "encoder.layer_norm")))
    total = P.expected_num_params([512] * 7, [10, 3, 3, 3, 3, 2, 2], [12] * 12, [3072] * 12,
                                  768, fixed=fixed)
    assert total == ThinHubertModel.count_parameters(model, include_heads=False)


# Lagrangian


def test_target_sparsity_warms_up_linearly():
    assert P.target_sparsity(0, 0.75, 5000) == 0.0
    assert P.target_sparsity(2500, 0.75, 5000) == pytest.approx(0.375)
    assert P.target_sparsity(9000, 0.75, 5000) == 0.75
    assert P.target_sparsity(10, 0.75, 0) == 0.75


def test_lagrangian_value_hand_computed_and_ascent():
    l1, l2 = P.ascent_parameter(0.5), P.ascent_parameter(2.0)
    s_hat = torch.tensor(0.4, requires_grad=True)
    term = P.lagrangian_term(s_hat, 0.6, l1, l2)
    # 0.5 * (-0.2) + 2.0 * 0.04 = -0.02
    assert term.item() == pytest.approx(-0.02)
    term.backward()
    assert l1.grad.item() == pytest.approx(0.2)  # -(s_hat - s): ascent
    assert l2.grad.item() == pytest.approx(-0.04)
    assert s_hat.grad.item() == pytest.approx(0.5 + 2 * 2.0 * (-0.2))
    # an SGD step moves lambda1 against the constraint violation (grows |lambda1 * gap|)
    opt = torch.optim.SGD([l1, l2], lr=1.0)
    opt.step()
    assert l1.item() == pytest.approx(0.3)
    s = P.expected_sparsity(torch.tensor(25.0), 100)
    assert s.item() == pytest.approx(0.75)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_target_sparsity_outside_unit_interval_raises(bad):
    with pytest.raises(ValueError, match=r"target sparsity must be in \(0, 1\)"):
        P.target_sparsity(10, bad, 100)


# materialise == masked


@pytest.mark.parametrize("soft", [False, True])
def test_materialised_layer_equals_masked_layer(soft):
    layer = make_layer()
    head_mask = P.mask_from_pruned(HEADS, [0, 2])
    unit_mask = P.mask_from_pruned(FFN, list(range(0, FFN, 4)))
    if soft:  # eval masks of DPHuBERT carry soft values that must be folded in
        torch.manual_seed(1)
        head_mask = head_mask * torch.rand(HEADS).add(0.5)
        unit_mask = unit_mask * torch.rand(FFN).add(0.5)
    x = torch.randn(7, 3, D)  # (T, B, D)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    small = P.materialise_layer(layer, head_mask, unit_mask)
    handles = P.attach_layer_masks(layer, lambda: head_mask, lambda: unit_mask)
    with torch.no_grad():
        ref, _ = layer(x, self_attn_padding_mask=pad)
        out, _ = small(x, self_attn_padding_mask=pad)
    assert small.self_attn.num_heads == 2 and small.fc1.out_features == FFN - FFN // 4
    assert torch.allclose(out, ref, atol=1e-5)
    for h in handles:
        h.remove()
    with torch.no_grad():
        full, _ = layer(x, self_attn_padding_mask=pad)
    assert not torch.allclose(full, ref, atol=1e-3)  # the mask did something


def test_layers_may_end_with_different_sizes():
    layers = [make_layer(), make_layer()]
    small = [
        P.materialise_layer(layers[0], P.mask_from_pruned(HEADS, [3]), P.mask_from_pruned(FFN, [0])),
        P.materialise_layer(layers[1], P.mask_from_pruned(HEADS, [0, 1, 2]),
                            P.mask_from_pruned(FFN, list(range(50)))),
    ]
    x = torch.randn(5, 2, D)
    with torch.no_grad():
        for s in small:
            x, _ = s(x)
    assert x.shape == (5, 2, D)
    assert [s.self_attn.num_heads for s in small] == [3, 1]
    assert [s.fc1.out_features for s in small] == [FFN - 1, FFN - 50]


def test_hard_concrete_drives_masked_layer_with_gradients():
    layer = make_layer().train()
    head_hc, unit_hc = P.HardConcrete(HEADS, init_mean=0.5), P.HardConcrete(FFN, init_mean=0.5)
    P.attach_layer_masks(layer, head_hc, unit_hc)
    out, _ = layer(torch.randn(4, 2, D))
    out.pow(2).sum().backward()
    assert head_hc.log_alpha.grad.abs().sum() > 0 and unit_hc.log_alpha.grad.abs().sum() > 0


@pytest.mark.parametrize("bias", [False, True])
def test_materialised_conv_stack_equals_masked(bias):
    cnn = make_cnn(bias)
    torch.manual_seed(2)
    masks = [P.mask_from_pruned(16, [1, 4, 9]) * torch.rand(16).add(0.5),
             P.mask_from_pruned(12, [0, 11]) * torch.rand(12).add(0.5),
             P.mask_from_pruned(8, [3]) * torch.rand(8).add(0.5)]
    wav = torch.randn(2, 800)
    small, kept_last, scale_last = P.materialise_conv_stack(cnn, masks)
    P.attach_conv_masks(cnn, [lambda m=m: m for m in masks])
    with torch.no_grad():
        ref = cnn(wav)
        out = small(wav)
    assert out.shape[1] == 7 and kept_last.tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert torch.allclose(out * scale_last[None, :, None], ref[:, kept_last], atol=1e-5)
    assert bool((ref[:, 3] == 0).all())


# bad input


def test_pruning_more_than_exist_raises():
    with pytest.raises(ValueError, match="cannot prune 5 of 4 units: more than exist"):
        P.mask_from_pruned(4, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="out of range"):
        P.mask_from_pruned(4, [4])
    layer = make_layer()
    with pytest.raises(ValueError, match="all 4 heads are pruned"):
        P.materialise_layer(layer, head_mask=torch.zeros(HEADS))
    with pytest.raises(ValueError, match="head mask must have 4 entries"):
        P.materialise_layer(layer, head_mask=torch.ones(HEADS + 2))
    with pytest.raises(ValueError, match=f"FFN unit mask must have {FFN} entries"):
        P.materialise_layer(layer, unit_mask=torch.ones(FFN + 1))
    with pytest.raises(ValueError, match="need one mask per conv layer"):
        P.materialise_conv_stack(make_cnn(), [torch.ones(16)])
    with pytest.raises(ValueError, match="HardConcrete needs n >= 1"):
        P.HardConcrete(0)


def test_layer_norm_extractor_mode_rejected():
    cnn = ConvFeatureExtractionModel(CONV, dropout=0.0, mode="layer_norm")
    with pytest.raises(ValueError, match="extractor_mode=default only"):
        P.materialise_conv_stack(cnn, [torch.ones(c) for c, _, _ in CONV])


# -- per-layer widths in thin_hubert ------------------------------------------------------------
from fairseq_kd.models.thin_hubert import (  # noqa: E402
    ThinHubertConfig,
    ThinHubertModel,
    layer_attention_heads,
    layer_ffn_dims,
)

# a tiny full-copy student: HuBERT's conv geometry shortened, group-norm CNN (as HuBERT Base,
# the only extractor_mode conv pruning supports), DPHuBERT's identity-initialised hint heads
STUDENT = dict(
    conv_channels=[16, 12, 8], conv_kernels=[10, 3, 2], conv_strides=[5, 2, 2],
    extractor_mode="default", encoder_layers=3, encoder_embed_dim=32, encoder_ffn_embed_dim=48,
    encoder_attention_heads=4, conv_pos=8, conv_pos_groups=4,
    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    hint_layer_ids=[0, 2, 3], hint_head_groups=[0, 1, 1], hint_head_type="linear",
    hint_identity_init=True, teacher_embed_dim=32,
)
PER_LAYER = dict(encoder_attention_heads_per_layer=[1, 4, 2], encoder_ffn_embed_dim_per_layer=[5, 48, 17])


def student(**overrides) -> ThinHubertModel:
    torch.manual_seed(0)
    return ThinHubertModel(ThinHubertConfig(**{**STUDENT, **overrides})).eval()


def wav_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(2, 3000, generator=g)
    padding_mask = torch.zeros(2, 3000, dtype=torch.bool)
    padding_mask[1, 2200:] = True
    return source, padding_mask


def test_per_layer_widths_build_fairseq_layers_of_those_sizes():
    model = student(**PER_LAYER)
    for layer, h, f in zip(model.encoder.layers, [1, 4, 2], [5, 48, 17]):
        attn = layer.self_attn
        assert (attn.num_heads, attn.head_dim, attn.embed_dim) == (h, 8, 8 * h)  # head size D / H
        assert (attn.q_proj.in_features, attn.q_proj.out_features) == (32, 8 * h)
        assert (attn.out_proj.in_features, attn.out_proj.out_features) == (8 * h, 32)
        assert layer.fc1.out_features == f and layer.fc2.in_features == f
    assert layer_attention_heads(model.cfg) == [1, 4, 2] and layer_ffn_dims(model.cfg) == [5, 48, 17]
    assert layer_attention_heads(ThinHubertConfig(**STUDENT)) == [4, 4, 4]
    source, padding_mask = wav_batch()
    res = model(source, padding_mask=padding_mask)
    assert res["x"].shape == (2, 149, 32) and set(res["hints"]) == {0, 2, 3}
    res["x"].sum().backward()  # trainable
    assert model.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_per_layer_parameter_count_is_exact():
    fields = {**STUDENT, **PER_LAYER}
    model = student(**PER_LAYER)
    summary = ThinHubertModel.model_summary(fields)
    assert summary["params_with_heads"] == sum(p.numel() for p in model.parameters())
    model.remove_pretraining_modules()
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    fixed = sum(p.numel() for n, p in model.named_parameters()
                if n.startswith(("mask_emb", "encoder.pos_conv", "encoder.layer_norm")))
    assert summary["params"] == P.expected_num_params(
        [16, 12, 8], [10, 3, 2], [1, 4, 2], [5, 48, 17], 32, head_dim=8, fixed=fixed)
    # MACs: per-layer sizes equal to the uniform ones change nothing; pruned ones cost less
    uniform = dict(encoder_attention_heads_per_layer=[4] * 3, encoder_ffn_embed_dim_per_layer=[48] * 3)
    base = ThinHubertModel.macs_breakdown(STUDENT)["layers"]
    assert ThinHubertModel.macs_breakdown({**STUDENT, **uniform})["layers"] == pytest.approx(base)
    assert summary["macs_per_10s_breakdown"]["layers"] < base


def test_per_layer_widths_through_fairseq_config_and_argparse():
    from omegaconf import OmegaConf

    from fairseq.dataclass.utils import gen_parser_from_dataclass
    from fairseq.models import build_model

    cfg = OmegaConf.structured(ThinHubertConfig(**{**STUDENT, **PER_LAYER}))
    with torch.device("meta"):
        model = build_model(OmegaConf.merge(cfg, {"_name": "thin_hubert"}), task=None)
    assert [l.self_attn.num_heads for l in model.encoder.layers] == [1, 4, 2]
    assert OmegaConf.structured(ThinHubertConfig()).encoder_attention_heads_per_layer is None
    import argparse

    parser = argparse.ArgumentParser()
    gen_parser_from_dataclass(parser, ThinHubertConfig())
    args = parser.parse_args(["--encoder-ffn-embed-dim-per-layer", "[3, 4]"])
    assert args.encoder_ffn_embed_dim_per_layer == [3, 4]
    assert parser.parse_args([]).encoder_attention_heads_per_layer is None


@pytest.mark.parametrize("overrides, message", [
    (dict(encoder_attention_heads_per_layer=[4, 4]),
     r"model.encoder_attention_heads_per_layer has 2 entries but model.encoder_layers is 3"),
    (dict(encoder_ffn_embed_dim_per_layer=[48, -1, 48]),
     r"model.encoder_ffn_embed_dim_per_layer must hold non-negative integers, got \{1: -1\}"),
    (dict(encoder_attention_heads_per_layer=[4, 0, 4]),
     r"model.encoder_attention_heads_per_layer is 0 for layer\(s\) \[1\]: removing a whole"),
    (dict(encoder_ffn_embed_dim_per_layer=[0, 48, 0]),
     r"model.encoder_ffn_embed_dim_per_layer is 0 for layer\(s\) \[0, 2\]"),
    (dict(encoder_attention_heads_per_layer=[4, 2, 2], reuse_pattern=["true", "false", "true"]),
     r"cannot be combined with attention reuse"),
])
def test_per_layer_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        ThinHubertModel(ThinHubertConfig(**{**STUDENT, **overrides}))


def test_per_layer_ffn_works_with_attention_reuse():
    model = student(encoder_ffn_embed_dim_per_layer=[5, 6, 7], reuse_pattern=["true", "false", "true"])
    assert [l.fc1.out_features for l in model.encoder.layers] == [5, 6, 7]
    source, _ = wav_batch()
    assert model.encode(source)["x"].shape == (2, 149, 32)


# -- materialise a whole student ---------------------------------------------------------------
def stage1_masks():
    """Soft eval masks as DPHuBERT's are, some as HardConcrete modules: (conv, heads, units)."""
    torch.manual_seed(3)

    def soft(n, pruned):
        return P.mask_from_pruned(n, pruned) * torch.rand(n).add(0.5)

    def concrete(log_alpha):
        hc = P.HardConcrete(len(log_alpha)).eval()
        with torch.no_grad():
            hc.log_alpha.copy_(torch.tensor(log_alpha))
        return hc

    conv = [soft(16, [1, 4, 9]), soft(12, [0, 11]), None]  # the last CNN layer: never
    heads = [soft(4, [0, 2]), None, concrete([-6.0, 3.0, 4.0, 5.0])]
    units = [soft(48, list(range(0, 48, 3))), concrete([-6.0] * 40 + [6.0] * 8), None]
    return conv, heads, units


def all_outputs(model, source, padding_mask):
    with torch.no_grad():
        res = model(source, padding_mask=padding_mask)
    return res["hidden_states"] + [res["hints"][k] for k in sorted(res["hints"])]


@pytest.mark.parametrize("pre_ln", [False, True])
def test_materialised_student_equals_masked_student(pre_ln):
    masked = student(layer_norm_first=pre_ln)
    conv, heads, units = stage1_masks()
    fields, state = P.materialise_student(masked, conv, heads, units)
    assert fields["conv_channels"] == [13, 10, 8]
    assert fields["encoder_attention_heads_per_layer"] == [2, 4, 3]
    assert fields["encoder_ffn_embed_dim_per_layer"] == [32, 8, 48]
    assert fields["pruning_materialised"] and not fields["init_teacher_cnn"]
    small = ThinHubertModel(ThinHubertConfig(**fields)).eval()  # from the config alone
    small.load_state_dict(state, strict=True)

    P.attach_student_masks(masked, conv, heads, units)
    source, padding_mask = wav_batch(1)
    got, want = all_outputs(small, source, padding_mask), all_outputs(masked, source, padding_mask)
    assert len(got) == len(want) == 4 + 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    unmasked = all_outputs(student(layer_norm_first=pre_ln), source, padding_mask)
    assert (unmasked[-1] - want[-1]).abs().max() > 1e-2  # the masks did something
    n = sum(p.numel() for p in small.parameters())
    assert n < sum(p.numel() for p in masked.parameters())
    assert n == ThinHubertModel.model_summary(fields)["params_with_heads"]


def test_materialised_student_is_an_ordinary_checkpoint(tmp_path):
    """Written as a fairseq checkpoint, read back and rebuilt by fairseq from its config alone."""
    from omegaconf import OmegaConf

    from fairseq import checkpoint_utils
    from fairseq.models import build_model

    conv, heads, units = stage1_masks()
    fields, state = P.materialise_student(student(), conv, heads, units)
    cfg = OmegaConf.create({"model": {**fields, "_name": "thin_hubert"}})
    path = tmp_path / "materialised.pt"
    checkpoint_utils.torch_persistent_save({"cfg": cfg, "model": state}, str(path))
    loaded = torch.load(str(path), map_location="cpu", weights_only=False)  # our own file
    P.check_stage2_checkpoint(loaded, str(path))  # a valid stage-2 start
    model = build_model(loaded["cfg"]["model"], task=None)
    model.load_state_dict(loaded["model"], strict=True)
    assert [l.self_attn.num_heads for l in model.encoder.layers] == [2, 4, 3]
    # the stripped student (fine-tuning, export) still loads strictly
    model.remove_pretraining_modules()
    model.load_state_dict(loaded["model"], strict=True)


def test_materialise_keeps_removed_heads_removed_and_drops_mask_parameters():
    model = student()
    conv, heads, units = stage1_masks()
    model.masks = nn.ModuleList([heads[2], units[1]])  # registered inside the model, as training may
    model.remove_pretraining_modules()
    fields, state = P.materialise_student(model, conv, heads, units)
    assert not any("log_alpha" in k or k.startswith("hint_heads") for k in state)
    assert P.is_materialised(fields) and not P.is_materialised(model.cfg)


def test_stage2_from_a_checkpoint_that_was_not_materialised_is_refused():
    model = student()
    full = {"_name": "thin_hubert", **STUDENT}
    with pytest.raises(ValueError, match=r"stage1\.pt was not materialised \(model\.pruning_materialised "
                                         r"is false\).*materialise it first"):
        P.check_stage2_checkpoint({"cfg": {"model": full}, "model": model.state_dict()}, "stage1.pt")
    masked_state = {**model.state_dict(), "masks.0.log_alpha": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"stage1\.pt still holds 1 HardConcrete masks \(e\.g\. "
                                         r"masks\.0\.log_alpha\): a stage-1"):
        P.check_stage2_checkpoint({"cfg": {"model": {**full, "pruning_materialised": True}},
                                   "model": masked_state}, "stage1.pt")
    with pytest.raises(ValueError, match=r"teacher\.pt does not hold a thin_hubert student \(model 'hubert'"):
        P.check_stage2_checkpoint({"cfg": {"model": {"_name": "hubert"}}, "model": {}}, "teacher.pt")


def test_materialise_student_bad_input():
    model = student()
    conv, heads, units = stage1_masks()
    with pytest.raises(ValueError, match=r"conv_masks\[2\] must be None: the last CNN layer"):
        P.materialise_student(model, conv[:2] + [torch.ones(8)], heads, units)
    with pytest.raises(ValueError, match=r"conv_masks\[2\] must be None"):
        P.attach_student_masks(model, conv[:2] + [torch.ones(8)])
    with pytest.raises(ValueError, match=r"need one head mask \(or None\) per layer \(3\), got 2"):
        P.materialise_student(model, head_masks=heads[:2])
    with pytest.raises(ValueError, match="all 4 heads are pruned"):
        P.materialise_student(model, head_masks=[torch.zeros(4), None, None])
    with pytest.raises(ValueError, match="FFN unit mask must have 48 entries"):
        P.materialise_student(model, unit_masks=[torch.ones(49), None, None])
    reuse = student(reuse_pattern=["true", "false", "true"])
    with pytest.raises(ValueError, match="head masks on an attention-reuse student"):
        P.materialise_student(reuse, head_masks=heads)


def test_attention_reuse_student_prunes_ffn_and_conv_exactly():
    masked = student(reuse_pattern=["true", "false", "true"])
    conv, _, units = stage1_masks()
    fields, state = P.materialise_student(masked, conv, [None] * 3, units)
    assert fields["encoder_attention_heads_per_layer"] is None
    assert fields["encoder_ffn_embed_dim_per_layer"] == [32, 8, 48]
    small = ThinHubertModel(ThinHubertConfig(**fields)).eval()
    small.load_state_dict(state, strict=True)
    P.attach_student_masks(masked, conv, None, units)
    source, padding_mask = wav_batch(2)
    for g, w in zip(all_outputs(small, source, padding_mask), all_outputs(masked, source, padding_mask)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


# -- a materialised student through export, ONNX and the s3prl upstream -------------------------
def test_materialised_student_exports_to_standalone_onnx_and_s3prl(tmp_path, capsys):
    """A distillation checkpoint (as fairseq writes it, tests/test_export.py's tiny student) is
    masked, materialised into per-layer widths, written back as a checkpoint and exported by
    ``fairseq-kd-export``; the .pt2 (through the s3prl upstream) and the ONNX file give the masked
    model's hidden states; fairseq's hubert_ctc fine-tuning model builds on it."""
    pytest.importorskip("onnxscript")
    from test_export import (TOLERANCE, fairseq_encoder, make_ctc_checkpoint, make_student_checkpoint,
                             result_json)
    from fairseq_checkpoints import _save

    from fairseq_kd.cli.export import main
    from fairseq_kd.export.onnx_export import onnx_session, run_onnx
    from fairseq_kd.s3prl_upstream.expert import UpstreamExpert

    full = make_student_checkpoint(tmp_path / "full.pt", False, 0, time_reduction_factor=1)
    state = torch.load(str(full), map_location="cpu", weights_only=False)  # our own file
    fields = {k: v for k, v in state["cfg"]["model"].items() if k != "_name"}  # a plain dict here
    masked = ThinHubertModel(ThinHubertConfig(**fields)).eval()
    masked.load_state_dict(state["model"], strict=True)
    torch.manual_seed(4)

    def soft(n, pruned):
        return P.mask_from_pruned(n, pruned) * torch.rand(n).add(0.5)

    conv = [soft(c, [0, 5]) for c in fields["conv_channels"][:-1]] + [None]
    heads, units = [soft(4, [1]), soft(4, [0, 2, 3])], [soft(64, range(0, 64, 2)), soft(64, range(10))]
    pruned_fields, weights = P.materialise_student(masked, conv, heads, units)
    P.attach_student_masks(masked, conv, heads, units)
    state["cfg"]["model"] = {**pruned_fields, "_name": "thin_hubert"}
    state["model"] = weights
    pruned = _save(state, tmp_path / "pruned.pt")

    # --outputs layers: the student's layers (this tiny one's default would be its heads' outputs)
    args = [str(pruned), str(tmp_path / "s.pt2"), "--outputs", "layers", "--onnx", str(tmp_path / "s.onnx")]
    assert main(args) == 0
    result = result_json(capsys.readouterr().out)
    assert result["export_max_abs_diff"] <= TOLERANCE and result["onnx_max_abs_diff"] <= TOLERANCE

    gen = torch.Generator().manual_seed(5)
    wavs = [torch.randn(n, generator=gen) * 0.1 for n in (16000, 7000)]
    upstream = UpstreamExpert(ckpt=str(tmp_path / "s.pt2"))
    meta = upstream.student.meta
    assert meta["student_config"]["encoder_attention_heads_per_layer"] == [3, 1]
    stripped = ThinHubertModel(ThinHubertConfig(**pruned_fields))
    stripped.remove_pretraining_modules()
    assert meta["parameters"] == sum(p.numel() for p in stripped.parameters())
    session = onnx_session(str(tmp_path / "s.onnx"), threads=1)
    for wav in wavs:  # one utterance at a time: group-norm CNNs normalise over padding too
        with torch.no_grad():
            want = masked.encode(wav[None])["hidden_states"]
        got = upstream([wav])["hidden_states"]
        onnx_hidden, _ = run_onnx(session, wav[None], torch.tensor([wav.numel()]))
        assert len(got) == len(want) == 3
        for g, o, w in zip(got, onnx_hidden, want):
            torch.testing.assert_close(g[0, : w.size(1)], w[0], atol=TOLERANCE, rtol=0)
            torch.testing.assert_close(torch.from_numpy(o[0, : w.size(1)]), w[0], atol=TOLERANCE, rtol=0)

    # fine-tuning: fairseq's hubert_ctc (kd_audio_finetuning, model.w2v_path) rebuilds it from the checkpoint
    ctc = fairseq_encoder(make_ctc_checkpoint(tmp_path / "ctc.pt", pruned))
    assert [l.self_attn.num_heads for l in ctc.encoder.layers] == [3, 1]
    assert [l.fc1.out_features for l in ctc.encoder.layers] == [32, 54]


# -- the dphubert size ---------------------------------------------------------------------------
DPHUBERT_RELEASED = 23_585_946  # pyf98/DPHuBERT's released DPHuBERT (docs/papers.md, DPHuBERT)


def test_dphubert_target_size_from_hubert_base():
    """Sparsity 0.75 of HuBERT Base (as DPHuBERT counts it: no mask_emb, no heads) is 23.59 M.

    The released model has 23,585,946, 6,790 (0.03 %) below the target: the Lagrangian holds the
    *expected* size at the target and the deterministic eval masks round each layer's expected
    kept count, so the materialised size lands near, not on, it."""
    with torch.device("meta"):
        teacher_copy = ThinHubertModel(ThinHubertConfig())  # HuBERT Base's shape (the defaults)
    original = P.model_size(teacher_copy)
    fixed = sum(p.numel() for n, p in teacher_copy.named_parameters()
                if n.startswith(("encoder.pos_conv", "encoder.layer_norm")))
    assert original == 94_370_944 == P.expected_num_params(
        [512] * 7, [10, 3, 3, 3, 3, 2, 2], [12] * 12, [3072] * 12, 768, fixed=fixed)
    target = P.target_num_params(original, 0.75)
    assert target == 23_592_736 and round(target / 1e6, 2) == 23.59
    assert abs(target - DPHUBERT_RELEASED) / DPHUBERT_RELEASED < 3e-4
    # the expected sparsity of a model of exactly that size is the target
    assert P.expected_sparsity(torch.tensor(target), original).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match=r"target sparsity must be in \(0, 1\)"):
        P.target_num_params(original, 1.0)


@pytest.mark.parametrize("overrides", [{}, dict(reuse_pattern=["true", "false", "true"]),
                                       dict(time_reduction_factor=2, conv_channels=[16, 12, 32])])
def test_expected_student_params_equal_the_materialised_size(overrides):
    model = student(**overrides)
    conv, heads, units = stage1_masks()
    if overrides.get("reuse_pattern"):
        heads = None
    assert P.expected_student_params(model) == P.model_size(model)  # no masks: the model itself
    fixed = [[None if m is None else P._mask_value(m) for m in ms] if ms else ms
             for ms in (conv, heads, units)]
    fields, state = P.materialise_student(model, *fixed)
    with torch.device("meta"):
        small = ThinHubertModel(ThinHubertConfig(**fields))
    assert P.expected_student_params(model, *fixed) == P.model_size(small)
    # with HardConcrete masks: differentiable in every log_alpha
    concrete = [P.HardConcrete(16), P.HardConcrete(12), None]
    total = P.expected_student_params(model, concrete, None, [P.HardConcrete(48)] * 3)
    total.backward()
    assert concrete[0].log_alpha.grad.abs().sum() > 0 and concrete[1].log_alpha.grad.abs().sum() > 0
