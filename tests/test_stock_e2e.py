"""fairseq's own stack, end to end on the bundled corpus, through the real console scripts.

HuBERT pre-training (MFCC k-means targets, fairseq's `hubert_base_librispeech.yaml` shrunk by
overrides) -> resume from checkpoint_last.pt -> CTC fine-tuning (`base_10h.yaml`) -> Viterbi
decoding with fairseq's infer.py. It proves the compatibility layer, before any plugin code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List

import pytest

from conftest import CPU, MANIFESTS, console_script, hubert_pretrain, make_km_labels, run, train_logs

@pytest.fixture(scope="module")
def km_labels(tmp_path_factory) -> Path:
    return make_km_labels(tmp_path_factory.mktemp("labels"))


def pretrain(fairseq_dir: Path, labels: Path, save_dir: Path, max_update: int) -> str:
    return hubert_pretrain(fairseq_dir, labels, save_dir, max_update, extra=[
        "lr_scheduler.warmup_updates=2", "+lr_scheduler.total_num_update=6",
        "checkpoint.save_interval_updates=2", "dataset.validate_interval_updates=2",
    ])


def test_stock_hubert_pretrain_resume_finetune_decode(tmp_path, fairseq_dir, km_labels):
    # a different working directory from the repo: the manifests must still resolve
    pt_dir = tmp_path / "pretrain"
    first = train_logs(pretrain(fairseq_dir, km_labels, pt_dir, max_update=4))
    assert [r["num_updates"] for r in first][-1] == "4"
    assert (pt_dir / "checkpoint_last.pt").is_file()

    # resume: the same run continues (update count and LR schedule), it does not restart
    second_out = pretrain(fairseq_dir, km_labels, pt_dir, max_update=6)
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 4 updates\)", second_out)
    second = train_logs(second_out)
    assert [r["num_updates"] for r in second] == ["5", "6"]
    # polynomial decay to 0 over 6 updates after 2 warm-up updates: lr(5) = 5e-4 * (6-5)/(6-2)
    assert float(second[0]["lr"]) == pytest.approx(5e-4 * 1 / 4, rel=1e-3)

    ft_dir = tmp_path / "finetune"
    run([
        console_script("fairseq-hydra-train"),
        "--config-dir", str(fairseq_dir / "examples/hubert/config/finetune"),
        "--config-name", "base_10h",
        f"task.data={MANIFESTS}", f"task.label_dir={MANIFESTS}",
        f"model.w2v_path={pt_dir / 'checkpoint_last.pt'}", *CPU,
        "dataset.max_tokens=120000", "optimization.max_update=6", "optimization.lr=[1e-3]",
        "model.freeze_finetune_updates=0", "model.mask_channel_length=8",
        "lr_scheduler.warmup_steps=2", "lr_scheduler.decay_steps=4",
        "dataset.validate_interval=1", "checkpoint.save_interval=1",
        f"checkpoint.save_dir={ft_dir}", f"hydra.run.dir={ft_dir}",
    ], cwd=tmp_path)
    checkpoint = ft_dir / "checkpoint_best.pt"
    assert checkpoint.is_file()

    results = tmp_path / "decode"
    run([
        console_script("fairseq-kd-infer"),
        "--config-dir", str(fairseq_dir / "examples/hubert/config/decode"),
        "--config-name", "infer_viterbi",
        f"task.data={MANIFESTS}", "task.normalize=false", f"common_eval.path={checkpoint}",
        f"common_eval.results_path={results}", "dataset.gen_subset=valid", "common.cpu=true",
        f"decoding.results_path={results}",
    ], cwd=tmp_path)
    wer_files = list(results.glob("wer.*"))
    assert len(wer_files) == 1
    wer = float(re.search(r"WER: ([\d.]+)", wer_files[0].read_text()).group(1))
    assert wer >= 0.0
    hypos = (results / "hypo.word").read_text().splitlines()
    refs = (results / "ref.word").read_text().splitlines()
    valid_rows = len((MANIFESTS / "valid.tsv").read_text().splitlines()) - 1
    assert len(hypos) == len(refs) == valid_rows
