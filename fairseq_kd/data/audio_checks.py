"""Checking manifest rows before training: fairseq would misread or crash on them mid-epoch.

Every message names the manifest and line (``train.tsv:7: ...``) and says how to fix it. Problems
with one row's audio (missing, unreadable, wrong sample rate, multi-channel, empty, stale sample
count) can be skipped with ``task.skip_bad_rows=true``; problems with the manifest itself (missing
file, bad audio root on line 1, a line that is not ``path<TAB>num_samples``, no rows) cannot.
"""

import logging
import os
import tempfile
from typing import Optional

import soundfile as sf

from fairseq_kd.data.manifest import ManifestRow, read_manifest, write_manifest

logger = logging.getLogger(__name__)

MANIFEST_TOOL = "fairseq's examples/wav2vec/wav2vec_manifest.py"
SHOWN_SKIPS = 10  # per-row warnings before only the count is logged


class ManifestError(ValueError):
    """A manifest row that fairseq would misread or crash on, found before training."""


def check_row(root: str, row: ManifestRow, sample_rate: int) -> Optional[str]:
    """What is wrong with one manifest row's audio, or None."""
    path = os.path.join(root, row.path)
    if not os.path.exists(path):
        return (
            f"audio file {path} does not exist (row paths are relative to the audio root {root} "
            "on line 1): fix the path or the root"
        )
    if not os.path.isfile(path):
        return f"{path} is not a file: each row must name one audio file"
    if os.path.getsize(path) == 0:
        return f"{path} is an empty file (0 bytes): remove the row or re-create the audio"
    try:
        info = sf.info(path)
    except (RuntimeError, OSError) as error:  # sf.LibsndfileError is a RuntimeError
        return f"{path} is not readable audio ({error}): re-encode it as WAV or FLAC, or remove the row"
    if info.samplerate != sample_rate:
        return (
            f"{path} is {info.samplerate} Hz but task.sample_rate is {sample_rate}: resample it "
            f"(e.g. sox in.flac -r {sample_rate} out.flac) and regenerate the manifest"
        )
    if info.channels != 1:
        return (
            f"{path} has {info.channels} channels; distillation needs mono audio: downmix it "
            "(e.g. sox in.flac out.flac remix -)"
        )
    if info.frames == 0:
        return f"{path} is empty (0 samples): remove the row"
    if info.frames != row.num_samples:
        return (
            f"{path} has {info.frames} samples but the manifest says {row.num_samples}: "
            f"regenerate the manifest (e.g. with {MANIFEST_TOOL})"
        )
    return None


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
    with open(manifest_path) as f:
        first = f.readline().rstrip("\r\n")
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


def validated_manifest(manifest_path: str, sample_rate: int, skip_bad_rows: bool) -> str:
    """Check every row; return the manifest to load (a filtered copy when rows are skipped)."""
    root, rows = _read(manifest_path)
    good, bad = [], []
    for row in rows:
        problem = check_row(str(root), row, sample_rate)
        if problem is None:
            good.append(row)
        elif not skip_bad_rows:
            raise ManifestError(
                f"{manifest_path}:{row.line}: {problem}. Fix the row, or set task.skip_bad_rows=true "
                "to skip bad rows with a warning."
            )
        else:
            bad.append((row, problem))
    if not bad:
        return manifest_path
    for row, problem in bad[:SHOWN_SKIPS]:
        logger.warning(f"skipping {manifest_path}:{row.line}: {problem}")
    if len(bad) > SHOWN_SKIPS:
        logger.warning(f"... and {len(bad) - SHOWN_SKIPS} more bad rows of {manifest_path}")
    logger.warning(f"skipped {len(bad)} of {len(rows)} rows of {manifest_path} (task.skip_bad_rows)")
    if not good:
        raise ManifestError(
            f"{manifest_path}: all {len(rows)} rows are bad (see the warnings above); nothing left "
            "to train on"
        )
    filtered = os.path.join(tempfile.mkdtemp(prefix="fairseq_kd_manifest_"), os.path.basename(manifest_path))
    write_manifest(filtered, str(root.resolve()), [(r.path, r.num_samples) for r in good])
    return filtered
