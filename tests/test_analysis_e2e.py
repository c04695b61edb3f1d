"""The Deep-versus-Wide commands end to end on the bundled corpus, with a tiny fairseq HuBERT teacher:
``fairseq-kd-family`` writes two students' configs (2-L Pred, 4-L L2L at one budget),
``fairseq-kd-cluster-layers`` turns the teacher's layer CKA into a ``criterion.hint_targets`` spec,
fairseq's trainer distils both students for 2 updates (the 4-L one on the clustered spec), and
``fairseq-kd-analyze`` writes the CKA heat maps, cosine and probe plots and JSON for both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CPU, MANIFESTS, console_script, run, train_logs
from fairseq_checkpoints import make_hubert_checkpoint
from fairseq_kd.cli import analyze, cluster_layers, family

QUICK = [
    *CPU, "dataset.batch_size=2", "task.max_sample_size=24000", "optimization.max_update=2",
    "optimization.update_freq=[1]", "dataset.disable_validation=true", "common.log_interval=1",
    "common.log_format=json", "lr_scheduler.warmup_updates=1",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work = tmp_path_factory.mktemp("study")
    teacher = make_hubert_checkpoint(work / "teacher.pt", layers=4, dropout=0.0)
    assert family.main(["--teacher", str(teacher), "--budget", "1e5", "--depths", "2", "4",
                        "--out", str(work / "family")]) == 0
    members = json.loads((work / "family" / "family.json").read_text())["members"]
    assert [(m["name"], m["method"]) for m in members] == [("family_2l_64_pred", "pred"), ("family_4l_48_l2l", "l2l")]
    return work, teacher


def train(work: Path, teacher: Path, name: str, *overrides: str) -> Path:
    save_dir = work / name
    out = run([
        console_script("fairseq-hydra-train"), "--config-dir", str(work / "family"), "--config-name", name,
        f"task.data={MANIFESTS}", f"task.teacher_path={teacher}", *QUICK, *overrides,
        f"checkpoint.save_dir={save_dir}", f"hydra.run.dir={save_dir}",
    ], cwd=work).stdout
    logs = train_logs(out)
    assert [r["num_updates"] for r in logs] == ["1", "2"], name
    return save_dir / "checkpoint_last.pt", logs


def test_cluster_spec_trains_and_analysis_writes_plots(study, capsys):
    work, teacher = study
    assert cluster_layers.main(["--teacher", str(teacher), "--manifest", str(MANIFESTS / "valid.tsv"),
                                "--groups", "2", "--student-layers", "4", "--max-utterances", "4",
                                "--out", str(work / "clusters")]) == 0
    spec_line = capsys.readouterr().out.strip().splitlines()[-1]
    spec = json.loads((work / "clusters" / "clusters.json").read_text())["spec"]
    assert spec["hint_layer_ids"] == [2, 4] and len(spec["hint_targets"]) == 2
    assert sorted(int(t) for g in spec["hint_targets"] for t in g.split("+")) == [1, 2, 3, 4]

    pred, _ = train(work, teacher, "family_2l_64_pred")
    l2l, logs = train(work, teacher, "family_4l_48_l2l", *spec_line.split())
    assert {"loss_h2", "loss_h4"} <= set(logs[-1]) and "loss_h1" not in logs[-1]  # the clustered targets

    out = work / "analysis"
    assert analyze.main(["--teacher", str(teacher), "--manifest", str(MANIFESTS / "train.tsv"),
                         "--student", f"wide={pred}", "--student", f"deep={l2l}", "--out", str(out),
                         "--max-utterances", "8", "--probe-steps", "10", "--cosine-utterances", "3"]) == 0
    for png in ("cka_wide.png", "cka_deep.png", "cosine.png", "probes.png"):
        assert (out / png).stat().st_size > 5000, png
    result = json.loads((out / "analysis.json").read_text())
    deep, wide = result["models"]["deep"], result["models"]["wide"]
    assert len(deep["cka"]) == 5 and len(deep["cka"][0]) == 5 and len(wide["cka"]) == 3
    assert all(0.0 <= v <= 1.0 + 1e-9 for row in deep["cka"] + wide["cka"] for v in row)
    assert set(deep["cosine"]) == {"h2", "h4"} and set(wide["cosine"]) == {"p1", "p3", "p4"}  # 3 of 4 teacher layers, spread
    for model in result["models"].values():
        assert len(model["content_error"]) == len(model["speaker_accuracy"]) == model["layers"] + 1
    assert result["probe_split"]["test"] > 0


def test_bad_input_is_refused(study, tmp_path, capsys):
    work, teacher = study
    manifest = tmp_path / "nospk.tsv"  # no nospk.spk beside it
    manifest.write_text((MANIFESTS / "valid.tsv").read_text().replace("audio\n", f"{MANIFESTS / 'audio'}\n", 1))
    assert analyze.main(["--teacher", str(teacher), "--manifest", str(manifest), "--student",
                         f"x={work / 'none.pt'}", "--out", str(tmp_path / "a")]) == 2
    assert "nospk.spk does not exist" in capsys.readouterr().err
    assert family.main(["--depths", "3", "0"]) == 2
    assert "positive layer counts" in capsys.readouterr().err
    assert family.main(["--depths", "3", "12", "--budget", "1e4"]) == 2
    assert "no depth can meet the budget" in capsys.readouterr().err
