"""Knowledge-distillation criterions: thin fairseq wrappers around ``kd_losses``.

One implementation, three registered names with the papers' defaults:

* ``layer_distill``: generic layer-to-layer distillation. Any student output (a hint head on any
  student layer, 0 = the projected CNN feature, or a prediction head) against any teacher layer or
  the mean of several; per-output weights; L1, L2, cosine and log-sigmoid cosine terms.
* ``distilhubert_loss``: L1 + log-sigmoid cosine (lambda = 1), averaged over the predicted layers.
* ``fithubert_hint``: MSE hints, weight 0.1 on every layer but the last (1.0), summed.

Which student outputs exist is decided by the model (``model.hint_layer_ids``, ``model.pred_layer_ids``);
which teacher layer(s) each one learns from, and with which weight, is decided here. The mapping
reads in one direction: the config (the criterion's ``hint_layer_ids`` / ``pred_layer_ids`` are
interpolated from the model's, as fairseq wires ``task.normalize`` into its models) -> ``build_targets``
in ``build_criterion``, checked against the task's teacher before the first step -> the loss, which
pairs each target with the model output of the same key.
"""


from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from fairseq_kd.criterions.kd_losses import (
    align_to_teacher,
    hint_weights,
    layer_loss,
    masking_distill_loss,
    mean_of_layers,
)
from fairseq_kd.encoders.frames import conv_output_lengths, specs_from_fields
from fairseq_kd.teacher import check_layers

COS_TYPE_CHOICES = ChoiceEnum(["logsig", "raw"])
LAYER_REDUCTION_CHOICES = ChoiceEnum(["sum", "mean"])
PART_PREFIXES = ("loss", "l1", "l2", "cos", "masked", "unmasked")


@dataclass
class LayerDistillConfig(FairseqDataclass):
    # the student's distillation outputs (from the model config; not to be set here)
    hint_layer_ids: List[int] = field(
        default=II("model.hint_layer_ids"), metadata={"help": "the student layers with a hint head (model's)"}
    )
    pred_layer_ids: List[int] = field(
        default=II("model.pred_layer_ids"), metadata={"help": "the teacher layers the student predicts (model's)"}
    )
    # layer mapping
    hint_targets: List[str] = field(
        default_factory=list,
        metadata={
            "help": "teacher target of each model.hint_layer_ids entry, in order: a layer id ('4') or "
            "'+'-joined ids whose mean is the target ('9+10+11+12'); empty = the student layer's own id"
        },
    )
    layer_weights: List[float] = field(
        default_factory=list,
        metadata={
            "help": "weight of each distilled output: hints (model.hint_layer_ids order) then predictions "
            "(model.pred_layer_ids order); empty = 1.0 each, or FitHuBERT's 0.1/1.0 with hint_weight"
        },
    )
    hint_weight: Optional[float] = field(
        default=None,
        metadata={"help": "if set and layer_weights is empty: this weight on every output but the last (1.0)"},
    )
    layer_reduction: LAYER_REDUCTION_CHOICES = field(
        default="sum", metadata={"help": "sum the weighted per-layer losses, or average them"}
    )
    # loss terms
    l1_weight: float = field(default=1.0, metadata={"help": "weight of the L1 term"})
    l2_weight: float = field(default=0.0, metadata={"help": "weight of the L2 (MSE) term"})
    cos_weight: float = field(default=1.0, metadata={"help": "weight of the cosine term"})
    cos_type: COS_TYPE_CHOICES = field(
        default="logsig",
        metadata={"help": "logsig: -log sigmoid(cos) (DistilHuBERT); raw: 1 - cos (DPHuBERT)"},
    )
    # masking distillation (ARMHuBERT / MaskHuBERT, docs/papers.md#armhubert-and-maskhubert)
    masking_distill: bool = field(
        default=False,
        metadata={
            "help": "in training, mask the student's input (model.mask_prob, model.mask_length, "
            "model.mask_selection) and run the teacher twice, unmasked and masked at the same frames "
            "with its own mask embedding: masked student frames learn the unmasked teacher, unmasked "
            "frames the masked teacher (L1 / MSE terms only); validation is unmasked"
        },
    )
    mask_prob: float = field(default=II("model.mask_prob"), metadata={"help": "the model's mask_prob"})
    mask_length: int = field(default=II("model.mask_length"), metadata={"help": "the model's mask_length"})
    mask_selection: str = field(default=II("model.mask_selection"), metadata={"help": "the model's"})
    time_reduction_factor: int = field(default=II("model.time_reduction_factor"), metadata={"help": "the model's"})
    conv_channels: List[int] = field(default=II("model.conv_channels"), metadata={"help": "the model's"})
    conv_kernels: List[int] = field(default=II("model.conv_kernels"), metadata={"help": "the model's"})
    conv_strides: List[int] = field(default=II("model.conv_strides"), metadata={"help": "the model's"})


