"""The individual fixes. Each one changes a single module, and only the names it must."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import types
from typing import Any, Callable, Dict


class ModuleProxy(types.ModuleType):
    """Stands in for a module inside ONE other module's namespace, overriding a few attributes.

    ``fairseq.checkpoint_utils.torch.load`` can then be mended without changing ``torch.load``
    for anybody else.
    """

    def __init__(self, wrapped: types.ModuleType, **overrides: Any):
        super().__init__(wrapped.__name__, wrapped.__doc__)
        self.__dict__.update(overrides)
        self.__dict__["_wrapped"] = wrapped

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_wrapped"], name)


# 1. dataclasses ----------------------------------------------------------------------------------
def allow_dataclass_instance_defaults() -> None:
    """Python 3.11 rejects any unhashable default; 3.10 rejected only list/dict/set.

    fairseq's configs (and hydra 1.0's) use dataclass instances as defaults. For those alone we
    restore the old rule; ``Field.default`` stays what it was, because fairseq's ``hydra_init``
    reads it.
    """
    original = dataclasses._get_field  # type: ignore[attr-defined]
    if getattr(original, "_fairseq_kd_compat", False):
        return

    def _get_field(cls, a_name, a_type, *args, **kwargs):
        default = getattr(cls, a_name, dataclasses.MISSING)
        if isinstance(default, dataclasses.Field):
            default = default.default
        default_cls = type(default)
        if (
            not dataclasses.is_dataclass(default_cls)
            or default_cls.__hash__ is not None
            or isinstance(default, type)
        ):
            return original(cls, a_name, a_type, *args, **kwargs)
        # Make the instance's class look hashable for the duration of the check only.
        own_hash = default_cls.__dict__.get("__hash__", dataclasses.MISSING)
        default_cls.__hash__ = object.__hash__
        try:
            return original(cls, a_name, a_type, *args, **kwargs)
        finally:
            if own_hash is dataclasses.MISSING:
                del default_cls.__hash__
            else:
                default_cls.__hash__ = own_hash

    _get_field._fairseq_kd_compat = True  # type: ignore[attr-defined]
    dataclasses._get_field = _get_field  # type: ignore[attr-defined]


# 2. hydra 1.0 error printing ---------------------------------------------------------------------
def _print_exception(*args: Any, etype: Any = None, **kwargs: Any) -> None:
    import traceback

    if etype is not None or (not args and "value" in kwargs):
        # hydra 1.0.7 calls print_exception(etype=None, value=ex, tb=tb)
        value = kwargs.pop("value")
        tb = kwargs.pop("tb", None)
        return traceback.print_exception(type(value), value, tb, **kwargs)
    return traceback.print_exception(*args, **kwargs)


def patch_hydra_traceback(module: types.ModuleType) -> None:
    # hydra/_internal/utils.py does ``from traceback import print_exception``
    module.print_exception = _print_exception


# 3. torch >= 2.6 weights_only loading ------------------------------------------------------------
def patch_torch_load(module: types.ModuleType) -> None:
    import torch

    from fairseq_kd_compat.safe_load import safe_load

    module.torch = ModuleProxy(torch, load=safe_load)


# 4. numpy >= 1.24 aliases ------------------------------------------------------------------------
def _percentile(numpy_module: types.ModuleType) -> Callable:
    def percentile(*args: Any, interpolation: Any = None, **kwargs: Any) -> Any:
        if interpolation is not None:  # renamed `method` in numpy 1.22, removed in 2.x
            kwargs.setdefault("method", interpolation)
        return numpy_module.percentile(*args, **kwargs)

    return percentile


def patch_numpy_aliases(module: types.ModuleType) -> None:
    import numpy

    # np.compat (np.compat.long is int) was removed in numpy 2: token_block_dataset, language_pair_dataset
    compat = types.SimpleNamespace(long=int, unicode=str, basestring=str, integer_types=(int,))
    module.np = ModuleProxy(numpy, int=int, float=float, percentile=_percentile(numpy), compat=compat)


# 4c. torch 2.x masks: uint8 masks refused, the encoder's fast path needs mask_type ---------------
def _bool_mask(mask: Any) -> Any:
    import torch

    return mask.to(torch.bool) if isinstance(mask, torch.Tensor) and mask.dtype == torch.uint8 else mask


def patch_uint8_attention_masks(module: types.ModuleType) -> None:
    """torch's multi_head_attention_forward: "only bool and floating types of key_padding_mask are
    supported"; fairseq (and its callers) still pass ByteTensors (non-zero = masked)."""
    cls = module.MultiheadAttention
    original = cls.forward

    def forward(self, query, key, value, key_padding_mask=None, *args, **kwargs):
        if "attn_mask" in kwargs:
            kwargs["attn_mask"] = _bool_mask(kwargs["attn_mask"])
        return original(self, query, key, value, _bool_mask(key_padding_mask), *args, **kwargs)

    cls.forward = forward


