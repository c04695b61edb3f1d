# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``fairseq-kd-report RUN_DIR``: the results table and plots of a main-job run.

``examples/mini/run.sh`` leaves, under ``RUN_DIR``, a teacher (``teacher/``), distilled students
(``thin_deep/``, ``distilhubert/``), their CTC fine-tunings (``ft_*``), decodings (``decode_*``)
and each training's log (``*.log``, fairseq's ``simple`` format). This command reads them and writes:

* ``results.md`` / ``results.json``: per model, parameters with and without distillation heads,
  MACs per 10 s of audio, CPU inference time relative to the teacher (measured here, side by side,
  on the same batch), the student-teacher cosine similarity on held-out audio, and WER / CER of the
  decoded split;
* ``curves.png``: training curves (teacher pre-training, distillation, fine-tuning loss and valid
  UER) read from the logs;
* ``similarity.png``: per distilled output, the cosine similarity to its teacher layer on the
  valid split at each validation of the distillation run, and as measured by this command.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from fairseq_kd.cli.errors import clean_errors, report as report_error
from fairseq_kd.cli.logs import add_verbose_argument, configure

logger = logging.getLogger("fairseq_kd.report")

TEACHER = "teacher"
STUDENTS = ("thin_deep", "distilhubert")
KV = re.compile(r"(\w+)=([-+\d.eE]+|nan|inf)")


class ReportError(ValueError):
    """A run folder that cannot be reported on."""


# -- logs ------------------------------------------------------------------------------------------
def parse_log(path: Path) -> Dict[str, List[Dict[str, float]]]:
    """``train_inner`` and ``valid`` records of a fairseq log written with ``log_format=simple``."""
    records: Dict[str, List[Dict[str, float]]] = {"train": [], "valid": []}
    if not path.is_file():
        return records
    for line in path.read_text(errors="replace").splitlines():
        if "][train_inner][" in line:
            records["train"].append({k: float(v) for k, v in KV.findall(line.split(" - ", 1)[-1])})
        elif "][valid][" in line and " | " in line:
            values = {}
            for part in line.split(" | ")[1:]:
                key, _, value = part.strip().rpartition(" ")
                try:
                    values[key] = float(value)
                except ValueError:
                    continue
            records["valid"].append(values)
    return records


def read_score(path: Path) -> Optional[float]:
    """The rate in ``wer.txt`` / ``cer.txt`` written by ``fairseq-kd-score``."""
    if not path.is_file():
        return None
    first = path.read_text().split("\n", 1)[0]
    return float(first.split(":", 1)[1])


# -- models ----------------------------------------------------------------------------------------
def load_encoders(run: Path):
    """The teacher (``FrozenTeacher``) and the students (with their heads and configs)."""
    from fairseq_kd.evaluation.similarity import load_distilled
    from fairseq_kd.teacher import FrozenTeacher

    teacher_path = run / TEACHER / "checkpoint_last.pt"
    if not teacher_path.is_file():
        raise ReportError(f"{teacher_path} does not exist: run examples/mini/run.sh first")
    teacher = FrozenTeacher.from_checkpoint(str(teacher_path))
    students = {}
    for name in STUDENTS:
        path = run / name / "checkpoint_last.pt"
        if path.is_file():
            students[name] = load_distilled(str(path))
    return teacher, students


def size_and_compute(run: Path, name: str) -> Dict[str, float]:
    from fairseq_kd.presets import model_fields
    from fairseq_kd.models.thin_hubert import ThinHubertModel

    summary = ThinHubertModel.model_summary(model_fields(str(run / name / "checkpoint_last.pt"), []))
    return {
        "params_m": summary["params"] / 1e6,
        "params_with_heads_m": summary["params_with_heads"] / 1e6,
        "gmacs_per_10s": summary["macs_per_10s"] / 1e9,
        "output_rate_hz": summary["output_frame_rate"],
    }


def similarity(students, teacher, manifest: Path) -> Dict[str, Dict[str, float]]:
    from fairseq_kd.evaluation.similarity import similarity_to_teacher

    return {name: similarity_to_teacher(model, cfg, teacher, str(manifest)) for name, (model, cfg) in students.items()}


def inference_times(run: Path, names: Sequence[str], repeats: int) -> Dict[str, float]:
    """CPU forward time of each encoder relative to the teacher's, timed side by side in rounds
    on the same batch of 10 s utterances (``fairseq_kd.benchmark``)."""
    from fairseq_kd.benchmark import inference_time_ratios

    paths = {name: str(run / name / "checkpoint_last.pt") for name in names}
    ratios = inference_time_ratios(
        paths[TEACHER], [paths[n] for n in names if n != TEACHER], seconds=10.0, batch=4, repeats=repeats
    )
    return {name: ratios[path]["time_ratio"] for name, path in paths.items()}


