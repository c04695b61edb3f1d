# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""The keyword-spotting + speaker-verification data layout, and its checks.

One folder (``task.data``) holds, per split (``train``, ``valid``, ``test``):

* ``{split}.tsv``: a fairseq audio manifest (line 1 the audio root, then ``path<TAB>num_samples``);
* ``{split}.kw``: one keyword per manifest row, from ``dict.kw.txt``;
* ``{split}.spk``: one speaker id per manifest row;

plus ``dict.kw.txt`` (one keyword per line, optionally followed by a count, as fairseq's
dictionaries; the line order is the class order) and ``trials.txt``, a speaker-verification trial
list in the VoxCeleb1 format ``<1|0> <path_a> <path_b>`` whose paths are rows of ``test.tsv``.
A label ``-`` means "no label" (e.g. the speaker of a ``_silence_`` clip): that utterance is left
out of the loss and of the trials of that task.

Every check raises :class:`KwsSvDataError` naming the file and line, before any compute is spent.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from itertools import combinations
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from fairseq_kd.data.manifest import read_manifest

NO_LABEL = "-"
SHOWN = 5  # examples quoted in an error message


class KwsSvDataError(ValueError):
    """A keyword / speaker label, trial list or split that cannot be used; says how to fix it."""


@dataclass(frozen=True)
class Trial:
    target: int  # 1 = same speaker, 0 = different speakers
    a: str  # manifest row paths
    b: str
    line: int  # 1-based line in the trial file


# -- labels ----------------------------------------------------------------------------------------
def read_keywords(dict_path: str) -> List[str]:
    """The keyword classes of ``dict.kw.txt`` in file order (``word`` or ``word count`` per line)."""
    if not os.path.isfile(dict_path):
        raise KwsSvDataError(
            f"{dict_path} does not exist: keyword spotting needs the keyword list (one keyword per "
            f"line, optionally with a count); fairseq-kd-prepare-kws-sv writes it, or set task.kws=false "
            f"to train speaker verification alone"
        )
    keywords: List[str] = []
    seen: Dict[str, int] = {}
    with open(dict_path) as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            word = fields[0]
            if len(fields) > 2 or (len(fields) == 2 and not fields[1].lstrip("-").isdigit()):
                raise KwsSvDataError(f"{dict_path}:{number}: expected 'keyword' or 'keyword count', got {line.rstrip()!r}")
            if word == NO_LABEL:
                raise KwsSvDataError(f"{dict_path}:{number}: '{NO_LABEL}' is reserved for 'no label' and cannot be a keyword")
            if word in seen:
                raise KwsSvDataError(f"{dict_path}:{number}: keyword {word!r} is already on line {seen[word]}")
            seen[word] = number
            keywords.append(word)
    if len(keywords) < 2:
        raise KwsSvDataError(f"{dict_path} lists {len(keywords)} keyword(s); a classifier needs at least 2")
    return keywords


def split_paths(data: str, split: str) -> Tuple[str, List[str]]:
    """The manifest of ``split`` and its row paths, in order."""
    manifest = os.path.join(data, f"{split}.tsv")
    try:
        _, rows = read_manifest(manifest)
    except FileNotFoundError:
        raise KwsSvDataError(
            f"manifest {manifest} does not exist: task.data must hold {split}.tsv (and {split}.kw / "
            f"{split}.spk); see fairseq-kd-prepare-kws-sv"
        ) from None
    except ValueError as error:
        raise KwsSvDataError(str(error)) from None
    return manifest, [row.path for row in rows]


def read_labels(data: str, split: str, ext: str, num_rows: int, what: str) -> List[str]:
    """``{split}.{ext}``: one label per manifest row (the first field of each line)."""
    path = os.path.join(data, f"{split}.{ext}")
    if not os.path.isfile(path):
        raise KwsSvDataError(
            f"{path} does not exist: the {what} labels of {split}.tsv are read from it, one per "
            f"manifest row" + (" (or set task.kws=false to train speaker verification alone)" if what == "keyword" else
                               " (or set task.sv=false to train keyword spotting alone)")
        )
    with open(path) as f:
        lines = f.read().splitlines()
    labels = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if len(fields) != 1:
            raise KwsSvDataError(
                f"{path}:{number}: expected one {what} label, got {line!r} (use '{NO_LABEL}' for none)"
            )
        labels.append(fields[0])
    if len(labels) != num_rows:
        raise KwsSvDataError(
            f"{path} has {len(labels)} lines but {split}.tsv has {num_rows} rows: labels are matched "
            f"to audio by line number, so one of them is stale or truncated; regenerate both"
        )
    return labels


