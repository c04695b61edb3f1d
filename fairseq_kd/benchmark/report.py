# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The printed report of a benchmark result."""

from __future__ import annotations

from typing import Any, Mapping

from fairseq_kd.benchmark.config import DISTILHUBERT_BATCH, DISTILHUBERT_UPDATES, TEACHER_NAME


def _met(row: Mapping[str, Any]) -> str:
    if "target" not in row:
        return ""
    return f"{'met' if row['target_met'] else 'NOT met'} (target <= {row['target']:g})"


def format_report(result: Mapping[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"fairseq-kd-benchmark  {m['date_utc']}  {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else f" ({m['cpu_model']}, {m['nproc']} CPUs, {m['torch_threads']} threads)"),
        f"torch {m['torch']}, fairseq {m['fairseq']}; load average per section: "
        + ", ".join(f"{k} {v[0] if v else '?'}" for k, v in result.get("load", {}).items()),
    ]
    if "inference" in result:
        inf = result["inference"]
        lines += ["", f"inference: forward of {inf['batch']} x {inf['seconds']:g} s, eval + inference_mode "
                      f"(median of {len(inf['models'][TEACHER_NAME]['times_s'])})",
                  f"  {'model':<22}{'params':>9}{'GMACs':>9}{'MACs ratio':>12}{'time':>10}{'time ratio':>12}"]
        for name, row in inf["models"].items():
            lines.append(f"  {name:<22}{row['params'] / 1e6:8.2f}M{row['gmacs']:9.1f}{row['macs_ratio']:12.3f}"
                         f"{row['median_s']:9.3f}s{row['time_ratio']:12.3f}  {_met(row)}")
    if "int8" in result:
        q = result["int8"]
        lines += ["", f"int8: onnxruntime dynamic int8 vs fp32, {q['batch']} x {q['seconds']:g} s, {q['threads']} "
                      f"thread(s); time ratio to the fp32 eager teacher",
                  f"  {'model':<34}{'time':>10}{'time ratio':>12}"]
        for name, row in q["models"].items():
            lines.append(f"  {name:<34}{row['median_s']:9.3f}s{row['time_ratio']:12.3f}  {_met(row)}")
        for name, row in q["fidelity"].items():
            lines.append(f"  {name}: int8 vs fp32 cosine, worst layer {row['worst']:.4f} "
                         f"({'met' if row['target_met'] else 'NOT met'}, target >= {row['target']})")
    if "training" in result:
        tr = result["training"]
        lines += ["", f"training: one distill_hubert update (fairseq Trainer.train_step) of {tr['batch']} x "
                      f"{tr['seconds']:g} s vs its parts alone",
                  f"  {'preset':<22}{'update':>9}{'teacher':>9}{'student f+b':>13}{'optim':>8}{'overhead':>10}"]
        for name, row in tr["presets"].items():
            p = row["parts_s"]
            lines.append(f"  {name:<22}{row['update_s']:8.3f}s{p['teacher_forward']:8.3f}s"
                         f"{p['student_forward_backward']:12.3f}s{p['optimizer_step']:7.3f}s"
                         f"{100 * row['overhead']:9.1f}%  {_met(row)}")
    if "memory" in result:
        mem = result["memory"]
        t = mem["rows"]["teacher_forward"]
        lines += ["", f"memory: peak over the bare process ({mem['method']}), {mem['batch']} x {mem['seconds']:g} s",
                  f"  {'teacher forward':<22}{t['peak_over_base_mb']:9.0f} MB  (step itself {t['step_peak_mb']:.0f} MB)"]
        for name, row in mem["rows"].items():
            if name != "teacher_forward":
                lines.append(f"  {name + ' update':<22}{row['peak_over_base_mb']:9.0f} MB  "
                             f"(step itself {row['step_peak_mb']:.0f} MB)  "
                             f"{row['ratio_to_teacher_forward']:.2f}x the teacher forward")
    if "scaling" in result:
        sc = result["scaling"]
        names = list(next(iter(sc["lengths"].values())))
        lines += ["", f"scaling: ms of forward per audio-second (batch {sc['batch']}); time ratio to the teacher",
                  "  " + f"{'length':<8}" + "".join(f"{n:>26}" for n in names)]
        for seconds, row in sc["lengths"].items():
            lines.append("  " + f"{float(seconds):<6g}s " + "".join(
                f"{row[n]['ms_per_audio_s']:16.1f} ({row[n]['time_ratio']:.3f})" + " " * 1 for n in names))
    if "loader" in result:
        ld = result["loader"]
        lines += ["", f"data loading: audio-seconds per second from {ld['manifest']} ({ld['split']}), "
                      "by DataLoader workers"]
        for name, row in ld["presets"].items():
            lines.append(f"  {name:<22}" + "  ".join(f"{w} workers {r['audio_s_per_s']:8.0f}" for w, r in row.items()))
    if "throughput" in result:
        lines += ["", "distillation throughput (audio-seconds per second) and DistilHuBERT's schedule "
                      f"({DISTILHUBERT_UPDATES // 1000}k updates x {DISTILHUBERT_BATCH} utterances) at that rate"]
        for name, row in result["throughput"].items():
            lines.append(f"  {name:<22}{row['audio_s_per_s']:9.2f} audio-s/s  -> {row['schedule_days_15_6s']:8.1f} days "
                         f"with 15.6 s crops, {row['schedule_days_12_3s']:8.1f} days at LibriSpeech's 12.3 s mean")
            lines.append(f"  {'':<22}teacher forward alone: {row['teacher_forward_audio_s_per_s']:.2f} audio-s/s (the ceiling)")
            if "loader_headroom" in row:
                lines.append(f"  {'':<22}data loading / distillation rate: " + ", ".join(
                    f"{h:.1f}x with {w} workers" for w, h in row["loader_headroom"].items()))
    return "\n".join(lines)
