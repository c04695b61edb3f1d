"""Checking manifest rows before training: fairseq would misread or crash on them mid-epoch.

One check for every task that reads manifests (``distill_hubert``, ``kd_audio_finetuning``,
``kws_sv``): :func:`checked_split` (the tasks' ``load_dataset``) and :func:`validated_manifest`.
Every message names the manifest and line (``train.tsv:7: ...``) and says how to fix it.

* The manifest itself (cannot be skipped): missing file, a UTF-8 byte-order mark, Windows (CRLF)
  line endings, an empty line, line 1 not an existing audio root, a line that is not
  ``path<TAB>num_samples``, no rows; label files (``.ltr``, ``.kw``, ``.spk``) out of step.
* One row's audio (skipped and counted with ``task.skip_bad_rows=true``): missing, a directory,
  unreadable, empty, wrong sample rate, multi-channel, a stale sample count, and with
  ``task.audio_check=decode`` (the default) audio that does not decode to its end (a truncated
  FLAC whose header is intact) or holds NaN / Inf samples.

Decoding runs in a thread pool (libsndfile and numpy release the GIL) with a tqdm progress bar, and
its results are cached in ``$FAIRSEQ_KD_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fairseq_kd``, i.e.
``~/.cache/fairseq_kd``) in ``audio_checks.sqlite``, keyed on the file's real path, size and
mtime: a second run over the same files decodes nothing. ``task.audio_check=header`` reads headers
only (the fast option: it misses truncated and non-finite audio).
"""

import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from fairseq_kd.data.manifest import ManifestRow, read_manifest, write_manifest

logger = logging.getLogger(__name__)

MANIFEST_TOOL = "fairseq's examples/wav2vec/wav2vec_manifest.py"
SHOWN_SKIPS = 10  # per-row warnings before only the count is logged


class ManifestError(ValueError):
    """A manifest row that fairseq would misread or crash on, found before training."""


AUDIO_CHECK_CHOICES = ChoiceEnum(["decode", "header"])
ENV_CACHE_DIR = "FAIRSEQ_KD_CACHE_DIR"
CACHE_FILE = "audio_checks.sqlite"
DECODE_BLOCK = 1 << 16  # frames per read while decoding


@dataclass
class ManifestCheckConfig(FairseqDataclass):
    """The manifest-check keys every task that reads manifests has (``task.validate_audio``, ...)."""

    validate_audio: bool = field(
        default=True,
        metadata={
            "help": "before training, check the manifest and every row's audio (missing files, wrong "
            "sample rate, multi-channel or empty audio, stale sample counts; with audio_check=decode "
            "also undecodable / truncated and NaN / Inf audio); errors name file:line"
        },
    )
    audio_check: AUDIO_CHECK_CHOICES = field(
        default="decode",
        metadata={
            "help": "decode: decode every row once (parallel, cached by path, size and mtime in "
            "$FAIRSEQ_KD_CACHE_DIR or ~/.cache/fairseq_kd); header: read headers only (fast, misses "
            "truncated and non-finite audio)"
        },
    )
    audio_check_workers: int = field(
        default=0, metadata={"help": "threads decoding audio for the check; 0 = min(8, CPU count)"}
    )
    skip_bad_rows: bool = field(
        default=False,
        metadata={"help": "skip (and count) rows with bad audio instead of stopping with an error"},
    )


# -- what one file holds: header facts and (optionally) a full decode, cached ---------------------
@dataclass
class AudioFacts:
    samplerate: int = 0
    channels: int = 0
    frames: int = 0  # what the header says
    unreadable: Optional[str] = None  # sf.info's error
    decoded: Optional[int] = None  # frames actually decoded (None: not decoded)
    decode_error: Optional[str] = None
    nonfinite: int = 0  # NaN / Inf samples
    first_nonfinite: int = -1  # frame index of the first one


def header_facts(path: str) -> AudioFacts:
    try:
        info = sf.info(path)
    except (RuntimeError, OSError) as error:  # sf.LibsndfileError is a RuntimeError
        return AudioFacts(unreadable=str(error))
    return AudioFacts(samplerate=info.samplerate, channels=info.channels, frames=info.frames)


