"""``checkpoint_resume``: fairseq 0.12.2's checkpoint writes and resumes survive a kill.

Upstream, ``checkpoint_utils.save_checkpoint`` writes the first checkpoint of a save atomically
(``.tmp`` + rename) but makes ``checkpoint_last.pt`` (and ``checkpoint_best.pt``) with a plain
``PathManager.copy``: a kill during that copy leaves ``checkpoint_last.pt`` empty or cut off, and
``load_checkpoint`` then fails on every re-run with ``EOFError`` (or ``PytorchStreamReader failed
reading zip archive``) although an intact ``checkpoint_E_U.pt`` sits beside it.

The fix, in ``fairseq.checkpoint_utils``'s namespace only:

* ``PathManager.copy`` and ``PathManager.rename`` (as that module sees them) write to ``DST.tmp``,
  fsync it, verify it (zip directory and every record's CRC) and only then ``os.replace`` it over
  ``DST``: a checkpoint replaces the previous one whole or not at all.
* ``load_checkpoint`` with the default ``checkpoint.restore_file=checkpoint_last.pt``: when that
  file exists but is unreadable, it resumes from the newest readable ``checkpoint*.pt`` in
  ``checkpoint.save_dir`` (by modification time) with a warning naming both; with none readable it
  stops with :class:`UnreadableCheckpointError`, saying how to start fresh or resume from elsewhere.

Why here and not in the tasks: the copy and the choice of the file to resume are inside
``checkpoint_utils`` (the trainer only receives the path), and every task, fairseq's own included
(``hubert_pretraining``, ``audio_finetuning``), has the same problem.
"""

from __future__ import annotations

import copy
import glob
import logging
import os
import pickle
import shutil
import zipfile
from typing import Any, Optional

logger = logging.getLogger("fairseq_kd_compat.resume")

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


class UnreadableCheckpointError(RuntimeError):
    """``checkpoint_last.pt`` is unreadable and nothing in ``checkpoint.save_dir`` can replace it."""


def unreadable(path: str) -> Optional[str]:
    """Why the checkpoint file at ``path`` cannot be loaded (cheap checks, no unpickling), or None."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(len(LEGACY_TORCH_MAGIC))
    except OSError as error:
        return f"cannot be opened: {error}"
    if size == 0:
        return "it is empty (0 bytes), as after a kill while it was being written"
    if head == LEGACY_TORCH_MAGIC:
        return None  # legacy pickle format: nothing cheap to verify
    if not head.startswith(ZIP_MAGIC):
        return f"it is not a PyTorch checkpoint (it starts with {head[:8]!r})"
    if not zipfile.is_zipfile(path):
        return f"it is truncated ({size} bytes, no zip directory), as after a kill while it was being written"
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"it is damaged ({error})"
    return f"it is damaged (record {damaged} fails its CRC check)" if damaged else None


def newest_readable(save_dir: str, suffix: str = "", exclude: str = "") -> Optional[str]:
    """The most recently written readable ``checkpoint*{suffix}.pt`` in ``save_dir``."""
    candidates = [
        p for p in glob.glob(os.path.join(glob.escape(save_dir), f"checkpoint*{suffix}.pt"))
        if os.path.isfile(p) and os.path.abspath(p) != os.path.abspath(exclude)
    ]
    for path in sorted(candidates, key=lambda p: os.path.getmtime(p), reverse=True):
        if unreadable(path) is None:
            return path
    return None


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_local(*paths: str) -> bool:
    return not any("://" in str(p) for p in paths)


def _verified_replace(tmp: str, dst: str) -> None:
    _fsync(tmp)
    reason = unreadable(tmp) if dst.endswith(".pt") else None
    if reason is not None:
        os.remove(tmp)
        raise OSError(f"the checkpoint written for {dst} is unreadable ({reason}); {dst} was left as it was")
    os.replace(tmp, dst)


class SafePathManager:
    """fairseq's ``PathManager`` as ``checkpoint_utils`` sees it, with verified atomic copy / rename."""

    def __init__(self, wrapped: Any):
        self._wrapped = wrapped

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    def copy(self, src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if not _is_local(src_path, dst_path):
            return self._wrapped.copy(src_path, dst_path, overwrite=overwrite)
        if os.path.exists(dst_path) and not overwrite:
            return False
        tmp = dst_path + ".tmp"
        shutil.copyfile(src_path, tmp)
        _verified_replace(tmp, dst_path)
        return True

    def rename(self, src: str, dst: str) -> None:
        if not _is_local(src, dst) or not src.endswith(".tmp"):
            return self._wrapped.rename(src, dst)
        _verified_replace(src, dst)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def patch_checkpoint_utils(module: Any) -> None:
    module.PathManager = SafePathManager(module.PathManager)
    original = module.load_checkpoint

    def load_checkpoint(cfg, trainer, **passthrough_args):
        if cfg.restore_file == "checkpoint_last.pt":
            suffix = getattr(trainer, "checkpoint_suffix", "") or ""
            last = os.path.join(cfg.save_dir, f"checkpoint_last{suffix}.pt")
            reason = unreadable(last) if os.path.lexists(last) else None
            if reason is not None:
                fallback = newest_readable(cfg.save_dir, suffix, exclude=last)
                if fallback is None:
                    raise UnreadableCheckpointError(
                        f"{last} cannot be resumed: {reason}, and no other checkpoint in {cfg.save_dir} "
                        f"is readable. To start this run afresh, move {last} away (or give a new "
                        f"checkpoint.save_dir); to resume from a copy elsewhere, pass "
                        f"checkpoint.restore_file=/path/to/checkpoint.pt"
                    )
                logger.warning(
                    f"{last} is unreadable ({reason}); resuming from {fallback}, the newest readable "
                    f"checkpoint in {cfg.save_dir} (the updates after it are trained again)"
                )
                restore = fallback[: -len(f"{suffix}.pt")] + ".pt" if suffix else fallback  # fairseq adds it
                cfg = copy.deepcopy(cfg)
                from omegaconf import DictConfig, open_dict

                with open_dict(cfg) if isinstance(cfg, DictConfig) else _nothing():
                    cfg.restore_file = restore
                    cfg.finetune_from_model = None  # a resume, not the start of a fine-tuning
        return original(cfg, trainer, **passthrough_args)

    module.load_checkpoint = load_checkpoint
