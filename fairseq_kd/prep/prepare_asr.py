"""Prepare LibriSpeech / Libri-light fine-tuning data for fairseq's ASR recipes.

Writes what fairseq's ``examples/wav2vec/wav2vec_manifest.py`` + ``libri_labels.py`` write, for one
named set per call, into ``--dest``:

* ``{name}.tsv``: first line the (absolute, real) audio root, then ``relative/path<TAB>num_samples``
  (rows sorted by path, so the output does not depend on the filesystem's listing order);
* ``{name}.ltr`` (``H E L L O | W O R L D |``), ``{name}.wrd`` (uppercase words), ``{name}.spk``;
* ``dict.ltr.txt`` (``<symbol> <count>`` by descending count) built from this set, which is then
  the training set; for other sets pass ``--dict`` to reuse (and check against) an existing one;
* with ``--sentencepiece-vocab N``: a unigram model ``spm{N}.model`` trained on this set's words,
  ``{name}.spm{N}`` (space-separated pieces) and ``dict.spm{N}.txt``; ``--sentencepiece-model``
  reuses a model (and the ``dict.spm{N}.txt`` beside it) for other sets.

Every transcript line must name an existing audio file and every audio file must have a transcript
line; every file's header is read (``soundfile.info``). Audio that is not 16 kHz mono is rejected
unless ``--resample`` is given, which writes 16 kHz mono FLAC copies under ``{dest}/audio/`` (the
manifest then points there; files that need no conversion are hard-linked, or copied across
filesystems). All input problems are reported before anything is written, and existing outputs are
never replaced without ``--overwrite`` (replacements go through a temporary file and a rename, so a
hard-linked original is never written through).

``--from-manifest`` writes only the label files (``.ltr``, ``dict.ltr.txt``, sentencepiece) from an
existing manifest and its ``.wrd`` file; it regenerates the bundled corpus' labels byte-identically.

Usage::

    fairseq-kd-prepare-asr --librispeech /data/LibriSpeech --split train-clean-100 --name train \\
        --dest data/ls100 --sentencepiece-vocab 1000
    fairseq-kd-prepare-asr --librispeech /data/LibriSpeech --split dev-other --name dev_other \\
        --dest data/ls100 --dict data/ls100/dict.ltr.txt \\
        --sentencepiece-model data/ls100/spm1000.model
    fairseq-kd-prepare-asr --libri-light /data/librispeech_finetuning --subset 10h --dest data/ll10h
    fairseq-kd-prepare-asr --from-manifest manifests/train.tsv --dest /tmp/labels
"""

from __future__ import annotations

import contextlib
import filecmp
import logging
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import soundfile as sf

# soxr is the maintained binding of libsoxr (librosa's default resampler); torchaudio is in
# maintenance mode and cannot load audio with the CPU-only torch build used here.
import soxr
from tqdm import tqdm

from fairseq_kd.data.manifest import read_labels, read_manifest, write_manifest
from fairseq_kd.prep.mini_corpus import (
    letter_dictionary,
    normalize_words,
    text_to_ltr,
    write_dictionary,
)

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MAX_ERRORS_SHOWN = 20
LIBRI_LIGHT_1H = tuple(f"1h/{i}" for i in range(6))
LIBRI_LIGHT_SUBSETS = {
    "10min": ("1h/0",),
    "1h": LIBRI_LIGHT_1H,
    "10h": LIBRI_LIGHT_1H + ("9h",),
}
# fairseq's Dictionary puts <s> <pad> </s> <unk> first; giving sentencepiece the same ids keeps
# piece ids and dictionary indices aligned (as fairseq's speech_to_text data preparation does).
SPM_SPECIAL_IDS = {"bos_id": 0, "pad_id": 1, "eos_id": 2, "unk_id": 3}


class PrepareError(Exception):
    """Bad input or a refused output, found before anything was written."""


@dataclass(frozen=True)
class Utterance:
    path: Path  # the audio file
    rel: str  # path relative to the audio root, as the manifest row will have it
    speaker: str
    text: str  # transcript as read (whitespace collapsed)
    source: str  # "transcript:line", for error messages


@dataclass(frozen=True)
class Output:
    """One file to write: ``write`` fills a temporary path that is then renamed to ``path``."""

    path: Path
    write: Callable[[Path], None]


