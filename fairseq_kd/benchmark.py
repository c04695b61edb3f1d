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
  schedule (200k updates of 24 utterances, REFERENCE.md section 1).

The models are random-weight: speed does not depend on the weights. The teacher is fairseq's own
``HubertModel`` built from ``HubertConfig``'s defaults, which are HuBERT Base; the students are
built from the presets in ``fairseq_kd/config``.

:func:`inference_time_ratios` does the inference comparison for trained checkpoints.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
SECTIONS = ("inference", "training", "memory", "scaling", "loader")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# issue 5's CPU targets: student forward time / teacher forward time, and update overhead
CPU_TIME_TARGETS = {"thin_deep": 0.25, "distilhubert": 0.5}
OVERHEAD_TARGET = 0.10
# DistilHuBERT's schedule (REFERENCE.md section 1): 200k updates of 24 utterances cropped to
# 250k samples; LibriSpeech 960 h has 281,241 training utterances (12.3 s on average)
DISTILHUBERT_UPDATES = 200_000
DISTILHUBERT_BATCH = 24
DISTILHUBERT_CROP_SECONDS = 250_000 / SAMPLE_RATE
LIBRISPEECH_MEAN_SECONDS = 960.9 * 3600 / 281_241
TEACHER_NAME = "hubert_base"


class BenchmarkError(ValueError):
    """A benchmark setting that cannot be run; the message says how to fix it."""


@dataclass
class BenchmarkConfig:
    presets: List[str] = field(default_factory=lambda: ["thin_deep", "distilhubert"])
    device: str = "cpu"
    amp: str = "none"  # autocast dtype of the inference forwards on a GPU: none, bf16, fp16
    batch: int = 2
    seconds: float = 10.0
    lengths: List[float] = field(default_factory=lambda: [2.0, 5.0, 10.0, 15.0])
    scaling_batch: int = 1
    repeats: int = 5
    warmup: int = 1
    sections: List[str] = field(default_factory=lambda: list(SECTIONS))
    # loader section: fairseq's batch iterator over a manifest folder, with these DataLoader workers
    manifest: Optional[str] = None
    split: str = "train"
    loader_workers: List[int] = field(default_factory=lambda: [0, 2])
    # HubertConfig fields of the teacher (KEY=VALUE) and preset overrides ([PRESET:]group.KEY=VALUE)
    teacher_overrides: List[str] = field(default_factory=list)
    overrides: List[str] = field(default_factory=list)
    threads: Optional[int] = None
    seed: int = 1


# -- models ------------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    """yaml typing, as on hydra's command line; what yaml cannot read stays a string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def teacher_config(overrides: Sequence[str] = ()):
    """fairseq's ``HubertConfig`` defaults (HuBERT Base), frozen as :class:`FrozenTeacher` builds a
    teacher (no dropout, layerdrop or length padding), with ``KEY=VALUE`` overrides."""
    from fairseq.models.hubert.hubert import HubertConfig

    from fairseq_kd.teacher import _FROZEN_MODEL_FIELDS

    cfg = HubertConfig(label_rate=50.0)
    fields = {k: v for k, v in _FROZEN_MODEL_FIELDS.items() if hasattr(cfg, k)}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not hasattr(cfg, key):
            raise BenchmarkError(
                f"teacher override {item!r}: expected KEY=VALUE with KEY a HubertConfig field "
                "(e.g. encoder_layers=4)"
            )
        fields[key] = _parse_value(value)
    for key, value in fields.items():
        setattr(cfg, key, value)
    return cfg


