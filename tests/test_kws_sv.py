"""Joint keyword spotting + speaker verification (``kws_sv``): metrics, losses, model, data checks,
data preparation, and the pipeline end to end on the bundled corpus' keyword subset.

End to end (the real console scripts, two runs in parallel):

* ``fairseq-hydra-train --config-name kws_sv_joint`` fine-tunes a tiny fairseq HuBERT (encoder and
  CNN trained) jointly on keywords and speakers for 200 updates;
* ``fairseq-hydra-train --config-name thin_deep`` distils a tiny time-reduced student for 3 updates,
  then ``--config-name kws_sv_kws`` trains keyword spotting alone on it with the encoder frozen;
* the HuBERT and the student files are deleted, and ``fairseq-kd-eval-kws-sv`` evaluates both
  fine-tuned checkpoints on the test split (keyword accuracy; EER / minDCF over ``trials.txt``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import CPU, MANIFESTS, compose_preset, console_script, edited_cfg, json_logs
from fairseq_checkpoints import make_hubert_checkpoint, make_wav2vec2_checkpoint

KEYWORDS = MANIFESTS / "keywords"
TINY_CONV = "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2"
SMALL_HEADS = ["model.kws_hidden_dim=64", "model.sv_hidden_dim=64", "model.sv_embed_dim=64"]
JOINT_UPDATES = 200


# -- metrics -----------------------------------------------------------------------------------------
def brute_force_eer_dcf(scores, targets, p=0.01):
    """Independent reference: sweep every threshold (accept score >= t) by counting."""
    scores, targets = np.asarray(scores, float), np.asarray(targets)
    best_gap, eer, dcf = 2.0, None, math.inf
    for t in np.concatenate([np.unique(scores), [np.inf]]):
        accept = scores >= t
        miss = np.mean(~accept[targets == 1])
        fa = np.mean(accept[targets == 0])
        dcf = min(dcf, (miss * p + fa * (1 - p)) / min(p, 1 - p))
        if abs(miss - fa) < best_gap:
            best_gap, eer = abs(miss - fa), (miss + fa) / 2
    return eer, dcf


def test_eer_and_min_dcf():
    from fairseq_kd.evaluation.kws_sv import eer_min_dcf

    assert eer_min_dcf([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == (0.0, 0.0)
    eer, dcf = eer_min_dcf([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0])
    assert eer == 1.0 and dcf == pytest.approx(1.0)  # rejecting everything costs p / min(p, 1-p) = 1
    # a crossing exactly on a ROC point: 1 of 3 targets missed, 1 of 3 non-targets accepted
    eer, dcf = eer_min_dcf([0.9, 0.8, 0.3, 0.7, 0.2, 0.1], [1, 1, 1, 0, 0, 0])
    assert eer == pytest.approx(1 / 3)
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 400)
    scores = rng.normal(targets * 1.5, 1.0)
    eer, dcf = eer_min_dcf(scores, targets)
    ref_eer, ref_dcf = brute_force_eer_dcf(scores, targets)
    assert abs(eer - ref_eer) < 0.01 and dcf == pytest.approx(ref_dcf, abs=1e-9)
    with pytest.raises(ValueError, match="target and non-target"):
        eer_min_dcf([0.1, 0.2], [1, 1])


def test_cosine_scoring_over_trials():
    from fairseq_kd.data.kws_sv import Trial
    from fairseq_kd.evaluation.kws_sv import verification_metrics

    emb = {"a": np.array([1.0, 0.0]), "b": np.array([2.0, 0.1]), "c": np.array([0.0, 1.0]), "d": np.array([0.1, 3.0])}
    trials = [Trial(1, "a", "b", 1), Trial(1, "c", "d", 2), Trial(0, "a", "c", 3), Trial(0, "b", "d", 4),
              Trial(1, "a", "missing", 5)]
    result = verification_metrics(emb, trials)
    assert result["eer"] == 0.0 and result["trials"] == 4 and result["unscored_trials"] == 1


# -- losses ------------------------------------------------------------------------------------------
def test_margin_softmax_logits():
    from fairseq_kd.criterions.kws_sv import margin_logits, margin_softmax_loss

    cosine = torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.9, -1.0]], requires_grad=True)
    target = torch.tensor([0, 2])
    am = margin_logits(cosine, target, 0.2, 30.0, "am_softmax")
    assert torch.allclose(am, 30 * torch.tensor([[0.3, -0.2, 0.1], [0.3, 0.9, -1.2]]))
    aam = margin_logits(cosine, target, 0.2, 30.0, "aam_softmax")
    assert aam[0, 0].item() == pytest.approx(30 * math.cos(math.acos(0.5) + 0.2), rel=1e-5)
    # theta = pi: past pi - m, ArcFace's fall-back cos - m * sin(pi - m) keeps the logit decreasing
    assert aam[1, 2].item() == pytest.approx(30 * (-1.0 - math.sin(math.pi - 0.2) * 0.2), rel=1e-5)
    assert torch.equal(aam[:, 1], 30 * cosine[:, 1])  # other columns are untouched
    # margin 0: plain softmax cross-entropy over scaled cosines
    plain = torch.nn.functional.cross_entropy(30 * cosine, target, reduction="sum")
    assert margin_softmax_loss(cosine, target, 0.0, 30.0, "am_softmax").item() == pytest.approx(plain.item())
    loss = margin_softmax_loss(cosine, target, 0.2, 30.0, "aam_softmax")
    loss.backward()
    assert torch.isfinite(cosine.grad).all()
    assert loss > margin_softmax_loss(cosine.detach(), target, 0.0, 30.0, "aam_softmax")


@pytest.mark.parametrize("as_tensor", [False, True], ids=["single", "ddp_summed"])
def test_reduced_metrics(as_tensor):
    """Accuracy from summed counts; under DDP fairseq hands the summed logging outputs over as tensors."""
    from fairseq import metrics

    from fairseq_kd.criterions.kws_sv import KwsSvCriterion

    logs = [{"loss": 6.0, "sample_size": 4, "nsentences": 4, "kws_loss": 2.0, "kws_correct": 3, "kws_count": 4,
             "sv_loss": 4.0, "spk_correct": 0, "spk_count": 0}] * 2
    if as_tensor:
        logs = [{k: torch.tensor(float(v)) for k, v in log.items()} for log in logs]
    with metrics.aggregate(new_root=True) as agg:
        KwsSvCriterion.reduce_metrics(logs)
    values = agg.get_smoothed_values()
    assert values["kws_accuracy"] == 75.0 and values["loss"] == 1.5 and values["kws_loss"] == 0.5
    assert "spk_accuracy" not in values and "sv_loss" not in values  # no labelled speaker: nothing to average


def test_masked_statistics_ignore_padding():
    from fairseq_kd.models.kws_sv import masked_mean_std

    x = torch.randn(2, 7, 3)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 4:] = True
    x[1, 4:] = 1e3  # garbage in the padding
    mean, std = masked_mean_std(x, mask)
    assert torch.allclose(mean[1], x[1, :4].mean(0)) and torch.allclose(std[1], x[1, :4].std(0, unbiased=False), atol=1e-5)
    assert torch.allclose(mean[0], x[0].mean(0))


# -- in-process: the composed preset, as fairseq-hydra-train builds it ---------------------------------
@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory) -> Path:
    return make_hubert_checkpoint(tmp_path_factory.mktemp("encoder") / "hubert.pt", conv_layers=TINY_CONV)


@pytest.fixture(scope="module")
def base_cfg() -> Dict[str, Any]:
    return compose_preset("kws_sv_joint", [*CPU, f"task.data={KEYWORDS}", *SMALL_HEADS])


def build(base: Dict[str, Any], edits: Dict[str, Any], splits=("valid",)):
    """setup_task + load_dataset + build_model + build_criterion, as fairseq_cli.train.main."""
    from fairseq import tasks

    cfg = edited_cfg(base, edits)
    task = tasks.setup_task(cfg.task)
    for split in splits:
        task.load_dataset(split)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return task, model, criterion


@pytest.mark.parametrize("kind", ["hubert", "wav2vec2"])
def test_padded_batch_gives_each_utterance_its_own_outputs(base_cfg, encoder_ckpt, tmp_path, kind):
    path = encoder_ckpt if kind == "hubert" else make_wav2vec2_checkpoint(tmp_path / "w2v.pt", conv_layers=TINY_CONV)
    _, model, _ = build(base_cfg, {"model.w2v_path": str(path)}, splits=())
    assert model.kind == kind and model.w2v_model.encoder.layerdrop == 0.0
    model.eval()
    torch.manual_seed(0)
    long, short = torch.randn(16000), torch.randn(11000)
    batch = torch.zeros(2, 16000)
    batch[0], batch[1, :11000] = long, short
    mask = torch.zeros(2, 16000, dtype=torch.bool)
    mask[1, 11000:] = True
    with torch.no_grad():
        together = model(batch, mask)
        alone = [model(long[None]), model(short[None])]
    for key in ("kws_logits", "sv_embedding"):
        for row in range(2):
            assert torch.allclose(together[key][row], alone[row][key][0], atol=1e-4), key


def _encoder_grads(model) -> Dict[str, bool]:
    return {n: p.grad is not None for n, p in model.w2v_model.named_parameters()}


def _one_step(task, model, criterion):
    model.train()
    dataset = task.dataset("train")  # training speakers: both losses
    loss, sample_size, _ = criterion(model, dataset.collater([dataset[i] for i in range(0, 480, 120)]))
    model.zero_grad()
    (loss / sample_size).backward()
    return _encoder_grads(model)


def test_which_encoder_parts_train(base_cfg, encoder_ckpt):
    path = {"model.w2v_path": str(encoder_ckpt), "task.validate_audio": False}
    # the preset: CNN frozen (feature_grad_mult 0), every transformer layer trains
    task, model, criterion = build(base_cfg, path, splits=("train",))
    grads = _one_step(task, model, criterion)
    assert not any(g for n, g in grads.items() if n.startswith("feature_extractor."))
    assert all(g for n, g in grads.items() if n.startswith("encoder.layers."))
    # top N layers only
    task, model, criterion = build(base_cfg, {**path, "model.finetune_top_layers": 1, "model.feature_grad_mult": 1.0},
                                   splits=("train",))
    trainable = {n for n, p in model.w2v_model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("encoder.layers.1.") for n in trainable)
    assert {n for n, g in _one_step(task, model, criterion).items() if g} == trainable
    # frozen for the first freeze_finetune_updates updates, then fine-tuned (CNN too)
    task, model, criterion = build(base_cfg, {**path, "model.freeze_finetune_updates": 5, "model.feature_grad_mult": 1.0},
                                   splits=("train",))
    assert not any(_one_step(task, model, criterion).values())
    assert model.kws_mix.weights.grad is not None and model.speaker_weight.grad is not None
    model.set_num_updates(5)
    grads = _one_step(task, model, criterion)
    assert all(g for n, g in grads.items() if n.startswith(("feature_extractor.", "encoder.layers.")))


def test_time_masks_apply_in_training_only(base_cfg, encoder_ckpt):
    _, model, _ = build(base_cfg, {"model.w2v_path": str(encoder_ckpt), "model.apply_mask": True,
                                   "model.mask_prob": 0.3, "model.mask_length": 5}, splits=())
    source = torch.randn(2, 16000)
    model.eval()
    with torch.no_grad():
        clean = model.hidden_states(source)[0][0]
        model.train()
        masked = model.hidden_states(source)[0][0]
    replaced = (masked - clean).abs().sum(-1) > 0  # frames set to HuBERT's mask embedding
    assert 0 < replaced.float().mean() < 1
    assert torch.allclose(masked[replaced], model.w2v_model.mask_emb.expand(int(replaced.sum()), -1))


def test_single_task_models_have_one_head(base_cfg, encoder_ckpt):
    path = {"model.w2v_path": str(encoder_ckpt)}
    task, model, _ = build(base_cfg, {**path, "task.sv": False, "model.kws_layer": 0})
    assert model.sv_head is None and model.speaker_weight is None and model.kws_mix.weights is None
    assert "target_spk" in task.dataset("valid").collater([task.dataset("valid")[0]])
    task, model, _ = build(base_cfg, {**path, "task.kws": False, "model.sv_layer": -1})
    assert model.kws_head is None and model.sv_mix.layer == 2 and len(task.speakers) == 24


BAD_SETTINGS = [
    ({"criterion.sv_weight": 0.0}, "criterion.sv_weight=0 would leave a head untrained", "task.sv=false"),
    ({"model.kws_layer": 3}, "layer 3 does not exist", "hidden states 0 (CNN feature) to 2"),
    ({"model.finetune_top_layers": 3}, "model.finetune_top_layers=3", "2 transformer layers"),
    ({"task.normalize": True}, "task.normalize=true", "set task.normalize=false"),
    ({"model.w2v_path": "/nonexistent/student.pt"}, "model.w2v_path=/nonexistent/student.pt does not exist", ""),
]


@pytest.mark.parametrize("edits,first,second", BAD_SETTINGS, ids=[next(iter(e)) for e, _, _ in BAD_SETTINGS])
def test_bad_settings_are_refused(base_cfg, encoder_ckpt, edits, first, second):
    with pytest.raises(ValueError) as error:
        build(base_cfg, {"model.w2v_path": str(encoder_ckpt), **edits}, splits=())
    assert first in str(error.value) and second in str(error.value), str(error.value)


# -- bad data: errors before training, naming file and line ----------------------------------------
def keyword_copy(dest: Path, edits: Optional[Dict[str, Callable[[List[str]], List[str]]]] = None) -> Path:
    """The bundled keyword subset with an absolute audio root, its label files edited by ``edits``."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in KEYWORDS.iterdir():
        lines = src.read_text().splitlines()
        if src.suffix == ".tsv":
            lines[0] = str((KEYWORDS / lines[0]).resolve())
        if edits and src.name in edits:
            lines = edits[src.name](lines)
        (dest / src.name).write_text("".join(f"{line}\n" for line in lines))
    return dest


