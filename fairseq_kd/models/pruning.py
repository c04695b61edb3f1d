# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Structured pruning with HardConcrete (L0) masks, as DPHuBERT does.

DPHuBERT (Peng, Sudo, Muhammad, Watanabe, Interspeech 2023, arXiv 2305.17651, repository
``pyf98/DPHuBERT``) starts the student as a full copy of the teacher and learns
HardConcrete masks (Louizos et al. 2018) over CNN channels, attention heads and FFN units,
jointly with layer-to-layer distillation. A Lagrangian term pushes the expected sparsity to a
target that warms up linearly; the multipliers are trained by gradient ascent. The recipe and
the mask parametrisation come from CoFi (Xia, Zhong, Chen, ACL 2022).

This module holds the pieces, on real fairseq modules:

- ``HardConcrete``: the mask distribution (training samples, deterministic eval mask, L0 probs);
- ``expected_num_params`` and its parts: the differentiable parameter count of a
  fairseq-HuBERT-shaped encoder from expected kept counts;
- ``target_sparsity`` / ``lagrangian_term`` / ``ascent_parameter``: the sparsity constraint;
- ``attach_layer_masks`` / ``attach_conv_masks``: run a fairseq layer or CNN *masked*;
- ``materialise_layer`` / ``materialise_conv_stack``: the smaller dense copy, mask values
  folded into the weights, equal to the masked module to float tolerance;
- ``set_attention_projections`` / ``resize_attention_heads``: the one rule for a fairseq
  attention with ``h`` heads of the usual size (inner width ``h * head_dim`` != D), shared
  by materialisation and ``thin_hubert``'s ``encoder_attention_heads_per_layer``;
- ``attach_student_masks`` / ``materialise_student``: a whole masked ``thin_hubert`` student
  and the ordinary per-layer-width ``thin_hubert`` (config fields + weights) it becomes,
  marked ``pruning_materialised``; ``check_stage2_checkpoint`` refuses any other stage-2 start;
  ``expected_student_params``: the (differentiable) expected size of such a masked student;
- ``model_size`` / ``target_num_params``: DPHuBERT's size convention and the target size.
"""

import copy
import math
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from fairseq.models.wav2vec.wav2vec2 import (
    ConvFeatureExtractionModel,
    TransformerSentenceEncoderLayer,
)
from fairseq.modules import Fp32GroupNorm, MultiheadAttention

# HardConcrete constants of CoFi / DPHuBERT (``hardconcrete.py``)
BETA = 2.0 / 3.0
LIMIT_L = -0.1
LIMIT_R = 1.1
HEAD_DIM = 64  # HuBERT / wav2vec 2.0 attention head size

Count = Union[torch.Tensor, float, int]
MaskFn = Callable[[], torch.Tensor]


class PruningError(ValueError):
    """A pruning setting or checkpoint that cannot be used; the message says how to fix it."""


# ---------------------------------------------------------------------------
# HardConcrete


class HardConcrete(nn.Module):
    """HardConcrete (stretched, clamped binary-concrete) masks over ``n`` units.

    Training (``self.training``): ``u ~ U(0, 1)``,
    ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``, stretched to ``[l, r]`` and
    clamped to ``[0, 1]``; one sample per forward, so gradients reach ``log_alpha``.

    Eval: DPHuBERT's deterministic mask (``pyf98/DPHuBERT`` ``hardconcrete.py``, from CoFi):
    the expected number of zeros ``round(n - sum(l0_prob()))`` smallest entries of
    ``sigmoid(log_alpha / beta * 0.8)`` are set to 0, the rest keep that soft value. The soft
    values are folded into the weights when the model is materialised, which is why
    ``materialise_*`` scales rather than merely selects.

    ``log_alpha`` starts at ``logit(init_mean)`` plus N(0, ``init_std``) noise. DPHuBERT
    writes ``log(1 - m) - log(m)`` with ``m = 0.01``; that is our ``init_mean = 0.99``, the
    default: every unit starts kept, the student being the teacher.
    """

    def __init__(
        self,
        n: int,
        init_mean: float = 0.99,
        init_std: float = 0.01,
        beta: float = BETA,
        limit_l: float = LIMIT_L,
        limit_r: float = LIMIT_R,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"HardConcrete needs n >= 1 units, got {n}")
        if not 0.0 < init_mean < 1.0:
            raise ValueError(f"init_mean must be in (0, 1), got {init_mean}")
        if not limit_l < 0.0 < 1.0 < limit_r:
            raise ValueError(f"need limit_l < 0 < 1 < limit_r, got {limit_l}, {limit_r}")
        self.n = n
        self.beta = beta
        self.limit_l = limit_l
        self.limit_r = limit_r
        self.eps = eps
        self.log_alpha = nn.Parameter(torch.empty(n))
        mean = math.log(init_mean) - math.log(1.0 - init_mean)
        nn.init.normal_(self.log_alpha, mean=mean, std=init_std)
        # P(s > 0) = sigmoid(log_alpha - beta * log(-l / r))
        self.bias = -beta * math.log(-limit_l / limit_r)

    def _log_alpha(self) -> torch.Tensor:
        # float32 whatever the parameter's dtype: fairseq's fp16 training halves the
        # criterion that holds the masks, and fp16 overflows the expected parameter count
        # (products of kept counts) and rounds the sampling clamp 1 - eps to 1
        return self.log_alpha.float()

    def l0_prob(self) -> torch.Tensor:
        """P(mask != 0) per unit, differentiable in ``log_alpha`` (float32)."""
        return torch.sigmoid(self._log_alpha() + self.bias)

    def l0_norm(self) -> torch.Tensor:
        """Expected number of kept units (a 0-d tensor)."""
        return self.l0_prob().sum()

    def sample(self) -> torch.Tensor:
        log_alpha = self._log_alpha()
        u = torch.rand_like(log_alpha).clamp(self.eps, 1.0 - self.eps)
        s = torch.sigmoid((torch.log(u / (1.0 - u)) + log_alpha) / self.beta)
        return (s * (self.limit_r - self.limit_l) + self.limit_l).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """DPHuBERT's eval mask (see the class docstring); no gradient."""
        with torch.no_grad():
            num_zeros = int(round(self.n - self.l0_norm().item()))
            soft = torch.sigmoid(self._log_alpha() / self.beta * 0.8)
            if num_zeros > 0:
                soft[torch.topk(soft, k=num_zeros, largest=False).indices] = 0.0
        return soft

    def forward(self) -> torch.Tensor:
        return self.sample() if self.training else self.deterministic()


