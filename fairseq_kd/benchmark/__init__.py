# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Students beside a HuBERT Base teacher, measured side by side in one run.

Everything is a ratio against a baseline timed in the same process, interleaved with it
(teacher, student A, student B, then the reverse order, ...), so that the load of a shared
machine and clock drift cancel out; medians of the per-round ratios are reported.

* **inference**: the student's forward (heads removed) against the teacher's, on a batch of
  utterances, in eval mode under ``torch.inference_mode``; the analytic MACs ratio beside it.
* **training**: one ``distill_hubert`` update through fairseq's own ``Trainer.train_step`` with
  the preset's task, criterion, model and optimizer, against the three parts timed alone
  (teacher forward, student forward + backward, optimizer step): the overhead in %.
* **memory**: the peak memory of such an update against the teacher's forward alone, each in a
  fresh child process (peak RSS on CPU, ``max_memory_allocated`` on a GPU).
* **scaling**: time per audio-second at several utterance lengths, teacher and students.
* **throughput**: audio-seconds distilled per second, and what it means for DistilHuBERT's
  schedule (200k updates of 24 utterances, docs/papers.md#distilhubert-training).

The models are random-weight: speed does not depend on the weights. The teacher is fairseq's own
``HubertModel`` built from ``HubertConfig``'s defaults, which are HuBERT Base; the students are
built from the presets in ``fairseq_kd/config``.

:func:`inference_time_ratios` does the inference comparison for trained checkpoints.

One module per part: ``config`` (settings, constants, error), ``machine``, ``timing``, ``models``
(teacher and students), ``inference`` (+ scaling), ``training``, ``loader``, ``memory``, ``checks``,
``runner`` (:func:`run_benchmark`), ``report`` (:func:`format_report`) and ``checkpoints``.
"""

from fairseq_kd.benchmark.checkpoints import inference_time_ratios, load_for_inference
from fairseq_kd.benchmark.checks import check_config, check_distillation, check_student
from fairseq_kd.benchmark.config import (
    AMP_DTYPES,
    CPU_TIME_TARGETS,
    OVERHEAD_TARGET,
    SAMPLE_RATE,
    DEFAULT_SECTIONS,
    SECTIONS,
    TEACHER_NAME,
    BenchmarkConfig,
    BenchmarkError,
    split_overrides,
    training_overrides,
)
from fairseq_kd.benchmark.inference import inference_section, scaling_section
from fairseq_kd.benchmark.loader import loader_section
from fairseq_kd.benchmark.machine import machine_info, quiet
from fairseq_kd.benchmark.memory import memory_section
from fairseq_kd.benchmark.models import build_student, build_teacher, student_fields, teacher_config
from fairseq_kd.benchmark.report import format_report
from fairseq_kd.benchmark.runner import run_benchmark
from fairseq_kd.benchmark.timing import paired_ratio, time_interleaved
from fairseq_kd.benchmark.training import Distillation, build_distillation, distilhubert_schedule, training_section

__all__ = [
    "AMP_DTYPES",
    "CPU_TIME_TARGETS",
    "OVERHEAD_TARGET",
    "SAMPLE_RATE",
    "DEFAULT_SECTIONS",
    "SECTIONS",
    "TEACHER_NAME",
    "BenchmarkConfig",
    "BenchmarkError",
    "Distillation",
    "build_distillation",
    "build_student",
    "build_teacher",
    "check_config",
    "check_distillation",
    "check_student",
    "distilhubert_schedule",
    "format_report",
    "inference_section",
    "inference_time_ratios",
    "load_for_inference",
    "loader_section",
    "machine_info",
    "memory_section",
    "paired_ratio",
    "quiet",
    "run_benchmark",
    "scaling_section",
    "split_overrides",
    "student_fields",
    "teacher_config",
    "time_interleaved",
    "training_overrides",
    "training_section",
]
