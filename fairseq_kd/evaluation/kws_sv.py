# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Keyword accuracy, and speaker-verification EER / minDCF from cosine scoring over a trial list.

Conventions (VoxCeleb / VoxSRC): a trial's score is the cosine similarity of the two utterances'
embeddings; the ROC comes from scikit-learn's ``roc_curve``; the EER is where the miss rate equals
the false-alarm rate (linearly interpolated between the two ROC points around the crossing); the
minDCF is the normalised detection cost ``(c_miss * P_miss * p + c_fa * P_fa * (1 - p)) /
min(c_miss * p, c_fa * (1 - p))`` minimised over thresholds, with ``p = 0.01`` and
``c_miss = c_fa = 1``.

:func:`evaluate` runs a fine-tuned ``kws_sv`` model over one split (what ``fairseq-kd-eval-kws-sv``
prints and writes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from sklearn.metrics import roc_curve

from fairseq_kd.data.kws_sv import Trial

logger = logging.getLogger(__name__)

P_TARGET = 0.01
C_MISS = 1.0
C_FA = 1.0


# -- pure metrics ----------------------------------------------------------------------------------
def cosine_scores(embeddings: np.ndarray, index_a: np.ndarray, index_b: np.ndarray) -> np.ndarray:
    """Cosine similarity of ``embeddings[index_a[i]]`` and ``embeddings[index_b[i]]``.

    Args:
        embeddings: (N, E) float
        index_a, index_b: (M,) int rows of ``embeddings``
    Returns:
        (M,) float64 scores in [-1, 1]
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.maximum(norms, 1e-12)
    return np.einsum("ij,ij->i", emb[index_a], emb[index_b])


def eer_min_dcf(
    scores: Sequence[float],
    targets: Sequence[int],
    p_target: float = P_TARGET,
    c_miss: float = C_MISS,
    c_fa: float = C_FA,
) -> Tuple[float, float]:
    """Equal error rate (a fraction) and normalised minimum detection cost of verification scores.

    Args:
        scores: (M,) higher = more likely the same speaker
        targets: (M,) 1 for a target (same-speaker) trial, 0 for a non-target trial
    """
    targets = np.asarray(targets, dtype=np.int64)
    n_target = int(targets.sum())
    if n_target == 0 or n_target == len(targets):
        raise ValueError(f"EER needs target and non-target trials, got {n_target} of {len(targets)} targets")
    fpr, tpr, _ = roc_curve(targets, np.asarray(scores, dtype=np.float64), drop_intermediate=False)
    fnr = 1.0 - tpr
    # fpr rises and fnr falls along the curve: interpolate where their difference changes sign
    diff = fpr - fnr
    i = int(np.argmax(diff >= 0))
    if i == 0:
        eer = float(fpr[0])
    else:
        t = diff[i - 1] / (diff[i - 1] - diff[i])
        eer = float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))
    dcf = c_miss * fnr * p_target + c_fa * fpr * (1.0 - p_target)
    min_dcf = float(dcf.min() / min(c_miss * p_target, c_fa * (1.0 - p_target)))
    return eer, min_dcf


def score_trials(
    embeddings: Dict[str, np.ndarray], trials: Sequence[Trial]
) -> Tuple[np.ndarray, np.ndarray, int]:
    """Scores and targets of the trials whose two utterances have an embedding; and how many had not."""
    names = list(embeddings)
    index = {name: i for i, name in enumerate(names)}
    usable = [t for t in trials if t.a in index and t.b in index]
    if not usable:
        return np.zeros(0), np.zeros(0, dtype=np.int64), len(trials)
    matrix = np.stack([embeddings[name] for name in names])
    a = np.array([index[t.a] for t in usable])
    b = np.array([index[t.b] for t in usable])
    targets = np.array([t.target for t in usable], dtype=np.int64)
    return cosine_scores(matrix, a, b), targets, len(trials) - len(usable)


def verification_metrics(embeddings: Dict[str, np.ndarray], trials: Sequence[Trial]) -> Dict[str, float]:
    """``eer`` (percent), ``min_dcf``, and trial counts; empty when no trial pair can be scored both ways."""
    scores, targets, missing = score_trials(embeddings, trials)
    n_target = int(targets.sum())
    if n_target == 0 or n_target == len(targets):
        return {}
    eer, min_dcf = eer_min_dcf(scores, targets)
    return {
        "eer": 100.0 * eer,
        "min_dcf": min_dcf,
        "trials": float(len(targets)),
        "target_trials": float(n_target),
        "unscored_trials": float(missing),
    }


# -- evaluating a checkpoint -----------------------------------------------------------------------
@dataclass
class SplitOutputs:
    """What a ``kws_sv`` model produced for each utterance of a split."""

    paths: List[str]
    keyword_predictions: Dict[str, int] = field(default_factory=dict)
    keyword_targets: Dict[str, int] = field(default_factory=dict)
    embeddings: Dict[str, np.ndarray] = field(default_factory=dict)


@torch.no_grad()
def run_split(model, task, split: str, max_tokens: int, device: str = "cpu") -> SplitOutputs:
    """Forward every utterance of ``task.datasets[split]`` (padding-aware batches, no cropping)."""
    dataset = task.dataset(split)
    model.eval()
    model.to(device)
    itr = task.get_batch_iterator(
        dataset=dataset, max_tokens=max_tokens, max_positions=None, ignore_invalid_inputs=False,
        required_batch_size_multiple=1, seed=1, num_workers=0,
    ).next_epoch_itr(shuffle=False)
    out = SplitOutputs(paths=list(dataset.paths))
    for sample in itr:
        if not sample:
            continue
        net_input = {k: v.to(device) if torch.is_tensor(v) else v for k, v in sample["net_input"].items()}
        result = model(**net_input)
        ids = sample["id"].tolist()
        names = [dataset.path_of(i) for i in ids]
        if result.get("kws_logits") is not None:
            predictions = result["kws_logits"].argmax(-1).tolist()
            for name, pred, target in zip(names, predictions, sample["target_kw"].tolist()):
                out.keyword_predictions[name] = pred
                out.keyword_targets[name] = target
        if result.get("sv_embedding") is not None:
            for name, emb in zip(names, result["sv_embedding"].float().cpu().numpy()):
                out.embeddings[name] = emb
    return out


def keyword_metrics(outputs: SplitOutputs, keywords: Sequence[str]) -> Dict[str, float]:
    """Accuracy (percent) over the labelled utterances, and per-keyword accuracy."""
    labelled = [n for n, t in outputs.keyword_targets.items() if t >= 0]
    if not labelled:
        return {}
    correct = [outputs.keyword_predictions[n] == outputs.keyword_targets[n] for n in labelled]
    result = {"kws_accuracy": 100.0 * float(np.mean(correct)), "kws_utterances": float(len(labelled))}
    for k, word in enumerate(keywords):
        of_word = [c for n, c in zip(labelled, correct) if outputs.keyword_targets[n] == k]
        if of_word:
            result[f"kws_accuracy_{word}"] = 100.0 * float(np.mean(of_word))
    return result


__all__ = [
    "cosine_scores",
    "eer_min_dcf",
    "score_trials",
    "verification_metrics",
    "keyword_metrics",
    "run_split",
]
