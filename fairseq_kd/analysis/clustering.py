"""SKILL-style targets: cluster the teacher's layers by their CKA and distil each cluster's mean.

SKILL (arXiv 2402.16830; docs/papers.md#skill-layer-clustered-targets) distils averages of groups of
similar teacher layers found by hierarchical clustering. Here: distance ``1 - CKA`` between the
teacher's transformer layers, average-linkage agglomerative clustering (scipy), cut into K groups;
each group's mean is one target of the ``layer_distill`` criterion (``criterion.hint_targets`` entries
such as ``'9+10+11+12'``), learnt by K student layers spread evenly over the student's depth.
LightHuBERT's target (the mean of the teacher's last 8 layers, L1) is :func:`lighthubert_spec`.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
from torch import Tensor

from fairseq_kd.analysis.family import spread_layers


class ClusterError(ValueError):
    """A group count or layer set the clustering cannot use."""


def cluster_layers(cka: Tensor, layer_ids: Sequence[int], groups: int) -> List[List[int]]:
    """Groups of ``layer_ids`` (the rows/columns of the square ``cka``), ordered by their first layer."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = len(layer_ids)
    if tuple(cka.shape) != (n, n):
        raise ClusterError(f"CKA matrix of shape {tuple(cka.shape)} for {n} layers")
    if not 1 <= groups <= n:
        raise ClusterError(f"cannot cut {n} teacher layers into {groups} groups: give 1 to {n} groups")
    if groups == n:
        return [[layer] for layer in layer_ids]
    distance = 1.0 - cka.double().numpy()
    distance = np.clip((distance + distance.T) / 2, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    labels = fcluster(linkage(squareform(distance, checks=False), method="average"), groups, criterion="maxclust")
    clusters: Dict[int, List[int]] = {}
    for layer, label in zip(layer_ids, labels):
        clusters.setdefault(int(label), []).append(int(layer))
    return sorted(clusters.values(), key=lambda g: g[0])


def hint_spec(groups: Sequence[Sequence[int]], student_layers: int) -> Dict[str, List]:
    """``model.hint_layer_ids`` (K student layers spread over its depth) and the matching
    ``criterion.hint_targets``."""
    if len(groups) > student_layers:
        raise ClusterError(
            f"{len(groups)} groups need at least {len(groups)} student layers, the student has {student_layers}"
        )
    return {
        "hint_layer_ids": spread_layers(len(groups), student_layers),
        "hint_targets": ["+".join(str(layer) for layer in group) for group in groups],
    }


def lighthubert_spec(teacher_layers: int, student_layers: int, last: int = 8) -> Dict[str, List]:
    """LightHuBERT: the student's last layer learns the mean of the teacher's last ``last`` layers."""
    first = max(1, teacher_layers - last + 1)
    return {"hint_layer_ids": [student_layers], "hint_targets": ["+".join(map(str, range(first, teacher_layers + 1)))]}


def overrides(spec: Dict[str, List]) -> List[str]:
    """The spec as fairseq-hydra-train overrides."""
    targets = ",".join(f"'{t}'" for t in spec["hint_targets"])
    return [f"model.hint_layer_ids=[{','.join(map(str, spec['hint_layer_ids']))}]", f"criterion.hint_targets=[{targets}]"]


__all__ = ["ClusterError", "cluster_layers", "hint_spec", "lighthubert_spec", "overrides"]