def mask_from_pruned(num_units: int, pruned: Sequence[int]) -> torch.Tensor:
    """A 0/1 mask of ``num_units`` with ``pruned`` indices set to 0 (integer pruning)."""
    pruned = list(pruned)
    if len(set(pruned)) > num_units:
        raise ValueError(
            f"cannot prune {len(set(pruned))} of {num_units} units: more than exist"
        )
    bad = [i for i in pruned if not 0 <= i < num_units]
    if bad:
        raise ValueError(f"pruned indices {bad} out of range [0, {num_units})")
    mask = torch.ones(num_units)
    mask[pruned] = 0.0
    return mask


# ---------------------------------------------------------------------------
# expected parameter count


def conv_stack_params(
    kept_channels: Sequence[Count], kernels: Sequence[int], conv_bias: bool = False
) -> Count:
    """Parameters of fairseq's ``ConvFeatureExtractionModel`` (``extractor_mode=default``).

    With ``c_i`` the kept output channels of layer i (``c_-1 = 1``, the waveform) and ``k_i``
    its kernel: ``sum_i c_i * c_{i-1} * k_i (+ c_i with conv_bias) + 2 * c_0`` (the first
    block's GroupNorm(c_0, c_0) scale and shift). Expected counts (``l0_norm``) give the
    expected size; products of expectations are used, as in DPHuBERT.
    """
    if len(kept_channels) != len(kernels) or not kernels:
        raise ValueError(
            f"need one kept count per conv layer, got {len(kept_channels)} for "
            f"{len(kernels)} kernels"
        )
    total: Count = 2 * kept_channels[0]
    c_in: Count = 1
    for c_out, k in zip(kept_channels, kernels):
        total = total + c_out * c_in * k + (c_out if conv_bias else 0)
        c_in = c_out
    return total


def feature_projection_params(last_channels: Count, embed_dim: int) -> Count:
    """``layer_norm`` over the CNN channels (2C) + ``post_extract_proj`` (C * D + D)."""
    return 2 * last_channels + last_channels * embed_dim + embed_dim


def attention_params(heads: Count, embed_dim: int, head_dim: int = HEAD_DIM) -> Count:
    """One self-attention block: ``heads * (4 * D * head_dim + 3 * head_dim) + D + 2D``.

    Per head: Q, K, V rows and out_proj columns (4 D head_dim) and the Q/K/V biases
    (3 head_dim); fixed: out_proj bias (D) and ``self_attn_layer_norm`` (2D).
    """
    return heads * (4 * embed_dim * head_dim + 3 * head_dim) + 3 * embed_dim


def ffn_params(units: Count, embed_dim: int) -> Count:
    """One FFN: ``units * (2D + 1) + D + 2D`` (fc1 row + bias, fc2 column; fc2 bias and
    ``final_layer_norm``)."""
    return units * (2 * embed_dim + 1) + 3 * embed_dim


