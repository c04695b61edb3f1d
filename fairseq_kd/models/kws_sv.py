# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``kws_sv``: one speech encoder, a keyword-spotting head and a speaker-embedding head.

Multi-task fine-tuning of a distilled student, as in Kerpicci et al. (arXiv 2210.16611,
docs/papers.md#multi-task-kws-and-sv-distillation): the encoder comes from ``model.w2v_path``, a distilled ``thin_hubert``
checkpoint or a fairseq HuBERT / wav2vec 2.0 one (the full-size comparison). It is rebuilt the way
fairseq's ``hubert_ctc`` does (``load_checkpoint_to_cpu`` + ``setup_task`` + ``build_model(...,
from_checkpoint=True)`` + ``remove_pretraining_modules``), which never needs the distillation
teacher. Its config is copied into ``model.w2v_args`` (and by the task into the checkpoint), so a
fine-tuned checkpoint is self-contained, as with fairseq's ``audio_finetuning``.

Heads (each reads a learnable softmax-weighted sum of the encoder's hidden states, SUPERB-style, or
one chosen state: ``kws_layer`` / ``sv_layer``; 0 = the CNN feature after projection, l = layer l):

* keywords: masked mean pooling -> Linear -> ReLU -> dropout -> Linear to the keyword classes;
* speakers: frame Linear -> ReLU -> statistics pooling (masked mean and standard deviation, as the
  x-vector) -> Linear to the embedding. Training classifies the training speakers with an
  additive-margin softmax over cosine similarities (``speaker_cosine``; AM-softmax / AAM in the
  criterion); verification scores are cosine similarities of embeddings.