def decode_facts(path: str) -> AudioFacts:
    """Header facts plus one full decode: how many frames decode, and how many are not finite."""
    facts = header_facts(path)
    if facts.unreadable is not None:
        return facts
    decoded = 0
    try:
        with sf.SoundFile(path) as audio:
            for block in audio.blocks(blocksize=DECODE_BLOCK, dtype="float32", always_2d=True):
                finite = np.isfinite(block)
                if not finite.all():
                    bad = np.nonzero(~finite.all(axis=1))[0]
                    if facts.first_nonfinite < 0:
                        facts.first_nonfinite = decoded + int(bad[0])
                    facts.nonfinite += int((~finite).sum())
                decoded += len(block)
    except (RuntimeError, OSError, ValueError) as error:
        facts.decode_error = str(error)
    facts.decoded = decoded
    return facts


def cache_path() -> str:
    root = os.environ.get(ENV_CACHE_DIR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fairseq_kd"
    )
    return os.path.join(root, CACHE_FILE)


class FactsCache:
    """sqlite table ``(path, size, mtime_ns) -> facts``; unusable caches are skipped with a warning."""

    def __init__(self, path: Optional[str] = None):
        self.path = path or cache_path()
        self.db = None
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=60)
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS facts (path TEXT, size INTEGER, mtime_ns INTEGER, "
                "facts TEXT, PRIMARY KEY (path, size, mtime_ns))"
            )
        except (OSError, sqlite3.Error) as error:
            logger.warning(f"audio check cache {self.path} unusable ({error}): decoding without a cache")
            self.db = None

    @staticmethod
    def key(path: str) -> Optional[Tuple[str, int, int]]:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return os.path.realpath(path), st.st_size, st.st_mtime_ns

    def get(self, keys: Sequence[Tuple[str, int, int]]) -> Dict[Tuple[str, int, int], AudioFacts]:
        if self.db is None or not keys:
            return {}
        found = {}
        try:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                paths = list({k[0] for k in chunk})
                marks = ",".join("?" * len(paths))
                for path, size, mtime, text in self.db.execute(
                    f"SELECT path, size, mtime_ns, facts FROM facts WHERE path IN ({marks})", paths
                ):
                    found[(path, size, mtime)] = AudioFacts(**json.loads(text))
        except sqlite3.Error as error:
            logger.warning(f"audio check cache {self.path} unreadable ({error}): ignoring it")
            return {}
        return {k: found[k] for k in keys if k in found}

    def put(self, items: Dict[Tuple[str, int, int], AudioFacts]) -> None:
        if self.db is None or not items:
            return
        try:
            with self.db:
                self.db.executemany(
                    "INSERT OR REPLACE INTO facts VALUES (?, ?, ?, ?)",
                    [(*k, json.dumps(facts.__dict__)) for k, facts in items.items()],
                )
        except sqlite3.Error as error:
            logger.warning(f"audio check cache {self.path} not written ({error})")

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


def gather_facts(paths: Sequence[str], decode: bool, workers: int = 0, label: str = "") -> Dict[str, AudioFacts]:
    """Facts of every file (header only, or decoded); cached results are reused."""
    from tqdm import tqdm

    cache = FactsCache()
    keys = {p: FactsCache.key(p) for p in paths}
    cached = cache.get([k for k in keys.values() if k is not None])
    facts: Dict[str, AudioFacts] = {}
    todo = []
    for path, key in keys.items():
        hit = cached.get(key) if key is not None else None
        if hit is not None and (hit.decoded is not None or hit.unreadable is not None or not decode):
            facts[path] = hit
        else:
            todo.append(path)
    if todo:
        started = time.perf_counter()
        work = decode_facts if decode else header_facts
        workers = workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(work, todo, chunksize=16)
            bar = tqdm(results, total=len(todo), desc=f"{'decoding' if decode else 'reading headers of'} {label}",
                       unit="file", disable=None, leave=False)
            new = dict(zip(todo, bar))
        facts.update(new)
        cache.put({keys[p]: f for p, f in new.items() if keys[p] is not None})
        logger.info(
            f"audio check of {label}: {'decoded' if decode else 'read the headers of'} {len(todo)} files "
            f"in {time.perf_counter() - started:.1f} s ({workers} threads), {len(paths) - len(todo)} "
            f"from the cache {cache.path}"
        )
    cache.close()
    return facts