def expected_num_params(
    conv_channels: Sequence[Count],
    conv_kernels: Sequence[int],
    heads: Sequence[Count],
    ffn_units: Sequence[Count],
    embed_dim: int,
    conv_bias: bool = False,
    head_dim: int = HEAD_DIM,
    fixed: int = 0,
) -> Count:
    """(Expected) parameters of a pruned fairseq HuBERT encoder.

    ``conv_stack_params + feature_projection_params + sum_l (attention_params(h_l) +
    ffn_params(f_l)) + fixed``, where ``fixed`` is whatever pruning leaves alone (``mask_emb``,
    ``encoder.pos_conv``, ``encoder.layer_norm``). Pass ``HardConcrete.l0_norm()`` values for a
    differentiable expectation (DPHuBERT's ``get_num_params``), ints for a real count.
    """
    if len(heads) != len(ffn_units):
        raise ValueError(
            f"need one head count and one FFN size per layer, got {len(heads)} and "
            f"{len(ffn_units)}"
        )
    total = conv_stack_params(conv_channels, conv_kernels, conv_bias)
    total = total + feature_projection_params(conv_channels[-1], embed_dim)
    for h, f in zip(heads, ffn_units):
        total = total + attention_params(h, embed_dim, head_dim) + ffn_params(f, embed_dim)
    return total + fixed


# ---------------------------------------------------------------------------
# Lagrangian sparsity constraint


def target_sparsity(num_updates: int, final_sparsity: float, warmup_updates: int) -> float:
    """DPHuBERT's target: a linear ramp from 0 to ``final_sparsity`` over ``warmup_updates``
    (0.75 over 5k updates in ``pyf98/DPHuBERT``), constant afterwards."""
    if not 0.0 < final_sparsity < 1.0:
        raise ValueError(f"target sparsity must be in (0, 1), got {final_sparsity}")
    if warmup_updates < 0 or num_updates < 0:
        raise ValueError(
            f"num_updates and warmup_updates must be >= 0, got {num_updates}, {warmup_updates}"
        )
    if warmup_updates == 0:
        return final_sparsity
    return final_sparsity * min(1.0, num_updates / warmup_updates)


def model_size(model: nn.Module) -> int:
    """DPHuBERT's model size (``get_num_params`` of ``pyf98/DPHuBERT``) of a thin_hubert
    student: every parameter but ``mask_emb`` (used only by masked fine-tuning; DPHuBERT's
    model has none) and the distillation heads. Sparsity is measured against this count of
    the full-copy student: HuBERT Base's is 94,370,944 (0.25 of it = 23.59 M)."""
    from fairseq_kd.models.thin_hubert import ThinHubertModel

    return ThinHubertModel.count_parameters(model, include_heads=False) - model.mask_emb.numel()


def target_num_params(original_params: int, final_sparsity: float) -> float:
    """The size the constraint drives the student to: ``(1 - s) * original_params``."""
    if not 0.0 < final_sparsity < 1.0:
        raise ValueError(f"target sparsity must be in (0, 1), got {final_sparsity}")
    return (1.0 - final_sparsity) * original_params


def expected_sparsity(expected_params: torch.Tensor, original_params: int) -> torch.Tensor:
    """``s_hat = 1 - E[params] / original params`` (of the prunable model)."""
    return 1.0 - expected_params / original_params


def lagrangian_term(
    s_hat: torch.Tensor,
    s_target: float,
    lambda1: torch.Tensor,
    lambda2: torch.Tensor,
) -> torch.Tensor:
    """``lambda1 * (s_hat - s) + lambda2 * (s_hat - s)^2`` (CoFi eq. 6, DPHuBERT eq. 4).

    Added to the loss and minimised over the masks, maximised over the lambdas (use
    ``ascent_parameter`` for them), so the constraint ``s_hat = s`` is enforced.
    """
    if not 0.0 <= s_target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {s_target}")
    gap = s_hat - s_target
    return lambda1 * gap + lambda2 * gap * gap


def ascent_parameter(init: float = 0.0) -> nn.Parameter:
    """A scalar parameter trained by gradient *ascent* under any descent optimiser.

    Its gradient is negated by a hook. DPHuBERT instead gives the lambdas their own optimiser
    param group with ``lr = -reg_lr`` (0.02); that does not fit fairseq, whose
    ``FairseqOptimizer.set_lr`` writes one lr into every param group each update (and whose
    lr schedulers know one lr), which would silently turn the ascent back into descent. The
    hook keeps the sign whatever the schedule does. Give the lambdas weight decay 0 (a
    decayed multiplier is pulled to 0 and the constraint weakens); note they then share the
    model's lr schedule, not DPHuBERT's separate ``reg_lr``.
    """
    p = nn.Parameter(torch.tensor(float(init)))
    p.register_hook(lambda grad: -grad)
    return p