@dataclass(frozen=True)
class LabelOptions:
    dest: Path
    name: str
    dict_path: Path | None  # reuse this letter dictionary instead of building one
    spm_vocab: int | None  # train a sentencepiece model of this size
    spm_model: Path | None  # or reuse this one
    overwrite: bool


# ---------------------------------------------------------------------------------------------
# Errors and safe writing.
# ---------------------------------------------------------------------------------------------


def format_problems(problems: Sequence[str], what: str) -> str:
    shown = "\n".join(f"  - {p}" for p in problems[:MAX_ERRORS_SHOWN])
    more = len(problems) - MAX_ERRORS_SHOWN
    tail = f"\n  ... and {more} more" if more > 0 else ""
    return f"{len(problems)} {what}; nothing was written:\n{shown}{tail}"


def raise_problems(problems: Sequence[str], what: str) -> None:
    if problems:
        raise PrepareError(format_problems(problems, what))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` and rename it over ``path`` when the block succeeds.

    The rename replaces the directory entry instead of writing into the old file, so a previous
    output that is a hard link to the user's original audio is never modified.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def same_content(a: Path, b: Path) -> bool:
    return b.exists() and (os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False))


def copy_output(src: Path, dst: Path) -> list[Output]:
    """Copy ``src`` to ``dst`` unless ``dst`` already is (or equals) it."""
    if same_content(src, dst):
        return []
    return [Output(dst, lambda tmp: shutil.copyfile(src, tmp))]


def check_conflicts(paths: Sequence[Path], overwrite: bool, hint: str = "") -> None:
    """Refuse to replace existing files unless ``--overwrite`` was given."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise PrepareError(
            format_problems(existing, "output file(s) already exist")
            + f"\npass --overwrite to replace them{hint}"
        )


def write_outputs(outputs: Sequence[Output]) -> None:
    for output in outputs:
        with atomic_path(output.path) as tmp:
            output.write(tmp)
        logger.info(f"wrote {output.path}")


# ---------------------------------------------------------------------------------------------
# Finding utterances.
# ---------------------------------------------------------------------------------------------


def locate_root(root: Path, wrapper: str, parts: Sequence[str]) -> Path:
    """Accept both the corpus folder and its parent (``.../LibriSpeech`` or ``...``)."""
    root = Path(os.path.realpath(root))
    if not root.is_dir():
        raise PrepareError(f"corpus folder {root} does not exist")
    if not all((root / p).is_dir() for p in parts) and all(
        (root / wrapper / p).is_dir() for p in parts
    ):
        return root / wrapper
    return root


def librispeech_dirs(root: Path, splits: Sequence[str]) -> tuple[Path, list[Path]]:
    """The LibriSpeech root and its split folders (``train-clean-100``, ``dev-other``, ...)."""
    root = locate_root(root, "LibriSpeech", splits)
    missing = [s for s in splits if not (root / s).is_dir()]
    if missing:
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise PrepareError(
            f"split folder(s) {', '.join(missing)} not found in LibriSpeech root {root} "
            f"(it has: {', '.join(found) or 'nothing'})"
        )
    return root, [root / s for s in splits]


def libri_light_dirs(root: Path, subset: str) -> tuple[Path, list[Path]]:
    """The ``librispeech_finetuning`` root and the folders of a limited-supervision subset."""
    parts = LIBRI_LIGHT_SUBSETS[subset]
    root = locate_root(root, "librispeech_finetuning", parts)
    missing = [p for p in parts if not (root / p).is_dir()]
    if missing:
        raise PrepareError(
            f"Libri-light subset {subset} needs {', '.join(parts)} under {root}, but "
            f"{', '.join(missing)} is missing; expected the layout of librispeech_finetuning.tgz "
            "(1h/{0..5}/{clean,other}/..., 9h/{clean,other}/...)"
        )
    return root, [root / p for p in parts]


def scan_tree(dirs: Sequence[Path], ext: str) -> tuple[dict[Path, dict[str, Path]], list[Path]]:
    """Audio files by folder (``{folder: {utt_id: path}}``) and transcript files under ``dirs``."""
    audio: dict[Path, dict[str, Path]] = defaultdict(dict)
    transcripts = []
    suffix = "." + ext
    for top in dirs:
        for folder, subdirs, files in os.walk(top, followlinks=True):
            subdirs.sort()
            for file in sorted(files):
                if file.endswith(".trans.txt"):
                    transcripts.append(Path(folder) / file)
                elif file.endswith(suffix):
                    audio[Path(folder)][file[: -len(suffix)]] = Path(folder) / file
    return audio, transcripts


def read_transcript(path: Path) -> list[tuple[int, str, str]]:
    """``(line number, utterance id, text)`` for each non-empty line of a ``.trans.txt`` file."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split(maxsplit=1)
            if fields:
                text = " ".join(fields[1].split()) if len(fields) > 1 else ""
                entries.append((lineno, fields[0], text))
    return entries


def collect_utterances(root: Path, dirs: Sequence[Path], ext: str) -> list[Utterance]:
    """Pair every transcript line with its audio file; report every mismatch at once."""
    audio, transcripts = scan_tree(dirs, ext)
    if not transcripts and not any(audio.values()):
        raise PrepareError(
            f"empty dataset: no *.{ext} audio files and no *.trans.txt transcripts under "
            f"{', '.join(map(str, dirs))}"
        )
    problems: list[str] = []
    texts: dict[Path, dict[str, tuple[str, str]]] = defaultdict(dict)
    for transcript in transcripts:
        folder = transcript.parent
        for lineno, utt_id, text in read_transcript(transcript):
            source = f"{transcript}:{lineno}"
            if utt_id in texts[folder]:
                problems.append(
                    f"{source}: {utt_id} is listed twice (first at {texts[folder][utt_id][1]})"
                )
            elif utt_id not in audio[folder]:
                problems.append(
                    f"{source}: {utt_id} has no audio file ({folder / utt_id}.{ext} is missing)"
                )
            elif not text:
                problems.append(f"{source}: {utt_id} has an empty transcript")
            texts[folder][utt_id] = (text, source)
    for folder, files in audio.items():
        for utt_id, path in files.items():
            if utt_id not in texts[folder]:
                problems.append(
                    f"{path}: no transcript line for {utt_id} in a *.trans.txt file in {folder}"
                )
    raise_problems(problems, "problem(s) pairing audio files with transcripts")
    utterances = [
        Utterance(
            path=path,
            rel=os.path.relpath(path, root),
            speaker=utt_id.split("-")[0],  # LibriSpeech ids are <speaker>-<chapter>-<utterance>
            text=texts[folder][utt_id][0],
            source=texts[folder][utt_id][1],
        )
        for folder, files in audio.items()
        for utt_id, path in files.items()
    ]
    return sorted(utterances, key=lambda u: u.rel)


# ---------------------------------------------------------------------------------------------
# Labels.
# ---------------------------------------------------------------------------------------------


def read_dictionary_symbols(path: Path) -> set[str]:
    """Symbols of a fairseq dictionary file (``<symbol> <count> [#fairseq:overwrite]``)."""
    if not path.is_file():
        raise PrepareError(f"--dict {path} does not exist")
    with open(path, encoding="utf-8") as f:
        return {line.split()[0] for line in f if line.strip()}


def letter_labels(
    texts: Sequence[str], sources: Sequence[str], symbols: set[str] | None
) -> tuple[list[str], list[str]]:
    """``(.wrd lines, .ltr lines)``; every bad line (with its ``file:line``) is reported at once."""
    words, letters, problems = [], [], []
    for text, source in zip(texts, sources, strict=True):
        used = set("|".join(text.upper().split())) | {"|"}
        if symbols is not None and used - symbols:
            problems.append(
                f"{source}: characters {sorted(used - symbols)} are not in the dictionary"
            )
            continue
        try:
            words.append(" ".join(normalize_words(text)))
            letters.append(text_to_ltr(text))
        except ValueError as error:
            problems.append(f"{source}: {error}")
    raise_problems(problems, "transcript line(s) cannot be turned into letter labels")
    return words, letters


def letter_outputs(
    words: Sequence[str], letters: Sequence[str], opts: LabelOptions
) -> list[Output]:
    """``{name}.ltr`` and either the new ``dict.ltr.txt`` or a copy of ``--dict``."""
    outputs = [Output(opts.dest / f"{opts.name}.ltr", text_writer(letters))]
    if opts.dict_path is None:
        entries = letter_dictionary(letters)
        outputs.append(
            Output(opts.dest / "dict.ltr.txt", lambda tmp: write_dictionary(tmp, entries))
        )
    else:
        outputs += copy_output(opts.dict_path, opts.dest / "dict.ltr.txt")
    return outputs


def text_writer(lines: Sequence[str]) -> Callable[[Path], None]:
    return lambda tmp: tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def train_sentencepiece(lines: Sequence[str], vocab: int) -> bytes:
    """A unigram model over the words (every character kept: ``character_coverage=1.0``)."""
    with tempfile.TemporaryDirectory(prefix="prepare_asr_spm_") as tmp:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_prefix=f"{tmp}/spm",
                vocab_size=vocab,
                model_type="unigram",
                character_coverage=1.0,
                # no NFKC: the pieces must decode back to exactly the .wrd text
                normalization_rule_name="identity",
                minloglevel=2,
                **SPM_SPECIAL_IDS,
            )
        except RuntimeError as error:
            raise PrepareError(
                f"sentencepiece could not train a {vocab}-piece model on {len(lines)} "
                f"transcripts: {error}"
            ) from None
        return Path(f"{tmp}/spm.model").read_bytes()


def piece_dictionary(sp: spm.SentencePieceProcessor, lines: Sequence[str]) -> list[tuple[str, int]]:
    """Every ordinary piece of the model with its count in ``lines`` (unused pieces count 0).

    Keeping unused pieces means other sets' labels never fall outside the dictionary.
    """
    counts = Counter(piece for line in lines for piece in line.split())
    pieces = [
        sp.id_to_piece(i)
        for i in range(sp.get_piece_size())
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))
    ]
    return sorted(((p, counts[p]) for p in pieces), key=lambda item: (-item[1], item[0]))


def spm_targets(opts: LabelOptions) -> tuple[int, list[Path]]:
    """Vocabulary size and the files that training a model would create (for the conflict check)."""
    if opts.spm_model is not None:
        return reused_spm(opts.spm_model)[0].get_piece_size(), []
    assert opts.spm_vocab is not None
    n = opts.spm_vocab
    return n, [opts.dest / f"spm{n}.model", opts.dest / f"dict.spm{n}.txt"]


def reused_spm(model: Path) -> tuple[spm.SentencePieceProcessor, Path]:
    """A model given with ``--sentencepiece-model`` and the ``dict.spm{N}.txt`` beside it."""
    if not model.is_file():
        raise PrepareError(f"--sentencepiece-model {model} does not exist")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model))
    except (RuntimeError, OSError) as error:
        raise PrepareError(
            f"--sentencepiece-model {model} is not a sentencepiece model ({error})"
        ) from None
    dictionary = model.parent / f"dict.spm{sp.get_piece_size()}.txt"
    if not dictionary.is_file():
        raise PrepareError(f"--sentencepiece-model {model}: its dictionary {dictionary} is missing")
    return sp, dictionary


def sentencepiece_outputs(words: Sequence[str], opts: LabelOptions) -> list[Output]:
    """Train (or reuse) the model; ``{name}.spm{N}``, ``spm{N}.model`` and ``dict.spm{N}.txt``."""
    if opts.spm_model is not None:
        sp, src_dict = reused_spm(opts.spm_model)
        n = sp.get_piece_size()
        outputs = copy_output(opts.spm_model, opts.dest / f"spm{n}.model")
        outputs += copy_output(src_dict, opts.dest / f"dict.spm{n}.txt")
        pieces = [" ".join(sp.encode(line, out_type=str)) for line in words]
    else:
        assert opts.spm_vocab is not None
        n = opts.spm_vocab
        model_bytes = train_sentencepiece(words, n)
        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        pieces = [" ".join(sp.encode(line, out_type=str)) for line in words]
        entries = piece_dictionary(sp, pieces)
        outputs = [
            Output(opts.dest / f"spm{n}.model", lambda tmp: tmp.write_bytes(model_bytes)),
            Output(opts.dest / f"dict.spm{n}.txt", lambda tmp: write_dictionary(tmp, entries)),
        ]
    logger.info(f"sentencepiece: {n} pieces, {sum(len(p.split()) for p in pieces)} label tokens")
    return [Output(opts.dest / f"{opts.name}.spm{n}", text_writer(pieces))] + outputs


def label_targets(opts: LabelOptions, with_corpus_files: bool) -> list[Path]:
    """Files this call creates from scratch (copies of identical files are not conflicts)."""
    suffixes = ["ltr"] + (["tsv", "wrd", "spk"] if with_corpus_files else [])
    paths = [opts.dest / f"{opts.name}.{s}" for s in suffixes]
    if opts.dict_path is None:
        paths.append(opts.dest / "dict.ltr.txt")
    if opts.spm_vocab is not None or opts.spm_model is not None:
        n, created = spm_targets(opts)
        paths += [opts.dest / f"{opts.name}.spm{n}"] + created
    return paths


def copy_targets(opts: LabelOptions) -> list[Path]:
    """Reused dictionaries/models that would replace a different file of the same name in dest."""
    conflicts = []
    if opts.dict_path is not None:
        conflicts += [o.path for o in copy_output(opts.dict_path, opts.dest / "dict.ltr.txt")]
    if opts.spm_model is not None:
        sp, src_dict = reused_spm(opts.spm_model)
        n = sp.get_piece_size()
        conflicts += [o.path for o in copy_output(opts.spm_model, opts.dest / f"spm{n}.model")]
        conflicts += [o.path for o in copy_output(src_dict, opts.dest / f"dict.spm{n}.txt")]
    return conflicts


def check_label_conflicts(opts: LabelOptions, with_corpus_files: bool) -> None:
    hint = ""
    if opts.dict_path is None and (opts.dest / "dict.ltr.txt").exists():
        # the usual slip: preparing a dev/test set as if it were the training set
        hint = "; for a non-training set, reuse the training dictionary with --dict "
        hint += str(opts.dest / "dict.ltr.txt")
        if opts.spm_vocab is not None:
            model = opts.dest / f"spm{opts.spm_vocab}.model"
            hint += f" and its sentencepiece model with --sentencepiece-model {model}"
    paths = label_targets(opts, with_corpus_files) + copy_targets(opts)
    check_conflicts(paths, opts.overwrite, hint)


# ---------------------------------------------------------------------------------------------
# Audio.
# ---------------------------------------------------------------------------------------------


def read_header(path: Path) -> sf._SoundFileInfo | str:
    """The file's header, or what is wrong with it."""
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as error:  # type: ignore[attr-defined]
        return f"{path}: not readable audio ({error})"
    if info.frames == 0:
        return f"{path}: empty audio file (0 samples)"
    return info


def read_headers(utterances: Sequence[Utterance], jobs: int) -> list[sf._SoundFileInfo]:
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(
            tqdm(
                pool.map(read_header, [u.path for u in utterances]),
                total=len(utterances),
                desc="reading audio headers",
                unit="file",
                disable=None,  # no bar when stderr is not a terminal
            )
        )
    raise_problems([r for r in results if isinstance(r, str)], "unreadable audio file(s)")
    return results  # type: ignore[return-value]


def needs_conversion(info: sf._SoundFileInfo) -> bool:
    return info.samplerate != SAMPLE_RATE or info.channels != 1


def check_formats(
    utterances: Sequence[Utterance], infos: Sequence[sf._SoundFileInfo], resample: bool
) -> None:
    """fairseq rejects other sample rates and silently averages channels: refuse both early."""
    bad = [
        f"{u.path}: {i.samplerate} Hz, {i.channels} channel(s)"
        for u, i in zip(utterances, infos, strict=True)
        if needs_conversion(i)
    ]
    if bad and not resample:
        raise PrepareError(
            format_problems(bad, f"audio file(s) are not {SAMPLE_RATE} Hz mono")
            + f"\npass --resample to write {SAMPLE_RATE} Hz mono FLAC copies (soxr; channels "
            "averaged) under --dest/audio and point the manifest there"
        )


def converted_rel(rel: str) -> str:
    return str(Path(rel).with_suffix(".flac"))


def convert_audio(src: Path, dst: Path, info: sf._SoundFileInfo) -> int:
    """Write ``src`` as 16 kHz mono FLAC; return its number of samples."""
    audio, rate = sf.read(str(src), dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)  # the same downmix fairseq's datasets apply to multi-channel audio
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE)
    # resampling can overshoot full scale a little and libsndfile does not clip by default
    mono = np.clip(mono, -1.0, 1.0)
    subtype = "PCM_24" if info.subtype in ("PCM_24", "PCM_32", "FLOAT", "DOUBLE") else "PCM_16"
    with atomic_path(dst) as tmp:
        sf.write(str(tmp), mono, SAMPLE_RATE, format="FLAC", subtype=subtype)
    return len(mono)


def link_audio(src: Path, dst: Path) -> None:
    """Hard link (no extra space) or, across filesystems, copy."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def audio_targets(
    utterances: Sequence[Utterance], infos: Sequence[sf._SoundFileInfo], audio_dir: Path
) -> list[Path]:
    return [
        audio_dir / (converted_rel(u.rel) if needs_conversion(i) else u.rel)
        for u, i in zip(utterances, infos, strict=True)
    ]


def materialize_audio(
    utterances: Sequence[Utterance],
    infos: Sequence[sf._SoundFileInfo],
    audio_dir: Path,
    jobs: int,
) -> list[tuple[str, int]]:
    """Convert (or link) every file into ``audio_dir``; return the manifest rows."""

    def one(item: tuple[Utterance, sf._SoundFileInfo]) -> tuple[str, int]:
        utt, info = item
        if needs_conversion(info):
            rel = converted_rel(utt.rel)
            return rel, convert_audio(utt.path, audio_dir / rel, info)
        link_audio(utt.path, audio_dir / utt.rel)
        return utt.rel, info.frames

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # libsndfile and soxr release the GIL
        return list(
            tqdm(
                pool.map(one, zip(utterances, infos, strict=True)),
                total=len(utterances),
                desc=f"writing audio to {audio_dir}",
                unit="file",
                disable=None,
            )
        )


# ---------------------------------------------------------------------------------------------
# The two modes.
# ---------------------------------------------------------------------------------------------


def prepare_corpus(
    root: Path,
    dirs: Sequence[Path],
    opts: LabelOptions,
    resample: bool = False,
    ext: str = "flac",
    jobs: int = 4,
) -> Path:
    """Manifest and labels for the utterances under ``dirs`` (inside the corpus ``root``)."""
    symbols = read_dictionary_symbols(opts.dict_path) if opts.dict_path else None
    check_label_conflicts(opts, with_corpus_files=True)
    utterances = collect_utterances(root, dirs, ext)
    words, letters = letter_labels(
        [u.text for u in utterances], [u.source for u in utterances], symbols
    )
    infos = read_headers(utterances, jobs)
    check_formats(utterances, infos, resample)
    audio_dir = opts.dest / "audio"
    if resample:
        check_conflicts(audio_targets(utterances, infos, audio_dir), opts.overwrite)

    outputs = letter_outputs(words, letters, opts)
    if opts.spm_vocab is not None or opts.spm_model is not None:
        outputs += sentencepiece_outputs(words, opts)
    if resample:
        manifest_root = os.path.realpath(audio_dir)
        rows = materialize_audio(utterances, infos, audio_dir, jobs)
    else:
        manifest_root = str(root)
        rows = [(u.rel, i.frames) for u, i in zip(utterances, infos, strict=True)]
    outputs += [
        Output(
            opts.dest / f"{opts.name}.tsv", lambda tmp: write_manifest(tmp, manifest_root, rows)
        ),
        Output(opts.dest / f"{opts.name}.wrd", text_writer(words)),
        Output(opts.dest / f"{opts.name}.spk", text_writer([u.speaker for u in utterances])),
    ]
    write_outputs(outputs)
    hours = sum(n for _, n in rows) / SAMPLE_RATE / 3600
    speakers = len({u.speaker for u in utterances})
    logger.info(
        f"{opts.name}: {len(rows)} utterances, {hours:.2f} h, {speakers} speakers -> {opts.dest}"
    )
    return opts.dest / f"{opts.name}.tsv"


def prepare_from_manifest(manifest: Path, words_path: Path, opts: LabelOptions) -> None:
    """Label files (``.ltr``, dictionaries, sentencepiece) for an existing manifest + ``.wrd``."""
    symbols = read_dictionary_symbols(opts.dict_path) if opts.dict_path else None
    check_label_conflicts(opts, with_corpus_files=False)
    try:
        root, rows = read_manifest(manifest)
        texts = read_labels(words_path, rows)
    except (OSError, ValueError) as error:
        raise PrepareError(str(error)) from None
    if not rows:
        raise PrepareError(f"empty dataset: {manifest} has no rows")
    missing = [
        f"{manifest}:{row.line}: audio file {root / row.path} does not exist"
        for row in rows
        if not (root / row.path).is_file()
    ]
    raise_problems(missing, "manifest row(s) name missing audio")
    sources = [f"{words_path}:{i}" for i in range(1, len(texts) + 1)]
    empty = [f"{s}: empty transcript" for s, t in zip(sources, texts, strict=True) if not t.strip()]
    raise_problems(empty, "transcript line(s) are empty")
    words, letters = letter_labels(texts, sources, symbols)
    outputs = letter_outputs(words, letters, opts)
    if opts.spm_vocab is not None or opts.spm_model is not None:
        outputs += sentencepiece_outputs(words, opts)
    write_outputs(outputs)