@dataclass
class DistilHubertLossConfig(LayerDistillConfig):
    layer_reduction: LAYER_REDUCTION_CHOICES = field(
        default="mean", metadata={"help": "DistilHuBERT averages its loss over the predicted layers"}
    )


@dataclass
class FitHubertHintConfig(LayerDistillConfig):
    hint_weight: Optional[float] = field(
        default=0.1, metadata={"help": "FitHuBERT: 0.1 on layers 1-11, 1.0 on the last"}
    )
    l1_weight: float = field(default=0.0, metadata={"help": "weight of the L1 term"})
    l2_weight: float = field(default=1.0, metadata={"help": "weight of the L2 (MSE) term"})
    cos_weight: float = field(default=0.0, metadata={"help": "weight of the cosine term"})


class DistillTarget(NamedTuple):
    name: str  # log name: h<student layer> for hints, p<teacher layer> for predictions
    kind: str  # "hints" or "preds"
    key: int  # key into the model's output dict of that kind
    teacher_layers: List[int]
    weight: float


def parse_teacher_layers(spec: str, key: str) -> List[int]:
    try:
        layers = [int(part) for part in str(spec).split("+")]
    except ValueError:
        raise ValueError(
            f"{key}: {spec!r} is not a layer id or '+'-joined layer ids: write a teacher layer id "
            "('4') or the layers whose mean is the target ('9+10+11+12')"
        ) from None
    return layers


def build_targets(cfg: LayerDistillConfig) -> List[DistillTarget]:
    """Pair every student output (``cfg.hint_layer_ids``, ``cfg.pred_layer_ids``) with its teacher
    layer(s) and weight."""
    hint_layers = list(cfg.hint_layer_ids)
    pred_layers = list(cfg.pred_layer_ids)
    if not hint_layers and not pred_layers:
        raise ValueError(
            "the student has no distillation outputs: set model.hint_layer_ids and/or model.pred_layer_ids"
        )
    hint_specs = list(cfg.hint_targets) or [str(layer) for layer in hint_layers]
    if len(hint_specs) != len(hint_layers):
        raise ValueError(
            f"criterion.hint_targets has {len(hint_specs)} entries but model.hint_layer_ids has "
            f"{len(hint_layers)}: give one teacher target per hint layer"
        )
    count = len(hint_layers) + len(pred_layers)
    weights = list(cfg.layer_weights)
    if not weights:
        weights = [1.0] * count if cfg.hint_weight is None else hint_weights(count, cfg.hint_weight)
    if len(weights) != count:
        raise ValueError(
            f"criterion.layer_weights has {len(weights)} entries but the student makes {count} "
            f"distillation outputs ({len(hint_layers)} hints + {len(pred_layers)} predictions): give "
            "one weight per output (model.hint_layer_ids order, then model.pred_layer_ids), or leave "
            "it empty for 1.0 each"
        )
    targets = [
        DistillTarget(f"h{layer}", "hints", layer, parse_teacher_layers(spec, f"criterion.hint_targets[{i}]"), w)
        for i, (layer, spec, w) in enumerate(zip(hint_layers, hint_specs, weights))
    ]
    targets += [
        DistillTarget(f"p{layer}", "preds", layer, [layer], w)
        for layer, w in zip(pred_layers, weights[len(hint_layers):])
    ]
    return targets


def check_targets(targets: Sequence[DistillTarget], cfg: LayerDistillConfig, teacher) -> None:
    """Every target's teacher layers must exist in ``teacher``; the error names the config key."""
    for target in targets:
        if target.kind == "preds":
            key = "model.pred_layer_ids"
        elif cfg.hint_targets:
            key = "criterion.hint_targets"
        else:  # the mapping came from the student's own layer ids
            key = (
                "model.hint_layer_ids (criterion.hint_targets is empty, so each hint learns from "
                "the teacher layer with the same id; set criterion.hint_targets to map them)"
            )
        check_layers(teacher, target.teacher_layers, key)