# ---------------------------------------------------------------------------
# masked forward (what is trained)


def _check_mask(mask: torch.Tensor, n: int, what: str) -> None:
    if mask.dim() != 1 or mask.numel() != n:
        raise ValueError(f"{what} mask must have {n} entries (one per {what}), got "
                         f"shape {tuple(mask.shape)}")
    if not bool((mask != 0).any()):
        raise ValueError(
            f"all {n} {what}s are pruned; removing the whole block is not supported here"
        )


def attach_layer_masks(
    layer: TransformerSentenceEncoderLayer,
    head_mask: Optional[MaskFn] = None,
    unit_mask: Optional[MaskFn] = None,
) -> List[RemovableHandle]:
    """Make ``layer`` run masked: head ``h``'s output is scaled by ``head_mask()[h]`` before
    ``out_proj`` and FFN unit ``j`` (after the activation) by ``unit_mask()[j]`` before
    ``fc2``, where DPHuBERT applies them. ``head_mask`` / ``unit_mask`` are callables (a
    ``HardConcrete`` instance, or ``lambda: tensor``), called once per forward.

    fairseq's fused attention path (``F.multi_head_attention_forward``) never calls
    ``out_proj`` as a module, so it is switched off (``skip_embed_dim_check``) for the hook
    to see the per-head outputs. Returns the hook handles (``.remove()`` to undo).
    """
    handles: List[RemovableHandle] = []
    attn = layer.self_attn
    if head_mask is not None:
        attn.skip_embed_dim_check = True  # forces the module path through out_proj

        def scale_heads(_module: nn.Module, inputs: Tuple[torch.Tensor, ...]):
            m = head_mask().to(inputs[0].dtype)
            return (inputs[0] * m.repeat_interleave(attn.head_dim),)

        handles.append(attn.out_proj.register_forward_pre_hook(scale_heads))
    if unit_mask is not None:

        def scale_units(_module: nn.Module, inputs: Tuple[torch.Tensor, ...]):
            return (inputs[0] * unit_mask().to(inputs[0].dtype),)

        handles.append(layer.fc2.register_forward_pre_hook(scale_units))
    return handles


def attach_conv_masks(
    extractor: ConvFeatureExtractionModel, masks: Sequence[Optional[MaskFn]]
) -> List[RemovableHandle]:
    """Scale each conv block's output channels (after GELU) by its mask, as DPHuBERT
    (``None``: that layer is not masked)."""
    if len(masks) != len(extractor.conv_layers):
        raise ValueError(
            f"need one mask per conv layer ({len(extractor.conv_layers)}), got {len(masks)}"
        )
    handles = []
    for block, mask in zip(extractor.conv_layers, masks):
        if mask is None:
            continue

        def scale(_m: nn.Module, _i, out: torch.Tensor, mask: MaskFn = mask) -> torch.Tensor:
            return out * mask().to(out.dtype)[None, :, None]

        handles.append(block.register_forward_hook(scale))
    return handles


# ---------------------------------------------------------------------------
# materialise: a smaller dense copy


def _kept(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask != 0, as_tuple=False).flatten()


