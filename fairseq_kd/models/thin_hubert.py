# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``thin_hubert``: a small HuBERT-style student for task-agnostic distillation.

One model covers the students of the distillation literature (see docs/papers.md):

- DistilHuBERT: HuBERT's CNN + 2 wide layers + prediction heads on the last layer
  (``pred_layer_ids``), one output per predicted teacher layer.
- FitHuBERT: thin CNN + time reduction (``time_reduction_factor``) + 12 thin layers +
  per-layer hint heads (``hint_layer_ids``, ``hint_head_type: convt_linear``).
- Deep-vs-Wide / DPHuBERT-style layer-to-layer students (``hint_head_type: linear``,
  optionally shared and identity-initialised heads).
- Structurally pruned students (DPHuBERT, ``models/pruning.py``): layers may differ in head
  count and FFN size (``encoder_attention_heads_per_layer``,
  ``encoder_ffn_embed_dim_per_layer``) and the CNN layers in width (``conv_channels``).

The encoder reuses fairseq's wav2vec2 modules, so parameter names and counts follow
fairseq's ``HubertModel`` (``feature_extractor``, ``layer_norm``, ``post_extract_proj``,
``mask_emb``, ``encoder.pos_conv``, ``encoder.layer_norm``, ``encoder.layers.<i>``).
Distillation heads (``hint_heads``, ``pred_head``) are set to ``None`` by
``remove_pretraining_modules``, which keeps their checkpoint keys ignorable even under
strict loading.

Conventions:

- ``hidden_states[0]`` is the post-projection CNN feature (after ``dropout_input`` and
  masking), ``hidden_states[l]`` the output of transformer layer ``l`` (1-based).
  For a pre-LN student the last entry includes the final encoder LayerNorm, so
  ``hidden_states[-1]`` is always the model's output ``x``.
