"""Generate the bundled mini speech corpus (``manifests/``) with espeak-ng.

The corpus is small enough to commit (well under 20 MB) and big enough for smoke tests, tiny
CTC students and keyword-spotting / speaker-verification probes. Everything is synthetic: the
text comes from a seeded template grammar defined below and the audio from the espeak-ng formant
synthesiser, so there are no licensing or privacy issues with recorded speech.

A *speaker* is a fixed combination of an English espeak-ng base voice (accent), a voice variant
(``+m3``, ``+f2``, ``+klatt``, ...), a pitch and a base speaking rate; speakers get stable ids
such as ``spk017``. Two parts are generated:

* an ASR corpus (``train``/``valid``/``test``) of short English sentences with letter labels;
* a keyword corpus under ``keywords/`` with the ten Speech Commands words as ~1 s clips, split by
  speaker (disjoint speakers per split) with a VoxCeleb1-style ``trials.txt`` over the test split.

Layout written under ``--out`` (paths in manifests are relative so the folder can move)::

    audio/{train,valid,test,keywords}/<utt_id>.flac   16 kHz mono FLAC (PCM_16)
    {train,valid,test}.{tsv,ltr,wrd,spk}              fairseq manifest + labels, root line ``audio``
    dict.ltr.txt                                      letter dictionary over the train split
    keywords/{train,valid,test}.{tsv,kw,spk}          root line ``../audio``
    keywords/dict.kw.txt, keywords/trials.txt
    README.md

Generation is deterministic for a given seed and espeak-ng version: every utterance draws from
its own ``random.Random`` seeded by (seed, split, index), so parallel synthesis cannot change the
result.

Usage (the command line is ``fairseq_kd/cli/mini_corpus.py``)::

    fairseq-kd-make-corpus --out manifests
"""

from __future__ import annotations

import io
import itertools
import random
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

# soxr is the maintained binding of libsoxr, the resampler librosa uses by default; torchaudio is in
# maintenance mode and cannot load audio with the CPU-only torch build used here.
import soxr

from fairseq_kd.data.manifest import write_manifest

SAMPLE_RATE = 16000
ASR_SPLITS = ("train", "valid", "test")
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
MAX_CORPUS_BYTES = 20_000_000  # hard limit for the committed corpus
INSTALL_HINT = "install it with `apt-get update && apt-get install -y espeak-ng`"

# English espeak-ng base voices (``espeak-ng --voices=en``) that use espeak's own synthesiser;
# the ``mb-*`` MBROLA voices need extra packages with their own licences and are not used.
BASE_VOICES = (
    "en-us",
    "en",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-rp",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)

# Variants (``espeak-ng --voices=variant``, file names under ``!v/``; case matters). Whispering and
# deliberately distorted variants are left out: they are hard to learn and cost many FLAC bytes.
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
    "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "croak",
    "adam", "Alex", "Andy", "Annie", "anika", "antonio", "aunty", "belinda", "benjamin", "boris",
    "caleb", "david", "Denis", "Diogo", "edward", "Gene", "grandma", "grandpa", "gustave",
    "Henrique", "Hugo", "iven", "Jacky", "john", "Lee", "linda", "marcelo", "max", "Michael",
    "michel", "miguel", "norbert", "paul", "quincy", "rob", "robert", "steph", "Storm", "travis",
    "victor", "zac",
)  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Text: a seeded template grammar over a few hundred common words.
# ---------------------------------------------------------------------------------------------

NOUNS = """
dog cat bird fish horse cow sheep fox bear wolf mouse rabbit duck goat frog tiger lion monkey
zebra king queen child boy girl man woman farmer teacher doctor driver sailor baker painter
soldier student neighbor friend brother sister mother father uncle wizard house garden kitchen
window door table chair bed lamp box bag basket bottle cup plate knife spoon book letter paper
pencil picture map key clock phone radio coat jacket shirt hat shoe ring ball kite boat ship
train truck car bicycle bridge road river lake ocean beach island mountain hill forest field
valley village city market school church castle tower station office library museum hotel farm
barn fence wall roof stone tree flower leaf apple orange lemon banana cake jar jewel quilt
violin puzzle question answer story song dream game
""".split()

MASS_NOUNS = """
bread cheese butter honey milk juice soup coffee tea sugar salt water rice jam grass snow
""".split()

ADJECTIVES = """
big small old young new red blue green yellow black white brown gray quiet loud quick slow
happy sad angry tired hungry lazy busy clever brave gentle strange lovely pretty heavy light
warm cold hot dark bright clean dirty empty full broken tiny huge soft hard sweet fresh wild
famous friendly noisy cozy fuzzy crazy jolly wooden golden silver
""".split()

