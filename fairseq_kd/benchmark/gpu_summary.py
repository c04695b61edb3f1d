# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The table of ``examples/gpu/bench.sh``: one row per preset from its ``fairseq-kd-benchmark
--out`` JSON (training and memory sections at that preset's batch shape), written as ``gpu.json``
and ``gpu.md`` into the output folder and printed.

    python -m fairseq_kd.benchmark.gpu_summary OUT bench_distilhubert.json bench_thin_deep.json
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Mapping, Optional

from fairseq_kd.benchmark.config import DISTILHUBERT_BATCH, DISTILHUBERT_CROP_SECONDS, DISTILHUBERT_UPDATES

# issue 17's goal on one H200-class GPU: DistilHuBERT's schedule in under 2 hours
GOAL_AUDIO_S_PER_S = 8_000.0


def summary_row(result: Mapping[str, Any]) -> Dict[str, Any]:
    """The figures of one preset's benchmark result."""
    preset = result["config"]["presets"][0]
    training = result["training"]
    row = training["presets"][preset]
    rate = row["audio_s_per_s"]
    memory = result.get("memory", {}).get("rows", {}).get(preset, {})
    schedule_audio = DISTILHUBERT_UPDATES * DISTILHUBERT_BATCH * DISTILHUBERT_CROP_SECONDS
    return {
        "preset": preset,
        "batch": training["batch"],
        "seconds": training["seconds"],
        "update_s": row["update_s"],
        "distill_audio_s_per_s": rate,
        "teacher_forward_audio_s_per_s": result["throughput"][preset]["teacher_forward_audio_s_per_s"],
        "update_peak_mb": memory.get("step_peak_mb"),
        "update_peak_over_base_mb": memory.get("peak_over_base_mb"),
        "distilhubert_schedule_hours": schedule_audio / rate / 3600,
        "goal_audio_s_per_s": GOAL_AUDIO_S_PER_S if preset == "distilhubert" else None,
    }


def _mb(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_table(machine: Mapping[str, Any], rows: List[Mapping[str, Any]]) -> str:
    device = machine.get("gpu") or machine.get("cpu_model", machine.get("device", "?"))
    lines = [
        f"Distillation through fairseq's Trainer on {device} (torch {machine.get('torch')}, "
        f"{machine.get('date_utc')}); DistilHuBERT's schedule: {DISTILHUBERT_UPDATES // 1000}k updates x "
        f"{DISTILHUBERT_BATCH} x {DISTILHUBERT_CROP_SECONDS:.1f} s",
        "",
        "| preset | batch | update (s) | distillation (audio-s/s) | teacher forward alone (audio-s/s) "
        "| peak memory of an update (MB) | DistilHuBERT schedule at this rate (h) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        goal = ""
        if r["goal_audio_s_per_s"]:
            goal = f" ({'meets' if r['distill_audio_s_per_s'] >= r['goal_audio_s_per_s'] else 'below'} the " \
                   f"{r['goal_audio_s_per_s']:,.0f} goal)"
        lines.append(
            f"| {r['preset']} | {r['batch']} x {r['seconds']:g} s | {r['update_s']:.3f} | "
            f"{r['distill_audio_s_per_s']:,.1f}{goal} | {r['teacher_forward_audio_s_per_s']:,.1f} | "
            f"{_mb(r['update_peak_mb'])} | {r['distilhubert_schedule_hours']:,.1f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -m fairseq_kd.benchmark.gpu_summary OUT_DIR RESULT.json [RESULT.json ...]", file=sys.stderr)
        return 2
    out, paths = args[0], args[1:]
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    rows = [summary_row(r) for r in results]
    table = format_table(results[0]["machine"], rows)
    with open(os.path.join(out, "gpu.json"), "w") as f:
        json.dump({"machine": results[0]["machine"], "rows": rows, "results": results}, f, indent=1)
    with open(os.path.join(out, "gpu.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"\nwrote {os.path.join(out, 'gpu.json')} and {os.path.join(out, 'gpu.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