- Padding masks are ``True`` at padding. The CNN-rate mask is computed from the exact
  convolution output lengths (wav2vec2's rule), so a padded row has the same number of
  valid frames as the same utterance run alone.
- Time reduction by ``r`` right-pads T to a multiple of ``r`` and maps frames
  ``[j*r, (j+1)*r)`` to reduced frame ``j``; a reduced frame is padding only if all its
  source frames are, so an utterance of ``n`` valid frames keeps ``ceil(n / r)`` frames.
  The rule and why it is the right one (CTC, padding-exactness) are in
  ``fairseq_kd/encoders/frames.py``, which every other part of the project uses too.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from fairseq import utils
from fairseq.data.data_utils import compute_mask_indices
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from fairseq.models.wav2vec.utils import pad_to_multiple
from fairseq.models.wav2vec.wav2vec2 import (
    EXTRACTOR_MODE_CHOICES,
    MASKING_DISTRIBUTION_CHOICES,
    ConvFeatureExtractionModel,
    TransformerSentenceEncoderLayer,
    make_conv_pos,
)
from fairseq.modules import GradMultiply, LayerNorm
from fairseq.modules.transformer_sentence_encoder import init_bert_params

from fairseq_kd.encoders.frames import (
    conv_output_lengths,
    frames_padding_mask,
    pad_to_multiple_of,
    reduce_padding_mask,
    samples_per_frame,
    specs_from_fields,
)
from fairseq_kd.encoders.layers import attention_probabilities
from fairseq_kd.models.pruning import resize_attention_heads

logger = logging.getLogger(__name__)

HINT_HEAD_CHOICES = ChoiceEnum(["convt_linear", "linear"])
# first names of the modules that exist only for distillation
HEAD_MODULES = ("hint_heads", "pred_head")
SAMPLE_RATE = 16000


@dataclass
class ThinHubertConfig(FairseqDataclass):
    # convolutional feature extractor
    conv_channels: List[int] = field(
        default_factory=lambda: [512] * 7,
        metadata={"help": "output channels of each CNN layer"},
    )
    conv_kernels: List[int] = field(
        default_factory=lambda: [10, 3, 3, 3, 3, 2, 2],
        metadata={"help": "kernel size of each CNN layer"},
    )
    conv_strides: List[int] = field(
        default_factory=lambda: [5, 2, 2, 2, 2, 2, 2],
        metadata={"help": "stride of each CNN layer"},
    )
    extractor_mode: EXTRACTOR_MODE_CHOICES = field(
        default="default",
        metadata={
            "help": "mode for feature extractor. default has a single group "
            "norm with d groups in the first conv block, whereas layer_norm "
            "has layer norms in every block (meant to use with normalize=True)"
        },
    )
    conv_bias: bool = field(
        default=False, metadata={"help": "include bias in conv encoder"}
    )
    feature_grad_mult: float = field(
        default=1.0,
        metadata={
            "help": "multiply feature extractor grads by this; 0 freezes the CNN "
            "(run under no_grad)"
        },
    )

    # transformer
    encoder_layers: int = field(
        default=12, metadata={"help": "num encoder layers in the transformer"}
    )
    encoder_embed_dim: int = field(
        default=768, metadata={"help": "encoder embedding dimension"}
    )
    encoder_ffn_embed_dim: int = field(
        default=3072, metadata={"help": "encoder embedding dimension for FFN"}
    )
    encoder_attention_heads: int = field(
        default=12,
        metadata={
            "help": "num encoder attention heads; also fixes the head size, "
            "encoder_embed_dim / encoder_attention_heads, of every layer"
        },
    )
    # per-layer sizes: what structured pruning (models/pruning.py, DPHuBERT) leaves
    encoder_attention_heads_per_layer: Optional[List[int]] = field(
        default=None,
        metadata={
            "help": "heads of each transformer layer (one entry per layer, each >= 1), of "
            "the size encoder_embed_dim / encoder_attention_heads, so a layer's attention "
            "projects encoder_embed_dim -> heads * head size -> encoder_embed_dim; "
            "None = encoder_attention_heads in every layer"
        },
    )
    encoder_ffn_embed_dim_per_layer: Optional[List[int]] = field(
        default=None,
        metadata={
            "help": "FFN size of each transformer layer (one entry per layer, each >= 1); "
            "None = encoder_ffn_embed_dim in every layer"
        },
    )
    pruning_materialised: bool = field(
        default=False,
        metadata={
            "help": "set by pruning.materialise_student: the weights and per-layer sizes are "
            "those of a pruned, materialised student (structured pruning's stage 2, the final "
            "distillation, starts only from such a checkpoint)"
        },
    )
    activation_fn: ChoiceEnum(utils.get_available_activation_fns()) = field(
        default="gelu", metadata={"help": "activation function to use"}
    )
    layer_norm_first: bool = field(
        default=False, metadata={"help": "apply layernorm first in the transformer"}
    )
    required_seq_len_multiple: int = field(
        default=1,
        metadata={
            "help": "pad the input of every transformer layer such that the sequence "
            "length is divisible by multiple (padding is removed from the outputs)"
        },
    )

    # dropouts
    dropout: float = field(
        default=0.1, metadata={"help": "dropout probability for the transformer"}
    )
    attention_dropout: float = field(
        default=0.1, metadata={"help": "dropout probability for attention weights"}
    )
    activation_dropout: float = field(
        default=0.0, metadata={"help": "dropout probability after activation in FFN"}
    )
    encoder_layerdrop: float = field(
        default=0.0,
        metadata={
            "help": "probability of dropping a transformer layer in training; a "
            "dropped layer passes its input through"
        },
    )
    dropout_input: float = field(
        default=0.0,
        metadata={"help": "dropout to apply to the input (after feat extr)"},
    )
    dropout_features: float = field(
        default=0.0,
        metadata={
            "help": "accepted for fairseq's fine-tuning overrides; unused (the student "
            "has no unmasked-feature targets)"
        },
    )

    # positional embeddings
    conv_pos: int = field(
        default=128,
        metadata={"help": "number of filters for convolutional positional embeddings"},
    )
    conv_pos_groups: int = field(
        default=16,
        metadata={"help": "number of groups for convolutional positional embedding"},
    )

    # time reduction
    time_reduction_factor: int = field(
        default=1,
        metadata={
            "help": "reduce the frame rate by this factor with Conv1d(D, D, k=r, s=r); "
            "1 = no reduction"
        },
    )
    time_reduction_layer: int = field(
        default=0,
        metadata={
            "help": "insert the time reduction before transformer layer index i "
            "(0 = after pos_conv/LN, before the first layer, as FitHuBERT)"
        },
    )

    # attention-map reuse (ARMHuBERT, docs/papers.md#armhubert-and-maskhubert)
    # List[str], not List[bool]: fairseq's argparse bridge cannot parse bool lists; entries are
    # true / false (yaml booleans arrive as "True" / "False")
    reuse_pattern: List[str] = field(
        default_factory=list,
        metadata={
            "help": "one entry per transformer layer, ARMHuBERT's convention: True = the layer "
            "computes its own attention map (has Q/K projections), False = it has no Q/K and "
            "applies the previous layer's attention weights to its own values; "
            "[True, False] * 6 is ARMHuBERT's; empty = every layer computes its own"
        },
    )
    layer_grad_scale: bool = field(
        default=False,
        metadata={
            "help": "ARMHuBERT's per-layer gradient scaling: layer l of L passes its output on "
            "with gradient x m_l = (L - l + 1) / (L - l + 2) and exposes it for distillation "
            "with a further x (1 - m_l); forward values are unchanged"
        },
    )

    # masking (used when fine-tuning with mask=True)
    mask_length: int = field(default=10, metadata={"help": "mask length"})
    mask_prob: float = field(
        default=0.65, metadata={"help": "probability of replacing a token with mask"}
    )
    mask_selection: MASKING_DISTRIBUTION_CHOICES = field(
        default="static", metadata={"help": "how to choose mask length"}
    )
    mask_other: float = field(
        default=0,
        metadata={
            "help": "secondary mask argument (used for more complex distributions), "
            "see help in compute_mask_indices"
        },
    )
    no_mask_overlap: bool = field(
        default=False, metadata={"help": "whether to allow masks to overlap"}
    )
    mask_min_space: int = field(
        default=1,
        metadata={"help": "min space between spans (if no overlap is enabled)"},
    )

    # channel masking
    mask_channel_length: int = field(
        default=10, metadata={"help": "length of the mask for features (channels)"}
    )
    mask_channel_prob: float = field(
        default=0.0, metadata={"help": "probability of replacing a feature with 0"}
    )
    mask_channel_selection: MASKING_DISTRIBUTION_CHOICES = field(
        default="static",
        metadata={"help": "how to choose mask length for channel masking"},
    )
    mask_channel_other: float = field(
        default=0,
        metadata={
            "help": "secondary mask argument (used for more complex distributions), "
            "see help in compute_mask_indices"
        },
    )
    no_mask_channel_overlap: bool = field(
        default=False, metadata={"help": "whether to allow channel masks to overlap"}
    )
    mask_channel_min_space: int = field(
        default=1,
        metadata={"help": "min space between spans (if no overlap is enabled)"},
    )

    # distillation heads (dropped by remove_pretraining_modules)
    teacher_embed_dim: int = field(
        default=768, metadata={"help": "output width of the distillation heads"}
    )
    pred_layer_ids: List[int] = field(
        default_factory=list,
        metadata={
            "help": "DistilHuBERT prediction heads on the last layer: one output per "
            "listed teacher layer (Linear(D, D*N) -> GELU -> N x Linear(D, teacher))"
        },
    )
    hint_layer_ids: List[int] = field(
        default_factory=list,
        metadata={
            "help": "student layers with a hint head (0 = post-projection CNN feature, "
            "l = output of transformer layer l)"
        },
    )
    hint_head_type: HINT_HEAD_CHOICES = field(
        default="linear",
        metadata={
            "help": "convt_linear: ConvTranspose1d(D, D, k=r, s=r) back to the CNN rate "
            "(on time-reduced layers only) then Linear(D, teacher) (FitHuBERT); "
            "linear: Linear(D, teacher) (DPHuBERT)"
        },
    )
    hint_head_groups: List[int] = field(
        default_factory=list,
        metadata={
            "help": "optional group id per hint layer (same length as hint_layer_ids); "
            "layers with the same id share one head"
        },
    )
    hint_identity_init: bool = field(
        default=False,
        metadata={
            "help": "initialise the hint Linear to a (truncated) identity matrix and "
            "zero bias (DPHuBERT)"
        },
    )

    # initialisation from the teacher (done by the distillation task, not here)
    init_teacher_cnn: bool = field(
        default=False,
        metadata={
            "help": "copy the teacher's CNN, its layer_norm and (if shapes match) "
            "post_extract_proj before training"
        },
    )
    init_teacher_pos_conv: bool = field(
        default=False,
        metadata={"help": "copy the teacher's convolutional positional embedding"},
    )
    init_teacher_layers: int = field(
        default=0,
        metadata={"help": "copy the teacher's first N transformer layers"},
    )


def as_thin_hubert_config(cfg: Any) -> Any:
    """Accept a ``ThinHubertConfig``, an OmegaConf config or a plain mapping of fields."""
    if isinstance(cfg, (ThinHubertConfig, DictConfig)):
        return cfg
    if isinstance(cfg, Mapping):
        return ThinHubertConfig(**{k: v for k, v in cfg.items() if k != "_name"})
    raise TypeError(f"expected a ThinHubertConfig, DictConfig or mapping, got {type(cfg)}")


def check_config(cfg: ThinHubertConfig) -> None:
    """Raise ``ValueError`` naming the offending keys when a config cannot be built."""
    n_conv = (len(cfg.conv_channels), len(cfg.conv_kernels), len(cfg.conv_strides))
    if len(set(n_conv)) != 1 or n_conv[0] == 0:
        raise ValueError(
            "conv_channels, conv_kernels and conv_strides must be non-empty and have the "
            f"same length, got {n_conv[0]}, {n_conv[1]} and {n_conv[2]}"
        )
    if cfg.encoder_layers < 1:
        raise ValueError(f"encoder_layers must be >= 1, got {cfg.encoder_layers}")
    if cfg.encoder_embed_dim % cfg.encoder_attention_heads != 0:
        raise ValueError(
            f"encoder_embed_dim ({cfg.encoder_embed_dim}) must be divisible by "
            f"encoder_attention_heads ({cfg.encoder_attention_heads})"
        )
    if cfg.encoder_embed_dim % cfg.conv_pos_groups != 0:
        raise ValueError(
            f"encoder_embed_dim ({cfg.encoder_embed_dim}) must be divisible by "
            f"conv_pos_groups ({cfg.conv_pos_groups})"
        )
    if cfg.time_reduction_factor < 1:
        raise ValueError(
            f"time_reduction_factor must be >= 1, got {cfg.time_reduction_factor}"
        )
    if cfg.time_reduction_factor > 1 and not (
        0 <= cfg.time_reduction_layer < cfg.encoder_layers
    ):
        raise ValueError(
            f"time_reduction_layer must be in [0, encoder_layers={cfg.encoder_layers}), "
            f"got {cfg.time_reduction_layer}"
        )
    check_reuse_pattern(cfg)
    check_layer_sizes(cfg)
    hint_ids = list(cfg.hint_layer_ids)
    if len(set(hint_ids)) != len(hint_ids):
        raise ValueError(f"hint_layer_ids has duplicates: {hint_ids}")
    bad = [l for l in hint_ids if not 0 <= l <= cfg.encoder_layers]
    if bad:
        raise ValueError(
            f"hint_layer_ids must be in [0, encoder_layers={cfg.encoder_layers}], "
            f"got {bad}"
        )
    if len(cfg.hint_head_groups) not in (0, len(hint_ids)):
        raise ValueError(
            f"hint_head_groups must be empty or as long as hint_layer_ids "
            f"({len(hint_ids)}), got {len(cfg.hint_head_groups)}"
        )
    pred_ids = list(cfg.pred_layer_ids)
    if len(set(pred_ids)) != len(pred_ids) or any(l < 0 for l in pred_ids):
        raise ValueError(
            f"pred_layer_ids must be distinct non-negative teacher layers, got {pred_ids}"
        )


_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def _pattern_entries(cfg: Any) -> List[bool]:
    raw = list(_cfg_get(cfg, "reuse_pattern", None) or [])
    entries = []
    for x in raw:
        value = x if isinstance(x, bool) else _BOOLS.get(str(x).strip().lower())
        if value is None:
            raise ValueError(f"model.reuse_pattern must be a list of true/false, got {raw}")
        entries.append(value)
    return entries


def reuse_pattern(cfg: Any) -> List[bool]:
    """Per layer whether it computes its own attention map (``model.reuse_pattern``, or all True)."""
    return _pattern_entries(cfg) or [True] * int(cfg.encoder_layers)


def check_reuse_pattern(cfg: Any) -> None:
    """``model.reuse_pattern`` must give every layer an entry and let every reusing layer reuse."""
    pattern = _pattern_entries(cfg)
    if not pattern:
        return
    if len(pattern) != cfg.encoder_layers:
        raise ValueError(
            f"model.reuse_pattern has {len(pattern)} entries but model.encoder_layers is "
            f"{cfg.encoder_layers}: give one entry per layer (True = computes its attention map, "
            "False = reuses the previous layer's), e.g. [True, False] * 6 for 12 layers"
        )
    if not pattern[0]:
        raise ValueError(
            "model.reuse_pattern[0] is False, but the first layer has no previous layer whose "
            "attention map it could reuse: the first entry must be True"
        )
    r, at = cfg.time_reduction_factor, cfg.time_reduction_layer
    if r > 1 and not pattern[at]:
        raise ValueError(
            f"model.reuse_pattern[{at}] is False, but the time reduction "
            f"(model.time_reduction_layer={at}) changes the frame count before that layer, so "
            "the previous layer's attention map does not fit: it must be True"
        )



_PER_LAYER = {  # per-layer field -> the uniform field it replaces
    "encoder_attention_heads_per_layer": "encoder_attention_heads",
    "encoder_ffn_embed_dim_per_layer": "encoder_ffn_embed_dim",
}


def _per_layer(cfg: Any, key: str) -> List[int]:
    """``model.<key>`` as ints, or the uniform field repeated (validated by check_layer_sizes)."""
    values = _cfg_get(cfg, key, None)
    if values is None:
        return [int(_cfg_get(cfg, _PER_LAYER[key], 0))] * int(cfg.encoder_layers)
    return [int(v) for v in values]


def head_size(cfg: Any) -> int:
    """Size of every attention head: encoder_embed_dim / encoder_attention_heads (64 for
    HuBERT Base), whatever the per-layer head counts (pruning removes heads, not their width)."""
    return int(cfg.encoder_embed_dim) // int(cfg.encoder_attention_heads)


def layer_attention_heads(cfg: Any) -> List[int]:
    """Heads of each transformer layer (``model.encoder_attention_heads_per_layer`` or uniform)."""
    return _per_layer(cfg, "encoder_attention_heads_per_layer")


def layer_ffn_dims(cfg: Any) -> List[int]:
    """FFN size of each transformer layer (``model.encoder_ffn_embed_dim_per_layer`` or uniform)."""
    return _per_layer(cfg, "encoder_ffn_embed_dim_per_layer")


def check_layer_sizes(cfg: Any) -> None:
    """Per-layer head counts / FFN sizes: one integer >= 1 per layer, and no attention reuse
    with per-layer heads (a reusing layer applies its predecessor's map: same heads)."""
    for key in _PER_LAYER:
        raw = _cfg_get(cfg, key, None)
        if raw is None:
            continue
        values = list(raw)
        if len(values) != cfg.encoder_layers:
            raise ValueError(
                f"model.{key} has {len(values)} entries but model.encoder_layers is "
                f"{cfg.encoder_layers}: give one entry per layer, or leave it unset (null) for "
                f"model.{_PER_LAYER[key]} in every layer"
            )
        bad = {i: v for i, v in enumerate(values) if not isinstance(v, int) or v < 0}
        if bad:
            raise ValueError(f"model.{key} must hold non-negative integers, got {bad} (index: value)")
        empty = [i for i, v in enumerate(values) if v == 0]
        if empty:
            # materialise_layer refuses an all-pruned block too: no module would remain
            raise ValueError(
                f"model.{key} is 0 for layer(s) {empty}: removing a whole attention or FFN "
                "sub-layer is not supported, every layer needs >= 1 head and >= 1 FFN unit"
            )
    if _cfg_get(cfg, "encoder_attention_heads_per_layer", None) is not None and not all(
        reuse_pattern(cfg)
    ):
        raise ValueError(
            "model.encoder_attention_heads_per_layer cannot be combined with attention reuse "
            "(model.reuse_pattern has False entries): a reusing layer applies the previous "
            "layer's attention map, so its head count is not its own"
        )


class SplitLinear(nn.Module):
    """N independent ``Linear(in_dim, out_dim)`` applied to N slices of the input."""

    def __init__(self, in_dim: int, num_splits: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.num_splits = num_splits
        self.out_dim = out_dim
        self.weight = nn.Parameter(torch.empty(num_splits, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(num_splits, out_dim))
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, N * in_dim) -> (B, T, N, out_dim)
        x = x.view(*x.shape[:-1], self.num_splits, self.in_dim)
        return torch.einsum("btni,nio->btno", x, self.weight) + self.bias


class PredictionHead(nn.Module):
    """DistilHuBERT's ``expand-last`` head: Linear(D, D*N) -> GELU -> SplitLinear."""

    def __init__(self, embed_dim: int, num_outputs: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, embed_dim * num_outputs)
        self.activation = nn.GELU()
        self.split = SplitLinear(embed_dim, num_outputs, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D) -> (B, T, N, out_dim)
        return self.split(self.activation(self.proj(x)))


class HintHead(nn.Module):
    """Per-layer projection to the teacher width, optionally up-sampling by ``factor``."""

    def __init__(
        self, embed_dim: int, out_dim: int, factor: int = 1, identity_init: bool = False
    ) -> None:
        super().__init__()
        self.upsample = (
            nn.ConvTranspose1d(embed_dim, embed_dim, kernel_size=factor, stride=factor)
            if factor > 1
            else None
        )
        self.proj = nn.Linear(embed_dim, out_dim)
        if identity_init:
            nn.init.eye_(self.proj.weight)  # truncated identity when out_dim != embed_dim
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, length: Optional[int] = None) -> torch.Tensor:
        # x: (B, T, D) -> (B, T * factor, out_dim), cut to ``length`` frames if given
        if self.upsample is not None:
            x = self.upsample(x.transpose(1, 2)).transpose(1, 2)
            if length is not None:
                x = x[:, :length]
        return self.proj(x)


SharedAttention = Tuple[torch.Tensor, torch.Tensor]  # queries and keys, each (B, H, T, head_dim)


class ReuseSelfAttention(nn.Module):
    """Self-attention of an attention-reuse student (ARMHuBERT), with fairseq's parameter names.

    A computing layer (``computes=True``) has ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj``;
    a reusing layer has only ``v_proj`` / ``out_proj`` and applies the attention weights of the
    computing layer before it, softmax(Q K^T / sqrt(d) + key padding mask), to its own values.

    How the weights travel: the computing layer hands on its queries and keys
    (B, H, T, head_dim each, O(T D) memory) instead of the (B, H, T, T) weights, and both layers
    call the fused ``F.scaled_dot_product_attention`` on them: the reusing layer's weights are the
    computing layer's by construction (same Q, same K, same key mask, same softmax), no T x T
    map is materialised in either layer, and the reusing layer still saves the Q/K projections
    (2 T D^2 MACs); what it spends is the fused kernel's recomputation of Q K^T (T^2 D MACs).
    Attention dropout (training only) draws its own mask in each layer, as two separate
    dropouts on the same weights would. Padding-exact: padded keys are masked out, so a padded
    row's valid frames equal the utterance run alone.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float, computes: bool) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.computes = computes
        self.q_proj = nn.Linear(embed_dim, embed_dim) if computes else None
        self.k_proj = nn.Linear(embed_dim, embed_dim) if computes else None
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def _split_heads(self, y: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> (B, H, T, head_dim)
        return y.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        reused: Optional[SharedAttention] = None,
    ) -> Tuple[torch.Tensor, SharedAttention]:
        """query: (T, B, C) as fairseq's layers pass it; key_padding_mask: (B, T), True = pad.

        ``reused``: the previous computing layer's (queries, keys); required iff not ``computes``.
        Returns the attention output (T, B, C) and the (queries, keys) a next layer can reuse.
        """
        # contiguous (B, T, C) whatever the layer passed (torch.export specialises otherwise)
        x = query.transpose(0, 1).clone(memory_format=torch.contiguous_format)
        if self.computes:
            q, k = self._split_heads(self.q_proj(x)), self._split_heads(self.k_proj(x))
        elif reused is None:
            raise ValueError("a reusing attention layer needs the previous layer's queries and keys")
        else:
            q, k = reused
        v = self._split_heads(self.v_proj(x))
        allowed = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        # (B, H, T, head_dim) -> (B, T, C) -> (T, B, C)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        return out.transpose(0, 1), (q, k)

    def attention_weights(
        self, reused_or_query: Any, key_padding_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The (B, H, T, T) weights this layer applies (explicit softmax; for analysis and tests).

        ``reused_or_query``: the (queries, keys) this layer reuses, or its (T, B, C) input if it
        computes its own.
        """
        if isinstance(reused_or_query, torch.Tensor):
            x = reused_or_query.transpose(0, 1)
            q, k = self._split_heads(self.q_proj(x)), self._split_heads(self.k_proj(x))
        else:
            q, k = reused_or_query
        return attention_probabilities(q, k, key_padding_mask)


class ReuseTransformerLayer(TransformerSentenceEncoderLayer):
    """fairseq's wav2vec 2.0 encoder layer (same modules, names and order of operations) whose
    self-attention is a :class:`ReuseSelfAttention`."""

    def __init__(self, *, computes: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.self_attn = ReuseSelfAttention(
            self.embedding_dim,
            kwargs["num_attention_heads"],
            kwargs["attention_dropout"],
            computes=computes,
        )

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        self_attn_padding_mask: Optional[torch.Tensor] = None,
        reused: Optional[SharedAttention] = None,
    ) -> Tuple[torch.Tensor, SharedAttention]:
        # x: (T, B, C) -> (T, B, C), and the (queries, keys) the next layer may reuse
        residual = x
        if self.layer_norm_first:
            x, shared = self.self_attn(self.self_attn_layer_norm(x), self_attn_padding_mask, reused)
            x = residual + self.dropout1(x)
            residual = x
            x = self.dropout2(self.activation_fn(self.fc1(self.final_layer_norm(x))))
            x = residual + self.dropout3(self.fc2(x))
        else:
            x, shared = self.self_attn(x, self_attn_padding_mask, reused)
            x = self.self_attn_layer_norm(residual + self.dropout1(x))
            residual = x
            x = self.dropout2(self.activation_fn(self.fc1(x)))
            x = self.final_layer_norm(residual + self.dropout3(self.fc2(x)))
        return x, shared


def layer_grad_multipliers(num_layers: int) -> List[float]:
    """ARMHuBERT's ``layer_grad_scale``: m_l = (L - l + 1) / (L - l + 2) for layers l = 1..L."""
    return [(num_layers - i) / (num_layers - i + 1) for i in range(num_layers)]


def _init_fix(prefix: str) -> str:
    """What to change when a copied-from-teacher module has another shape (``init_from_teacher``)."""
    if prefix.startswith("encoder.pos_conv"):
        return ("set model.encoder_embed_dim / conv_pos / conv_pos_groups to the teacher's, or "
                "model.init_teacher_pos_conv=false")
    if prefix.startswith("encoder.layers."):
        return ("give the copied layers the teacher's model.encoder_embed_dim / encoder_ffn_embed_dim / "
                "encoder_attention_heads, or fewer model.init_teacher_layers")
    return "set model.conv_channels / conv_kernels to the teacher's CNN, or model.init_teacher_cnn=false"


class ThinTransformerEncoder(nn.Module):
    """fairseq's wav2vec2 ``TransformerEncoder`` with an optional time-reduction layer.

    Returns every layer's output (a dropped layer passes its input through), each at its
    own frame rate, instead of fairseq's ``layer_results`` tuples.
    """

    def __init__(self, cfg: ThinHubertConfig) -> None:
        super().__init__()
        self.dropout = cfg.dropout
        self.embedding_dim = cfg.encoder_embed_dim
        self.required_seq_len_multiple = cfg.required_seq_len_multiple
        self.layer_norm_first = cfg.layer_norm_first
        self.layerdrop = cfg.encoder_layerdrop

        self.pos_conv = make_conv_pos(
            self.embedding_dim, cfg.conv_pos, cfg.conv_pos_groups
        )
        self.layer_norm = LayerNorm(self.embedding_dim)
        layer_args = dict(
            embedding_dim=self.embedding_dim,
            num_attention_heads=cfg.encoder_attention_heads,
            dropout=cfg.dropout,
            attention_dropout=cfg.attention_dropout,
            activation_dropout=cfg.activation_dropout,
            activation_fn=cfg.activation_fn,
            layer_norm_first=cfg.layer_norm_first,
        )
        self.reuse_pattern = reuse_pattern(cfg)
        # fairseq's own layers unless some layer reuses an attention map
        self.reuses = not all(self.reuse_pattern)
        self.layers = nn.ModuleList(
            [
                self.build_layer(computes, heads, ffn, layer_args)
                for computes, heads, ffn in zip(
                    self.reuse_pattern, layer_attention_heads(cfg), layer_ffn_dims(cfg)
                )
            ]
        )
        self.grad_multipliers = (
            layer_grad_multipliers(cfg.encoder_layers) if _cfg_get(cfg, "layer_grad_scale", False) else None
        )
        self.time_reduction_factor = cfg.time_reduction_factor
        self.time_reduction_layer = cfg.time_reduction_layer
        self.time_reduction = (
            nn.Conv1d(
                self.embedding_dim,
                self.embedding_dim,
                kernel_size=cfg.time_reduction_factor,
                stride=cfg.time_reduction_factor,
            )
            if cfg.time_reduction_factor > 1
            else None
        )
        if self.layer_norm.weight.device.type != "meta":  # model_summary builds on meta
            self.apply(init_bert_params)

    def build_layer(
        self, computes: bool, heads: int, ffn: int, layer_args: Dict[str, Any]
    ) -> nn.Module:
        """One transformer layer of ``heads`` heads and FFN size ``ffn``."""
        if self.reuses:
            return ReuseTransformerLayer(computes=computes, ffn_embedding_dim=ffn, **layer_args)
        layer = TransformerSentenceEncoderLayer(ffn_embedding_dim=ffn, **layer_args)
        if heads != layer.self_attn.num_heads:  # a pruned layer: same head size, fewer heads
            resize_attention_heads(layer.self_attn, heads)
        return layer

    def reduce_time(
        self, x: torch.Tensor, padding_mask: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Reduce the frame rate by ``time_reduction_factor`` (the rule: ``encoders/frames.py``).

        x: (B, T, C) -> (B, ceil(T / r), C); padding_mask: (B, T) -> (B, ceil(T / r)).
        """
        r = self.time_reduction_factor
        if padding_mask is not None:
            # zero padded frames so a half-padded reduced frame equals the lone utterance's
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = self.time_reduction(pad_to_multiple_of(x, r).transpose(1, 2)).transpose(1, 2)
        return x, reduce_padding_mask(padding_mask, r)

    def forward_layer(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        padding_mask: Optional[torch.Tensor],
        reused: Optional[SharedAttention] = None,
    ) -> Tuple[torch.Tensor, Optional[SharedAttention]]:
        # x: (B, T, C), padded to required_seq_len_multiple inside and cut back after; returns
        # the layer's output and, for a reuse student, its (queries, keys) at the padded length
        tsz = x.size(1)
        x, pad_length = pad_to_multiple(x, self.required_seq_len_multiple, dim=-2)
        if pad_length > 0:
            if padding_mask is None:
                padding_mask = x.new_zeros((x.size(0), tsz), dtype=torch.bool)
            padding_mask, _ = pad_to_multiple(
                padding_mask, self.required_seq_len_multiple, dim=-1, value=True
            )
        if self.reuses:
            x, shared = layer(x.transpose(0, 1), self_attn_padding_mask=padding_mask, reused=reused)
        else:
            (x, _), shared = layer(x.transpose(0, 1), self_attn_padding_mask=padding_mask), None
        return x.transpose(0, 1)[:, :tsz], shared

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        tgt_layer: Optional[int] = None,
    ) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
        """Run the layers; ``tgt_layer`` (1-based) stops early.

        x: (B, T, C), padding_mask: (B, T) or None. Returns the outputs of layers
        1..L (or 1..tgt_layer), each (B, T_l, C), and their padding masks (B, T_l).
        """
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)

        x_conv = self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        x = x + x_conv
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = F.dropout(x, p=self.dropout, training=self.training)

        num_layers = len(self.layers) if tgt_layer is None else tgt_layer
        hidden_states, padding_masks = [], []
        shared: Optional[SharedAttention] = None  # the last computing layer's queries and keys
        for i, layer in enumerate(self.layers[:num_layers]):
            if self.time_reduction is not None and i == self.time_reduction_layer:
                x, padding_mask = self.reduce_time(x, padding_mask)
            dropped = self.training and self.layerdrop > 0 and (
                np.random.random() < self.layerdrop
            )
            if self.reuses and not self.reuse_pattern[i] and shared is None:
                dropped = True  # the layer whose map it reuses was dropped (layerdrop)
            if not dropped:
                x, produced = self.forward_layer(layer, x, padding_mask, reused=shared)
                if self.reuse_pattern[i]:
                    shared = produced
            elif self.reuse_pattern[i]:
                shared = None
            hidden = x
            if self.grad_multipliers is not None:
                # ARMHuBERT: the stream carries x m_l, the exposed output x m_l (1 - m_l)
                x = GradMultiply.apply(x, self.grad_multipliers[i])
                hidden = GradMultiply.apply(x, 1.0 - self.grad_multipliers[i])
            hidden_states.append(hidden)
            padding_masks.append(padding_mask)

        if self.layer_norm_first and num_layers == len(self.layers):
            hidden_states[-1] = self.layer_norm(hidden_states[-1])
        return hidden_states, padding_masks


@register_model("thin_hubert", dataclass=ThinHubertConfig)
class ThinHubertModel(BaseFairseqModel):
    def __init__(self, cfg: ThinHubertConfig) -> None:
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        logger.info(f"ThinHubertModel Config: {cfg}")

        conv_layers = list(zip(cfg.conv_channels, cfg.conv_kernels, cfg.conv_strides))
        self.embed = cfg.conv_channels[-1]
        self.feature_extractor = ConvFeatureExtractionModel(
            conv_layers=conv_layers,
            dropout=0.0,
            mode=cfg.extractor_mode,
            conv_bias=cfg.conv_bias,
        )
        self.conv_specs = specs_from_fields(cfg.conv_channels, cfg.conv_kernels, cfg.conv_strides)
        self.layer_norm = LayerNorm(self.embed)
        self.post_extract_proj = (
            nn.Linear(self.embed, cfg.encoder_embed_dim)
            if self.embed != cfg.encoder_embed_dim
            else None
        )
        self.feature_grad_mult = cfg.feature_grad_mult
        self.dropout_input = nn.Dropout(cfg.dropout_input)

        self.mask_prob = cfg.mask_prob
        self.mask_selection = cfg.mask_selection
        self.mask_other = cfg.mask_other
        self.mask_length = cfg.mask_length
        self.no_mask_overlap = cfg.no_mask_overlap
        self.mask_min_space = cfg.mask_min_space

        self.mask_channel_prob = cfg.mask_channel_prob
        self.mask_channel_selection = cfg.mask_channel_selection
        self.mask_channel_other = cfg.mask_channel_other
        self.mask_channel_length = cfg.mask_channel_length
        self.no_mask_channel_overlap = cfg.no_mask_channel_overlap
        self.mask_channel_min_space = cfg.mask_channel_min_space

        self.mask_emb = nn.Parameter(torch.empty(cfg.encoder_embed_dim).uniform_())

        self.encoder = ThinTransformerEncoder(cfg)

        # modules below are only needed for distillation
        self.hint_layer_ids = list(cfg.hint_layer_ids)
        self.hint_head_keys: Dict[int, str] = {}
        self.hint_heads = self.build_hint_heads(cfg) if self.hint_layer_ids else None
        self.pred_layer_ids = list(cfg.pred_layer_ids)
        self.pred_head = (
            PredictionHead(
                cfg.encoder_embed_dim, len(self.pred_layer_ids), cfg.teacher_embed_dim
            )
            if self.pred_layer_ids
            else None
        )

    @classmethod
    def build_model(cls, cfg: ThinHubertConfig, task=None):
        """Build a new model instance (never touches files: fine-tuning rebuilds it)."""
        return cls(cfg)

    def is_time_reduced(self, layer_id: int) -> bool:
        """Whether ``hidden_states[layer_id]`` is at the reduced frame rate."""
        return _is_time_reduced(self.cfg, layer_id)

    def build_hint_heads(self, cfg: ThinHubertConfig) -> nn.ModuleDict:
        groups = list(cfg.hint_head_groups) or list(cfg.hint_layer_ids)
        heads = nn.ModuleDict()
        factors: Dict[str, int] = {}
        for layer_id, group in zip(cfg.hint_layer_ids, groups):
            key = str(group)
            factor = (
                cfg.time_reduction_factor
                if cfg.hint_head_type == "convt_linear" and self.is_time_reduced(layer_id)
                else 1
            )
            if key not in heads:
                heads[key] = HintHead(
                    cfg.encoder_embed_dim,
                    cfg.teacher_embed_dim,
                    factor=factor,
                    identity_init=cfg.hint_identity_init,
                )
                factors[key] = factor
            elif factors[key] != factor:
                raise ValueError(
                    f"hint_head_groups: group {group} mixes layers before and after the "
                    f"time reduction (layer {layer_id}); a convt_linear head cannot be shared"
                )
            self.hint_head_keys[layer_id] = key
        return heads

    def remove_pretraining_modules(self) -> None:
        # set to None (not deleted) so that checkpoint keys stay ignorable under strict loading
        self.hint_heads = None
        self.pred_head = None

    def forward_features(self, source: torch.Tensor) -> torch.Tensor:
        # source: (B, S) -> features: (B, C, T)
        if self.feature_grad_mult > 0:
            features = self.feature_extractor(source)
            if self.feature_grad_mult != 1.0:
                features = GradMultiply.apply(features, self.feature_grad_mult)
        else:
            with torch.no_grad():
                features = self.feature_extractor(source)
        return features

    def get_feat_extract_output_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        """Exact number of CNN frames for each number of input samples."""
        return conv_output_lengths(input_lengths, self.conv_specs)

    def forward_padding_mask(
        self, features: torch.Tensor, padding_mask: torch.Tensor
    ) -> torch.Tensor:
        """Sample-level mask (B, S) -> frame-level mask (B, T) of ``features`` (B, T, C).

        Uses the exact CNN output lengths of the unpadded samples (right padding), so a
        padded row has as many valid frames as the utterance alone.
        """
        return frames_padding_mask(padding_mask, self.conv_specs, features.size(1))

    def apply_mask(
        self, x: torch.Tensor, padding_mask: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        # x: (B, T, C) at the CNN rate; mask_indices: (B, T), True = replaced by mask_emb
        B, T, C = x.shape
        if self.mask_prob > 0:
            mask_indices = compute_mask_indices(
                (B, T),
                padding_mask,
                self.mask_prob,
                self.mask_length,
                self.mask_selection,
                self.mask_other,
                min_masks=2,
                no_overlap=self.no_mask_overlap,
                min_space=self.mask_min_space,
            )
            mask_indices = torch.from_numpy(mask_indices).to(x.device)
            x[mask_indices] = self.mask_emb.to(x.dtype)
        else:
            mask_indices = None

        if self.mask_channel_prob > 0:
            mask_channel_indices = compute_mask_indices(
                (B, C),
                None,
                self.mask_channel_prob,
                self.mask_channel_length,
                self.mask_channel_selection,
                self.mask_channel_other,
                no_overlap=self.no_mask_channel_overlap,
                min_space=self.mask_channel_min_space,
            )
            mask_channel_indices = (
                torch.from_numpy(mask_channel_indices)
                .to(x.device)
                .unsqueeze(1)
                .expand(-1, T, -1)
            )
            x[mask_channel_indices] = 0
        return x, mask_indices

    def encode(
        self,
        source: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        mask: bool = False,
        output_layer: Optional[int] = None,
    ) -> Dict[str, Any]:
        """CNN + encoder without the distillation heads; ``output_layer`` stops early."""
        if output_layer is not None and not 0 <= output_layer <= len(self.encoder.layers):
            raise ValueError(
                f"layer must be in [0, {len(self.encoder.layers)}] or None, got {output_layer}"
            )
        features = self.forward_features(source)
        # features: (B, C, T) -> (B, T, C)
        features = features.transpose(1, 2)
        features = self.layer_norm(features)

        if padding_mask is not None:
            padding_mask = self.forward_padding_mask(features, padding_mask)
        # padding_mask: (B, T), True = pad

        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        # features: (B, T, D)
        features = self.dropout_input(features)

        if mask:
            x, mask_indices = self.apply_mask(features, padding_mask)
        else:
            x, mask_indices = features, None

        if output_layer == 0:
            layers, layer_masks = [], []
        else:
            layers, layer_masks = self.encoder(x, padding_mask, tgt_layer=output_layer)
        hidden_states = [x] + layers
        padding_masks = [padding_mask] + layer_masks
        # hidden_states[l]: (B, T_l, D); padding_masks[l]: (B, T_l) or None
        return {
            "x": hidden_states[-1],
            "padding_mask": padding_masks[-1],
            "hidden_states": hidden_states,
            "padding_masks": padding_masks,
            "mask_indices": mask_indices,
        }

    def forward(
        self,
        source: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        mask: bool = False,
    ) -> Dict[str, Any]:
        """source: (B, S) waveform, padding_mask: (B, S) True = pad.

        Returns ``x`` (B, T', D) and ``padding_mask`` (B, T') at the output rate,
        ``hidden_states``/``padding_masks`` (L + 1 entries), ``mask_indices`` (B, T) at the
        CNN rate or None, ``hints`` {student layer: (B, T_l or T, teacher_dim)} (convt heads
        up-sample back to the CNN rate) and ``preds`` {teacher layer: (B, T', teacher_dim)}.
        """
        res = self.encode(source, padding_mask=padding_mask, mask=mask)
        hidden_states = res["hidden_states"]

        hints: Dict[int, torch.Tensor] = {}
        if self.hint_heads is not None:
            cnn_len = hidden_states[0].size(1)
            for layer_id in self.hint_layer_ids:
                head = self.hint_heads[self.hint_head_keys[layer_id]]
                hints[layer_id] = head(hidden_states[layer_id], length=cnn_len)

        preds: Dict[int, torch.Tensor] = {}
        if self.pred_head is not None:
            out = self.pred_head(res["x"])  # (B, T', N, teacher_dim)
            for n, layer_id in enumerate(self.pred_layer_ids):
                preds[layer_id] = out[:, :, n]

        res["hints"] = hints
        res["preds"] = preds
        return res

    def extract_features(
        self,
        source: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        mask: bool = False,
        layer: Optional[int] = None,
        **kwargs,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What fairseq's ``HubertEncoder`` (hubert_ctc) calls.

        Returns (B, T', encoder_embed_dim) at the output (time-reduced) rate and the
        (B, T') padding mask at that rate (None if ``padding_mask`` is None). ``layer``
        selects ``hidden_states[layer]`` (0 = CNN feature, l = transformer layer l) at
        its own rate; extra keyword arguments (e.g. ``ret_conv``) are ignored.
        """
        res = self.encode(source, padding_mask=padding_mask, mask=mask, output_layer=layer)
        return res["x"], res["padding_mask"]

    def init_from_teacher(
        self,
        teacher_state: Mapping[str, torch.Tensor],
        teacher_cfg: Any = None,
        init_cnn: bool = False,
        init_pos_conv: bool = False,
        init_layers: int = 0,
    ) -> List[str]:
        """Copy weights from a fairseq ``HubertModel`` state dict; returns the names copied.

        - ``init_cnn``: ``feature_extractor.*`` and ``layer_norm.*``; ``post_extract_proj.*``
          too when both models have one of the same shape (a student of another width
          keeps its own projection, with a warning).
        - ``init_pos_conv``: ``encoder.pos_conv.*``, plus ``encoder.layer_norm.*`` when
          both models are post-LN (it then directly follows the positional conv).
        - ``init_layers``: ``encoder.layers.{0..N-1}.*``.

        Everything is checked before anything is copied: a parameter missing on either
        side or with a different shape raises ``ValueError`` naming it and both shapes.
        """
        if "model" in teacher_state and isinstance(teacher_state["model"], Mapping):
            teacher_state = teacher_state["model"]  # a whole checkpoint
        teacher_post_ln = not _cfg_get(teacher_cfg, "layer_norm_first", False)
        teacher_layers = _cfg_get(teacher_cfg, "encoder_layers", None)
        if init_layers > len(self.encoder.layers):
            raise ValueError(
                f"init_layers={init_layers} exceeds the student's "
                f"{len(self.encoder.layers)} layers"
            )
        if teacher_layers is not None and init_layers > teacher_layers:
            raise ValueError(
                f"init_layers={init_layers} exceeds the teacher's {teacher_layers} layers"
            )
        if init_layers > 0 and teacher_cfg is not None and (
            self.cfg.layer_norm_first != (not teacher_post_ln)
        ):
            logger.warning(
                "init_from_teacher: student layer_norm_first=%s differs from the teacher's",
                self.cfg.layer_norm_first,
            )

        prefixes: List[str] = []
        if init_cnn:
            prefixes += ["feature_extractor.", "layer_norm."]
            if self._proj_matches(teacher_state):
                prefixes.append("post_extract_proj.")
            else:
                logger.warning(
                    "init_from_teacher: post_extract_proj not copied (missing in one model "
                    "or of another shape); the student keeps its own"
                )
        if init_pos_conv:
            prefixes.append("encoder.pos_conv.")
            if not self.cfg.layer_norm_first and teacher_post_ln:
                prefixes.append("encoder.layer_norm.")
        prefixes += [f"encoder.layers.{i}." for i in range(init_layers)]

        own_state = self.state_dict()
        plan: List[Tuple[str, torch.Tensor, torch.Tensor]] = []
        for prefix in prefixes:
            own_names = [k for k in own_state if k.startswith(prefix)]
            teacher_names = {k for k in teacher_state if k.startswith(prefix)}
            for name in own_names:
                source_name = _teacher_name(name, teacher_state)
                if source_name is None:
                    raise ValueError(
                        f"init_from_teacher: the teacher has no parameter {name} "
                        f"(student shape {tuple(own_state[name].shape)})"
                    )
                teacher_names.discard(source_name)
                src = teacher_state[source_name]
                if tuple(src.shape) != tuple(own_state[name].shape):
                    raise ValueError(
                        f"init_from_teacher: cannot copy {name}: student shape "
                        f"{tuple(own_state[name].shape)} != teacher shape {tuple(src.shape)}: "
                        f"{_init_fix(prefix)}"
                    )
                plan.append((name, own_state[name], src))
            if teacher_names:
                raise ValueError(
                    f"init_from_teacher: the student has no parameter(s) "
                    f"{sorted(teacher_names)} of the teacher (different extractor_mode or "
                    f"layer structure?)"
                )
        with torch.no_grad():
            for _, own, src in plan:
                own.copy_(src.to(dtype=own.dtype, device=own.device))
        return [name for name, _, _ in plan]

    def _proj_matches(self, teacher_state: Mapping[str, torch.Tensor]) -> bool:
        """Whether post_extract_proj can be copied (trivially true if neither has one)."""
        teacher_weight = teacher_state.get("post_extract_proj.weight", None)
        if self.post_extract_proj is None or teacher_weight is None:
            return self.post_extract_proj is None and teacher_weight is None
        return tuple(teacher_weight.shape) == tuple(self.post_extract_proj.weight.shape)

    # model statistics

    @staticmethod
    def count_parameters(model: nn.Module, include_heads: bool = True) -> int:
        """Number of parameters, with or without the distillation heads."""
        return sum(
            p.numel()
            for name, p in model.named_parameters()
            if include_heads or name.split(".", 1)[0] not in HEAD_MODULES
        )

    @staticmethod
    def output_frame_rate(cfg: Any, sample_rate: int = SAMPLE_RATE) -> float:
        """Frames per second at the output (after the time reduction)."""
        cfg = as_thin_hubert_config(cfg)
        return cnn_frame_rate(cfg, sample_rate) / cfg.time_reduction_factor

    @staticmethod
    def macs_breakdown(
        cfg: Any, seconds: float = 10.0, sample_rate: int = SAMPLE_RATE
    ) -> Dict[str, float]:
        """Analytic multiply-accumulates for ``seconds`` of audio, by part (heads excluded).

        Frame counts are continuous (``seconds * rate``, edge effects ignored). Attention
        counts the Q/K/V/out projections (4 D A per frame, A = heads * head size, D for an
        unpruned layer) plus scores and weighted sum (2 T A per frame), so it grows with
        the utterance length; the FFN 2 D F per frame, with each layer's own A and F.
        """
        cfg = as_thin_hubert_config(cfg)
        check_config(cfg)
        D = cfg.encoder_embed_dim
        rate, c_in, cnn = float(sample_rate), 1, 0.0
        for c_out, k, s in zip(cfg.conv_channels, cfg.conv_kernels, cfg.conv_strides):
            rate /= s
            cnn += seconds * rate * c_in * c_out * k
            c_in = c_out
        t_cnn = seconds * rate
        proj = t_cnn * c_in * D if c_in != D else 0.0
        pos_conv = t_cnn * D * (D // cfg.conv_pos_groups) * cfg.conv_pos
        r = cfg.time_reduction_factor
        reduction = (t_cnn / r) * D * D * r if r > 1 else 0.0
        layers = 0.0
        sizes = zip(reuse_pattern(cfg), layer_attention_heads(cfg), layer_ffn_dims(cfg))
        for i, (computes, heads, F_) in enumerate(sizes):
            t = t_cnn / r if r > 1 and i >= cfg.time_reduction_layer else t_cnn
            A = heads * head_size(cfg)
            # a reusing layer has no Q/K projections (the fused kernel recomputes Q K^T)
            projections = 4 * D * A if computes else 2 * D * A
            layers += t * (projections + 2 * t * A + 2 * D * F_)
        return {
            "cnn": cnn,
            "post_extract_proj": proj,
            "pos_conv": pos_conv,
            "time_reduction": reduction,
            "layers": layers,
        }

    @staticmethod
    def macs_per_second(
        cfg: Any, seconds: float = 10.0, sample_rate: int = SAMPLE_RATE
    ) -> float:
        """MACs per second of audio, averaged over an utterance of ``seconds``."""
        return sum(ThinHubertModel.macs_breakdown(cfg, seconds, sample_rate).values()) / seconds

    @classmethod
    def model_summary(cls, cfg: Any) -> Dict[str, Any]:
        """Parameters (built on the meta device: no memory, no weights), MACs, frame rate."""
        cfg = as_thin_hubert_config(cfg)
        with torch.device("meta"):
            model = cls(cfg)
        with_heads = cls.count_parameters(model, include_heads=True)
        without_heads = cls.count_parameters(model, include_heads=False)
        breakdown = cls.macs_breakdown(cfg, seconds=10.0)
        return {
            "params": without_heads,
            "params_with_heads": with_heads,
            "params_heads": with_heads - without_heads,
            "macs_per_10s": sum(breakdown.values()),
            "macs_per_10s_breakdown": breakdown,
            "cnn_frame_rate": cnn_frame_rate(cfg),
            "output_frame_rate": cls.output_frame_rate(cfg),
        }


def cnn_frame_rate(cfg: Any, sample_rate: int = SAMPLE_RATE) -> float:
    """Frames per second after the CNN (50 Hz for HuBERT's)."""
    specs = specs_from_fields(cfg.conv_channels, cfg.conv_kernels, cfg.conv_strides)
    return sample_rate / float(samples_per_frame(specs))


def _is_time_reduced(cfg: ThinHubertConfig, layer_id: int) -> bool:
    # hidden_states[l] is the output of transformer layer index l - 1
    return cfg.time_reduction_factor > 1 and layer_id - 1 >= cfg.time_reduction_layer


def _cfg_get(cfg: Any, key: str, default: Any) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


# weight-norm parameters as named by torch's parametrizations API (newer checkpoints)
_WEIGHT_NORM_ALIASES = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}


def _teacher_name(name: str, teacher_state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The teacher's key for the student parameter ``name`` (None if it has none)."""
    if name in teacher_state:
        return name
    head, _, last = name.rpartition(".")
    if last in _WEIGHT_NORM_ALIASES:
        alias = f"{head}.{_WEIGHT_NORM_ALIASES[last]}"
        if alias in teacher_state:
            return alias
    return None
