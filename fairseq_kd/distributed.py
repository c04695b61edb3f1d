"""Data-parallel replica check (``task.check_replicas`` of ``distill_hubert``).

Each rank sums its student's parameters in float64, the sums are all-gathered, rank 0 logs
``parameter checksums across N ranks: [...]`` and a difference is an error. fairseq saves
checkpoints on rank 0 only, so without this a diverged replica would go unnoticed.
"""

import logging
import math
from typing import List, Optional, Sequence

import torch
from fairseq.distributed import utils as distributed_utils

logger = logging.getLogger(__name__)


class ReplicaMismatchError(RuntimeError):
    """Data-parallel ranks hold different student weights."""


def parameter_checksum(model: torch.nn.Module) -> torch.Tensor:
    """Sum of every parameter entry in float64 (a 0-dim tensor on the parameters' device)."""
    params = [p for p in model.parameters()]
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        total += p.detach().to(torch.float64).sum()
    return total


def compare_replica_checksums(checksums: Sequence[float]) -> None:
    """Raise ``ReplicaMismatchError`` unless all ranks' checksums are bit-identical.

    Replicas of data-parallel training start from one broadcast, apply the same averaged gradients
    with the same optimiser, and sum their parameters in the same order on the same kind of
    device, so their float64 sums are equal exactly; any difference means they diverged.
    """
    values = [float(c) for c in checksums]
    differing = [rank for rank, value in enumerate(values) if not _same(value, values[0])]
    if differing:
        raise ReplicaMismatchError(
            f"data-parallel replicas hold different student weights: parameter checksums "
            f"across {len(values)} ranks: {values} (ranks {differing} differ from rank 0). "
            "The ranks no longer train one model; stop and check the distributed setup "
            "(e.g. parameters updated outside the optimizer, or rank-dependent code in the model)"
        )


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))  # all-NaN weights are broken, not diverged


def check_replicas(model: torch.nn.Module) -> Optional[List[float]]:
    """All-gather the student's parameter checksum over the data-parallel group and compare.

    Must be called on every rank (it is a collective). Returns the checksums, or None when there
    is nothing to compare (single process, or a sharded model whose ranks hold different shards).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if "FullyShardedDataParallel" in type(model).__name__:
        return None  # FSDP: every rank holds a different shard of the parameters
    group = distributed_utils.get_data_parallel_group()
    world_size = distributed_utils.get_data_parallel_world_size()
    if world_size <= 1:
        return None
    local = parameter_checksum(model).reshape(1)
    gathered = distributed_utils.all_gather(local, group=group)
    checksums = [float(t.item()) for t in gathered]
    if distributed_utils.get_global_rank() == 0:
        logger.info(f"parameter checksums across {world_size} ranks: {checksums}")
    compare_replica_checksums(checksums)
    return checksums