def build_teacher(overrides: Sequence[str] = (), device: Any = "cpu"):
    """A random-weight HuBERT Base (fairseq's ``HubertModel``) as a :class:`FrozenTeacher`."""
    from fairseq.models.hubert.hubert import HubertModel
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
    from omegaconf import OmegaConf

    from fairseq_kd.teacher import FrozenTeacher

    model_cfg = teacher_config(overrides)
    task_cfg = HubertPretrainingConfig(data="unused", labels=["km"], label_rate=50.0)
    model = HubertModel(model_cfg, task_cfg, [None])  # no label dictionary: no label embeddings
    model.remove_pretraining_modules()
    cfg = OmegaConf.create(
        {"model": {**OmegaConf.to_container(OmegaConf.structured(model_cfg)), "_name": "hubert"},
         "task": {"_name": "hubert_pretraining", "sample_rate": SAMPLE_RATE, "normalize": False}}
    )
    teacher = FrozenTeacher(model, kind="hubert", normalize=False, path=f"<random {TEACHER_NAME}>", cfg=cfg)
    return teacher.to(device)


def split_overrides(overrides: Sequence[str], preset: str) -> List[str]:
    """The ``group.KEY=VALUE`` overrides that apply to ``preset`` (``PRESET:`` prefix or none)."""
    selected = []
    for item in overrides:
        name, sep, rest = item.partition(":")
        if sep and "=" not in name:
            if name == preset:
                selected.append(rest)
        else:
            selected.append(item)
    return selected


def student_fields(preset: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """thin_hubert fields of a preset (name or yaml) with ``model.KEY=VALUE`` overrides."""
    from fairseq_kd.cli.summary import SummaryError, model_fields

    model_overrides = [o for o in split_overrides(overrides, preset) if o.startswith("model.")]
    try:
        return model_fields(preset, model_overrides)
    except SummaryError as error:
        raise BenchmarkError(str(error)) from None


def build_student(preset: str, overrides: Sequence[str] = (), heads: bool = False, device: Any = "cpu"):
    from fairseq_kd.models.thin_hubert import ThinHubertModel, as_thin_hubert_config

    model = ThinHubertModel(as_thin_hubert_config(student_fields(preset, overrides)))
    if not heads:
        model.remove_pretraining_modules()
    return model.to(device)


def teacher_macs(model_cfg, seconds: float) -> float:
    from omegaconf import OmegaConf

    from fairseq_kd.cli.summary import thin_fields_from_fairseq
    from fairseq_kd.models.thin_hubert import ThinHubertModel

    fields = thin_fields_from_fairseq(OmegaConf.to_container(OmegaConf.structured(model_cfg)))
    return sum(ThinHubertModel.macs_breakdown(fields, seconds).values())


def student_macs(fields: Mapping[str, Any], seconds: float) -> float:
    from fairseq_kd.models.thin_hubert import ThinHubertModel

    return sum(ThinHubertModel.macs_breakdown(dict(fields), seconds).values())


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- timing ------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work; only the timer calls it, never the timed code."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device
) -> Dict[str, List[float]]:
    """Seconds per call of every function, ``repeats`` rounds after ``warmup`` untimed rounds.

    Each round calls every function once, in forward then reverse order on alternate rounds,
    so a slow drift of the machine's speed weighs on all of them alike.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of the per-round ratios (each pair was timed in the same round)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _inference_fns(
    teacher_model, students: Mapping[str, torch.nn.Module], source: torch.Tensor, device, amp: str
) -> Dict[str, Callable[[], Any]]:
    def run(forward):
        def call():
            with torch.inference_mode(), _autocast(device, amp):
                return forward()

        return call

    fns = {TEACHER_NAME: run(lambda: teacher_model.extract_features(source, padding_mask=None, mask=False))}
    for name, model in students.items():
        fns[name] = run(lambda model=model: model.extract_features(source, padding_mask=None, mask=False))
    return fns


def _loadavg() -> Optional[List[float]]:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


# -- sections ----------------------------------------------------------------------------------------
def inference_section(cfg: BenchmarkConfig, teacher, students, fields, device) -> Dict[str, Any]:
    source = torch.randn(cfg.batch, int(cfg.seconds * SAMPLE_RATE), device=device)
    teacher_model = teacher.model.eval()
    for model in students.values():
        model.eval()
    times = time_interleaved(_inference_fns(teacher_model, students, source, device, cfg.amp),
                             cfg.repeats, cfg.warmup, device)
    t_macs = teacher_macs(teacher_config(cfg.teacher_overrides), cfg.seconds)
    audio = cfg.batch * cfg.seconds
    rows = {TEACHER_NAME: {
        "median_s": median(times[TEACHER_NAME]), "ms_per_audio_s": 1e3 * median(times[TEACHER_NAME]) / audio,
        "time_ratio": 1.0, "macs_ratio": 1.0, "gmacs": t_macs * cfg.batch / 1e9,
        "params": count_params(teacher_model), "times_s": times[TEACHER_NAME],
    }}
    for name, model in students.items():
        macs = student_macs(fields[name], cfg.seconds)
        rows[name] = {
            "median_s": median(times[name]), "ms_per_audio_s": 1e3 * median(times[name]) / audio,
            "time_ratio": paired_ratio(times[name], times[TEACHER_NAME]),
            "macs_ratio": macs / t_macs, "gmacs": macs * cfg.batch / 1e9,
            "params": count_params(model), "times_s": times[name],
        }
        target = CPU_TIME_TARGETS.get(name) if device.type == "cpu" else None
        if target is not None:
            rows[name]["target"] = target
            rows[name]["target_met"] = rows[name]["time_ratio"] <= target
    return {"batch": cfg.batch, "seconds": cfg.seconds, "models": rows}


def scaling_section(cfg: BenchmarkConfig, teacher, students, device) -> Dict[str, Any]:
    teacher_model = teacher.model.eval()
    result: Dict[str, Any] = {"batch": cfg.scaling_batch, "lengths": {}}
    for seconds in cfg.lengths:
        source = torch.randn(cfg.scaling_batch, int(seconds * SAMPLE_RATE), device=device)
        times = time_interleaved(_inference_fns(teacher_model, students, source, device, cfg.amp),
                                 cfg.repeats, cfg.warmup, device)
        audio = cfg.scaling_batch * seconds
        result["lengths"][str(seconds)] = {
            name: {"ms_per_audio_s": 1e3 * median(t) / audio,
                   "time_ratio": paired_ratio(t, times[TEACHER_NAME])}
            for name, t in times.items()
        }
    return result


_COMPOSED: Dict[Tuple[str, Tuple[str, ...]], Any] = {}


def compose_preset(preset: str, overrides: Sequence[str]):
    """The preset's full config, composed as ``fairseq-hydra-train --config-name PRESET`` does."""
    from omegaconf import OmegaConf

    key = (preset, tuple(overrides))
    if key not in _COMPOSED:  # composing costs seconds (omegaconf 2.0 deep copies); check_config did it
        _COMPOSED[key] = OmegaConf.to_container(_compose(preset, overrides))
    cfg = OmegaConf.create(_COMPOSED[key])
    OmegaConf.set_struct(cfg, True)
    return cfg