def _set(index: int, value: str):
    def edit(lines):
        lines = list(lines)
        lines[index] = value
        return lines
    return edit


def _rename(old: str, new: str):
    return lambda lines: [new if line == old else line for line in lines]


BAD_DATA = [
    ("keyword_outside_label_set", {"train.kw": _set(6, "maybe")}, ("train",),
     ["train.kw:7: 'maybe'", "dict.kw.txt"]),
    ("label_file_out_of_step", {"valid.kw": lambda lines: lines[:-1]}, ("valid",),
     ["valid.kw has 59 lines but valid.tsv has 60 rows"]),
    ("trial_names_unknown_utterance", {"trials.txt": _set(2, "0 keywords/spk078-stop-0.flac keywords/nobody.flac")}, (),
     ["trials.txt:3: keywords/nobody.flac is not a row of", "test.tsv"]),
    ("trial_disagrees_with_speakers", {"trials.txt": _set(0, "0 keywords/spk079-down-0.flac keywords/spk079-stop-0.flac")}, (),
     ["trials.txt:1: a non-target trial, but the speaker labels say 'spk079' and 'spk079'"]),
    ("valid_speaker_seen_in_training", {"valid.spk": _set(4, "spk048")}, ("valid",),
     ["'spk048' (valid.spk:5, train.spk:1)", "task.disjoint_speakers=false"]),
    ("trial_speaker_seen_in_training", {"test.spk": _rename("spk079", "spk048")}, (),
     ["of the trial list", "'spk048' (test.spk:", "train.spk:1)"]),
]


