"""First-iteration HuBERT targets: MFCC features clustered with k-means.

This reproduces fairseq's ``examples/hubert/simple_kmeans`` recipe (``dump_mfcc_feature.py``,
``learn_kmeans.py``, ``dump_km_label.py``) in one command, without sharded feature dumps::

    fairseq-kd-mfcc-kmeans --manifest-dir manifests --splits train valid \\
        --n-clusters 100 --out-dir labels/

It writes, in the formats fairseq's ``hubert_pretraining`` task reads (``task.labels=[km]``):

* ``{out_dir}/{split}.km``: one line per manifest row, space-separated integer cluster ids, one per
  frame (100 Hz, or 50 Hz with ``--label-rate 50``);
* ``{out_dir}/dict.km.txt``: ``<k> 1`` for every cluster id ``k``;
* ``{out_dir}/kmeans.joblib``: the fitted ``MiniBatchKMeans``, so that more splits can be labelled
  later with ``--kmeans {out_dir}/kmeans.joblib``.

Features are 13 MFCCs + deltas + delta-deltas (39 dims) over 25 ms windows. Frames are taken without
padding (Kaldi's ``snip_edges``), so an utterance of ``N`` samples gets exactly
``1 + (N - 400) // hop`` labels: the frame count of HuBERT's convolutional feature extractor at
50 Hz (hop 320) and what ``HubertDataset`` expects at 100 Hz (hop 160).

Audio is read with ``soundfile`` like ``HubertDataset`` does: files must already be at the expected
sample rate (no resampling; they are refused otherwise), multi-channel audio is averaged to mono
(as ``HubertDataset.postprocess`` does), and the file's length must equal the manifest's
``num_samples`` (a stale manifest would make the labels disagree with what fairseq checks).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from fairseq_kd.data.manifest import ManifestRow, read_manifest

if TYPE_CHECKING:  # sklearn is imported lazily: the module stays importable without it
    from sklearn.cluster import MiniBatchKMeans

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
WIN_LENGTH = 400  # 25 ms at 16 kHz; also the receptive field of HuBERT's conv feature extractor
HOP_BY_LABEL_RATE = {100: 160, 50: 320}  # 10 ms / 20 ms at 16 kHz
N_MFCC = 13
N_MELS = 23  # Kaldi/torchaudio default number of mel bins
LOW_FREQ = 20.0  # Kaldi default
PREEMPH = 0.97  # Kaldi default
CEPSTRAL_LIFTER = 22.0  # Kaldi default
DELTA_WIDTH = 5  # torchaudio.functional.compute_deltas default (win_length=5)
LOG_FLOOR = float(np.finfo(np.float32).eps)  # torchaudio's kaldi epsilon

# fairseq simple_kmeans/learn_kmeans.py defaults
KMEANS_DEFAULTS = dict(
    init="k-means++",
    max_iter=100,
    batch_size=10000,
    tol=0.0,
    max_no_improvement=100,
    n_init=20,
    reassignment_ratio=0.0,
)

DICT_NAME = "dict.km.txt"
MODEL_NAME = "kmeans.joblib"


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------


def num_frames(num_samples: int, hop: int = HOP_BY_LABEL_RATE[100], win: int = WIN_LENGTH) -> int:
    """Frames (= labels) for an utterance, without edge padding; 0 if shorter than a window."""
    if num_samples < win:
        return 0
    return 1 + (num_samples - win) // hop


def _povey_window(win: int) -> np.ndarray:
    # Kaldi's default window (a Hann window raised to 0.85), which torchaudio's kaldi.mfcc uses.
    return np.power(np.hanning(win), 0.85)


def _kaldi_lifter(n_mfcc: int, lifter: float) -> np.ndarray:
    # Kaldi lifts coefficient i by 1 + Q/2 sin(pi i / Q); librosa's ``lifter`` uses i + 1, so we
    # apply Kaldi's to stay closer to the torchaudio features fairseq's recipe clustered.
    i = np.arange(n_mfcc)
    return 1.0 + 0.5 * lifter * np.sin(np.pi * i / lifter)


def mfcc_features(
    wav: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    hop: int = HOP_BY_LABEL_RATE[100],
    win: int = WIN_LENGTH,
) -> np.ndarray:
    """13 MFCCs + deltas + delta-deltas, shape ``(num_frames(len(wav), hop, win), 39)``, float32.

    fairseq's recipe uses ``torchaudio.compliance.kaldi.mfcc`` (use_energy=False) and
    ``torchaudio.functional.compute_deltas``. We use librosa instead because torchaudio does not
    load against the CPU torch build in this environment and is in maintenance mode. The settings
    follow Kaldi's defaults (pre-emphasis 0.97, Povey window, 512-point FFT, 23 HTK mel bins from
    20 Hz to Nyquist, natural-log energies, orthonormal DCT-II, lifter 22, no dither); remaining
    differences (pre-emphasis and DC removal over the utterance rather than per frame, mel
    triangles in Hz rather than mel) are small: on test signals every coefficient correlates
    > 0.997 with torchaudio's, with ~1-2% mean relative error. Deltas use the same 5-frame
    regression with edge replication as torchaudio.

    ``win`` and ``hop`` are in samples and HuBERT's values assume 16 kHz audio.
    """
    import librosa  # imported lazily: it is slow to import and only this tool needs it

    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"expected mono audio of shape (num_samples,), got {wav.shape}")
    n_frames = num_frames(len(wav), hop, win)
    if n_frames == 0:
        return np.zeros((0, 3 * N_MFCC), dtype=np.float32)

    # Kaldi removes the DC offset and pre-emphasises each frame; over the whole utterance is close.
    wav = librosa.effects.preemphasis(wav - wav.mean(), coef=PREEMPH)
    # librosa centres the win-sample window in each n_fft-sample frame; padding (n_fft - win) / 2
    # zeros on both sides makes frame t window exactly samples [t * hop, t * hop + win), as Kaldi
    # does, and gives 1 + (N - win) // hop frames.
    n_fft = 1 << (win - 1).bit_length()  # Kaldi rounds the window up to a power of two: 512
    pad = (n_fft - win) // 2
    wav = np.pad(wav, (pad, n_fft - win - pad))
    mel = librosa.feature.melspectrogram(
        y=wav,
        sr=sample_rate,
        n_fft=n_fft,
        hop_length=hop,
        win_length=win,
        window=_povey_window(win),
        center=False,  # no padding: frame count must be 1 + (N - win) // hop
        power=2.0,
        n_mels=N_MELS,
        fmin=LOW_FREQ,
        fmax=sample_rate / 2,
        htk=True,
        norm=None,
    )
    log_mel = np.log(np.maximum(mel, LOG_FLOOR))  # Kaldi's natural log, not librosa's clipped dB
    mfcc = librosa.feature.mfcc(S=log_mel, n_mfcc=N_MFCC, dct_type=2, norm="ortho", lifter=0)
    mfcc = mfcc * _kaldi_lifter(N_MFCC, CEPSTRAL_LIFTER)[:, None]
    # mode="nearest" is torchaudio's replicate padding (and, unlike "interp", works for T < 5).
    delta = librosa.feature.delta(mfcc, width=DELTA_WIDTH, order=1, mode="nearest")
    ddelta = librosa.feature.delta(delta, width=DELTA_WIDTH, order=1, mode="nearest")
    feats = np.concatenate([mfcc, delta, ddelta], axis=0).T.astype(np.float32)
    assert feats.shape[0] == n_frames, (feats.shape, n_frames)
    return np.ascontiguousarray(feats)


# ---------------------------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------------------------


def _where(manifest_path: Path, row: ManifestRow) -> str:
    return f"{manifest_path}:{row.line} ({row.path})"


def _check_audio(where: str, sr: int, length: int, row: ManifestRow, sample_rate: int) -> None:
    if sr != sample_rate:
        raise ValueError(
            f"{where}: audio is at {sr} Hz, expected {sample_rate} Hz; resample it first "
            "(fairseq's HubertDataset refuses other rates too)"
        )
    if length != row.num_samples:
        raise ValueError(
            f"{where}: file has {length} samples but the manifest says {row.num_samples}; "
            "regenerate the manifest"
        )
    if num_frames(length) == 0:
        raise ValueError(
            f"{where}: {length} samples is shorter than one {WIN_LENGTH}-sample window, "
            "so it would get no labels; remove it from the manifest"
        )


def read_audio(path: Path, row: ManifestRow, manifest_path: Path, sample_rate: int) -> np.ndarray:
    """Read one manifest row's audio as mono float32, refusing what fairseq would not train on."""
    import soundfile as sf

    where = _where(manifest_path, row)
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types; name the row either way
        raise ValueError(f"{where}: cannot read audio file {path}: {e}") from e
    _check_audio(where, sr, wav.shape[0], row, sample_rate)
    # multi-channel audio is averaged to mono, as HubertDataset.postprocess does
    return wav.mean(axis=1)