# -- plots -----------------------------------------------------------------------------------------
# one colour per model (its fine-tuning ft_NAME shares it), one line style per kind of curve
MODEL_COLORS = {TEACHER: "tab:blue", "thin_deep": "tab:orange", "distilhubert": "tab:green"}
KIND_STYLES = {  # kind -> (linestyle, marker)
    "train": ("-", None),
    "valid": ("--", "o"),
    "metric": (":", "s"),
}


def model_color(name: str) -> str:
    base = name[3:] if name.startswith("ft_") else name
    if base not in MODEL_COLORS:
        MODEL_COLORS[base] = f"C{(len(MODEL_COLORS) + 3) % 10}"
    return MODEL_COLORS[base]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(ax, points, name: str, kind: str, label: str) -> None:
    linestyle, marker = KIND_STYLES[kind]
    xs, ys = zip(*points)
    ax.plot(xs, ys, linestyle=linestyle, marker=marker, markersize=4, color=model_color(name),
            label=label, gid=f"{name}:{kind}")


def curves_figure(logs: Dict[str, Dict[str, List[Dict[str, float]]]]):
    """The training curves as a matplotlib Figure: colour = model, line style = kind
    (train loss solid, valid loss dashed with circles, valid UER dotted with squares)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [
        (axes[0], [TEACHER], "teacher pre-training (hubert_pretraining)"),
        (axes[1], list(STUDENTS), "distillation (distill_hubert)"),
        (axes[2], [f"ft_{m}" for m in (TEACHER, *STUDENTS)], "CTC fine-tuning"),
    ]
    for ax, names, title in panels:
        for name in names:
            for kind in ("train", "valid"):
                points = [(r["num_updates"], r["loss"]) for r in logs.get(name, {}).get(kind, [])
                          if "loss" in r and "num_updates" in r]
                if points:
                    _curve(ax, points, name, kind, f"{name} {kind} loss")
        ax.set_title(title)
        ax.set_xlabel("updates")
        ax.set_ylabel("loss")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    uer_ax = axes[2].twinx()
    for name in (TEACHER, *STUDENTS):
        points = [(r["num_updates"], r["uer"]) for r in logs.get(f"ft_{name}", {}).get("valid", [])
                  if "uer" in r and "num_updates" in r]
        if points:
            _curve(uer_ax, points, f"ft_{name}", "metric", f"ft_{name} valid UER %")
    uer_ax.set_ylabel("valid UER (%)")
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        if ax is axes[2]:
            more = uer_ax.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        if handles:
            ax.legend(handles, labels, fontsize=7)
    fig.tight_layout()
    return fig


def plot_curves(logs: Dict[str, Dict[str, List[Dict[str, float]]]], out: Path) -> None:
    fig = curves_figure(logs)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)


def similarity_figure(logs: Dict[str, Dict[str, List[Dict[str, float]]]], final: Dict[str, Dict[str, float]]):
    """Per student, the valid-set cosine similarity of every distilled output to its teacher layer
    at each validation of the distillation run (a value logged at update 0, the initialised student,
    is drawn when the log has one), and (x) the report's own measurement of the final student.
    The y-range is fit to the values, so that outputs are visibly apart."""
    plt = _pyplot()
    names = list(final)
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(6 * max(len(names), 1), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        valid = [r for r in logs.get(name, {}).get("valid", []) if "num_updates" in r]
        last_update = valid[-1]["num_updates"] if valid else 0
        values = []
        for index, (output, value) in enumerate(final[name].items()):
            color = f"C{index % 10}"
            points = [(r["num_updates"], r[f"cos_sim_{output}"]) for r in valid if f"cos_sim_{output}" in r]
            if points:
                ax.plot(*zip(*points), "-", marker=".", color=color, label=output)
                values += [v for _, v in points]
            ax.plot([last_update], [value], "x", color=color)
            values.append(value)
        if values:
            low, high = min(values), max(values)
            pad = max((high - low) * 0.08, 0.01)
            ax.set_ylim(max(low - pad, -1.0), min(high + pad, 1.0))
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.set_title(f"{name}: cosine similarity to the teacher (valid)")
        ax.set_xlabel("distillation updates (x: held-out measurement of the final student)")
        ax.set_ylabel("cosine similarity")
        ax.legend(fontsize=7, title="h: hint on layer, p: prediction of teacher layer", title_fontsize=7)
    fig.tight_layout()
    return fig


def plot_similarity(logs: Dict[str, Dict[str, List[Dict[str, float]]]], final: Dict[str, Dict[str, float]], out: Path) -> None:
    fig = similarity_figure(logs, final)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)


# -- the report ------------------------------------------------------------------------------------
def build_report(run: Path, data: Path, split: str, repeats: int) -> Dict[str, Any]:
    names = [TEACHER, *[s for s in STUDENTS if (run / s / "checkpoint_last.pt").is_file()]]
    logs = {name: parse_log(run / f"{name}.log") for name in names}
    logs.update({f"ft_{name}": parse_log(run / f"ft_{name}.log") for name in names})

    teacher, students = load_encoders(run)
    sims = similarity(students, teacher, data / "valid.tsv")
    time_ratios = inference_times(run, names, repeats)
    rows = {}
    for name in names:
        row = size_and_compute(run, name)
        row["cpu_time_vs_teacher"] = time_ratios[name]
        row["cos_sim_valid"] = sum(sims[name].values()) / len(sims[name]) if name in sims else None
        row["wer"] = read_score(run / f"decode_{name}" / "wer.txt")
        row["cer"] = read_score(run / f"decode_{name}" / "cer.txt")
        rows[name] = row
    plot_curves(logs, run / "curves.png")
    plot_similarity(logs, sims, run / "similarity.png")
    return {"split": split, "models": rows, "similarity": sims}


def format_table(report: Dict[str, Any]) -> str:
    header = (
        f"| model | params (M) | with heads (M) | GMACs / 10 s | output rate | CPU time vs teacher "
        f"| cos sim to teacher (valid) | {report['split']} WER % | {report['split']} CER % |"
    )
    lines = [header, "|" + "---|" * 9]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for name, row in report["models"].items():
        lines.append(
            f"| {name} | {row['params_m']:.3f} | {row['params_with_heads_m']:.3f} | {row['gmacs_per_10s']:.2f} "
            f"| {row['output_rate_hz']:g} Hz | {row['cpu_time_vs_teacher']:.2f}x | {fmt(row['cos_sim_valid'], '.3f')} "
            f"| {fmt(row['wer'], '.2f')} | {fmt(row['cer'], '.2f')} |"
        )
    return "\n".join(lines)


OUTPUTS = ("results.md", "results.json", "curves.png", "similarity.png")
STAMP = "report.stamp"


def input_stamp(run: Path, data: Path, split: str, repeats: int) -> str:
    """A hash of every input of the report (checkpoints by size and mtime; training logs, scores and
    the valid manifest by content) and its arguments: the report is rebuilt only when it changes."""
    import hashlib

    files = [data / "valid.tsv"]
    for name in (TEACHER, *STUDENTS):
        files += [run / name / "checkpoint_last.pt", run / f"{name}.log", run / f"ft_{name}.log",
                  run / f"decode_{name}" / "wer.txt", run / f"decode_{name}" / "cer.txt"]
    digest = hashlib.sha256(f"{split} {repeats}".encode())
    for path in files:
        digest.update(f"{path.resolve()}:".encode())
        if not path.is_file():
            digest.update(b"missing\n")
        elif path.suffix == ".pt":  # checkpoints: size and mtime (fairseq rewrites them only when training)
            stat = path.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        else:  # logs and scores: their content (run.sh re-scores, rewriting the same wer.txt, every run)
            digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
    return digest.hexdigest()


@clean_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fairseq-kd-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the OUT folder of examples/mini/run.sh (default runs/mini)")
    parser.add_argument("--data", default=None, help="manifest folder the run used (default: the bundled corpus)")
    parser.add_argument("--split", default="test", help="the decoded split (decode_*/wer.txt)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per model (median)")
    parser.add_argument("--force", action="store_true", help="rebuild even if no input changed since the last report")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    configure(args.verbose)
    run = Path(args.run_dir)
    data = Path(args.data) if args.data else Path(__file__).resolve().parents[2] / "manifests"
    try:
        if not (data / "valid.tsv").is_file():
            raise ReportError(f"{data / 'valid.tsv'} does not exist: pass --data, the manifest folder of the run")
        stamp = input_stamp(run, data, args.split, args.repeats)
        stamp_file = run / STAMP
        done = all((run / name).is_file() for name in OUTPUTS)
        if not args.force and done and stamp_file.is_file() and stamp_file.read_text().strip() == stamp:
            print((run / "results.md").read_text().rstrip("\n"))
            print(f"report unchanged: no input changed since {run / 'results.md'} was written "
                  f"(--force rebuilds it)")
            return 0
        reason = "first report" if not done or not stamp_file.is_file() else (
            "forced" if args.force else "an input changed")
        report = build_report(run, data, args.split, args.repeats)
    except ReportError as error:
        return report_error(error, "fairseq-kd-report")
    table = format_table(report)
    (run / "results.md").write_text(table + "\n")
    (run / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    stamp_file.write_text(stamp + "\n")
    print(table)
    print(f"wrote {run / 'results.md'}, results.json, curves.png, similarity.png ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