def _select_linear(
    linear: nn.Linear, out_index: Optional[torch.Tensor] = None,
    in_index: Optional[torch.Tensor] = None, in_scale: Optional[torch.Tensor] = None,
) -> nn.Linear:
    """A new Linear with the chosen output rows / input columns; ``in_scale`` multiplies
    the kept input columns (a mask folded into the weight)."""
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if out_index is not None:
        w = w.index_select(0, out_index)
        b = b.index_select(0, out_index) if b is not None else None
    if in_index is not None:
        w = w.index_select(1, in_index)
    if in_scale is not None:
        w = w * in_scale.to(w.dtype)[None, :]
    new = nn.Linear(w.size(1), w.size(0), bias=b is not None).to(w.device, w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def set_attention_projections(
    attn: MultiheadAttention, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear,
    out_proj: nn.Linear,
) -> None:
    """In place: give ``attn`` projections of inner width ``h * head_dim`` (Q/K/V:
    ``D -> h * head_dim``, out_proj: ``h * head_dim -> D``), i.e. ``h`` heads of the size it
    had. The one rule for a fairseq ``MultiheadAttention`` with fewer (or more) heads than
    ``D / head_dim``: used by materialisation and by ``thin_hubert``'s per-layer head counts.

    Like fairseq's own ``_adaptive_prune_heads``: ``embed_dim`` becomes the inner width and
    the embed-dim check is skipped (query width != inner width; fairseq's module path then
    runs instead of the fused one). ``head_dim`` and ``scaling`` stay.
    """
    hd, inner = attn.head_dim, q_proj.out_features
    if inner < hd or inner % hd != 0:
        raise ValueError(f"attention inner width {inner} is not a positive multiple of the "
                         f"head size {hd}")
    shapes = [(m.in_features, m.out_features) for m in (q_proj, k_proj, v_proj, out_proj)]
    d = q_proj.in_features
    if shapes != [(d, inner)] * 3 + [(inner, d)]:
        raise ValueError(f"attention projections must be Q/K/V {d}->{inner} and out {inner}->{d}, "
                         f"got {shapes}")
    attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj = q_proj, k_proj, v_proj, out_proj
    attn.num_heads = inner // hd
    attn.embed_dim = inner
    attn.skip_embed_dim_check = True


def resize_attention_heads(attn: MultiheadAttention, num_heads: int) -> None:
    """In place: fresh (untrained) projections for ``num_heads`` heads of ``attn.head_dim``
    (``set_attention_projections``); the model's own initialisation runs afterwards."""
    if num_heads < 1:
        raise ValueError(f"an attention block needs >= 1 head, got {num_heads}")
    d, inner = attn.q_proj.in_features, num_heads * attn.head_dim
    w = attn.q_proj.weight
    bias = attn.q_proj.bias is not None

    def linear(n_in: int, n_out: int) -> nn.Linear:
        return nn.Linear(n_in, n_out, bias=bias, device=w.device, dtype=w.dtype)

    set_attention_projections(attn, linear(d, inner), linear(d, inner), linear(d, inner),
                              linear(inner, d))


def prune_attention_heads(attn: MultiheadAttention, head_mask: torch.Tensor) -> None:
    """In place: keep heads with ``head_mask != 0``; fold their mask values into the
    matching ``out_proj`` input columns (out_proj(sum_h m_h o_h) = sum_h (W_h m_h) o_h).
    The inner width becomes ``kept * head_dim`` (``set_attention_projections``).
    """
    _check_mask(head_mask, attn.num_heads, "head")
    heads = _kept(head_mask)
    hd = attn.head_dim
    index = (heads[:, None] * hd + torch.arange(hd, device=heads.device)).flatten()
    scale = head_mask.detach()[heads].repeat_interleave(hd)
    set_attention_projections(
        attn,
        _select_linear(attn.q_proj, out_index=index),
        _select_linear(attn.k_proj, out_index=index),
        _select_linear(attn.v_proj, out_index=index),
        _select_linear(attn.out_proj, in_index=index, in_scale=scale),
    )


def prune_ffn_units(layer: TransformerSentenceEncoderLayer, unit_mask: torch.Tensor) -> None:
    """In place: keep FFN units with ``unit_mask != 0``: fc1 rows and bias selected, fc2
    columns selected and scaled by the mask (the mask acts after the activation)."""
    _check_mask(unit_mask, layer.fc1.out_features, "FFN unit")
    units = _kept(unit_mask)
    layer.fc1 = _select_linear(layer.fc1, out_index=units)
    layer.fc2 = _select_linear(layer.fc2, in_index=units, in_scale=unit_mask.detach()[units])


def materialise_layer(
    layer: TransformerSentenceEncoderLayer,
    head_mask: Optional[torch.Tensor] = None,
    unit_mask: Optional[torch.Tensor] = None,
) -> TransformerSentenceEncoderLayer:
    """A dense copy of ``layer`` with only the kept heads / FFN units (mask values folded),
    equal to ``layer`` run under ``attach_layer_masks`` with the same masks. Layers of one
    model may end with different head counts and FFN sizes."""
    new = copy.deepcopy(layer)
    if head_mask is not None:
        prune_attention_heads(new.self_attn, head_mask)
    if unit_mask is not None:
        prune_ffn_units(new, unit_mask)
    return new


def _select_conv(conv: nn.Conv1d, out_index: torch.Tensor, in_index: Optional[torch.Tensor],
                 in_scale: Optional[torch.Tensor]) -> nn.Conv1d:
    w = conv.weight.detach().index_select(0, out_index)
    if in_index is not None:
        w = w.index_select(1, in_index)
    if in_scale is not None:
        w = w * in_scale.to(w.dtype)[None, :, None]
    new = nn.Conv1d(w.size(1), w.size(0), conv.kernel_size[0], stride=conv.stride[0],
                    bias=conv.bias is not None).to(w.device, w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach().index_select(0, out_index))
    return new


def _select_group_norm(norm: Fp32GroupNorm, index: torch.Tensor) -> Fp32GroupNorm:
    # GroupNorm(C, C) normalises each channel alone, so selecting channels is exact
    if norm.num_groups != norm.num_channels:
        raise ValueError("only per-channel GroupNorm(C, C) (extractor_mode=default) can be pruned")
    new = Fp32GroupNorm(len(index), len(index), eps=norm.eps, affine=True)
    with torch.no_grad():
        new.weight.copy_(norm.weight.detach()[index])
        new.bias.copy_(norm.bias.detach()[index])
    return new.to(norm.weight.device)


def materialise_conv_stack(
    extractor: ConvFeatureExtractionModel, masks: Sequence[torch.Tensor]
) -> Tuple[ConvFeatureExtractionModel, torch.Tensor, torch.Tensor]:
    """A dense copy of a (``extractor_mode=default``) CNN with the kept channels.

    Layer ``i``'s mask is folded into layer ``i+1``'s input channels. The last layer's mask
    cannot be folded inside the CNN (GELU follows it) nor into the HuBERT ``layer_norm``
    over channels that comes next (a LayerNorm is not channel-separable), so it is returned:
    ``(new, kept_last, scale_last)`` with ``new(x) * scale_last[:, None] ==
    masked(x)[:, kept_last]``. (DPHuBERT prunes that LayerNorm by selection too and lets
    its final distillation step absorb the difference.)
    """
    blocks = extractor.conv_layers
    if len(masks) != len(blocks):
        raise ValueError(f"need one mask per conv layer ({len(blocks)}), got {len(masks)}")
    new = copy.deepcopy(extractor)
    prev_index: Optional[torch.Tensor] = None
    prev_scale: Optional[torch.Tensor] = None
    for i, (block, mask) in enumerate(zip(new.conv_layers, masks)):
        conv = block[0]
        _check_mask(mask, conv.out_channels, f"conv layer {i} channel")
        index = _kept(mask)
        for j, sub in enumerate(block):
            if isinstance(sub, nn.Sequential):  # extractor_mode=layer_norm: LN over channels
                raise ValueError("conv pruning supports extractor_mode=default only")
            if isinstance(sub, Fp32GroupNorm):
                block[j] = _select_group_norm(sub, index)
        block[0] = _select_conv(conv, index, prev_index, prev_scale)
        prev_index, prev_scale = index, mask.detach()[index]
    return new, prev_index, prev_scale


# ---------------------------------------------------------------------------
# whole students: a masked full-copy thin_hubert -> an ordinary per-layer-width thin_hubert

MaskLike = Union[torch.Tensor, HardConcrete, MaskFn]
MASK_PARAM = "log_alpha"  # HardConcrete's parameter: a state dict holding it is still masked


def _mask_fn(mask: MaskLike) -> MaskFn:
    return (lambda: mask) if isinstance(mask, torch.Tensor) else mask


def _mask_value(mask: MaskLike) -> torch.Tensor:
    """The mask materialisation folds in: HardConcrete's eval mask, whatever its mode."""
    if isinstance(mask, HardConcrete):
        return mask.deterministic()
    return (mask() if callable(mask) else mask).detach()


def _per_layer(masks: Optional[Sequence[Optional[MaskLike]]], n: int, what: str) -> List:
    if masks is None:
        return [None] * n
    if len(masks) != n:
        raise ValueError(f"need one {what} mask (or None) per layer ({n}), got {len(masks)}")
    return list(masks)


def _student_conv_masks(model: nn.Module, conv_masks: Optional[Sequence]) -> List:
    n = len(model.feature_extractor.conv_layers)
    masks = _per_layer(conv_masks, n, "CNN channel")
    if masks[-1] is not None:
        # materialise_conv_stack cannot fold it: a LayerNorm over channels follows
        raise ValueError(
            f"conv_masks[{n - 1}] must be None: the last CNN layer's channels feed the feature "
            "LayerNorm over channels, whose statistics change when channels are removed, so "
            "pruning them cannot be materialised exactly; prune the other CNN layers"
        )
    return masks


def _check_student(model: nn.Module, head_masks: Optional[Sequence]) -> None:
    pruned = head_masks is not None and any(m is not None for m in head_masks)
    if pruned and getattr(model.encoder, "reuses", False):
        raise ValueError(
            "head masks on an attention-reuse student (model.reuse_pattern has False entries) "
            "are not supported: a reusing layer applies the previous layer's attention map"
        )


def attach_student_masks(
    model: nn.Module,
    conv_masks: Optional[Sequence[Optional[MaskLike]]] = None,
    head_masks: Optional[Sequence[Optional[MaskLike]]] = None,
    unit_masks: Optional[Sequence[Optional[MaskLike]]] = None,
) -> List[RemovableHandle]:
    """Run a ``thin_hubert`` student masked (the stage-1 model of DPHuBERT): one mask or
    ``None`` (not pruned) per CNN layer (the last must be None, see ``materialise_student``),
    per transformer layer's heads and FFN units. Masks are tensors, ``HardConcrete`` modules
    or callables (``attach_layer_masks`` / ``attach_conv_masks``). Returns the hook handles."""
    conv = _student_conv_masks(model, conv_masks)
    _check_student(model, head_masks)
    layers = model.encoder.layers
    heads = _per_layer(head_masks, len(layers), "head")
    units = _per_layer(unit_masks, len(layers), "FFN unit")
    handles = attach_conv_masks(
        model.feature_extractor, [None if m is None else _mask_fn(m) for m in conv]
    )
    for layer, h, u in zip(layers, heads, units):
        handles += attach_layer_masks(
            layer, None if h is None else _mask_fn(h), None if u is None else _mask_fn(u)
        )
    return handles


def _kept_count(mask: Optional[MaskLike], full: int) -> Count:
    # differentiable expectation for HardConcrete, the real count for a fixed mask
    if mask is None:
        return full
    if isinstance(mask, HardConcrete):
        return mask.l0_norm()
    return int((_mask_value(mask) != 0).sum())


def expected_student_params(
    model: nn.Module,
    conv_masks: Optional[Sequence[Optional[MaskLike]]] = None,
    head_masks: Optional[Sequence[Optional[MaskLike]]] = None,
    unit_masks: Optional[Sequence[Optional[MaskLike]]] = None,
) -> Count:
    """(Expected) ``model_size`` of a masked ``thin_hubert`` student (masks as for
    ``attach_student_masks``): ``HardConcrete`` masks count ``l0_norm()`` (differentiable,
    what the Lagrangian term needs), fixed masks their non-zero entries, ``None`` all units.

    Whatever pruning leaves alone (positional conv, encoder LayerNorm, a time-reduction
    layer, ...) is the model's own size minus the formula at full size, so the count equals
    ``model_size`` of the materialised student for fixed masks.
    """
    conv = _student_conv_masks(model, conv_masks)
    _check_student(model, head_masks)
    layers = model.encoder.layers
    heads = _per_layer(head_masks, len(layers), "head")
    units = _per_layer(unit_masks, len(layers), "FFN unit")
    blocks = model.feature_extractor.conv_layers
    kernels = [int(b[0].kernel_size[0]) for b in blocks]
    conv_bias = blocks[0][0].bias is not None
    full_conv = [int(b[0].out_channels) for b in blocks]
    full_heads = [int(l.self_attn.num_heads) for l in layers]
    full_units = [int(l.fc1.out_features) for l in layers]
    d, head_dim = int(model.cfg.encoder_embed_dim), int(layers[0].self_attn.head_dim)
    formula = expected_num_params(full_conv, kernels, full_heads, full_units, d, conv_bias, head_dim)
    fixed = model_size(model) - int(formula)
    return expected_num_params(
        [_kept_count(m, n) for m, n in zip(conv, full_conv)], kernels,
        [_kept_count(m, n) for m, n in zip(heads, full_heads)],
        [_kept_count(m, n) for m, n in zip(units, full_units)],
        d, conv_bias, head_dim, fixed=fixed,
    )


def _config_fields(cfg: Any) -> dict:
    """The thin_hubert fields of a model's cfg (dataclass or OmegaConf), as plain python."""
    from dataclasses import fields, is_dataclass

    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        plain = OmegaConf.to_container(cfg, resolve=True)
    elif is_dataclass(cfg):
        plain = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    else:
        plain = dict(cfg)
    plain.pop("_name", None)
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in plain.items()}


