"""``fairseq-kd-export CHECKPOINT OUT_DIR --format hf``: a student as a transformers ``HubertModel`` folder.

A student fits when ``HubertConfig`` can express it: no time reduction, one width / FFN size / head
count for every layer, fairseq's wav2vec 2.0 modules and nothing else (distilhubert,
deep_12l_half_l2l, wide_3l_one_pred and any other such student). Its encoder weights are renamed
(``encoders/hf.py``, the mapping the parity test checks against transformers' own fairseq
conversion), loaded strictly, and the ``HubertModel``'s outputs are compared with the student's
before anything is written; the folder is then reloaded with ``transformers.AutoModel`` and compared
again. Anything else is refused with the reason and the standalone export to use instead.

The folder holds ``config.json``, ``model.safetensors``, ``preprocessor_config.json``
(``do_normalize`` = the student's ``task.normalize``, ``sampling_rate``) and ``fairseq_kd_export.json``
(where it came from, the parity figures). Index convention: transformers' own, i.e.
``hidden_states[0]`` is the first transformer layer's input (after the positional convolution and,
for post-LN students, the encoder LayerNorm) rather than this project's projection output, and for
pre-LN students ``hidden_states[-1]`` is taken before the final LayerNorm (``last_hidden_state``
after it, equal to the student's last layer). The distillation heads are not exported.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import torch

from fairseq_kd.encoders.hf import fairseq_to_hf_state_dict, hubert_config_kwargs, require_transformers
from fairseq_kd.export.checkpoints import ExportInputError, LoadedStudent

STANDALONE_HINT = (
    "use the standalone export instead, which takes any student: fairseq-kd-export CHECKPOINT "
    "student.pt2 (a torch.export program; add --onnx student.onnx for ONNX)"
)
TOLERANCE = 1e-4  # max abs difference accepted between the student and the HubertModel


def _refuse(path: str, why: str) -> ExportInputError:
    return ExportInputError(f"{path} cannot be written as a transformers HubertModel: {why}; {STANDALONE_HINT}")


def build_hubert(loaded: LoadedStudent):
    """The ``HubertModel`` holding the student's weights, or ExportInputError saying why not."""
    cfg, model, path = loaded.model_cfg, loaded.model, loaded.path
    factor = int(cfg.get("time_reduction_factor", 1) or 1)
    if factor > 1:
        raise _refuse(
            path,
            f"the student reduces time (model.time_reduction_factor={factor} before layer "
            f"{cfg.get('time_reduction_layer')}) and HubertModel has no time-reduction layer",
        )
    reuse = [str(p) for p in (cfg.get("reuse_pattern") or [])]
    if any(p.lower() == "false" for p in reuse):  # a layer without its own attention map
        raise _refuse(
            path,
            f"the student reuses attention maps across layers (model.reuse_pattern={reuse}); every "
            f"HubertModel layer computes its own",
        )
    try:
        kwargs = hubert_config_kwargs(cfg, model.conv_specs)
    except (ValueError, KeyError) as error:
        raise _refuse(path, str(error)) from None
    transformers = require_transformers("fairseq-kd-export --format hf")
    hubert = transformers.HubertModel(transformers.HubertConfig(**kwargs)).eval()

    state = {k: v for k, v in model.state_dict().items() if k != "mask_emb"}  # masked training only
    hf_state = hubert.state_dict()
    weights, unmapped, unfilled = fairseq_to_hf_state_dict(state, list(hf_state), kwargs["feat_extract_norm"])
    if unmapped:
        raise _refuse(
            path,
            f"{len(unmapped)} student tensors have no HubertModel counterpart (e.g. {sorted(unmapped)[:3]}): "
            f"attention reuse or another module HubertConfig cannot express",
        )
    if unfilled:
        raise _refuse(path, f"the student lacks {len(unfilled)} HubertModel tensors (e.g. {unfilled[:3]})")
    shapes = [f"{k}: student {tuple(v.shape)} vs HubertConfig {tuple(hf_state[k].shape)}"
              for k, v in weights.items() if tuple(v.shape) != tuple(hf_state[k].shape)]
    if shapes:
        raise _refuse(
            path,
            f"{len(shapes)} tensors differ in shape from one HubertConfig for all layers (per-layer "
            f"widths, e.g. a pruned student): {shapes[:3]}",
        )
    hubert.load_state_dict(weights, strict=True)
    return hubert