def _compose(preset: str, overrides: Sequence[str]):
    import fairseq
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from fairseq.dataclass.utils import omegaconf_no_object_check
    from hydra.core.global_hydra import GlobalHydra
    from hydra.experimental import compose, initialize_config_dir
    from omegaconf import OmegaConf

    hydra_init(preset)  # FairseqConfig under the preset's name, as hydra_train.cli_main does
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=os.path.join(os.path.dirname(fairseq.__file__), "config")):
            cfg = compose(preset, overrides=list(overrides))
    except Exception as error:  # hydra's errors name the bad key or the missing config
        raise BenchmarkError(f"cannot compose preset {preset!r}: {error}") from None
    finally:
        GlobalHydra.instance().clear()
    add_defaults(cfg)
    with omegaconf_no_object_check():
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(cfg, True)
    return cfg


def training_overrides(cfg: BenchmarkConfig, preset: str, device: torch.device, work_dir: str) -> List[str]:
    """What the benchmark sets on top of the preset, then the user's ``--override`` entries."""
    cpu = device.type == "cpu"
    return [
        f"common.cpu={str(cpu).lower()}",
        f"common.fp16={str(not cpu and cfg.amp != 'none').lower()}",  # the presets' fp16 on a GPU
        f"common.seed={cfg.seed}",
        "distributed_training.distributed_world_size=1",
        "dataset.num_workers=0",
        f"task.data={work_dir}",
        f"task.teacher_path=in_memory_random_{TEACHER_NAME}",
        f"checkpoint.save_dir={work_dir}",
    ] + split_overrides(cfg.overrides, preset)


