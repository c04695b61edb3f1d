# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Prepare keyword-spotting / speaker-verification data in the ``kws_sv`` layout.

Writes into ``--dest`` what the ``kws_sv`` task reads (see ``fairseq_kd/data/kws_sv.py``):
``{train,valid,test}.tsv`` manifests (line 1 the absolute audio root, rows sorted by path),
``.kw`` keyword and ``.spk`` speaker labels, ``dict.kw.txt`` and ``trials.txt``.

``speech-commands``: Google Speech Commands v1 (30 words) or v2 (35 words) as released
(``<word>/<speaker>_nohash_<n>.wav``, ``_background_noise_/``, ``validation_list.txt``,
``testing_list.txt``); splits from the official lists (the rest is train; the lists hash the
speaker, so the splits are speaker-disjoint). Protocols:

* ``12``: yes no up down left right on off stop go + ``_unknown_`` + ``_silence_``, as TensorFlow's
  reference ``speech_commands`` recipe builds it: per split, ``--unknown-percentage`` (10) percent
  of the split's keyword clips drawn from the other words, and ``--silence-percentage`` (10)
  percent of 1 s clips cut from ``_background_noise_`` at a random volume. The silence clips are
  written under ``DEST/_silence_/{split}/``, cut from disjoint stretches of each noise file
  (first 80 % train, next 10 % valid, last 10 % test). Their speaker label is ``-``.
* ``35`` (v2) or ``all``: every word is a class (v1: 30), no unknown, no silence.

``--test-set DIR``: the official 12-class test set (``speech_commands_test_set_v0.0X.tar.gz``
extracted: one folder per class, ``_unknown_`` and ``_silence_`` included, clips provided) replaces
the test split drawn from ``testing_list.txt``, as the 12-class results in the literature report on
it. Without the option, a ``speech_commands_test_set_v0.0*`` folder inside ``--root`` or next to it
is used when there is exactly one (logged). An ``_unknown_`` clip named ``<word>_<speaker>_nohash_<n>``
keeps its speaker; ``_silence_`` clips have none (``-``). [Inferred: the file naming inside the
archive is read from the released v0.02 layout as documented by TensorFlow's recipe, not verified
against every release.]

The speaker is the id before ``_nohash_``; ``trials.txt`` pairs test utterances of speakers
(``--trials-per-utterance``, half same-speaker where the speaker has another clip).

``voxceleb1``: VoxCeleb1 as released (``wav/<speaker>/<video>/<utt>.wav``). ``--protocol
verification`` (default): the speakers of the official trial list (``veri_test2.txt``, the cleaned
VoxCeleb1-O list; ``--trials`` for another) are the test split, their listed utterances its rows,
and ``trials.txt`` is the list itself; ``--valid-speakers N`` other speakers (seeded) are held out
as the valid split; every remaining speaker trains. ``--protocol identification``: the splits of
``iden_split.txt`` (1 train, 2 valid, 3 test; the same 1,251 speakers in all three, so training
needs ``task.disjoint_speakers=false``; ``spk_accuracy`` is then the identification accuracy). No
keyword labels: train with ``--config-name kws_sv_sv``.

``view --data DIR --view keywords|speakers --dest OUT``: a keyword-only or a speaker-only view of
a folder carrying both labels (the bundled ``manifests/keywords``), so that the two views stand in
for two corpora (``task.data=KW,SPK``). The rows are split by speaker, per split, deterministically:
every other labelled speaker in sorted order goes to the speaker view, the rest (and rows with no
speaker label) to the keyword view, so the two views share no row and no speaker. The keyword view
keeps ``.kw`` and ``dict.kw.txt`` (its ``.spk`` is all ``-``); the speaker view keeps ``.spk`` and
the trials of ``trials.txt`` whose two utterances it holds (no ``.kw``, as a VoxCeleb folder).
``--all-rows``: no split, every row carrying the view's label (e.g. a keyword-only copy of a
prepared Speech Commands folder, whose speaker labels would otherwise join the speaker loss and
its trials the EER when it is trained beside VoxCeleb).

``check --data DIR``: the checks the task makes before training (labels in the label set, label
files in step with manifests, trial paths in the split, speaker-disjoint splits).

Every audio header is read (16 kHz mono, else an error listing the files); all input problems are
reported before anything is written; existing outputs are not replaced without ``--overwrite``.

