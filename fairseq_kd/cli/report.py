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
  valid split (before distillation, from the first validation, and after).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
    from fairseq_kd.evaluation import load_student
    from fairseq_kd.teacher import FrozenTeacher

    teacher_path = run / TEACHER / "checkpoint_last.pt"
    if not teacher_path.is_file():
        raise ReportError(f"{teacher_path} does not exist: run examples/mini/run.sh first")
    teacher = FrozenTeacher.from_checkpoint(str(teacher_path))
    students = {}
    for name in STUDENTS:
        path = run / name / "checkpoint_last.pt"
        if path.is_file():
            students[name] = load_student(str(path))
    return teacher, students


def size_and_compute(run: Path, name: str) -> Dict[str, float]:
    from fairseq_kd.cli.summary import model_fields
    from fairseq_kd.models.thin_hubert import ThinHubertModel

    summary = ThinHubertModel.model_summary(model_fields(str(run / name / "checkpoint_last.pt"), []))
    return {
        "params_m": summary["params"] / 1e6,
        "params_with_heads_m": summary["params_with_heads"] / 1e6,
        "gmacs_per_10s": summary["macs_per_10s"] / 1e9,
        "output_rate_hz": summary["output_frame_rate"],
    }


def similarity(students, teacher, manifest: Path) -> Dict[str, Dict[str, float]]:
    from fairseq_kd.evaluation import similarity_to_teacher

    return {name: similarity_to_teacher(model, cfg, teacher, str(manifest)) for name, (model, cfg) in students.items()}


def inference_times(teacher, students, manifest: Path, repeats: int) -> Dict[str, float]:
    """Per encoder, the median over rounds of its CPU forward time divided by the teacher's in the
    same round, on one padded batch of ``manifest`` audio (``fairseq_kd.benchmark``'s timer)."""
    import soundfile as sf
    import torch

    from fairseq_kd.benchmark import paired_ratio, time_interleaved
    from fairseq_kd.data.manifest import read_manifest

    root, rows = read_manifest(str(manifest))
    waves = [torch.from_numpy(sf.read(str(root / row.path), dtype="float32")[0]) for row in rows[:8]]
    source = torch.zeros(len(waves), max(len(w) for w in waves))
    padding_mask = torch.ones_like(source, dtype=torch.bool)
    for i, wave in enumerate(waves):
        source[i, : len(wave)] = wave
        padding_mask[i, : len(wave)] = False

    def timed(forward):
        def call():
            with torch.inference_mode():
                return forward()

        return call

    teacher_model = teacher.model
    fns = {TEACHER: timed(lambda: teacher_model.extract_features(source, padding_mask=padding_mask, mask=False))}
    for name, (model, _cfg) in students.items():
        fns[name] = timed(lambda model=model: model.extract_features(source, padding_mask=padding_mask))
    times = time_interleaved(fns, repeats=repeats, warmup=1, device=torch.device("cpu"))
    return {name: paired_ratio(times[name], times[TEACHER]) for name in fns}


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
    uer_ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_similarity(after: Dict[str, Dict[str, float]], before: Dict[str, Dict[str, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, max(len(after), 1), figsize=(6 * max(len(after), 1), 4), squeeze=False)
    for ax, (name, sims) in zip(axes[0], after.items()):
        keys = list(sims)
        x = np.arange(len(keys))
        ax.bar(x - 0.2, [before.get(name, {}).get(k, np.nan) for k in keys], 0.4, label="first validation")
        ax.bar(x + 0.2, [sims[k] for k in keys], 0.4, label="after distillation")
        ax.set_xticks(x)
        ax.set_xticklabels(keys)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: cosine similarity to the teacher (valid)")
        ax.set_xlabel("distilled output (h: hint on student layer, p: prediction of teacher layer)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# -- the report ------------------------------------------------------------------------------------
def first_valid_similarity(log: Dict[str, List[Dict[str, float]]]) -> Dict[str, float]:
    if not log["valid"]:
        return {}
    return {k[len("cos_sim_"):]: v for k, v in log["valid"][0].items() if k.startswith("cos_sim_")}


def build_report(run: Path, data: Path, split: str, repeats: int) -> Dict[str, Any]:
    names = [TEACHER, *[s for s in STUDENTS if (run / s / "checkpoint_last.pt").is_file()]]
    logs = {name: parse_log(run / f"{name}.log") for name in names}
    logs.update({f"ft_{name}": parse_log(run / f"ft_{name}.log") for name in names})

    teacher, students = load_encoders(run)
    sims = similarity(students, teacher, data / "valid.tsv")
    time_ratios = inference_times(teacher, students, data / f"{split}.tsv", repeats)
    rows = {}
    for name in names:
        row = size_and_compute(run, name)
        row["cpu_time_vs_teacher"] = time_ratios[name]
        row["cos_sim_valid"] = sum(sims[name].values()) / len(sims[name]) if name in sims else None
        row["wer"] = read_score(run / f"decode_{name}" / "wer.txt")
        row["cer"] = read_score(run / f"decode_{name}" / "cer.txt")
        rows[name] = row
    plot_curves(logs, run / "curves.png")
    plot_similarity(sims, {name: first_valid_similarity(logs[name]) for name in sims}, run / "similarity.png")
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
        print(f"fairseq-kd-report: {error}", file=sys.stderr)
        return 2
    table = format_table(report)
    (run / "results.md").write_text(table + "\n")
    (run / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    print(f"wrote {run / 'results.md'}, results.json, curves.png, similarity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