# (base form, past tense); third person singular is derived by ``third_person``.
TRANSITIVE_VERBS = (
    ("take", "took"), ("make", "made"), ("find", "found"), ("see", "saw"), ("bring", "brought"),
    ("carry", "carried"), ("paint", "painted"), ("fix", "fixed"), ("open", "opened"),
    ("close", "closed"), ("wash", "washed"), ("buy", "bought"), ("sell", "sold"),
    ("build", "built"), ("break", "broke"), ("push", "pushed"), ("pull", "pulled"),
    ("kick", "kicked"), ("catch", "caught"), ("throw", "threw"), ("hold", "held"),
    ("draw", "drew"), ("cook", "cooked"), ("watch", "watched"), ("follow", "followed"),
    ("chase", "chased"), ("visit", "visited"), ("clean", "cleaned"), ("move", "moved"),
    ("hide", "hid"), ("need", "needed"), ("want", "wanted"), ("love", "loved"), ("like", "liked"),
    ("hear", "heard"), ("keep", "kept"), ("lose", "lost"), ("borrow", "borrowed"),
    ("squeeze", "squeezed"), ("juggle", "juggled"), ("wrap", "wrapped"), ("mix", "mixed"),
    ("fetch", "fetched"), ("lift", "lifted"), ("drop", "dropped"), ("touch", "touched"),
    ("forget", "forgot"), ("remember", "remembered"), ("explain", "explained"),
    ("enjoy", "enjoyed"), ("check", "checked"), ("pack", "packed"), ("freeze", "froze"),
)  # fmt: skip

INTRANSITIVE_VERBS = (
    ("sleep", "slept"), ("run", "ran"), ("walk", "walked"), ("sing", "sang"), ("dance", "danced"),
    ("laugh", "laughed"), ("cry", "cried"), ("jump", "jumped"), ("swim", "swam"),
    ("shout", "shouted"), ("smile", "smiled"), ("wait", "waited"), ("fall", "fell"),
    ("sit", "sat"), ("work", "worked"), ("play", "played"), ("travel", "traveled"),
    ("rest", "rested"), ("whisper", "whispered"), ("hurry", "hurried"), ("wander", "wandered"),
    ("stay", "stayed"), ("arrive", "arrived"), ("relax", "relaxed"), ("climb", "climbed"),
)  # fmt: skip

NAMES = """
anna peter james maria lucy oliver sophie jack emma kate paul zoe max ruby victor hugo julia
quentin oscar grace henry ella leo nora felix ivy sam alex owen jasmine
""".split()

ADVERBS = """
quickly slowly quietly loudly happily carefully again today yesterday tomorrow tonight often
early late outside inside together alone suddenly gladly
""".split()

PREPOSITIONS = """
in on under near behind beside into across over with from to at around through without for
after before inside along
""".split()

DETERMINERS = "the the the a this that my your his her our their every one".split()
PLURAL_DETERMINERS = "the some many two three those these few all".split()
SUBJECT_PRONOUNS = "i you we they he she".split()
MODALS = "will can should must might could would".split()
NEGATED_MODALS = "won't can't don't didn't couldn't shouldn't wouldn't".split()
INTENSIFIERS = "very so too really quite".split()
IRREGULAR_PLURALS = {
    "child": "children", "man": "men", "woman": "women", "mouse": "mice", "sheep": "sheep",
    "fish": "fish", "leaf": "leaves", "knife": "knives", "wolf": "wolves",
}  # fmt: skip


def third_person(verb: str) -> str:
    """Third person singular present: ``catch`` -> ``catches``, ``carry`` -> ``carries``."""
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def plural(noun: str) -> str:
    """English plural for the grammar's nouns."""
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("s", "sh", "ch", "x", "z")):
        return noun + "es"
    return noun + "s"


