"""CTC fine-tuning of distilled students with fairseq's own models, decoding and scoring, end to end.

The pipeline runs the real console scripts on the bundled corpus, as the README's stages do:

1. ``fairseq-hydra-train --config-name thin_deep`` distils two tiny students from a tiny fairseq
   HuBERT: one at the CNN rate (50 Hz), one with time reduction x2 (25 Hz);
2. ``fairseq-hydra-train --config-name finetune_base_10h`` fine-tunes them with ``hubert_ctc``
   (encoder fine-tuned from the first update, CNN frozen by the preset's ``feature_grad_mult: 0``),
   and the 50 Hz one once more with ``model._name=wav2vec_ctc`` and a fully frozen encoder;
3. the distillation checkpoints AND the teacher are deleted;
4. ``fairseq-kd-infer --config-name decode_viterbi`` decodes the two ``hubert_ctc`` checkpoints
   (task ``audio_finetuning``: the plugin task is not needed to decode), ``fairseq-kd-score``
   writes ``wer.txt`` / ``cer.txt``, and ``fairseq-validate`` validates the ``wav2vec_ctc`` one.

Runs of one stage go in parallel (fairseq's start-up is single-threaded and dominates these runs).
Bad input is checked in-process on the composed preset, through the calls ``fairseq_cli.train.main``
makes before the first step (``setup_task``, ``build_model``, ``load_dataset``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch

from conftest import CPU, MANIFESTS, compose_preset, console_script, edited_cfg, json_logs, train_logs
from fairseq_checkpoints import make_hubert_checkpoint, make_wav2vec2_checkpoint

TINY_STUDENT = [
    "model.encoder_layers=2", "model.encoder_embed_dim=64", "model.encoder_ffn_embed_dim=64",
    "model.encoder_attention_heads=4", "model.hint_layer_ids=[1,2]", "model.teacher_embed_dim=64",
    "model.conv_channels=[32,32,32,32,32,32,64,64,64]",
]
DISTILL_QUICK = [
    *CPU, "dataset.batch_size=4", "task.max_sample_size=32000", "optimization.max_update=3",
    "optimization.update_freq=[1]", "dataset.disable_validation=true", "lr_scheduler.warmup_updates=1",
]
FINETUNE_QUICK = [
    *CPU, "optimization.max_update=4", "optimization.update_freq=[1]", "dataset.max_tokens=100000",
    "model.mask_channel_length=8",  # 64-dim students: the recipes' 64 would be refused (see below)
    "dataset.validate_after_updates=0", "dataset.validate_interval=1",
    "common.log_interval=1", "common.log_format=json",
]
DECODE_ROWS = 8  # decoding runs utterance by utterance (decode_viterbi: batch_size 1); 8 of valid's 24


def run_parallel(jobs: Dict[str, Tuple[List[str], Path]], check: bool = True) -> Dict[str, subprocess.CompletedProcess]:
    """Start every command at once; wait for all; on failure show the failing command's output.

    Output goes to files (a full pipe would stall a process until its turn to be read).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = {}
    for name, (cmd, cwd) in jobs.items():
        with open(cwd / f"{name}.stdout", "w") as out, open(cwd / f"{name}.stderr", "w") as err:
            procs[name] = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
    results = {}
    for name, proc in procs.items():
        proc.wait(timeout=600)
        cwd = jobs[name][1]
        out, err = (cwd / f"{name}.stdout").read_text(), (cwd / f"{name}.stderr").read_text()
        results[name] = subprocess.CompletedProcess(jobs[name][0], proc.returncode, out, err)
    for name, result in results.items():
        if check and result.returncode != 0:
            raise AssertionError(
                f"{name} failed ({result.returncode}): {' '.join(result.args)}\n"
                f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
            )
    return results