Usage::

    fairseq-kd-prepare-kws-sv speech-commands --root /data/speech_commands_v0.02 --dest data/sc12
    fairseq-kd-prepare-kws-sv speech-commands --root /data/speech_commands_v0.02 --protocol 35 --dest data/sc35
    fairseq-kd-prepare-kws-sv voxceleb1 --root /data/VoxCeleb1 --dest data/vox1
    fairseq-kd-prepare-kws-sv view --data manifests/keywords --view keywords --dest data/mini_kw
    fairseq-kd-prepare-kws-sv view --data manifests/keywords --view speakers --dest data/mini_spk
    fairseq-kd-prepare-kws-sv check --data manifests/keywords
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

import soundfile as sf

from fairseq_kd.data.kws_sv import (
    NO_LABEL, KwsSvDataError, check_layout, read_keywords, read_labels, read_trials, split_paths,
)
from fairseq_kd.data.manifest import read_manifest
from fairseq_kd.prep.prepare_asr import PrepareError, atomic_path, check_conflicts, raise_problems, read_header

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
SPLITS = ("train", "valid", "test")
SC_KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN = "_unknown_"
SILENCE = "_silence_"
NOISE_DIR = "_background_noise_"
SC_V2_WORDS = 35
# stretches of each background-noise file the silence clips of each split are cut from
NOISE_REGIONS = {"train": (0.0, 0.8), "valid": (0.8, 0.9), "test": (0.9, 1.0)}
TF_SEED = 59185  # the seed of TensorFlow's speech_commands recipe


@dataclass
class Row:
    path: str  # relative to the manifest root
    samples: int
    keyword: str
    speaker: str


