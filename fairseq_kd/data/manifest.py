"""Reading and writing fairseq audio manifests (``{split}.tsv``).

A manifest's first line is the audio root; every other line is ``relative/path<TAB>num_samples``.
fairseq resolves a relative root against the working directory; we fall back to the manifest's own
folder so that the bundled corpus works from anywhere (the compatibility layer applies the same rule
to fairseq's datasets).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple


@dataclass(frozen=True)
class ManifestRow:
    path: str  # as written in the manifest, relative to the root
    num_samples: int
    line: int  # 1-based line number in the manifest file


def resolve_root(root: str, manifest_path: str | os.PathLike) -> Path:
    """fairseq's rule (relative to the working directory) first, then the manifest's folder."""
    if os.path.isabs(root) or os.path.isdir(root):
        return Path(root)
    return Path(manifest_path).resolve().parent / root


def read_manifest(manifest_path: str | os.PathLike) -> Tuple[Path, List[ManifestRow]]:
    """Return ``(audio_root, rows)``; raises ``ValueError`` naming the file and line of a bad row."""
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        raise FileNotFoundError(f"manifest {manifest_path} does not exist")
    with open(manifest_path) as f:
        lines = f.read().splitlines()
    if not lines:
        raise ValueError(f"{manifest_path}: empty manifest; line 1 must be the audio root directory")
    root = resolve_root(lines[0].strip(), manifest_path)
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip().isdigit():
            raise ValueError(
                f"{manifest_path}:{lineno}: expected 'relative/path<TAB>num_samples', got {line!r}"
            )
        rows.append(ManifestRow(parts[0], int(parts[1]), lineno))
    return root, rows


def write_manifest(
    manifest_path: str | os.PathLike, root: str, rows: Iterable[Tuple[str, int]]
) -> None:
    """Write a manifest; ``root`` is written verbatim (relative roots resolve as in ``resolve_root``)."""
    with open(manifest_path, "w") as f:
        f.write(f"{root}\n")
        for path, num_samples in rows:
            f.write(f"{path}\t{num_samples}\n")


def read_labels(label_path: str | os.PathLike, expected: Sequence[ManifestRow]) -> List[str]:
    """Read a label file with one line per manifest row, checking it is in step with the manifest."""
    with open(label_path) as f:
        labels = f.read().splitlines()
    if len(labels) != len(expected):
        raise ValueError(
            f"{label_path} has {len(labels)} lines but its manifest has {len(expected)} rows; "
            "label files must have exactly one line per manifest row, in the same order"
        )
    return labels


def read_waveform(root: Path, row: ManifestRow, normalize: bool = False):
    """A manifest row's audio as a (S,) float32 tensor; ``normalize``: layer-normalised over the
    utterance, as fairseq's audio datasets do with ``task.normalize``."""
    import soundfile as sf
    import torch

    wav, _ = sf.read(str(root / row.path), dtype="float32", always_2d=False)
    wav = torch.from_numpy(wav)
    return torch.nn.functional.layer_norm(wav, wav.shape) if normalize else wav

