# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""ONNX export of the student encoder, its parity with PyTorch, and a CPU latency comparison.

The ONNX graph is translated from the same ``torch.export`` program as the standalone file
(torch's dynamo-based exporter), so it has the same signature, dynamic batch and length, and the
same rate policy: inputs ``wavs`` (B, S) float32 and ``lengths`` (B,) int64, outputs
``hidden_states`` (L + 1, B, T, D), or (N, B, T, teacher D) for a program exported with
``--outputs heads``, and ``frame_lengths`` (B,). The standalone file's JSON description (``outputs``
says which) is stored in the model's ``metadata_props`` under ``fairseq_kd.json``.

Needs the ``export`` extra (``pip install 'fairseq_kd[export]'``: onnx, onnxscript, onnxruntime).
"""

import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from fairseq_kd.s3prl_upstream.runtime import META_NAME

INPUT_NAMES = ["wavs", "lengths"]
OUTPUT_NAMES = ["hidden_states", "frame_lengths"]
ONNX_TOLERANCE = 1e-4  # max abs difference accepted between onnxruntime and PyTorch (fp32)


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(
            f"ONNX export needs {module}: pip install 'fairseq_kd[export]' (onnx, onnxscript, onnxruntime)"
        ) from None


def export_onnx(
    program: Any, meta: Dict[str, Any], output: str, batches: List[Tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """Translate the ``torch.export`` program to ONNX (one self-contained file), check it under
    onnxruntime against the program on ``batches``, and only then move it to ``output``.

    Returns the max abs difference; raises (writing nothing) above ``ONNX_TOLERANCE``.
    """
    onnx = _require("onnx")
    _require("onnxscript")
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fairseq_kd_onnx_") as tmp:
        tmp_path = os.path.join(tmp, "model.onnx")
        onnx_program = torch.onnx.export(
            program,
            f=None,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamo=True,
            external_data=False,  # students are far below protobuf's 2 GB: one file to ship
            verbose=False,
        )
        onnx_program.save(tmp_path, external_data=False)
        model = onnx.load(tmp_path)
        entry = model.metadata_props.add()
        entry.key = META_NAME
        entry.value = json.dumps(meta)
        onnx.checker.check_model(model)
        onnx.save(model, tmp_path)
        diff = onnx_parity(onnx_session(tmp_path), program.module(), batches)
        if not diff <= ONNX_TOLERANCE:
            raise RuntimeError(
                f"onnxruntime differs from the PyTorch program by {diff:.3g} (> {ONNX_TOLERANCE}); "
                f"{output} was not written"
            )
        os.replace(tmp_path, output)
    return diff


def onnx_session(path: str, threads: Optional[int] = None):
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session, wavs: torch.Tensor, lengths: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    hidden_states, frame_lengths = session.run(
        OUTPUT_NAMES, {"wavs": wavs.numpy().astype(np.float32), "lengths": lengths.numpy().astype(np.int64)}
    )
    return hidden_states, frame_lengths


def onnx_parity(session, program: Callable, batches: List[Tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Max abs difference between onnxruntime and the PyTorch program over ``batches``.

    Frame counts must agree exactly; a differing count raises.
    """
    worst = 0.0
    for wavs, lengths in batches:
        with torch.no_grad():
            expected, expected_lengths = program(wavs, lengths)
        got, got_lengths = run_onnx(session, wavs, lengths)
        if got.shape != tuple(expected.shape) or not np.array_equal(got_lengths, expected_lengths.numpy()):
            raise RuntimeError(
                f"onnxruntime returned shape {got.shape} / frame lengths {got_lengths.tolist()}, "
                f"PyTorch {tuple(expected.shape)} / {expected_lengths.tolist()}"
            )
        worst = max(worst, float(np.abs(got - expected.numpy()).max()))
    return worst


def interleaved_medians(calls: Dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> Dict[str, float]:
    """Median seconds of each call, timed in interleaved rounds (one of each per round), so that
    a change in the machine's load during the measurement affects all of them alike."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def latency_comparison(
    model: torch.nn.Module,
    program: Callable,
    session,
    seconds: float = 10.0,
    batch_size: int = 1,
    repeats: int = 10,
    threads: int = 1,
    sample_rate: int = 16000,
) -> Dict[str, Any]:
    """Median CPU latency of the eager student (fairseq modules, ``encode``), the torch.export
    program and onnxruntime on the same batch, measured in this process with the same thread count,
    in interleaved rounds.

    Ratios are against the eager model (the baseline, measured in the same run).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        samples = int(seconds * sample_rate)
        wavs = torch.randn(batch_size, samples, generator=torch.Generator().manual_seed(0))
        lengths = torch.full((batch_size,), samples, dtype=torch.long)
        with torch.no_grad():
            medians = interleaved_medians({
                "eager": lambda: model.encode(wavs),
                "export": lambda: program(wavs, lengths),
                "onnxruntime": lambda: run_onnx(session, wavs, lengths),
            }, repeats)
        eager, exported, onnxrt = medians["eager"], medians["export"], medians["onnxruntime"]
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "audio_seconds": seconds,
        "batch_size": batch_size,
        "threads": threads,
        "repeats": repeats,
        "pytorch_eager_s": eager,
        "torch_export_s": exported,
        "onnxruntime_s": onnxrt,
        "torch_export_vs_eager": exported / eager,
        "onnxruntime_vs_eager": onnxrt / eager,
        "onnxruntime_vs_torch_export": onnxrt / exported,
        "torch_version": torch.__version__,
        "onnxruntime_version": _require("onnxruntime").__version__,
        "cpu_count": os.cpu_count(),
    }