@dataclass
class Split:
    name: str
    manifest_path: Path
    root: Path
    rows: List[ManifestRow]


def load_split(manifest_dir: Path, name: str) -> Split:
    manifest_path = Path(manifest_dir) / f"{name}.tsv"
    root, rows = read_manifest(manifest_path)
    if not rows:
        raise ValueError(f"{manifest_path}: manifest has no audio rows")
    return Split(name, manifest_path, root, rows)


def check_split_audio(split: Split, sample_rate: int) -> None:
    """Check every file's header (rate, length) up front, so a bad row fails before the fit."""
    import soundfile as sf
    from tqdm import tqdm

    for row in tqdm(split.rows, desc=f"check {split.name}", unit="utt", dynamic_ncols=True):
        where = _where(split.manifest_path, row)
        try:
            info = sf.info(str(split.root / row.path))
        except Exception as e:  # soundfile raises several types; name the row either way
            raise ValueError(f"{where}: cannot read audio file {split.root / row.path}: {e}") from e
        _check_audio(where, info.samplerate, info.frames, row, sample_rate)


def warm_up(sample_rate: int, hop: int) -> None:
    """librosa's first call pays for its imports and numba compilation (seconds; over a minute on a
    loaded 2-core machine): done on a short silence before the progress bar starts, so that the
    bar's estimate is about the utterances alone."""
    mfcc_features(np.zeros(sample_rate // 4, dtype=np.float32), sample_rate=sample_rate, hop=hop)


def iter_features(
    split: Split,
    hop: int,
    sample_rate: int,
    indices: Optional[Sequence[int]] = None,
    desc: str = "",
) -> Iterator[Tuple[ManifestRow, np.ndarray]]:
    """Yield ``(row, features)`` for the split's rows (or the given row indices), in order."""
    from tqdm import tqdm

    indices = range(len(split.rows)) if indices is None else indices
    warm_up(sample_rate, hop)
    for i in tqdm(indices, desc=desc or split.name, unit="utt", dynamic_ncols=True):
        row = split.rows[i]
        wav = read_audio(split.root / row.path, row, split.manifest_path, sample_rate)
        yield row, mfcc_features(wav, sample_rate=sample_rate, hop=hop)


# ---------------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------------


def sample_rows(num_rows: int, percent: float, seed: int) -> np.ndarray:
    """Indices of a seeded random ``percent`` of the rows (all of them for 1.0), sorted."""
    if not 0.0 < percent <= 1.0:
        raise ValueError(f"--percent must be in (0, 1], got {percent}")
    if percent == 1.0:
        return np.arange(num_rows)
    n = max(1, int(np.ceil(num_rows * percent)))  # as fairseq: ceil of the utterance fraction
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_rows, size=n, replace=False))


