# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``fairseq-kd-report RUN_DIR``: the results table and plots of a main-job run.

``examples/mini/run.sh`` leaves, under ``RUN_DIR``, a teacher (``teacher/``), distilled students
(``thin_deep/``, ``distilhubert/``), their CTC fine-tunings (``ft_*``), decodings (``decode_*``)
and each training's log (``*.log``, fairseq's ``simple`` format). This command reads them and writes:

* ``results.md`` / ``results.json``: per model, parameters with and without distillation heads,
  MACs per 10 s of audio, CPU inference time relative to the teacher (measured here, interleaved
  rounds on the same batch: median and range of the per-round ratios), the student-teacher cosine
  similarity on held-out audio, and WER / CER of the decoded split; each student beside its
  *undistilled twin* (``NAME_undistilled``: the same architecture fine-tuned from random
  initialisation with the same budget, ``ft_NAME_undistilled``), whose similarity is that of the
  randomly initialised student; and the teacher's k-means target accuracy on the valid split
  (``correct_m_0`` / ``correct_u_0`` of its last validation, the masked / unmasked frames'
  accuracy as fairseq's ``hubert`` criterion logs it);
* ``curves.png``: training curves (teacher pre-training, distillation, fine-tuning loss and valid
  UER) read from the logs;
* ``similarity.png``: per distilled output, the cosine similarity to its teacher layer on the
  valid split from update 0 (the initialised student, rebuilt here the way distillation builds it)
  through each validation of the distillation run, and as measured by this command;
* ``results.png``: CER of every student, distilled and undistilled, beside the teacher's.
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
UNDISTILLED = "_undistilled"  # NAME_undistilled: NAME's architecture fine-tuned from random initialisation
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


def distilled_twin(name: str) -> str:
    """The distilled student whose architecture (and checkpoint config) a row has."""
    return name[: -len(UNDISTILLED)] if name.endswith(UNDISTILLED) else name


def teacher_target_accuracy(teacher_log: Dict[str, List[Dict[str, float]]]) -> Dict[str, Optional[float]]:
    """The teacher's k-means target accuracy at its last validation, as fairseq's ``hubert``
    criterion logs it (``correct_m_0``: masked frames, ``correct_u_0``: unmasked frames)."""
    last = teacher_log["valid"][-1] if teacher_log["valid"] else {}
    return {"masked": last.get("correct_m_0"), "unmasked": last.get("correct_u_0")}


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


def initial_similarity(students, teacher, manifest: Path) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Per student: ``"update0"``, the similarity of the student distillation starts from (teacher
    parts copied as its config says), and ``"random"``, of its architecture at random
    initialisation (the undistilled twin's starting point; the same student when nothing is copied)."""
    from fairseq_kd.evaluation.similarity import initialised_student, similarity_to_teacher
    from fairseq_kd.teacher import copies_from_teacher

    out = {}
    for name, (_, cfg) in students.items():
        random = similarity_to_teacher(initialised_student(cfg), cfg, teacher, str(manifest))
        update0 = (similarity_to_teacher(initialised_student(cfg, teacher), cfg, teacher, str(manifest))
                   if copies_from_teacher(cfg.model) else random)
        out[name] = {"update0": update0, "random": random}
    return out


def inference_times(run: Path, names: Sequence[str], repeats: int) -> Dict[str, Dict[str, Any]]:
    """CPU forward time of each encoder relative to the teacher's, timed in interleaved rounds on
    the same batch of 10 s utterances (``fairseq_kd.benchmark``): the median per-round ratio and
    the lowest and highest one."""
    from fairseq_kd.benchmark import inference_time_ratios

    paths = {name: str(run / name / "checkpoint_last.pt") for name in names}
    ratios = inference_time_ratios(
        paths[TEACHER], [paths[n] for n in names if n != TEACHER], seconds=10.0, batch=4, repeats=repeats
    )
    return {name: {"median": ratios[path]["time_ratio"], "range": list(ratios[path]["time_ratio_range"])}
            for name, path in paths.items()}


# -- plots -----------------------------------------------------------------------------------------
# one colour per model (its fine-tuning ft_NAME shares it), one line style per kind of curve
MODEL_COLORS = {TEACHER: "tab:blue", "thin_deep": "tab:orange", "distilhubert": "tab:green",
                "thin_deep" + UNDISTILLED: "tab:red", "distilhubert" + UNDISTILLED: "tab:purple"}
KIND_STYLES = {  # kind -> (linestyle, marker)
    "train": ("-", None),
    "valid": ("--", "o"),
    "metric": (":", "s"),
}


def finetuned_names() -> List[str]:
    """Every model the main job fine-tunes: the teacher, the students and their undistilled twins."""
    return [TEACHER, *STUDENTS, *[s + UNDISTILLED for s in STUDENTS]]


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
        (axes[2], [f"ft_{m}" for m in finetuned_names()], "CTC fine-tuning"),
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
    for name in finetuned_names():
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


def similarity_figure(
    logs: Dict[str, Dict[str, List[Dict[str, float]]]],
    final: Dict[str, Dict[str, float]],
    initial: Optional[Dict[str, Dict[str, float]]] = None,
):
    """Per student, the valid-set cosine similarity of every distilled output to its teacher layer
    at update 0 (``initial``: the initialised student, measured by the report; fairseq never
    validates before the first update), at each validation of the distillation run, and (x) the
    report's own measurement of the final student. The y-range is fit to the values, so that
    outputs are visibly apart."""
    initial = initial or {}
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
            if output in initial.get(name, {}) and not any(x == 0 for x, _ in points):
                points.insert(0, (0, initial[name][output]))
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


def plot_similarity(logs, final, initial, out: Path) -> None:
    fig = similarity_figure(logs, final, initial)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)


def results_figure(rows: Dict[str, Dict[str, Any]], split: str):
    """Distilled vs undistilled at a glance: per student architecture, the CER of the distilled
    student and of its undistilled twin as bars, the teacher's CER as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    students = [s for s in STUDENTS if s in rows]
    width = 0.38
    for offset, suffix, label in ((-width / 2, "", "distilled"), (width / 2, UNDISTILLED, "undistilled (random init)")):
        names = [s + suffix for s in students]
        cers = [rows.get(n, {}).get("cer") for n in names]
        xs = [i + offset for i, c in enumerate(cers) if c is not None]
        bars = ax.bar(xs, [c for c in cers if c is not None], width,
                      color=[model_color(n) for n, c in zip(names, cers) if c is not None], label=label,
                      hatch=None if not suffix else "//", edgecolor="black")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    teacher_cer = rows.get(TEACHER, {}).get("cer")
    if teacher_cer is not None:
        ax.axhline(teacher_cer, color=model_color(TEACHER), linestyle="--", label=f"teacher ({teacher_cer:.1f})")
    ax.set_xticks(range(len(students)), students)
    ax.set_ylabel(f"{split} CER % (lower is better)")
    ax.set_title("CTC fine-tuning with the same budget: distilled vs undistilled")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_results(rows: Dict[str, Dict[str, Any]], split: str, out: Path) -> None:
    fig = results_figure(rows, split)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)


# -- the report ------------------------------------------------------------------------------------
def build_report(run: Path, data: Path, split: str, repeats: int) -> Dict[str, Any]:
    names = [TEACHER, *[s for s in STUDENTS if (run / s / "checkpoint_last.pt").is_file()]]
    twins = [s + UNDISTILLED for s in names[1:] if (run / f"ft_{s}{UNDISTILLED}.log").is_file()]
    logs = {name: parse_log(run / f"{name}.log") for name in names}
    logs.update({f"ft_{name}": parse_log(run / f"ft_{name}.log") for name in [*names, *twins]})

    teacher, students = load_encoders(run)
    sims = similarity(students, teacher, data / "valid.tsv")
    initial = initial_similarity(students, teacher, data / "valid.tsv")
    time_ratios = inference_times(run, names, repeats)
    rows = {}
    for name in [*names, *twins]:
        twin = distilled_twin(name)
        row = size_and_compute(run, twin)
        row["distilled"] = name != TEACHER and name == twin
        row["cpu_time_vs_teacher"] = time_ratios[twin]["median"]  # the twins share an architecture
        row["cpu_time_range"] = time_ratios[twin]["range"]
        measured = sims.get(name) if name == twin else initial.get(twin, {}).get("random")
        row["cos_sim_valid"] = sum(measured.values()) / len(measured) if measured else None
        row["wer"] = read_score(run / f"decode_{name}" / "wer.txt")
        row["cer"] = read_score(run / f"decode_{name}" / "cer.txt")
        rows[name] = row
    plot_curves(logs, run / "curves.png")
    plot_similarity(logs, sims, {n: v["update0"] for n, v in initial.items()}, run / "similarity.png")
    plot_results(rows, split, run / "results.png")
    return {"split": split, "models": rows, "similarity": sims, "similarity_at_init": initial,
            "teacher_target_accuracy": teacher_target_accuracy(logs[TEACHER])}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: Dict[str, Any]) -> str:
    header = (
        f"| model | encoder before fine-tuning | params (M) | with heads (M) | GMACs / 10 s | output rate "
        f"| CPU time vs teacher (range) | cos sim to teacher (valid) | {report['split']} WER % | {report['split']} CER % |"
    )
    lines = [header, "|" + "---|" * 10]
    for name, row in report["models"].items():
        kind = "pre-trained (teacher)" if name == TEACHER else "distilled" if row["distilled"] else "random init"
        low, high = row["cpu_time_range"]
        lines.append(
            f"| {name} | {kind} | {row['params_m']:.3f} | {row['params_with_heads_m']:.3f} | {row['gmacs_per_10s']:.2f} "
            f"| {row['output_rate_hz']:g} Hz | {row['cpu_time_vs_teacher']:.2f}x ({low:.2f}-{high:.2f}) "
            f"| {_fmt(row['cos_sim_valid'], '.3f')} | {_fmt(row['wer'], '.2f')} | {_fmt(row['cer'], '.2f')} |"
        )
    accuracy = report.get("teacher_target_accuracy", {})
    lines += [
        "",
        f"Teacher k-means target accuracy (valid, last validation; fairseq's hubert criterion): "
        f"masked frames {_fmt(_percent(accuracy.get('masked')), '.1f')} %, "
        f"unmasked frames {_fmt(_percent(accuracy.get('unmasked')), '.1f')} %.",
        "Undistilled rows: the student's architecture fine-tuned from random initialisation with the same "
        "budget; their similarity is the randomly initialised student's (heads included), their size "
        "and CPU time are the distilled twin's.",
    ]
    return "\n".join(lines)


def _percent(value: Optional[float]) -> Optional[float]:
    return None if value is None else 100.0 * value


OUTPUTS = ("results.md", "results.json", "curves.png", "similarity.png", "results.png")
STAMP = "report.stamp"


def input_stamp(run: Path, data: Path, split: str, repeats: int) -> str:
    """A hash of every input of the report (checkpoints by size and mtime; training logs, scores and
    the valid manifest by content) and its arguments: the report is rebuilt only when it changes."""
    import hashlib

    files = [data / "valid.tsv"]
    for name in finetuned_names():
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
    print(f"wrote {run / 'results.md'}, results.json, curves.png, similarity.png, results.png ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
