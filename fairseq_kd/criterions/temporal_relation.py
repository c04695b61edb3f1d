"""``temporal_gram``: STaRHuBERT's distillation of speech temporal relations (docs/papers.md#starhubert).

The student's raw hidden states (no projection heads: a temporal Gram matrix is T x T whatever the
width) are compared with the teacher's through their temporal Gram matrices (``kd_losses.tgm_loss``):

* layer-wise TGMs, ``G = H H^T`` of hidden state ``l`` (``criterion.gram_layers``, 0 = the projected
  CNN feature), student layer ``l`` against teacher layer ``l``;
* intra-layer TGMs, ``G = H_{l-1} H_l^T`` between the input and the output of transformer layer ``l``
  (``criterion.intra_layers``).

* averaged attention maps (the paper's figure): KL(teacher || student) between the head-averaged
  attention weights of transformer layer ``l`` (``criterion.attention_layers``,
  ``kd_losses.attention_map_loss``); student and teacher may have different head counts. A
  reusing ARMHuBERT-style layer's map is the computing layer's before it. The maps are recomputed
  from what each layer's attention received (``encoders.layers.attention_inputs``), so the fused
  attention kernels of the forward pass stay as they are; fairseq teachers only.

Each list has its per-layer weights; each family is averaged over its layers (the re-implementation
averages its MSE over the layers) and weighted by ``gram_weight`` / ``intra_weight`` /
``attention_weight``.

Memory: every selected layer keeps one B x T x T float32 matrix for the backward pass (the teacher's
are freed at once): 750 x 750 (15 s at 50 Hz) is 2.25 MB per utterance and layer, so the 25 TGMs of
the full STaRHuBERT selection take 56 MB per 15 s utterance, 1.35 GB for a batch of 24. An attention
layer keeps the student's (B, H, T, T) weights for the backward pass: 750 x 750 x 8 heads is 18 MB
per 15 s utterance and layer (216 MB for 12 layers).
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from fairseq_kd.criterions.kd_losses import align_to_teacher, attention_map_loss, tgm_loss
from fairseq_kd.encoders.layers import attention_inputs, computes_attention, head_averaged_attention
from fairseq_kd.teacher import HFTeacher, check_layers

GRAM_NORMALIZE_CHOICES = ChoiceEnum(["frame", "none"])


@dataclass
class TemporalGramConfig(FairseqDataclass):
    encoder_layers: int = field(default=II("model.encoder_layers"), metadata={"help": "the model's"})
    time_reduction_factor: int = field(default=II("model.time_reduction_factor"), metadata={"help": "the model's"})
    gram_layers: List[int] = field(
        default_factory=list,
        metadata={"help": "hidden states with a layer-wise TGM loss (0 = CNN feature, l = layer l); "
                  "student layer l against teacher layer l"},
    )
    gram_layer_weights: List[float] = field(
        default_factory=list, metadata={"help": "one weight per gram_layers entry; empty = 1.0 each"}
    )
    intra_layers: List[int] = field(
        default_factory=list,
        metadata={"help": "transformer layers l with an intra-layer TGM loss (hidden state l-1 x l)"},
    )
    intra_layer_weights: List[float] = field(
        default_factory=list, metadata={"help": "one weight per intra_layers entry; empty = 1.0 each"}
    )
    attention_layers: List[int] = field(
        default_factory=list,
        metadata={"help": "transformer layers l (1..L) with an averaged-attention-map loss, "
                  "KL(teacher || student) of the head-averaged maps; student layer l against teacher layer l"},
    )
    attention_layer_weights: List[float] = field(
        default_factory=list, metadata={"help": "one weight per attention_layers entry; empty = 1.0 each"}
    )
    attention_weight: float = field(default=1.0, metadata={"help": "weight of the attention-map family"})
    gram_weight: float = field(default=1.0, metadata={"help": "weight of the layer-wise TGM family"})
    intra_weight: float = field(default=1.0, metadata={"help": "weight of the intra-layer TGM family"})
    gram_normalize: GRAM_NORMALIZE_CHOICES = field(
        default="frame",
        metadata={"help": "frame: L2-normalise each frame before the Gram product (cosine TGMs, "
                  "width-independent); none: raw products (the re-implementation's)"},
    )


def _weights(weights: Sequence[float], layers: Sequence[int], key: str) -> List[float]:
    weights = [float(w) for w in weights] or [1.0] * len(layers)
    if len(weights) != len(layers):
        raise ValueError(f"criterion.{key}_weights has {len(weights)} entries but criterion.{key} has "
                         f"{len(layers)}: give one weight per layer, or leave it empty for 1.0 each")
    if any(w < 0 for w in weights):
        raise ValueError(f"criterion.{key}_weights must be >= 0, got {weights}")
    return weights


def check_gram_config(cfg: TemporalGramConfig, teacher=None) -> None:
    """Every selected layer must exist in the student (and the teacher); errors name the key."""
    num = int(cfg.encoder_layers)
    if not cfg.gram_layers and not cfg.intra_layers and not cfg.attention_layers:
        raise ValueError("criterion.gram_layers, criterion.intra_layers and criterion.attention_layers are "
                         "all empty: select layers")
    if int(cfg.time_reduction_factor) != 1:
        raise ValueError(f"temporal Gram matrices need student and teacher at the same frame rate, but "
                         f"model.time_reduction_factor={cfg.time_reduction_factor}: set it to 1")
    for key, layers, low in (("gram_layers", cfg.gram_layers, 0), ("intra_layers", cfg.intra_layers, 1),
                             ("attention_layers", cfg.attention_layers, 1)):
        bad = [l for l in layers if not low <= l <= num]
        if bad:
            raise ValueError(f"criterion.{key}: layer(s) {bad} do not exist in the student, which has "
                             f"hidden states {low}..{num} (model.encoder_layers={num})")
        if len(set(layers)) != len(layers):
            raise ValueError(f"criterion.{key} has duplicates: {list(layers)}")
        if teacher is not None:
            check_layers(teacher, list(layers), f"criterion.{key}")
    _weights(cfg.gram_layer_weights, cfg.gram_layers, "gram_layers")
    _weights(cfg.intra_layer_weights, cfg.intra_layers, "intra_layers")
    _weights(cfg.attention_layer_weights, cfg.attention_layers, "attention_layers")
    if cfg.attention_layers and isinstance(teacher, HFTeacher):
        raise ValueError("criterion.attention_layers needs a fairseq teacher checkpoint (its attention "
                         "modules are recomputed); this teacher is a transformers folder: leave it empty")


def attention_source(layers, index: int) -> int:
    """The layer whose weights layer ``index`` (0-based) applies: itself, or for a reusing layer
    the nearest computing layer before it."""
    while index > 0 and not computes_attention(layers[index].self_attn):
        index -= 1
    return index


@register_criterion("temporal_gram", dataclass=TemporalGramConfig)
class TemporalGramCriterion(FairseqCriterion):
    def __init__(self, cfg: TemporalGramConfig, task):
        super().__init__(task)
        self.cfg = cfg
        self.teacher = task.teacher  # a plain object (see layer_distill)
        check_gram_config(cfg, self.teacher)
        self.gram = list(zip(cfg.gram_layers, _weights(cfg.gram_layer_weights, cfg.gram_layers, "gram_layers")))
        self.intra = list(zip(cfg.intra_layers, _weights(cfg.intra_layer_weights, cfg.intra_layers, "intra_layers")))
        self.attention = list(zip(cfg.attention_layers,
                                  _weights(cfg.attention_layer_weights, cfg.attention_layers, "attention_layers")))

    def attention_maps(self, layers, inputs, wanted, grad: bool) -> Dict[int, torch.Tensor]:
        """{transformer layer l: its head-averaged (B, T, T) map} from the recorded attention inputs."""
        maps = {}
        for layer in wanted:
            source = attention_source(layers, layer - 1)
            if source not in inputs:
                raise RuntimeError(f"criterion.attention_layers: layer {source + 1} did not run in this forward "
                                   f"pass (layerdrop?): set model.encoder_layerdrop=0")
            query, mask = inputs[source]
            with torch.set_grad_enabled(grad):
                maps[layer] = head_averaged_attention(layers[source].self_attn, query, mask)
        return maps

    def forward(self, model, sample, reduce: bool = True):
        net_input = sample["net_input"]
        source = net_input["source"]
        padding_mask = net_input.get("padding_mask")
        teacher = self.teacher.to(source.device)
        wanted = [layer for layer, _ in self.attention]
        # attention maps only when asked for (an HF teacher has other module names)
        t_layers = teacher.model.encoder.layers if wanted else []
        s_layers = model.encoder.layers if wanted else []
        with attention_inputs(t_layers) as t_inputs:
            t_states, t_mask = teacher.hidden_states(source.float(), padding_mask)
            t_maps = self.attention_maps(t_layers, t_inputs, wanted, grad=False)
        with attention_inputs(s_layers) as s_inputs:
            student = model(source=source, padding_mask=padding_mask)
        s_maps = self.attention_maps(s_layers, s_inputs, wanted, grad=True)
        s_states = student["hidden_states"]

        aligned: Dict[int, tuple] = {}

        def pair(layer: int):
            # student / teacher hidden state ``layer`` on common frames (widths may differ)
            if layer not in aligned:
                aligned[layer] = align_to_teacher(
                    s_states[layer], t_states[layer], t_mask,
                    student_mask=student["padding_masks"][layer], match_dim=False,
                )
            return aligned[layer]

        total = source.new_zeros((), dtype=torch.float32)
        logging_output: Dict[str, torch.Tensor] = {}
        sample_size: Optional[torch.Tensor] = None
        for family, items, weight in (("gram", self.gram, self.cfg.gram_weight),
                                      ("intra", self.intra, self.cfg.intra_weight),
                                      ("attn", self.attention, self.cfg.attention_weight)):
            if not items:
                continue
            part = source.new_zeros((), dtype=torch.float32)
            for layer, w in items:
                if family == "gram":
                    s, t, valid = pair(layer)
                    terms = tgm_loss(s, s, t, t, valid, str(self.cfg.gram_normalize))
                elif family == "attn":  # the maps on the frames both models have
                    valid = pair(layer)[2]
                    n = valid.size(1)
                    terms = attention_map_loss(s_maps[layer][:, :n, :n], t_maps[layer][:, :n, :n], valid)
                else:
                    s0, t0, v0 = pair(layer - 1)
                    s1, t1, v1 = pair(layer)
                    n = min(s0.size(1), s1.size(1))
                    terms = tgm_loss(s0[:, :n], s1[:, :n], t0[:, :n], t1[:, :n], v0[:, :n] & v1[:, :n],
                                     str(self.cfg.gram_normalize))
                part = part + w * terms["loss"]
                sample_size = terms["frames"] if sample_size is None else sample_size
                logging_output[f"{family}_{layer}"] = terms["loss"].detach().double()
            total = total + weight * part / len(items)
        logging_output.update(loss=total.detach().double(), sample_size=sample_size,
                              nsentences=source.size(0), ntokens=sample_size)
        return total, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        keys = {k for log in logging_outputs for k in log if k == "loss" or k.split("_")[0] in ("gram", "intra", "attn")}
        for key in sorted(keys):
            value = sum(log.get(key, 0) for log in logging_outputs)
            metrics.log_scalar(key, value / max(sample_size, 1), sample_size, round=6)
        metrics.log_scalar("nsentences", sum(log.get("nsentences", 0) for log in logging_outputs))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
