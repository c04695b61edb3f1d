"""fairseq-kd-prepare-asr on tiny fake LibriSpeech / Libri-light trees and the bundled corpus."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import soundfile as sf

from fairseq_kd.cli.prepare_asr import main

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"


# ---------------------------------------------------------------------------------------------
# Fake corpora.
# ---------------------------------------------------------------------------------------------


def write_audio(path: Path, samples: int, rate: int = 16000, channels: int = 1) -> None:
    """A 220 Hz tone; stereo files have 0.4 on the left and 0.2 on the right (average 0.3)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tone = np.sin(2 * np.pi * 220 * np.arange(samples) / rate)
    data = np.stack([0.4 * tone, 0.2 * tone], axis=1) if channels == 2 else 0.3 * tone
    sf.write(str(path), data, rate, format="FLAC", subtype="PCM_16")


def write_chapter(
    split_dir: Path,
    speaker: int,
    chapter: int,
    utterances: list[tuple[str, int]],
    rate: int = 16000,
    channels: int = 1,
) -> Path:
    """LibriSpeech layout: ``<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac``."""
    folder = split_dir / str(speaker) / str(chapter)
    lines = []
    for index, (text, samples) in enumerate(utterances):
        utt_id = f"{speaker}-{chapter}-{index:04d}"
        write_audio(folder / f"{utt_id}.flac", samples, rate, channels)
        lines.append(f"{utt_id} {text}\n")
    transcript = folder / f"{speaker}-{chapter}.trans.txt"
    transcript.write_text("".join(lines))
    return transcript


@pytest.fixture
def librispeech(tmp_path: Path) -> Path:
    root = tmp_path.resolve() / "LibriSpeech"  # messages name resolved paths
    write_chapter(root / "train-clean-100", 19, 198, [("HELLO WORLD", 1600), ("IT'S A CAT", 2400)])
    write_chapter(root / "train-clean-100", 26, 495, [("A CAT", 800)])
    write_chapter(root / "train-clean-360", 103, 1240, [("GOOD DOG", 1200)])
    write_chapter(root / "dev-clean", 84, 121123, [("HELLO CAT", 1000)])
    write_chapter(root / "mixed", 7, 77, [("HI THERE", 4000)], rate=8000, channels=2)
    write_chapter(root / "mixed", 8, 88, [("OK", 1600)])
    return root


def run(*argv: str | Path) -> None:
    assert main([str(a) for a in argv]) == 0


