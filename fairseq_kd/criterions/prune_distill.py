"""``prune_distill``: DPHuBERT's stage 1, layer-to-layer distillation while learning what to prune.

The student is a full copy of the teacher (``model.init_teacher_cnn`` / ``init_teacher_pos_conv``
on, ``init_teacher_layers`` = every layer). This criterion holds the HardConcrete masks
(``models/pruning.py``) over the CNN channels (every conv layer but the last: its channels feed a
LayerNorm over channels, which cannot be pruned exactly), the attention heads and the FFN units,
plus the two Lagrange multipliers, as its own parameters: fairseq's ``Trainer`` optimises the
model's and the criterion's parameters together and writes the criterion's ``state_dict`` into
every checkpoint, so the masks train, resume and reach ``fairseq-kd-materialise`` without any
change to fairseq. The masks are attached to the student (forward hooks) at the first forward.

Loss = the layer-to-layer loss (``layer_distill``) + ``lambda1 (s_hat - s) + lambda2 (s_hat - s)^2``
(CoFi / DPHuBERT), where ``s_hat`` is the expected sparsity of the masked student (its expected
``model_size`` against the full copy's) and ``s`` the target, a linear ramp from 0 to
``target_sparsity`` over ``sparsity_warmup_updates`` (the task passes the update number). The
multipliers are trained by gradient ascent (``pruning.ascent_parameter``). fairseq divides the
gradients by ``sample_size`` (frames) while the Lagrangian is a per-batch term, so it enters the
summed loss multiplied by ``sample_size``: per frame, the loss is DPHuBERT's ``distill + reg``.

Learning rates: DPHuBERT trains the masks and multipliers at ``reg_lr`` 0.02, 100 x the model's.
Every parameter here carries fairseq's ``param_group`` attribute (``mask_param_group``), so
``optimizer=composite`` gives them their own optimizer, lr and schedule (``config/dphubert.yaml``);
a plain optimizer trains them at the model's lr.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from fairseq import metrics
from fairseq.criterions import register_criterion
from omegaconf import II

from fairseq_kd.criterions.layer_distill import (
    COS_TYPE_CHOICES,
    LAYER_REDUCTION_CHOICES,
    LayerDistillConfig,
    LayerDistillCriterion,
)
from fairseq_kd.models.pruning import (
    HardConcrete,
    MaskLike,
    PruningError,
    ascent_parameter,
    attach_student_masks,
    expected_sparsity,
    expected_student_params,
    lagrangian_term,
    model_size,
    target_sparsity,
)
from fairseq_kd.models.thin_hubert import ThinHubertModel, layer_attention_heads, layer_ffn_dims

# per-forward statistics, averaged (not summed) over the logging outputs of an update
PRUNE_STATS = ("expected_params", "expected_sparsity", "target_sparsity", "lambda1", "lambda2")


@dataclass
class PruneDistillConfig(LayerDistillConfig):
    # DPHuBERT's loss (pyf98/DPHuBERT lightning.py DistillLoss): L1 + raw cosine, averaged
    layer_reduction: LAYER_REDUCTION_CHOICES = field(
        default="mean", metadata={"help": "DPHuBERT averages its loss over the distilled layers"}
    )
    cos_type: COS_TYPE_CHOICES = field(default="raw", metadata={"help": "raw: 1 - cos (DPHuBERT); logsig: DistilHuBERT's"})
    # the sparsity constraint
    target_sparsity: float = field(
        default=0.75,
        metadata={"help": "final target sparsity s in (0, 1): the student is driven to an expected "
                  "(1 - s) x the full copy's size (model_size: no mask_emb, no heads); DPHuBERT: 0.75"},
    )
    sparsity_warmup_updates: int = field(
        default=5000,
        metadata={"help": "the target rises linearly from 0 to target_sparsity over this many updates "
                  "(DPHuBERT: 5000), then stays; 0 = the final target from the first update"},
    )
    prune_conv: bool = field(
        default=True, metadata={"help": "mask the output channels of every CNN layer but the last"}
    )
    prune_heads: bool = field(default=True, metadata={"help": "mask the attention heads of every layer"})
    prune_ffn: bool = field(default=True, metadata={"help": "mask the FFN intermediate units of every layer"})
    mask_param_group: str = field(
        default="pruning",
        metadata={"help": "fairseq param_group of the masks and multipliers: with optimizer=composite, "
                  "the group of this name gives them their own lr (DPHuBERT's reg_lr 0.02); the model's "
                  "parameters are in 'default'"},
    )
    # the student's shape (the model's; not to be set here)
    encoder_layers: int = field(default=II("model.encoder_layers"), metadata={"help": "the model's"})
    encoder_embed_dim: int = field(default=II("model.encoder_embed_dim"), metadata={"help": "the model's"})
    encoder_attention_heads: int = field(
        default=II("model.encoder_attention_heads"), metadata={"help": "the model's"}
    )
    encoder_ffn_embed_dim: int = field(default=II("model.encoder_ffn_embed_dim"), metadata={"help": "the model's"})
    encoder_attention_heads_per_layer: Optional[List[int]] = field(
        default=II("model.encoder_attention_heads_per_layer"), metadata={"help": "the model's"}
    )
    encoder_ffn_embed_dim_per_layer: Optional[List[int]] = field(
        default=II("model.encoder_ffn_embed_dim_per_layer"), metadata={"help": "the model's"}
    )
    init_teacher_cnn: bool = field(default=II("model.init_teacher_cnn"), metadata={"help": "the model's"})
    init_teacher_pos_conv: bool = field(default=II("model.init_teacher_pos_conv"), metadata={"help": "the model's"})
    init_teacher_layers: int = field(default=II("model.init_teacher_layers"), metadata={"help": "the model's"})


class PruningMasks(nn.Module):
    """The stage-1 masks of a thin_hubert student: ``conv`` (one per CNN layer but the last),
    ``heads`` and ``units`` (one per transformer layer); an empty list = not pruned."""

    def __init__(self, conv_channels: Sequence[int], heads: Sequence[int], units: Sequence[int]) -> None:
        super().__init__()
        self.conv = nn.ModuleList(HardConcrete(int(n)) for n in conv_channels)
        self.heads = nn.ModuleList(HardConcrete(int(n)) for n in heads)
        self.units = nn.ModuleList(HardConcrete(int(n)) for n in units)
        self.num_conv_layers = 0  # set by for_student

    @classmethod
    def for_student(cls, fields, conv: bool = True, heads: bool = True, ffn: bool = True) -> "PruningMasks":
        """Masks for a thin_hubert config (``cfg.model``, or this criterion's config)."""
        channels = [int(c) for c in fields.conv_channels]
        masks = cls(channels[:-1] if conv else [], layer_attention_heads(fields) if heads else [],
                    layer_ffn_dims(fields) if ffn else [])
        masks.num_conv_layers = len(channels)
        return masks

    def per_layer(self, fn: Callable[[HardConcrete], MaskLike] = lambda m: m):
        """``(conv, heads, units)``, each mask through ``fn``, in the form ``attach_student_masks``,
        ``expected_student_params`` and ``materialise_student`` take (None = not pruned)."""
        conv = [fn(m) for m in self.conv] + [None] * (self.num_conv_layers - len(self.conv))
        return conv, ([fn(m) for m in self.heads] or None), ([fn(m) for m in self.units] or None)

    def hooks(self):
        """Per-forward masks: a sample in training, ``eval_mask`` in eval mode."""
        return self.per_layer(lambda m: (lambda: m() if m.training else eval_mask(m)))

    def eval_values(self):
        """The eval masks as tensors: what ``materialise_student`` folds into the weights."""
        return self.per_layer(eval_mask)


def eval_mask(mask: HardConcrete) -> torch.Tensor:
    """DPHuBERT's deterministic mask, except that it never removes every unit: a thin_hubert layer
    needs >= 1 head, FFN unit and CNN channel, so a fully pruned mask keeps its most probable unit at
    its (tiny) soft value. Validation and materialisation both use it, so they agree exactly."""
    values = mask.deterministic()
    if not bool((values != 0).any()):
        log_alpha = mask.log_alpha.detach().float()
        best = int(torch.argmax(log_alpha))
        values[best] = torch.sigmoid(log_alpha[best] / mask.beta * 0.8).clamp(min=1e-6)
    return values


def check_prune_config(cfg: PruneDistillConfig) -> None:
    """Settings that cannot prune, named before the first step."""
    if not 0.0 < float(cfg.target_sparsity) < 1.0:
        raise PruningError(
            f"criterion.target_sparsity={cfg.target_sparsity} must be in (0, 1): the fraction of the "
            "full copy's parameters to remove (DPHuBERT: 0.75)"
        )
    if int(cfg.sparsity_warmup_updates) < 0:
        raise PruningError(f"criterion.sparsity_warmup_updates must be >= 0, got {cfg.sparsity_warmup_updates}")
    if not (cfg.prune_conv or cfg.prune_heads or cfg.prune_ffn):
        raise PruningError("criterion.prune_conv, prune_heads and prune_ffn are all false: nothing to prune")
    layers = int(cfg.encoder_layers)
    if not (cfg.init_teacher_cnn and cfg.init_teacher_pos_conv and int(cfg.init_teacher_layers) == layers):
        raise PruningError(
            "structured pruning starts from a full copy of the teacher (DPHuBERT), but model.init_teacher_cnn="
            f"{cfg.init_teacher_cnn}, init_teacher_pos_conv={cfg.init_teacher_pos_conv}, init_teacher_layers="
            f"{cfg.init_teacher_layers} (of {layers}): set model.init_teacher_cnn=true "
            f"model.init_teacher_pos_conv=true model.init_teacher_layers={layers}"
        )


def check_against_teacher(cfg: PruneDistillConfig, teacher) -> None:
    """The student prunes the teacher's own units: it must have the teacher's layers and widths."""
    expected = {"encoder_layers": teacher.num_layers, "encoder_embed_dim": teacher.embed_dim}
    teacher_model = getattr(getattr(teacher, "cfg", None), "model", None)
    if teacher_model is not None:
        for key in ("encoder_attention_heads", "encoder_ffn_embed_dim"):
            if teacher_model.get(key, None) is not None:
                expected[key] = int(teacher_model[key])
    for key, value in expected.items():
        if int(getattr(cfg, key)) != int(value):
            raise PruningError(
                f"model.{key}={getattr(cfg, key)} but the teacher {teacher.path} has {value}: pruning "
                f"removes the teacher's own units from a full copy, so the student must have the teacher's "
                f"shape: set model.{key}={value}"
            )
    for key in ("encoder_attention_heads_per_layer", "encoder_ffn_embed_dim_per_layer"):
        if getattr(cfg, key) is not None:
            raise PruningError(f"model.{key} is set: stage 1 starts from the teacher's full, uniform shape; "
                               f"leave it null")


def unwrap(model: nn.Module) -> nn.Module:
    """The thin_hubert under fairseq's DDP / proxy wrappers (hooks go on its own modules)."""
    # not hasattr(model, "encoder"): fairseq's ModuleProxyWrapper forwards attribute lookups
    while not isinstance(model, ThinHubertModel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


@register_criterion("prune_distill", dataclass=PruneDistillConfig)
class PruneDistillCriterion(LayerDistillCriterion):
    def __init__(self, cfg: PruneDistillConfig, task):
        check_prune_config(cfg)
        super().__init__(cfg, task)
        check_against_teacher(cfg, self.teacher)
        self.masks = PruningMasks.for_student(cfg, cfg.prune_conv, cfg.prune_heads, cfg.prune_ffn)
        self.lambda1 = ascent_parameter()
        self.lambda2 = ascent_parameter()
        for p in self.parameters():
            p.param_group = cfg.mask_param_group  # fairseq's composite optimizer reads this
        self.num_updates = 0
        self._student: Optional[nn.Module] = None  # plain attribute: not a child module
        self._full_size = 0

    def set_num_updates(self, num_updates: int) -> None:
        """Called by ``distill_hubert``'s ``train_step`` before every update (the target ramp)."""
        self.num_updates = int(num_updates)

    def attach(self, model: nn.Module) -> nn.Module:
        student = unwrap(model)
        if self._student is not student:
            self.__dict__["_student"] = student  # bypass nn.Module registration
            self._full_size = model_size(student)
            attach_student_masks(student, *self.masks.hooks())
        return student

    def forward(self, model, sample, reduce: bool = True):
        student = self.attach(model)
        loss, sample_size, logging_output = super().forward(model, sample, reduce)
        expected = expected_student_params(student, *self.masks.per_layer())
        s_hat = expected_sparsity(expected, self._full_size)
        s_target = target_sparsity(self.num_updates, float(self.cfg.target_sparsity),
                                   int(self.cfg.sparsity_warmup_updates))
        reg = lagrangian_term(s_hat, s_target, self.lambda1.float(), self.lambda2.float())
        # fairseq divides the gradients by sample_size: a per-batch term enters multiplied by it
        reg_sum = reg * sample_size
        loss = loss + reg_sum.to(loss.dtype)
        logging_output.update(
            loss=loss.detach().double(),
            loss_reg=reg_sum.detach().double(),
            prune_n=1,
            expected_params=expected.detach().double(),
            expected_sparsity=s_hat.detach().double(),
            target_sparsity=s_target,
            lambda1=self.lambda1.detach().double(),
            lambda2=self.lambda2.detach().double(),
        )
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        LayerDistillCriterion.reduce_metrics(logging_outputs)  # loss, loss_reg and the per-layer parts
        count = sum(log.get("prune_n", 0) for log in logging_outputs)
        if count:
            for key in PRUNE_STATS:
                value = sum(log.get(key, 0) for log in logging_outputs) / count
                metrics.log_scalar(key, value, round=0 if key == "expected_params" else 4)


def stage1_masks(criterion_cfg, model_cfg, criterion_state: Dict[str, torch.Tensor]) -> PruningMasks:
    """The trained masks of a stage-1 checkpoint (its ``cfg.criterion``, ``cfg.model`` and
    ``criterion`` state), ready for ``pruning.materialise_student``."""
    masks = PruningMasks.for_student(
        model_cfg, bool(criterion_cfg.get("prune_conv", True)), bool(criterion_cfg.get("prune_heads", True)),
        bool(criterion_cfg.get("prune_ffn", True)),
    )
    state = {k[len("masks."):]: v for k, v in criterion_state.items() if k.startswith("masks.")}
    masks.load_state_dict(state, strict=True)
    return masks.eval()