def encoder_state(path: Path, prefix: str = "") -> Dict[str, torch.Tensor]:
    """Encoder weights of a checkpoint (our own files: full unpickling is fine), keyed as the student's."""
    state = torch.load(str(path), map_location="cpu", weights_only=False)["model"]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Dict[str, Any]:
    work = tmp_path_factory.mktemp("finetune")
    start = time.monotonic()
    stages = {}
    teacher = make_hubert_checkpoint(work / "teacher.pt")

    # 1. distil a 50 Hz and a 25 Hz student
    students = {"plain": ["model.time_reduction_factor=1"], "reduced": ["model.time_reduction_factor=2"]}
    run_parallel({
        # paths relative to the launch folder, as in the README (hydra runs the job elsewhere)
        name: ([console_script("fairseq-hydra-train"), "--config-name", "thin_deep",
                f"task.data={os.path.relpath(MANIFESTS, work)}", f"task.teacher_path={teacher.name}", *TINY_STUDENT, *DISTILL_QUICK, *extra,
                f"checkpoint.save_dir={work / name}", f"hydra.run.dir={work / name}"], work)
        for name, extra in students.items()
    })
    stages["distil"] = time.monotonic() - start
    student = {name: work / name / "checkpoint_last.pt" for name in students}
    kept = work / "kept"  # copies for the in-process checks, under other names
    kept.mkdir()
    for name, path in student.items():
        shutil.copy(path, kept / f"{name}.pt")
    before = {name: encoder_state(path) for name, path in student.items()}

    # 2. fine-tune: hubert_ctc on both (encoder trained from update 0), wav2vec_ctc fully frozen
    runs = {
        "hubert": ("plain", ["model.freeze_finetune_updates=0"]),
        "reduced": ("reduced", ["model.freeze_finetune_updates=0"]),
        "w2v_frozen": ("plain", ["model._name=wav2vec_ctc", "model.freeze_finetune_updates=1000000"]),
    }
    finetune_out = run_parallel({
        run: ([console_script("fairseq-hydra-train"), "--config-name", "finetune_base_10h",
               f"task.data={MANIFESTS}", f"model.w2v_path={student[source].relative_to(work)}", *FINETUNE_QUICK, *extra,
               f"checkpoint.save_dir={work / 'ft' / run}", f"hydra.run.dir={work / 'ft' / run}"], work)
        for run, (source, extra) in runs.items()
    })
    stages["fine-tune"] = time.monotonic() - start - sum(stages.values())
    finetuned = {run: work / "ft" / run / "checkpoint_best.pt" for run in runs}

    # 3. nothing of the distillation stage is left
    for path in [teacher, *student.values()]:
        path.unlink()

    # 4. decode the hubert_ctc ones (plain audio_finetuning task), validate the wav2vec_ctc one
    decode_data = copy_data(work / "decode_data", rows=DECODE_ROWS)
    decoded = ("hubert", "reduced")
    jobs = {
        f"decode_{run}": ([console_script("fairseq-kd-infer"), "--config-name", "decode_viterbi",
                           f"task.data={decode_data}", "dataset.gen_subset=valid", "common.cpu=true",
                           f"common_eval.path={finetuned[run].relative_to(work)}", f"decoding.results_path=decode/{run}"], work)
        for run in decoded
    }
    jobs["validate"] = ([console_script("fairseq-validate"), str(MANIFESTS), "--path", str(finetuned["w2v_frozen"]),
                         "--task", "audio_finetuning", "--user-dir", "fairseq_kd", "--valid-subset", "valid",
                         "--cpu", "--max-tokens", "1100000"], work)
    stage4 = run_parallel(jobs)
    stages["decode/validate"] = time.monotonic() - start - sum(stages.values())
    print("pipeline stages (s):", {k: round(v, 1) for k, v in stages.items()})
    return {
        "work": work, "kept": kept, "before": before, "finetuned": finetuned, "finetune_out": finetune_out,
        "results": {run: work / "decode" / run for run in decoded}, "stage4": stage4,
    }


# -- end to end ------------------------------------------------------------------------------------
def test_finetuned_checkpoints_decode_and_score_without_student_or_teacher(pipeline):
    from fairseq_kd.cli.score import main as score_main

    for run, results in pipeline["results"].items():
        for name in ("hypo.word", "ref.word", "hypo.units", "ref.units"):
            assert len((results / name).read_text().splitlines()) == DECODE_ROWS, (run, name)
        assert score_main([str(results)]) == 0
        wer = (results / "wer.txt").read_text()
        cer = (results / "cer.txt").read_text()
        assert re.match(r"WER: \d+\.\d\d\nerr / num_ref_words = \d+ / \d+\nutterances: 8\n$", wer), wer
        assert re.match(r"CER: \d+\.\d\d\nerr / num_ref_units = \d+ / \d+\nutterances: 8\n$", cer), cer
        # infer.py's own count agrees with ours
        infer_count = re.search(r"err / num_ref_words = \d+ / \d+", (results / "wer").read_text()).group(0)
        assert infer_count in wer, run


