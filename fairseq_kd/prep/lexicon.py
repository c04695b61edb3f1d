"""The lexicon for fairseq's KenLM lexicon beam search (``decode_kenlm``).

fairseq's ``KenLMDecoder`` reads it with flashlight's ``load_words``: one word per line, a tab, then
its spelling in the acoustic model's units, for letter CTC models the word's letters followed by
the word boundary ``|`` (as in fairseq's wav2vec README)::

    HELLO<TAB>H E L L O |

The words come from text files (every whitespace-separated token is a word), so both a ``.wrd``
transcript file and a one-word-per-line vocabulary (LibriSpeech's ``librispeech-vocab.txt``, the
words of its 4-gram) work. Words are written as they are (they must match the LM's words exactly,
case included); spellings are upper-cased like ``.ltr`` labels. A spelling unit missing from
``dict.ltr.txt`` would make fairseq's decoder stop with a bare ``AssertionError`` after the model
is loaded, so it is reported here with its ``file:line`` (or counted and skipped on request).

Usage::

    fairseq-kd-lexicon manifests/train.wrd --dict manifests/dict.ltr.txt --out runs/lm/lexicon.txt
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from fairseq_kd.prep.prepare_asr import PrepareError, atomic_path, format_problems

WORD_BOUNDARY = "|"


def spell(word: str) -> list[str]:
    """Letter units of ``word`` as ``.ltr`` labels have them, then the word boundary."""
    return list(word.upper()) + [WORD_BOUNDARY]


def read_words(paths: Sequence[Path]) -> dict[str, str]:
    """``{word: "file:line" of its first occurrence}``, in the order the words first appear."""
    words: dict[str, str] = {}
    for path in paths:
        if not path.is_file():
            raise PrepareError(f"word file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                for word in line.split():
                    words.setdefault(word, f"{path}:{lineno}")
    if not words:
        raise PrepareError(f"no words in {', '.join(map(str, paths))}")
    return words


def lexicon_lines(
    words: dict[str, str], symbols: set[str], skip_unspellable: bool = False
) -> tuple[list[str], list[str]]:
    """Sorted ``word<TAB>spelling`` lines and the problems (``file:line: ...``) of the others.

    With ``skip_unspellable`` the problems are only reported back; otherwise any problem is an error.
    """
    lines, problems = [], []
    for word, source in words.items():
        units = spell(word)
        missing = sorted(set(units) - symbols)
        if missing:
            problems.append(f"{source}: word {word!r} has units {missing} not in the dictionary")
        else:
            lines.append(f"{word}\t{' '.join(units)}")
    if problems and not skip_unspellable:
        raise PrepareError(
            format_problems(problems, "word(s) cannot be spelled with the dictionary")
            + "\npass --skip-unspellable to leave them out of the lexicon"
        )
    return sorted(lines), problems


def write_lexicon(path: Path, lines: Iterable[str]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