def parity_inputs() -> List[torch.Tensor]:
    """Unpadded inputs (transformers' own forward is not padding-exact for group-norm CNNs): two
    1.5 s rows, one 0.05 s row."""
    gen = torch.Generator().manual_seed(11)
    return [torch.randn(2, 24000, generator=gen), torch.randn(1, 800, generator=gen)]


def student_in_hf_convention(model: Any, source: torch.Tensor) -> Dict[str, Any]:
    """The student's hidden states as transformers numbers them (module docstring)."""
    res = model.encode(source)
    states = res["hidden_states"]
    enc = model.encoder
    first = states[0] + enc.pos_conv(states[0].transpose(1, 2)).transpose(1, 2)
    if not enc.layer_norm_first:
        first = enc.layer_norm(first)
    return {"hidden_states": [first] + states[1:], "last": states[-1], "pre_ln": bool(enc.layer_norm_first)}


def max_difference(student: Any, hubert: Any, inputs: List[torch.Tensor]) -> float:
    """Max abs difference of every hidden state (transformers' convention) and the last output."""
    worst = 0.0
    with torch.no_grad():
        for source in inputs:
            mine = student_in_hf_convention(student, source)
            out = hubert(source, output_hidden_states=True)
            theirs = list(out.hidden_states)
            if len(theirs) != len(mine["hidden_states"]):
                return float("inf")
            compared = range(len(theirs) - 1) if mine["pre_ln"] else range(len(theirs))
            for i in compared:
                worst = max(worst, float((theirs[i] - mine["hidden_states"][i]).abs().max()))
            worst = max(worst, float((out.last_hidden_state - mine["last"]).abs().max()))
    return worst


def export_hf(loaded: LoadedStudent, out_dir: str, force: bool = False) -> Dict[str, Any]:
    """Write the ``HubertModel`` folder; returns what was written and the parity figures."""
    if os.path.isfile(out_dir):
        raise ExportInputError(f"{out_dir} is a file; --format hf writes a folder: give a folder name")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise ExportInputError(f"{out_dir} exists and is not empty; add --force to write into it")
    hubert = build_hubert(loaded)
    diff = max_difference(loaded.model, hubert, parity_inputs())
    if not diff <= TOLERANCE:
        raise _refuse(
            loaded.path,
            f"the HubertModel built from it differs from the student by {diff:.3g} (more than "
            f"{TOLERANCE:g}): the student uses something HubertConfig does not express",
        )
    transformers = require_transformers("fairseq-kd-export --format hf")
    os.makedirs(out_dir, exist_ok=True)
    hubert.save_pretrained(out_dir, safe_serialization=True)
    transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=int(loaded.sample_rate), padding_value=0.0,
        do_normalize=bool(loaded.normalize),
        return_attention_mask=hubert.config.feat_extract_norm == "layer",
    ).save_pretrained(out_dir)
    reloaded = transformers.AutoModel.from_pretrained(out_dir, local_files_only=True).float().eval()
    reloaded_diff = max_difference(loaded.model, reloaded, parity_inputs())
    info = {
        "source_checkpoint": os.path.abspath(loaded.path),
        "source_kind": loaded.source,
        "format": "transformers HubertModel",
        "transformers_version": transformers.__version__,
        "normalize": bool(loaded.normalize),
        "sample_rate": int(loaded.sample_rate),
        "num_layers": int(hubert.config.num_hidden_layers),
        "hidden_size": int(hubert.config.hidden_size),
        "index_convention": "transformers: hidden_states[0] = first transformer layer's input (after "
        "the positional convolution); fairseq_kd's layer 0 (the projection output) is not an output",
        "max_abs_diff_vs_student": diff,
        "reloaded_max_abs_diff_vs_student": reloaded_diff,
    }
    with open(os.path.join(out_dir, "fairseq_kd_export.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


__all__ = ["STANDALONE_HINT", "build_hubert", "export_hf", "max_difference"]