def test_finetuned_checkpoint_carries_the_student(pipeline):
    """What makes decoding self-contained: w2v_args in the model config, no teacher, no heads."""
    expected = {"hubert": ("hubert_ctc", "thin_hubert", 1), "reduced": ("hubert_ctc", "thin_hubert", 2),
                "w2v_frozen": ("wav2vec_ctc", "thin_hubert_w2v", 1)}
    for run, path in pipeline["finetuned"].items():
        state = torch.load(str(path), map_location="cpu", weights_only=False)
        model_cfg = state["cfg"]["model"]
        ctc, student, factor = expected[run]
        assert state["cfg"]["task"]["_name"] == "kd_audio_finetuning"
        assert model_cfg["_name"] == ctc
        assert model_cfg["w2v_args"]["model"]["_name"] == student
        assert model_cfg["w2v_args"]["model"]["time_reduction_factor"] == factor
        assert not os.path.exists(model_cfg["w2v_path"]) and not os.path.exists(model_cfg["w2v_args"]["task"]["teacher_path"])
        assert not [k for k in state["model"] if "teacher" in k or "hint_heads" in k or "pred_head" in k], run


def test_time_reduced_student_passes_the_ctc_length_check(pipeline):
    out = pipeline["finetune_out"]["reduced"].stdout
    assert "CTC length check (train): all 210 utterances have enough output frames" in out
    assert "CTC length check (valid): all 24 utterances" in out
    assert [r["num_updates"] for r in train_logs(out)] == ["1", "2", "3", "4"]
    valid = json_logs(out, "valid")[-1]
    assert float(valid["valid_uer"]) > 0  # fairseq's ctc criterion: CER on valid


def test_validate_reads_only_the_finetuned_checkpoint(pipeline):
    """fairseq-validate on the wav2vec_ctc checkpoint: its student is rebuilt as thin_hubert_w2v."""
    out = pipeline["stage4"]["validate"].stdout
    assert re.search(r"valid on 'valid' subset \| loss [\d.]+ .*\| uer [\d.]+ \| wer [\d.]+", out), out[-3000:]


def test_encoder_frozen_or_finetuned(pipeline):
    before = pipeline["before"]["plain"]
    cnn = [k for k in before if k.startswith("feature_extractor.")]
    layers = [k for k in before if k.startswith("encoder.layers.")]
    assert cnn and layers

    tuned = encoder_state(pipeline["finetuned"]["hubert"], "w2v_encoder.w2v_model.")
    assert set(tuned) <= set(before)
    # feature_grad_mult 0.0 (the preset): the CNN stays as distilled, the transformer trains
    assert all(torch.equal(tuned[k], before[k]) for k in cnn)
    assert sum(not torch.equal(tuned[k], before[k]) for k in layers) >= len(layers) // 2

    # freeze_finetune_updates >= max_update: no encoder weight changes, only the output layer trains
    frozen = encoder_state(pipeline["finetuned"]["w2v_frozen"], "w2v_encoder.w2v_model.")
    assert set(frozen) == set(tuned)
    changed = [k for k in frozen if not torch.equal(frozen[k], before[k])]
    assert changed == []
    out = pipeline["finetune_out"]["w2v_frozen"].stdout
    assert float(json_logs(out, "train")[-1]["train_gnorm"]) > 0  # the CTC output layer did train


# -- in-process: the checks before the first step ---------------------------------------------------
@pytest.fixture(scope="module")
def base_cfg() -> Dict[str, Any]:
    """finetune_base_10h with the CPU/quick overrides, composed as fairseq-hydra-train does."""
    return compose_preset("finetune_base_10h", [*FINETUNE_QUICK, f"task.data={MANIFESTS}"])


def build(base: Dict[str, Any], edits: Dict[str, Any], split: str = "valid"):
    """setup_task + build_model + load_dataset, as fairseq_cli.train.main before the first step."""
    from fairseq import tasks

    cfg = edited_cfg(base, edits)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    if split:
        task.load_dataset(split)
    return task, model