class SentenceGrammar:
    """Seeded template grammar; ``sentence(rng)`` returns lowercase words (4-12 of them)."""

    def __init__(self, min_words: int = 4, max_words: int = 12) -> None:
        self.min_words = min_words
        self.max_words = max_words
        self.templates: list[Callable[[random.Random], list[str]]] = [
            self._past_transitive,
            self._modal,
            self._present,
            self._past_intransitive,
            self._question,
            self._wh_question,
            self._description,
            self._lets,
            self._there_is,
            self._negated,
            self._imperative,
            self._i_think,
            self._compound,
            self._when,
        ]

    def sentence(self, rng: random.Random) -> list[str]:
        # Rejection keeps the template mix simple while bounding the length.
        while True:
            words = rng.choice(self.templates)(rng)
            if self.min_words <= len(words) <= self.max_words:
                return words

    # -- phrases ------------------------------------------------------------------------------
    @staticmethod
    def _article(det: str, next_word: str) -> str:
        return "an" if det == "a" and next_word[0] in "aeiou" else det

    def noun_phrase(self, rng: random.Random, allow_plural: bool = True) -> list[str]:
        roll = rng.random()
        if roll < 0.15:
            return [rng.choice(NAMES)]
        if roll < 0.25 and allow_plural:
            words = [plural(rng.choice(NOUNS))]
            if rng.random() < 0.5:
                words.insert(0, rng.choice(ADJECTIVES))
            return [rng.choice(PLURAL_DETERMINERS)] + words
        if roll < 0.32:
            return [rng.choice(("some", "the", "more", "fresh")), rng.choice(MASS_NOUNS)]
        words = [rng.choice(NOUNS)]
        if rng.random() < 0.45:
            words.insert(0, rng.choice(ADJECTIVES))
        det = rng.choice(DETERMINERS)
        return [self._article(det, words[0])] + words

    def singular_subject(self, rng: random.Random) -> list[str]:
        if rng.random() < 0.3:
            return [rng.choice(NAMES)]
        words = [rng.choice(NOUNS)]
        if rng.random() < 0.4:
            words.insert(0, rng.choice(ADJECTIVES))
        det = rng.choice(("the", "the", "a", "my", "your", "our", "that"))
        return [self._article(det, words[0])] + words

    def prep_phrase(self, rng: random.Random) -> list[str]:
        return [rng.choice(PREPOSITIONS)] + self.noun_phrase(rng)

    def _maybe(
        self, rng: random.Random, p: float, make: Callable[[random.Random], list[str]]
    ) -> list[str]:
        return make(rng) if rng.random() < p else []

    @staticmethod
    def _adverb(rng: random.Random) -> list[str]:
        return [rng.choice(ADVERBS)]

    # -- templates ----------------------------------------------------------------------------
    def _past_transitive(self, rng: random.Random) -> list[str]:
        verb = rng.choice(TRANSITIVE_VERBS)[1]
        return (
            self.noun_phrase(rng) + [verb] + self.noun_phrase(rng)
            + self._maybe(rng, 0.5, self.prep_phrase) + self._maybe(rng, 0.3, self._adverb)
        )  # fmt: skip

    def _modal(self, rng: random.Random) -> list[str]:
        verb = rng.choice(TRANSITIVE_VERBS)[0]
        return (
            [rng.choice(SUBJECT_PRONOUNS), rng.choice(MODALS), verb] + self.noun_phrase(rng)
            + self._maybe(rng, 0.5, self.prep_phrase)
        )  # fmt: skip

    def _present(self, rng: random.Random) -> list[str]:
        verb = third_person(rng.choice(TRANSITIVE_VERBS)[0])
        return (
            self.singular_subject(rng)
            + [verb]
            + self.noun_phrase(rng)
            + self._maybe(rng, 0.4, self._adverb)
        )

    def _past_intransitive(self, rng: random.Random) -> list[str]:
        verb = rng.choice(INTRANSITIVE_VERBS)[1]
        return (
            self.noun_phrase(rng)
            + [verb]
            + self.prep_phrase(rng)
            + self._maybe(rng, 0.4, self._adverb)
        )

    def _question(self, rng: random.Random) -> list[str]:
        verb = rng.choice(TRANSITIVE_VERBS)[0]
        aux = rng.choice(("did", "will", "can", "could", "should"))
        return (
            [aux]
            + self.noun_phrase(rng)
            + [verb]
            + self.noun_phrase(rng)
            + self._maybe(rng, 0.4, self.prep_phrase)
        )

    def _wh_question(self, rng: random.Random) -> list[str]:
        wh = rng.choice(("where", "why", "when", "how"))
        if rng.random() < 0.5:
            return (
                [wh, "did"]
                + self.noun_phrase(rng)
                + [rng.choice(INTRANSITIVE_VERBS)[0]]
                + self._maybe(rng, 0.4, self._adverb)
            )
        return (
            [wh, rng.choice(("is", "was"))]
            + self.singular_subject(rng)
            + [rng.choice(INTENSIFIERS), rng.choice(ADJECTIVES)]
        )

    def _description(self, rng: random.Random) -> list[str]:
        start = rng.choice(
            (["it's"], ["that's"], ["this", "is"], ["she's"], ["he's"], ["it", "was"])
        )
        det = rng.choice(("a", "the", "my", "our"))
        adjectives = [rng.choice(ADJECTIVES) for _ in range(rng.randint(1, 2))]
        return (
            start
            + [self._article(det, adjectives[0])]
            + adjectives
            + [rng.choice(NOUNS)]
            + self._maybe(rng, 0.5, self.prep_phrase)
        )

    def _lets(self, rng: random.Random) -> list[str]:
        return (
            ["let's", rng.choice(TRANSITIVE_VERBS)[0]]
            + self.noun_phrase(rng)
            + self._maybe(rng, 0.7, self.prep_phrase)
        )

    def _there_is(self, rng: random.Random) -> list[str]:
        adjective = rng.choice(ADJECTIVES)
        return [
            rng.choice(("there's", "here's", "that's")),
            self._article("a", adjective),
            adjective,
            rng.choice(NOUNS),
        ] + self.prep_phrase(rng)

    def _negated(self, rng: random.Random) -> list[str]:
        subject = [rng.choice(NAMES)] if rng.random() < 0.5 else [rng.choice(SUBJECT_PRONOUNS)]
        return (
            subject
            + [rng.choice(NEGATED_MODALS), rng.choice(TRANSITIVE_VERBS)[0]]
            + self.noun_phrase(rng)
            + self._maybe(rng, 0.4, self._adverb)
        )

    def _imperative(self, rng: random.Random) -> list[str]:
        start = ["please"] if rng.random() < 0.5 else []
        return (
            start
            + [rng.choice(TRANSITIVE_VERBS)[0]]
            + self.noun_phrase(rng)
            + self.prep_phrase(rng)
        )

    def _i_think(self, rng: random.Random) -> list[str]:
        start = rng.choice(
            (["i", "think"], ["we", "know"], ["they", "said"], ["i'm", "sure"], ["maybe"])
        )
        return start + self._past_intransitive(rng)

    def _compound(self, rng: random.Random) -> list[str]:
        verb = rng.choice(INTRANSITIVE_VERBS)[1]
        return [rng.choice(NAMES), "and"] + self.noun_phrase(rng) + [verb] + self._adverb(rng)

    def _when(self, rng: random.Random) -> list[str]:
        first = rng.choice(INTRANSITIVE_VERBS)[1]
        second = rng.choice(TRANSITIVE_VERBS)[1]
        return (
            [rng.choice(("when", "after", "before", "because"))]
            + [rng.choice(NAMES), first, rng.choice(SUBJECT_PRONOUNS), second]
            + self.noun_phrase(rng)
        )


