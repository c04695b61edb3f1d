"""``kws_sv`` over two corpora (``task.data=A,B``): a keyword-only and a speaker-only view of the
bundled keyword subset with disjoint rows; per-corpus loss masking, per-group learning rates,
bad-input errors and one short hydra training run that validates both tasks; the two views as
``fairseq-kd-prepare-kws-sv view`` writes them, and a joint run over them that beats chance on both
tasks, evaluated from the checkpoint alone."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F

from conftest import CPU, REPO, compose_preset, console_script, json_logs
from fairseq_checkpoints import make_hubert_checkpoint
from test_kws_sv import KEYWORDS, SMALL_HEADS, TINY_CONV, build

# rows of each split in the keyword-only view; the speaker-only view gets the rest
KW_ROWS = {"train": range(0, 240), "valid": range(0, 30), "test": range(0, 40)}


def _lines(path: Path) -> List[str]:
    return path.read_text().splitlines()


def write_view(dest: Path, kind: str, edits: Dict[str, List[str]] = None) -> Path:
    """A keyword-only (``kw``) or speaker-only (``spk``) view of the bundled subset, disjoint rows."""
    dest.mkdir(parents=True, exist_ok=True)
    for split, kw_rows in KW_ROWS.items():
        tsv = _lines(KEYWORDS / f"{split}.tsv")
        rows = [i for i in range(len(tsv) - 1) if (i in kw_rows) == (kind == "kw")]
        root = str((KEYWORDS / tsv[0]).resolve())
        files = {"tsv": [root] + [tsv[i + 1] for i in rows]}
        if kind == "kw":
            files["kw"] = [_lines(KEYWORDS / f"{split}.kw")[i] for i in rows]  # no .spk file at all
        else:
            files["spk"] = [_lines(KEYWORDS / f"{split}.spk")[i] for i in rows]
            files["kw"] = ["-"] * len(rows)  # a label file of '-' only: no keyword labels
        for ext, lines in files.items():
            (dest / f"{split}.{ext}").write_text("".join(f"{line}\n" for line in lines))
    if kind == "kw":
        (dest / "dict.kw.txt").write_text((KEYWORDS / "dict.kw.txt").read_text())
    else:
        kept = {line.split("\t")[0] for line in _lines(dest / "test.tsv")[1:]}
        trials = [t for t in _lines(KEYWORDS / "trials.txt") if all(p in kept for p in t.split()[1:])]
        (dest / "trials.txt").write_text("".join(f"{t}\n" for t in trials))
    for name, lines in (edits or {}).items():
        (dest / name).write_text("".join(f"{line}\n" for line in lines))
    return dest


@pytest.fixture(scope="module")
def views(tmp_path_factory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("views")
    return {"kw": write_view(root / "kw", "kw"), "spk": write_view(root / "spk", "spk")}


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory) -> Path:
    return make_hubert_checkpoint(tmp_path_factory.mktemp("encoder") / "hubert.pt", conv_layers=TINY_CONV)


@pytest.fixture(scope="module")
def base_cfg(views):
    return compose_preset("kws_sv_joint", [*CPU, f"task.data='{views['kw']},{views['spk']}'", *SMALL_HEADS])


def _data(views) -> str:
    return f"{views['kw']},{views['spk']}"


def test_each_loss_is_averaged_over_its_own_rows(base_cfg, encoder_ckpt, views):
    from fairseq.data.multi_corpus_dataset import MultiCorpusDataset

    from fairseq_kd.criterions.kws_sv import margin_softmax_loss

    task, model, criterion = build(base_cfg, {"model.w2v_path": str(encoder_ckpt)}, splits=("train", "valid"))
    model.eval()  # no dropout: the hand computation sees the same outputs
    train = task.dataset("train")
    assert isinstance(train, MultiCorpusDataset) and train.batch_sample
    kw_part, spk_part = train.datasets[str(views["kw"])], train.datasets[str(views["spk"])]
    assert (kw_part.speakers == -1).all() and (spk_part.keywords == -1).all()

    batch = kw_part.collater([kw_part[i] for i in range(0, 240, 60)])
    loss, sample_size, log = criterion(model, batch)
    out = model(**batch["net_input"])
    expected = F.cross_entropy(out["kws_logits"], batch["target_kw"], reduction="mean")
    assert sample_size == 1 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert log["sv_loss"] == 0.0 and log["spk_count"] == 0 and log["kws_count"] == 4

    batch = spk_part.collater([spk_part[i] for i in range(0, 240, 80)])
    loss, _, log = criterion(model, batch)
    out = model(**batch["net_input"])
    cosine = model.speaker_cosine(out["sv_embedding"])
    expected = margin_softmax_loss(cosine, batch["target_spk"], 0.2, 30.0, "am_softmax", reduction="mean")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert log["kws_loss"] == 0.0 and log["kws_count"] == 0 and log["spk_count"] == 3
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # validation batches never mix corpora; the trials are the speaker corpus' own
    valid = task.dataset("valid")
    for batch_ids in valid.batch_by_size(valid.ordered_indices(), max_tokens=10**9):
        assert len({valid.corpus_of(i) for i in batch_ids}) == 1
    assert task.trials["valid"] and all(t.a.startswith("1:") for t in task.trials["valid"])


def test_encoder_and_heads_get_their_own_learning_rates(base_cfg, encoder_ckpt):
    from omegaconf import OmegaConf

    from fairseq.optim import build_optimizer

    task, model, _ = build(base_cfg, {"model.w2v_path": str(encoder_ckpt)}, splits=())
    # fairseq's composite optimizer: one optimizer and schedule per model parameter's ``param_group``
    group = {"optimizer": {"_name": "adam", "adam_betas": "(0.9,0.98)", "adam_eps": 1e-8, "weight_decay": 0.0},
             "lr_scheduler": {"_name": "fixed", "warmup_updates": 0}}
    cfg = OmegaConf.create({"common": {"tpu": False}, "optimization": {"lr": [1e-4], "max_update": 10},
                            "optimizer": {"_name": "composite", "groups": {"encoder": {**group, "lr_float": 1e-5},
                                                                           "heads": {**group, "lr_float": 1e-3}}}})
    optimizer = build_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    lrs = {name: opt.optimizer.param_groups[0]["lr"] for name, opt in optimizer.optimizers.items()}
    assert lrs == {"encoder": 1e-5, "heads": 1e-3}
    heads = {id(p) for p in optimizer.optimizers["heads"].optimizer.param_groups[0]["params"]}
    assert id(model.speaker_weight) in heads and id(model.kws_head.out.weight) in heads


def test_corpus_without_labels_is_refused(base_cfg, encoder_ckpt, views, tmp_path):
    from fairseq_kd.data.kws_sv import KwsSvDataError

    bare = write_view(tmp_path / "bare", "spk")
    (bare / "train.spk").write_text("-\n" * len(_lines(bare / "train.spk")))
    with pytest.raises(KwsSvDataError, match=r"corpus .*bare .*train\.kw / .*train\.spk missing or all '-'"):
        build(base_cfg, {"model.w2v_path": str(encoder_ckpt), "task.data": f"{views['kw']},{bare}"}, splits=("train",))


def test_zero_ratio_for_a_weighted_corpus_is_refused(base_cfg, encoder_ckpt, views):
    from fairseq_kd.criterions.kws_sv import KwsSvCriterionError

    with pytest.raises(KwsSvCriterionError, match=r"corpus .*spk \(task.data\) ratio 0 .*criterion\.sv_weight=1\.0"):
        build(base_cfg, {"model.w2v_path": str(encoder_ckpt), "task.corpus_ratios": [1.0, 0.0]}, splits=())


def test_validation_speakers_without_different_speaker_trials_are_refused(base_cfg, encoder_ckpt, views, tmp_path):
    """One validation speaker gives only same-speaker trials: the EER (and checkpoint_best by
    joint_error) would be null at every validation; refused when the split loads, file named."""
    from fairseq_kd.data.kws_sv import KwsSvDataError

    spk = write_view(tmp_path / "spk", "spk", {"valid.spk": ["spk999"] * len(_lines(views["spk"] / "valid.spk"))})
    with pytest.raises(KwsSvDataError, match=r"spk/valid\.spk: the valid split's 1 speaker\(s\) give no non-target trial"):
        build(base_cfg, {"model.w2v_path": str(encoder_ckpt), "task.data": f"{views['kw']},{spk}"}, splits=("valid",))


def test_trial_speakers_seen_in_the_corpus_training_split_are_refused(base_cfg, encoder_ckpt, views, tmp_path):
    from fairseq_kd.data.kws_sv import KwsSvDataError

    spk = write_view(tmp_path / "spk", "spk")
    train_speaker = _lines(spk / "train.spk")[0]
    test = _lines(spk / "test.spk")
    (spk / "test.spk").write_text("".join(f"{train_speaker if s == test[0] else s}\n" for s in test))
    (spk / "trials.txt").write_text("".join(
        f"{line}\n" for line in _lines(spk / "trials.txt")))
    with pytest.raises(KwsSvDataError, match=rf"of the trial list .*'{train_speaker}' \(test\.spk:1, train\.spk:1\)"):
        build(base_cfg, {"model.w2v_path": str(encoder_ckpt), "task.data": f"{views['kw']},{spk}"}, splits=())


# -- the mini corpus' two views (fairseq-kd-prepare-kws-sv view) and a joint run over them ----------
JOINT_VIEW_UPDATES = 300


@pytest.fixture(scope="module")
def prepared_views(tmp_path_factory) -> Dict[str, Path]:
    """``fairseq-kd-prepare-kws-sv view``: the keyword-only and speaker-only views of the subset."""
    from fairseq_kd.cli.prepare_kws_sv import main

    root = tmp_path_factory.mktemp("prepared_views")
    for view in ("keywords", "speakers"):
        assert main(["view", "--data", str(KEYWORDS), "--view", view, "--dest", str(root / view)]) == 0
    return {"kw": root / "keywords", "spk": root / "speakers"}


def _rows(folder: Path, split: str) -> List[str]:
    return [line.split("\t")[0] for line in _lines(folder / f"{split}.tsv")[1:]]


def test_views_split_the_subset_into_disjoint_corpora(prepared_views, tmp_path, capsys):
    from fairseq_kd.cli.prepare_kws_sv import main
    from fairseq_kd.data.kws_sv import check_layout

    kw, spk = prepared_views["kw"], prepared_views["spk"]
    for split in ("train", "valid", "test"):
        kw_rows, spk_rows, source = _rows(kw, split), _rows(spk, split), _rows(KEYWORDS, split)
        assert not set(kw_rows) & set(spk_rows) and sorted(kw_rows + spk_rows) == sorted(source)
        assert len(kw_rows) == len(spk_rows) == len(source) // 2
        assert set(_lines(kw / f"{split}.spk")) == {"-"}  # the keyword view carries no speaker
        # each row keeps its own label; the views share no speaker
        label = dict(zip(source, _lines(KEYWORDS / f"{split}.kw")))
        assert _lines(kw / f"{split}.kw") == [label[r] for r in kw_rows]
        speaker = dict(zip(source, _lines(KEYWORDS / f"{split}.spk")))
        assert _lines(spk / f"{split}.spk") == [speaker[r] for r in spk_rows]
        assert not {speaker[r] for r in kw_rows} & {speaker[r] for r in spk_rows}
    assert not (spk / "train.kw").exists() and not (spk / "dict.kw.txt").exists()
    trials = _lines(spk / "trials.txt")
    assert set(trials) <= set(_lines(KEYWORDS / "trials.txt")) and {t[0] for t in trials} == {"0", "1"}
    assert check_layout(str(kw), sv=False) == check_layout(str(spk), kws=False) == {"train": 240, "valid": 30, "test": 40}
    assert _lines(kw / "train.tsv")[0] == str((KEYWORDS / "../audio").resolve())  # audio referenced in place
    # --all-rows: no split, every row with the view's label (a one-label copy of a corpus)
    assert main(["view", "--data", str(KEYWORDS), "--view", "keywords", "--all-rows", "--dest", str(tmp_path / "all")]) == 0
    assert sorted(_rows(tmp_path / "all", "train")) == sorted(_rows(KEYWORDS, "train"))  # written sorted by path
    assert set(_lines(tmp_path / "all" / "test.spk")) == {"-"} and not (tmp_path / "all" / "trials.txt").exists()
    # outputs are never replaced silently; a source without speaker labels is named
    assert main(["view", "--data", str(KEYWORDS), "--view", "keywords", "--dest", str(kw)]) == 2
    assert "already exist" in capsys.readouterr().err
    bare = write_view(tmp_path / "bare", "kw")
    assert main(["view", "--data", str(bare), "--view", "speakers", "--dest", str(tmp_path / "out")]) == 2
    assert "train.spk does not exist" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_joint_run_on_the_two_views_beats_chance_on_both_tasks(prepared_views, tmp_path):
    """Keywords from one view, speakers from the other (no row carries both labels): a joint run
    from a randomly initialised tiny HuBERT, then both tasks evaluated from the checkpoint alone."""
    from fairseq_kd.cli.eval_kws_sv import main as evaluate

    encoder = make_hubert_checkpoint(tmp_path / "hubert.pt", conv_layers=TINY_CONV)
    data = f"{prepared_views['kw']},{prepared_views['spk']}"
    run = tmp_path / "joint"
    # keyword spotting learns slower than the speaker head: two keyword batches for each speaker one
    cmd = [console_script("fairseq-hydra-train"), "--config-name", "kws_sv_joint", *CPU, f"task.data='{data}'",
           "task.corpus_ratios=[2.0,1.0]", *SMALL_HEADS, f"model.w2v_path={encoder}", "model.feature_grad_mult=1.0",
           "model.sv_layer=0", f"optimization.max_update={JOINT_VIEW_UPDATES}", "optimization.lr=[0.003]",
           # one validation, after the last update: each task on its own corpus' valid split
           "dataset.batch_size=8", f"dataset.validate_interval_updates={JOINT_VIEW_UPDATES}",
           "dataset.validate_interval=1000", "checkpoint.save_interval=1000",
           f"checkpoint.save_interval_updates={JOINT_VIEW_UPDATES}", "common.log_format=json",
           "common.log_interval=100", f"checkpoint.save_dir={run}", f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    valid = json_logs(output, "valid")
    assert valid and "valid_kws_accuracy" in valid[-1] and "valid_eer" in valid[-1], output[-3000:]
    encoder.unlink()  # the fine-tuned checkpoint must not need it

    checkpoint = run / "checkpoint_last.pt"
    assert evaluate([str(checkpoint), "--data", data, "--split", "test", "--cpu"]) == 0
    test = json.loads((run / "checkpoint_last.test.json").read_text())
    # 40 keyword clips of 4 unseen speakers, 10 keywords (chance 10 %: 10 or more right by chance
    # has probability < 1 %); 210 trials of 4 other unseen speakers (chance EER 50 %).
    # Measured with seeds 1, 2, 3: 47.5 / 57.5 / 52.5 % accuracy, 28.3 / 25.0 / 16.7 % EER.
    assert test["kws_utterances"] == 40 and test["trials"] == 210, test
    assert test["kws_accuracy"] >= 25.0, test
    assert test["eer"] <= 40.0, test


# -- the recipe on two corpora in the public layouts: examples/kws_sv/run.sh KWS_DATA=.. SV_DATA=.. --
def test_recipe_on_prepared_speech_commands_and_voxceleb(tmp_path):
    """Fake Speech Commands and VoxCeleb1 folders in their public layouts, prepared by
    ``fairseq-kd-prepare-kws-sv`` (Speech Commands made keyword-only with ``view --all-rows``);
    ``examples/kws_sv/run.sh`` with ``KWS_DATA`` / ``SV_DATA`` trains the four joint runs on the two
    corpora and evaluates each task on its own corpus' test split; then the encoder file is deleted
    and one checkpoint evaluated again from itself alone gives the same figures."""
    from fairseq_kd.cli.eval_kws_sv import main as evaluate
    from fairseq_kd.cli.prepare_kws_sv import main as prepare
    from test_kws_sv import fake_speech_commands, fake_voxceleb1

    sc, vox = fake_speech_commands(tmp_path / "speech_commands"), fake_voxceleb1(tmp_path / "VoxCeleb1")
    data = tmp_path / "data"
    assert prepare(["speech-commands", "--root", str(sc), "--dest", str(data / "sc12")]) == 0
    assert prepare(["view", "--data", str(data / "sc12"), "--view", "keywords", "--all-rows",
                    "--dest", str(data / "sc12_kw")]) == 0
    assert prepare(["voxceleb1", "--root", str(vox), "--dest", str(data / "vox1"), "--valid-speakers", "2"]) == 0
    encoder = make_hubert_checkpoint(tmp_path / "hubert.pt", conv_layers=TINY_CONV)
    out = tmp_path / "recipe"
    env = {**os.environ, "PATH": f"{Path(console_script('fairseq-hydra-train')).parent}{os.pathsep}{os.environ['PATH']}",
           "KWS_DATA": str(data / "sc12_kw"), "SV_DATA": str(data / "vox1"), "TEACHER": str(encoder),
           "STUDENT": str(encoder), "UPDATES": "4", "OUT": str(out), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(["bash", str(REPO / "examples" / "kws_sv" / "run.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    keyword_rows = [k for k in _lines(data / "sc12_kw" / "test.kw") if k != "-"]
    trials = _lines(data / "vox1" / "trials.txt")
    table = [line for line in _lines(out / "results.md") if line.startswith("| teacher") or line.startswith("| student")]
    assert len(table) == 4, _lines(out / "results.md")
    for name in ("teacher_frozen", "teacher_finetuned", "student_frozen", "student_finetuned"):
        test = json.loads((out / name / "checkpoint_best.test.json").read_text())
        # keywords scored on Speech Commands' test split only, EER on VoxCeleb's trial list only
        assert test["kws_utterances"] == len(keyword_rows) and test["trials"] == len(trials), (name, test)
        assert 0.0 <= test["kws_accuracy"] <= 100.0 and 0.0 <= test["eer"] <= 100.0, (name, test)
    encoder.unlink()
    first = json.loads((out / "teacher_finetuned" / "checkpoint_best.test.json").read_text())
    checkpoint = out / "teacher_finetuned" / "checkpoint_best.pt"
    assert evaluate([str(checkpoint), "--data", f"{data / 'sc12_kw'},{data / 'vox1'}", "--split", "test", "--cpu",
                     "--results-path", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "checkpoint_best.test.json").read_text())
    for key in ("kws_accuracy", "eer", "min_dcf", "kws_utterances", "trials"):
        assert again[key] == pytest.approx(first[key], abs=1e-6), key