def copy_data(dest: Path, edit_ltr=None, drop_dict: bool = False, rows: int = None) -> Path:
    """The bundled valid split (or its first ``rows``) with an absolute audio root, optionally
    with edited labels."""
    dest.mkdir(parents=True, exist_ok=True)
    tsv = (MANIFESTS / "valid.tsv").read_text().splitlines()
    (dest / "valid.tsv").write_text("\n".join([str(MANIFESTS / tsv[0]), *tsv[1:][:rows]]) + "\n")
    lines = (MANIFESTS / "valid.ltr").read_text().splitlines()[:rows]
    (dest / "valid.ltr").write_text("".join(f"{line}\n" for line in (edit_ltr(lines) if edit_ltr else lines)))
    if not drop_dict:
        shutil.copy(MANIFESTS / "dict.ltr.txt", dest / "dict.ltr.txt")
    return dest


@pytest.fixture(scope="module")
def bad_files(pipeline, tmp_path_factory) -> Dict[str, Path]:
    d = tmp_path_factory.mktemp("bad_files")
    (d / "garbage.pt").write_bytes(bytes(range(256)) * 16)
    torch.save({"weights": torch.zeros(3)}, d / "plain_torch.pt")
    make_wav2vec2_checkpoint(d / "wav2vec2.pt")
    make_hubert_checkpoint(d / "hubert_normalized.pt", normalize=True)
    return {
        "missing": d / "does_not_exist.pt",
        "garbage": d / "garbage.pt",
        "plain_torch": d / "plain_torch.pt",
        "wav2vec2": d / "wav2vec2.pt",
        "hubert_normalized": d / "hubert_normalized.pt",
        "finetuned": pipeline["finetuned"]["hubert"],
    }


W2V_PATH_CASES = [
    ("missing", {}, ["model.w2v_path=", "does not exist"]),
    ("garbage", {}, ["is not a PyTorch checkpoint"]),
    ("plain_torch", {}, ["not a fairseq training checkpoint"]),
    ("finetuned", {}, ["is already a fine-tuned model (hubert_ctc, fine-tuned from", "fairseq-kd-infer"]),
    ("wav2vec2", {}, ["holds a 'wav2vec2' model", "model._name=hubert_ctc", "model._name=wav2vec_ctc"]),
    ("hubert_normalized", {}, ["task.normalize=false", "trained with normalize=true", "set task.normalize=true"]),
]


@pytest.mark.parametrize("which,edits,expected", W2V_PATH_CASES, ids=[c[0] for c in W2V_PATH_CASES])
def test_bad_w2v_path_is_refused(base_cfg, bad_files, which, edits, expected):
    from fairseq_kd.tasks.kd_finetuning import FinetuneInputError

    path = str(bad_files[which])
    with pytest.raises(FinetuneInputError) as error:
        build(base_cfg, {"model.w2v_path": path, **edits}, split=None)
    for part in expected:
        assert part in str(error.value), str(error.value)
    assert path in str(error.value)


def test_narrow_student_with_recipe_channel_masking_is_refused(base_cfg, pipeline):
    from fairseq_kd.tasks.kd_finetuning import FinetuneInputError

    with pytest.raises(FinetuneInputError, match=r"mask_channel_length=64 = 0.5 < 1.*model.mask_channel_length=32 or less"):
        build(base_cfg, {"model.w2v_path": str(pipeline["kept"] / "plain.pt"), "model.mask_channel_length": 64}, split=None)


def _with_symbol(lines):
    lines = list(lines)
    lines[4] = lines[4].replace("E", "É", 1)
    return lines


LABEL_CASES = [
    ("label_file_shorter", dict(edit_ltr=lambda lines: lines[:-1]),
     ["valid.ltr has 23 lines", "valid.tsv has 24 rows", "valid.tsv:25 (valid/", "no label line"]),
    ("label_file_longer", dict(edit_ltr=lambda lines: [*lines, "X |"]),
     ["valid.ltr has 25 lines", "valid.ltr lines 25-25 have no manifest row", "'X |'"]),
    ("symbol_not_in_dict", dict(edit_ltr=_with_symbol),
     ["valid.ltr: 1 lines hold symbols that are not in", "dict.ltr.txt", "valid.ltr:5: 'É'", "<unk>"]),
    ("dict_missing", dict(drop_dict=True), ["dict.ltr.txt, which does not exist"]),
]


