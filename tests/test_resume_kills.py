"""A run SIGKILLed in and around checkpoint writing resumes to the weights of an uninterrupted run.

One tiny ``fairseq-hydra-train`` distillation (10 updates, a checkpoint every 2) is killed at
chosen points of fairseq's own save path (``tests/kill_points.py``, which also offers a kill while
``torch.save`` writes a numbered checkpoint: fairseq already writes that one to ``.tmp``) and re-run
with the same command each time, as a user (or a cluster scheduler) would:

1. while ``checkpoint_last.pt`` is being copied from ``checkpoint_1_4.pt`` (half of it written);
   with the ``checkpoint_resume`` fix the copy goes to ``checkpoint_last.pt.tmp``, so the old
   ``checkpoint_last.pt`` (update 2) is intact and the re-run resumes from it;
2. upstream (fix off): right after the copy to ``checkpoint_last.pt`` started (the file exists, 0
   bytes), the issue's case; re-running without the fix fails with fairseq's bare ``EOFError``;
3. with the fix the re-run warns, resumes from ``checkpoint_1_6.pt`` and finishes.

The final ``checkpoint_last.pt`` holds the same weights as the uninterrupted run's (run alongside).
"""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import MANIFESTS, REPO, console_script, run
from fairseq_checkpoints import make_hubert_checkpoint

KILLER = str(REPO / "tests" / "kill_points.py")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FIX_OFF = {"FAIRSEQ_KD_COMPAT_DISABLE": "checkpoint_resume"}


def overrides(teacher: Path, save_dir: Path):
    return [
        "--config-name", "thin_deep", f"task.data={MANIFESTS}", f"task.teacher_path={teacher}",
        "task.max_sample_size=32000", "model.encoder_layers=2", "model.encoder_embed_dim=64",
        "model.encoder_ffn_embed_dim=64", "model.encoder_attention_heads=4", "model.hint_layer_ids=[1,2]",
        "model.teacher_embed_dim=64", "model.conv_channels=[32,32,32,32,32,32,32,32,32]",
        "model.dropout=0", "model.attention_dropout=0", "model.activation_dropout=0",
        "model.dropout_input=0", "model.encoder_layerdrop=0",
        "common.fp16=false", "dataset.num_workers=0", "dataset.batch_size=2", "common.seed=7",
        "distributed_training.distributed_world_size=1", "+lr_scheduler.total_num_update=10",
        "lr_scheduler.warmup_updates=2", "optimization.max_update=10",
        "checkpoint.save_interval_updates=2", "dataset.disable_validation=true",
        f"checkpoint.save_dir={save_dir}", f"hydra.run.dir={save_dir}",
    ]


def train(teacher: Path, save_dir: Path, kill_at: str = "", env=None) -> subprocess.CompletedProcess:
    """The real console script, or the same entry point killing itself at ``kill_at``."""
    cmd = [sys.executable, KILLER] if kill_at else [console_script("fairseq-hydra-train")]
    extra = {**ONE_THREAD, **(env or {}), **({"KILL_AT": kill_at} if kill_at else {})}
    proc = run(cmd + overrides(teacher, save_dir), cwd=save_dir.parent, env=extra, check=False)
    if kill_at:
        assert proc.returncode == -9, (kill_at, proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def loaded_update(proc: subprocess.CompletedProcess) -> str:
    found = re.findall(r"Loaded checkpoint (\S+) \(epoch \d+ @ (\d+) updates\)", proc.stdout + proc.stderr)
    return f"{Path(found[-1][0]).name}@{found[-1][1]}" if found else "fresh"


def weights(path: Path):
    return torch.load(str(path), map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_hubert_checkpoint(
        tmp_path_factory.mktemp("teacher") / "teacher.pt", layers=2, embed_dim=64, ffn_dim=128, heads=4
    )


def test_killed_around_checkpoint_writes_resumes_to_the_same_weights(tmp_path, teacher):
    full_dir, killed = tmp_path / "full", tmp_path / "killed"
    with ThreadPoolExecutor(max_workers=1) as pool:
        full = pool.submit(train, teacher, full_dir)

        # 1. mid-copy to checkpoint_last: the previous checkpoint_last.pt (update 2) stays whole
        train(teacher, killed, "copy:checkpoint_1_4.pt")
        assert (killed / "checkpoint_last.pt.tmp").is_file()
        # 2. re-run from update 2 on upstream's save path: killed as the copy to
        # checkpoint_last.pt began (the file exists, 0 bytes: the case)
        second = train(teacher, killed, "copy0:checkpoint_1_6.pt", env=FIX_OFF)
        assert loaded_update(second) == "checkpoint_last.pt@2", second.stdout[-3000:]
        assert (killed / "checkpoint_last.pt").stat().st_size == 0
        upstream = train(teacher, killed, env=FIX_OFF)
        assert upstream.returncode != 0 and "EOFError" in upstream.stderr, upstream.stderr[-3000:]
        # 3. with the fix: the newest readable checkpoint, named with the broken one
        last = train(teacher, killed)
        assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
        output = last.stdout + last.stderr
        assert f"{killed / 'checkpoint_last.pt'} is unreadable (it is empty (0 bytes)" in output, output[-3000:]
        assert f"resuming from {killed / 'checkpoint_1_6.pt'}" in output, output[-3000:]
        assert loaded_update(last) == "checkpoint_1_6.pt@6"

        reference = full.result()
        assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    resumed, uninterrupted = weights(killed / "checkpoint_last.pt"), weights(full_dir / "checkpoint_last.pt")
    assert resumed["optimizer_history"][-1]["num_updates"] == uninterrupted["optimizer_history"][-1]["num_updates"] == 10
    assert resumed["model"].keys() == uninterrupted["model"].keys()
    for name, tensor in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=1e-6, msg=name)


def test_no_readable_checkpoint_says_what_to_do(tmp_path):
    """Unit level: the fallback's choice, and the stop when nothing in the folder is readable."""
    from fairseq_kd_compat.resume import SafePathManager, newest_readable, unreadable

    good = tmp_path / "checkpoint_1_2.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, good)
    (tmp_path / "checkpoint_last.pt").write_bytes(good.read_bytes()[:100])
    assert "truncated" in unreadable(str(tmp_path / "checkpoint_last.pt"))
    assert newest_readable(str(tmp_path), exclude=str(tmp_path / "checkpoint_last.pt")) == str(good)
    good.write_bytes(b"")
    assert newest_readable(str(tmp_path), exclude=str(tmp_path / "checkpoint_last.pt")) is None

    # a copy that does not verify never replaces the destination
    class Broken:
        @staticmethod
        def copy(*args, **kwargs):
            raise AssertionError("not used for local paths")

    dst = tmp_path / "checkpoint_best.pt"
    dst.write_bytes(b"previous")
    with pytest.raises(OSError, match="unreadable"):
        SafePathManager(Broken).copy(str(tmp_path / "checkpoint_last.pt"), str(dst), overwrite=True)
    assert dst.read_bytes() == b"previous" and not (tmp_path / "checkpoint_best.pt.tmp").exists()
