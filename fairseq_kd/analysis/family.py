"""Constant-budget student families: the Deep-versus-Wide study (docs/papers.md#deep-versus-wide).

Ashihara et al. compare students whose *transformer* parameters are equal (3 x 768 and 12 x 384
both hold ~21.3 M; the 4.2 M HuBERT CNN and the positional convolution are kept as they are), and
distil each either with DistilHuBERT's prediction heads (**Pred**) or layer to layer (**L2L**).

:func:`solve_family` picks, for every depth, the width (a multiple of the head count and of the
positional convolution's groups) and the FFN ratio whose transformer layers come closest to the
budget; :func:`student_fields` turns a member into ``thin_hubert`` fields and a criterion block.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Sequence

# The paper's budget: the transformer layers of 3-L One (3 x 7.09 M) and 12-L Half (12 x 1.77 M)
PAPER_BUDGET = 21.3e6
DEFAULT_FFN_RATIOS = (3.0, 3.5, 4.0)
DEFAULT_TOLERANCE = 0.05
PRED_TARGETS = 3  # DistilHuBERT predicts 3 teacher layers (4/8/12 of 12)
# auto method: the paper's shallow-wide student is Pred (3-L One-Pred), its deep one L2L (12-L Half-L2L);
# where the switch lies is our choice [inferred]
PRED_MAX_DEPTH = 3

HUBERT_BASE = {  # fairseq's hubert_base_ls960.pt as thin_hubert fields (docs/papers.md#distilhubert-architecture)
    "conv_channels": [512] * 7, "conv_kernels": [10, 3, 3, 3, 3, 2, 2], "conv_strides": [5, 2, 2, 2, 2, 2, 2],
    "extractor_mode": "default", "conv_bias": False, "encoder_layers": 12, "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12, "layer_norm_first": False,
    "conv_pos": 128, "conv_pos_groups": 16,
}


class FamilyError(ValueError):
    """A budget, depth list or teacher the family solver cannot use; the message says why."""


def transformer_layer_params(width: int, ffn: int) -> int:
    """Parameters of one fairseq ``TransformerSentenceEncoderLayer`` (post- or pre-LN):
    Q/K/V/out projections 4 (D^2 + D), FFN D*F + F + F*D + D, two LayerNorms 4 D."""
    return 4 * width * width + 2 * width * ffn + 9 * width + ffn


@dataclass(frozen=True)
class Member:
    depth: int
    width: int
    ffn: int
    heads: int
    method: str  # "pred" or "l2l"
    transformer_params: int
    budget: float

    @property
    def ffn_ratio(self) -> float:
        return self.ffn / self.width

    @property
    def relative_error(self) -> float:
        return (self.transformer_params - self.budget) / self.budget

    @property
    def name(self) -> str:
        return f"family_{self.depth}l_{self.width}_{self.method}"

    def as_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out.update(name=self.name, ffn_ratio=self.ffn_ratio, relative_error=self.relative_error)
        return out


def check_depths(depths: Sequence[Any]) -> List[int]:
    bad = [d for d in depths if isinstance(d, bool) or not isinstance(d, int) or d <= 0]
    if bad or not depths:
        raise FamilyError(
            f"depths must be a non-empty list of positive layer counts, got {list(depths)}"
            + (f" (bad: {bad})" if bad else "")
        )
    if len(set(depths)) != len(depths):
        raise FamilyError(f"depths has duplicates: {list(depths)}")
    return list(depths)


def width_step(heads: int, conv_pos_groups: int) -> int:
    """Widths must divide into the attention heads and the positional convolution's groups."""
    return heads * conv_pos_groups // math.gcd(heads, conv_pos_groups)


def choose_method(method: str, depth: int) -> str:
    if method == "auto":
        return "pred" if depth <= PRED_MAX_DEPTH else "l2l"
    if method not in ("pred", "l2l"):
        raise FamilyError(f"method must be auto, pred or l2l, got {method!r}")
    return method