def file_problem(path: str, root: str) -> Optional[str]:
    """What is wrong with the file itself (before reading it as audio), or None."""
    if not os.path.exists(path):
        return (
            f"audio file {path} does not exist (row paths are relative to the audio root {root} "
            "on line 1): fix the path or the root"
        )
    if not os.path.isfile(path):
        return f"{path} is not a file: each row must name one audio file"
    if os.path.getsize(path) == 0:
        return f"{path} is an empty file (0 bytes): remove the row or re-create the audio"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable (permission denied): fix its permissions (chmod a+r)"
    return None


def facts_problem(path: str, row: ManifestRow, sample_rate: int, facts: AudioFacts) -> Optional[str]:
    """What is wrong with one row's audio given its facts, or None."""
    if facts.unreadable is not None:
        return f"{path} is not readable audio ({facts.unreadable}): re-encode it as WAV or FLAC, or remove the row"
    if facts.samplerate != sample_rate:
        return (
            f"{path} is {facts.samplerate} Hz but task.sample_rate is {sample_rate}: resample it "
            f"(e.g. sox in.flac -r {sample_rate} out.flac) and regenerate the manifest"
        )
    if facts.channels != 1:
        return (
            f"{path} has {facts.channels} channels; the models need mono audio: downmix it "
            "(e.g. sox in.flac out.flac remix -)"
        )
    if facts.frames == 0:
        return f"{path} is empty (0 samples): remove the row"
    if facts.frames != row.num_samples:
        return (
            f"{path} has {facts.frames} samples but the manifest says {row.num_samples}: "
            f"regenerate the manifest (e.g. with {MANIFEST_TOOL})"
        )
    if facts.decoded is not None and (facts.decode_error is not None or facts.decoded != facts.frames):
        why = f" ({facts.decode_error})" if facts.decode_error else ""
        return (
            f"{path} does not decode: its header says {facts.frames} samples but decoding stopped after "
            f"{facts.decoded}{why}; the file is truncated or damaged: re-create or re-copy it, or remove the row"
        )
    if facts.nonfinite:
        return (
            f"{path} holds {facts.nonfinite} NaN / Inf samples (the first at sample {facts.first_nonfinite}, "
            f"{facts.first_nonfinite / max(facts.samplerate, 1):.2f} s), which would make the losses and "
            "gradients NaN: re-create the audio, or remove the row"
        )
    return None


def check_row(root: str, row: ManifestRow, sample_rate: int, decode: bool = False) -> Optional[str]:
    """What is wrong with one manifest row's audio, or None (no cache; see :func:`check_rows`)."""
    path = os.path.join(root, row.path)
    problem = file_problem(path, root)
    if problem is not None:
        return problem
    return facts_problem(path, row, sample_rate, decode_facts(path) if decode else header_facts(path))


def check_rows(root: str, rows: Sequence[ManifestRow], sample_rate: int, decode: bool, workers: int = 0,
               label: str = "") -> List[Optional[str]]:
    """:func:`check_row` for every row, the audio read in parallel and cached."""
    paths = [os.path.join(root, row.path) for row in rows]
    problems = [file_problem(path, root) for path in paths]
    readable = sorted({p for p, problem in zip(paths, problems) if problem is None})
    facts = gather_facts(readable, decode, workers, label)
    return [
        problem if problem is not None else facts_problem(path, row, sample_rate, facts[path])
        for path, row, problem in zip(paths, rows, problems)
    ]