def check_masking(cfg: LayerDistillConfig, task) -> None:
    """Masking distillation settings that cannot work, named before the first step."""
    if cfg.cos_weight > 0:
        raise ValueError(
            f"criterion.masking_distill uses L1 / MSE terms only (ARMHuBERT's), but "
            f"criterion.cos_weight={cfg.cos_weight}: set it to 0"
        )
    if cfg.pred_layer_ids:
        raise ValueError("criterion.masking_distill works on hint heads (model.hint_layer_ids), not on "
                         "model.pred_layer_ids")
    if int(cfg.time_reduction_factor) != 1:
        raise ValueError(
            f"criterion.masking_distill needs the student's outputs at the teacher's frame rate, but "
            f"model.time_reduction_factor={cfg.time_reduction_factor}: set it to 1"
        )
    if not 0.0 < float(cfg.mask_prob) < 1.0:
        raise ValueError(
            f"model.mask_prob={cfg.mask_prob} with criterion.masking_distill: 0 masks no frame (the "
            "masked term is empty) and 1 or more masks every frame (the unmasked term is empty); "
            "use a value in (0, 1), e.g. ARMHuBERT's 0.8"
        )
    if int(cfg.mask_length) < 1:
        raise ValueError(f"model.mask_length must be >= 1, got {cfg.mask_length}")
    shortest = int(getattr(task.cfg, "min_sample_size", 0) or 0)
    specs = specs_from_fields(cfg.conv_channels, cfg.conv_kernels, cfg.conv_strides)
    frames = int(conv_output_lengths([shortest], specs)[0]) if shortest > 0 else 0
    # fairseq's spans are up to 2 x mask_length long with mask_selection=uniform
    span = int(cfg.mask_length) * (2 if str(cfg.mask_selection) == "uniform" else 1)
    if frames <= span:
        raise ValueError(
            f"task.min_sample_size={shortest} admits utterances of {frames} frames, but model.mask_length="
            f"{cfg.mask_length} (mask_selection={cfg.mask_selection}) makes spans of up to {span} frames, "
            f"which mask every frame or none of such an utterance: raise task.min_sample_size above "
            f"{span} frames or lower model.mask_length"
        )


def teacher_target(states: Sequence[torch.Tensor], layers: List[int]) -> torch.Tensor:
    return states[layers[0]] if len(layers) == 1 else mean_of_layers([states[i] for i in layers])


def student_output(student: Dict[str, Dict[int, torch.Tensor]], target: DistillTarget) -> torch.Tensor:
    try:
        return student[target.kind][target.key]
    except KeyError:
        raise ValueError(
            f"the student has no output {target.name}: the criterion was configured for hints "
            f"{sorted(student.get('hints', {}))} / predictions {sorted(student.get('preds', {}))} other "
            "than the model makes; leave criterion.hint_layer_ids / pred_layer_ids to their defaults "
            "(the model's)"
        ) from None


