"""Shared helpers: paths of the repo and the bundled corpus, and running console scripts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest

# the audio-check cache (fairseq_kd.data.audio_checks) of test runs and their subprocesses: never ~/.cache
os.environ.setdefault("FAIRSEQ_KD_CACHE_DIR", tempfile.mkdtemp(prefix="fairseq_kd_test_cache_"))

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
BIN = Path(sys.executable).parent


def console_script(name: str) -> str:
    """Path of a console script installed beside this interpreter (the test venv's bin/)."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed beside {sys.executable}; run the README's install")
    return str(path)


def run(
    cmd: List[str],
    cwd: Optional[Path] = None,
    env: Optional[Dict[str, str]] = None,
    timeout: int = 600,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run a command; on failure show its output, which is where fairseq puts the reason."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def json_logs(stdout: str, kind: str = "train_inner") -> List[dict]:
    """The json records fairseq logs (common.log_format=json): train_inner, valid, train."""
    records = []
    for line in stdout.splitlines():
        match = re.search(r"\]\[" + kind + r"\]\[INFO\] - (\{.*\})$", line)
        if match:
            records.append(json.loads(match.group(1)))
    return records


def train_logs(stdout: str) -> List[dict]:
    return json_logs(stdout, "train_inner")


def compose_preset(name: str, overrides: List[str]) -> Dict[str, object]:
    """A preset composed as ``fairseq-hydra-train --config-name NAME`` does, as plain containers."""
    from fairseq_kd.presets import compose_preset_container

    return compose_preset_container(name, overrides)


def edited_cfg(base: Dict[str, object], edits: Dict[str, object]):
    """A composed preset with ``{"group.key": value}`` edits, as hydra_train's plain struct config."""
    import copy

    from omegaconf import OmegaConf

    plain = copy.deepcopy(base)
    for key, value in edits.items():
        group, name = key.split(".", 1)
        plain[group][name] = value
    cfg = OmegaConf.create(plain)
    OmegaConf.set_struct(cfg, True)
    return cfg


def waves(*lengths: int, seed: int = 0):
    """Right-padded batch of random waveforms, its (B, S) padding mask and the rows alone."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randn(n, generator=gen) for n in lengths]
    source = torch.zeros(len(rows), max(lengths))
    mask = torch.ones(len(rows), max(lengths), dtype=torch.bool)
    for i, row in enumerate(rows):
        source[i, : len(row)] = row
        mask[i, : len(row)] = False
    return source, mask, rows


def python_snippet(code: str, **kwargs) -> subprocess.CompletedProcess:
    return run([sys.executable, "-c", code], **kwargs)


@pytest.fixture(scope="session")
def fairseq_dir() -> Path:
    import fairseq

    return Path(fairseq.__file__).parent


# -- a small HuBERT teacher trained by fairseq's own hubert_pretraining ---------------------------
TINY_HUBERT = [
    "+model.encoder_layers=2",
    "+model.encoder_embed_dim=64",
    "+model.encoder_ffn_embed_dim=128",
    "+model.encoder_attention_heads=4",
    "model.conv_feature_layers='[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2'",
    "model.final_dim=32",
]
CPU = ["common.fp16=false", "distributed_training.distributed_world_size=1", "dataset.num_workers=0"]


def make_km_labels(out: Path, n_clusters: int = 20) -> Path:
    run([sys.executable, "-m", "fairseq_kd.cli.mfcc_kmeans", "--manifest-dir", str(MANIFESTS),
         "--splits", "train", "valid", "--n-clusters", str(n_clusters), "--n-init", "2",
         "--out-dir", str(out)])
    return out


def hubert_pretrain(fairseq_dir: Path, labels: Path, save_dir: Path, max_update: int,
                    extra: Optional[List[str]] = None) -> str:
    """fairseq's hubert_base_librispeech.yaml, shrunk to a 2 x 64 model for CPU; returns stdout."""
    cmd = [
        console_script("fairseq-hydra-train"),
        "--config-dir", str(fairseq_dir / "examples/hubert/config/pretrain"),
        "--config-name", "hubert_base_librispeech",
        f"task.data={MANIFESTS}", f"task.label_dir={labels}", "task.labels=[km]",
        "model.label_rate=100", *TINY_HUBERT, *CPU,
        "dataset.max_tokens=120000", f"optimization.max_update={max_update}",
        f"checkpoint.save_dir={save_dir}", f"hydra.run.dir={save_dir}",
        "common.log_interval=1", "common.log_format=json", "common.seed=3", *(extra or []),
    ]
    return run(cmd, cwd=save_dir.parent).stdout


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory, fairseq_dir) -> Path:
    """checkpoint_last.pt of a 2 x 64 HuBERT pre-trained for 30 updates on the bundled corpus."""
    work = tmp_path_factory.mktemp("teacher")
    labels = make_km_labels(work / "labels")
    hubert_pretrain(fairseq_dir, labels, work / "pretrain", max_update=30,
                    extra=["lr_scheduler.warmup_updates=5", "dataset.disable_validation=true",
                           "model.encoder_layerdrop=0.0"])
    return work / "pretrain" / "checkpoint_last.pt"
