"""``fairseq-kd-lexicon``: the word -> letters lexicon of fairseq's KenLM beam search.

The command line of ``fairseq_kd/prep/lexicon.py``, which documents the format. Usage::

    fairseq-kd-lexicon manifests/train.wrd --dict manifests/dict.ltr.txt --out runs/lm/lexicon.txt
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from fairseq_kd.prep.lexicon import lexicon_lines, read_words, write_lexicon
from fairseq_kd.prep.prepare_asr import PrepareError, check_conflicts, read_dictionary_symbols
from fairseq_kd.cli.errors import clean_errors, report
from fairseq_kd.cli.logs import add_verbose_argument, configure

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-lexicon",
        description="Write the word -> letters lexicon that decode_kenlm (decoding.lexicon) reads.",
    )
    parser.add_argument(
        "words",
        type=Path,
        nargs="+",
        metavar="WORDS",
        help="text files whose whitespace-separated tokens are the words (.wrd transcripts or a "
        "one-word-per-line vocabulary such as librispeech-vocab.txt)",
    )
    parser.add_argument(
        "--dict", type=Path, required=True, help="the model's dict.ltr.txt (its letter units)"
    )
    parser.add_argument("--out", type=Path, required=True, help="lexicon file to write")
    parser.add_argument(
        "--skip-unspellable",
        action="store_true",
        help="leave out (and count) words with units missing from --dict instead of stopping",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_verbose_argument(parser)
    return parser


@clean_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure(args.verbose, keep=(logger.name,))  # its progress lines stay
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO
    )
    try:
        check_conflicts([args.out], args.overwrite)
        symbols = read_dictionary_symbols(args.dict)
        lines, skipped = lexicon_lines(read_words(args.words), symbols, args.skip_unspellable)
    except PrepareError as error:
        return report(error, "fairseq-kd-lexicon")
    if not lines:
        raise SystemExit(f"error: none of the words can be spelled with {args.dict}")
    write_lexicon(args.out, lines)
    if skipped:
        shown = "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        logger.warning(f"skipped {len(skipped)} word(s) not spellable with {args.dict}: {shown}")
    logger.info(f"wrote {args.out}: {len(lines)} words, {len(skipped)} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