# ---------------------------------------------------------------------------------------------
# Labels (pure functions; unit-tested without espeak-ng).
# ---------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"^[A-Z']+$")


def normalize_words(text: str) -> list[str]:
    """Uppercase and split; raise ``ValueError`` for anything but A-Z and apostrophes."""
    words = text.upper().split()
    for word in words:
        if not _WORD_RE.match(word):
            raise ValueError(f"word {word!r} in {text!r} has characters outside A-Z and apostrophe")
    return words


def text_to_ltr(text: str) -> str:
    """fairseq letter labels as ``examples/wav2vec/libri_labels.py`` writes them.

    ``"hello world"`` -> ``"H E L L O | W O R L D |"``.
    """
    return " ".join(list("|".join(normalize_words(text)))) + " |"


def letter_dictionary(ltr_lines: Iterable[str]) -> list[tuple[str, int]]:
    """``(symbol, count)`` pairs sorted by descending count (ties by symbol), fairseq dict order."""
    counts = Counter(symbol for line in ltr_lines for symbol in line.split())
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def write_dictionary(path: Path, entries: Iterable[tuple[str, int]]) -> None:
    path.write_text("".join(f"{symbol} {count}\n" for symbol, count in entries))


# ---------------------------------------------------------------------------------------------
# Speakers and audio.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speaker:
    id: str
    voice: str
    variant: str
    pitch: int  # espeak-ng -p, 0-99
    rate: int  # espeak-ng -s, words per minute

    @property
    def espeak_voice(self) -> str:
        return f"{self.voice}+{self.variant}"


@dataclass(frozen=True)
class Job:
    """One clip to synthesise; ASR words are drawn from ``seed``, keyword jobs set ``keyword``."""

    utt_id: str
    split: str  # train/valid/test (keyword clips live in audio/keywords whatever the split)
    speaker: Speaker
    seed: str  # seeds the utterance's own random.Random
    keyword: str | None = None


@dataclass(frozen=True)
class Clip:
    job: Job
    words: tuple[str, ...]
    num_samples: int