def _replace_prefix(state: dict, prefix: str, module: nn.Module) -> None:
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]
    state.update({prefix + k: v for k, v in module.state_dict().items()})


def materialise_student(
    model: nn.Module,
    conv_masks: Optional[Sequence[Optional[MaskLike]]] = None,
    head_masks: Optional[Sequence[Optional[MaskLike]]] = None,
    unit_masks: Optional[Sequence[Optional[MaskLike]]] = None,
) -> Tuple[dict, dict]:
    """Turn a masked ``thin_hubert`` student into an ordinary, smaller one.

    Masks as for ``attach_student_masks`` (``HardConcrete`` modules give their deterministic
    eval mask). Returns ``(fields, state_dict)``: the thin_hubert config fields (no
    ``_name``) with the kept ``conv_channels``, ``encoder_attention_heads_per_layer``,
    ``encoder_ffn_embed_dim_per_layer``, ``pruning_materialised=True`` and the
    ``init_teacher_*`` flags off (the weights are the pruned ones: nothing may overwrite
    them), and the weights of ``ThinHubertModel(ThinHubertConfig(**fields))`` (checked by a
    strict load), equal to the masked model's outputs in eval mode to float tolerance.
    HardConcrete parameters registered inside ``model`` are left out; the distillation heads
    are kept (the final distillation uses them) unless ``model`` had them removed.
    """
    from fairseq_kd.models.thin_hubert import ThinHubertConfig, ThinHubertModel

    conv = _student_conv_masks(model, conv_masks)
    _check_student(model, head_masks)
    layers = model.encoder.layers
    heads = _per_layer(head_masks, len(layers), "head")
    units = _per_layer(unit_masks, len(layers), "FFN unit")
    masked = {n + "." for n, m in model.named_modules() if isinstance(m, HardConcrete)}
    # copies: the result must not change if the masked model trains on
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if not any(k.startswith(p) for p in masked)}

    blocks = model.feature_extractor.conv_layers
    conv_values = [torch.ones(b[0].out_channels, device=b[0].weight.device) if m is None
                   else _mask_value(m) for b, m in zip(blocks, conv)]
    cnn, _, _ = materialise_conv_stack(model.feature_extractor, conv_values)
    _replace_prefix(state, "feature_extractor.", cnn)

    head_counts, ffn_dims = [], []
    for i, (layer, h, u) in enumerate(zip(layers, heads, units)):
        h = None if h is None else _mask_value(h)
        u = None if u is None else _mask_value(u)
        small = materialise_layer(layer, h, u) if h is not None or u is not None else layer
        _replace_prefix(state, f"encoder.layers.{i}.", small)
        head_counts.append(int(small.self_attn.num_heads))
        ffn_dims.append(int(small.fc1.out_features))

    fields = _config_fields(model.cfg)
    if model.encoder.reuses:  # heads stay as they are (and per-layer heads cannot be reused)
        head_counts = fields.get("encoder_attention_heads_per_layer")
    fields.update(
        conv_channels=[int(b[0].out_channels) for b in cnn.conv_layers],
        encoder_attention_heads_per_layer=head_counts,
        encoder_ffn_embed_dim_per_layer=ffn_dims,
        pruning_materialised=True,
        init_teacher_cnn=False,
        init_teacher_pos_conv=False,
        init_teacher_layers=0,
    )
    with torch.device("meta"):  # a shape check only: no memory, no initialisation
        rebuilt = ThinHubertModel(ThinHubertConfig(**fields))
    if model.hint_heads is None and model.pred_head is None:
        rebuilt.remove_pretraining_modules()
    # nn.Module's own: fairseq's override has no ``assign``, which meta parameters need
    nn.Module.load_state_dict(rebuilt, state, strict=True, assign=True)
    return fields, state


