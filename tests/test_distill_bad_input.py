"""Bad input to ``distill_hubert`` stops with a clear message before any training step.

The issue's list: a teacher file that is missing, corrupt or not a HuBERT / wav2vec 2.0 checkpoint;
a layer mapping that names a teacher layer that does not exist; a student/teacher ``normalize``
mismatch; manifest rows pointing at missing files, the wrong sample rate, stereo or empty audio. And
others like them: ``task.teacher_path`` unset, malformed or wrong-length ``criterion.hint_targets``
and ``criterion.layer_weights``, ``model.teacher_embed_dim`` not matching the teacher, stale sample
counts, unreadable audio, a row without a tab, a bad first line. Each message must name the file,
the ``file:line`` or the config key, and say how to fix it. With ``task.skip_bad_rows=true`` bad
rows are skipped with a counted warning instead.

Most cases run in-process on the config ``fairseq-hydra-train --config-name thin_deep`` composes
(composed once; each case edits the plain dict, as ``hydra_train`` hands fairseq a plain config),
through ``setup_task`` / ``build_model`` / ``build_criterion`` / ``load_dataset``: the calls
``fairseq_cli.train.main`` makes before the first step. Two real ``fairseq-hydra-train`` runs (in
parallel) show that the error reaches the user that way, with no ``train_inner`` line.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import REPO, compose_preset, console_script, edited_cfg
from fairseq_checkpoints import make_hubert_checkpoint, rewrite_checkpoint
from fairseq_kd.data.audio_checks import ManifestError, validated_manifest
from fairseq_kd.teacher import TeacherError

RATE = 16_000
CPU = ["common.fp16=false", "distributed_training.distributed_world_size=1", "dataset.num_workers=0"]
TINY_STUDENT = [
    "model.encoder_layers=2", "model.encoder_embed_dim=64", "model.encoder_ffn_embed_dim=64",
    "model.encoder_attention_heads=4", "model.hint_layer_ids=[1,2]", "model.teacher_embed_dim=64",
    "model.conv_channels=[32,32,32,32,32,32,32,32,32]", "task.max_sample_size=32000",
    "dataset.batch_size=2",
]
GOOD_LENGTHS = (17_000, 17_001, 17_002)  # above thin_deep's min_sample_size (16000): fairseq keeps them


# -- fixtures: one composed config, tiny teachers, tiny audio ----------------------------------------
@pytest.fixture(scope="module")
def base_cfg() -> Dict[str, Any]:
    """thin_deep + the tiny student, composed as fairseq-hydra-train does; teacher_path left '???'."""
    return compose_preset("thin_deep", [*CPU, *TINY_STUDENT, f"task.data={REPO / 'manifests'}"])


def build(base: Dict[str, Any], edits: Dict[str, Any]):
    """What fairseq_cli.train.main does before the datasets: task, model (loads the teacher), criterion."""
    from fairseq import tasks

    # composing resolved criterion.hint_layer_ids: ${model.hint_layer_ids} (and pred_layer_ids):
    # an edit of the model's ids reaches the criterion as a command-line override would
    for key in ("hint_layer_ids", "pred_layer_ids"):
        if f"model.{key}" in edits:
            edits = {f"criterion.{key}": edits[f"model.{key}"], **edits}
    cfg = edited_cfg(base, edits)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return task, model, criterion


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> Dict[str, Path]:
    """A good tiny HuBERT teacher (2 layers x 64, normalize=False, 16 kHz) and broken variants."""
    d = tmp_path_factory.mktemp("teachers")
    good = make_hubert_checkpoint(d / "hubert.pt")
    raw = good.read_bytes()
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])  # an interrupted download
    damaged = bytearray(raw)
    mid = len(raw) // 2
    damaged[mid : mid + 64] = bytes(b ^ 0xFF for b in damaged[mid : mid + 64])  # inside a tensor record
    (d / "damaged.pt").write_bytes(bytes(damaged))
    (d / "garbage.pt").write_bytes(bytes(range(256)) * 16)
    torch.save({"weights": torch.zeros(3)}, d / "plain_torch.pt")

    def renamed(name):
        def edit(state):
            state["cfg"]["model"]["_name"] = name
            return state
        return edit

    def no_weights(state):
        state["model"] = {}
        return state

    rewrite_checkpoint(good, d / "hubert_ctc.pt", renamed("hubert_ctc"))
    rewrite_checkpoint(good, d / "wav2vec1.pt", renamed("wav2vec"))
    rewrite_checkpoint(good, d / "no_weights.pt", no_weights)
    files = {p.stem: p for p in d.iterdir()}
    files["missing"] = d / "does_not_exist.pt"
    files["directory"] = d
    return files


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    """Small FLAC / WAV files: three good ones and one of each kind of bad one."""
    d = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    for i, n in enumerate(GOOD_LENGTHS):
        sf.write(d / f"good{i}.flac", 0.1 * rng.standard_normal(n), RATE)
    sf.write(d / "rate8k.flac", 0.1 * rng.standard_normal(8_500), 8_000)
    sf.write(d / "stereo.flac", 0.1 * rng.standard_normal((17_000, 2)), RATE)
    sf.write(d / "empty.flac", np.zeros(0), RATE)  # libsndfile writes a 0-byte file for a 0-frame FLAC
    sf.write(d / "empty.wav", np.zeros(0), RATE)  # a WAV header with no frames
    (d / "garbage.flac").write_bytes(b"this is not audio\n" * 100)
    (d / "a_folder.flac").mkdir()
    return d


def write_tsv(path: Path, root: Any, rows: Sequence[Tuple[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join([f"{root}\n", *(f"{p}\t{n}\n" for p, n in rows)]))
    return path


GOOD_ROW = ("good0.flac", GOOD_LENGTHS[0])


# -- teacher and layer-mapping settings ---------------------------------------------------------------
# (id, edits beyond task.teacher_path=<good teacher>, teacher file to use instead, expected substrings);
# "{teacher}" in an expected string stands for the teacher path used.
CONFIG_CASES = [
    ("teacher_missing", {}, "missing", ["{teacher}", "does not exist", "pre-trained fairseq HuBERT or wav2vec 2.0"]),
    ("teacher_is_a_directory", {}, "directory", ["{teacher}", "is not a file"]),
    ("teacher_garbage_bytes", {}, "garbage", ["{teacher}", "is not a PyTorch checkpoint"]),
    ("teacher_truncated", {}, "truncated", ["{teacher}", "truncated", "download or copy it again"]),
    ("teacher_crc_damaged", {}, "damaged", ["{teacher}", "corrupt", "CRC", "download or copy it again"]),
    ("teacher_plain_torch_file", {}, "plain_torch", ["{teacher}", "not a fairseq training checkpoint"]),
    ("teacher_without_weights", {}, "no_weights", ["{teacher}", "holds no model weights"]),
    ("teacher_fine_tuned_ctc", {}, "hubert_ctc", ["{teacher}", "fine-tuned CTC model (hubert_ctc)", "hubert_base_ls960.pt"]),
    ("teacher_wav2vec_1", {}, "wav2vec1", ["{teacher}", "'wav2vec' model", "hubert, wav2vec2"]),
    ("teacher_path_empty", {"task.teacher_path": ""}, None, ["task.teacher_path is not set", "task.teacher_path=hubert_base_ls960.pt"]),
    ("normalize_mismatch", {"task.normalize": True}, None, ["task.normalize=True", "{teacher}", "normalize=False", "set task.normalize=false"]),
    ("teacher_embed_dim_mismatch", {"model.teacher_embed_dim": 32}, None, ["model.teacher_embed_dim=32", "{teacher}", "set model.teacher_embed_dim=64"]),
    ("pred_layer_out_of_range", {"model.pred_layer_ids": [5]}, None, ["model.pred_layer_ids", "teacher layer 5", "{teacher}", "2 transformer layers", "0 (CNN features"]),
    ("hint_target_out_of_range", {"criterion.hint_targets": ["1", "7"]}, None, ["criterion.hint_targets:", "teacher layer 7", "{teacher}", "2 transformer layers"]),
    ("hint_target_negative", {"criterion.hint_targets": ["-1", "2"]}, None, ["criterion.hint_targets:", "teacher layer -1"]),
    ("hint_target_mean_out_of_range", {"criterion.hint_targets": ["1", "1+2+3"]}, None, ["criterion.hint_targets:", "teacher layer 3"]),
    ("hint_default_mapping_out_of_range",
     {"model.encoder_layers": 3, "model.hint_layer_ids": [1, 2, 3]}, None,
     ["model.hint_layer_ids", "criterion.hint_targets is empty", "teacher layer 3", "{teacher}", "set criterion.hint_targets"]),
    ("hint_target_malformed", {"criterion.hint_targets": ["1", "4+x"]}, None, ["criterion.hint_targets[1]", "'4+x'", "'9+10+11+12'"]),
    ("hint_target_empty_string", {"criterion.hint_targets": ["", "2"]}, None, ["criterion.hint_targets[0]", "''"]),
    ("hint_targets_wrong_length", {"criterion.hint_targets": ["2"]}, None, ["criterion.hint_targets has 1 entries", "model.hint_layer_ids has 2", "one teacher target per hint layer"]),
    ("layer_weights_wrong_length", {"criterion.layer_weights": [1.0, 1.0, 1.0]}, None, ["criterion.layer_weights has 3 entries", "2 distillation outputs", "one weight per output"]),
]


@pytest.mark.parametrize("edits,teacher_file,expected", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_teacher_or_mapping_is_refused_before_training(base_cfg, teachers, edits, teacher_file, expected):
    teacher = str(teachers[teacher_file or "hubert"])
    with pytest.raises(ValueError) as error:  # TeacherError and the criterion's errors are ValueErrors
        build(base_cfg, {"task.teacher_path": teacher, **edits})
    message = str(error.value)
    for part in expected:
        assert part.format(teacher=teacher) in message, message
    if teacher_file:
        assert isinstance(error.value, TeacherError)


def test_good_config_builds(base_cfg, teachers):
    """The base of every case above is valid: each case fails for its own edit only."""
    task, model, criterion = build(base_cfg, {"task.teacher_path": str(teachers["hubert"])})
    assert [(t.name, t.teacher_layers) for t in criterion.targets] == [("h1", [1]), ("h2", [2])]
    _, _, remapped = build(base_cfg, {"task.teacher_path": str(teachers["hubert"]),
                                      "criterion.hint_targets": ["0+1", "2"]})
    assert [t.teacher_layers for t in remapped.targets] == [[0, 1], [2]]


def test_teacher_path_unset(base_cfg):
    assert base_cfg["task"]["teacher_path"] == "???"  # thin_deep.yaml's teacher_path: ???
    with pytest.raises(TeacherError, match=r"task\.teacher_path is not set"):
        build(base_cfg, {})


def test_sample_rate_differs_from_teacher(base_cfg, teachers):
    with pytest.raises(ValueError, match=r"task\.sample_rate=8000.*16000"):
        build(base_cfg, {"task.teacher_path": str(teachers["hubert"]), "task.sample_rate": 8000})


# -- manifest rows ----------------------------------------------------------------------------------
# (id, bad row on line 3 after a good one, expected substrings; "{audio}" is the audio folder)
ROW_CASES = [
    ("missing_file", ("missing.flac", 17_000), ["{audio}/missing.flac does not exist", "relative to the audio root"]),
    ("wrong_sample_rate", ("rate8k.flac", 8_500), ["{audio}/rate8k.flac is 8000 Hz but task.sample_rate is 16000", "resample"]),
    ("stereo", ("stereo.flac", 17_000), ["{audio}/stereo.flac has 2 channels", "mono", "downmix"]),
    ("empty_flac", ("empty.flac", 0), ["{audio}/empty.flac is an empty file (0 bytes)"]),
    ("empty_wav", ("empty.wav", 0), ["{audio}/empty.wav is empty (0 samples)"]),
    ("garbage_audio", ("garbage.flac", 1_800), ["{audio}/garbage.flac is not readable audio", "Format not recognised", "re-encode"]),
    ("directory", ("a_folder.flac", 17_000), ["{audio}/a_folder.flac is not a file"]),
    ("stale_sample_count", ("good1.flac", 17_100), ["{audio}/good1.flac has 17001 samples but the manifest says 17100", "regenerate the manifest"]),
]


@pytest.mark.parametrize("row,expected", [c[1:] for c in ROW_CASES], ids=[c[0] for c in ROW_CASES])
def test_bad_row_names_file_and_line(tmp_path, audio, row, expected):
    tsv = write_tsv(tmp_path / "train.tsv", audio, [GOOD_ROW, row, ("good2.flac", GOOD_LENGTHS[2])])
    with pytest.raises(ManifestError) as error:
        validated_manifest(str(tsv), RATE, skip_bad_rows=False)
    message = str(error.value)
    assert message.startswith(f"{tsv}:3: "), message
    for part in expected:
        assert part.format(audio=audio) in message, message
    assert "task.skip_bad_rows=true" in message


# (id, manifest text with {audio} for the audio folder, expected substrings; "{tsv}" is the manifest)
MANIFEST_CASES = [
    ("row_without_tab", "{audio}\ngood0.flac 17000\n", ["{tsv}:2:", "expected 'relative/path<TAB>num_samples'", "'good0.flac 17000'"]),
    ("sample_count_not_a_number", "{audio}\ngood0.flac\t17k\n", ["{tsv}:2:", "expected 'relative/path<TAB>num_samples'"]),
    ("row_with_three_fields", "{audio}\ngood0.flac\t17000\textra\n", ["{tsv}:2:", "expected 'relative/path<TAB>num_samples'"]),
    ("first_line_is_a_row", "good0.flac\t17000\ngood1.flac\t17001\n", ["{tsv}:1:", "line 1 must be the audio root directory", "looks like a row"]),
    ("first_line_not_a_directory", "/no/such/audio/root\ngood0.flac\t17000\n", ["{tsv}:1:", "'/no/such/audio/root'", "is not a directory"]),
    ("first_line_is_a_file", "{audio}/good0.flac\ngood0.flac\t17000\n", ["{tsv}:1:", "is not a directory"]),
    ("no_rows", "{audio}\n", ["{tsv} has no rows", "nothing to train on"]),
    ("empty_manifest", "", ["{tsv}: empty manifest", "line 1 must be the audio root"]),
]


@pytest.mark.parametrize("skip", [False, True], ids=["strict", "skip_bad_rows"])
@pytest.mark.parametrize("text,expected", [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES])
def test_malformed_manifest_is_an_error_even_when_skipping(tmp_path, audio, text, expected, skip):
    tsv = tmp_path / "train.tsv"
    tsv.write_text(text.format(audio=audio))
    with pytest.raises(ManifestError) as error:
        validated_manifest(str(tsv), RATE, skip_bad_rows=skip)
    message = str(error.value)
    for part in expected:
        assert part.format(tsv=tsv) in message, message


def test_missing_manifest_names_task_data(tmp_path):
    with pytest.raises(ManifestError, match=r"valid\.tsv does not exist: task\.data must be the folder holding valid\.tsv"):
        validated_manifest(str(tmp_path / "valid.tsv"), RATE, skip_bad_rows=False)


def test_bad_row_stops_the_task_loader(base_cfg, tmp_path, audio):
    """Through DistillHubertTask.load_dataset, the call fairseq makes for every split."""
    from fairseq import tasks

    write_tsv(tmp_path / "valid.tsv", audio, [GOOD_ROW, ("rate8k.flac", 8_500)])
    task = tasks.setup_task(edited_cfg(base_cfg, {"task.data": str(tmp_path)}).task)
    expected = f"{tmp_path}/valid.tsv:3: {audio}/rate8k.flac is 8000 Hz but task.sample_rate is 16000"
    with pytest.raises(ManifestError, match="^" + re.escape(expected)):
        task.load_dataset("valid")
    assert "valid" not in task.datasets


# -- task.skip_bad_rows=true ------------------------------------------------------------------------
def test_skip_bad_rows_keeps_exactly_the_good_rows(base_cfg, tmp_path, audio, caplog):
    from fairseq import tasks

    rows = [
        ("good0.flac", GOOD_LENGTHS[0]),  # line 2
        ("missing.flac", 17_000),
        ("good1.flac", GOOD_LENGTHS[1]),  # line 4
        ("rate8k.flac", 8_500),
        ("stereo.flac", 17_000),
        ("empty.flac", 0),
        ("empty.wav", 0),
        ("garbage.flac", 1_800),
        ("good2.flac", 17_100),  # stale count
        ("a_folder.flac", 17_000),
        ("good2.flac", GOOD_LENGTHS[2]),  # line 12
    ]
    tsv = write_tsv(tmp_path / "train.tsv", audio, rows)
    original = tsv.read_text()
    task = tasks.setup_task(edited_cfg(base_cfg, {"task.data": str(tmp_path), "task.skip_bad_rows": True}).task)
    with caplog.at_level(logging.WARNING, logger="fairseq_kd.data.audio_checks"):
        task.load_dataset("train")

    dataset = task.datasets["train"]
    assert len(dataset) == 3
    assert sorted(int(s) for s in dataset.sizes) == list(GOOD_LENGTHS)
    # fairseq reads the three good files (their lengths are distinct) and nothing else
    assert sorted(dataset[i]["source"].numel() for i in range(len(dataset))) == list(GOOD_LENGTHS)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"skipped 8 of 11 rows of {tsv} (task.skip_bad_rows)" in warnings
    skipped_lines = sorted(int(m.split(f"{tsv}:")[1].split(":")[0]) for m in warnings if m.startswith("skipping "))
    assert skipped_lines == [3, 5, 6, 7, 8, 9, 10, 11]
    assert tsv.read_text() == original  # the user's manifest is not touched
    assert task.cfg.data == str(tmp_path)  # the filtered copy was loaded, the configured folder kept


def test_skip_bad_rows_counts_beyond_the_shown_warnings(tmp_path, audio, caplog):
    rows = [GOOD_ROW] + [(f"missing{i}.flac", 17_000) for i in range(12)]
    tsv = write_tsv(tmp_path / "train.tsv", audio, rows)
    with caplog.at_level(logging.WARNING, logger="fairseq_kd.data.audio_checks"):
        filtered = validated_manifest(str(tsv), RATE, skip_bad_rows=True)
    warnings = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("skipping ") for m in warnings) == 10
    assert f"... and 2 more bad rows of {tsv}" in warnings
    assert f"skipped 12 of 13 rows of {tsv} (task.skip_bad_rows)" in warnings
    assert Path(filtered).read_text().splitlines()[1:] == [f"good0.flac\t{GOOD_LENGTHS[0]}"]
    os.remove(filtered)
    os.rmdir(os.path.dirname(filtered))


def test_skip_bad_rows_with_no_good_row_is_an_error(tmp_path, audio):
    tsv = write_tsv(tmp_path / "train.tsv", audio, [("stereo.flac", 17_000), ("missing.flac", 1)])
    with pytest.raises(ManifestError, match=r"all 2 rows are bad"):
        validated_manifest(str(tsv), RATE, skip_bad_rows=True)


# -- the real command line ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, teachers, audio) -> Dict[str, Tuple[int, str]]:
    """Two fairseq-hydra-train runs, started together: a stereo row in train.tsv, and a 3-layer
    student whose hints default to teacher layers 1-3 of a 2-layer teacher.
    Returns {name: (exit code, stdout + stderr)}."""
    work = tmp_path_factory.mktemp("cli")
    data = work / "data"
    good = [(f"good{i}.flac", n) for i, n in enumerate(GOOD_LENGTHS)]
    write_tsv(data / "valid.tsv", audio, good[:2])
    write_tsv(data / "train.tsv", audio, [*good[:2], ("stereo.flac", 17_000), good[2]])
    common = [
        console_script("fairseq-hydra-train"), "--config-name", "thin_deep",
        f"task.teacher_path={teachers['hubert']}", *CPU, *TINY_STUDENT,
        "optimization.max_update=1", "common.log_interval=1", "checkpoint.no_save=true",
    ]
    runs = {
        "stereo_row": [f"task.data={data}"],
        "hint_mapping": [f"task.data={REPO / 'manifests'}", "model.encoder_layers=3", "model.hint_layer_ids=[1,2,3]"],
    }
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = {}
    try:
        for name, extra in runs.items():
            with open(work / f"{name}.log", "w") as log:  # the child keeps its own handle
                procs[name] = subprocess.Popen([*common, *extra, f"hydra.run.dir={work / name}"],
                                               cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        codes = {name: proc.wait(timeout=300) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {name: (code, (work / f"{name}.log").read_text()) for name, code in codes.items()}


@pytest.mark.parametrize(
    "name,expected",
    [
        ("stereo_row", ["ManifestError", "train.tsv:4: ", "stereo.flac has 2 channels", "task.skip_bad_rows=true"]),
        ("hint_mapping", ["TeacherError", "model.hint_layer_ids (criterion.hint_targets is empty",
                          "teacher layer 3 is out of range", "hubert.pt", "2 transformer layers"]),
    ],
)
def test_cli_stops_with_the_message_before_any_step(cli_runs, name, expected):
    code, output = cli_runs[name]
    assert code != 0, output[-3000:]
    for part in expected:
        assert part in output, output[-3000:]
    assert "train_inner" not in output and "begin training epoch" not in output, output[-3000:]
    if name == "stereo_row":  # the teacher, model and criterion were built: the train split is checked last
        assert "teacher " in output and "loading train data for epoch 1" in output, output[-3000:]
