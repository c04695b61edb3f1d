"""``fairseq-kd-summary``: size, compute and frame rate of a student (or a teacher), before training.

    fairseq-kd-summary thin_deep                      # a preset shipped in fairseq_kd/config
    fairseq-kd-summary my_recipe.yaml model.encoder_layers=6
    fairseq-kd-summary outputs/.../checkpoint_best.pt # a distilled student or a HuBERT/wav2vec 2.0 teacher

Prints parameters with and without the distillation heads, MACs per 10 s of audio and the output
frame rate. Papers count heads inconsistently (REFERENCE.md section 0): both numbers are shown.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


class SummaryError(ValueError):
    pass


def _model_block_of_preset(path: Path) -> DictConfig:
    """The ``model`` group of a preset: its ``defaults: - model: X`` entry, then its own block."""
    cfg = OmegaConf.load(path)
    model = OmegaConf.create()
    for entry in cfg.get("defaults", []) or []:
        if isinstance(entry, (dict, DictConfig)) and "model" in entry:
            model = OmegaConf.merge(model, OmegaConf.load(CONFIG_DIR / "model" / f"{entry['model']}.yaml"))
    if "model" in cfg:
        model = OmegaConf.merge(model, cfg.model)
    elif "_name" in cfg:  # a bare model snippet (config/model/*.yaml)
        model = OmegaConf.merge(model, cfg)
    if "_name" not in model:
        raise SummaryError(f"{path}: no model config found (expected a `model:` block or `defaults: - model: NAME`)")
    return model


def thin_fields_from_fairseq(model_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The thin_hubert fields equivalent to a fairseq HuBERT / wav2vec 2.0 encoder (a teacher)."""
    # fairseq stores the CNN as a python expression ('[(512,10,5)] + [(512,3,2)] * 4 + ...') and
    # evals it itself; no names are available to it here
    conv = eval(str(model_cfg["conv_feature_layers"]), {"__builtins__": {}})  # noqa: S307
    fields = {
        "conv_channels": [c for c, _, _ in conv],
        "conv_kernels": [k for _, k, _ in conv],
        "conv_strides": [s for _, _, s in conv],
    }
    for key in ("extractor_mode", "conv_bias", "encoder_layers", "encoder_embed_dim",
                "encoder_ffn_embed_dim", "encoder_attention_heads", "layer_norm_first",
                "conv_pos", "conv_pos_groups"):
        if key in model_cfg and model_cfg[key] is not None:
            fields[key] = model_cfg[key]
    return fields


def model_fields(target: str, overrides: List[str]) -> Dict[str, Any]:
    """thin_hubert fields for a preset name, a yaml file or a checkpoint, with ``model.x=y`` overrides."""
    path = Path(target)
    if path.suffix == ".pt":
        if not path.is_file():
            raise SummaryError(f"checkpoint {path} does not exist")
        from fairseq import checkpoint_utils

        state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
        model_cfg = OmegaConf.to_container(state["cfg"]["model"], resolve=False)
        name = model_cfg.get("_name")
        if name in ("hubert", "wav2vec2"):
            fields = thin_fields_from_fairseq(model_cfg)
        elif name == "thin_hubert":
            fields = model_cfg
        else:
            raise SummaryError(f"{path}: model `{name}` is neither a thin_hubert student nor a HuBERT/wav2vec 2.0 teacher")
    else:
        if not path.is_file():
            path = CONFIG_DIR / f"{target}.yaml"
        if not path.is_file():
            presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise SummaryError(f"{target}: not a file, a checkpoint, or a preset ({', '.join(presets)})")
        fields = OmegaConf.to_container(_model_block_of_preset(path), resolve=False)
    bad = [o for o in overrides if not o.startswith("model.") or "=" not in o]
    if bad:
        raise SummaryError(f"overrides {bad}: expected model.KEY=VALUE")
    if overrides:
        fields.update(OmegaConf.to_container(OmegaConf.from_dotlist(overrides).model))
    fields.pop("_name", None)
    return fields


def format_summary(name: str, summary: Dict[str, Any]) -> str:
    lines = [
        f"{name}",
        f"  parameters without heads : {summary['params'] / 1e6:8.2f} M  ({summary['params']:,})",
        f"  parameters with heads    : {summary['params_with_heads'] / 1e6:8.2f} M  (heads {summary['params_heads'] / 1e6:.2f} M)",
        f"  MACs per 10 s of audio   : {summary['macs_per_10s'] / 1e9:8.2f} G",
        f"  output frame rate        : {summary['output_frame_rate']:8.2f} Hz (CNN {summary['cnn_frame_rate']:.0f} Hz)",
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fairseq-kd-summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="preset name, yaml config or .pt checkpoint")
    parser.add_argument("overrides", nargs="*", help="model.KEY=VALUE overrides")
    args = parser.parse_args(argv)
    from fairseq_kd.models.thin_hubert import ThinHubertModel

    try:
        fields = model_fields(args.target, args.overrides)
        summary = ThinHubertModel.model_summary(fields)
    except (SummaryError, ValueError, TypeError) as error:
        print(f"fairseq-kd-summary: error: {error}", file=sys.stderr)
        return 2
    print(format_summary(os.path.basename(args.target), summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