def patch_encoder_fast_path(module: types.ModuleType) -> None:
    """``torch._transformer_encoder_layer_fwd`` (fairseq's eval "BetterTransformer" path) takes a
    ``mask_type`` since torch 1.13; without it a padded batch fails with "Mask Type should be defined"."""
    import torch

    fast = torch._transformer_encoder_layer_fwd

    def transformer_encoder_layer_fwd(src, *args, **kwargs):
        args = list(args)
        mask = args[17] if len(args) > 17 else kwargs.get("mask")
        if mask is not None and len(args) <= 18 and kwargs.get("mask_type") is None:
            mask = _bool_mask(mask)
            if len(args) > 17:
                args[17] = mask
            else:
                kwargs["mask"] = mask
            # 1: a (batch, time) key padding mask, what fairseq passes; 0: a (time, time) attn_mask
            is_padding = mask.dim() == 2 and tuple(mask.shape) == tuple(src.shape[:2])
            kwargs["mask_type"] = 1 if is_padding else 0
        return fast(src, *args, **kwargs)

    module.torch = ModuleProxy(torch, _transformer_encoder_layer_fwd=transformer_encoder_layer_fwd)


# 4b. bitarray >= 3: util.rindex removed (fairseq's Huffman coder) ---------------------------------
def _rindex(a: Any, value: int = 1, *args: Any) -> int:
    """bitarray 2's ``util.rindex``: the index of the last ``value`` (ValueError when absent)."""
    try:
        found = a.find(value, right=True)  # bitarray >= 2.9
    except TypeError:
        found = -2
    if found == -2:
        for index in range(len(a) - 1, -1, -1):
            if a[index] == value:
                return index
        raise ValueError(f"{value} not in bitarray")
    if found < 0:
        raise ValueError(f"{value} not in bitarray")
    return found


def patch_bitarray_rindex(module: types.ModuleType) -> None:
    util = module.util
    if not hasattr(util, "rindex"):
        module.util = ModuleProxy(util, rindex=_rindex)


# 5. manifest roots relative to the manifest -------------------------------------------------------
def _resolve_root(root: str, manifest_path: str) -> str:
    if not root or os.path.isabs(root) or os.path.isdir(root):
        return root
    beside = os.path.join(os.path.dirname(os.path.abspath(manifest_path)), root)
    return beside if os.path.isdir(beside) else root


def patch_file_audio_dataset(module: types.ModuleType) -> None:
    cls = module.FileAudioDataset
    original_init = cls.__init__

    def __init__(self, manifest_path, *args, **kwargs):
        original_init(self, manifest_path, *args, **kwargs)
        self.root_dir = _resolve_root(self.root_dir, manifest_path)

    cls.__init__ = __init__


def patch_hubert_load_audio(module: types.ModuleType) -> None:
    original = module.load_audio

    def load_audio(manifest_path, *args, **kwargs):
        root, *rest = original(manifest_path, *args, **kwargs)
        return (_resolve_root(root, manifest_path), *rest)

    module.load_audio = load_audio


# 6. common.user_dir naming an installed package ---------------------------------------------------
def resolve_user_dir(user_dir: str, fairseq_dir: str) -> str:
    """fairseq's own lookup first; then an importable package of that name (editable installs)."""
    candidates = [
        os.path.abspath(user_dir),
        os.path.join(fairseq_dir, user_dir),
        os.path.join(fairseq_dir, "..", user_dir),
    ]
    if any(os.path.exists(c) for c in candidates) or os.sep in user_dir:
        return user_dir
    try:
        spec = importlib.util.find_spec(user_dir)
    except (ImportError, ValueError):
        return user_dir
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return user_dir


def patch_import_user_module(module: types.ModuleType) -> None:
    original = module.import_user_module
    fairseq_dir = os.path.dirname(module.__file__)

    def import_user_module(args):
        user_dir = getattr(args, "user_dir", None)
        if user_dir:
            resolved = resolve_user_dir(str(user_dir), fairseq_dir)
            if resolved != user_dir:
                args = argparse.Namespace(user_dir=resolved)
        return original(args)

    module.import_user_module = import_user_module