def fails(*argv: str | Path) -> str:
    """Run the command expecting a clean ``error: ...`` exit (code 2, fairseq_kd/cli/errors.py);
    return the message."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    assert code == 2, err.getvalue()
    message = "error: " + err.getvalue().split("error: ", 1)[1]
    return message


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# LibriSpeech and Libri-light.
# ---------------------------------------------------------------------------------------------


def test_librispeech_merged_splits(librispeech: Path, tmp_path: Path) -> None:
    dest = tmp_path / "data"
    run("--librispeech", librispeech, "--split", "train-clean-100", "--split", "train-clean-360",
        "--name", "train", "--dest", dest)  # fmt: skip
    assert lines(dest / "train.tsv") == [
        os.path.realpath(librispeech),
        "train-clean-100/19/198/19-198-0000.flac\t1600",
        "train-clean-100/19/198/19-198-0001.flac\t2400",
        "train-clean-100/26/495/26-495-0000.flac\t800",
        "train-clean-360/103/1240/103-1240-0000.flac\t1200",
    ]
    assert lines(dest / "train.ltr") == [
        "H E L L O | W O R L D |",
        "I T ' S | A | C A T |",
        "A | C A T |",
        "G O O D | D O G |",
    ]
    assert lines(dest / "train.wrd") == ["HELLO WORLD", "IT'S A CAT", "A CAT", "GOOD DOG"]
    assert lines(dest / "train.spk") == ["19", "19", "26", "103"]
    # descending count, ties by symbol
    assert lines(dest / "dict.ltr.txt") == [
        "| 9", "O 5", "A 4", "D 3", "L 3", "T 3", "C 2", "G 2",
        "' 1", "E 1", "H 1", "I 1", "R 1", "S 1", "W 1",
    ]  # fmt: skip
    assert sorted(p.name for p in dest.iterdir()) == [
        "dict.ltr.txt", "train.ltr", "train.spk", "train.tsv", "train.wrd",
    ]  # fmt: skip


def test_dev_set_reuses_the_training_dictionary(librispeech: Path, tmp_path: Path) -> None:
    dest = tmp_path / "data"
    run(
        "--librispeech",
        librispeech,
        "--split",
        "train-clean-100",
        "--name",
        "train",
        "--dest",
        dest,
    )
    before = digest(dest / "dict.ltr.txt")
    # without --dict the dev set would replace the training dictionary: refused, with a hint
    message = fails("--librispeech", librispeech, "--split", "dev-clean", "--dest", dest)
    assert "dict.ltr.txt" in message and "--dict" in message
    run("--librispeech", librispeech, "--split", "dev-clean", "--name", "dev_clean",
        "--dest", dest, "--dict", dest / "dict.ltr.txt")  # fmt: skip
    assert digest(dest / "dict.ltr.txt") == before
    assert lines(dest / "dev_clean.ltr") == ["H E L L O | C A T |"]
    assert lines(dest / "dev_clean.tsv")[1:] == ["dev-clean/84/121123/84-121123-0000.flac\t1000"]


def test_characters_outside_the_dictionary(librispeech: Path, tmp_path: Path) -> None:
    dest = tmp_path / "data"
    run(
        "--librispeech",
        librispeech,
        "--split",
        "train-clean-100",
        "--dest",
        dest,
        "--name",
        "train",
    )
    transcript = write_chapter(librispeech / "dev-other", 85, 1, [("A CAT", 800), ("ZEBRA", 800)])
    message = fails("--librispeech", librispeech, "--split", "dev-other", "--dest", dest,
                    "--dict", dest / "dict.ltr.txt")  # fmt: skip
    assert f"{transcript}:2: characters ['B', 'Z'] are not in the dictionary" in message
    assert not (dest / "dev-other.tsv").exists()


def test_characters_outside_letters_without_dict(librispeech: Path, tmp_path: Path) -> None:
    transcript = write_chapter(librispeech / "odd", 9, 9, [("HELLO, WORLD", 800)])
    message = fails("--librispeech", librispeech, "--split", "odd", "--dest", tmp_path / "data")
    assert f"{transcript}:1:" in message and "HELLO," in message
    assert not (tmp_path / "data").exists()


def write_libri_light(root: Path) -> None:
    """``librispeech_finetuning/1h/{0..5}/{clean,other}`` and ``9h/{clean,other}``, one utt each."""
    parts = [f"1h/{i}/{kind}" for i in range(6) for kind in ("clean", "other")]
    parts += ["9h/clean", "9h/other"]
    for speaker, part in enumerate(parts, start=100):
        write_chapter(root / part, speaker, 5, [("A CAT", 800 + speaker)])


def test_libri_light_subsets(tmp_path: Path) -> None:
    root = tmp_path / "librispeech_finetuning"
    write_libri_light(root)
    run("--libri-light", root, "--subset", "10min", "--dest", tmp_path / "10min")
    assert lines(tmp_path / "10min" / "train.tsv") == [
        str(root.resolve()),
        "1h/0/clean/100/5/100-5-0000.flac\t900",
        "1h/0/other/101/5/101-5-0000.flac\t901",
    ]
    assert lines(tmp_path / "10min" / "train.spk") == ["100", "101"]
    run("--libri-light", root, "--subset", "1h", "--dest", tmp_path / "1h")
    rows = lines(tmp_path / "1h" / "train.tsv")[1:]
    assert len(rows) == 12 and all(r.startswith("1h/") for r in rows)
    # the parent of librispeech_finetuning is accepted too
    run("--libri-light", tmp_path, "--subset", "10h", "--dest", tmp_path / "10h", "--name", "ll10h")
    rows = lines(tmp_path / "10h" / "ll10h.tsv")[1:]
    assert len(rows) == 14 and rows[-1] == "9h/other/113/5/113-5-0000.flac\t913"
    assert len(lines(tmp_path / "10h" / "ll10h.ltr")) == 14


def test_libri_light_missing_part(tmp_path: Path) -> None:
    root = tmp_path / "librispeech_finetuning"
    write_chapter(root / "1h" / "0" / "clean", 1, 1, [("A CAT", 800)])
    message = fails("--libri-light", root, "--subset", "1h", "--dest", tmp_path / "data")
    assert "1h/1" in message and "librispeech_finetuning" in message


# ---------------------------------------------------------------------------------------------
# Sample rates and channels.
# ---------------------------------------------------------------------------------------------


def test_other_rates_are_rejected_without_resample(librispeech: Path, tmp_path: Path) -> None:
    dest = tmp_path / "data"
    message = fails("--librispeech", librispeech, "--split", "mixed", "--dest", dest)
    bad = librispeech / "mixed" / "7" / "77" / "7-77-0000.flac"
    assert f"{bad}: 8000 Hz, 2 channel(s)" in message
    assert "--resample" in message and "8-88-0000" not in message
    assert not dest.exists()


def test_resample(librispeech: Path, tmp_path: Path) -> None:
    dest = tmp_path / "data"
    originals = {p: digest(p) for p in (librispeech / "mixed").rglob("*.flac")}
    run("--librispeech", librispeech, "--split", "mixed", "--dest", dest, "--resample")
    root, *rows = lines(dest / "mixed.tsv")
    assert root == os.path.realpath(dest / "audio")
    (path_a, n_a), (path_b, n_b) = (row.split("\t") for row in rows)
    assert (path_a, path_b) == ("mixed/7/77/7-77-0000.flac", "mixed/8/88/8-88-0000.flac")
    converted = sf.info(str(dest / "audio" / path_a))
    assert (converted.samplerate, converted.channels) == (16000, 1)
    assert abs(converted.frames - 8000) <= 1 and int(n_a) == converted.frames
    audio, _ = sf.read(str(dest / "audio" / path_a))
    assert abs(np.abs(audio).max() - 0.3) < 0.01  # channels averaged: (0.4 + 0.2) / 2
    assert int(n_b) == 1600 and sf.info(str(dest / "audio" / path_b)).frames == 1600
    assert lines(dest / "mixed.ltr") == ["H I | T H E R E |", "O K |"]
    # a rerun refuses to touch the audio copies; with --overwrite it replaces them without
    # writing through the hard link into the user's original
    message = fails("--librispeech", librispeech, "--split", "mixed", "--dest", dest, "--resample")
    assert "--overwrite" in message
    run(
        "--librispeech",
        librispeech,
        "--split",
        "mixed",
        "--dest",
        dest,
        "--resample",
        "--overwrite",
    )
    assert {p: digest(p) for p in originals} == originals


# ---------------------------------------------------------------------------------------------
# Sentencepiece and the bundled corpus.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_regenerates_bundled_letter_labels(split: str, tmp_path: Path) -> None:
    extra = [] if split == "train" else ["--dict", MANIFESTS / "dict.ltr.txt"]
    run("--from-manifest", MANIFESTS / f"{split}.tsv", "--words", MANIFESTS / f"{split}.wrd",
        "--dest", tmp_path, *extra)  # fmt: skip
    assert (tmp_path / f"{split}.ltr").read_bytes() == (MANIFESTS / f"{split}.ltr").read_bytes()
    assert (tmp_path / "dict.ltr.txt").read_bytes() == (MANIFESTS / "dict.ltr.txt").read_bytes()


def test_sentencepiece_units(tmp_path: Path) -> None:
    run("--from-manifest", MANIFESTS / "train.tsv", "--dest", tmp_path, "--sentencepiece-vocab", 60)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm60.model"))
    assert sp.get_piece_size() == 60
    pieces = lines(tmp_path / "train.spm60")
    words = lines(MANIFESTS / "train.wrd")
    assert [sp.decode(p.split()) for p in pieces] == words
    entries = [line.split() for line in lines(tmp_path / "dict.spm60.txt")]
    assert len(entries) == 56  # 4 ids are fairseq's <s> <pad> </s> <unk>
    counts = [int(c) for _, c in entries]
    assert counts == sorted(counts, reverse=True)
    assert sum(counts) == sum(len(p.split()) for p in pieces)
    # the valid set reuses the model and its dictionary
    run("--from-manifest", MANIFESTS / "valid.tsv", "--dest", tmp_path, "--dict",
        tmp_path / "dict.ltr.txt", "--sentencepiece-model", tmp_path / "spm60.model")  # fmt: skip
    valid = lines(tmp_path / "valid.spm60")
    assert [sp.decode(p.split()) for p in valid] == lines(MANIFESTS / "valid.wrd")


def test_sentencepiece_in_corpus_mode(librispeech: Path, tmp_path: Path) -> None:
    dest = tmp_path / "data"
    message = fails("--librispeech", librispeech, "--split", "train-clean-100", "--dest", dest,
                    "--sentencepiece-vocab", 500)  # fmt: skip
    assert "Vocabulary size too high" in message
    assert not dest.exists()
    run("--librispeech", librispeech, "--split", "train-clean-100", "--dest", dest,
        "--name", "train", "--sentencepiece-vocab", 19)  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(dest / "spm19.model"))
    pieces = lines(dest / "train.spm19")
    assert [sp.decode(p.split()) for p in pieces] == lines(dest / "train.wrd")


# ---------------------------------------------------------------------------------------------
# Refusals and bad input.
# ---------------------------------------------------------------------------------------------


def test_overwrite_refusal(librispeech: Path, tmp_path: Path) -> None:
    dest = tmp_path / "data"
    args = [
        "--librispeech",
        librispeech,
        "--split",
        "train-clean-100",
        "--name",
        "train",
        "--dest",
        dest,
    ]
    run(*args)
    (dest / "train.ltr").write_text("user data\n")
    message = fails(*args)
    assert f"{dest / 'train.tsv'}" in message and "--overwrite" in message
    assert (dest / "train.ltr").read_text() == "user data\n"
    run(*args, "--overwrite")
    assert lines(dest / "train.ltr")[0] == "H E L L O | W O R L D |"


def test_transcript_line_without_audio(librispeech: Path, tmp_path: Path) -> None:
    folder = librispeech / "train-clean-100" / "19" / "198"
    (folder / "19-198-0001.flac").unlink()
    message = fails(
        "--librispeech", librispeech, "--split", "train-clean-100", "--dest", tmp_path / "d"
    )
    assert f"{folder / '19-198.trans.txt'}:2: 19-198-0001 has no audio file" in message
    assert not (tmp_path / "d").exists()


def test_audio_without_transcript_line(librispeech: Path, tmp_path: Path) -> None:
    folder = librispeech / "train-clean-100" / "19" / "198"
    transcript = folder / "19-198.trans.txt"
    transcript.write_text(transcript.read_text().splitlines()[0] + "\n")
    message = fails(
        "--librispeech", librispeech, "--split", "train-clean-100", "--dest", tmp_path / "d"
    )
    assert f"{folder / '19-198-0001.flac'}: no transcript line for 19-198-0001" in message
    assert not (tmp_path / "d").exists()


def test_unreadable_audio(librispeech: Path, tmp_path: Path) -> None:
    broken = librispeech / "train-clean-100" / "26" / "495" / "26-495-0000.flac"
    broken.write_bytes(b"not a flac file")
    message = fails(
        "--librispeech", librispeech, "--split", "train-clean-100", "--dest", tmp_path / "d"
    )
    assert f"{broken}: not readable audio" in message
    assert not (tmp_path / "d").exists()


def test_empty_dataset_and_missing_split(librispeech: Path, tmp_path: Path) -> None:
    (librispeech / "test-clean").mkdir()
    message = fails("--librispeech", librispeech, "--split", "test-clean", "--dest", tmp_path / "d")
    assert "empty dataset" in message
    message = fails(
        "--librispeech", librispeech, "--split", "train-other-500", "--dest", tmp_path / "d"
    )
    assert "train-other-500 not found" in message and "train-clean-100" in message
    message = fails("--librispeech", tmp_path / "nowhere", "--split", "x", "--dest", tmp_path / "d")
    assert f"corpus folder {tmp_path.resolve() / 'nowhere'} does not exist" in message
    assert not (tmp_path / "d").exists()


def test_from_manifest_with_mismatched_words(tmp_path: Path) -> None:
    words = tmp_path / "short.wrd"
    words.write_text("A CAT\n")
    message = fails(
        "--from-manifest", MANIFESTS / "valid.tsv", "--words", words, "--dest", tmp_path / "d"
    )
    assert "1 lines" in message and "one line per manifest row" in message
    assert not (tmp_path / "d").exists()


def test_argument_errors(librispeech: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--librispeech", str(librispeech), "--dest", str(tmp_path)])
    assert exc.value.code == 2  # argparse: --split is required with --librispeech