def make_speakers(count: int, rng: random.Random) -> list[Speaker]:
    """``count`` speakers with distinct (voice, variant) pairs; neighbours differ in variant."""
    variants = list(VARIANTS)
    voices = list(BASE_VOICES)
    rng.shuffle(variants)
    rng.shuffle(voices)
    if count > len(variants) * len(voices):
        raise ValueError(
            f"at most {len(variants) * len(voices)} speakers are possible, asked for {count}"
        )
    speakers = []
    for k in range(count):
        # Cycling variants and (offset) voices separately gives every k a new (voice, variant) pair.
        variant = variants[k % len(variants)]
        voice = voices[(k + k // len(variants)) % len(voices)]
        speakers.append(
            Speaker(
                f"spk{k:03d}",
                voice,
                variant,
                pitch=rng.randint(20, 80),
                rate=rng.randint(150, 200),
            )
        )
    return speakers


def check_espeak(espeak: str) -> str:
    """Return the espeak-ng version line; exit with an install hint when the binary is missing."""
    path = shutil.which(espeak)
    if path is None:
        raise SystemExit(
            f"error: espeak-ng executable {espeak!r} not found on PATH; {INSTALL_HINT}"
        )
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"text-to-speech:\s*(\S+)", version)
    return f"espeak-ng {match.group(1) if match else version.strip()}"


def check_voices(espeak: str) -> None:
    """espeak-ng silently falls back to a default for unknown voices, so verify ours exist."""
    languages = subprocess.run(
        [espeak, "--voices=en"], capture_output=True, text=True, check=True
    ).stdout
    known_languages = {line.split()[1] for line in languages.splitlines()[1:] if line.split()}
    variants = subprocess.run(
        [espeak, "--voices=variant"], capture_output=True, text=True, check=True
    ).stdout
    known_variants = {m.group(1) for m in re.finditer(r"!v/(\S+)", variants)}
    missing = [v for v in BASE_VOICES if v not in known_languages]
    missing += [f"+{v}" for v in VARIANTS if v not in known_variants]
    if missing:
        raise SystemExit(
            f"error: this espeak-ng lacks voices {missing}; the corpus definition needs them "
            f"({INSTALL_HINT}; tested with espeak-ng 1.51)"
        )


def synthesize(espeak: str, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """Speak ``text`` and return float32 mono audio at 16 kHz."""
    command = [espeak, "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text]
    wav = subprocess.run(command, capture_output=True, check=True).stdout
    audio, rate_in = sf.read(io.BytesIO(wav), dtype="float32")  # 22050 Hz for espeak voices
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    return soxr.resample(audio, rate_in, SAMPLE_RATE).astype(np.float32)


def active_span(audio: np.ndarray, threshold_db: float = -40.0) -> tuple[int, int]:
    """First and one-past-last sample louder than ``threshold_db`` relative to the peak."""
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak == 0.0:
        raise ValueError("espeak-ng produced silence")
    loud = np.nonzero(np.abs(audio) > peak * 10 ** (threshold_db / 20))[0]
    return int(loud[0]), int(loud[-1]) + 1


def trim_silence(audio: np.ndarray, keep_s: float = 0.1) -> np.ndarray:
    """Cut leading/trailing silence down to ``keep_s`` seconds (espeak adds ~0.3 s at the end)."""
    start, end = active_span(audio)
    keep = int(keep_s * SAMPLE_RATE)
    return audio[max(0, start - keep) : min(len(audio), end + keep)]


def normalize_loudness(
    audio: np.ndarray, target_dbfs: float = -28.0, max_peak: float = 0.9
) -> np.ndarray:
    """Scale speech to a LibriSpeech-like RMS level; quieter audio also makes smaller FLAC files."""
    start, end = active_span(audio)
    rms = float(np.sqrt(np.mean(audio[start:end] ** 2)))
    gain = 10 ** (target_dbfs / 20) / rms
    gain = min(gain, max_peak / float(np.abs(audio).max()))
    return (audio * gain).astype(np.float32)


def fit_keyword(audio: np.ndarray, rng: random.Random, length: int = SAMPLE_RATE) -> np.ndarray:
    """Place the spoken word at a random offset in a zero-padded clip of ``length`` samples."""
    start, end = active_span(audio)
    word = audio[start:end][: length - 2 * int(0.05 * SAMPLE_RATE)]
    margin = int(0.05 * SAMPLE_RATE)
    offset = rng.randint(margin, length - margin - len(word))
    clip = np.zeros(length, dtype=np.float32)
    clip[offset : offset + len(word)] = word
    return clip


def write_flac(path: Path, audio: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # compression_level=1.0 is FLAC's strongest setting (-8): a few percent smaller, same samples.
    sf.write(str(path), audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16", compression_level=1.0)


def render_asr(
    job: Job, out: Path, espeak: str, grammar: SentenceGrammar, min_s: float, max_s: float
) -> Clip:
    """Draw a sentence for ``job`` and synthesise it, redrawing until the duration fits."""
    rng = random.Random(job.seed)
    for _ in range(50):
        words = grammar.sentence(rng)
        rate = round(job.speaker.rate * rng.uniform(0.9, 1.1))
        pitch = min(99, max(0, job.speaker.pitch + rng.randint(-4, 4)))
        audio = trim_silence(
            synthesize(espeak, " ".join(words), job.speaker.espeak_voice, rate, pitch)
        )
        if min_s * SAMPLE_RATE <= len(audio) <= max_s * SAMPLE_RATE:
            break
    else:
        raise RuntimeError(
            f"{job.utt_id}: no sentence between {min_s} and {max_s} s after 50 draws"
        )
    audio = normalize_loudness(audio)
    write_flac(out / "audio" / job.split / f"{job.utt_id}.flac", audio)
    return Clip(job, tuple(words), len(audio))


def render_keyword(job: Job, out: Path, espeak: str, take: int) -> Clip:
    """One ~1 s keyword clip; later takes change rate and pitch so they are not copies."""
    rng = random.Random(job.seed)
    # Isolated command words are spoken more slowly than running speech.
    rate = round(job.speaker.rate * 0.8 * (1.0 if take == 0 else rng.choice((0.85, 1.15))))
    pitch = (
        job.speaker.pitch if take == 0 else min(99, max(0, job.speaker.pitch + rng.choice((-8, 8))))
    )
    audio = synthesize(espeak, job.keyword or "", job.speaker.espeak_voice, rate, pitch)
    clip = fit_keyword(normalize_loudness(audio), rng)
    write_flac(out / "audio" / "keywords" / f"{job.utt_id}.flac", clip)
    return Clip(job, (job.keyword or "",), len(clip))


# ---------------------------------------------------------------------------------------------
# Corpus assembly.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusConfig:
    seed: int = 1234
    # Sized so that the corpus stays around 14 MB (~16 kB per second of FLAC speech).
    asr_utterances: tuple[int, int, int] = (210, 24, 24)  # train, valid, test
    asr_speakers: int = 48
    keyword_speakers: tuple[int, int, int] = (24, 6, 8)  # disjoint train/valid/test speakers
    keyword_takes: tuple[int, int, int] = (2, 1, 1)  # takes per speaker and keyword, per split
    trials_per_label: int = 300
    min_seconds: float = 1.5
    max_seconds: float = 5.0
    min_words: int = 4
    max_words: int = 10


def asr_jobs(config: CorpusConfig, speakers: Sequence[Speaker]) -> list[Job]:
    jobs = []
    for split, count in zip(ASR_SPLITS, config.asr_utterances):
        order = list(speakers)
        random.Random(f"{config.seed}:order:{split}").shuffle(order)
        for i in range(count):
            speaker = order[i % len(order)]  # round robin keeps speakers balanced
            jobs.append(
                Job(f"{speaker.id}-{split}-{i:04d}", split, speaker, f"{config.seed}:{split}:{i}")
            )
    return jobs


def keyword_jobs(
    config: CorpusConfig, speakers_by_split: dict[str, list[Speaker]]
) -> list[tuple[Job, int]]:
    jobs = []
    for split, takes in zip(ASR_SPLITS, config.keyword_takes):
        for speaker in speakers_by_split[split]:
            for keyword in KEYWORDS:
                for take in range(takes):
                    utt_id = f"{speaker.id}-{keyword}-{take}"
                    jobs.append(
                        (Job(utt_id, split, speaker, f"{config.seed}:kw:{utt_id}", keyword), take)
                    )
    return jobs


def make_trials(
    clips: Sequence[Clip], per_label: int, rng: random.Random
) -> list[tuple[int, str, str]]:
    """Balanced VoxCeleb1-style trials: ``per_label`` same-speaker and different-speaker pairs."""
    paths = [(c.job.speaker.id, f"keywords/{c.job.utt_id}.flac") for c in clips]
    pairs = list(itertools.combinations(paths, 2))
    target = [(1, a[1], b[1]) for a, b in pairs if a[0] == b[0]]
    nontarget = [(0, a[1], b[1]) for a, b in pairs if a[0] != b[0]]
    count = min(per_label, len(target), len(nontarget))
    trials = rng.sample(target, count) + rng.sample(nontarget, count)
    rng.shuffle(trials)
    return trials


def write_split_files(
    folder: Path, split: str, root: str, clips: Sequence[Clip], rel_dir: str
) -> None:
    write_manifest(
        folder / f"{split}.tsv",
        root,
        [(f"{rel_dir}/{c.job.utt_id}.flac", c.num_samples) for c in clips],
    )
    (folder / f"{split}.spk").write_text("".join(f"{c.job.speaker.id}\n" for c in clips))


def write_asr_labels(folder: Path, split: str, clips: Sequence[Clip]) -> list[str]:
    texts = [" ".join(c.words) for c in clips]
    ltr = [text_to_ltr(t) for t in texts]
    (folder / f"{split}.wrd").write_text(
        "".join(" ".join(normalize_words(t)) + "\n" for t in texts)
    )
    (folder / f"{split}.ltr").write_text("".join(line + "\n" for line in ltr))
    return ltr


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_jobs(jobs: Sequence[Callable[[], Clip]], num_workers: int) -> list[Clip]:
    # Threads suffice: the work happens in espeak-ng subprocesses and numpy/soxr/libsndfile.
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        return list(pool.map(lambda job: job(), jobs))


def generate(
    out: Path, config: CorpusConfig, espeak: str = "espeak-ng", num_workers: int = 2
) -> dict[str, object]:
    """Write the whole corpus into the (new, empty) folder ``out``; return statistics."""
    espeak_version = check_espeak(espeak)
    check_voices(espeak)
    rng = random.Random(config.seed)
    grammar = SentenceGrammar(config.min_words, config.max_words)
    n_kw = config.keyword_speakers
    speakers = make_speakers(config.asr_speakers + sum(n_kw), rng)
    asr_speakers = speakers[: config.asr_speakers]
    kw_pool = speakers[config.asr_speakers :]
    kw_speakers = {
        "train": kw_pool[: n_kw[0]],
        "valid": kw_pool[n_kw[0] : n_kw[0] + n_kw[1]],
        "test": kw_pool[n_kw[0] + n_kw[1] :],
    }

    tasks: list[Callable[[], Clip]] = [
        (lambda j=j: render_asr(j, out, espeak, grammar, config.min_seconds, config.max_seconds))
        for j in asr_jobs(config, asr_speakers)
    ]
    tasks += [
        (lambda j=j, t=t: render_keyword(j, out, espeak, t))
        for j, t in keyword_jobs(config, kw_speakers)
    ]
    clips = run_jobs(tasks, num_workers)

    stats: dict[str, object] = {"espeak": espeak_version, "seed": config.seed}
    asr_clips = [c for c in clips if c.job.keyword is None]
    kw_clips = [c for c in clips if c.job.keyword is not None]
    ltr_by_split = {}
    for split in ASR_SPLITS:
        split_clips = [c for c in asr_clips if c.job.split == split]
        write_split_files(out, split, "audio", split_clips, split)
        ltr_by_split[split] = write_asr_labels(out, split, split_clips)
        stats[f"asr_{split}"] = (len(split_clips), len({c.job.speaker.id for c in split_clips}),
                                 sum(c.num_samples for c in split_clips) / SAMPLE_RATE)  # fmt: skip
    dictionary = letter_dictionary(ltr_by_split["train"])
    write_dictionary(out / "dict.ltr.txt", dictionary)
    check_letters(dictionary, ltr_by_split)

    kw_folder = out / "keywords"
    kw_folder.mkdir()
    for split in ASR_SPLITS:
        split_clips = [c for c in kw_clips if c.job.split == split]
        write_split_files(kw_folder, split, "../audio", split_clips, "keywords")
        (kw_folder / f"{split}.kw").write_text("".join(f"{c.job.keyword}\n" for c in split_clips))
        stats[f"kw_{split}"] = (len(split_clips), len(kw_speakers[split]), len(split_clips) * 1.0)
    train_counts = Counter(c.job.keyword for c in kw_clips if c.job.split == "train")
    write_dictionary(kw_folder / "dict.kw.txt", [(k, train_counts[k]) for k in KEYWORDS])
    trials = make_trials([c for c in kw_clips if c.job.split == "test"], config.trials_per_label,
                         random.Random(f"{config.seed}:trials"))  # fmt: skip
    (kw_folder / "trials.txt").write_text("".join(f"{label} {a} {b}\n" for label, a, b in trials))
    stats["trials"] = len(trials)
    stats["speakers"] = len(speakers)
    (out / "README.md").write_text(render_readme(stats))
    stats["bytes"] = directory_bytes(out)
    return stats


def check_letters(
    dictionary: Sequence[tuple[str, int]], ltr_by_split: dict[str, list[str]]
) -> None:
    """The train dictionary must cover A-Z, the apostrophe and every valid/test symbol."""
    symbols = {s for s, _ in dictionary}
    missing = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ'|") - symbols
    for split in ("valid", "test"):
        missing |= {s for line in ltr_by_split[split] for s in line.split()} - symbols
    if missing:
        raise RuntimeError(
            f"train split lacks symbols {sorted(missing)}; use more train utterances"
        )


def render_readme(stats: dict[str, object]) -> str:
    rows = []
    for part in ("asr", "kw"):
        for split in ASR_SPLITS:
            n, spk, seconds = stats[f"{part}_{split}"]  # type: ignore[misc]
            name = split if part == "asr" else f"keywords/{split}"
            rows.append(f"| `{name}` | {n} | {spk} | {seconds:.0f} |")
    table = "\n".join(rows)
    return f"""# Bundled mini speech corpus

Synthetic English speech for tests, smoke runs and tiny students. Generated by
`fairseq_kd/prep/mini_corpus.py` with {stats["espeak"]} (seed {stats["seed"]}); do not edit by hand.

## Regenerate

From the repository root (needs `apt-get install espeak-ng`; takes well under a minute):

    fairseq-kd-make-corpus --out manifests

The result is deterministic for a given seed and espeak-ng version.

## Contents

| split | clips | speakers | seconds |
|---|---|---|---|
{table}

A speaker is a fixed espeak-ng (base voice, variant, pitch, base rate) combination with a stable
id (`spk000`...). ASR speakers are shared by train/valid/test; keyword speakers are disjoint across
the keyword splits and disjoint from the ASR speakers. All audio is 16 kHz mono FLAC (PCM_16).

## Layout

- `audio/{{train,valid,test,keywords}}/<utt_id>.flac`
- `{{train,valid,test}}.tsv`: fairseq manifests; the root line is the relative path `audio`, which
  `fairseq_kd.data.manifest` resolves against this folder (fairseq itself resolves it against the
  working directory, so run fairseq from this folder or use our compatibility layer).
- `{{split}}.ltr` letter labels as fairseq's `libri_labels.py` writes them
  (`H E L L O | W O R L D |`), `{{split}}.wrd` uppercase words, `{{split}}.spk` speaker ids;
  one line per manifest row.
- `dict.ltr.txt`: letter dictionary (`<symbol> <count>`, train split, `|` is the word boundary).
- `keywords/{{train,valid,test}}.tsv` (root `../audio`) with `.kw` (keyword), `.spk` (speaker);
  `keywords/dict.kw.txt` lists the ten Speech Commands keywords (yes no up down left right on off
  stop go); clips are 1.0 s with the word at a random offset in digital silence.
- `keywords/trials.txt`: {stats["trials"]} balanced speaker-verification trials over the
  keyword test split in the VoxCeleb1 format `<1|0> <path_a> <path_b>` (paths as in the
  manifest rows).

## License

Entirely synthetic: the sentences come from the seeded template grammar in `mini_corpus.py` and the
audio from the espeak-ng formant synthesiser (no recordings of people; the MBROLA voices, which have
their own licences, are not used). espeak-ng itself is GPL-3.0-or-later; as the GPL FAQ explains,
the output of a program is in general not covered by the program's license, so the corpus is
distributed under this repository's license.
"""


def replace_corpus(built: Path, out: Path) -> None:
    """Swap the freshly built folder into place; only an earlier corpus (or nothing) is replaced."""
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        built.rename(out)
        keep_other_files(old, out)
        shutil.rmtree(old)
    else:
        built.rename(out)


def keep_other_files(old: Path, new: Path) -> None:
    """Move every file of ``old`` that the new corpus does not have into ``new``: a re-run replaces
    the corpus' own files and nothing else the user keeps in the folder."""
    for path in sorted(old.rglob("*")):
        target = new / path.relative_to(old)
        if path.is_dir() or target.exists() or target.is_symlink():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)


def looks_replaceable(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir()) or (out / "train.tsv").is_file()


def build_corpus(out: Path, config: CorpusConfig, espeak: str, jobs: int, max_bytes: int) -> dict[str, object]:
    """Generate the corpus in a temporary folder beside ``out``, then swap it into place.

    ``out`` is left untouched when generation fails or the corpus is larger than ``max_bytes``.
    Returns the statistics ``generate`` collected.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        stats = generate(built, config, espeak, jobs)
        if stats["bytes"] > max_bytes:  # type: ignore[operator]
            raise SystemExit(
                f"error: corpus is {stats['bytes']} bytes > --max-bytes {max_bytes}; "
                "lower the counts"
            )
        built.chmod(0o755)  # mkdtemp creates 0700
        replace_corpus(built, out)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return stats
