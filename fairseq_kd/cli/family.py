"""``fairseq-kd-family``: a constant-budget student family (Deep versus Wide), one config per depth.

    fairseq-kd-family --teacher hubert_base --depths 3 6 12 --out runs/family
    fairseq-kd-family --teacher hubert_base_ls960.pt --budget 10.7e6 --depths 3 12 --method l2l
    fairseq-hydra-train --config-dir runs/family --config-name family_12l_384_l2l \
        task.data=manifests task.teacher_path=hubert_base_ls960.pt

For every depth: the width (a multiple of the head count and of the positional convolution's groups)
and FFN ratio whose transformer layers come closest to the budget (default: the paper's 21.3 M, the
transformer layers of 3-L One and 12-L Half), the KD method (Pred: prediction heads for 3 teacher
layers; L2L: every student layer to a teacher layer, spread evenly; auto: Pred up to 3 layers),
parameters and MACs. With --out it writes ``<name>.yaml`` + ``model/<name>.yaml`` per student (the
DistilHuBERT recipe, as the paper's students) and ``family.json``.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import yaml

from fairseq_kd.analysis.family import (
    DEFAULT_FFN_RATIOS, DEFAULT_TOLERANCE, HUBERT_BASE, PAPER_BUDGET, FamilyError, criterion_block,
    solve_family, student_fields,
)
from fairseq_kd.cli.errors import clean_errors, report as report_error
from fairseq_kd.cli.logs import add_verbose_argument, configure
from fairseq_kd.presets import PresetError, model_fields, model_preset

BASE_PRESET = "deep_12l_half_l2l"  # dropouts, CNN initialisation etc. of the Deep-versus-Wide students
HEADER = "# @package _group_\n"


def teacher_fields(target: str):
    if target == "hubert_base":
        return dict(HUBERT_BASE)
    return model_fields(target)


def write_member(out: Path, member, fields, criterion) -> Path:
    (out / "model").mkdir(parents=True, exist_ok=True)
    note = (f"# {member.depth} x {member.width} (FFN {member.ffn}, {member.heads} heads), {member.method.upper()}: "
            f"a member of a constant-budget family written by fairseq-kd-family (docs/papers.md#deep-versus-wide)\n")
    (out / "model" / f"{member.name}.yaml").write_text(
        HEADER + note + yaml.safe_dump({"_name": "thin_hubert", **fields}, sort_keys=False, default_flow_style=None))
    preset = {"defaults": [{"recipe": "distilhubert"}, {"model": member.name}], "criterion": criterion}
    path = out / f"{member.name}.yaml"
    path.write_text(HEADER + note + yaml.safe_dump(preset, sort_keys=False, default_flow_style=None))
    return path


@clean_errors
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fairseq-kd-family", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--teacher", default="hubert_base",
                        help="hubert_base, a HuBERT / wav2vec 2.0 checkpoint, or a thin_hubert preset/yaml")
    parser.add_argument("--depths", type=int, nargs="+", required=True, help="layer counts, e.g. 3 6 12")
    parser.add_argument("--budget", type=float, default=PAPER_BUDGET, help="transformer parameters (default 21.3e6)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default: the teacher's)")
    parser.add_argument("--ffn-ratios", type=float, nargs="+", default=list(DEFAULT_FFN_RATIOS))
    parser.add_argument("--method", choices=["auto", "pred", "l2l"], default="auto")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest relative distance to the budget (default 0.05)")
    parser.add_argument("--out", help="folder for the configs (--config-dir of fairseq-hydra-train)")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    configure(args.verbose)
    from fairseq_kd.models.thin_hubert import ThinHubertModel

    try:
        teacher = teacher_fields(args.teacher)
        heads = args.heads or int(teacher["encoder_attention_heads"])
        members = solve_family(args.depths, args.budget, heads=heads, conv_pos_groups=int(teacher.get("conv_pos_groups", 16)),
                               ffn_ratios=args.ffn_ratios, tolerance=args.tolerance, method=args.method)
        base = model_preset(BASE_PRESET)
        rows = []
        for member in members:
            fields = student_fields(member, teacher, base)
            summary = ThinHubertModel.model_summary(fields)
            rows.append((member, fields, summary))
    except (FamilyError, PresetError, ValueError) as error:
        return report_error(error, "fairseq-kd-family")
    print(f"budget {args.budget / 1e6:.2f} M transformer parameters; teacher {args.teacher} "
          f"({teacher['encoder_layers']} x {teacher['encoder_embed_dim']})")
    print("| student | layers x width | FFN | heads | KD | transformer (M) | vs budget | params (M) | with heads (M) | GMACs / 10 s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    report = []
    for member, fields, summary in rows:
        print(f"| {member.name} | {member.depth} x {member.width} | {member.ffn} ({member.ffn_ratio:g}x) | {member.heads} | "
              f"{member.method.upper()} | {member.transformer_params / 1e6:.2f} | {member.relative_error:+.1%} | "
              f"{summary['params'] / 1e6:.2f} | {summary['params_with_heads'] / 1e6:.2f} | {summary['macs_per_10s'] / 1e9:.2f} |")
        report.append({**member.as_dict(), "params": summary["params"], "params_with_heads": summary["params_with_heads"],
                       "macs_per_10s": summary["macs_per_10s"], "model": fields,
                       "criterion": criterion_block(member, int(teacher["encoder_layers"]))})
    if args.out:
        out = Path(args.out)
        for member, fields, _ in rows:
            write_member(out, member, fields, criterion_block(member, int(teacher["encoder_layers"])))
        (out / "family.json").write_text(json.dumps({"budget": args.budget, "teacher": args.teacher, "members": report}, indent=1))
        print(f"wrote {len(rows)} configs to {out}: fairseq-hydra-train --config-dir {out} --config-name "
              f"{rows[0][0].name} task.data=... task.teacher_path=...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
