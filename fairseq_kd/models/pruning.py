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
  folded into the weights, equal to the masked module to float tolerance.
"""

import copy
import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

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

    def l0_prob(self) -> torch.Tensor:
        """P(mask != 0) per unit, differentiable in ``log_alpha``."""
        return torch.sigmoid(self.log_alpha + self.bias)

    def l0_norm(self) -> torch.Tensor:
        """Expected number of kept units (a 0-d tensor)."""
        return self.l0_prob().sum()

    def sample(self) -> torch.Tensor:
        u = torch.rand_like(self.log_alpha).clamp(self.eps, 1.0 - self.eps)
        s = torch.sigmoid((torch.log(u / (1.0 - u)) + self.log_alpha) / self.beta)
        return (s * (self.limit_r - self.limit_l) + self.limit_l).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """DPHuBERT's eval mask (see the class docstring); no gradient."""
        with torch.no_grad():
            num_zeros = int(round(self.n - self.l0_norm().item()))
            soft = torch.sigmoid(self.log_alpha / self.beta * 0.8)
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
    extractor: ConvFeatureExtractionModel, masks: Sequence[MaskFn]
) -> List[RemovableHandle]:
    """Scale each conv block's output channels (after GELU) by its mask, as DPHuBERT."""
    if len(masks) != len(extractor.conv_layers):
        raise ValueError(
            f"need one mask per conv layer ({len(extractor.conv_layers)}), got {len(masks)}"
        )
    handles = []
    for block, mask in zip(extractor.conv_layers, masks):

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


def prune_attention_heads(attn: MultiheadAttention, head_mask: torch.Tensor) -> None:
    """In place: keep heads with ``head_mask != 0``; fold their mask values into the
    matching ``out_proj`` input columns (out_proj(sum_h m_h o_h) = sum_h (W_h m_h) o_h).

    Like fairseq's own ``_adaptive_prune_heads``, the inner width becomes
    ``kept * head_dim`` and the embed-dim check is skipped (query width != inner width).
    """
    _check_mask(head_mask, attn.num_heads, "head")
    heads = _kept(head_mask)
    hd = attn.head_dim
    index = (heads[:, None] * hd + torch.arange(hd, device=heads.device)).flatten()
    scale = head_mask.detach()[heads].repeat_interleave(hd)
    attn.q_proj = _select_linear(attn.q_proj, out_index=index)
    attn.k_proj = _select_linear(attn.k_proj, out_index=index)
    attn.v_proj = _select_linear(attn.v_proj, out_index=index)
    attn.out_proj = _select_linear(attn.out_proj, in_index=index, in_scale=scale)
    attn.num_heads = int(heads.numel())
    attn.embed_dim = attn.num_heads * hd
    attn.skip_embed_dim_check = True


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