def fit_kmeans(feats: np.ndarray, n_clusters: int, seed: int, **kwargs) -> "MiniBatchKMeans":
    """Fit ``MiniBatchKMeans`` with fairseq simple_kmeans' settings (overridable by ``kwargs``)."""
    from sklearn.cluster import MiniBatchKMeans

    if feats.shape[0] < n_clusters:
        raise ValueError(
            f"only {feats.shape[0]} feature frames to fit {n_clusters} clusters; "
            "use more audio (or a larger --percent) or fewer clusters"
        )
    params = {**KMEANS_DEFAULTS, **kwargs}
    km = MiniBatchKMeans(
        n_clusters=n_clusters,
        compute_labels=False,
        init_size=None,
        random_state=seed,
        verbose=0,
        **params,
    )
    km.fit(feats)
    return km


def predict_labels(km: "MiniBatchKMeans", feats: np.ndarray) -> np.ndarray:
    """Cluster id of every frame."""
    return km.predict(feats.astype(km.cluster_centers_.dtype, copy=False))


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------


def dict_text(n_clusters: int) -> str:
    """fairseq's dictionary format; counts are unused by hubert_pretraining, so 1 is fine."""
    return "".join(f"{k} 1\n" for k in range(n_clusters))


def check_writable(paths: Sequence[Path], overwrite: bool) -> None:
    """Refuse up front (before any work) to overwrite existing outputs without ``--overwrite``."""
    for path in paths:
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")


def write_atomic(path: Path, text: str) -> None:
    # write then rename, so an interrupted run never leaves a truncated label file behind
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_dict(path: Path, n_clusters: int, overwrite: bool) -> None:
    """Write ``dict.km.txt``; an existing identical one is kept, a different one is refused."""
    text = dict_text(n_clusters)
    if path.exists() and not overwrite:
        if path.read_text() == text:
            return
        raise FileExistsError(
            f"{path} exists and does not match {n_clusters} clusters; "
            "pass --overwrite to replace it"
        )
    write_atomic(path, text)
    logger.info("wrote %s", path)