def check_keyword_labels(labels: Sequence[str], keywords: Sequence[str], label_path: str, dict_path: str) -> None:
    """Every keyword label is in the keyword list (or ``-``); the error names file and lines."""
    known = set(keywords)
    bad = [(number, label) for number, label in enumerate(labels, start=1) if label != NO_LABEL and label not in known]
    if bad:
        examples = "; ".join(f"{os.path.basename(label_path)}:{n}: {label!r}" for n, label in bad[:SHOWN])
        raise KwsSvDataError(
            f"{label_path}: {len(bad)} labels are not in {dict_path} ({', '.join(keywords)}): {examples}"
            f"{'; ...' if len(bad) > SHOWN else ''}. Fix the labels, add the keyword to the list before "
            f"training (its length fixes the classifier), or write '{NO_LABEL}' for an utterance without one"
        )


def first_lines(labels: Sequence[str]) -> Dict[str, int]:
    """``{label: first 1-based line}`` for the labels that are not ``-``."""
    first: Dict[str, int] = {}
    for number, label in enumerate(labels, start=1):
        if label != NO_LABEL:
            first.setdefault(label, number)
    return first


def check_disjoint_speakers(
    train_speakers: Dict[str, int], train_path: str, speakers: Dict[str, int], path: str, what: str
) -> None:
    """Speaker verification on speakers seen in training is not verification: stop if they overlap."""
    shared = [spk for spk in speakers if spk in train_speakers]
    if shared:
        def where(spk):
            train_line = train_speakers[spk]
            train_at = f"{os.path.basename(train_path)}:{train_line}" if train_line else "a training speaker of the checkpoint"
            return f"{spk!r} ({os.path.basename(path)}:{speakers[spk]}, {train_at})"

        examples = "; ".join(where(spk) for spk in shared[:SHOWN])
        raise KwsSvDataError(
            f"{len(shared)} speaker(s) of {what} also speak in the training split {train_path}: {examples}"
            f"{'; ...' if len(shared) > SHOWN else ''}. Speaker verification must be measured on speakers "
            f"unseen in training (the VoxCeleb1 and Speech Commands protocols): move them out of one "
            f"split, or set task.disjoint_speakers=false if your protocol allows seen speakers"
        )


# -- trials ----------------------------------------------------------------------------------------
def read_trials(path: str) -> List[Trial]:
    """A VoxCeleb1-format trial list: ``<1|0> <path_a> <path_b>`` per line."""
    if not os.path.isfile(path):
        raise KwsSvDataError(f"trial list {path} does not exist")
    trials = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3 or fields[0] not in ("0", "1"):
                raise KwsSvDataError(
                    f"{path}:{number}: expected '<1|0> <path_a> <path_b>' (VoxCeleb1 format: 1 = same "
                    f"speaker), got {line.rstrip()!r}"
                )
            trials.append(Trial(int(fields[0]), fields[1], fields[2], number))
    if not trials:
        raise KwsSvDataError(f"trial list {path} is empty")
    return trials


def check_trials(trials: Sequence[Trial], trials_path: str, paths: Iterable[str], manifest: str) -> None:
    """Every utterance a trial names is a row of the split's manifest."""
    known = set(paths)
    for trial in trials:
        for side in (trial.a, trial.b):
            if side not in known:
                raise KwsSvDataError(
                    f"{trials_path}:{trial.line}: {side} is not a row of {manifest}: trial paths must be "
                    f"written exactly as the manifest rows (relative to its audio root). Regenerate the "
                    f"trial list for this manifest, or evaluate the split it was made for"
                )


