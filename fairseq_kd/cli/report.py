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
def plot_curves(logs: Dict[str, Dict[str, List[Dict[str, float]]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [
        (axes[0], [TEACHER], "teacher pre-training (hubert_pretraining)", "loss"),
        (axes[1], list(STUDENTS), "distillation (distill_hubert)", "loss"),
        (axes[2], [f"ft_{m}" for m in (TEACHER, *STUDENTS)], "CTC fine-tuning", "loss"),
    ]
    for ax, names, title, key in panels:
        for name in names:
            train = [r for r in logs.get(name, {}).get("train", []) if key in r and "num_updates" in r]
            if train:
                ax.plot([r["num_updates"] for r in train], [r[key] for r in train], label=f"{name} train")
            valid = [r for r in logs.get(name, {}).get("valid", []) if key in r and "num_updates" in r]
            if valid:
                ax.plot([r["num_updates"] for r in valid], [r[key] for r in valid], "o--", label=f"{name} valid")
        ax.set_title(title)
        ax.set_xlabel("updates")
        ax.set_ylabel(key)
        ax.legend(fontsize=7)
    uer_ax = axes[2].twinx()
    for name in (TEACHER, *STUDENTS):
        valid = [r for r in logs.get(f"ft_{name}", {}).get("valid", []) if "uer" in r]
        if valid:
            uer_ax.plot([r["num_updates"] for r in valid], [r["uer"] for r in valid], "s:", label=f"ft_{name} valid UER %")
    uer_ax.set_ylabel("valid UER (%)")
    if uer_ax.lines:
        uer_ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_similarity(logs: Dict[str, Dict[str, List[Dict[str, float]]]], final: Dict[str, Dict[str, float]], out: Path) -> None:
    """Per student, the valid-set cosine similarity of every distilled output to its teacher layer
    at each validation of the distillation run, and (markers) the report's own measurement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(final)
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(6 * max(len(names), 1), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        valid = [r for r in logs.get(name, {}).get("valid", []) if "num_updates" in r]
        last_update = valid[-1]["num_updates"] if valid else 0
        for index, (output, value) in enumerate(final[name].items()):
            color = f"C{index % 10}"
            points = [(r["num_updates"], r[f"cos_sim_{output}"]) for r in valid if f"cos_sim_{output}" in r]
            if points:
                ax.plot(*zip(*points), "-", color=color, label=output)
            ax.plot([last_update], [value], "x", color=color)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: cosine similarity to the teacher (valid)")
        ax.set_xlabel("distillation updates (x: held-out measurement of the final student)")
        ax.set_ylabel("cosine similarity")
        ax.legend(fontsize=7, title="h: hint on layer, p: prediction of teacher layer", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


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


@clean_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fairseq-kd-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the OUT folder of examples/mini/run.sh (default runs/mini)")
    parser.add_argument("--data", default=None, help="manifest folder the run used (default: the bundled corpus)")
    parser.add_argument("--split", default="test", help="the decoded split (decode_*/wer.txt)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per model (median)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run = Path(args.run_dir)
    data = Path(args.data) if args.data else Path(__file__).resolve().parents[2] / "manifests"
    try:
        if not (data / "valid.tsv").is_file():
            raise ReportError(f"{data / 'valid.tsv'} does not exist: pass --data, the manifest folder of the run")
        report = build_report(run, data, args.split, args.repeats)
    except ReportError as error:
        return report_error(error, "fairseq-kd-report")
    table = format_table(report)
    (run / "results.md").write_text(table + "\n")
    (run / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    print(f"wrote {run / 'results.md'}, results.json, curves.png, similarity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
