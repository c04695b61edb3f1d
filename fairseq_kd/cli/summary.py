"""``fairseq-kd-summary``: size, compute and frame rate of a student (or a teacher), before training.

    fairseq-kd-summary thin_deep                      # a preset shipped in fairseq_kd/config
    fairseq-kd-summary my_recipe.yaml model.encoder_layers=6
    fairseq-kd-summary outputs/.../checkpoint_best.pt # a distilled student or a HuBERT/wav2vec 2.0 teacher

Prints parameters with and without the distillation heads, MACs per 10 s of audio and the output
frame rate. Papers count heads inconsistently (docs/parameter_counts.md#counting-heads): both numbers are shown.
"""

import argparse
import os
import sys
from typing import Any, Dict, List, Optional

from omegaconf.errors import OmegaConfBaseException

from fairseq_kd.presets import PresetError, model_fields
from fairseq_kd.cli.errors import clean_errors, report
from fairseq_kd.cli.logs import add_verbose_argument, configure


def format_summary(name: str, summary: Dict[str, Any]) -> str:
    lines = [
        f"{name}",
        f"  parameters without heads : {summary['params'] / 1e6:8.2f} M  ({summary['params']:,})",
        f"  parameters with heads    : {summary['params_with_heads'] / 1e6:8.2f} M  (heads {summary['params_heads'] / 1e6:.2f} M)",
        f"  MACs per 10 s of audio   : {summary['macs_per_10s'] / 1e9:8.2f} G",
        f"  output frame rate        : {summary['output_frame_rate']:8.2f} Hz (CNN {summary['cnn_frame_rate']:.0f} Hz)",
    ]
    return "\n".join(lines)


@clean_errors
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fairseq-kd-summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="preset name, yaml config or .pt checkpoint")
    parser.add_argument("overrides", nargs="*", help="model.KEY=VALUE overrides")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    configure(args.verbose)
    from fairseq_kd.models.thin_hubert import ThinHubertModel

    try:
        fields = model_fields(args.target, args.overrides)
        summary = ThinHubertModel.model_summary(fields)
    except (PresetError, ValueError, TypeError, OmegaConfBaseException) as error:  # incl. refused checkpoints
        return report(error, "fairseq-kd-summary")
    print(format_summary(os.path.basename(args.target), summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
