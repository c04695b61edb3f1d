"""``fairseq-kd-materialise``: a stage-1 pruning checkpoint as the smaller dense student it stands for.

    fairseq-kd-materialise runs/dphubert/checkpoint_last.pt runs/dphubert/pruned.pt

STAGE1_CKPT is a checkpoint of ``criterion=prune_distill`` (``--config-name dphubert``): the full-size
student with its HardConcrete masks in the criterion's state. The masks' deterministic eval values
are folded into the weights and the masked CNN channels, heads and FFN units removed
(``pruning.materialise_student``); the result, equal to the masked model in eval mode to float
tolerance, is written as an ordinary distillation checkpoint (fairseq's format, as the trainer
writes it) of a ``thin_hubert`` whose ``cfg.model`` has the per-layer widths and
``pruning_materialised``, with ``criterion=layer_distill`` and no optimizer state: stage 2
(``--config-name dphubert_final task.init_student=OUT.pt``), fine-tuning, export and the s3prl
upstream read it like any other student. The sizes before and after are printed (``model_size``,
DPHuBERT's convention: no mask_emb, no distillation heads). OUT is not overwritten without ``--force``.
"""

import argparse
import os
from enum import Enum
from typing import Any, Dict, List, Optional

from fairseq_kd.cli.errors import clean_errors

PRUNE_CRITERION = "prune_distill"


class MaterialiseError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fairseq-kd-materialise", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("stage1", help="stage-1 checkpoint of criterion=prune_distill (e.g. checkpoint_last.pt)")
    p.add_argument("output", help="materialised student checkpoint to write (.pt)")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    return p


def read_stage1(path: str) -> Dict[str, Any]:
    """The checkpoint (the project's checked reader), checked to hold a thin_hubert student and
    prune_distill's masks."""
    from fairseq_kd.encoders.pretrained import read_checkpoint

    state = read_checkpoint(path, path, "give a stage-1 checkpoint of criterion=prune_distill", MaterialiseError)
    cfg = state["cfg"]
    model_name = cfg.model.get("_name")
    if model_name != "thin_hubert":
        raise MaterialiseError(f"{path} does not hold a thin_hubert student (model {model_name!r}): give a "
                               "stage-1 checkpoint of criterion=prune_distill")
    if cfg.model.get("pruning_materialised", False):
        raise MaterialiseError(f"{path} is already materialised (model.pruning_materialised): start stage 2 "
                               f"from it with task.init_student={path}")
    criterion_name = cfg.criterion.get("_name")
    masks = [k for k in (state.get("criterion") or {}) if k.endswith(".log_alpha")]
    if criterion_name != PRUNE_CRITERION or not masks:
        raise MaterialiseError(
            f"{path} holds no pruning masks (criterion {criterion_name!r}, {len(masks)} HardConcrete masks in "
            "its criterion state): only a stage-1 checkpoint of criterion=prune_distill (fairseq-hydra-train "
            "--config-name dphubert) can be materialised"
        )
    target = cfg.criterion.get("target_sparsity")
    if target is None or not 0.0 < float(target) < 1.0:
        raise MaterialiseError(f"{path}: criterion.target_sparsity={target} must be in (0, 1); the checkpoint "
                               "was not written by a valid prune_distill run")
    return state


def layer_distill_cfg(criterion_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Stage 1's loss as an ordinary ``layer_distill`` config (the pruning fields dropped)."""
    from dataclasses import fields

    from fairseq_kd.criterions.layer_distill import LayerDistillConfig

    keep = {f.name for f in fields(LayerDistillConfig)}
    return {**{k: v for k, v in criterion_cfg.items() if k in keep}, "_name": "layer_distill"}


def materialised_state(stage1: Dict[str, Any], fields: Dict[str, Any], weights: Dict[str, Any]) -> Dict[str, Any]:
    """The layout of ``Trainer.state_dict``: the new model and loss, a fresh training state."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(stage1["cfg"], resolve=True, enum_to_str=True)
    # enum choices as their strings, as the trainer writes them (fairseq's enums do not pickle)
    cfg["model"] = {"_name": "thin_hubert", **{k: getattr(v, "value", v) if isinstance(v, Enum) else v
                                                for k, v in fields.items()}}
    cfg["criterion"] = layer_distill_cfg(cfg["criterion"])
    history = stage1.get("optimizer_history") or [{}]
    return {
        "args": None,
        "cfg": cfg,
        "model": weights,
        "criterion": None,
        "optimizer_history": [{
            "criterion_name": "LayerDistillCriterion",
            "optimizer_name": history[-1].get("optimizer_name"),
            "lr_scheduler_state": {"best": None},
            "num_updates": 0,  # stage 2 is a new run
        }],
        "task_state": stage1.get("task_state") or {},
        "extra_state": {"metrics": {}, "previous_training_time": 0.0,
                        "train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "shuffle": True},
                        "val_loss": None},
        "last_optimizer_state": None,
    }


def materialise_checkpoint(stage1_path: str, out_path: str, force: bool = False) -> Dict[str, float]:
    """Write the materialised student of ``stage1_path`` to ``out_path``; returns the sizes."""
    import torch
    from fairseq import checkpoint_utils
    from fairseq.models import build_model

    import fairseq_kd  # noqa: F401  (registers thin_hubert and the criterions)
    from fairseq_kd.criterions.prune_distill import stage1_masks
    from fairseq_kd.models.pruning import expected_student_params, materialise_student, model_size
    from fairseq_kd.models.thin_hubert import ThinHubertConfig, ThinHubertModel

    if os.path.exists(out_path) and not force:
        raise MaterialiseError(f"{out_path} exists: pass --force to overwrite it")
    stage1 = read_stage1(stage1_path)
    cfg = stage1["cfg"]
    model = build_model(cfg.model, task=None)
    model.load_state_dict(stage1["model"], strict=True, model_cfg=cfg.model)
    masks = stage1_masks(cfg.criterion, cfg.model, stage1["criterion"])
    with torch.no_grad():
        expected = float(expected_student_params(model, *masks.per_layer()))
    fields, weights = materialise_student(model, *masks.eval_values())
    with torch.device("meta"):
        after = model_size(ThinHubertModel(ThinHubertConfig(**fields)))
    before = model_size(model)
    checkpoint_utils.torch_persistent_save(materialised_state(stage1, fields, weights), out_path)
    return {"before": before, "after": after, "expected": expected,
            "target_sparsity": float(cfg.criterion.target_sparsity), "sparsity": 1.0 - after / before,
            "heads": fields["encoder_attention_heads_per_layer"], "ffn": fields["encoder_ffn_embed_dim_per_layer"],
            "conv": fields["conv_channels"]}


def describe(sizes: Dict[str, Any], out_path: str) -> List[str]:
    return [
        f"size before: {sizes['before']:,} parameters ({sizes['before'] / 1e6:.2f} M, no mask_emb, no heads)",
        f"size after:  {sizes['after']:,} parameters ({sizes['after'] / 1e6:.2f} M): sparsity "
        f"{sizes['sparsity']:.4f} (target {sizes['target_sparsity']}; the masks' expected size was "
        f"{sizes['expected']:,.0f}: the eval masks round each mask's expected kept count)",
        f"CNN channels {sizes['conv']}",
        f"heads per layer {sizes['heads']}",
        f"FFN units per layer {sizes['ffn']}",
        f"wrote {out_path}; stage 2: fairseq-hydra-train --config-name dphubert_final task.init_student={out_path} ...",
    ]


@clean_errors
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = materialise_checkpoint(args.stage1, args.output, force=args.force)
    print("\n".join(describe(sizes, args.output)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
