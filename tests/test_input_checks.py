"""Issue #16: nothing bad gets past the door, in every task, before any compute is spent.

* One manifest check (``fairseq_kd/data/audio_checks.py``) in ``distill_hubert``,
  ``kd_audio_finetuning`` and ``kws_sv``: each case is loaded through each task's ``load_dataset``
  (what ``fairseq_cli.train.main`` calls before the first step), and must stop with the same
  ``file:line`` message; ``task.skip_bad_rows=true`` skips and counts exactly the bad rows, the
  label files staying in step.
* Audio content: a truncated FLAC with an intact header and NaN / Inf samples are found by decoding,
  once: the cache (path, size, mtime) makes a second check decode nothing.
* ``dataset.max_tokens`` below the shortest utterance names the key and the size needed.
* A run folder belongs to one run (``fairseq_kd/tasks/run_folder.py``).
* The minimal ``args`` + ``model`` checkpoint layout loads as a teacher.
* Console scripts: the project's errors are one line and exit code 2; ``FAIRSEQ_KD_DEBUG=1`` shows
  the traceback; ``--force`` replaces only what the command writes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import MANIFESTS, compose_preset, console_script, edited_cfg, run
from fairseq_checkpoints import make_hubert_checkpoint, make_legacy_args_checkpoint

RATE = 16_000
CPU = ["common.fp16=false", "distributed_training.distributed_world_size=1", "dataset.num_workers=0"]
LENGTHS = (17_000, 17_001, 17_002, 17_003)
TASKS = ("distill_hubert", "kd_audio_finetuning", "kws_sv")


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    for i, n in enumerate(LENGTHS):
        sf.write(d / f"good{i}.flac", 0.1 * rng.standard_normal(n), RATE)
    raw = (d / "good0.flac").read_bytes()
    (d / "truncated.flac").write_bytes(raw[: int(len(raw) * 0.7)])  # header intact: 17000 frames
    x = (0.1 * rng.standard_normal(17_000)).astype("float32")
    x[8_000], x[9_000] = np.nan, np.inf
    sf.write(d / "nan.wav", x, RATE, subtype="FLOAT")
    sf.write(d / "stereo.flac", 0.1 * rng.standard_normal((17_000, 2)), RATE)
    (d / "a_folder.flac").mkdir()
    return d


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Dict[str, dict]:
    """The three tasks' presets, composed once; task.data is edited per case."""
    tiny = ["model.encoder_layers=2", "model.encoder_embed_dim=64", "model.encoder_ffn_embed_dim=64",
            "model.encoder_attention_heads=4", "model.hint_layer_ids=[1,2]", "model.teacher_embed_dim=64",
            "model.conv_channels=[32,32,32,32,32,32,32,32,32]", "task.min_sample_size=1000"]
    return {
        "distill_hubert": compose_preset("thin_deep", [*CPU, *tiny, f"task.data={MANIFESTS}"]),
        "kd_audio_finetuning": compose_preset("finetune_base_10m", [*CPU, f"task.data={MANIFESTS}"]),
        "kws_sv": compose_preset("kws_sv_joint", [*CPU, f"task.data={MANIFESTS / 'keywords'}"]),
    }


