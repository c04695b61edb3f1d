# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Reading a fairseq checkpoint that a user names, with errors that say which file and what to do.

Every entry point that takes a checkpoint path (the distillation teacher, ``model.w2v_path`` of the
fine-tuning tasks, ``fairseq-kd-export``) runs the same checks before fairseq's own reader
(``checkpoint_utils.load_checkpoint_to_cpu``: allow-listed unpickling through the compatibility
layer, legacy ``args`` converted to ``cfg``), then its own checks of what the checkpoint holds.
Cheap checks come first: existence, torch's file signature, and for zip-format files the zip
directory (missing after an interrupted copy) and every record's CRC (``torch.load`` verifies
neither, so a damaged tensor record would load as silently wrong weights; ~0.25 s per GB).
"""

import os
import pickle
import zipfile
from typing import Any, Dict, Optional, Type

# The two ways torch.save starts a file: a zip archive (torch >= 1.6) or the legacy pickle stream,
# whose first record is the pickled magic number 0x1950a86a20f9469cfc6c (protocol 2).
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


def check_checkpoint_file(path: str, label: str, fix: str, error: Type[Exception] = ValueError) -> bytes:
    """Existence, torch's signature and zip integrity; returns the file's first bytes.

    ``label`` names the file in messages (``"teacher checkpoint /x.pt"``, ``"model.w2v_path=/x.pt"``),
    ``fix`` says what to pass instead.
    """
    if not os.path.exists(path):
        raise error(f"{label} does not exist; {fix}")
    if not os.path.isfile(path):
        raise error(f"{label} is not a file: give the checkpoint file itself; {fix}")
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_TORCH_MAGIC))
    if head.startswith(ZIP_MAGIC):
        check_zip(path, label, error)
    elif head != LEGACY_TORCH_MAGIC:
        raise error(f"{label} is not a PyTorch checkpoint (it starts with {head[:8]!r}); {fix}")
    return head


def check_zip(path: str, label: str, error: Type[Exception] = ValueError) -> None:
    """Truncation and CRC check of a zip-format checkpoint."""
    if not zipfile.is_zipfile(path):  # the zip directory sits at the end: a cut-off file has none
        raise error(
            f"{label} is truncated (its zip directory is missing, as after an interrupted download "
            f"or copy); download or copy it again"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        damaged = f"? ({exc})"
    if damaged is not None:
        raise error(f"{label} is corrupt (record {damaged} fails its CRC check); download or copy it again")


def read_fairseq_checkpoint(
    path: str,
    label: str,
    fix: str,
    error: Type[Exception] = ValueError,
    arg_overrides: Optional[Dict[str, Any]] = None,
    require_cfg: bool = True,
) -> Dict[str, Any]:
    """The checked file read with fairseq's own reader.

    With ``require_cfg`` the state must hold ``model`` weights and a ``cfg`` with a ``model``
    section (what every fairseq training checkpoint has).
    """
    from fairseq import checkpoint_utils

    check_checkpoint_file(path, label, fix, error)
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides=arg_overrides)
    except pickle.UnpicklingError as exc:  # includes the compat layer's refusal of unknown globals
        raise error(f"{label} cannot be unpickled: {str(exc)[:400]}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise error(
            f"{label} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); the file is corrupt or "
            f"truncated: download or copy it again"
        ) from None
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        # fairseq's _upgrade_state_dict indexes the keys a fairseq training checkpoint has
        raise error(
            f"{label} is a PyTorch file but not a fairseq training checkpoint (fairseq's loader failed "
            f"with {type(exc).__name__}: {str(exc)[:200]}); {fix}"
        ) from None
    if require_cfg:
        cfg = state.get("cfg") if isinstance(state, dict) else None
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or cfg is None or cfg.get("model") is None:
            raise error(
                f"{label} is a PyTorch file but not a fairseq training checkpoint (no 'model' weights "
                f"with a 'cfg'/'args' describing them); {fix}"
            )
    return state