@pytest.mark.parametrize("kwargs,expected", [c[1:] for c in LABEL_CASES], ids=[c[0] for c in LABEL_CASES])
def test_bad_labels_are_refused(base_cfg, pipeline, tmp_path, kwargs, expected):
    from fairseq_kd.tasks.kd_finetuning import FinetuneInputError

    data = copy_data(tmp_path / "data", **kwargs)
    with pytest.raises(FinetuneInputError) as error:
        build(base_cfg, {"task.data": str(data), "model.w2v_path": str(pipeline["kept"] / "plain.pt")})
    for part in expected:
        assert part in str(error.value), str(error.value)


def test_ctc_length_check_warn_error_skip(base_cfg, pipeline, tmp_path, caplog):
    """A transcript far longer than its audio allows at 25 Hz: counted, shown, stopped or left out."""
    from fairseq_kd.tasks.kd_finetuning import FinetuneInputError

    def long_line(lines):
        lines = list(lines)
        lines[2] = " ".join([lines[2]] * 4)  # row 3: four times the text, same audio
        return lines

    data = copy_data(tmp_path / "data", edit_ltr=long_line)
    edits = {"task.data": str(data), "model.w2v_path": str(pipeline["kept"] / "reduced.pt")}
    with caplog.at_level(logging.WARNING, logger="fairseq_kd.tasks.kd_finetuning"):
        task, _ = build(base_cfg, {**edits, "task.ctc_length_check": "warn"})
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "CTC length check (valid): 1 of 24 utterances have fewer output frames (25 per second)" in warning
    example = r"valid\.tsv:4 valid/\S+\.flac \([\d.]+ s\): \d+ frames < \d+ needed \(\d+ tokens \+ \d+ repeats\)"
    assert re.search(example, warning), warning

    with pytest.raises(FinetuneInputError, match=r"1 of 24 utterances.*task.ctc_length_check=skip"):
        build(base_cfg, {**edits, "task.ctc_length_check": "error"})

    task, _ = build(base_cfg, {**edits, "task.ctc_length_check": "skip"})
    dataset = task.dataset("valid")
    kept = task.filter_indices_by_size(np.arange(len(dataset)), dataset, (sys.maxsize, sys.maxsize))
    assert sorted(set(range(len(dataset))) - set(kept.tolist())) == [2]


def test_output_frame_count_matches_the_student(pipeline):
    """The check's conv arithmetic + ceil(T / r) is what the student really outputs, alone and padded."""
    from fairseq import checkpoint_utils

    from fairseq_kd.tasks.kd_finetuning import ctc_min_frames, output_frames_fn

    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(pipeline["kept"] / "reduced.pt")])
    model = models[0].eval()
    frames, rate = output_frames_fn(model, 16000)
    assert rate == 25.0
    lengths = [800, 1999, 16000, 16321, 24479]
    with torch.no_grad():
        for n in lengths:
            x, _ = model.extract_features(torch.randn(1, n))
            assert x.size(1) == frames(np.array([n]))[0], n
        batch = torch.zeros(len(lengths), max(lengths))
        padding = torch.ones(len(lengths), max(lengths), dtype=torch.bool)
        for i, n in enumerate(lengths):
            batch[i, :n] = torch.randn(n)
            padding[i, :n] = False
        _, mask = model.extract_features(batch, padding_mask=padding)
        assert (~mask).sum(-1).tolist() == frames(np.array(lengths)).tolist()
    assert ctc_min_frames("H E L L O | W O R L D |".split()) == 12 + 1


def test_score_rejects_mismatched_results(tmp_path):
    from fairseq_kd.cli.score import main as score_main

    for name, text in [("hypo.word", "A B (None-0)\n"), ("ref.word", "A C (None-1)\n"),
                       ("hypo.units", "A | (None-0)\n"), ("ref.units", "A | (None-0)\n")]:
        (tmp_path / name).write_text(text)
    assert score_main([str(tmp_path)]) == 2
    (tmp_path / "ref.word").write_text("A C (None-0)\n")
    assert score_main([str(tmp_path)]) == 0
    assert (tmp_path / "wer.txt").read_text().startswith("WER: 50.00\n")
    assert (tmp_path / "cer.txt").read_text().startswith("CER: 0.00\n")