@dataclass
class Distillation:
    """One preset's real training objects, with the in-memory teacher."""

    trainer: Any
    task: Any
    model: torch.nn.Module
    criterion: Any
    sample: Dict[str, Any]


def build_distillation(
    cfg: BenchmarkConfig, preset: str, teacher, device: torch.device, work_dir: str, train_cfg: Any = None
) -> Distillation:
    """Task, student, criterion and fairseq ``Trainer`` of a preset; the teacher is the given one.

    The preset is composed like ``fairseq-hydra-train --config-name PRESET`` (every group: task,
    model, criterion, optimizer, lr scheduler, clipping); the batch is what fairseq's padded
    collater makes of ``batch`` utterances of ``seconds``.
    """
    from fairseq import tasks
    from fairseq.trainer import Trainer

    if train_cfg is None:
        train_cfg = compose_preset(preset, training_overrides(cfg, preset, device, work_dir))
    task = tasks.setup_task(train_cfg.task)
    task._teacher = teacher  # the in-memory teacher instead of one read from task.teacher_path
    model = task.build_model(train_cfg.model)
    criterion = task.build_criterion(train_cfg.criterion)
    trainer = Trainer(train_cfg, task, model, criterion)
    source = torch.randn(cfg.batch, int(cfg.seconds * SAMPLE_RATE), device=device)
    sample = {
        "id": torch.arange(cfg.batch, device=device),
        "net_input": {"source": source, "padding_mask": torch.zeros_like(source, dtype=torch.bool)},
    }
    return Distillation(trainer, task, trainer.model, trainer.criterion, sample)


def _part_fns(dist: Distillation) -> Dict[str, Callable[[], Any]]:
    """The update, and its three parts alone on the same batch."""
    trainer, model = dist.trainer, dist.model
    net_input = dist.sample["net_input"]
    teacher = dist.task.teacher
    dtype = next(model.parameters()).dtype  # fp16 when the trainer cast the student

    def update():
        trainer.train_step([dist.sample])

    def teacher_forward():
        teacher.hidden_states(net_input["source"].float(), net_input["padding_mask"])

    def student_forward_backward():
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(source=net_input["source"].to(dtype), padding_mask=net_input["padding_mask"])
        outputs = list(out["hints"].values()) + list(out["preds"].values())
        torch.stack([o.float().mean() for o in outputs]).sum().backward()

    def optimizer_step():
        trainer.optimizer.step()

    return {"update": update, "teacher_forward": teacher_forward,
            "student_forward_backward": student_forward_backward, "optimizer_step": optimizer_step}


def training_section(cfg: BenchmarkConfig, teacher, device, work_dir: str) -> Dict[str, Any]:
    rows: Dict[str, Any] = {}
    for preset in cfg.presets:
        dist = build_distillation(cfg, preset, teacher, device, work_dir)
        times = time_interleaved(_part_fns(dist), cfg.repeats, max(cfg.warmup, 1), device)
        parts = [a + b + c for a, b, c in zip(times["teacher_forward"], times["student_forward_backward"],
                                              times["optimizer_step"])]
        update = median(times["update"])
        audio = cfg.batch * cfg.seconds
        rows[preset] = {
            "update_s": update,
            "parts_s": {k: median(v) for k, v in times.items() if k != "update"},
            "overhead": paired_ratio(times["update"], parts) - 1.0,
            "target": OVERHEAD_TARGET,
            "audio_s_per_s": audio / update,
            "times_s": times,
        }
        rows[preset]["target_met"] = rows[preset]["overhead"] <= OVERHEAD_TARGET
        rows[preset].update(distilhubert_schedule(audio / update))
        del dist
    return {"batch": cfg.batch, "seconds": cfg.seconds, "presets": rows}


