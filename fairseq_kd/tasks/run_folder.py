"""A run folder belongs to one run: resuming another run's ``checkpoint_last.pt`` is stopped.

fairseq resumes whatever ``checkpoint_last.pt`` sits in ``checkpoint.save_dir`` (the default
``checkpoint.restore_file``) and then replaces that run's checkpoints. Before the first step, each
task (``build_model``) compares that checkpoint with the run being started:

* the task (``cfg.task._name``);
* the model: its registered name, then every parameter name and shape (a different student
  architecture; fairseq would fail later with "please ensure that the architectures match", or
  silently continue when only non-shape settings differ);
* for distillation, the teacher: its path (``task.teacher_path``) and a content fingerprint (the
  SHA-256 of the file or folder) kept in the checkpoint's task state, so a teacher file that was
  moved is still the same teacher, and one overwritten in place is not.

A difference stops with a message saying how to start fresh (another ``checkpoint.save_dir``) or
resume deliberately (``task.check_run_folder=false``). ``checkpoint.restore_file=PATH`` (a file you
name) is not checked. An unreadable ``checkpoint_last.pt`` is checked through the checkpoint the
compatibility layer's ``checkpoint_resume`` fix resumes instead.
"""


import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from fairseq.dataclass import FairseqDataclass
from omegaconf import II

logger = logging.getLogger(__name__)

FINGERPRINT_KEY = "teacher_fingerprint"


class RunFolderError(ValueError):
    """``checkpoint.save_dir`` holds another run's checkpoint."""


@dataclass
class RunFolderConfig(FairseqDataclass):
    check_run_folder: bool = field(
        default=True,
        metadata={
            "help": "before resuming checkpoint.save_dir's checkpoint_last.pt, check that it is this run's: "
            "same task, same model architecture, same teacher (path or content); false resumes anyway"
        },
    )
    run_save_dir: str = field(
        default=II("checkpoint.save_dir"), metadata={"help": "checkpoint.save_dir (read by the run-folder check)"}
    )
    run_restore_file: str = field(
        default=II("checkpoint.restore_file"), metadata={"help": "checkpoint.restore_file (read by the run-folder check)"}
    )


def fingerprint(path: str) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and contents)."""
    digest = hashlib.sha256()
    files = [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    for name in files:
        if os.path.isdir(path):
            digest.update(os.path.relpath(name, path).encode() + b"\0")
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def resumed_checkpoint(task_cfg: Any) -> Optional[str]:
    """The checkpoint fairseq will resume for this config, or None (a fresh run, or not checked)."""
    get = task_cfg.get if hasattr(task_cfg, "get") else lambda k, d=None: getattr(task_cfg, k, d)
    try:
        if not get("check_run_folder", False):
            return None
        save_dir, restore = get("run_save_dir", None), get("run_restore_file", None)
    except Exception:  # noqa: BLE001 - an interpolation without its root (a task config alone)
        return None
    if not save_dir or restore != "checkpoint_last.pt":
        return None
    last = os.path.join(save_dir, "checkpoint_last.pt")
    if not os.path.lexists(last):
        return None
    from fairseq_kd_compat.resume import newest_readable, unreadable

    if unreadable(last) is None:
        return last
    return newest_readable(save_dir, exclude=last)


def check_run_folder(task_cfg: Any, model_cfg: Any, model: Any, teacher_path: Optional[str] = None,
                     teacher_fingerprint: Optional[str] = None) -> None:
    """Stop when ``checkpoint.save_dir`` holds another run (see the module docstring)."""
    path = resumed_checkpoint(task_cfg)
    if path is None:
        return
    from fairseq import checkpoint_utils

    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
    except Exception as error:  # noqa: BLE001 - fairseq's own resume reports an unreadable file
        logger.warning(f"run-folder check: {path} not read ({type(error).__name__}); not checked")
        return
    cfg = state.get("cfg") or {}
    differences = []
    theirs_task = (cfg.get("task") or {}).get("_name")
    ours_task = task_cfg.get("_name", None) if hasattr(task_cfg, "get") else None
    if theirs_task and ours_task and theirs_task != ours_task:
        differences.append(f"task {theirs_task!r}, this run's is {ours_task!r}")
    theirs_model = (cfg.get("model") or {}).get("_name")
    ours_model = model_cfg.get("_name", None) if hasattr(model_cfg, "get") else None
    if theirs_model and ours_model and theirs_model != ours_model:
        differences.append(f"model {theirs_model!r}, this run's is {ours_model!r}")
    elif not differences:
        difference = shape_difference(state.get("model") or {}, model.state_dict())
        if difference:
            differences.append(f"another model architecture ({difference})")
    if teacher_path is not None and not differences:
        theirs_path = (cfg.get("task") or {}).get("teacher_path")
        theirs_print = (state.get("task_state") or {}).get(FINGERPRINT_KEY)
        if theirs_print and teacher_fingerprint and theirs_print != teacher_fingerprint:
            same = " (the same path: the file was replaced)" if theirs_path == teacher_path else ""
            differences.append(
                f"distilled from the teacher {theirs_path} (sha256 {theirs_print[:12]}), this run's teacher "
                f"{teacher_path} is another file (sha256 {teacher_fingerprint[:12]}){same}"
            )
        elif not theirs_print and theirs_path and os.path.abspath(theirs_path) != os.path.abspath(teacher_path):
            differences.append(f"distilled from the teacher {theirs_path}, this run's is {teacher_path}")
    if differences:
        save_dir = os.path.dirname(path)
        raise RunFolderError(
            f"checkpoint.save_dir={save_dir} holds another run: {path} is {'; '.join(differences)}. "
            f"Resuming would continue that run and replace its checkpoints. To start this run fresh, "
            f"give it a new checkpoint.save_dir (or move {save_dir} away); to resume that checkpoint "
            f"with this configuration deliberately, set task.check_run_folder=false"
        )
    logger.info(f"run-folder check: {path} is this run's (same task, model and teacher); resuming it")


def shape_difference(theirs: Dict[str, Any], ours: Dict[str, Any]) -> Optional[str]:
    """The first parameter that is missing, extra or of another shape, in words; None if they match."""
    for name, tensor in ours.items():
        if name not in theirs:
            return f"this run's model has {name}, the checkpoint does not"
        if tuple(theirs[name].shape) != tuple(tensor.shape):
            return f"{name} is {tuple(theirs[name].shape)} there, {tuple(tensor.shape)} here"
    for name in theirs:
        if name not in ours:
            return f"the checkpoint has {name}, this run's model does not"
    return None
