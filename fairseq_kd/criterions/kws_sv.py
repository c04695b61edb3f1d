# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``kws_sv``: the weighted sum of a keyword cross-entropy and a speaker additive-margin softmax.

``loss = kws_weight * CE(keyword logits) + sv_weight * margin-softmax(speaker cosines)``, each
averaged over the utterances of the batch that carry its label (``-`` labels and, on verification
splits, the speakers unseen in training are left out): a batch of one corpus without speaker
labels (task.data naming several corpora) gives a zero speaker loss, never a NaN. The batch is
the unit fairseq averages over (``sample_size`` 1).

Speaker loss (``sv_loss``) on the cosine ``cos(theta)`` between an embedding and each training
speaker's centre, with scale ``s`` and margin ``m`` on the true speaker only:

* ``am_softmax`` (additive margin, CosFace): ``s * (cos(theta) - m)``;
* ``aam_softmax`` (additive angular margin, ArcFace): ``s * cos(theta + m)``, with ArcFace's
  linear fall-back ``cos(theta) - m * sin(m)`` where ``theta + m`` would pass pi.

Logged: ``kws_loss`` / ``sv_loss`` (per labelled utterance), ``kws_accuracy`` and
``spk_accuracy`` (percent, over the labelled utterances), and during validation the task adds
``eer`` / ``min_dcf`` (and ``joint_error``) from its trials.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

SV_LOSS_CHOICES = ChoiceEnum(["am_softmax", "aam_softmax"])


class KwsSvCriterionError(ValueError):
    """Criterion settings that contradict the task; says how to fix them."""