def write_split(folder: Path, root, rows: List[Tuple[str, int]], text: str = None) -> Path:
    """train.tsv with one label line per row for every task (.ltr, .kw, .spk) and the dictionaries."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_bytes((text if text is not None else
                                        "".join([f"{root}\n", *(f"{p}\t{n}\n" for p, n in rows)])).encode())
    (folder / "train.ltr").write_text("".join("A B |\n" for _ in rows))
    (folder / "train.kw").write_text("".join(("yes\n", "no\n")[i % 2] for i in range(len(rows))))
    (folder / "train.spk").write_text("".join(f"spk{i % 2}\n" for i in range(len(rows))))
    (folder / "dict.ltr.txt").write_text("| 10\nA 5\nB 5\n")
    (folder / "dict.kw.txt").write_text("yes\nno\n")
    (folder / "trials.txt").write_text("")
    return folder / "train.tsv"


def load(configs, name: str, data: Path, edits=None):
    from fairseq import tasks

    cfg = edited_cfg(configs[name], {"task.data": str(data), **(edits or {})})
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    return task


GOOD = [(f"good{i}.flac", n) for i, n in enumerate(LENGTHS)]

# (id, rows with a bad one on line 3 or a whole-manifest text; expected substrings, {tsv} {audio})
CASES = [
    ("truncated_flac", [GOOD[0], ("truncated.flac", 17_000), GOOD[1]], None,
     ["{tsv}:3: {audio}/truncated.flac does not decode", "flac decoder lost sync", "truncated or damaged"]),
    ("nan_inf_audio", [GOOD[0], ("nan.wav", 17_000), GOOD[1]], None,
     ["{tsv}:3: {audio}/nan.wav holds 2 NaN / Inf samples (the first at sample 8000, 0.50 s)"]),
    ("directory_row", [GOOD[0], ("a_folder.flac", 17_000), GOOD[1]], None, ["{tsv}:3: {audio}/a_folder.flac is not a file"]),
    ("stale_count_off_by_one", [GOOD[0], ("good1.flac", 17_002), GOOD[1]], None,
     ["{tsv}:3: {audio}/good1.flac has 17001 samples but the manifest says 17002"]),
    ("stereo", [GOOD[0], ("stereo.flac", 17_000), GOOD[1]], None, ["{tsv}:3: {audio}/stereo.flac has 2 channels"]),
    ("missing_root", [GOOD[0]], "/no/such/root\ngood0.flac\t17000\n", ["{tsv}:1: the audio root '/no/such/root'", "is not a directory"]),
    ("bom_before_root", [GOOD[0]], "\ufeff{audio}\ngood0.flac\t17000\n", ["{tsv}:1: the file starts with a UTF-8 byte-order mark (BOM"]),
    ("crlf", [GOOD[0], GOOD[1]], "{audio}\r\ngood0.flac\t17000\r\ngood1.flac\t17001\r\n", ["{tsv}:1: Windows line ending (CR LF)"]),
    ("header_only", [], "{audio}\n", ["{tsv} has no rows (only the audio root on line 1)"]),
    ("empty_line", [GOOD[0], GOOD[1]], "{audio}\ngood0.flac\t17000\n\ngood1.flac\t17001\n", ["{tsv}:3: empty line"]),
]


@pytest.mark.parametrize("task_name", TASKS)
@pytest.mark.parametrize("rows,text,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_task_runs_the_same_manifest_check(configs, audio, tmp_path, task_name, rows, text, expected):
    from fairseq_kd.data.audio_checks import ManifestError

    tsv = write_split(tmp_path, audio, rows, text.format(audio=audio) if text else None)
    with pytest.raises(ManifestError) as error:
        load(configs, task_name, tmp_path)
    for part in expected:
        assert part.format(tsv=tsv, audio=audio) in str(error.value), str(error.value)


@pytest.mark.parametrize("task_name", TASKS)
def test_skip_bad_rows_skips_content_problems_and_keeps_labels_in_step(configs, audio, tmp_path, task_name, caplog):
    rows = [GOOD[0], ("truncated.flac", 17_000), GOOD[1], ("nan.wav", 17_000), ("a_folder.flac", 1), GOOD[2], GOOD[3]]
    tsv = write_split(tmp_path, audio, rows)
    with caplog.at_level(logging.WARNING, logger="fairseq_kd.data.audio_checks"):
        task = load(configs, task_name, tmp_path, {"task.skip_bad_rows": True})
    warnings = [r.getMessage() for r in caplog.records]
    assert f"skipped 3 of 7 rows of {tsv} (task.skip_bad_rows)" in warnings, warnings
    dataset = task.datasets["train"]
    assert sorted(int(s) for s in dataset.sizes) == list(LENGTHS)
    assert task.cfg.data == str(tmp_path)
    if task_name == "kws_sv":  # labels of the kept rows 2, 4, 7, 8 of train.kw: yes, yes, no, yes
        assert [task.keywords[k] for k in dataset.keywords] == ["yes", "yes", "no", "yes"]
    if task_name == "kd_audio_finetuning":
        assert len(dataset.labels) == 4


def test_decode_once_then_the_cache(audio, tmp_path, monkeypatch, caplog):
    from fairseq_kd.data import audio_checks

    monkeypatch.setenv(audio_checks.ENV_CACHE_DIR, str(tmp_path / "cache"))
    tsv = write_split(tmp_path / "data", audio, GOOD)
    with caplog.at_level(logging.INFO, logger="fairseq_kd.data.audio_checks"):
        audio_checks.validated_manifest(str(tsv), RATE, skip_bad_rows=False)
    assert any("decoded 4 files" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "cache" / audio_checks.CACHE_FILE).is_file()
    calls = []
    monkeypatch.setattr(audio_checks, "decode_facts", lambda path: calls.append(path))
    audio_checks.validated_manifest(str(tsv), RATE, skip_bad_rows=False)
    assert calls == []  # the second check decodes nothing
    os.utime(audio / "good2.flac")  # a newer mtime is another key
    monkeypatch.undo()
    monkeypatch.setenv(audio_checks.ENV_CACHE_DIR, str(tmp_path / "cache"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fairseq_kd.data.audio_checks"):
        audio_checks.validated_manifest(str(tsv), RATE, skip_bad_rows=False)
    assert any("decoded 1 files" in r.getMessage() and "3 from the cache" in r.getMessage() for r in caplog.records)
    # header-only, the documented fast option, does not see the damage
    bad = write_split(tmp_path / "bad", audio, [GOOD[0], ("truncated.flac", 17_000)])
    assert audio_checks.validated_manifest(str(bad), RATE, skip_bad_rows=False, decode=False) == str(bad)


def test_max_tokens_below_the_shortest_utterance(configs):
    from fairseq_kd.data.audio_checks import ManifestError

    task = load(configs, "kd_audio_finetuning", MANIFESTS, {"task.validate_audio": False})
    shortest = int(np.min(task.datasets["train"].sizes))
    with pytest.raises(ManifestError, match=rf"dataset.max_tokens=1000 is below .* \({shortest} samples.*set dataset.max_tokens={shortest}"):
        task.get_batch_iterator(task.datasets["train"], max_tokens=1000)


# -- a run folder belongs to one run ---------------------------------------------------------------
@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> Dict[str, Path]:
    d = tmp_path_factory.mktemp("teachers")
    minimal = d / "minimal.pt"
    state = torch.load(make_legacy_args_checkpoint(d / "legacy.pt", kind="hubert"), weights_only=False)
    torch.save({"args": state["args"], "model": state["model"]}, minimal)  # old releases, converters
    return {"a": make_hubert_checkpoint(d / "a.pt"), "b": make_hubert_checkpoint(d / "b.pt", seed=1), "minimal": minimal}


def test_minimal_args_model_layout_is_a_teacher(teachers):
    from fairseq_kd.teacher import FrozenTeacher

    teacher = FrozenTeacher.from_checkpoint(str(teachers["minimal"]))
    assert teacher.kind == "hubert" and teacher.num_layers == 2


def test_resuming_another_run_is_stopped(configs, teachers, tmp_path):
    from fairseq import tasks
    from omegaconf import OmegaConf

    from fairseq_kd.tasks.run_folder import RunFolderError

    save_dir = tmp_path / "run"
    save_dir.mkdir()

    def build(edits):
        cfg = edited_cfg(configs["distill_hubert"], {"task.teacher_path": str(teachers["a"]),
                                                      "task.run_save_dir": str(save_dir), **edits})
        task = tasks.setup_task(cfg.task)
        return cfg, task, task.build_model(cfg.model)

    cfg, task, model = build({})  # a fresh folder: nothing to check
    torch.save({"cfg": OmegaConf.to_container(cfg), "model": model.state_dict(), "task_state": task.state_dict(),
                "optimizer_history": [{"criterion_name": "x", "optimizer_name": "x", "lr_scheduler_state": {},
                                       "num_updates": 3}], "extra_state": {}, "last_optimizer_state": None},
               save_dir / "checkpoint_last.pt")
    build({})  # the same run resumes
    moved = tmp_path / "moved.pt"
    moved.write_bytes(teachers["a"].read_bytes())
    build({"task.teacher_path": str(moved)})  # the same teacher, moved: same fingerprint
    cases = [
        ({"task.teacher_path": str(teachers["b"])}, ["distilled from the teacher", "a.pt", "b.pt", "another file"]),
        ({"model.encoder_layers": 3, "model.hint_layer_ids": [1, 2, 3], "criterion.hint_layer_ids": [1, 2, 3],
          "criterion.hint_targets": ["1", "2", "2"]}, ["another model architecture"]),
    ]
    for edits, expected in cases:
        with pytest.raises(RunFolderError) as error:
            build(edits)
        message = str(error.value)
        for part in expected + [f"checkpoint.save_dir={save_dir} holds another run", "new checkpoint.save_dir",
                                "task.check_run_folder=false"]:
            assert part in message, message
    build({"task.teacher_path": str(teachers["b"]), "task.check_run_folder": False})  # deliberately


# -- console scripts -------------------------------------------------------------------------------
def test_console_scripts_print_one_message_with_exit_code_2(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": subprocess.Popen}, evil)  # a global outside the allow-list
    script = [console_script("fairseq-kd-summary"), str(evil)]
    env = {"FAIRSEQ_KD_TRUSTED_CHECKPOINTS": ""}
    clean = run(script, cwd=tmp_path, check=False, env=env)
    assert clean.returncode == 2, clean.stderr[-2000:]
    assert "Traceback (most recent call last)" not in clean.stderr and "Popen" in clean.stderr
    assert clean.stderr.strip().splitlines()[-1] == "(FAIRSEQ_KD_DEBUG=1 shows the traceback)"
    debug = run(script, cwd=tmp_path, check=False, env={**env, "FAIRSEQ_KD_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr


def test_export_force_keeps_the_users_files(tmp_path):
    dest = tmp_path / "upstream"
    dest.mkdir()
    (dest / "my_notes.txt").write_text("mine")
    (dest / "expert.py").write_text("stale")
    run([sys.executable, "-m", "fairseq_kd.cli.export", "--s3prl-upstream", str(dest), "--force"], cwd=tmp_path)
    assert (dest / "my_notes.txt").read_text() == "mine"
    assert (dest / "expert.py").read_text() != "stale" and (dest / "hubconf.py").is_file()


def test_make_corpus_replaces_only_its_own_files(tmp_path):
    from fairseq_kd.prep.mini_corpus import replace_corpus

    out, built = tmp_path / "manifests", tmp_path / ".built"
    for folder, files in ((out, {"train.tsv": "old", "audio/a.flac": "old", "audio/mine.txt": "mine", "notes.md": "mine"}),
                          (built, {"train.tsv": "new", "audio/a.flac": "new"})):
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
    replace_corpus(built, out)
    assert {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*") if p.is_file()} == {
        "train.tsv": "new", "audio/a.flac": "new", "audio/mine.txt": "mine", "notes.md": "mine"}
    assert not (tmp_path / "manifests.old").exists()
