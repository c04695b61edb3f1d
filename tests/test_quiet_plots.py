"""Console scripts are quiet by default (issue 19), the report's plots tell models and kinds apart,
and the report is skipped when none of its inputs changed."""

from __future__ import annotations

import functools
import os
import re
import subprocess


from conftest import MANIFESTS, console_script

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
        logs[f"ft_{name}"] = {"train": [rec(50, 9.0), rec(100, 8.0)],
                              "valid": [{"num_updates": 100.0, "loss": 8.5, "uer": 70.0}]}
    logs["thin_deep"]["valid"] = [{"num_updates": float(n), "loss": 1.0, "cos_sim_h1": 0.2 + n / 1000,
                                   "cos_sim_h2": 0.3 + n / 1000} for n in (0, 50, 100)]
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
    assert set(colours) == {"teacher", "thin_deep", "distilhubert"}
    assert all(len(c) == 1 for c in colours.values()), colours  # one colour per model, ft_ included
    assert len({next(iter(c)) for c in colours.values()}) == 3  # distinct across models
    assert set(styles) == {"train", "valid", "metric"} and all(len(s) == 1 for s in styles.values())
    assert len({next(iter(s)) for s in styles.values()}) == 3


def test_similarity_starts_at_zero_and_fits_the_data():
    fig = report.similarity_figure(_logs(), {"thin_deep": {"h1": 0.31, "h2": 0.41}})
    ax = fig.axes[0]
    assert ax.get_xlim()[0] == 0
    assert min(line.get_xdata()[0] for line in ax.get_lines()) == 0  # the update-0 value is drawn
    low, high = ax.get_ylim()
    assert 0.1 < low < 0.2 and 0.41 < high < 0.5


def test_report_skipped_when_inputs_unchanged(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "teacher.log").write_text("log\n")
    calls = []

    def fake_build(run_, data, split, repeats):
        calls.append(run_)
        return {"split": split, "similarity": {}, "models": {"teacher": {
            "params_m": 1.0, "params_with_heads_m": 1.0, "gmacs_per_10s": 1.0, "output_rate_hz": 50.0,
            "cpu_time_vs_teacher": 1.0, "cos_sim_valid": None, "wer": 1.0, "cer": 1.0}}}

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