def distilhubert_schedule(audio_s_per_s: float) -> Dict[str, float]:
    """Days for DistilHuBERT's 200k updates of 24 utterances at this throughput."""
    per_update_max = DISTILHUBERT_BATCH * DISTILHUBERT_CROP_SECONDS
    per_update_mean = DISTILHUBERT_BATCH * LIBRISPEECH_MEAN_SECONDS
    return {
        "schedule_days_15_6s": DISTILHUBERT_UPDATES * per_update_max / audio_s_per_s / 86400,
        "schedule_days_12_3s": DISTILHUBERT_UPDATES * per_update_mean / audio_s_per_s / 86400,
    }


def loader_section(cfg: BenchmarkConfig, work_dir: str) -> Dict[str, Any]:
    """Audio-seconds per second that fairseq's batch iterator delivers from ``manifest``, with each
    number of DataLoader workers, batched as each preset batches (crops, batch size, max_tokens).

    Audio is read and decoded for real (soundfile), so this is the rate the data side can feed an
    update; compare it with the distillation throughput.
    """
    from fairseq import tasks

    rows: Dict[str, Any] = {}
    for preset in cfg.presets:
        overrides = training_overrides(cfg, preset, torch.device("cpu"), work_dir)
        overrides = [o for o in overrides if not o.startswith("task.data=")]
        train_cfg = compose_preset(preset, overrides + [f"task.data={cfg.manifest}", "task.validate_audio=false"])
        task = tasks.setup_task(train_cfg.task)
        task.load_dataset(cfg.split)
        dataset = task.dataset(cfg.split)
        rows[preset] = {}
        _load_epoch(task, dataset, train_cfg, 0, cfg.seed)  # untimed: the page cache and libsndfile warm up
        for workers in cfg.loader_workers:
            rows[preset][str(workers)] = _load_epoch(task, dataset, train_cfg, workers, cfg.seed)
    return {"manifest": cfg.manifest, "split": cfg.split, "presets": rows}


def _load_epoch(task, dataset, train_cfg, workers: int, seed: int) -> Dict[str, float]:
    """One epoch through fairseq's iterator; the rate counts from the first batch on (the workers'
    start-up is paid once per epoch, which on a real corpus is thousands of batches)."""
    iterator = task.get_batch_iterator(
        dataset, max_tokens=train_cfg.dataset.max_tokens, max_sentences=train_cfg.dataset.batch_size,
        num_workers=workers, seed=seed, epoch=1,
    ).next_epoch_itr(shuffle=True)
    start = time.perf_counter()
    first, samples, first_samples, batches = None, 0, 0, 0
    for batch in iterator:
        mask = batch["net_input"].get("padding_mask")
        samples += batch["net_input"]["source"].numel() - (int(mask.sum()) if mask is not None else 0)
        if first is None:
            first, first_samples = time.perf_counter(), samples
        batches += 1
    end = time.perf_counter()
    if batches > 1:  # from the first batch on
        rate = (samples - first_samples) / SAMPLE_RATE / (end - first)
    else:  # a one-batch split: start-up included
        rate = samples / SAMPLE_RATE / max(end - start, 1e-9)
    return {"audio_s_per_s": rate, "first_batch_s": (first or end) - start, "batches": batches}


