# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Run a standalone student file (written by ``fairseq-kd-export``) with torch alone.

This module, ``expert.py`` and ``hubconf.py`` import nothing but torch and the standard library
(no fairseq, hydra, omegaconf or fairseq_kd), so this directory can be copied into s3prl, or next
to any application, and used where fairseq cannot be installed.

The file is a ``torch.export`` program saved by ``torch.export.save`` with a JSON description
(``fairseq_kd.json``) among its extra files. The program maps

    wavs (B, S) float32, lengths (B,) int64 valid samples per row
    -> hidden_states (L + 1, B, T, D), frame_lengths (B,) int64

with ``hidden_states[0]`` the post-projection CNN feature and ``hidden_states[l]`` the output of
transformer layer ``l`` (``meta["outputs"] == "layers"``), or the N distillation heads' outputs in
teacher-layer order, ``meta["head_teacher_layers"][i]`` the teacher layer(s) output ``i`` learnt
(``"heads"``: ARMHuBERT's SUPERB input), all at the rate ``meta["downsample_rate"]`` says (see
``fairseq_kd.export.standalone`` for the rate policy of time-reduced students) and zero beyond each
row's ``frame_lengths``. Bare use::

    extra = {"fairseq_kd.json": ""}
    program = torch.export.load("student.pt2", extra_files=extra).module()
    meta = json.loads(extra["fairseq_kd.json"])
    hidden_states, frame_lengths = program(wavs, lengths)  # normalise first if meta["normalize"]

:class:`StandaloneStudent` adds what a caller otherwise has to remember: the waveform
normalisation the student was trained with, padding of very short inputs, batching of a list of
utterances, input checks and moving the program to the device of the input.
"""

import json
import os
import zipfile
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

FORMAT = "fairseq_kd.standalone_student"
# "outputs" (layers / heads) was added within version 1: a reader that ignores it still serves a
# heads file correctly (num_hidden_states, hidden_size and downsample_rate describe what it holds)
FORMAT_VERSION = 1
META_NAME = "fairseq_kd.json"  # extra file inside the torch.export archive
MIN_SECONDS = 0.05  # s3prl's S3PRLUpstream zero-pads shorter inputs to this (MIN_SECOND)
REQUIRED_KEYS = (
    "format", "format_version", "sample_rate", "normalize", "downsample_rate", "num_hidden_states",
    "hidden_size", "min_samples",
)


class StandaloneFileError(ValueError):
    """A file that is not a readable standalone student, with what to pass instead."""


def _export_hint() -> str:
    return (
        "write one from a distillation or fine-tuned checkpoint with "
        "`fairseq-kd-export checkpoint_best.pt student.pt2` (in the environment where fairseq_kd "
        "is installed)"
    )


def read_metadata(path: str) -> Dict[str, Any]:
    """The JSON description stored in a standalone student file, checked, without loading the program."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise StandaloneFileError(f"{path} does not exist: {_export_hint()}")
    if not os.path.isfile(path):
        raise StandaloneFileError(f"{path} is not a file: give the .pt2 file written by fairseq-kd-export")
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/extra/" + META_NAME)]
            if not names:
                raise StandaloneFileError(
                    f"{path} is a zip archive but has no {META_NAME}: it is not a student exported by "
                    f"fairseq-kd-export (a fairseq training checkpoint? a plain torch.export file?); "
                    + _export_hint()
                )
            meta = json.loads(archive.read(names[0]).decode("utf-8"))
    except zipfile.BadZipFile:
        raise StandaloneFileError(
            f"{path} is not a standalone student file (not a torch.export archive, or truncated): "
            + _export_hint()
        ) from None
    return check_metadata(meta, path)


def check_metadata(meta: Dict[str, Any], path: str) -> Dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StandaloneFileError(f"{path}: {META_NAME} does not describe a {FORMAT} file; " + _export_hint())
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise StandaloneFileError(
            f"{path} has format_version {meta['format_version']}, newer than this reader "
            f"({FORMAT_VERSION}): update fairseq_kd's s3prl_upstream files"
        )
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise StandaloneFileError(f"{path}: {META_NAME} lacks {missing}; " + _export_hint())
    return meta


def output_kind(meta: Dict[str, Any]) -> str:
    """``"layers"`` or ``"heads"``: what ``hidden_states`` holds (files written before the option: layers)."""
    return "heads" if meta.get("outputs") == "heads" else "layers"


