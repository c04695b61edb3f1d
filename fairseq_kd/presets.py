# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The presets in ``fairseq_kd/config``: composed as fairseq composes them, and their model block.

* :func:`compose_preset`: a preset's full config, composed exactly as
  ``fairseq-hydra-train --config-name NAME`` does (``hydra_init``, hydra's compose over fairseq's
  config folder, ``add_defaults``, resolved, struct). :func:`compose_preset_container` gives the
  same as plain containers.
* :func:`model_block`: the ``model`` group of a preset or a yaml file, read without hydra.
* :func:`model_fields`: ``thin_hubert`` fields of a preset name, a yaml file or a checkpoint (a
  student, or a HuBERT / wav2vec 2.0 teacher through :func:`thin_fields_from_fairseq`), which is
  what ``ThinHubertModel.model_summary`` / ``macs_breakdown`` count.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "config"
MODEL_CONFIG_DIR = CONFIG_DIR / "model"
TEACHER_KINDS = ("hubert", "wav2vec2")
STUDENT_KIND = "thin_hubert"
CHECKPOINT_FIX = "give a thin_hubert student or a pre-trained HuBERT / wav2vec 2.0 teacher checkpoint"


class PresetError(ValueError):
    """A preset, yaml file, override or checkpoint that cannot be read; the message names it."""


def preset_names() -> List[str]:
    """The presets shipped in ``fairseq_kd/config`` (``--config-name`` values)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


# -- composing -------------------------------------------------------------------------------------
_COMPOSED: Dict[Tuple[str, Tuple[str, ...]], Dict[str, Any]] = {}


def compose_preset_container(name: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """:func:`compose_preset` as plain containers (resolved, enums as strings); a fresh copy."""
    key = (name, tuple(overrides))
    if key not in _COMPOSED:  # composing costs seconds (omegaconf 2.0 deep copies)
        _COMPOSED[key] = _compose(name, list(overrides))
    return copy.deepcopy(_COMPOSED[key])


def compose_preset(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The preset's full config, composed as ``fairseq-hydra-train --config-name NAME`` does,
    with hydra ``overrides``; a struct config, as ``hydra_train`` hands it to ``main``."""
    cfg = OmegaConf.create(compose_preset_container(name, overrides))
    OmegaConf.set_struct(cfg, True)
    return cfg


def _compose(name: str, overrides: List[str]) -> Dict[str, Any]:
    import fairseq
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from fairseq.dataclass.utils import omegaconf_no_object_check
    from hydra.core.global_hydra import GlobalHydra
    from hydra.experimental import compose, initialize_config_dir

    import fairseq_kd  # noqa: F401  (registers the plugin's tasks, models and criterions)

    hydra_init(name)  # FairseqConfig under the preset's name, as hydra_train.cli_main does
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(fairseq.__file__).parent / "config")):
            cfg = compose(name, overrides=overrides)
        add_defaults(cfg)  # an unknown name composes to an empty FairseqConfig, refused here
        with omegaconf_no_object_check():
            return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except Exception as error:  # hydra's and omegaconf's errors name the bad key or the missing config
        known = "" if (CONFIG_DIR / f"{name}.yaml").is_file() else f" (presets: {', '.join(preset_names())})"
        raise PresetError(f"cannot compose preset {name!r}: {error}{known}") from None
    finally:
        GlobalHydra.instance().clear()


# -- the model block -------------------------------------------------------------------------------
def preset_path(target: Union[str, Path]) -> Path:
    """A yaml file, or the preset of that name in ``fairseq_kd/config``."""
    path = Path(target)
    if not path.is_file():
        path = CONFIG_DIR / f"{target}.yaml"
    if not path.is_file():
        raise PresetError(f"{target}: not a file, a checkpoint, or a preset ({', '.join(preset_names())})")
    return path


def model_block(target: Union[str, Path]) -> DictConfig:
    """The ``model`` group of a preset (name or yaml): its ``defaults: - model: X`` entry, then its
    own ``model:`` block; or a bare model snippet (``config/model/*.yaml``) as it is."""
    path = preset_path(target)
    cfg = OmegaConf.load(path)
    model = OmegaConf.create()
    for entry in cfg.get("defaults", []) or []:
        if isinstance(entry, (dict, DictConfig)) and "model" in entry:
            model = OmegaConf.merge(model, OmegaConf.load(MODEL_CONFIG_DIR / f"{entry['model']}.yaml"))
    if "model" in cfg:
        model = OmegaConf.merge(model, cfg.model)
    elif "_name" in cfg:  # a bare model snippet (config/model/*.yaml)
        model = OmegaConf.merge(model, cfg)
    if "_name" not in model:
        raise PresetError(f"{path}: no model config found (expected a `model:` block or `defaults: - model: NAME`)")
    return model


def model_preset(name: str) -> Dict[str, Any]:
    """The fields of ``fairseq_kd/config/model/NAME.yaml``, without ``_name``."""
    fields = OmegaConf.to_container(model_block(MODEL_CONFIG_DIR / f"{name}.yaml"), resolve=True)
    fields.pop("_name", None)
    return fields


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


def checkpoint_model_fields(path: Union[str, Path]) -> Dict[str, Any]:
    """thin_hubert fields of a student or teacher checkpoint, read by the project's checked reader."""
    from fairseq_kd.encoders.pretrained import model_name, read_checkpoint

    state = read_checkpoint(str(path), f"checkpoint {path}", CHECKPOINT_FIX, PresetError)
    name = model_name(state["cfg"])
    model_cfg = OmegaConf.to_container(state["cfg"]["model"], resolve=False)
    del state
    if name in TEACHER_KINDS:
        return thin_fields_from_fairseq(model_cfg)
    if name == STUDENT_KIND:
        return model_cfg
    raise PresetError(f"{path}: model `{name}` is neither a thin_hubert student nor a HuBERT/wav2vec 2.0 teacher")


def model_fields(target: Union[str, Path], overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """thin_hubert fields for a preset name, a yaml file or a checkpoint, with ``model.x=y`` overrides."""
    if Path(target).suffix == ".pt":
        fields = checkpoint_model_fields(target)
    else:
        fields = OmegaConf.to_container(model_block(target), resolve=False)
    bad = [o for o in overrides if not o.startswith("model.") or "=" not in o]
    if bad:
        raise PresetError(f"overrides {bad}: expected model.KEY=VALUE")
    if overrides:
        fields.update(OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)).model))
    fields.pop("_name", None)
    return fields


__all__ = [
    "CONFIG_DIR",
    "MODEL_CONFIG_DIR",
    "PresetError",
    "checkpoint_model_fields",
    "compose_preset",
    "compose_preset_container",
    "model_block",
    "model_fields",
    "model_preset",
    "preset_names",
    "preset_path",
    "thin_fields_from_fairseq",
]
