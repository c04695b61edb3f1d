"""Start-up compatibility layer that lets fairseq 0.12.2 run on Python 3.11+ and torch >= 2.6.

fairseq's last release is imported by its console scripts long before any ``--user-dir`` plugin,
so the fixes cannot live in the plugin: ``fairseq_kd_compat.pth`` (installed into site-packages
by ``setup.py``) calls :func:`install` at interpreter start-up. Start-up stays cheap: only the
``dataclasses`` rule is changed eagerly; every other fix is applied by an import hook right after
the one fairseq/hydra module it mends is executed, and never touches any other module.

Switches (environment variables):
  FAIRSEQ_KD_COMPAT=0                 turn the whole layer off (fairseq then fails as upstream does)
  FAIRSEQ_KD_COMPAT_DISABLE=a,b       turn off single fixes by name (see ``FIXES``)
  FAIRSEQ_KD_TRUSTED_CHECKPOINTS=...  paths (os.pathsep-separated files or folders, or ``*``) whose
                                      checkpoints may be fully unpickled; see ``safe_load``
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List

ENV_SWITCH = "FAIRSEQ_KD_COMPAT"
ENV_DISABLE = "FAIRSEQ_KD_COMPAT_DISABLE"

# fix name -> (module it mends, description); the patch functions live in ``fixes``.
FIXES: Dict[str, str] = {
    "dataclass_defaults": "dataclasses: allow dataclass-instance field defaults as Python <= 3.10 did",
    "hydra_traceback": "hydra._internal.utils: print_exception(etype=...) removed in Python 3.10",
    "safe_checkpoint_load": "fairseq.checkpoint_utils / fairseq.distributed.utils: torch >= 2.6 "
    "weights_only loading, with an allow-list of the classes fairseq checkpoints hold",
    "numpy_aliases": "fairseq.data.data_utils / fairseq.modules.dynamic_crf_layer / "
    "fairseq.data.token_block_dataset / fairseq.data.language_pair_dataset: np.int/np.float removed "
    "in numpy 1.24, np.percentile(interpolation=) and np.compat removed in numpy 2",
    "bitarray_rindex": "fairseq.data.huffman.huffman_coder: bitarray.util.rindex removed in bitarray 3",
    "torch2_masks": "fairseq.modules.multihead_attention / transformer_layer: uint8 attention masks "
    "refused by torch 2, and the transformer encoder's eval fast path failing with 'Mask Type should be "
    "defined' (torch._transformer_encoder_layer_fwd's mask_type)",
    "manifest_root": "fairseq.data.audio.raw_audio_dataset / hubert_dataset: a relative manifest root "
    "that does not exist from the working directory is resolved against the manifest's folder",
    "user_dir_module": "fairseq.utils: common.user_dir may name an installed package (e.g. fairseq_kd)",
    "launch_relative_paths": "fairseq_cli.hydra_train: input paths (task.data, task.teacher_path, "
    "model.w2v_path, ...) relative to the directory fairseq-hydra-train was started in, not to the "
    "hydra run folder it runs in",
    "checkpoint_resume": "fairseq.checkpoint_utils: checkpoint_last.pt / checkpoint_best.pt are written "
    "to .tmp, verified and renamed (a kill mid-copy left them empty: EOFError on every re-run), and an "
    "unreadable checkpoint_last.pt is resumed from the newest readable checkpoint beside it",
    "clean_errors": "hydra._internal.utils: a fairseq_kd error in a fairseq-hydra-train job is printed "
    "as one message with exit code 2, not a traceback (FAIRSEQ_KD_DEBUG=1 shows it)",
}

_installed = False


def enabled(fix: str | None = None) -> bool:
    """Whether the layer (or one named fix) is switched on by the environment."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    if fix is None:
        return True
    disabled = {name.strip() for name in os.environ.get(ENV_DISABLE, "").split(",")}
    return fix not in disabled


def install() -> None:
    """Apply the start-up fix and register the import hook (idempotent)."""
    global _installed
    if _installed or not enabled():
        return
    _installed = True
    from fairseq_kd_compat import fixes
    from fairseq_kd_compat.hook import PostImportPatcher

    if sys.version_info >= (3, 11) and enabled("dataclass_defaults"):
        fixes.allow_dataclass_instance_defaults()

    patches: Dict[str, List[Callable]] = {}
    for fix_name, targets in fixes.MODULE_PATCHES.items():
        if enabled(fix_name):
            for module_name, patch in targets.items():
                patches.setdefault(module_name, []).append(patch)
    PostImportPatcher.register(patches)
