"""Loading fairseq checkpoints without unpickling arbitrary code.

torch >= 2.6 loads with ``weights_only=True``: only tensors, containers and allow-listed classes
may be rebuilt. fairseq checkpoints legitimately hold a few more classes (an ``argparse.Namespace``
of training args, OmegaConf configs, the task's ``Dictionary``, numpy scalars in the training
state); we allow exactly those, for the duration of one load. A pickle that names any other global
is refused before anything in it runs, unless the user marks the file as trusted.
"""

from __future__ import annotations

import fnmatch
import os
import pickle
import re
from typing import Any, Iterable, List, Optional

import torch

ENV_TRUSTED = "FAIRSEQ_KD_TRUSTED_CHECKPOINTS"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's pickle names a global outside the allow-list."""


def _optional_globals(names: Iterable[str]) -> List[Any]:
    """Resolve ``module.attr`` names that exist in the installed versions (numpy moved modules)."""
    found = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        try:
            module = __import__(module_name, fromlist=[attr])
            found.append(getattr(module, attr))
        except (ImportError, AttributeError):
            continue
    return found


def fairseq_safe_globals() -> List[Any]:
    """The classes a fairseq 0.12.x (or older) checkpoint may contain besides tensors."""
    import argparse
    import collections
    import typing

    import numpy as np
    import omegaconf
    from omegaconf import base, nodes

    allowed: List[Any] = [
        argparse.Namespace,  # pre-hydra checkpoints: state["args"]
        collections.defaultdict,
        typing.Any,  # OmegaConf metadata
        omegaconf.DictConfig,
        omegaconf.ListConfig,
        base.ContainerMetadata,
        base.Metadata,
        np.dtype,
        # OmegaConf metadata refers to plain types (object_type=dict, element_type=int, ...)
        dict,
        list,
        tuple,
        set,
        int,
        float,
        str,
        bool,
    ]
    allowed += [
        getattr(nodes, name)
        for name in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode")
        if hasattr(nodes, name)
    ]
    allowed += _optional_globals(
        [
            "fairseq.data.dictionary.Dictionary",  # task_state["dictionaries"]
            "fairseq.distributed.utils._TensorPlaceholder",  # broadcast_object() payloads
            "numpy.core.multiarray.scalar",
            "numpy._core.multiarray.scalar",
            "numpy.core.multiarray._reconstruct",
            "numpy._core.multiarray._reconstruct",
            "numpy.ndarray",
        ]
    )
    # numpy >= 1.25 pickles dtypes as instances of per-type classes (numpy.dtypes.Float64DType)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def _source_name(f: Any) -> Optional[str]:
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    name = getattr(f, "name", None)
    return name if isinstance(name, str) else None


def is_trusted(path: Optional[str]) -> bool:
    """Whether ``FAIRSEQ_KD_TRUSTED_CHECKPOINTS`` marks this file (or a folder above it) as trusted."""
    entries = [e for e in os.environ.get(ENV_TRUSTED, "").split(os.pathsep) if e.strip()]
    if "*" in entries:
        return True
    if path is None:
        return False
    real = os.path.realpath(path)
    for entry in entries:
        entry_real = os.path.realpath(os.path.expanduser(entry))
        if real == entry_real or real.startswith(entry_real.rstrip(os.sep) + os.sep):
            return True
        if fnmatch.fnmatch(real, entry_real):
            return True
    return False


def _offending_globals(f: Any, error: Exception) -> List[str]:
    names = re.findall(r"GLOBAL ([\w\.]+)", str(error))
    try:  # zip checkpoints can be scanned completely, naming every offender at once
        if hasattr(f, "seek"):
            f.seek(0)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(f)
        allowed = {f"{g.__module__}.{getattr(g, '__qualname__', getattr(g, '__name__', ''))}"
                   for g in fairseq_safe_globals()}
        names += [n for n in unsafe if n not in allowed and n not in names]
    except Exception:  # legacy (non-zip) format: the unpickler's message is all we have
        pass
    return names


def safe_load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
    """``torch.load`` for fairseq's loaders: allow-listed classes only, unless the file is trusted."""
    source = _source_name(f)
    kwargs.pop("weights_only", None)  # fairseq main passes False: the allow-list still applies
    if is_trusted(source):
        return torch.load(f, map_location, *args, weights_only=False, **kwargs)
    start = f.tell() if hasattr(f, "tell") else None
    try:
        with torch.serialization.safe_globals(fairseq_safe_globals()):
            return torch.load(f, map_location, *args, weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        if start is not None and hasattr(f, "seek"):
            f.seek(start)
        offenders = _offending_globals(f, error) or ["<unknown: " + str(error).splitlines()[0] + ">"]
        where = source or "an in-memory checkpoint"
        raise UnsafeCheckpointError(
            f"refusing to load {where}: its pickle names {', '.join(offenders)}, which fairseq "
            f"checkpoints do not contain; unpickling it could run arbitrary code. Nothing from it "
            f"was executed. If you trust this file, allow it with "
            f"{ENV_TRUSTED}={where if source else '*'} (an {os.pathsep!r}-separated list of "
            f"files or folders, or '*' for all)."
        ) from None

