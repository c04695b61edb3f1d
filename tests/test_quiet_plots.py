"""Console scripts are quiet by default (issue 19), the report's plots tell models and kinds apart,
the report puts each student beside its undistilled twin, and it is skipped when none of its
inputs changed."""

from __future__ import annotations

import functools
import os
import re
import subprocess


import torch
from omegaconf import OmegaConf

from conftest import MANIFESTS, compose_preset, console_script

from fairseq_kd.cli import report

INFO_LINE = re.compile(r"\| INFO \||\]\[INFO\]")
IMPORT_TIME = "Please install tensorboardX"  # logged by `import fairseq`, before any script code runs


@functools.lru_cache(maxsize=None)
def _summary(*extra: str) -> str:
    full_env = {k: v for k, v in os.environ.items() if k != "FAIRSEQ_KD_VERBOSE"}
    proc = subprocess.run([console_script("fairseq-kd-summary"), "distilhubert", *extra], capture_output=True,
                          text=True, env=full_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "parameters without heads" in proc.stdout
    return proc.stdout + proc.stderr


def test_summary_quiet_by_default_and_loud_with_verbose():
    quiet = _summary()
    assert "ThinHubertModel Config" not in quiet
    assert "FutureWarning" not in quiet
    assert [line for line in quiet.splitlines() if INFO_LINE.search(line) and IMPORT_TIME not in line] == []
    loud = _summary("--verbose")
    assert "ThinHubertModel Config" in loud and "FutureWarning" in loud


def test_verbose_from_environment(monkeypatch):
    from fairseq_kd.cli import logs

    monkeypatch.delenv(logs.ENV_VERBOSE, raising=False)
    assert not logs.verbose_requested([]) and logs.verbose_requested(["x", "--verbose"])
    monkeypatch.setenv(logs.ENV_VERBOSE, "1")
    assert logs.verbose_requested([])


def test_no_import_time_info_line():
    assert IMPORT_TIME not in _summary()


def _logs():
    def rec(n, loss):
        return {"num_updates": float(n), "loss": loss}

    logs = {}
    for name in ("teacher", "thin_deep", "distilhubert"):
        logs[name] = {"train": [rec(50, 3.0), rec(100, 2.0)], "valid": [rec(100, 2.5)]}
    for name in report.finetuned_names():
        logs[f"ft_{name}"] = {"train": [rec(50, 9.0), rec(100, 8.0)],
                              "valid": [{"num_updates": 100.0, "loss": 8.5, "uer": 70.0}]}
    logs["thin_deep"]["valid"] = [{"num_updates": float(n), "loss": 1.0, "cos_sim_h1": 0.2 + n / 1000,
                                   "cos_sim_h2": 0.3 + n / 1000} for n in (50, 100)]
    return logs


def test_curves_colour_per_model_style_per_kind():
    fig = report.curves_figure(_logs())
    lines = [line for ax in fig.axes for line in ax.get_lines() if line.get_gid()]
    by_gid = {line.get_gid(): line for line in lines}
    colours, styles = {}, {}
    for gid, line in by_gid.items():
        name, kind = gid.split(":")
        colours.setdefault(name.removeprefix("ft_"), set()).add(line.get_color())
        styles.setdefault(kind, set()).add(line.get_linestyle())
    assert set(colours) == {"teacher", "thin_deep", "distilhubert", "thin_deep_undistilled",
                            "distilhubert_undistilled"}
    assert all(len(c) == 1 for c in colours.values()), colours  # one colour per model, ft_ included
    assert len({next(iter(c)) for c in colours.values()}) == 5  # distinct across models
    assert set(styles) == {"train", "valid", "metric"} and all(len(s) == 1 for s in styles.values())
    assert len({next(iter(s)) for s in styles.values()}) == 3


def test_similarity_starts_at_zero_and_fits_the_data():
    initial = {"thin_deep": {"h1": 0.15, "h2": 0.12}}  # the report's update-0 measurement
    fig = report.similarity_figure(_logs(), {"thin_deep": {"h1": 0.31, "h2": 0.41}}, initial)
    ax = fig.axes[0]
    assert ax.get_xlim()[0] == 0
    starts = {line.get_label(): (line.get_xdata()[0], line.get_ydata()[0]) for line in ax.get_lines()
              if line.get_label() in ("h1", "h2")}
    assert starts == {"h1": (0, 0.15), "h2": (0, 0.12)}  # the update-0 value starts each curve
    low, high = ax.get_ylim()
    assert 0.05 < low < 0.12 and 0.41 < high < 0.5


def _row(cer, distilled=True):
    return {"params_m": 1.0, "params_with_heads_m": 1.5, "gmacs_per_10s": 1.0, "output_rate_hz": 50.0,
            "cpu_time_vs_teacher": 0.5, "cpu_time_range": [0.4, 0.6], "cos_sim_valid": 0.5,
            "distilled": distilled, "wer": 100.0, "cer": cer}


def test_results_figure_and_table_put_distilled_beside_undistilled():
    rows = {"teacher": _row(40.0, False), "thin_deep": _row(60.0), "thin_deep_undistilled": _row(90.0, False),
            "distilhubert": _row(55.0), "distilhubert_undistilled": _row(85.0, False)}
    fig = report.results_figure(rows, "test")
    ax = fig.axes[0]
    heights = {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}
    assert heights == {"distilled": [60.0, 55.0], "undistilled (random init)": [90.0, 85.0]}
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [40.0]  # the teacher's CER
    table = report.format_table({"split": "test", "models": rows,
                                 "teacher_target_accuracy": {"masked": 0.1234, "unmasked": 0.05}})
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "| random init |" in lines["thin_deep_undistilled"] and "| distilled |" in lines["thin_deep"]
    assert "0.50x (0.40-0.60)" in lines["thin_deep"]
    assert "masked frames 12.3 %, unmasked frames 5.0 %" in table


def test_teacher_target_accuracy_is_the_last_validation():
    log = {"valid": [{"correct_m_0": 0.05, "correct_u_0": 0.04}, {"correct_m_0": 0.09, "correct_u_0": 0.06}]}
    assert report.teacher_target_accuracy(log) == {"masked": 0.09, "unmasked": 0.06}
    assert report.teacher_target_accuracy({"valid": []}) == {"masked": None, "unmasked": None}


def test_initialised_student_copies_only_what_the_config_says(trained_teacher):
    """The update-0 student has the teacher's CNN and first layer (init_teacher_*), the
    undistilled twin has neither; both are rebuilt from the config alone, reproducibly."""
    from fairseq_kd.evaluation.similarity import initialised_student
    from fairseq_kd.teacher import FrozenTeacher

    cfg = OmegaConf.create(compose_preset("distilhubert", [
        f"task.data={MANIFESTS}", f"task.teacher_path={trained_teacher}", "model.encoder_layers=1",
        "model.encoder_embed_dim=64", "model.encoder_ffn_embed_dim=128", "model.encoder_attention_heads=4",
        "model.conv_channels=[64,64,64,64,64,64,64]", "model.pred_layer_ids=[1,2]", "model.teacher_embed_dim=64",
        "model.init_teacher_layers=1",
    ]))
    teacher = FrozenTeacher.from_checkpoint(str(trained_teacher))
    taught = teacher.fairseq_state_dict()
    update0 = initialised_student(cfg, teacher).state_dict()
    twin = initialised_student(cfg).state_dict()
    for key in ("feature_extractor.conv_layers.0.0.weight", "encoder.layers.0.fc1.weight"):
        assert torch.equal(update0[key], taught[key])
        assert not torch.allclose(twin[key], taught[key])
    assert all(torch.equal(v, initialised_student(cfg).state_dict()[k]) for k, v in twin.items())


def test_report_skipped_when_inputs_unchanged(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "teacher.log").write_text("log\n")
    calls = []

    def fake_build(run_, data, split, repeats):
        calls.append(run_)
        return {"split": split, "similarity": {}, "models": {"teacher": _row(1.0, False)}}

    monkeypatch.setattr(report, "build_report", fake_build)
    for name in report.OUTPUTS[2:]:
        (run / name).write_bytes(b"png")
    args = [str(run), "--data", str(MANIFESTS)]
    assert report.main(args) == 0 and len(calls) == 1
    assert "(first report)" in capsys.readouterr().out
    assert report.main(args) == 0 and len(calls) == 1
    assert "report unchanged" in capsys.readouterr().out
    os.utime(run / "teacher.log", ns=(1, 1))  # touched, same content: still unchanged
    assert report.main(args) == 0 and len(calls) == 1
    (run / "teacher.log").write_text("log, longer\n")
    assert report.main(args) == 0 and len(calls) == 2
    assert "(an input changed)" in capsys.readouterr().out
    assert report.main([*args, "--force"]) == 0 and len(calls) == 3
