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