# -- memory, in child processes ------------------------------------------------------------------------
def _proc_status_bytes(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Memory now and at peak: CUDA allocator stats on a GPU, resident set size on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM (peak RSS)"

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        rss = _proc_status_bytes("VmRSS")
        if rss is None:  # no /proc: the lifetime peak is the best available
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return rss

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_peak_rss():
            self.method = "ru_maxrss (lifetime peak: includes model building)"

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        hwm = _proc_status_bytes("VmHWM")
        if hwm is None or "ru_maxrss" in self.method:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return hwm


def memory_job(cfg: BenchmarkConfig, kind: str, preset: Optional[str], train_cfg: Optional[dict] = None) -> Dict[str, Any]:
    """In a fresh process: peak memory of one teacher forward or one distillation update.

    ``base`` is the process after its imports (nothing built); the second call is measured, so
    that lazily allocated state (the optimizer's moments) is included.
    """
    import fairseq.trainer  # noqa: F401  (imports before the baseline)
    from fairseq import tasks  # noqa: F401

    import fairseq_kd  # noqa: F401

    quiet()
    _set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    meter = PeakMemory(device)
    base = meter.current()
    teacher = build_teacher(cfg.teacher_overrides, device)
    with tempfile.TemporaryDirectory() as work_dir:
        if kind == "teacher_forward":
            source = torch.randn(cfg.batch, int(cfg.seconds * SAMPLE_RATE), device=device)
            model = teacher.model.eval()

            def step():
                with torch.inference_mode(), _autocast(device, cfg.amp):
                    model.extract_features(source, padding_mask=None, mask=False)
        else:
            from omegaconf import OmegaConf

            composed = OmegaConf.create(train_cfg)  # composed by the parent (hydra is slow to start)
            OmegaConf.set_struct(composed, True)
            dist = build_distillation(cfg, preset, teacher, device, work_dir, train_cfg=composed)

            def step():
                dist.trainer.train_step([dist.sample])

        step()
        synchronize(device)
        before = meter.current()
        meter.reset_peak()
        step()
        synchronize(device)
        peak = meter.peak()
    return {"kind": kind, "preset": preset, "method": meter.method, "base_mb": base / 2**20,
            "before_step_mb": before / 2**20, "peak_mb": peak / 2**20,
            "peak_over_base_mb": (peak - base) / 2**20, "step_peak_mb": (peak - before) / 2**20}


# imported once by the fork server, so that each measuring child starts without import time
CHILD_PRELOAD = [
    "fairseq_kd.benchmark", "fairseq.trainer", "fairseq.tasks", "fairseq.models.hubert.hubert",
    "fairseq_kd.tasks.distill_hubert", "fairseq_kd.criterions.layer_distill", "fairseq_kd.models.thin_hubert",
    "hydra.experimental",
]


def memory_section(cfg: BenchmarkConfig, work_dir: str) -> Dict[str, Any]:
    """One fresh child process per measurement, side by side (memory does not mind).

    The children fork from a server that only imported the libraries (never ran an OpenMP
    region, which is not fork-safe), so each starts from the same bare state.
    """
    from omegaconf import OmegaConf

    jobs = [("teacher_forward", None)] + [("distill_update", p) for p in cfg.presets]
    context = get_context("forkserver")
    context.set_forkserver_preload(CHILD_PRELOAD)
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=context) as pool:
        futures = []
        for kind, preset in jobs:
            train_cfg = None
            if preset is not None:
                overrides = training_overrides(cfg, preset, torch.device(cfg.device), work_dir)
                train_cfg = OmegaConf.to_container(compose_preset(preset, overrides))
            futures.append(pool.submit(memory_job, cfg, kind, preset, train_cfg))
        results = [f.result() for f in futures]
    teacher = results[0]
    rows = {"teacher_forward": teacher}
    for result in results[1:]:
        result["ratio_to_teacher_forward"] = result["peak_over_base_mb"] / teacher["peak_over_base_mb"]
        rows[result["preset"]] = result
    return {"batch": cfg.batch, "seconds": cfg.seconds, "method": teacher["method"], "rows": rows}