@dataclass
class KwsSvCriterionConfig(FairseqDataclass):
    kws_weight: float = field(default=1.0, metadata={"help": "weight of the keyword cross-entropy"})
    sv_weight: float = field(default=1.0, metadata={"help": "weight of the speaker margin-softmax loss"})
    sv_loss: SV_LOSS_CHOICES = field(
        default="am_softmax",
        metadata={"help": "am_softmax: s * (cos - m) (CosFace); aam_softmax: s * cos(theta + m) (ArcFace)"},
    )
    margin: float = field(default=0.2, metadata={"help": "additive margin m"})
    scale: float = field(default=30.0, metadata={"help": "scale s of the cosine logits"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the keyword loss"})


# -- pure loss functions -----------------------------------------------------------------------------
def margin_logits(cosine: torch.Tensor, target: torch.Tensor, margin: float, scale: float, kind: str) -> torch.Tensor:
    """Additive-margin logits.

    Args:
        cosine: (B, C) cosine similarities in [-1, 1]
        target: (B,) class index of each row
        kind: "am_softmax" or "aam_softmax"
    Returns:
        (B, C) ``scale * cos`` with the margin applied to each row's target column
    """
    one_hot = F.one_hot(target, cosine.size(1)).to(torch.bool)
    if kind == "am_softmax":
        target_logit = cosine - margin
    elif kind == "aam_softmax":
        cos_m, sin_m = math.cos(margin), math.sin(margin)
        sine = torch.sqrt((1.0 - cosine * cosine).clamp(min=1e-7))
        phi = cosine * cos_m - sine * sin_m  # cos(theta + m)
        # beyond theta = pi - m, cos(theta + m) would rise again: ArcFace's monotonic fall-back
        phi = torch.where(cosine > math.cos(math.pi - margin), phi, cosine - math.sin(math.pi - margin) * margin)
        target_logit = phi
    else:
        raise ValueError(f"unknown margin softmax {kind!r}; use am_softmax or aam_softmax")
    return scale * torch.where(one_hot, target_logit, cosine)


def margin_softmax_loss(
    cosine: torch.Tensor, target: torch.Tensor, margin: float, scale: float, kind: str, reduction: str = "sum"
) -> torch.Tensor:
    """Cross-entropy over additive-margin logits (see :func:`margin_logits`)."""
    return F.cross_entropy(margin_logits(cosine, target, margin, scale, kind), target, reduction=reduction)


def labelled(target: torch.Tensor) -> torch.Tensor:
    """Rows that carry a label (targets are -1 where the utterance has none)."""
    return target >= 0


def check_corpus_weights(task, kws_weight: float, sv_weight: float) -> None:
    """A corpus drawn with ratio 0 (``task.corpus_ratios``) whose labels feed a weighted loss would
    silently leave that loss without data."""
    ratios = getattr(task.cfg, "corpus_ratios", None)
    if ratios is None or not getattr(task, "multi", False):
        return
    for root, ratio in zip(task.roots, ratios):
        kws, sv = task.corpus_labels(root)
        for name, weight, has in (("kws_weight", kws_weight, kws), ("sv_weight", sv_weight, sv)):
            if has and ratio == 0 and weight > 0:
                raise KwsSvCriterionError(
                    f"task.corpus_ratios gives corpus {root} (task.data) ratio 0 but its labels feed "
                    f"criterion.{name}={weight}: give it a ratio > 0, or remove it from task.data"
                )


# -- the criterion -----------------------------------------------------------------------------------
@register_criterion("kws_sv", dataclass=KwsSvCriterionConfig)
class KwsSvCriterion(FairseqCriterion):
    def __init__(self, task, kws_weight, sv_weight, sv_loss, margin, scale, label_smoothing):
        super().__init__(task)
        for name, weight, enabled, other in (("kws_weight", kws_weight, task.cfg.kws, "task.kws=false"),
                                              ("sv_weight", sv_weight, task.cfg.sv, "task.sv=false")):
            if weight < 0:
                raise KwsSvCriterionError(f"criterion.{name}={weight} must be >= 0")
            if enabled and weight == 0:
                raise KwsSvCriterionError(
                    f"criterion.{name}=0 would leave a head untrained; to train one task alone, switch the "
                    f"other off in the task ({other}), which also drops its head and labels"
                )
        check_corpus_weights(task, kws_weight, sv_weight)
        self.kws_weight = kws_weight
        self.sv_weight = sv_weight
        self.sv_loss = str(sv_loss)
        self.margin = margin
        self.scale = scale
        self.label_smoothing = label_smoothing

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        return self.compute(model, net_output, sample)

    def compute(self, model, net_output: Dict[str, Any], sample) -> Tuple[torch.Tensor, int, Dict[str, Any]]:
        """Loss, sample size and logging output from a forward pass already made (the task's
        valid_step keeps the embeddings of the same pass)."""
        batch_size = sample["id"].numel()
        loss = 0.0
        padding_mask = sample["net_input"].get("padding_mask")
        source = sample["net_input"]["source"]
        samples = int((~padding_mask).sum()) if padding_mask is not None else source.numel()
        # ntokens = audio samples, so fairseq's wps reads as samples per second
        log: Dict[str, Any] = {"nsentences": batch_size, "sample_size": 1, "ntokens": samples}

        logits = net_output.get("kws_logits")
        if logits is not None:
            target = sample["target_kw"]
            keep = labelled(target)
            kws_loss = F.cross_entropy(
                logits[keep].float(), target[keep], reduction="sum", label_smoothing=self.label_smoothing
            ) if keep.any() else logits.sum() * 0.0
            loss = loss + self.kws_weight * kws_loss / max(int(keep.sum()), 1)
            log["kws_loss"] = kws_loss.item()
            log["kws_correct"] = int((logits[keep].argmax(-1) == target[keep]).sum())
            log["kws_count"] = int(keep.sum())

        embedding = net_output.get("sv_embedding")
        if embedding is not None:
            target = sample["target_spk"]
            keep = labelled(target)
            if keep.any():
                cosine = model.speaker_cosine(embedding[keep])
                sv_loss = margin_softmax_loss(cosine, target[keep], self.margin, self.scale, self.sv_loss)
                log["spk_correct"] = int((cosine.argmax(-1) == target[keep]).sum())
            else:  # verification splits: speakers unseen in training have no class
                sv_loss = embedding.sum() * 0.0
                log["spk_correct"] = 0
            loss = loss + self.sv_weight * sv_loss / max(int(keep.sum()), 1)
            log["sv_loss"] = sv_loss.item()
            log["spk_count"] = int(keep.sum())

        log["loss"] = float(loss.item()) if torch.is_tensor(loss) else 0.0
        return loss, 1, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key) -> float:  # under DDP the summed logging outputs arrive as tensors
            return float(sum(log.get(key, 0) for log in logging_outputs))

        sample_size = total("sample_size")
        metrics.log_scalar("loss", total("loss") / max(sample_size, 1), sample_size, round=4)
        metrics.log_scalar("nsentences", total("nsentences"))
        for task, count_key, correct_key, accuracy in (("kws", "kws_count", "kws_correct", "kws_accuracy"),
                                                       ("sv", "spk_count", "spk_correct", "spk_accuracy")):
            if not any(count_key in log for log in logging_outputs):
                continue
            count = total(count_key)
            metrics.log_scalar(count_key, count)
            metrics.log_scalar(correct_key, total(correct_key))
            if count == 0:  # e.g. speakers of a verification split: no class, no accuracy
                continue
            metrics.log_scalar(f"{task}_loss", total(f"{task}_loss") / count, count, round=4)
            metrics.log_derived(
                accuracy,
                lambda meters, c=correct_key, n=count_key: round(100.0 * float(meters[c].sum) / float(meters[n].sum), 3)
                if float(meters[n].sum) > 0 else float("nan"),
            )

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