def _read(manifest_path: str):
    """``read_manifest`` with the whole-manifest problems turned into ``ManifestError``s."""
    name = os.path.basename(manifest_path)
    try:
        root, rows = read_manifest(manifest_path)
    except FileNotFoundError:
        raise ManifestError(
            f"manifest {manifest_path} does not exist: task.data must be the folder holding {name} "
            f"(line 1: the audio root, then one 'relative/path<TAB>num_samples' row per file, as "
            f"{MANIFEST_TOOL} writes it)"
        ) from None
    except ValueError as error:  # a line that is not path<TAB>num_samples, or an empty file
        raise ManifestError(
            f"{error}. Fix the manifest or regenerate it (e.g. with {MANIFEST_TOOL}); "
            "task.skip_bad_rows skips rows with bad audio, not malformed lines"
        ) from None
    check_text_file(manifest_path, "the audio root")
    with open(manifest_path) as f:
        text = f.read()
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last row
    first = lines[0] if lines else ""
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            raise ManifestError(
                f"{manifest_path}:{number}: empty line; fairseq's loader stops on it (and label files "
                "are matched to rows by line number): delete it"
            )
    if "\t" in first:
        raise ManifestError(
            f"{manifest_path}:1: line 1 must be the audio root directory, but it looks like a row "
            f"({first!r}): add the folder the row paths are relative to as the first line"
        )
    if not root.is_dir():
        raise ManifestError(
            f"{manifest_path}:1: the audio root {first.strip()!r} ({root}) is not a directory: line 1 "
            "must be the folder the row paths are relative to (absolute, or relative to the working "
            "directory or to the manifest's folder)"
        )
    if not rows:
        raise ManifestError(
            f"{manifest_path} has no rows (only the audio root on line 1): nothing to train on; "
            f"regenerate it (e.g. with {MANIFEST_TOOL})"
        )
    return root, rows