# -- the whole run -------------------------------------------------------------------------------------
def _set_threads(threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(threads)


def quiet() -> None:
    """Keep the report readable: fairseq's model/trainer INFO lines and known deprecation notes."""
    import warnings

    for name in ("fairseq", "fairseq_kd"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(weight_norm|autocast).*")
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*pin_memory.*no accelerator.*")


def machine_info(device: torch.device) -> Dict[str, Any]:
    import fairseq

    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fairseq": fairseq.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def check_config(cfg: BenchmarkConfig, work_dir: Optional[str] = None) -> None:
    """Bad settings fail here, before any model is built."""
    unknown = [s for s in cfg.sections if s not in SECTIONS]
    if unknown:
        raise BenchmarkError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if cfg.amp not in AMP_DTYPES:
        raise BenchmarkError(f"amp must be one of {', '.join(AMP_DTYPES)}, not {cfg.amp!r}")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError(f"--device {cfg.device}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cpu" and cfg.amp != "none":
        raise BenchmarkError("--amp is for GPUs (CPU autocast slows these models down); use --amp none on a CPU")
    if cfg.batch < 1 or cfg.scaling_batch < 1 or cfg.repeats < 1 or cfg.warmup < 0:
        raise BenchmarkError("--batch, --scaling-batch and --repeats must be >= 1, --warmup >= 0")
    too_short = [s for s in [cfg.seconds, *cfg.lengths] if s * SAMPLE_RATE < 400]
    if too_short:
        raise BenchmarkError(f"utterances of {too_short} s are shorter than the CNN's receptive field (400 samples)")
    if not cfg.presets:
        raise BenchmarkError("no presets to benchmark (--presets)")
    if "loader" in cfg.sections and cfg.manifest:
        manifest = os.path.join(cfg.manifest, f"{cfg.split}.tsv")
        if not os.path.isfile(manifest):
            raise BenchmarkError(f"--manifest {cfg.manifest}: no {cfg.split}.tsv there (fairseq manifest folder expected)")
        if any(w < 0 for w in cfg.loader_workers):
            raise BenchmarkError(f"--loader-workers must be >= 0, got {cfg.loader_workers}")
    teacher = teacher_config(cfg.teacher_overrides)  # raises on unknown keys
    for preset in cfg.presets:
        check_student(preset, student_fields(preset, cfg.overrides))
        if "training" in cfg.sections or "memory" in cfg.sections:
            overrides = training_overrides(cfg, preset, device, work_dir or tempfile.gettempdir())
            check_distillation(preset, compose_preset(preset, overrides), teacher)


def check_student(preset: str, fields: Mapping[str, Any]) -> None:
    from fairseq_kd.models.thin_hubert import as_thin_hubert_config
    from fairseq_kd.models.thin_hubert import check_config as check_thin_hubert

    try:
        check_thin_hubert(as_thin_hubert_config(dict(fields)))
    except (ValueError, TypeError) as error:
        raise BenchmarkError(f"preset {preset}: {error} (fix it with --override {preset}:model.KEY=VALUE)") from None


def check_distillation(preset: str, train_cfg, teacher_cfg) -> None:
    """The preset's layer mapping and head width must fit the (possibly overridden) teacher."""
    from fairseq_kd.criterions.layer_distill import build_targets

    try:
        targets = build_targets(train_cfg.criterion, train_cfg.model)
    except ValueError as error:
        raise BenchmarkError(f"preset {preset}: {error}") from None
    too_deep = sorted({layer for t in targets for layer in t.teacher_layers if layer > teacher_cfg.encoder_layers})
    if too_deep:
        raise BenchmarkError(
            f"preset {preset} distils teacher layers {too_deep} but the teacher has {teacher_cfg.encoder_layers}: "
            f"override {preset}:model.pred_layer_ids / model.hint_layer_ids / criterion.hint_targets"
        )
    if train_cfg.model.teacher_embed_dim != teacher_cfg.encoder_embed_dim:
        raise BenchmarkError(
            f"preset {preset}: model.teacher_embed_dim={train_cfg.model.teacher_embed_dim} but the teacher is "
            f"{teacher_cfg.encoder_embed_dim}-dimensional: add --override model.teacher_embed_dim="
            f"{teacher_cfg.encoder_embed_dim}"
        )


def run_benchmark(cfg: BenchmarkConfig, progress: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the selected sections; returns the figures (what ``--out`` writes as JSON)."""
    with tempfile.TemporaryDirectory() as work_dir:  # task.data / save_dir: never read, never written
        return _run(cfg, progress, work_dir)


def _run(cfg: BenchmarkConfig, progress: Callable[[str], None], work_dir: str) -> Dict[str, Any]:
    check_config(cfg, work_dir)
    _set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    result: Dict[str, Any] = {"machine": machine_info(device), "config": asdict(cfg), "load": {}}
    fields = {name: student_fields(name, cfg.overrides) for name in cfg.presets}
    started = time.perf_counter()

    def stamp(section: str) -> None:
        result["load"][section] = _loadavg()
        progress(f"[{time.perf_counter() - started:6.1f}s] {section} (load average {result['load'][section]})")

    teacher = None
    if {"inference", "scaling", "training"} & set(cfg.sections):
        teacher = build_teacher(cfg.teacher_overrides, device)
    if {"inference", "scaling"} & set(cfg.sections):
        students = {name: build_student(name, cfg.overrides, device=device) for name in cfg.presets}
        if "inference" in cfg.sections:
            stamp("inference")
            result["inference"] = inference_section(cfg, teacher, students, fields, device)
        if "scaling" in cfg.sections:
            stamp("scaling")
            result["scaling"] = scaling_section(cfg, teacher, students, device)
        del students
    if "training" in cfg.sections:
        stamp("training")
        result["training"] = training_section(cfg, teacher, device, work_dir)
        result["throughput"] = {
            preset: {k: row[k] for k in ("audio_s_per_s", "schedule_days_15_6s", "schedule_days_12_3s")}
            for preset, row in result["training"]["presets"].items()
        }
    del teacher
    if "loader" in cfg.sections and cfg.manifest:
        stamp("loader")
        result["loader"] = loader_section(cfg, work_dir)
        for preset, row in result.get("throughput", {}).items():  # can the data side keep up?
            row["loader_headroom"] = {w: r["audio_s_per_s"] / row["audio_s_per_s"]
                                      for w, r in result["loader"]["presets"][preset].items()}
    if "memory" in cfg.sections:
        stamp("memory")
        result["memory"] = memory_section(cfg, work_dir)
    stamp("done")
    result["wall_s"] = time.perf_counter() - started
    return result


# -- report ----------------------------------------------------------------------------------------------
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
            if "loader_headroom" in row:
                lines.append(f"  {'':<22}data loading / distillation rate: " + ", ".join(
                    f"{h:.1f}x with {w} workers" for w, h in row["loader_headroom"].items()))
    return "\n".join(lines)


# -- trained checkpoints -------------------------------------------------------------------------------
def load_for_inference(path: str, device: Any = "cpu") -> Tuple[torch.nn.Module, Callable[[torch.Tensor], Any]]:
    """A checkpoint's model in eval mode and its inference forward on a (B, S) waveform.

    Works for pre-trained teachers (``hubert``, ``wav2vec2``), distilled students (``thin_hubert``)
    and their CTC fine-tuned models (``hubert_ctc``, ``wav2vec_ctc``: encoder + CTC projection).
    """
    from fairseq import checkpoint_utils

    if not os.path.isfile(path):
        raise BenchmarkError(f"checkpoint {path} does not exist")
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([path])
    model = models[0].to(device).eval()
    if hasattr(model, "w2v_encoder"):  # a fine-tuned CTC model: what decoding runs
        def forward(source):
            return model(source=source, padding_mask=None)
    else:
        if hasattr(model, "remove_pretraining_modules"):
            model.remove_pretraining_modules()

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

    Returns ``{path: {"time_ratio": median of per-round ratios, "median_s": ...}}`` for the
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
    return {p: {"time_ratio": paired_ratio(t, times[teacher]), "median_s": median(t)} for p, t in times.items()}


__all__ = [
    "BenchmarkConfig",
    "BenchmarkError",
    "build_teacher",
    "build_student",
    "build_distillation",
    "format_report",
    "inference_time_ratios",
    "load_for_inference",
    "run_benchmark",
    "time_interleaved",
]