def check_trial_speakers(trials: Sequence[Trial], trials_path: str, speaker_of: Dict[str, str]) -> None:
    """A target trial pairs one speaker's utterances, a non-target trial two speakers'."""
    for trial in trials:
        a, b = speaker_of.get(trial.a, NO_LABEL), speaker_of.get(trial.b, NO_LABEL)
        if NO_LABEL in (a, b):
            continue
        if (a == b) != bool(trial.target):
            raise KwsSvDataError(
                f"{trials_path}:{trial.line}: a {'target' if trial.target else 'non-target'} trial, but "
                f"the speaker labels say {a!r} and {b!r}: the trial list and the .spk file disagree"
            )


def build_trials(paths: Sequence[str], speakers: Sequence[str], max_trials: int, seed: int) -> List[Trial]:
    """Verification trials over the labelled utterances of one split (for validation).

    All pairs when there are at most ``max_trials``; otherwise ``max_trials`` pairs drawn with
    ``seed``, half of them target pairs (as far as the split has them).
    """
    labelled = [(p, s) for p, s in zip(paths, speakers) if s != NO_LABEL]
    total = len(labelled) * (len(labelled) - 1) // 2
    if total <= max_trials:
        return [Trial(int(sa == sb), pa, pb, 0) for (pa, sa), (pb, sb) in combinations(labelled, 2)]
    rng = random.Random(seed)
    by_speaker: Dict[str, List[str]] = {}
    for p, s in labelled:
        by_speaker.setdefault(s, []).append(p)
    multi = [s for s, utts in by_speaker.items() if len(utts) > 1]
    trials = set()
    wanted_target = max_trials // 2 if multi else 0
    target_pairs = sum(len(by_speaker[s]) * (len(by_speaker[s]) - 1) // 2 for s in multi)
    wanted_target = min(wanted_target, target_pairs)
    while len(trials) < wanted_target:
        a, b = rng.sample(by_speaker[rng.choice(multi)], 2)
        trials.add((1, *sorted((a, b))))
    while len(trials) < max_trials:
        (pa, sa), (pb, sb) = rng.sample(labelled, 2)
        if sa != sb:
            trials.add((0, *sorted((pa, pb))))
    return [Trial(t, a, b, 0) for t, a, b in sorted(trials)]


# -- a whole layout ------------------------------------------------------------------------------
def check_layout(
    data: str,
    splits: Sequence[str] = ("train", "valid", "test"),
    train_split: str = "train",
    kws: bool = True,
    sv: bool = True,
    trials: Optional[str] = "trials.txt",
    trials_split: str = "test",
    disjoint_speakers: bool = True,
    kw_ext: str = "kw",
    spk_ext: str = "spk",
) -> Dict[str, int]:
    """Check a prepared folder as the task would; returns rows per split (a summary)."""
    keywords = read_keywords(os.path.join(data, f"dict.{kw_ext}.txt")) if kws else []
    rows: Dict[str, int] = {}
    speakers: Dict[str, Dict[str, int]] = {}
    speaker_of: Dict[str, Dict[str, str]] = {}
    for split in splits:
        manifest, paths = split_paths(data, split)
        rows[split] = len(paths)
        if kws:
            labels = read_labels(data, split, kw_ext, len(paths), "keyword")
            check_keyword_labels(labels, keywords, os.path.join(data, f"{split}.{kw_ext}"),
                                 os.path.join(data, f"dict.{kw_ext}.txt"))
        if sv:
            spk = read_labels(data, split, spk_ext, len(paths), "speaker")
            speakers[split] = first_lines(spk)
            speaker_of[split] = dict(zip(paths, spk))
    if sv and disjoint_speakers and train_split in speakers:
        train_path = os.path.join(data, f"{train_split}.{spk_ext}")
        for split in splits:
            if split != train_split:
                check_disjoint_speakers(speakers[train_split], train_path, speakers[split],
                                        os.path.join(data, f"{split}.{spk_ext}"), f"the {split} split")
    if sv and trials and trials_split in speaker_of:
        trials_path = os.path.join(data, trials)
        if os.path.isfile(trials_path):
            listed = read_trials(trials_path)
            check_trials(listed, trials_path, speaker_of[trials_split], os.path.join(data, f"{trials_split}.tsv"))
            check_trial_speakers(listed, trials_path, speaker_of[trials_split])
    return rows