def is_materialised(model_cfg: Any) -> bool:
    """Whether a thin_hubert config (``cfg.model`` of a checkpoint) was written by
    ``materialise_student`` (``model.pruning_materialised``)."""
    if isinstance(model_cfg, Mapping):  # a dict or an OmegaConf DictConfig
        return bool(model_cfg.get("pruning_materialised", False))
    return bool(getattr(model_cfg, "pruning_materialised", False))


def check_stage2_checkpoint(checkpoint: Mapping[str, Any], path: str = "the checkpoint") -> None:
    """Structured pruning's stage 2 (the final distillation) continues only from a
    materialised student: raise ``ValueError`` naming ``path`` otherwise.

    ``checkpoint``: a loaded fairseq checkpoint (``cfg`` and ``model``). A stage-1 checkpoint
    holds the full-size student and its HardConcrete masks (``*.log_alpha``), and lacks
    ``model.pruning_materialised``.
    """
    model_cfg = (checkpoint.get("cfg") or {}).get("model") or {}
    weights = checkpoint.get("model") or {}
    criterion = checkpoint.get("criterion") or {}  # criterion=prune_distill keeps the masks there
    fix = ("materialise it first (fairseq-kd-materialise STAGE1.pt OUT.pt, or "
           "pruning.materialise_student with the stage-1 masks) and start stage 2 from the "
           "checkpoint it gives")
    name = model_cfg.get("_name")
    if name != "thin_hubert":
        raise PruningError(f"{path} does not hold a thin_hubert student (model {name!r}); stage 2 "
                         f"of structured pruning starts from a materialised one: {fix}")
    stray = sorted(k for k in weights if k.split(".")[-1] == MASK_PARAM)
    stray += sorted(f"criterion {k}" for k in criterion if k.split(".")[-1] == MASK_PARAM)
    if stray:
        raise PruningError(f"{path} still holds {len(stray)} HardConcrete masks (e.g. {stray[0]}): "
                         f"a stage-1 (masked, full-size) checkpoint; {fix}")
    if not is_materialised(model_cfg):
        raise PruningError(f"{path} was not materialised (model.pruning_materialised is false): "
                         f"stage 2 of structured pruning continues from a pruned, materialised "
                         f"student; {fix}")