def solve_member(
    depth: int, budget: float, *, heads: int = 12, conv_pos_groups: int = 16,
    ffn_ratios: Sequence[float] = DEFAULT_FFN_RATIOS, tolerance: float = DEFAULT_TOLERANCE,
    max_width: int = 4096, method: str = "auto",
) -> Member:
    """The width and FFN ratio whose ``depth`` layers come closest to ``budget`` parameters
    (ties: the FFN ratio nearest 4, the paper's, then the narrower width)."""
    step = width_step(heads, conv_pos_groups)
    best = None
    for width in range(step, max_width + 1, step):
        for ratio in ffn_ratios:
            ffn = int(round(ratio * width))
            params = depth * transformer_layer_params(width, ffn)
            key = (abs(params - budget), abs(ratio - 4.0), width)
            if best is None or key < best[0]:
                best = (key, width, ffn, params)
    _, width, ffn, params = best
    member = Member(depth, width, ffn, heads, choose_method(method, depth), params, float(budget))
    if abs(member.relative_error) > tolerance:
        smallest = depth * transformer_layer_params(step, int(round(min(ffn_ratios) * step)))
        why = (
            f"even the narrowest width ({step}, the least common multiple of {heads} heads and "
            f"{conv_pos_groups} positional-conv groups) needs {smallest:,} parameters"
            if smallest > budget else
            f"the closest is {depth} x {width} (FFN {ffn}) with {params:,} parameters, "
            f"{member.relative_error:+.1%} off"
        )
        raise FamilyError(
            f"a budget of {budget:,.0f} transformer parameters cannot be met by a {depth}-layer student "
            f"within {tolerance:.0%}: {why}; change the budget, the depths, --heads or --tolerance"
        )
    return member


def solve_family(depths: Sequence[int], budget: float = PAPER_BUDGET, **kwargs) -> List[Member]:
    """One :class:`Member` per depth; :class:`FamilyError` if the budget or a depth is unusable."""
    depths = check_depths(depths)
    if not budget or budget <= 0:
        raise FamilyError(f"the budget must be a positive number of parameters, got {budget}")
    errors, members = [], []
    for depth in depths:
        try:
            members.append(solve_member(depth, budget, **kwargs))
        except FamilyError as error:
            errors.append(str(error))
    if errors:
        lead = "no depth can meet the budget" if not members else "some depths cannot meet the budget"
        raise FamilyError(f"{lead}:\n  " + "\n  ".join(errors))
    return members


def spread_layers(count: int, teacher_layers: int) -> List[int]:
    """``count`` teacher layers spread evenly over 1..teacher_layers, the last one included
    (12 of 12: 1..12; 3 of 12: 4, 8, 12; 8 of 12: 2, 3, 5, 6, 8, 9, 11, 12)."""
    return [max(1, min(teacher_layers, math.floor(i * teacher_layers / count + 0.5))) for i in range(1, count + 1)]


def student_fields(member: Member, teacher: Mapping[str, Any], base: Mapping[str, Any]) -> Dict[str, Any]:
    """thin_hubert fields of a family member: ``base`` (a Deep-versus-Wide model preset), the
    teacher's CNN and positional convolution, the member's shape and its distillation outputs."""
    fields = dict(base)
    fields.pop("_name", None)
    for key in ("conv_channels", "conv_kernels", "conv_strides", "extractor_mode", "conv_bias",
                "conv_pos", "conv_pos_groups"):
        if key in teacher:
            fields[key] = teacher[key]
    t_layers, t_width = int(teacher["encoder_layers"]), int(teacher["encoder_embed_dim"])
    fields.update(
        encoder_layers=member.depth, encoder_embed_dim=member.width, encoder_ffn_embed_dim=member.ffn,
        encoder_attention_heads=member.heads, teacher_embed_dim=t_width, init_teacher_cnn=True,
    )
    same_layer = (member.width == t_width and member.ffn == int(teacher["encoder_ffn_embed_dim"])
                  and member.heads == int(teacher["encoder_attention_heads"]))
    # DistilHuBERT copies the teacher's pos_conv and first layers: possible only at the teacher's shape
    fields["init_teacher_pos_conv"] = member.width == t_width
    fields["init_teacher_layers"] = min(member.depth, t_layers) if same_layer else 0
    if member.method == "pred":
        fields.update(pred_layer_ids=spread_layers(min(PRED_TARGETS, t_layers), t_layers), hint_layer_ids=[])
    else:
        fields.update(pred_layer_ids=[], hint_layer_ids=list(range(1, member.depth + 1)), hint_head_type="linear")
    return fields


def criterion_block(member: Member, teacher_layers: int) -> Dict[str, Any]:
    """DistilHuBERT's L1 + log-sigmoid cosine, averaged over the outputs (both methods)."""
    targets = [] if member.method == "pred" else [str(t) for t in spread_layers(member.depth, teacher_layers)]
    return {
        "_name": "distilhubert_loss" if member.method == "pred" else "layer_distill",
        "hint_targets": targets, "layer_weights": [], "hint_weight": None, "layer_reduction": "mean",
        "l1_weight": 1.0, "l2_weight": 0.0, "cos_weight": 1.0, "cos_type": "logsig",
    }


__all__ = [
    "DEFAULT_FFN_RATIOS", "DEFAULT_TOLERANCE", "FamilyError", "HUBERT_BASE", "Member", "PAPER_BUDGET",
    "check_depths", "criterion_block", "solve_family", "solve_member", "spread_layers", "student_fields",
    "transformer_layer_params", "width_step",
]
