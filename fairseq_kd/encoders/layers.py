"""Every layer's hidden states of a fairseq HuBERT / wav2vec 2.0 model, padding-exact, with their
frame padding mask: the one loop the frozen teacher and the keyword / speaker encoder share.

Index convention of this project: ``hidden_states[0]`` is the CNN feature after ``layer_norm`` and
``post_extract_proj`` (before the positional convolution), ``hidden_states[l]`` the output of
transformer layer ``l``; for pre-LN (``layer_norm_first``) models the last entry also gets the
encoder's final ``layer_norm``, as fairseq's encoder output does. (transformers' and s3prl's HuBERT
``hidden_states[0]`` is instead the input of the first transformer layer, after the positional
convolution; layers 1..L agree.) ``thin_hubert`` students follow the same convention
(``ThinHubertModel.encode``).

Padding-exact: the frame padding mask comes from the conv arithmetic (``frames.py``), and the group
norm of the Base models' first conv layer (``extractor_mode="default"``) is computed over each row's
own frames. fairseq's forward lets the padded zeros into those statistics, so a row's features
would depend on its batch mates.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fairseq_kd.encoders.frames import ConvSpecs, conv_output_lengths, frames_padding_mask


def padding_exact_cnn(
    model: nn.Module,
    specs: ConvSpecs,
    source: Tensor,
    lengths: Optional[Tensor],
    padded: Optional[bool] = None,
) -> Tensor:
    """fairseq's CNN with the GroupNorm of the first layer over each row's own frames:
    (B, S) -> (B, C, T).

    ``padded``: whether any row is shorter than S (computed from ``lengths`` if not given; pass it
    from a host copy of the lengths to avoid a device sync).
    """
    x = source.unsqueeze(1)  # (B, 1, S)
    if padded is None:
        padded = lengths is not None and bool((lengths < source.size(1)).any())
    frame_lengths = lengths
    for block, spec in zip(model.feature_extractor.conv_layers, specs):
        if padded:
            frame_lengths = conv_output_lengths(frame_lengths, [spec])
        for module in block:
            if padded and isinstance(module, nn.GroupNorm):
                # per-channel statistics over time must not see the padded frames
                x = masked_group_norm(x, frame_lengths, module)
            else:
                x = module(x)
    return x


def masked_group_norm(x: Tensor, lengths: Tensor, norm: nn.GroupNorm) -> Tensor:
    """GroupNorm over each row's first ``lengths`` frames only (fp32, as ``Fp32GroupNorm``).

    Args:
        x: (B, C, T); lengths: (B,) valid frames per row
    """
    bsz, channels, frames = x.shape
    groups = norm.num_groups
    xf = x.float().view(bsz, groups, channels // groups, frames)
    valid = (torch.arange(frames, device=x.device) < lengths.unsqueeze(1)).view(bsz, 1, 1, frames)
    count = (valid.sum(-1, keepdim=True) * (channels // groups)).clamp(min=1)
    mean = (xf * valid).sum((2, 3), keepdim=True) / count
    var = (((xf - mean) * valid) ** 2).sum((2, 3), keepdim=True) / count
    y = ((xf - mean) * torch.rsqrt(var + norm.eps)).view(bsz, channels, frames)
    if norm.affine:
        y = y * norm.weight.float().view(1, -1, 1) + norm.bias.float().view(1, -1, 1)
    return y.type_as(x)


def has_padded_frames(host_lengths: Optional[Sequence[int]], specs: ConvSpecs, num_frames: int) -> bool:
    """Whether any row of these (host) sample lengths has fewer than ``num_frames`` frames."""
    if not host_lengths:
        return False
    return int(conv_output_lengths(list(host_lengths), specs).min()) < num_frames


def fairseq_hidden_states(
    model: nn.Module,
    specs: ConvSpecs,
    source: Tensor,
    padding_mask: Optional[Tensor],
    *,
    mask: bool = False,
    feature_grad_mult: float = 1.0,
    host_lengths: Optional[Sequence[int]] = None,
    mask_indices: Optional[Tensor] = None,
    mask_emb: Optional[Tensor] = None,
    layer0: str = "projection",
) -> Tuple[List[Tensor], Optional[Tensor]]:
    """``[CNN feature, layer 1, ..., layer L]`` of a fairseq HuBERT / wav2vec 2.0 model.

    Args:
        model: fairseq ``HubertModel`` / ``Wav2Vec2Model`` (its ``feature_extractor``, ``layer_norm``,
            ``post_extract_proj``, ``dropout_input``, ``apply_mask`` and ``encoder`` are used)
        specs: its CNN's ``(dim, kernel, stride)`` (``frames.conv_specs(model)``)
        source: (B, S) waveform; padding_mask: (B, S) bool, True = pad (right padding), or None
        mask: apply the model's own time / channel masking (fine-tuning)
        feature_grad_mult: 0 runs the CNN under ``no_grad``; other values scale its gradient
        host_lengths: the rows' sample lengths as Python ints, if the caller has them: all padding
            decisions are then taken on the host, with no device-to-host transfer once the CNN is
            queued (the teacher's GPU path)
        mask_indices: (B, T) bool, frames to replace by ``mask_emb`` (masking distillation: the
            positions the student was masked at), after ``post_extract_proj``, as fairseq masks;
            ``hidden_states[0]`` is then the masked feature. Not combinable with ``mask``.
        mask_emb: (D,) the embedding written there; default: the model's own ``mask_emb``
        layer0: ``"projection"`` (this project's layer 0, above) or ``"layer_input"`` (the first
            transformer layer's input: after ``pos_conv`` and, for post-LN models, the encoder
            LayerNorm; transformers' and s3prl's ``hidden_states[0]``)
    Returns:
        the hidden states, each (B, T, D), and the frame padding mask (B, T) (None without
        ``padding_mask``)
    """
    from fairseq.modules import GradMultiply

    lengths = (~padding_mask).sum(-1) if padding_mask is not None else None
    padded = None if host_lengths is None else bool(host_lengths) and min(host_lengths) < source.size(1)
    if feature_grad_mult > 0:
        features = padding_exact_cnn(model, specs, source, lengths, padded)
        if feature_grad_mult != 1.0:
            features = GradMultiply.apply(features, feature_grad_mult)
    else:
        with torch.no_grad():
            features = padding_exact_cnn(model, specs, source, lengths, padded)
    # features: (B, C, T)
    frame_mask = frames_padding_mask(padding_mask, specs, features.size(-1))
    # frame_mask: (B, T), True = pad
    x = model.layer_norm(features.transpose(1, 2))
    if model.post_extract_proj is not None:
        x = model.post_extract_proj(x)
    x = model.dropout_input(x)
    if mask:
        x, _ = model.apply_mask(x, frame_mask, None)
    if mask_indices is not None:
        if mask or tuple(mask_indices.shape) != tuple(x.shape[:2]) or mask_indices.dtype != torch.bool:
            raise ValueError(
                f"mask_indices must be a bool {tuple(x.shape[:2])} tensor (one per frame of this model) "
                f"and not combined with mask=True, got {mask_indices.dtype} {tuple(mask_indices.shape)}"
            )
        emb = model.mask_emb if mask_emb is None else mask_emb
        if emb.shape != x.shape[-1:]:
            raise ValueError(f"mask_emb has shape {tuple(emb.shape)}, the model's frames {x.shape[-1]} channels")
        x = torch.where(mask_indices.to(x.device).unsqueeze(-1), emb.to(device=x.device, dtype=x.dtype), x)
    # x: (B, T, D)
    if host_lengths is not None:
        any_padding = has_padded_frames(host_lengths, specs, features.size(-1))
    else:
        any_padding = frame_mask is not None and bool(frame_mask.any())
    # an all-False mask changes nothing but costs the masked attention path;
    # extract_features zeroes x's padded frames in place, as fairseq's own forward does
    _, layer_results = model.encoder.extract_features(x, padding_mask=frame_mask if any_padding else None)
    if len(layer_results) != len(model.encoder.layers):  # would mean layerdrop is on
        raise RuntimeError(f"the encoder returned {len(layer_results)} of {len(model.encoder.layers)} layers")
    layers = [result[0].transpose(0, 1) for result in layer_results]  # (T, B, D) -> (B, T, D)
    if model.encoder.layer_norm_first:
        layers[-1] = model.encoder.layer_norm(layers[-1])
    if layer0 == "layer_input":  # as the encoder computes it, on x with its padded frames zeroed
        if any_padding:
            x = x.masked_fill(frame_mask.unsqueeze(-1), 0.0)
        x = x + model.encoder.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not model.encoder.layer_norm_first:
            x = model.encoder.layer_norm(x)
    elif layer0 != "projection":
        raise ValueError(f"layer0={layer0!r}: must be 'projection' or 'layer_input'")
    return [x] + layers, frame_mask


# -- attention maps (STaRHuBERT's averaged-attention-map term) -------------------------------------
AttentionInput = Tuple[Tensor, Optional[Tensor]]  # the query (T, B, C) and key padding mask (B, T)


@contextmanager
def attention_inputs(layers: Sequence[nn.Module]) -> Iterator[Dict[int, AttentionInput]]:
    """Record what each layer's ``self_attn`` is called with while the block runs.

    Yields ``{layer index (0-based): (query, key_padding_mask)}``, filled by the forward passes
    inside the block. The query is the tensor the layer's attention actually received (after the
    pre-LN ``self_attn_layer_norm`` where there is one, with dropout as it was), so an attention
    map recomputed from it (:func:`head_averaged_attention`) is the layer's own, gradient included.
    fairseq's ``MultiheadAttention`` is called with keywords, ``thin_hubert``'s reuse attention
    positionally; both are read.
    """
    seen: Dict[int, AttentionInput] = {}

    def hook(index: int):
        def record(module, args, kwargs):
            query = kwargs.get("query", args[0] if args else None)
            mask = kwargs.get("key_padding_mask", args[1] if len(args) > 1 else None)
            seen[index] = (query, mask)
        return record

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def computes_attention(attn: nn.Module) -> bool:
    """Whether an attention module computes its own weights (an ARMHuBERT reusing layer does not)."""
    return getattr(attn, "q_proj", None) is not None and getattr(attn, "k_proj", None) is not None


def head_averaged_attention(attn: nn.Module, query: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """softmax(Q K^T / sqrt(head_dim) + key padding mask), averaged over heads: (B, T, T).

    ``attn``: fairseq's ``MultiheadAttention`` or ``thin_hubert``'s computing reuse attention
    (``q_proj``, ``k_proj``, ``num_heads``); ``query``: (T, B, C) as the layer received it;
    ``key_padding_mask``: (B, T), True = pad. fairseq scales the queries by head_dim^-0.5 before
    the product, which is the same. Memory: the (B, H, T, T) weights before the mean.
    """
    if not computes_attention(attn):
        raise ValueError(f"{type(attn).__name__} has no q_proj / k_proj: it reuses another layer's weights")
    x = query.transpose(0, 1)  # (B, T, C)
    heads = int(attn.num_heads)

    def split(y: Tensor) -> Tensor:  # (B, T, C) -> (B, H, T, C / H)
        return y.unflatten(-1, (heads, y.size(-1) // heads)).transpose(1, 2)

    q, k = split(attn.q_proj(x)), split(attn.k_proj(x))
    return attention_probabilities(q, k, key_padding_mask).mean(dim=1)


def attention_probabilities(q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Explicit softmax(Q K^T / sqrt(head_dim)) with padded keys masked, float32: (B, H, T, T).

    q, k: (B, H, T, head_dim); key_padding_mask: (B, T), True = pad. The one explicit attention
    formula of the project (the forward passes use the fused kernel; this is for maps and tests).
    """
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :].to(torch.bool), float("-inf"))
    return scores.float().softmax(dim=-1)


__all__ = ["attention_inputs", "attention_probabilities", "computes_attention", "fairseq_hidden_states", "has_padded_frames",
           "head_averaged_attention", "masked_group_norm", "padding_exact_cnn"]