def load_program(path: str) -> Tuple[Any, Dict[str, Any]]:
    """The ``torch.export.ExportedProgram`` and its checked metadata."""
    meta = read_metadata(path)
    extra = {META_NAME: ""}
    try:
        program = torch.export.load(os.fspath(path), extra_files=extra)
    except Exception as error:  # torch raises many types for a damaged archive
        raise StandaloneFileError(
            f"{path} could not be loaded by torch.export.load ({type(error).__name__}: "
            f"{str(error)[:300]}); it is damaged or was written by an incompatible torch "
            f"(written with torch {meta.get('torch_version', '?')}, this is {torch.__version__}): "
            + _export_hint()
        ) from None
    return program, meta


class StandaloneStudent(torch.nn.Module):
    """A standalone student file as a module: ``forward(wavs) -> (hidden_states, frame_lengths)``.

    ``wavs`` is a list of 1-D float tensors of raw (un-normalised) audio at ``sample_rate``;
    ``hidden_states`` is a list of ``num_hidden_states`` tensors (B, T, D), one frame per
    ``downsample_rate`` samples, zero beyond ``frame_lengths`` (B,): the student's layers or its
    heads' outputs, whichever the file holds (``outputs``). Deterministic: the program
    was exported in eval mode (no dropout, no layer drop).

    The program's weights are not registered as parameters: the student is frozen, as in SUPERB's
    protocol, and the program is moved to the device of the input on first use.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        program, meta = load_program(path)
        self.path = os.fspath(path)
        self.meta = meta
        self.sample_rate = int(meta["sample_rate"])
        self.normalize = bool(meta["normalize"])
        self.downsample_rate = int(meta["downsample_rate"])
        self.outputs = output_kind(meta)
        self.num_hidden_states = int(meta["num_hidden_states"])
        self.hidden_size = int(meta["hidden_size"])
        # pad shorter inputs to 0.05 s (as S3PRLUpstream does), never below one CNN frame
        self.min_samples = max(int(meta["min_samples"]), int(round(MIN_SECONDS * self.sample_rate)))
        self._programs = {torch.device(meta.get("device", "cpu")): program}
        self._modules_by_device: Dict[torch.device, torch.nn.Module] = {}

    def program_on(self, device: torch.device) -> torch.nn.Module:
        """The callable program on ``device`` (torch.export bakes the export device into the graph)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._modules_by_device:
            program = self._programs.get(device)
            if program is None:
                from torch.export.passes import move_to_device_pass

                source = next(iter(self._programs.values()))
                program = move_to_device_pass(source, device)
                self._programs[device] = program
            self._modules_by_device[device] = program.module()
        return self._modules_by_device[device]

    def prepare(self, wavs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalise (if the student was trained so), pad to ``min_samples`` and batch."""
        if len(wavs) == 0:
            raise ValueError("wavs is empty: give a list of 1-D waveform tensors")
        prepared = []
        for i, wav in enumerate(wavs):
            if not torch.is_tensor(wav) or wav.dim() != 1:
                shape = tuple(wav.shape) if torch.is_tensor(wav) else type(wav).__name__
                raise ValueError(f"wavs[{i}] must be a 1-D waveform tensor (samples,), got {shape}")
            if wav.numel() == 0:
                raise ValueError(f"wavs[{i}] is empty")
            wav = wav.float()
            if self.normalize:  # per utterance, on its own samples only (fairseq's normalize=True)
                wav = F.layer_norm(wav, wav.shape)
            if wav.numel() < self.min_samples:
                wav = F.pad(wav, (0, self.min_samples - wav.numel()))
            prepared.append(wav)
        lengths = torch.tensor([w.numel() for w in prepared], dtype=torch.long, device=prepared[0].device)
        batch = torch.nn.utils.rnn.pad_sequence(prepared, batch_first=True)
        return batch, lengths

    def forward(self, wavs: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor]:
        batch, lengths = self.prepare(wavs)
        hidden_states, frame_lengths = self.program_on(batch.device)(batch, lengths)
        return list(hidden_states.unbind(0)), frame_lengths

    def extra_repr(self) -> str:
        return (
            f"path={self.path!r}, outputs={self.outputs}, count={self.num_hidden_states}, dim={self.hidden_size}, "
            f"downsample_rate={self.downsample_rate}, normalize={self.normalize}"
        )