@pytest.mark.parametrize("name,edits,splits,expected", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_refused_before_training(base_cfg, encoder_ckpt, tmp_path, name, edits, splits, expected):
    from fairseq_kd.data.kws_sv import KwsSvDataError

    data = keyword_copy(tmp_path / "data", edits)
    with pytest.raises(KwsSvDataError) as error:
        build(base_cfg, {"task.data": str(data), "model.w2v_path": str(encoder_ckpt)}, splits=splits)
    for part in expected:
        assert part in str(error.value), str(error.value)


def test_seen_speakers_are_allowed_when_the_protocol_allows_it(base_cfg, encoder_ckpt, tmp_path):
    data = keyword_copy(tmp_path / "data", {"valid.spk": _set(4, "spk048")})
    task, _, _ = build(base_cfg, {"task.data": str(data), "model.w2v_path": str(encoder_ckpt),
                                  "task.disjoint_speakers": False})
    dataset = task.dataset("valid")
    assert dataset.speakers[4] == task.speakers.index("spk048")  # a known speaker gets its class
    assert (dataset.speakers == -1).sum() == 59


# -- data preparation on fake corpora -----------------------------------------------------------------
def _wav(path: Path, samples: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.random.default_rng(seed).uniform(-0.1, 0.1, samples).astype("float32"), 16000, subtype="PCM_16")


def fake_speech_commands(root: Path, words=("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
                                            "bed", "cat")) -> Path:
    speakers = [f"{i:08x}" for i in range(6)]
    for w, word in enumerate(words):
        for s, spk in enumerate(speakers):
            for n in range(2):
                _wav(root / word / f"{spk}_nohash_{n}.wav", 1600 + 10 * n, w * 100 + s * 10 + n)
    _wav(root / "_background_noise_" / "white_noise.wav", 16000 * 12, 7)
    (root / "validation_list.txt").write_text("".join(f"{w}/{speakers[4]}_nohash_{n}.wav\n" for w in words for n in range(2)))
    (root / "testing_list.txt").write_text("".join(f"{w}/{speakers[5]}_nohash_{n}.wav\n" for w in words for n in range(2))
                                           + "".join(f"{w}/{speakers[3]}_nohash_{n}.wav\n" for w in words for n in range(2)))
    return root


def _lines(path: Path) -> List[str]:
    return path.read_text().splitlines()


def test_prepare_speech_commands_12_class(tmp_path):
    from fairseq_kd.data.kws_sv import check_layout
    from fairseq_kd.cli.prepare_kws_sv import main

    root = fake_speech_commands(tmp_path / "sc")
    dest = tmp_path / "sc12"
    assert main(["speech-commands", "--root", str(root), "--dest", str(dest)]) == 0
    assert [line.split()[0] for line in _lines(dest / "dict.kw.txt")] == [
        "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "_unknown_", "_silence_"]
    train_kw, train_spk = _lines(dest / "train.kw"), _lines(dest / "train.spk")
    # train: 10 keywords x 3 speakers x 2 clips; 10 % of 60 unknown ('bed', 'cat') and 10 % silence
    assert train_kw.count("yes") == 6 and train_kw.count("_unknown_") == 6 and train_kw.count("_silence_") == 6
    assert {k for s, k in zip(train_spk, train_kw) if k == "_unknown_"} == {"_unknown_"}
    assert {s for s, k in zip(train_spk, train_kw) if k == "_silence_"} == {"-"}
    rows = _lines(dest / "train.tsv")
    assert rows[0] == str(root.resolve())
    silence = [r.split("\t") for r in rows[1:] if "_silence_" in r]
    assert all(int(n) == 16000 and sf.info(os.path.join(rows[0], p)).frames == 16000 for p, n in silence)
    assert set(_lines(dest / "valid.spk")) - {"-"} == {"00000004"}
    assert set(_lines(dest / "test.spk")) - {"-"} == {"00000005", "00000003"}
    trials = _lines(dest / "trials.txt")
    assert trials and {t.split()[0] for t in trials} == {"0", "1"}
    assert check_layout(str(dest)) == {"train": len(rows) - 1, "valid": 24, "test": 48}
    # outputs are never replaced silently
    assert main(["speech-commands", "--root", str(root), "--dest", str(dest)]) == 2  # the project's errors: exit code 2


def fake_official_test_set(folder: Path, speaker: str = "00000005") -> Path:
    """The official 12-class test set's layout: a folder per class, clips provided."""
    for k, word in enumerate(("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")):
        _wav(folder / word / f"{speaker}_nohash_0.wav", 16000, 900 + k)
    _wav(folder / "_unknown_" / f"bed_{speaker}_nohash_1.wav", 16000, 950)
    _wav(folder / "_unknown_" / "cat_0000000a_nohash_0.wav", 16000, 951)
    _wav(folder / "_silence_" / "silence_0.wav", 16000, 952)
    return folder


def test_prepare_speech_commands_official_test_set(tmp_path, capsys):
    from fairseq_kd.data.kws_sv import check_layout
    from fairseq_kd.cli.prepare_kws_sv import main

    root = fake_speech_commands(tmp_path / "sc")
    official = fake_official_test_set(tmp_path / "speech_commands_test_set_v0.02")
    dest = tmp_path / "sc12"
    # found next to --root without the option
    assert main(["speech-commands", "--root", str(root), "--dest", str(dest)]) == 0
    test_kw, test_spk = _lines(dest / "test.kw"), _lines(dest / "test.spk")
    assert sorted(test_kw) == sorted(["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
                                      "_unknown_", "_unknown_", "_silence_"])
    assert set(test_spk) == {"00000005", "0000000a", "-"}
    rows = _lines(dest / "test.tsv")
    assert all(os.path.isfile(os.path.join(rows[0], r.split("\t")[0])) for r in rows[1:])
    assert all("speech_commands_test_set_v0.02" in r for r in rows[1:])  # not testing_list.txt's clips
    assert check_layout(str(dest))["test"] == 13
    # the train split is unchanged by the option (testing_list.txt's clips stay out of it)
    assert _lines(dest / "train.kw").count("yes") == 6
    # a class folder missing: named, nothing written
    shutil.rmtree(official / "_silence_")
    assert main(["speech-commands", "--root", str(root), "--dest", str(tmp_path / "x"), "--test-set", str(official)]) == 2
    assert "_silence_" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["speech-commands", "--root", str(root), "--dest", str(tmp_path / "y"), "--protocol", "all",
                 "--test-set", str(official)]) == 2
    assert "--protocol 12" in capsys.readouterr().err


def test_prepare_speech_commands_all_words_and_protocol_errors(tmp_path, capsys):
    from fairseq_kd.cli.prepare_kws_sv import main

    root = fake_speech_commands(tmp_path / "sc")
    assert main(["speech-commands", "--root", str(root), "--dest", str(tmp_path / "x"), "--protocol", "35"]) == 2  # the project's errors: exit code 2
    assert "the 35-class protocol is Speech Commands v2's, but" in capsys.readouterr().err
    dest = tmp_path / "all"
    assert main(["speech-commands", "--root", str(root), "--dest", str(dest), "--protocol", "all"]) == 0
    assert len(_lines(dest / "dict.kw.txt")) == 12 and "_silence_" not in _lines(dest / "train.kw")
    (root / "testing_list.txt").write_text("stop/missing_nohash_0.wav\n")
    assert main(["speech-commands", "--root", str(root), "--dest", str(tmp_path / "y")]) == 2  # the project's errors: exit code 2
    assert "testing_list.txt:1: stop/missing_nohash_0.wav does not exist" in capsys.readouterr().err


def fake_voxceleb1(root: Path) -> Path:
    for s in range(6):
        for v in range(2):
            for n in range(2):
                _wav(root / "wav" / f"id1000{s}" / f"vid{v}" / f"0000{n}.wav", 3200, s * 10 + v * 2 + n)
    test = [f"id1000{s}/vid{v}/0000{n}.wav" for s in (4, 5) for v in range(2) for n in range(2)]
    (root / "veri_test2.txt").write_text(
        f"1 {test[0]} {test[1]}\n0 {test[0]} {test[4]}\n1 {test[5]} {test[7]}\n0 {test[2]} {test[6]}\n")
    (root / "iden_split.txt").write_text("".join(
        f"{1 if v == 0 else 2 if n == 0 else 3} id1000{s}/vid{v}/0000{n}.wav\n" for s in range(6) for v in range(2) for n in range(2)))
    return root


def test_prepare_voxceleb1(tmp_path, capsys):
    from fairseq_kd.data.kws_sv import check_layout
    from fairseq_kd.cli.prepare_kws_sv import main

    root = fake_voxceleb1(tmp_path / "vox")
    dest = tmp_path / "vox1"
    # one validation speaker gives no different-speaker trial (no EER): refused, nothing written
    assert main(["voxceleb1", "--root", str(root), "--dest", str(dest), "--valid-speakers", "1"]) == 2
    assert "--valid-speakers 1" in capsys.readouterr().err and not dest.exists()
    assert main(["voxceleb1", "--root", str(root), "--dest", str(dest), "--valid-speakers", "2"]) == 0
    assert _lines(dest / "trials.txt") == _lines(root / "veri_test2.txt")
    assert set(_lines(dest / "test.spk")) == {"id10004", "id10005"} and len(_lines(dest / "test.spk")) == 7
    valid, train = set(_lines(dest / "valid.spk")), set(_lines(dest / "train.spk"))
    assert len(valid) == 2 and len(train) == 2 and not valid & train and not train & {"id10004", "id10005"}
    assert not (dest / "train.kw").exists()
    assert check_layout(str(dest), kws=False) == {"train": 8, "valid": 8, "test": 7}
    # identification: iden_split.txt's three splits over the same speakers
    iden = tmp_path / "iden"
    assert main(["voxceleb1", "--root", str(root), "--dest", str(iden), "--protocol", "identification"]) == 0
    assert [len(_lines(iden / f"{s}.spk")) for s in ("train", "valid", "test")] == [12, 6, 6]
    assert "task.disjoint_speakers=false" in capsys.readouterr().out
    # a trial naming an utterance that is not in wav/
    (root / "veri_test2.txt").write_text("1 id10004/vid0/00000.wav id10004/vid9/00001.wav\n")
    assert main(["voxceleb1", "--root", str(root), "--dest", str(tmp_path / "bad")]) == 2  # the project's errors: exit code 2
    assert "veri_test2.txt:1: id10004/vid9/00001.wav is not under" in capsys.readouterr().err


def test_check_command_accepts_the_bundled_keyword_subset(capsys):
    from fairseq_kd.cli.prepare_kws_sv import main

    assert main(["check", "--data", str(KEYWORDS)]) == 0
    assert "OK (train 480 rows, valid 60 rows, test 80 rows)" in capsys.readouterr().out


# -- end to end -------------------------------------------------------------------------------------
def run_parallel(jobs: Dict[str, List[str]], cwd: Path) -> Dict[str, subprocess.CompletedProcess]:
    """Start every command at once (one thread each: two runs share two cores), wait for all."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, cmd in jobs.items():
        with open(cwd / f"{name}.out", "w") as out:
            procs[name] = (subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT), cmd)
    results = {}
    for name, (proc, cmd) in procs.items():
        proc.wait(timeout=600)
        results[name] = subprocess.CompletedProcess(cmd, proc.returncode, (cwd / f"{name}.out").read_text(), "")
    for name, result in results.items():
        if result.returncode != 0:
            raise AssertionError(f"{name} failed ({result.returncode}): {' '.join(result.args)}\n{result.stdout[-6000:]}")
    return results


def chain(*cmds: List[str]) -> List[str]:
    """One shell command running ``cmds`` in order (stops at the first failure)."""
    import shlex

    return ["bash", "-c", " && ".join(" ".join(shlex.quote(part) for part in cmd) for cmd in cmds)]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Dict[str, Any]:
    work = tmp_path_factory.mktemp("kws_sv")
    start = time.monotonic()
    hubert = make_hubert_checkpoint(work / "hubert.pt", conv_layers=TINY_CONV)
    train = console_script("fairseq-hydra-train")
    common = [*CPU, f"task.data={KEYWORDS}", "common.log_format=json", "common.log_interval=50",
              "checkpoint.save_interval=1000", *SMALL_HEADS]
    joint = [train, "--config-name", "kws_sv_joint", *common, f"model.w2v_path={hubert}",
             f"optimization.max_update={JOINT_UPDATES}", "optimization.lr=[0.002]", "dataset.batch_size=8",
             f"dataset.validate_interval_updates={JOINT_UPDATES // 2}", "dataset.validate_interval=1000",
             f"checkpoint.save_interval_updates={JOINT_UPDATES}", "model.feature_grad_mult=1.0", "model.sv_layer=0",
             f"checkpoint.save_dir={work / 'joint'}", f"hydra.run.dir={work / 'joint'}"]
    student = work / "student" / "checkpoint_last.pt"
    distill = [train, "--config-name", "thin_deep", *CPU, f"task.data={MANIFESTS}", f"task.teacher_path={hubert}",
               "model.encoder_layers=2", "model.encoder_embed_dim=64", "model.encoder_ffn_embed_dim=64",
               "model.encoder_attention_heads=4", "model.hint_layer_ids=[1,2]", "model.teacher_embed_dim=64",
               "model.conv_channels=[32,32,32,32,32,32,64,64,64]", "model.time_reduction_factor=2",
               "dataset.batch_size=4", "task.max_sample_size=32000", "optimization.max_update=3",
               "optimization.update_freq=[1]", "dataset.disable_validation=true", "lr_scheduler.warmup_updates=1",
               f"checkpoint.save_dir={work / 'student'}", f"hydra.run.dir={work / 'student'}"]
    kws_frozen = [train, "--config-name", "kws_sv_kws", *common, f"model.w2v_path={student}",
                  "optimization.max_update=30", "optimization.lr=[0.002]", "dataset.batch_size=8",
                  "model.freeze_finetune_updates=1000000", "dataset.validate_interval_updates=30",
                  "dataset.validate_interval=1000", "checkpoint.save_interval_updates=30",
                  f"checkpoint.save_dir={work / 'kws'}", f"hydra.run.dir={work / 'kws'}"]
    runs = run_parallel({"joint": joint, "student": chain(distill, kws_frozen)}, work)
    stages = {"train": time.monotonic() - start}
    student_weights = torch.load(str(student), map_location="cpu", weights_only=False)["model"]
    for path in (hubert, student):
        path.unlink()  # the fine-tuned checkpoints must not need them

    names = ("joint", "kws")
    evaluate = [console_script("fairseq-kd-eval-kws-sv"), *(str(work / n / "checkpoint_best.pt") for n in names),
                "--data", str(KEYWORDS), "--split", "test", "--cpu"]
    evaluated = run_parallel({"evaluate": evaluate}, work)["evaluate"]
    stages["evaluate"] = time.monotonic() - start - stages["train"]
    print("kws_sv pipeline (s):", {k: round(v, 1) for k, v in stages.items()})
    results = {n: json.loads((work / n / "checkpoint_best.test.json").read_text()) for n in names}
    return {"work": work, "runs": runs, "evaluated": evaluated, "results": results, "student_weights": student_weights}


def test_joint_training_beats_chance_on_both_tasks(pipeline):
    out = pipeline["runs"]["joint"].stdout
    valid = json_logs(out, "valid")
    assert [int(v["valid_num_updates"]) for v in valid] == [JOINT_UPDATES // 2, JOINT_UPDATES]
    last = valid[-1]
    for key in ("valid_kws_accuracy", "valid_eer", "valid_min_dcf", "valid_joint_error"):
        assert key in last, last
    assert float(last["valid_joint_error"]) == pytest.approx(
        100 - float(last["valid_kws_accuracy"]) + float(last["valid_eer"]), abs=0.01)
    test = pipeline["results"]["joint"]
    # 10 keywords (chance 10 %: 20 or more right of 80 by chance has probability ~1e-4), 8 unseen
    # test speakers, 600 balanced trials (chance EER 50 %); measured: 35 % and 23 %
    assert test["kws_accuracy"] >= 25.0, test
    assert test["eer"] <= 35.0, test
    assert 0 < test["min_dcf"] <= 1.0 and test["trials"] == 600 and test["kws_utterances"] == 80
    assert test["trial_list"] == str(KEYWORDS / "trials.txt")
    scores = (pipeline["work"] / "joint" / "checkpoint_best.test.scores").read_text().splitlines()
    assert len(scores) == 600 and scores[0].split()[2:] == ["keywords/spk079-down-0.flac", "keywords/spk079-stop-0.flac"]


def test_finetuned_checkpoints_are_self_contained(pipeline):
    for name, encoder in (("joint", "hubert"), ("kws", "thin_hubert")):
        state = torch.load(str(pipeline["work"] / name / "checkpoint_best.pt"), map_location="cpu", weights_only=False)
        model_cfg = state["cfg"]["model"]
        assert model_cfg["_name"] == "kws_sv" and model_cfg["w2v_args"]["model"]["_name"] == encoder
        assert not os.path.exists(model_cfg["w2v_path"])
        assert state["task_state"]["keywords"] == [line.split()[0] for line in _lines(KEYWORDS / "dict.kw.txt")]
        assert pipeline["results"][name]["encoder"] == encoder


def test_keyword_spotting_alone_on_a_frozen_student(pipeline):
    result = pipeline["results"]["kws"]
    assert "eer" not in result and result["kws_accuracy"] >= 0 and result["kws_utterances"] == 80
    assert "sv_layer_weights" not in result and len(result["kws_layer_weights"]) == 3
    state = torch.load(str(pipeline["work"] / "kws" / "checkpoint_best.pt"), map_location="cpu", weights_only=False)
    assert not [k for k in state["model"] if k.startswith(("sv_", "speaker_"))]
    encoder = {k[len("w2v_model."):]: v for k, v in state["model"].items() if k.startswith("w2v_model.")}
    distilled = pipeline["student_weights"]
    assert encoder and all(torch.equal(v, distilled[k]) for k, v in encoder.items())  # frozen: as distilled
    out = pipeline["runs"]["student"].stdout
    assert "valid_kws_accuracy" in json_logs(out, "valid")[-1] and "valid_eer" not in json_logs(out, "valid")[-1]
