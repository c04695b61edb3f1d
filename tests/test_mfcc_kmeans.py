"""Tests for the MFCC + k-means first-iteration HuBERT target tool (fast: tiny synthetic corpus)."""

import shutil
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
pytest.importorskip("librosa")
pytest.importorskip("sklearn")

from fairseq_kd.data.manifest import write_manifest  # noqa: E402
from fairseq_kd.cli.mfcc_kmeans import main  # noqa: E402
from fairseq_kd.prep.mfcc_kmeans import mfcc_features, num_frames  # noqa: E402

SR = 16000
N_CLUSTERS = 4


def tone(n: int, freq: float = 150.0) -> np.ndarray:
    t = np.arange(n) / SR
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(n: int, seed: int) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(n)).clip(-1, 1).astype(np.float32)


def write_corpus(root: Path, manifest: Path, clips: dict, sample_rate: int = SR) -> None:
    """Write ``{name: wav}`` as FLAC files under ``root`` and a manifest listing them in order."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, wav in clips.items():
        sf.write(str(root / f"{name}.flac"), wav, sample_rate)
        rows.append((f"{name}.flac", wav.shape[0]))
    write_manifest(manifest, str(root), rows)


# lengths chosen to hit non-multiples of the hop, and one just over a single window
TRAIN = {
    **{f"tone{i}": tone(n) for i, n in enumerate([16000, 12345, 9999, 401])},
    **{f"noise{i}": noise(n, i) for i, n in enumerate([16000, 11111, 8765])},
    # stereo: both channels the same tone, so averaging gives the mono tone back
    "stereo": np.stack([tone(10007), tone(10007)], axis=1),
}
VALID = {"tone_v": tone(7777), "noise_v": noise(6543, 99)}


def make_corpus(tmp: Path) -> Path:
    manifests = tmp / "manifests"
    manifests.mkdir()
    write_corpus(tmp / "audio", manifests / "train.tsv", TRAIN)
    write_corpus(tmp / "audio", manifests / "valid.tsv", VALID)
    return manifests


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Tuple[Path, Path]:
    """One run with fairseq's default k-means settings, shared by the read-only tests."""
    tmp = tmp_path_factory.mktemp("labelled")
    manifests = make_corpus(tmp)
    run(manifests, tmp / "labels")
    return manifests, tmp / "labels"


def run(manifests: Path, out_dir: Path, *extra: str) -> None:
    main(["--manifest-dir", str(manifests), "--splits", "train", "valid",
          "--n-clusters", str(N_CLUSTERS), "--out-dir", str(out_dir), *extra])


def read_km(path: Path) -> List[np.ndarray]:
    return [np.array(line.split(), dtype=int) for line in path.read_text().splitlines()]


def check_label_files(out: Path, hop: int) -> None:
    for split, clips in [("train", TRAIN), ("valid", VALID)]:
        labels = read_km(out / f"{split}.km")
        assert len(labels) == len(clips)  # one line per manifest row, in order
        for lab, wav in zip(labels, clips.values()):
            assert len(lab) == 1 + (wav.shape[0] - 400) // hop
            assert lab.min() >= 0 and lab.max() < N_CLUSTERS
    assert (out / "dict.km.txt").read_text() == "".join(f"{k} 1\n" for k in range(N_CLUSTERS))
    assert (out / "kmeans.joblib").is_file()


def test_mfcc_shape_matches_hubert_frame_count():
    for n in [400, 401, 559, 560, 16000, 12345]:
        for hop in [160, 320]:
            assert mfcc_features(tone(n), hop=hop).shape == (1 + (n - 400) // hop, 39)
    assert mfcc_features(tone(399)).shape == (0, 39)
    assert num_frames(399) == 0


def test_label_files_100hz(labelled):
    check_label_files(labelled[1], hop=160)


def test_label_files_50hz(corpus: Path, tmp_path: Path):
    out = tmp_path / "labels"
    run(corpus, out, "--label-rate", "50", "--n-init", "2")
    check_label_files(out, hop=320)


def test_distinct_signals_get_distinct_clusters(labelled):
    out = labelled[1]
    names = list(TRAIN) + list(VALID)
    labels = dict(zip(names, read_km(out / "train.km") + read_km(out / "valid.km")))

    def histogram(names):
        lab = np.concatenate([labels[n] for n in names])
        return np.bincount(lab, minlength=N_CLUSTERS) / len(lab)

    tones = histogram([n for n in labels if "tone" in n or n == "stereo"])
    noises = histogram([n for n in labels if "noise" in n])
    assert np.minimum(tones, noises).sum() < 0.2  # the two signal types share few frames' clusters
    # averaging the identical stereo channels gives the mono tone's labels
    np.testing.assert_array_equal(labels["stereo"][:30], labels["tone0"][:30])


def test_relabel_with_saved_model(labelled, tmp_path: Path):
    manifests, out = labelled
    out2 = tmp_path / "labels2"
    main(["--manifest-dir", str(manifests), "--splits", "valid", "--out-dir", str(out2),
          "--kmeans", str(out / "kmeans.joblib")])
    assert (out2 / "valid.km").read_text() == (out / "valid.km").read_text()
    assert (out2 / "dict.km.txt").read_text() == (out / "dict.km.txt").read_text()
    assert not (out2 / "kmeans.joblib").exists()


def test_refuses_to_overwrite(labelled, tmp_path: Path):
    manifests, out = labelled
    out2 = tmp_path / "labels"
    shutil.copytree(out, out2)
    with pytest.raises(FileExistsError, match=r"train\.km already exists.*--overwrite"):
        run(manifests, out2)
    (out2 / "train.km").unlink()
    (out2 / "valid.km").unlink()
    with pytest.raises(FileExistsError, match=r"dict\.km\.txt already exists.*--overwrite"):
        run(manifests, out2)
    # labelling with the saved model only guards the label files; --overwrite replaces them
    (out2 / "valid.km").write_text("stale\n")
    kmeans = ["--kmeans", str(out / "kmeans.joblib")]
    with pytest.raises(FileExistsError, match=r"valid\.km already exists"):
        run(manifests, out2, *kmeans)
    run(manifests, out2, *kmeans, "--overwrite")
    assert (out2 / "valid.km").read_text() == (out / "valid.km").read_text()


def test_wrong_sample_rate_names_manifest_and_line(corpus: Path, tmp_path: Path):
    audio = tmp_path / "audio"
    sf.write(str(audio / "slow.flac"), tone(8000), 8000)
    write_manifest(corpus / "valid.tsv", str(audio), [("tone_v.flac", 7777), ("slow.flac", 8000)])
    with pytest.raises(ValueError, match=r"valid\.tsv:3 \(slow\.flac\).*8000 Hz, expected 16000"):
        run(corpus, tmp_path / "labels")


def test_manifest_length_mismatch_and_too_short(corpus: Path, tmp_path: Path):
    audio = tmp_path / "audio"
    write_manifest(corpus / "valid.tsv", str(audio), [("tone_v.flac", 7000)])
    with pytest.raises(ValueError, match=r"valid\.tsv:2 .*7777 samples.*says 7000"):
        run(corpus, tmp_path / "labels")
    sf.write(str(audio / "tiny.flac"), tone(300), SR)
    write_manifest(corpus / "valid.tsv", str(audio), [("tiny.flac", 300)])
    with pytest.raises(ValueError, match=r"valid\.tsv:2 .*shorter than one 400-sample window"):
        run(corpus, tmp_path / "labels")