@register_criterion("layer_distill", dataclass=LayerDistillConfig)
class LayerDistillCriterion(FairseqCriterion):
    def __init__(self, cfg: LayerDistillConfig, task):
        super().__init__(task)
        self.cfg = cfg
        self.targets = build_targets(cfg)
        # the task's teacher (loaded now if the task has not yet: a bad one fails before any step);
        # a plain object, so it never enters the criterion's state_dict
        self.teacher = task.teacher
        check_targets(self.targets, cfg, self.teacher)
        if cfg.masking_distill:
            check_masking(cfg, task)

    def masked_forward(self, model, source, padding_mask, teacher_states, teacher_mask):
        """Masking distillation (training): the loss terms of every target, and the student's outputs."""
        student = model(source=source, padding_mask=padding_mask, mask=True)
        mask_indices = student["mask_indices"]  # (B, T) at the CNN rate, the teacher's rate
        if mask_indices is None or mask_indices.shape[1] != teacher_states[0].shape[1]:
            raise ValueError(
                "criterion.masking_distill: the student's CNN frames "
                f"({None if mask_indices is None else mask_indices.shape[1]}) differ from the teacher's "
                f"({teacher_states[0].shape[1]}); both CNNs must have the same frames"
            )
        masked_states, _ = self.teacher.masked_hidden_states(source.float(), padding_mask, mask_indices)
        results = []
        for target in self.targets:
            prediction = student_output(student, target)
            s, t, valid = align_to_teacher(
                prediction, teacher_target(teacher_states, target.teacher_layers), teacher_mask
            )
            t_masked = teacher_target(masked_states, target.teacher_layers)[:, : s.size(1)]
            terms = masking_distill_loss(
                s, t, t_masked, valid, mask_indices[:, : s.size(1)],
                l1=self.cfg.l1_weight, l2=self.cfg.l2_weight,
            )
            terms["cos_sim"] = layer_loss(s.detach(), t, valid, l2=1.0)["cos_sim"]
            results.append(terms)
        return student, results

    def forward(self, model, sample, reduce: bool = True):
        net_input = sample["net_input"]
        source = net_input["source"]
        padding_mask = net_input.get("padding_mask")

        teacher = self.teacher.to(source.device)  # moved once; a no-op afterwards
        teacher_states, teacher_mask = teacher.hidden_states(source.float(), padding_mask)
        masked_terms = None
        if self.cfg.masking_distill and model.training:
            student, masked_terms = self.masked_forward(model, source, padding_mask, teacher_states, teacher_mask)
        else:
            student = model(source=source, padding_mask=padding_mask)

        # Logged values and sample_size stay 0-dim tensors on the batch's device (float64, as the
        # Python floats they replace): a float()/int() here would make the host wait for the GPU
        # before the backward is queued, ~4 times per distilled layer. fairseq's trainer and
        # metrics accept tensors and read them after the update.
        total = source.new_zeros((), dtype=torch.float32)
        logging_output: Dict[str, torch.Tensor] = {}
        sample_size = None
        for i, target in enumerate(self.targets):
            if masked_terms is not None:
                terms = masked_terms[i]
            else:
                prediction = student_output(student, target)
                s, t, valid = align_to_teacher(
                    prediction, teacher_target(teacher_states, target.teacher_layers), teacher_mask
                )
                terms = layer_loss(
                    s, t, valid, l1=self.cfg.l1_weight, l2=self.cfg.l2_weight,
                    cos=self.cfg.cos_weight, cos_type=str(self.cfg.cos_type),
                )
            total = total + target.weight * terms["loss"]
            frames = terms["frames"]
            sample_size = frames if sample_size is None else sample_size
            # normalise every layer's sums to the first layer's frame count (they differ by trimming)
            scale = sample_size.double() / frames.clamp(min=1).double()
            for term in ("loss", "l1", "l2", "cos", "cos_sim", "masked", "unmasked"):
                if term in terms:
                    logging_output[f"{term}_{target.name}"] = terms[term].detach().double() * scale
        if self.cfg.layer_reduction == "mean":
            total = total / len(self.targets)

        logging_output.update(
            loss=total.detach().double(),
            sample_size=sample_size,
            nsentences=source.size(0),
            ntokens=sample_size,
        )
        return total, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        metrics.log_scalar("loss", sum(log.get("loss", 0) for log in logging_outputs) / max(sample_size, 1), sample_size, round=4)
        metrics.log_scalar("nsentences", sum(log.get("nsentences", 0) for log in logging_outputs))
        # per-output parts: loss_h4, l1_p8, l2_h12, cos_h3, cos_sim_p4 (cosine similarity to the teacher)
        keys = {k for log in logging_outputs for k in log if "_" in k and k.split("_")[0] in PART_PREFIXES}
        for key in sorted(keys):
            value = sum(log.get(key, 0) for log in logging_outputs)
            metrics.log_scalar(key, value / max(sample_size, 1), sample_size, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


@register_criterion("distilhubert_loss", dataclass=DistilHubertLossConfig)
class DistilHubertLossCriterion(LayerDistillCriterion):
    pass


@register_criterion("fithubert_hint", dataclass=FitHubertHintConfig)
class FitHubertHintCriterion(LayerDistillCriterion):
    pass


@dataclass
class MaskedHintConfig(FitHubertHintConfig):
    masking_distill: bool = field(
        default=True, metadata={"help": "ARMHuBERT / MaskHuBERT: masking distillation on (see layer_distill)"}
    )


@register_criterion("masked_hint", dataclass=MaskedHintConfig)
class MaskedHintCriterion(LayerDistillCriterion):
    """ARMHuBERT / MaskHuBERT: FitHuBERT's hint weights (0.1 / 1.0, MSE) with masking distillation."""