# 7. input paths relative to where a hydra job was started ---------------------------------------
# hydra 1.0 runs every job inside hydra.run.dir (outputs/<date>/<time>), so fairseq opens
# `task.data=manifests` there and finds nothing. Input paths (never output folders such as
# checkpoint.save_dir, whose placement inside the run folder is fairseq's documented behaviour)
# that exist from the launch directory are made absolute.
INPUT_PATH_KEYS = (
    "task.data",
    "task.label_dir",
    "task.teacher_path",
    "model.w2v_path",
    "checkpoint.finetune_from_model",
    "common_eval.path",
    "decoding.lexicon",
    "decoding.lmpath",
)


def absolute_input_path(value: str, launch_dir: str, cwd: str = None) -> str:
    """``value`` made absolute against ``launch_dir`` when it exists there and not from ``cwd``.

    ``os.pathsep``-separated lists (fairseq's ``common_eval.path`` for ensembles) are handled
    element by element.
    """
    cwd = cwd or os.getcwd()
    parts = []
    for part in value.split(os.pathsep):
        if (
            part
            and not os.path.isabs(part)
            and not os.path.exists(os.path.join(cwd, part))
            and os.path.exists(os.path.join(launch_dir, part))
        ):
            part = os.path.normpath(os.path.join(launch_dir, part))
        parts.append(part)
    return os.pathsep.join(parts)


def absolute_input_paths(cfg: Any, launch_dir: str) -> None:
    """Rewrite the relative input paths of a composed hydra config in place."""
    from omegaconf import OmegaConf, open_dict

    for key in INPUT_PATH_KEYS:
        group, name = key.split(".")
        node = cfg.get(group, None) if hasattr(cfg, "get") else None
        if node is None or name not in node or OmegaConf.is_missing(node, name):
            continue
        if OmegaConf.is_interpolation(node, name):
            continue  # e.g. model.data: ${task.data}, resolved from the rewritten key
        value = node[name]
        if isinstance(value, str):
            resolved = absolute_input_path(value, launch_dir)
            if resolved != value:
                with open_dict(node):
                    node[name] = resolved


def patch_hydra_train_paths(module: types.ModuleType) -> None:
    original = module._hydra_main  # hydra_main looks it up at call time

    def _hydra_main(cfg, **kwargs):
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import get_original_cwd

        if HydraConfig.initialized():
            absolute_input_paths(cfg, get_original_cwd())
        return original(cfg, **kwargs)

    module._hydra_main = _hydra_main


# 8. checkpoint writes and resumes that survive a kill (fairseq_kd_compat/resume.py) ---------------
def _patch_checkpoint_resume(module: types.ModuleType) -> None:
    from fairseq_kd_compat.resume import patch_checkpoint_utils

    patch_checkpoint_utils(module)


# 9. the project's errors in a hydra job: one message, exit code 2 (fairseq_kd_compat/errors.py) ----
def _patch_clean_errors(module: types.ModuleType) -> None:
    from fairseq_kd_compat.errors import patch_run_and_report

    patch_run_and_report(module)


# fix name -> {module name: patch applied right after that module executes}
MODULE_PATCHES: Dict[str, Dict[str, Callable[[types.ModuleType], None]]] = {
    "hydra_traceback": {"hydra._internal.utils": patch_hydra_traceback},
    "safe_checkpoint_load": {
        "fairseq.checkpoint_utils": patch_torch_load,
        "fairseq.distributed.utils": patch_torch_load,
    },
    "numpy_aliases": {
        "fairseq.data.data_utils": patch_numpy_aliases,
        "fairseq.modules.dynamic_crf_layer": patch_numpy_aliases,
        "fairseq.data.token_block_dataset": patch_numpy_aliases,
        "fairseq.data.language_pair_dataset": patch_numpy_aliases,
    },
    "bitarray_rindex": {"fairseq.data.huffman.huffman_coder": patch_bitarray_rindex},
    "torch2_masks": {
        "fairseq.modules.multihead_attention": patch_uint8_attention_masks,
        "fairseq.modules.transformer_layer": patch_encoder_fast_path,
    },
    "manifest_root": {
        "fairseq.data.audio.raw_audio_dataset": patch_file_audio_dataset,
        "fairseq.data.audio.hubert_dataset": patch_hubert_load_audio,
    },
    "user_dir_module": {"fairseq.utils": patch_import_user_module},
    "launch_relative_paths": {"fairseq_cli.hydra_train": patch_hydra_train_paths},
    "checkpoint_resume": {"fairseq.checkpoint_utils": _patch_checkpoint_resume},
    "clean_errors": {"hydra._internal.utils": _patch_clean_errors},
}
