"""Checking manifest rows before training: fairseq would misread or crash on them mid-epoch."""

import logging
import os
import tempfile
from typing import Optional

import soundfile as sf

from fairseq_kd.data.manifest import ManifestRow, read_manifest, write_manifest

logger = logging.getLogger(__name__)


class ManifestError(ValueError):
    """A manifest row that fairseq would misread or crash on, found before training."""


def check_row(root: str, row: ManifestRow, sample_rate: int) -> Optional[str]:
    """What is wrong with one manifest row's audio, or None."""
    path = os.path.join(root, row.path)
    if not os.path.isfile(path):
        return f"audio file {path} does not exist"
    try:
        info = sf.info(path)
    except (RuntimeError, sf.LibsndfileError) as error:  # type: ignore[attr-defined]
        return f"{path} is not readable audio ({error})"
    if info.samplerate != sample_rate:
        return (
            f"{path} is {info.samplerate} Hz but task.sample_rate is {sample_rate}: resample it "
            f"(e.g. fairseq-kd-prepare, or sox {os.path.basename(path)} -r {sample_rate} ...)"
        )
    if info.channels != 1:
        return f"{path} has {info.channels} channels; distillation needs mono audio (downmix it)"
    if info.frames == 0:
        return f"{path} is empty"
    if info.frames != row.num_samples:
        return (
            f"{path} has {info.frames} samples but the manifest says {row.num_samples}: "
            "regenerate the manifest"
        )
    return None


def validated_manifest(manifest_path: str, sample_rate: int, skip_bad_rows: bool) -> str:
    """Check every row; return the manifest to load (a filtered copy when rows are skipped)."""
    root, rows = read_manifest(manifest_path)
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
    for row, problem in bad[:10]:
        logger.warning(f"skipping {manifest_path}:{row.line}: {problem}")
    logger.warning(f"skipped {len(bad)} of {len(rows)} rows of {manifest_path} (task.skip_bad_rows)")
    if not good:
        raise ManifestError(f"{manifest_path}: every row is bad; nothing left to train on")
    filtered = os.path.join(tempfile.mkdtemp(prefix="fairseq_kd_manifest_"), os.path.basename(manifest_path))
    write_manifest(filtered, str(root.resolve()), [(r.path, r.num_samples) for r in good])
    return filtered