def label_split(
    split: Split, km: "MiniBatchKMeans", hop: int, sample_rate: int, out_path: Path
) -> int:
    """Write ``{split}.km``; returns the number of frames labelled."""
    tmp = out_path.with_name(out_path.name + ".tmp")
    total = 0
    with open(tmp, "w") as f:
        for _, feats in iter_features(split, hop, sample_rate, desc=f"label {split.name}"):
            labels = predict_labels(km, feats)
            f.write(" ".join(map(str, labels.tolist())) + "\n")
            total += len(labels)
    os.replace(tmp, out_path)
    return total


# ---------------------------------------------------------------------------------------------
# The whole recipe (the command line is fairseq_kd/cli/mfcc_kmeans.py)
# ---------------------------------------------------------------------------------------------


def fit_on_split(
    manifest_dir: Path, fit_split: str, n_clusters: int, percent: float, seed: int, hop: int,
    **kmeans_kwargs,
) -> "MiniBatchKMeans":
    """Fit k-means on the MFCC features of ``percent`` of the utterances of ``fit_split``."""
    split = load_split(manifest_dir, fit_split)
    indices = sample_rows(len(split.rows), percent, seed)
    logger.info(
        "fitting on %d of %d utterances of %s (percent=%g, seed=%d)",
        len(indices), len(split.rows), split.manifest_path, percent, seed,
    )
    feats = np.concatenate(
        [f for _, f in iter_features(split, hop, SAMPLE_RATE, indices, f"mfcc {split.name}")]
    )
    logger.info("fitting MiniBatchKMeans(n_clusters=%d) on %s features", n_clusters, feats.shape)
    km = fit_kmeans(feats, n_clusters, seed, **kmeans_kwargs)
    logger.info("mean inertia per frame: %.5f", -km.score(feats) / len(feats))
    return km


def make_labels(
    manifest_dir: Path,
    splits: Sequence[str],
    out_dir: Path,
    n_clusters: Optional[int] = None,
    kmeans: Optional[Path] = None,
    fit_split: str = "train",
    label_rate: int = 100,
    percent: float = 1.0,
    seed: int = 0,
    overwrite: bool = False,
    **kmeans_kwargs,
) -> None:
    """Write ``{split}.km`` for ``splits``, ``dict.km.txt`` and (when fitting) ``kmeans.joblib``.

    Fits k-means on ``fit_split`` unless ``kmeans`` names a fitted ``kmeans.joblib``;
    ``kmeans_kwargs`` are ``MiniBatchKMeans`` settings (see ``KMEANS_DEFAULTS``). Raises
    ``FileExistsError`` / ``FileNotFoundError`` / ``ValueError`` for what the user can fix.
    """
    import joblib

    hop = HOP_BY_LABEL_RATE[label_rate]
    label_paths = [out_dir / f"{s}.km" for s in splits]
    dict_path, model_path = out_dir / DICT_NAME, out_dir / MODEL_NAME
    # when labelling with an existing model, only the label files (and a missing dict) are new
    outputs = label_paths if kmeans else label_paths + [dict_path, model_path]
    check_writable(outputs, overwrite)
    # validate every manifest and audio header before the (slow) fit, so a bad row fails fast
    loaded = [load_split(manifest_dir, s) for s in splits]
    for split in loaded:
        check_split_audio(split, SAMPLE_RATE)

    if kmeans is not None:
        km = joblib.load(kmeans)
        if n_clusters is not None and n_clusters != km.n_clusters:
            raise ValueError(
                f"--n-clusters {n_clusters} but {kmeans} has {km.n_clusters} clusters"
            )
        logger.info("loaded %s (%d clusters)", kmeans, km.n_clusters)
    else:
        km = fit_on_split(manifest_dir, fit_split, n_clusters, percent, seed, hop, **kmeans_kwargs)
    if km.cluster_centers_.shape[1] != 3 * N_MFCC:
        raise ValueError(f"k-means model has {km.cluster_centers_.shape[1]}-dim centroids, "
                         f"expected {3 * N_MFCC} (MFCC + deltas)")

    out_dir.mkdir(parents=True, exist_ok=True)
    if kmeans is None:
        joblib.dump(km, model_path)
        logger.info("wrote %s", model_path)
    write_dict(dict_path, km.n_clusters, overwrite)
    for split, path in zip(loaded, label_paths):
        frames = label_split(split, km, hop, SAMPLE_RATE, path)
        logger.info("wrote %s: %d utterances, %d frames at %d Hz", path, len(split.rows), frames,
                    label_rate)