Which parts of the encoder train: ``freeze_finetune_updates`` (the whole encoder under
``no_grad`` for that many updates; a value above ``max_update`` keeps it frozen, the SUPERB
setting), ``feature_grad_mult`` (0 = CNN frozen, fairseq's fine-tuning default) and
``finetune_top_layers`` (N >= 0: only the top N transformer layers train).

Hidden states of a time-reduced student (FitHuBERT's x2 before layer 1) come at two rates; the
reduced ones are repeated back to the CNN rate (frame j covers CNN frames [j*r, (j+1)*r)) so that
the weighted sum and the padding mask are those of the CNN rate.
"""

import contextlib
import logging
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import MISSING, open_dict

from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import BaseFairseqModel, register_model

from fairseq_kd.encoders.frames import conv_specs, repeat_frames
from fairseq_kd.encoders.layers import fairseq_hidden_states
from fairseq_kd.encoders.pretrained import (
    FAIRSEQ_ENCODERS,
    STUDENT_MODELS,
    apply_model_overrides,
    build_encoder,
    check_channel_masking,
    encoder_state,
    is_fine_tuned,
    read_checkpoint,
    trained_normalize,
)

logger = logging.getLogger(__name__)

ENCODERS = STUDENT_MODELS + FAIRSEQ_ENCODERS


class KwsSvModelError(ValueError):
    """A ``kws_sv`` model setting or encoder checkpoint that cannot be used; says how to fix it."""


@dataclass
class KwsSvModelConfig(FairseqDataclass):
    # encoder
    w2v_path: str = field(
        default=MISSING,
        metadata={
            "help": "the encoder: a distilled thin_hubert checkpoint (fairseq-hydra-train --config-name "
            "thin_deep ...) or a pre-trained fairseq HuBERT / wav2vec 2.0 checkpoint"
        },
    )
    w2v_args: Any = field(
        default=None,
        metadata={"help": "the encoder's config, filled in from w2v_path (makes checkpoints self-contained)"},
    )

    # which parts of the encoder train
    freeze_finetune_updates: int = field(
        default=0,
        metadata={
            "help": "keep the whole encoder frozen (no_grad) for this many updates; larger than "
            "optimization.max_update = a frozen encoder (only the heads and layer weights train)"
        },
    )
    feature_grad_mult: float = field(
        default=0.0, metadata={"help": "multiply the CNN's gradients by this; 0 freezes the CNN"}
    )
    finetune_top_layers: int = field(
        default=-1,
        metadata={
            "help": "-1: fine-tune every transformer layer; N >= 0: only the top N layers (and what "
            "follows them) train, everything below is frozen"
        },
    )

    # encoder regularisation (fairseq's names, written into the encoder's config)
    dropout: float = field(default=0.0, metadata={"help": "dropout in the encoder's transformer"})
    attention_dropout: float = field(default=0.0, metadata={"help": "dropout on the attention weights"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout after the FFN activation"})
    dropout_input: float = field(default=0.0, metadata={"help": "dropout on the projected CNN features"})
    apply_mask: bool = field(default=False, metadata={"help": "mask time steps / channels in training"})
    mask_length: int = field(default=10, metadata={"help": "length of a time mask (frames)"})
    mask_prob: float = field(default=0.5, metadata={"help": "probability of starting a time mask"})
    mask_channel_length: int = field(default=10, metadata={"help": "length of a channel mask"})
    mask_channel_prob: float = field(default=0.0, metadata={"help": "probability of starting a channel mask"})

    # heads
    kws_layer: Optional[int] = field(
        default=None,
        metadata={
            "help": "hidden state the keyword head reads: null = learnable softmax-weighted sum of "
            "all; 0 = CNN feature after projection; l = transformer layer l; -1 = the last"
        },
    )
    sv_layer: Optional[int] = field(
        default=None, metadata={"help": "hidden state the speaker head reads (as kws_layer)"}
    )
    kws_hidden_dim: int = field(
        default=256, metadata={"help": "hidden width of the keyword classifier (0: a single Linear)"}
    )
    sv_hidden_dim: int = field(
        default=512, metadata={"help": "width of the frame layer before statistics pooling"}
    )
    sv_embed_dim: int = field(default=256, metadata={"help": "speaker embedding size"})
    final_dropout: float = field(default=0.1, metadata={"help": "dropout inside the heads"})


# -- the encoder checkpoint --------------------------------------------------------------------------
ENCODER_HELP = (
    "give the distilled student's checkpoint_last.pt / checkpoint_best.pt, or a fairseq HuBERT / "
    "wav2vec 2.0 checkpoint"
)


def read_encoder_checkpoint(path: str):
    """``model.w2v_path``'s encoder config and weights; errors say what to pass instead."""
    key = "model.w2v_path"
    if path in (None, "", "???"):
        raise KwsSvModelError(f"{key} is not set: give a distilled student (or HuBERT / wav2vec 2.0) checkpoint")
    state = read_checkpoint(path, f"{key}={path}", ENCODER_HELP, KwsSvModelError)
    cfg = state["cfg"]
    name = cfg.model.get("_name", None)
    if is_fine_tuned(cfg.model):
        raise KwsSvModelError(
            f"{key}={path} is already a fine-tuned model ({name}): fine-tune from the distilled student "
            f"or the pre-trained checkpoint it came from; evaluate this one with fairseq-kd-eval-kws-sv"
            if name == "kws_sv" else
            f"{key}={path} is already a fine-tuned model ({name}): give the pre-trained checkpoint it was "
            f"fine-tuned from"
        )
    fix = f"the encoder must be one of {', '.join(ENCODERS)} (a distilled student is thin_hubert)"
    return encoder_state(state, f"{key}={path}", KwsSvModelError, ENCODERS, fix)


def encoder_overrides(cfg: KwsSvModelConfig) -> Dict[str, Any]:
    """Fields written into the encoder's model config (only those its dataclass has)."""
    return {
        "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout,
        "dropout_input": cfg.dropout_input,
        "feature_grad_mult": cfg.feature_grad_mult,
        "mask_length": cfg.mask_length,
        "mask_prob": cfg.mask_prob,
        "mask_channel_length": cfg.mask_channel_length,
        "mask_channel_prob": cfg.mask_channel_prob,
        # a weighted sum needs every layer's output at every step
        "encoder_layerdrop": 0.0,
        # fairseq pads T to a multiple of 2 otherwise (an utterance's frames would depend on its batch)
        "required_seq_len_multiple": 1,
    }


# -- heads -------------------------------------------------------------------------------------------
def masked_mean_std(x: torch.Tensor, padding_mask: Optional[torch.Tensor], eps: float = 1e-5):
    """Mean and standard deviation over the valid frames.

    Args:
        x: (B, T, D); padding_mask: (B, T) True = pad, or None
    Returns:
        mean (B, D), std (B, D)
    """
    if padding_mask is None:
        mean = x.mean(1)
        var = x.var(1, unbiased=False)
    else:
        valid = (~padding_mask).unsqueeze(-1).to(x.dtype)
        count = valid.sum(1).clamp(min=1.0)
        mean = (x * valid).sum(1) / count
        var = (((x - mean.unsqueeze(1)) * valid) ** 2).sum(1) / count
    return mean, torch.sqrt(var.clamp(min=eps))


class LayerMix(nn.Module):
    """A learnable softmax-weighted sum of hidden states, or one chosen state."""

    def __init__(self, num_states: int, layer: Optional[int]):
        super().__init__()
        if layer is not None and not -num_states <= layer < num_states:
            raise KwsSvModelError(
                f"layer {layer} does not exist: the encoder has hidden states 0 (CNN feature) to "
                f"{num_states - 1} (last layer); use null for a weighted sum of all"
            )
        self.layer = None if layer is None else layer % num_states
        self.weights = nn.Parameter(torch.zeros(num_states)) if layer is None else None

    def forward(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.weights is None:
            return states[self.layer]
        weights = F.softmax(self.weights, dim=0)
        return torch.einsum("l,lbtd->btd", weights.to(states[0].dtype), torch.stack(list(states)))

    def layer_weights(self) -> Optional[List[float]]:
        return None if self.weights is None else F.softmax(self.weights.detach(), 0).tolist()


class KeywordHead(nn.Module):
    def __init__(self, embed_dim: int, hidden_dim: int, num_classes: int, dropout: float):
        super().__init__()
        if hidden_dim > 0:
            self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
            width = hidden_dim
        else:
            self.mlp = nn.Dropout(dropout)
            width = embed_dim
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        # x: (B, T, D) -> logits (B, K)
        mean, _ = masked_mean_std(x, padding_mask)
        return self.out(self.mlp(mean))


class SpeakerHead(nn.Module):
    """Frame layer -> statistics pooling (mean, std) -> embedding (x-vector style)."""

    def __init__(self, embed_dim: int, hidden_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.frame = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.embedding = nn.Linear(2 * hidden_dim, out_dim)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        # x: (B, T, D) -> embedding (B, E)
        mean, std = masked_mean_std(self.frame(x), padding_mask)
        return self.embedding(torch.cat([mean, std], dim=-1))


# -- the model ---------------------------------------------------------------------------------------
@register_model("kws_sv", dataclass=KwsSvModelConfig)
class KwsSvModel(BaseFairseqModel):
    def __init__(self, cfg: KwsSvModelConfig, encoder: nn.Module, num_keywords: int, num_speakers: int):
        super().__init__()
        self.cfg = cfg
        self.w2v_model = encoder
        self.kind = cfg.w2v_args.model._name
        self.freeze_finetune_updates = cfg.freeze_finetune_updates
        self.feature_grad_mult = cfg.feature_grad_mult
        self.apply_mask = cfg.apply_mask
        self.num_updates = 0
        self.specs = None if self.kind in STUDENT_MODELS else conv_specs(encoder)
        num_layers = len(encoder.encoder.layers)
        num_states = num_layers + 1
        embed_dim = int(cfg.w2v_args.model.encoder_embed_dim)

        self.kws_mix = self.kws_head = None
        if num_keywords > 0:
            self.kws_mix = LayerMix(num_states, cfg.kws_layer)
            self.kws_head = KeywordHead(embed_dim, cfg.kws_hidden_dim, num_keywords, cfg.final_dropout)
        self.sv_mix = self.sv_head = self.speaker_weight = None
        if num_speakers > 0:
            self.sv_mix = LayerMix(num_states, cfg.sv_layer)
            self.sv_head = SpeakerHead(embed_dim, cfg.sv_hidden_dim, cfg.sv_embed_dim, cfg.final_dropout)
            # the training speakers' class centres for the additive-margin softmax (unused to verify)
            self.speaker_weight = nn.Parameter(torch.empty(num_speakers, cfg.sv_embed_dim))
            nn.init.xavier_uniform_(self.speaker_weight)
        self.freeze_lower_layers(cfg.finetune_top_layers)
        for name, p in self.named_parameters():  # for fairseq's composite optimizer (two learning rates)
            p.param_group = "encoder" if name.startswith("w2v_model.") else "heads"

    @classmethod
    def build_model(cls, cfg: KwsSvModelConfig, task):
        normalize = bool(task.cfg.normalize)
        if cfg.w2v_args is None:
            found = read_encoder_checkpoint(cfg.w2v_path)
            w2v_args, weights = found.cfg, found.weights
            if trained_normalize(w2v_args) != normalize:
                was = str(trained_normalize(w2v_args)).lower()
                raise KwsSvModelError(
                    f"task.normalize={str(normalize).lower()} but the encoder {cfg.w2v_path} was trained with "
                    f"normalize={was}: set task.normalize={was}"
                )
            check_channel_masking(cfg, w2v_args.model, KwsSvModelError)
        else:
            weights = None  # the fine-tuned checkpoint's own weights are loaded after the build
            w2v_args = cfg.w2v_args
            if isinstance(w2v_args, Namespace):
                w2v_args = convert_namespace_to_omegaconf(w2v_args)
        apply_model_overrides(w2v_args, encoder_overrides(cfg))
        encoder = build_encoder(w2v_args, weights, f"model.w2v_path={cfg.w2v_path}", KwsSvModelError)
        del weights
        with open_dict(cfg):
            cfg.w2v_args = w2v_args
        if cfg.finetune_top_layers > len(encoder.encoder.layers):
            raise KwsSvModelError(
                f"model.finetune_top_layers={cfg.finetune_top_layers} but the encoder has "
                f"{len(encoder.encoder.layers)} transformer layers"
            )
        return cls(cfg, encoder, len(task.keywords), len(task.speakers))

    # -- which encoder parameters train ---------------------------------------------------------------
    def freeze_lower_layers(self, top: int) -> None:
        """``top`` >= 0: only the top ``top`` transformer layers (and what follows them) train."""
        if top < 0:
            return
        encoder = self.w2v_model.encoder
        first = len(encoder.layers) - top
        self.w2v_model.requires_grad_(False)
        for layer in encoder.layers[first:]:
            layer.requires_grad_(True)
        if top > 0 and encoder.layer_norm_first:  # the final LayerNorm follows the last layer
            encoder.layer_norm.requires_grad_(True)
        reduction = getattr(encoder, "time_reduction", None)
        if reduction is not None and top > 0 and encoder.time_reduction_layer >= first:
            reduction.requires_grad_(True)

    def set_num_updates(self, num_updates):
        super().set_num_updates(num_updates)
        self.num_updates = num_updates

    # -- forward ---------------------------------------------------------------------------------------
    def hidden_states(
        self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None
    ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
        """[CNN feature, layer 1, ..., layer L], each (B, T, D) at the CNN rate, and the (B, T) mask."""
        mask = self.apply_mask and self.training
        if self.kind in STUDENT_MODELS:
            res = self.w2v_model.encode(source, padding_mask=padding_mask, mask=mask)
            states = res["hidden_states"]
            factor = self.w2v_model.cfg.time_reduction_factor
            frames = states[0].size(1)
            reduced = [self.w2v_model.is_time_reduced(l) for l in range(len(states))]
            return [repeat_frames(h, factor, frames) if r else h for h, r in zip(states, reduced)], res["padding_masks"][0]
        return fairseq_hidden_states(
            self.w2v_model, self.specs, source, padding_mask, mask=mask, feature_grad_mult=self.feature_grad_mult
        )

    def forward(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, **kwargs) -> Dict[str, Any]:
        """source: (B, S) waveform, padding_mask: (B, S) True = pad.

        Returns ``kws_logits`` (B, K) and ``sv_embedding`` (B, E) (None for a head the task does not
        train) and the frame ``padding_mask`` (B, T).
        """
        fine_tune = self.freeze_finetune_updates <= self.num_updates
        with torch.no_grad() if not fine_tune else contextlib.ExitStack():
            states, frame_mask = self.hidden_states(source, padding_mask)
        out: Dict[str, Any] = {"kws_logits": None, "sv_embedding": None, "padding_mask": frame_mask}
        if self.kws_head is not None:
            out["kws_logits"] = self.kws_head(self.kws_mix(states), frame_mask)
        if self.sv_head is not None:
            out["sv_embedding"] = self.sv_head(self.sv_mix(states), frame_mask)
        return out

    def speaker_cosine(self, embedding: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B, num_speakers) of embeddings to the training speakers' centres."""
        return F.linear(F.normalize(embedding.float(), dim=-1), F.normalize(self.speaker_weight.float(), dim=-1))
