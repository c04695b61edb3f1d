# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""int8 students for devices: onnxruntime's dynamic quantisation of the exported ONNX student, and
how far its layers move from the fp32 student on real audio.

Dynamic quantisation (``onnxruntime.quantization.quantize_dynamic``): weights are stored as int8
(per output channel), activations are quantised on the fly per tensor, so no calibration data is
needed and the graph keeps the fp32 model's signature (``wavs``, ``lengths`` -> ``hidden_states``,
``frame_lengths``), rate policy and metadata. By default only the MatMuls (the projections, the
attention and FFN layers: where a transformer student's MACs are) are quantised; ``--int8-conv``
also quantises the convolutions (ConvInteger), which onnxruntime's CPU kernels often run slower
than fp32 (measure it: the benchmark's ``int8`` section does).

Fidelity is reported per hidden state as the mean cosine similarity of int8 and fp32 frames over
the valid frames of real utterances (the target is >= 0.99 for every layer).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from fairseq_kd.criterions.kd_losses import cosine_similarity_per_frame
from fairseq_kd.export.onnx_export import _require, run_onnx
from fairseq_kd.s3prl_upstream.runtime import META_NAME

FIDELITY_TARGET = 0.99  # every layer's cosine to fp32


def quantize_int8(fp32_path: str, output: str, conv: bool = False) -> Dict[str, object]:
    """Write the dynamically quantised copy of the ONNX student at ``fp32_path`` to ``output``
    (through a temporary file in the same folder, then an atomic rename). Returns what was done."""
    onnx = _require("onnx")
    _require("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    op_types = ["MatMul", "Conv"] if conv else ["MatMul"]
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fairseq_kd_int8_") as tmp:
        tmp_path = os.path.join(tmp, "model.int8.onnx")
        root = logging.getLogger()  # the quantiser logs an INFO line per tensor on the root logger
        level = root.level
        root.setLevel(max(level, logging.WARNING))
        try:
            quantize_dynamic(
                fp32_path, tmp_path, op_types_to_quantize=op_types, per_channel=True,
                weight_type=QuantType.QInt8,
            )
        finally:
            root.setLevel(level)
        model = onnx.load(tmp_path)
        meta = {entry.key: entry.value for entry in model.metadata_props}
        if META_NAME in meta:  # the student's description, with what was quantised
            described = json.loads(meta[META_NAME])
            described["quantization"] = {"kind": "onnxruntime dynamic", "weights": "int8 per channel",
                                         "activations": "dynamic per tensor", "op_types": op_types}
            for entry in model.metadata_props:
                if entry.key == META_NAME:
                    entry.value = json.dumps(described)
        onnx.save(model, tmp_path)
        os.replace(tmp_path, output)
    return {"op_types": op_types, "bytes_fp32": os.path.getsize(fp32_path), "bytes_int8": os.path.getsize(output)}


def frame_cosines(reference: np.ndarray, other: np.ndarray, frame_lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per hidden state, the sum of frame cosine similarities over valid frames and their count.

    Args:
        reference, other: (L + 1, B, T, D) hidden states; frame_lengths: (B,) valid frames per row
    Returns:
        (L + 1,) sums and (L + 1,) counts
    """
    a = torch.from_numpy(reference).double()
    b = torch.from_numpy(other).double()
    valid = torch.arange(a.size(2)).unsqueeze(0) < torch.from_numpy(frame_lengths).unsqueeze(1)  # (B, T)
    cos = cosine_similarity_per_frame(a, b)  # (L + 1, B, T), the losses' own cosine
    sums = (cos * valid).sum((1, 2)).numpy()
    return sums, np.full(a.size(0), float(valid.sum()))


def layer_fidelity(fp32_session, int8_session, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> List[float]:
    """Mean cosine similarity of every int8 hidden state to the fp32 one over the valid frames."""
    sums, counts = None, None
    for wavs, lengths in batches:
        reference, frame_lengths = run_onnx(fp32_session, wavs, lengths)
        quantized, quantized_lengths = run_onnx(int8_session, wavs, lengths)
        if not np.array_equal(frame_lengths, quantized_lengths):
            raise RuntimeError(f"int8 frame lengths {quantized_lengths.tolist()} != fp32 {frame_lengths.tolist()}")
        s, n = frame_cosines(reference, quantized, frame_lengths)
        sums, counts = (s, n) if sums is None else (sums + s, counts + n)
    return (sums / np.maximum(counts, 1)).tolist()


def manifest_batches(manifest_dir: str, split: str = "valid", count: int = 8, normalize: bool = False,
                     batch_size: int = 4) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded batches of the first ``count`` utterances of a fairseq manifest (real audio)."""
    from fairseq_kd.data.manifest import read_manifest, read_waveform

    root, rows = read_manifest(os.path.join(manifest_dir, f"{split}.tsv"))
    wavs = []
    for row in rows[:count]:
        wavs.append(read_waveform(root, row, normalize))
    batches = []
    for start in range(0, len(wavs), batch_size):
        group = wavs[start:start + batch_size]
        lengths = torch.tensor([len(w) for w in group])
        padded = torch.zeros(len(group), int(lengths.max()))
        for i, w in enumerate(group):
            padded[i, : len(w)] = w
        batches.append((padded, lengths))
    return batches


def fidelity_report(cosines: Sequence[float], target: float = FIDELITY_TARGET) -> str:
    worst = min(range(len(cosines)), key=lambda i: cosines[i])
    met = "met" if cosines[worst] >= target else "NOT met"
    per_layer = ", ".join(f"{i}: {c:.4f}" for i, c in enumerate(cosines))
    return (f"int8 vs fp32 cosine per hidden state (0 = CNN/projection): {per_layer}; worst {worst} "
            f"({cosines[worst]:.4f}), target >= {target} {met}")


__all__ = ["FIDELITY_TARGET", "fidelity_report", "frame_cosines", "layer_fidelity", "manifest_batches", "quantize_int8"]
