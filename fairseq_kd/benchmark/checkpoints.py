# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The inference comparison for trained checkpoints (what ``fairseq-kd-report`` measures)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple

import torch

from fairseq_kd.benchmark.config import SAMPLE_RATE, BenchmarkError
from fairseq_kd.benchmark.timing import median, paired_ratio, paired_ratio_range, time_interleaved
from fairseq_kd.encoders.pretrained import CTC_MODELS, FAIRSEQ_ENCODERS, STUDENT_MODELS

ACCEPTED = STUDENT_MODELS + FAIRSEQ_ENCODERS  # also inside a CTC model fine-tuned from one
CHECKPOINT_FIX = (
    "give a pre-trained HuBERT / wav2vec 2.0 checkpoint, a distilled thin_hubert student, or a CTC "
    f"model fine-tuned from one ({', '.join(CTC_MODELS)})"
)


def load_for_inference(path: str, device: Any = "cpu") -> Tuple[torch.nn.Module, Callable[[torch.Tensor], Any]]:
    """A checkpoint's encoder in eval mode and its inference forward on a (B, S) waveform.

    Works for pre-trained teachers (``hubert``, ``wav2vec2``), distilled students (``thin_hubert``)
    and the encoder of their CTC fine-tuned models (``hubert_ctc``, ``wav2vec_ctc``), read, checked
    and rebuilt by ``fairseq_kd.encoders.pretrained.open_encoder`` (pre-training heads removed).
    """
    from fairseq_kd.encoders.pretrained import open_encoder

    model, _found = open_encoder(path, f"checkpoint {path}", CHECKPOINT_FIX, BenchmarkError, accept=ACCEPTED)
    model = model.to(device).eval()

    def forward(source):
        return model.extract_features(source, padding_mask=None, mask=False)

    return model, forward


def inference_time_ratios(
    teacher: str,
    students: Sequence[str],
    seconds: float = 10.0,
    batch: int = 1,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
) -> Dict[str, Dict[str, float]]:
    """Forward time of each student checkpoint relative to the teacher checkpoint, timed side by side.

    Returns ``{path: {"time_ratio": median of per-round ratios, "time_ratio_range": (lowest, highest
    per-round ratio), "median_s": ...}}`` for the
    teacher (ratio 1.0) and every student, on ``batch`` random utterances of ``seconds``.
    """
    dev = torch.device(device)
    loaded = {path: load_for_inference(path, dev) for path in [teacher, *students]}
    source = torch.randn(batch, int(seconds * SAMPLE_RATE), device=dev)

    def call(forward):
        def run():
            with torch.inference_mode():
                return forward(source)

        return run

    times = time_interleaved({p: call(f) for p, (_, f) in loaded.items()}, repeats, warmup, dev)
    return {
        p: {"time_ratio": paired_ratio(t, times[teacher]), "time_ratio_range": paired_ratio_range(t, times[teacher]),
            "median_s": median(t)}
        for p, t in times.items()
    }
