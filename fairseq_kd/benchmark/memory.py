# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The memory section: peak memory of a distillation update against the teacher's forward alone,
each in a fresh child process (peak RSS on CPU, ``max_memory_allocated`` on a GPU)."""

from __future__ import annotations

import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Dict, Optional

import torch

from fairseq_kd.benchmark.config import SAMPLE_RATE, BenchmarkConfig, compose, training_overrides
from fairseq_kd.benchmark.machine import quiet, set_threads
from fairseq_kd.benchmark.models import build_teacher
from fairseq_kd.benchmark.timing import autocast, synchronize
from fairseq_kd.benchmark.training import build_distillation


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
    set_threads(cfg.threads)
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
                with torch.inference_mode(), autocast(device, cfg.amp):
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
                train_cfg = OmegaConf.to_container(compose(preset, overrides))
            futures.append(pool.submit(memory_job, cfg, kind, preset, train_cfg))
        results = [f.result() for f in futures]
    teacher = results[0]
    rows = {"teacher_forward": teacher}
    for result in results[1:]:
        result["ratio_to_teacher_forward"] = result["peak_over_base_mb"] / teacher["peak_over_base_mb"]
        rows[result["preset"]] = result
    return {"batch": cfg.batch, "seconds": cfg.seconds, "method": teacher["method"], "rows": rows}
