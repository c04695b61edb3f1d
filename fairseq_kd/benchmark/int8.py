# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The int8 section (opt-in: ``--sections int8``): each student exported to ONNX as
``fairseq-kd-export --onnx`` does, quantised as ``--int8`` does, and timed under onnxruntime (fp32
and int8) beside the fp32 eager teacher and the fp32 eager student, in interleaved rounds; with the
per-layer cosine of int8 to fp32 (on the manifest's audio with ``--manifest``, otherwise on noise)."""

from __future__ import annotations

import os
from typing import Any, Dict

import torch

from fairseq_kd.benchmark.config import INT8_TIME_TARGETS, SAMPLE_RATE, TEACHER_NAME, BenchmarkConfig
from fairseq_kd.benchmark.models import build_student
from fairseq_kd.benchmark.timing import median, paired_ratio, time_interleaved


def int8_section(cfg: BenchmarkConfig, teacher, work_dir: str) -> Dict[str, Any]:
    from fairseq_kd.export.int8 import FIDELITY_TARGET, layer_fidelity, manifest_batches, quantize_int8
    from fairseq_kd.export.onnx_export import export_onnx, onnx_session, run_onnx
    from fairseq_kd.export.standalone import export_program

    threads = cfg.threads or torch.get_num_threads()  # onnxruntime gets what torch has
    source = torch.randn(cfg.batch, int(cfg.seconds * SAMPLE_RATE))
    lengths = torch.full((cfg.batch,), source.size(1), dtype=torch.long)
    if cfg.manifest:
        batches = manifest_batches(cfg.manifest, "valid", count=4)
    else:
        batches = [(torch.randn(2, 24000), torch.tensor([24000, 17000]))]
    teacher_model = teacher.model.eval()
    fns = {TEACHER_NAME: lambda: teacher_model.extract_features(source, padding_mask=None, mask=False)}
    fidelity: Dict[str, Any] = {}
    for preset in cfg.presets:
        student = build_student(preset, cfg.overrides).eval()
        program = export_program(student)
        fp32_path = os.path.join(work_dir, f"{preset}.onnx")
        int8_path = os.path.join(work_dir, f"{preset}.int8.onnx")
        export_onnx(program, {}, fp32_path, batches[:1])
        quantized = quantize_int8(fp32_path, int8_path)
        fp32, int8 = onnx_session(fp32_path, threads=threads), onnx_session(int8_path, threads=threads)
        cosines = layer_fidelity(fp32, int8, batches)
        fidelity[preset] = {"cosines": cosines, "worst": min(cosines), "target": FIDELITY_TARGET,
                            "target_met": min(cosines) >= FIDELITY_TARGET, **quantized}
        fns[f"{preset} eager fp32"] = lambda model=student: model.extract_features(source, padding_mask=None)
        fns[f"{preset} onnxruntime fp32"] = lambda s=fp32: run_onnx(s, source, lengths)
        fns[f"{preset} onnxruntime int8"] = lambda s=int8: run_onnx(s, source, lengths)

    def timed(fn):
        def call():
            with torch.inference_mode():
                return fn()

        return call

    times = time_interleaved({k: timed(f) for k, f in fns.items()}, cfg.repeats, cfg.warmup, torch.device("cpu"))
    rows = {name: {"median_s": median(t), "time_ratio": paired_ratio(t, times[TEACHER_NAME]), "times_s": t}
            for name, t in times.items()}
    for preset in cfg.presets:
        row = rows[f"{preset} onnxruntime int8"]
        target = INT8_TIME_TARGETS.get(preset)
        if target is not None:
            row["target"], row["target_met"] = target, row["time_ratio"] <= target
    return {"batch": cfg.batch, "seconds": cfg.seconds, "threads": threads, "models": rows, "fidelity": fidelity}
