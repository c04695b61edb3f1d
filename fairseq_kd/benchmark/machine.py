# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The process and the machine: threads, log noise, load average, what the report prints."""

from __future__ import annotations

import datetime
import logging
import os
import platform
from typing import Any, Dict, List, Optional

import torch


def set_threads(threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(threads)


def quiet() -> None:
    """Keep the report readable: fairseq's model/trainer INFO lines and known deprecation notes."""
    import warnings

    for name in ("fairseq", "fairseq_kd"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(weight_norm|autocast).*")
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*pin_memory.*no accelerator.*")


def loadavg() -> Optional[List[float]]:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


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