# -- shared writing ------------------------------------------------------------------------------
def headers(paths: Sequence[Path], jobs: int) -> List[int]:
    """Sample counts; every file must be 16 kHz mono audio (all problems reported at once)."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        infos = list(pool.map(read_header, paths))
    problems = [info for info in infos if isinstance(info, str)]
    for path, info in zip(paths, infos):
        if isinstance(info, str):
            continue
        if info.samplerate != SAMPLE_RATE:
            problems.append(f"{path}: {info.samplerate} Hz; the encoders expect {SAMPLE_RATE} Hz (resample the corpus)")
        elif info.channels != 1:
            problems.append(f"{path}: {info.channels} channels; downmix to mono")
    raise_problems(problems, "unusable audio file(s)")
    return [info.frames for info in infos]


def output_files(dest: Path, with_keywords: bool, with_trials: bool) -> List[Path]:
    files = [dest / f"{split}.{ext}" for split in SPLITS for ext in ("tsv", "spk") + (("kw",) if with_keywords else ())]
    if with_keywords:
        files.append(dest / "dict.kw.txt")
    if with_trials:
        files.append(dest / "trials.txt")
    return files


def write_text(path: Path, lines: Sequence[str]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in lines))
    logger.info(f"wrote {path} ({len(lines)} lines)")


def write_layout(dest: Path, root: Path, splits: Dict[str, List[Row]], keywords: Optional[Sequence[str]],
                 trials: Optional[Sequence[str]]) -> None:
    for split, rows in splits.items():
        rows = sorted(rows, key=lambda r: r.path)
        write_text(dest / f"{split}.tsv", [str(root)] + [f"{r.path}\t{r.samples}" for r in rows])
        write_text(dest / f"{split}.spk", [r.speaker for r in rows])
        if keywords is not None:
            write_text(dest / f"{split}.kw", [r.keyword for r in rows])
    if keywords is not None:
        counts = Counter(r.keyword for r in splits["train"])
        write_text(dest / "dict.kw.txt", [f"{k} {counts[k]}" for k in keywords])
    if trials is not None:
        write_text(dest / "trials.txt", trials)


def make_trials(rows: Sequence[Row], per_utterance: int, seed: int) -> List[str]:
    """Balanced VoxCeleb1-format trials over ``rows``: per utterance, half same-speaker partners
    (when the speaker has another utterance) and half other-speaker partners; no duplicates."""
    rng = random.Random(seed)
    labelled = sorted((r for r in rows if r.speaker != NO_LABEL), key=lambda r: r.path)
    by_speaker: Dict[str, List[str]] = defaultdict(list)
    for r in labelled:
        by_speaker[r.speaker].append(r.path)
    if len(by_speaker) < 2:
        return []
    pairs = set()
    for r in labelled:
        same = [p for p in by_speaker[r.speaker] if p != r.path]
        for partner in rng.sample(same, min(len(same), per_utterance // 2)):
            pairs.add((1, *sorted((r.path, partner))))
        others = 0
        while others < per_utterance - per_utterance // 2:
            other = rng.choice(labelled)
            if other.speaker != r.speaker:
                pairs.add((0, *sorted((r.path, other.path))))
                others += 1
    return [f"{t} {a} {b}" for t, a, b in sorted(pairs, key=lambda p: (p[1], p[2], p[0]))]


# -- Speech Commands ---------------------------------------------------------------------------------
TEST_SET_GLOB = "speech_commands_test_set_v0.0*"


def find_test_set(root: Path, given: Optional[str]) -> Optional[Path]:
    """The official test-set folder: ``--test-set``, else the only one inside or next to ``root``."""
    if given:
        path = Path(given).resolve()
        if not path.is_dir():
            raise PrepareError(f"--test-set {path} is not a directory (the extracted {TEST_SET_GLOB}.tar.gz)")
        return path
    found = sorted({p.resolve() for p in [*root.glob(TEST_SET_GLOB), *root.parent.glob(TEST_SET_GLOB)] if p.is_dir()})
    if len(found) > 1:
        raise PrepareError(f"several official test sets next to {root}: {[str(p) for p in found]}; pick one with --test-set")
    if found:
        logger.info("test split: the official test set %s", found[0])
    return found[0] if found else None


def official_test_rows(test_set: Path, root: Path, keywords: Sequence[str], jobs: int) -> List[Row]:
    """Rows of the official 12-class test set, paths relative to the manifest root ``root``."""
    missing = [k for k in keywords if not (test_set / k).is_dir()]
    if missing:
        raise PrepareError(
            f"{test_set} has no folder for the class(es) {', '.join(missing)}: the official 12-class test "
            f"set has one folder per class ({', '.join(keywords)})"
        )
    clips = [(k, p) for k in keywords for p in sorted((test_set / k).glob("*.wav"))]
    if not clips:
        raise PrepareError(f"{test_set} has no <class>/*.wav clips")
    sizes = headers([p for _, p in clips], jobs)
    return [
        Row(os.path.relpath(p, root), n, k, NO_LABEL if k == SILENCE else test_set_speaker(p.name))
        for (k, p), n in zip(clips, sizes)
    ]


def test_set_speaker(name: str) -> str:
    # keyword clips: <speaker>_nohash_<n>.wav; _unknown_ clips: <word>_<speaker>_nohash_<n>.wav
    if "_nohash_" not in name:
        return NO_LABEL
    return name.split("_nohash_")[0].rsplit("_", 1)[-1]


def read_list(path: Path, root: Path) -> List[str]:
    if not path.is_file():
        raise PrepareError(
            f"{path} does not exist: the official split lists validation_list.txt and testing_list.txt "
            f"come with every Speech Commands release (extract the whole archive into {root})"
        )
    entries = []
    problems = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if not (root / line).is_file():
            problems.append(f"{path.name}:{number}: {line} does not exist under {root}")
        entries.append(line)
    raise_problems(problems, f"missing file(s) named by {path.name}")
    return entries


def sc_speaker(rel: str) -> str:
    name = os.path.basename(rel)
    return name.split("_nohash_")[0] if "_nohash_" in name else os.path.splitext(name)[0]


def cut_silence(noise_files: Sequence[Path], split: str, count: int, out_dir: Path, rng: random.Random) -> List[Path]:
    """``count`` 1 s clips from the split's stretch of the noise files, at a random volume in [0, 1)."""
    lo, hi = NOISE_REGIONS[split]
    noises = []
    for path in noise_files:
        audio, rate = sf.read(str(path), dtype="float32")
        if rate != SAMPLE_RATE or audio.ndim != 1:
            raise PrepareError(f"{path}: background noise must be {SAMPLE_RATE} Hz mono, got {rate} Hz, {audio.ndim}-D")
        start, end = int(lo * len(audio)), int(hi * len(audio))
        if end - start >= SAMPLE_RATE:
            noises.append(audio[start:end])
    if count and not noises:
        raise PrepareError(
            f"no background-noise file in {noise_files[0].parent if noise_files else NOISE_DIR} has a {hi - lo:.0%} "
            f"stretch of 1 s for the {split} split's silence clips"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    clips = []
    for i in range(count):
        noise = noises[rng.randrange(len(noises))]
        offset = rng.randrange(len(noise) - SAMPLE_RATE + 1)
        clip = noise[offset:offset + SAMPLE_RATE] * rng.random()
        path = out_dir / f"silence_{i:05d}.wav"
        with atomic_path(path) as tmp:
            sf.write(str(tmp), clip, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        clips.append(path)
    return clips


def prepare_speech_commands(args: argparse.Namespace) -> None:
    root, dest = Path(args.root).resolve(), Path(args.dest)
    if not root.is_dir():
        raise PrepareError(f"--root {root} is not a directory (the extracted Speech Commands archive)")
    words = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("_"))
    if args.protocol == "12":
        missing = [w for w in SC_KEYWORDS if w not in words]
        if missing:
            raise PrepareError(f"{root} has no folder for the keyword(s) {', '.join(missing)}: is it Speech Commands?")
        keywords = list(SC_KEYWORDS) + [UNKNOWN, SILENCE]
    elif args.protocol == "35":
        if len(words) != SC_V2_WORDS:
            raise PrepareError(
                f"the 35-class protocol is Speech Commands v2's, but {root} has {len(words)} word folders"
                + (" (v1 has 30: use --protocol all)" if len(words) == 30 else "")
            )
        keywords = words
    else:
        keywords = words

    noise_files = sorted((root / NOISE_DIR).glob("*.wav")) if args.protocol == "12" else []
    if args.protocol == "12" and args.silence_percentage > 0 and not noise_files:
        raise PrepareError(f"{root / NOISE_DIR} has no .wav files: the _silence_ class is cut from them")

    test_set = find_test_set(root, getattr(args, "test_set", None)) if args.protocol == "12" else None
    if getattr(args, "test_set", None) and args.protocol != "12":
        raise PrepareError(f"--test-set is the official 12-class test set: use it with --protocol 12, not {args.protocol}")
    split_of = {rel: "valid" for rel in read_list(root / "validation_list.txt", root)}
    split_of.update({rel: "test" for rel in read_list(root / "testing_list.txt", root)})
    clips = sorted(str(p.relative_to(root)) for w in words for p in (root / w).glob("*.wav"))
    if not clips:
        raise PrepareError(f"{root} has no <word>/*.wav clips")
    sizes = dict(zip(clips, headers([root / c for c in clips], args.jobs)))

    rng = random.Random(args.seed)
    splits: Dict[str, List[Row]] = {}
    silence_count: Dict[str, int] = {}
    for split in SPLITS:
        in_split = [c for c in clips if split_of.get(c, "train") == split]
        word_of = {c: c.split("/")[0] for c in in_split}
        if args.protocol == "12":
            wanted = [c for c in in_split if word_of[c] in SC_KEYWORDS]
            unknown = [c for c in in_split if word_of[c] not in SC_KEYWORDS]
            rng.shuffle(unknown)
            unknown = unknown[: int(math.ceil(len(wanted) * args.unknown_percentage / 100))]
            rows = [Row(c, sizes[c], word_of[c], sc_speaker(c)) for c in wanted]
            rows += [Row(c, sizes[c], UNKNOWN, sc_speaker(c)) for c in unknown]
            silence_count[split] = int(math.ceil(len(wanted) * args.silence_percentage / 100))
        else:
            rows = [Row(c, sizes[c], word_of[c], sc_speaker(c)) for c in in_split]
        if not rows:
            raise PrepareError(f"the {split} split of {root} is empty (check validation_list.txt / testing_list.txt)")
        splits[split] = rows
    if test_set is not None:  # its own _unknown_ and _silence_ clips: none drawn or cut here
        splits["test"] = official_test_rows(test_set, root, keywords, args.jobs)
        silence_count["test"] = 0

    silence_dir = dest.resolve() / SILENCE
    silence_files = [silence_dir / split / f"silence_{i:05d}.wav" for split, n in silence_count.items() for i in range(n)]
    check_conflicts(output_files(dest, True, True) + silence_files, args.overwrite)
    for split, count in silence_count.items():
        for path in cut_silence(noise_files, split, count, silence_dir / split, rng):
            splits[split].append(Row(os.path.relpath(path, root), SAMPLE_RATE, SILENCE, NO_LABEL))
    trials = make_trials(splits["test"], args.trials_per_utterance, args.seed)
    write_layout(dest, root, splits, keywords, trials)
    summary(dest, splits, keywords)


# -- VoxCeleb1 ---------------------------------------------------------------------------------------
def vox_speaker(rel: str) -> str:
    return rel.split("/")[0]


def prepare_voxceleb1(args: argparse.Namespace) -> None:
    root = Path(args.root).resolve()
    wav = root / "wav"
    dest = Path(args.dest)
    if not wav.is_dir():
        raise PrepareError(f"{wav} is not a directory: --root must hold VoxCeleb1's wav/<speaker>/<video>/<utt>.wav")
    verification = args.protocol == "verification"
    check_conflicts(output_files(dest, False, verification), args.overwrite)
    utterances = sorted(str(p.relative_to(wav)) for p in wav.glob("*/*/*.wav"))
    if not utterances:
        raise PrepareError(f"{wav} has no <speaker>/<video>/<utt>.wav files")
    known = set(utterances)

    if verification:
        trials_path = Path(args.trials) if args.trials else root / "veri_test2.txt"
        try:
            trials = read_trials(str(trials_path))
        except KwsSvDataError as error:
            raise PrepareError(f"{error} (the official list is veri_test2.txt, or pass --trials)") from None
        problems = [
            f"{trials_path.name}:{t.line}: {side} is not under {wav}"
            for t in trials for side in (t.a, t.b) if side not in known
        ]
        raise_problems(problems, f"trial(s) naming utterances that are not in {wav}")
        test = sorted({p for t in trials for p in (t.a, t.b)})
        test_speakers = {vox_speaker(p) for p in test}
        dev_speakers = sorted({vox_speaker(u) for u in utterances} - test_speakers)
        if args.valid_speakers < 2:  # one speaker gives no non-target trial: no validation EER
            raise PrepareError(f"--valid-speakers {args.valid_speakers}: validating speaker verification needs "
                               f"at least 2 speakers (same- and different-speaker trials)")
        if args.valid_speakers >= len(dev_speakers):
            raise PrepareError(f"--valid-speakers {args.valid_speakers} leaves no training speaker ({len(dev_speakers)} in all)")
        valid_speakers = set(random.Random(args.seed).sample(dev_speakers, args.valid_speakers))
        listed, assignment = set(test), {}
        for u in utterances:
            spk = vox_speaker(u)
            # utterances of test speakers outside the trial list are used nowhere
            assignment[u] = "test" if u in listed else None if spk in test_speakers else "valid" if spk in valid_speakers else "train"
        trial_lines = [f"{t.target} {t.a} {t.b}" for t in trials]
    else:
        iden = Path(args.iden_split) if args.iden_split else root / "iden_split.txt"
        if not iden.is_file():
            raise PrepareError(f"{iden} does not exist: the identification protocol needs VoxCeleb1's iden_split.txt")
        assignment, problems = {}, []
        for number, line in enumerate(iden.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[0] not in ("1", "2", "3"):
                problems.append(f"{iden.name}:{number}: expected '<1|2|3> <path>', got {line!r}")
            elif fields[1] not in known:
                problems.append(f"{iden.name}:{number}: {fields[1]} is not under {wav}")
            else:
                assignment[fields[1]] = SPLITS[int(fields[0]) - 1]
        raise_problems(problems, f"bad line(s) in {iden.name}")
        trial_lines = None

    chosen = sorted(u for u, s in assignment.items() if s is not None)
    sizes = dict(zip(chosen, headers([wav / u for u in chosen], args.jobs)))
    splits = {split: [Row(u, sizes[u], NO_LABEL, vox_speaker(u)) for u in chosen if assignment[u] == split] for split in SPLITS}
    empty = [s for s, rows in splits.items() if not rows]
    if empty:
        raise PrepareError(f"the {', '.join(empty)} split(s) would be empty" + (" (--valid-speakers 0?)" if "valid" in empty else ""))
    write_layout(dest, wav, splits, None, trial_lines)
    summary(dest, splits, None)
    if not verification:
        print("identification protocol: the splits share their speakers; train with task.disjoint_speakers=false")


def summary(dest: Path, splits: Dict[str, List[Row]], keywords: Optional[Sequence[str]]) -> None:
    for split, rows in splits.items():
        speakers = {r.speaker for r in rows if r.speaker != NO_LABEL}
        print(f"{split}: {len(rows)} utterances, {len(speakers)} speakers, {sum(r.samples for r in rows) / SAMPLE_RATE / 3600:.2f} h")
    if keywords is not None:
        print(f"{len(keywords)} keyword classes: {' '.join(keywords)}")
    print(f"wrote {dest}")


# -- keyword-only / speaker-only views of one prepared folder -------------------------------------
VIEWS = ("keywords", "speakers")


def speaker_view_speakers(speakers: Sequence[str]) -> Set[str]:
    """The speakers whose rows go to the speaker view: every other one of the split's labelled
    speakers in sorted order (deterministic, half each; the views share no speaker)."""
    ranked = sorted({s for s in speakers if s != NO_LABEL})
    return set(ranked[1::2])


def row_view(keyword: str, speaker: str, speaker_side: Optional[Set[str]], view: str) -> bool:
    """Whether a row with these labels joins ``view``; ``speaker_side`` None: every row carrying
    the view's label (no split), else the rows are split between the views by speaker."""
    if speaker_side is None:
        return (keyword if view == "keywords" else speaker) != NO_LABEL
    return split_view(keyword, speaker, speaker_side) == view


def split_view(keyword: str, speaker: str, speaker_side: Set[str]) -> Optional[str]:
    """Which of the two disjoint views a row with these labels joins (None: it carries neither)."""
    if keyword == NO_LABEL and speaker == NO_LABEL:
        return None
    if speaker == NO_LABEL:  # e.g. _silence_ clips: only a keyword
        return "keywords"
    if keyword == NO_LABEL:
        return "speakers"
    return "speakers" if speaker in speaker_side else "keywords"


def view_rows(data: Path, split: str, view: str, all_rows: bool = False) -> Tuple[Path, List[Row]]:
    """The audio root and the rows of ``split`` in ``view``, each keeping only that view's label."""
    manifest, paths = split_paths(str(data), split)
    root, manifest_rows = read_manifest(manifest)
    keywords = read_labels(str(data), split, "kw", len(paths), "keyword")
    speakers = read_labels(str(data), split, "spk", len(paths), "speaker")
    side = None if all_rows else speaker_view_speakers(speakers)
    rows = []
    for row, keyword, speaker in zip(manifest_rows, keywords, speakers):
        if not row_view(keyword, speaker, side, view):
            continue
        rows.append(Row(row.path, row.num_samples, keyword if view == "keywords" else NO_LABEL,
                        speaker if view == "speakers" else NO_LABEL))
    return root.resolve(), rows


def view_trials(data: Path, test_rows: Sequence[Row]) -> Optional[List[str]]:
    """``trials.txt`` of the source restricted to trials whose two utterances are in the view."""
    path = data / "trials.txt"
    if not path.is_file():
        return None  # the task then builds trials from the speaker labels
    kept = {r.path for r in test_rows}
    trials = [t for t in read_trials(str(path)) if t.a in kept and t.b in kept]
    targets = sum(t.target for t in trials)
    if targets == 0 or targets == len(trials):
        raise PrepareError(
            f"{path}: only {len(trials)} trial(s) ({targets} same-speaker) have both utterances in the speaker "
            f"view's test split; an EER needs target and non-target trials (more test speakers needed)"
        )
    return [f"{t.target} {t.a} {t.b}" for t in trials]


def prepare_view(args: argparse.Namespace) -> None:
    """A keyword-only or speaker-only view of a folder carrying both labels (e.g. the bundled
    keyword subset), so that two views with disjoint rows stand in for two corpora."""
    data, dest = Path(args.data), Path(args.dest)
    if data.resolve() == dest.resolve():
        raise PrepareError(f"--dest {dest} is --data itself: write the view to another folder")
    check_layout(str(data))  # the source must be a valid folder with both labels
    keywords = read_keywords(str(data / "dict.kw.txt")) if args.view == "keywords" else None
    roots, splits = set(), {}
    for split in SPLITS:
        root, rows = view_rows(data, split, args.view, getattr(args, "all_rows", False))
        if not rows:
            raise PrepareError(f"{data / f'{split}.tsv'}: no row of the {split} split goes to the {args.view} view")
        roots.add(root)
        splits[split] = rows
    if len(roots) > 1:
        raise PrepareError(f"the manifests of {data} have different audio roots ({', '.join(map(str, sorted(roots)))})")
    trials = view_trials(data, splits["test"]) if args.view == "speakers" else None
    check_conflicts(output_files(dest, keywords is not None, trials is not None), args.overwrite)
    write_layout(dest, roots.pop(), splits, keywords, trials)
    summary(dest, splits, keywords)


# -- check -------------------------------------------------------------------------------------------
def check(args: argparse.Namespace) -> None:
    rows = check_layout(
        args.data, kws=not args.no_kws, sv=not args.no_sv, disjoint_speakers=not args.allow_seen_speakers,
        splits=args.splits,
    )
    print(f"{args.data}: OK (" + ", ".join(f"{s} {n} rows" for s, n in rows.items()) + ")")