def check_text_file(path: str, first_line: str) -> None:
    """A UTF-8 byte-order mark or Windows line endings, which fairseq reads as part of the text."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        raise ManifestError(
            f"{path}:1: the file starts with a UTF-8 byte-order mark (BOM, bytes EF BB BF), which "
            f"fairseq reads as part of {first_line}: save it as UTF-8 without BOM "
            f"(e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' {path})"
        )
    if b"\r" in raw:
        line = raw[: raw.index(b"\r")].count(b"\n") + 1
        raise ManifestError(
            f"{path}:{line}: Windows line ending (CR LF): fairseq keeps the CR as part of the "
            f"line; convert the file (e.g. sed -i 's/\\r$//' {path}, or dos2unix)"
        )


def check_manifest(
    manifest_path: str, sample_rate: int, skip_bad_rows: bool, decode: bool = True, workers: int = 0
) -> Tuple[str, List[ManifestRow], List[int]]:
    """Check the manifest and every row; returns ``(root, rows, indices of the rows to keep)``.

    Raises :class:`ManifestError` (``file:line``, the reason, the fix) for a bad manifest, or for
    the first bad row unless ``skip_bad_rows`` (then bad rows are logged and counted)."""
    root, rows = _read(manifest_path)
    problems = check_rows(str(root), rows, sample_rate, decode, workers, os.path.basename(manifest_path))
    bad = [(row, problem) for row, problem in zip(rows, problems) if problem is not None]
    if bad and not skip_bad_rows:
        row, problem = bad[0]
        more = f" ({len(bad) - 1} more bad rows follow)" if len(bad) > 1 else ""
        raise ManifestError(
            f"{manifest_path}:{row.line}: {problem}{more}. Fix the row, or set task.skip_bad_rows=true "
            "to skip bad rows with a warning."
        )
    keep = [i for i, problem in enumerate(problems) if problem is None]
    if not bad:
        return str(root), rows, keep
    for row, problem in bad[:SHOWN_SKIPS]:
        logger.warning(f"skipping {manifest_path}:{row.line}: {problem}")
    if len(bad) > SHOWN_SKIPS:
        logger.warning(f"... and {len(bad) - SHOWN_SKIPS} more bad rows of {manifest_path}")
    logger.warning(f"skipped {len(bad)} of {len(rows)} rows of {manifest_path} (task.skip_bad_rows)")
    if not keep:
        raise ManifestError(
            f"{manifest_path}: all {len(rows)} rows are bad (see the warnings above); nothing left "
            "to train on"
        )
    return str(root), rows, keep


def validated_manifest(
    manifest_path: str, sample_rate: int, skip_bad_rows: bool, decode: bool = True, workers: int = 0
) -> str:
    """Check every row; return the manifest to load (a filtered copy when rows are skipped)."""
    root, rows, keep = check_manifest(manifest_path, sample_rate, skip_bad_rows, decode, workers)
    if len(keep) == len(rows):
        return manifest_path
    filtered = os.path.join(tempfile.mkdtemp(prefix="fairseq_kd_manifest_"), os.path.basename(manifest_path))
    write_manifest(filtered, os.path.abspath(root), [(rows[i].path, rows[i].num_samples) for i in keep])
    return filtered


@contextmanager
def checked_split(data: str, split: str, cfg, label_exts: Sequence[str] = ()) -> Iterator[str]:
    """The folder to load ``split`` from, after the manifest check of ``cfg`` (a task config with
    :class:`ManifestCheckConfig`'s keys and ``sample_rate``): ``data`` itself, or, when bad rows are
    skipped, a temporary folder with the filtered ``{split}.tsv`` and the matching lines of each
    ``{split}.{ext}`` label file (labels are matched to rows by line number). The task points
    fairseq's loader at it while loading; the folder is removed afterwards."""
    manifest = os.path.join(data, f"{split}.tsv")
    if not getattr(cfg, "validate_audio", True) or getattr(cfg, "binarized_dataset", False):
        yield data
        return
    # getattr with defaults: a task config saved by an older version lacks the newer keys
    root, rows, keep = check_manifest(
        manifest, int(getattr(cfg, "sample_rate", 16000)), bool(getattr(cfg, "skip_bad_rows", False)),
        str(getattr(cfg, "audio_check", "decode")) == "decode", int(getattr(cfg, "audio_check_workers", 0) or 0),
    )
    if len(keep) == len(rows):
        yield data  # the tasks' own label checks name out-of-step label lines
        return
    labels = {}
    for ext in label_exts:
        path = os.path.join(data, f"{split}.{ext}")
        if not os.path.isfile(path):
            continue  # the task's own check names the missing label file
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) != len(rows):
            raise ManifestError(
                f"{path} has {len(lines)} lines but {manifest} has {len(rows)} rows: labels are matched "
                f"to audio by line number, so one of them is stale or truncated; regenerate the labels "
                f"from this manifest"
            )
        labels[ext] = lines
    folder = tempfile.mkdtemp(prefix="fairseq_kd_split_")
    try:
        write_manifest(os.path.join(folder, f"{split}.tsv"), os.path.abspath(root),
                       [(rows[i].path, rows[i].num_samples) for i in keep])
        for ext, lines in labels.items():
            with open(os.path.join(folder, f"{split}.{ext}"), "w", encoding="utf-8") as f:
                f.write("".join(lines[i] + "\n" for i in keep))
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- dataset.max_tokens ---------------------------------------------------------------------------
def effective_sizes(dataset) -> Optional[np.ndarray]:
    """Samples per utterance as fairseq's batching counts them (crops of unpadded batches)."""
    inner = dataset
    for _ in range(8):
        if hasattr(inner, "max_sample_size") and hasattr(inner, "sizes"):
            break
        inner = getattr(inner, "dataset", None)
        if inner is None:
            return None
    else:
        return None
    sizes = np.asarray(inner.sizes, dtype=np.int64)
    if not getattr(inner, "pad", False) and getattr(inner, "max_sample_size", None):
        sizes = np.minimum(sizes, int(inner.max_sample_size))
    return sizes


def check_max_tokens(dataset, max_tokens: Optional[int], sample_rate: int = 16000) -> None:
    """``dataset.max_tokens`` below the shortest utterance leaves no batch (fairseq: "The dataset is empty")."""
    if not max_tokens or dataset is None:
        return
    sizes = effective_sizes(dataset)
    if sizes is None or sizes.size == 0:
        return
    shortest = int(sizes.min())
    if shortest > int(max_tokens):
        raise ManifestError(
            f"dataset.max_tokens={max_tokens} is below the shortest utterance of the split "
            f"({shortest} samples = {shortest / sample_rate:.2f} s as batched), so no batch can be "
            f"formed (fairseq would stop with 'The dataset is empty'): set dataset.max_tokens={shortest} "
            f"or more (the presets use 1000000-1400000, i.e. 60-90 s of audio per GPU)"
        )
