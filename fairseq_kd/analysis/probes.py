"""Linear probes on frozen per-layer features (the Deep-versus-Wide question: what each layer holds).

* Content: a Linear layer trained by CTC on the frames of a layer to emit the utterance's letters
  (fairseq's ``.ltr`` labels and ``dict.ltr.txt``), scored by greedy-decoding character error rate
  on held-out utterances (a few lines of torch).
* Speaker: a logistic regression (scikit-learn) on each utterance's mean-pooled frames, predicting
  the speaker (``.spk`` labels), scored by accuracy on held-out utterances of the same speakers.

Held-out split (:func:`split_by_speaker`): within each speaker, every other utterance is held out
(the first is kept for training), so both probes see every speaker in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import editdistance
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq_kd.data.manifest import ManifestRow, read_labels


class ProbeError(ValueError):
    """Labels the probes cannot use; the message names the file."""


def label_file(manifest: str, ext: str) -> Path:
    return Path(manifest).with_suffix(f".{ext}")


def read_speakers(manifest: str, all_rows: Sequence[ManifestRow]) -> List[str]:
    """Speaker id of every manifest row, from ``<split>.spk``."""
    path = label_file(manifest, "spk")
    if not path.is_file():
        raise ProbeError(
            f"the speaker probe needs speaker labels: {path} does not exist (one speaker id per "
            f"manifest row, as fairseq-kd-prepare-asr writes); pass --no-speaker-probe to skip it"
        )
    labels = [line.split()[0] if line.split() else "" for line in read_labels(path, all_rows)]
    if any(not s for s in labels):
        raise ProbeError(f"{path}: line {labels.index('') + 1} has no speaker id")
    return labels


def select_rows(speakers: Optional[Sequence[str]], total: int, limit: Optional[int]) -> List[int]:
    """Row indices to analyse: all, or about ``limit`` rows made of whole speakers (in order of first
    appearance) so that the speaker probe has several utterances of each."""
    if limit is None or limit >= total:
        return list(range(total))
    if speakers is None:
        return list(range(limit))
    by_speaker: Dict[str, List[int]] = {}
    for i, spk in enumerate(speakers):
        by_speaker.setdefault(spk, []).append(i)
    chosen: List[int] = []
    for rows in by_speaker.values():
        if len(chosen) >= limit:
            break
        chosen += rows
    return sorted(chosen)


def check_speakers(speakers: Sequence[str], train: List[int], test: List[int]) -> None:
    known = {speakers[i] for i in train}
    if len(known) < 2 or not [i for i in test if speakers[i] in known]:
        raise ProbeError(
            "the speaker probe needs at least 2 speakers, one of them with 2 or more utterances, among "
            "the analysed rows (raise --max-utterances)"
        )

def read_letters(manifest: str, all_rows: Sequence[ManifestRow], indices: Sequence[int]) -> Tuple[List[List[int]], List[str]]:
    """Letter ids (1-based; 0 is the CTC blank) of the rows ``indices``, and the symbols."""
    path, dictionary = label_file(manifest, "ltr"), Path(manifest).parent / "dict.ltr.txt"
    for needed in (path, dictionary):
        if not needed.is_file():
            raise ProbeError(
                f"the content probe needs letter labels: {needed} does not exist (fairseq's .ltr "
                f"labels and dict.ltr.txt); pass --no-content-probe to skip it"
            )
    symbols = [line.split()[0] for line in dictionary.read_text().splitlines() if line.strip()]
    index = {s: i + 1 for i, s in enumerate(symbols)}
    targets = []
    lines = read_labels(path, all_rows)
    for lineno in indices:
        line = lines[lineno]
        unknown = [s for s in line.split() if s not in index]
        if unknown:
            raise ProbeError(f"{path}:{lineno + 1}: letters {unknown} are not in {dictionary}")
        targets.append([index[s] for s in line.split()])
    return targets, symbols


def split_by_speaker(speakers: Optional[Sequence[str]], count: int) -> Tuple[List[int], List[int]]:
    """(train, test) utterance indices: every other utterance of a speaker is held out; without
    speakers, every other utterance."""
    if speakers is None:
        return list(range(0, count, 2)), list(range(1, count, 2))
    seen: Dict[str, int] = {}
    train, test = [], []
    for i, spk in enumerate(speakers):
        (test if seen.get(spk, 0) % 2 else train).append(i)
        seen[spk] = seen.get(spk, 0) + 1
    return train, test


def speaker_probe(pooled: Tensor, speakers: Sequence[str], train: List[int], test: List[int]) -> float:
    """Accuracy of a logistic regression on mean-pooled features, on the held-out utterances of
    speakers seen in training."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    check_speakers(speakers, train, test)
    known = {speakers[i] for i in train}
    test = [i for i in test if speakers[i] in known]
    x = pooled.double().numpy()
    y = np.array(speakers)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(x[train], y[train])
    return float((probe.predict(x[test]) == y[test]).mean())


def _standardize(train: List[Tensor], others: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
    frames = torch.cat(train)
    mean, std = frames.mean(0), frames.std(0).clamp(min=1e-5)
    return [(x - mean) / std for x in train], [(x - mean) / std for x in others]


def greedy_decode(log_probs: Tensor) -> List[int]:
    """(T, V) -> ids with repeats collapsed and blanks (0) removed."""
    best = log_probs.argmax(-1).tolist()
    return [b for i, b in enumerate(best) if b != 0 and (i == 0 or b != best[i - 1])]


def ctc_probe(
    features: Sequence[Tensor], targets: Sequence[List[int]], vocab: int, train: List[int], test: List[int],
    *, steps: int = 300, lr: float = 0.01, seed: int = 0,
) -> float:
    """Character error rate (edits / reference letters) of a CTC-trained Linear probe on ``test``."""
    gen = torch.Generator().manual_seed(seed)
    train_x, test_x = _standardize([features[i] for i in train], [features[i] for i in test])
    dim = train_x[0].size(-1)
    probe = torch.nn.Linear(dim, vocab + 1)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=gen) * dim ** -0.5)
        probe.bias.zero_()
    x = torch.nn.utils.rnn.pad_sequence(train_x, batch_first=True)  # (B, T, D)
    x_lengths = torch.tensor([len(f) for f in train_x])
    y = torch.tensor([t for i in train for t in targets[i]])
    y_lengths = torch.tensor([len(targets[i]) for i in train])
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            log_probs = probe(x).log_softmax(-1).transpose(0, 1)  # (T, B, V)
            loss = F.ctc_loss(log_probs, y, x_lengths, y_lengths, blank=0, zero_infinity=True)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        edits = sum(editdistance.eval(greedy_decode(probe(f).log_softmax(-1)), targets[i])
                    for f, i in zip(test_x, test))
    return edits / max(sum(len(targets[i]) for i in test), 1)


__all__ = [
    "ProbeError", "check_speakers", "ctc_probe", "greedy_decode", "read_letters", "read_speakers", "select_rows", "speaker_probe",
    "split_by_speaker",
]
