"""Checks on the committed mini corpus (``manifests/``); no espeak-ng needed."""

from __future__ import annotations

import os
import random
from collections import defaultdict
from pathlib import Path

import pytest

sf = pytest.importorskip("soundfile")

from fairseq_kd.data.manifest import read_labels, read_manifest
from fairseq_kd.prep.mini_corpus import (
    KEYWORDS,
    MAX_CORPUS_BYTES,
    SentenceGrammar,
    letter_dictionary,
    normalize_words,
    text_to_ltr,
)

CORPUS = Path(__file__).resolve().parents[1] / "manifests"
KW = CORPUS / "keywords"
SPLITS = ("train", "valid", "test")
ASR_MANIFESTS = [CORPUS / f"{split}.tsv" for split in SPLITS]
KW_MANIFESTS = [KW / f"{split}.tsv" for split in SPLITS]


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def rows_of(manifest: Path):
    return read_manifest(manifest)[1]


def dictionary_symbols(path: Path) -> set[str]:
    entries = [line.split() for line in read_lines(path)]
    assert all(len(e) == 2 and e[1].isdigit() for e in entries), (
        f"{path}: lines must be '<symbol> <count>'"
    )
    counts = [int(e[1]) for e in entries]
    assert counts == sorted(counts, reverse=True), f"{path}: counts must be in descending order"
    return {e[0] for e in entries}


# -- pure functions ---------------------------------------------------------------------------


def test_text_to_ltr_matches_libri_labels() -> None:
    assert text_to_ltr("hello world") == "H E L L O | W O R L D |"
    assert text_to_ltr("Don't  stop") == "D O N ' T | S T O P |"
    with pytest.raises(ValueError):
        text_to_ltr("room 101")


def test_letter_dictionary_sorted_by_count() -> None:
    assert letter_dictionary(["A B | A |"]) == [("A", 2), ("|", 2), ("B", 1)]


def test_grammar_is_seeded_and_in_range() -> None:
    grammar = SentenceGrammar(4, 12)
    first = [grammar.sentence(random.Random(7)) for _ in range(3)]
    again = [grammar.sentence(random.Random(7)) for _ in range(3)]
    assert first == again
    rng = random.Random(0)
    for _ in range(200):
        words = grammar.sentence(rng)
        assert 4 <= len(words) <= 12
        normalize_words(" ".join(words))  # only A-Z and apostrophes


# -- committed corpus -------------------------------------------------------------------------


def test_corpus_size_limit() -> None:
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    assert total <= MAX_CORPUS_BYTES, f"manifests/ is {total} bytes"


def test_layout() -> None:
    assert (CORPUS / "README.md").is_file()
    assert read_lines(CORPUS / "train.tsv")[0] == "audio"
    for split in SPLITS:
        assert read_lines(KW / f"{split}.tsv")[0] == "../audio"
        for row in rows_of(CORPUS / f"{split}.tsv"):
            assert row.path.startswith(f"{split}/") and row.path.endswith(".flac")
        for row in rows_of(KW / f"{split}.tsv"):
            assert row.path.startswith("keywords/") and row.path.endswith(".flac")


@pytest.mark.parametrize(
    "manifest", ASR_MANIFESTS + KW_MANIFESTS, ids=lambda p: str(p.relative_to(CORPUS))
)
def test_audio_matches_manifest(manifest: Path) -> None:
    root, rows = read_manifest(manifest)
    assert rows, f"{manifest} is empty"
    for row in rows:
        info = sf.info(str(root / row.path))
        assert (info.format, info.subtype) == ("FLAC", "PCM_16"), row.path
        assert info.samplerate == 16000 and info.channels == 1, row.path
        assert info.frames == row.num_samples, row.path
        if manifest.parent == KW:
            assert info.frames == 16000, row.path


@pytest.mark.parametrize("split", SPLITS)
def test_asr_labels(split: str) -> None:
    rows = rows_of(CORPUS / f"{split}.tsv")
    ltr = read_labels(CORPUS / f"{split}.ltr", rows)
    wrd = read_labels(CORPUS / f"{split}.wrd", rows)
    spk = read_labels(CORPUS / f"{split}.spk", rows)
    symbols = dictionary_symbols(CORPUS / "dict.ltr.txt")
    for letters, words in zip(ltr, wrd):
        assert words == words.upper() and words.strip() == words
        assert letters == text_to_ltr(words)  # letter by letter, libri_labels.py format
        assert letters.replace(" ", "").replace("|", " ").strip() == words
        assert set(letters.split()) <= symbols
    assert all(s.startswith("spk") for s in spk)


def test_letter_dictionary_covers_alphabet() -> None:
    symbols = dictionary_symbols(CORPUS / "dict.ltr.txt")
    assert set("ABCDEFGHIJKLMNOPQRSTUVWXYZ'|") <= symbols
    train = read_lines(CORPUS / "train.ltr")
    assert [s for s, _ in letter_dictionary(train)] == [
        line.split()[0] for line in read_lines(CORPUS / "dict.ltr.txt")
    ]


def keyword_speakers() -> dict[str, dict[str, set[str]]]:
    """split -> keyword -> speakers."""
    result: dict[str, dict[str, set[str]]] = {}
    for split in SPLITS:
        rows = rows_of(KW / f"{split}.tsv")
        by_keyword: dict[str, set[str]] = defaultdict(set)
        for kw, spk in zip(
            read_labels(KW / f"{split}.kw", rows), read_labels(KW / f"{split}.spk", rows)
        ):
            by_keyword[kw].add(spk)
        result[split] = by_keyword
    return result


def test_keyword_coverage_and_speakers() -> None:
    speakers = keyword_speakers()
    assert set(speakers["train"]) == set(KEYWORDS)
    for kw in KEYWORDS:
        assert len(speakers["train"][kw]) >= 20, kw
    all_speakers = {split: set().union(*by_kw.values()) for split, by_kw in speakers.items()}
    assert not all_speakers["train"] & all_speakers["valid"]
    assert not all_speakers["train"] & all_speakers["test"]
    assert not all_speakers["valid"] & all_speakers["test"]
    assert [line.split()[0] for line in read_lines(KW / "dict.kw.txt")] == list(KEYWORDS)
    assert dictionary_symbols(KW / "dict.kw.txt") == set(KEYWORDS)


def test_trials() -> None:
    test_rows = rows_of(KW / "test.tsv")
    speaker_of = dict(zip((r.path for r in test_rows), read_labels(KW / "test.spk", test_rows)))
    labels = []
    for line in read_lines(KW / "trials.txt"):
        label, a, b = line.split()
        assert a in speaker_of and b in speaker_of, line
        assert (speaker_of[a] == speaker_of[b]) == (label == "1"), line
        labels.append(label)
    assert labels.count("1") == labels.count("0") > 0


def test_manifests_resolve_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for manifest in ASR_MANIFESTS + KW_MANIFESTS:
        # Both an absolute and a relative path to the manifest must find the audio.
        for path in (manifest, Path(os.path.relpath(manifest, tmp_path))):
            root, rows = read_manifest(path)
            assert root.resolve() == (CORPUS / "audio").resolve()
            assert all((root / row.path).is_file() for row in rows)
