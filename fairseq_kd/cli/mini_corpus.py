"""``fairseq-kd-make-corpus``: generate the bundled mini speech corpus (``manifests/``) with espeak-ng.

The command line of ``fairseq_kd/prep/mini_corpus.py``, which documents the corpus. Usage::

    fairseq-kd-make-corpus --out manifests
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fairseq_kd.prep.mini_corpus import (
    MAX_CORPUS_BYTES,
    CorpusConfig,
    build_corpus,
    check_espeak,
    looks_replaceable,
)
from fairseq_kd.cli.errors import clean_errors
from fairseq_kd.cli.logs import add_verbose_argument, configure


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = CorpusConfig()
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-make-corpus",
        description=(
            "Synthesise the bundled mini speech corpus with espeak-ng: an ASR part with "
            "fairseq letter labels and a Speech Commands style keyword part for keyword "
            "spotting and speaker verification. The output folder is replaced only if it is "
            "empty or holds an earlier corpus. Requires espeak-ng (apt-get install espeak-ng)."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. manifests")
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="random seed (default %(default)s)"
    )
    parser.add_argument(
        "--asr-utterances",
        type=int,
        nargs=3,
        metavar=("TRAIN", "VALID", "TEST"),
        default=defaults.asr_utterances,
        help="ASR utterances per split (default %(default)s)",
    )
    parser.add_argument(
        "--asr-speakers",
        type=int,
        default=defaults.asr_speakers,
        help="speakers shared by the ASR splits (default %(default)s)",
    )
    parser.add_argument(
        "--keyword-speakers",
        type=int,
        nargs=3,
        metavar=("TRAIN", "VALID", "TEST"),
        default=defaults.keyword_speakers,
        help="disjoint keyword speakers per split (default %(default)s)",
    )
    parser.add_argument(
        "--keyword-takes",
        type=int,
        nargs=3,
        metavar=("TRAIN", "VALID", "TEST"),
        default=defaults.keyword_takes,
        help="takes of each keyword per speaker, per split (default %(default)s)",
    )
    parser.add_argument(
        "--trials-per-label",
        type=int,
        default=defaults.trials_per_label,
        help="target and non-target trials each (default %(default)s)",
    )
    parser.add_argument(
        "--espeak", default="espeak-ng", help="espeak-ng executable (default %(default)s)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="parallel synthesis workers (default: CPU count)",
    )
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=MAX_CORPUS_BYTES,
        help="fail if the corpus is larger than this (default %(default)s)",
    )
    add_verbose_argument(parser)
    return parser.parse_args(argv)


@clean_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure(args.verbose)
    check_espeak(args.espeak)  # fail before doing anything else
    out: Path = args.out.resolve()
    if not looks_replaceable(out):
        raise SystemExit(
            f"error: {out} exists and does not look like a mini corpus (no train.tsv); "
            "refusing to replace it"
        )
    config = CorpusConfig(
        seed=args.seed,
        asr_utterances=tuple(args.asr_utterances),
        asr_speakers=args.asr_speakers,
        keyword_speakers=tuple(args.keyword_speakers),
        keyword_takes=tuple(args.keyword_takes),
        trials_per_label=args.trials_per_label,
    )
    stats = build_corpus(out, config, args.espeak, args.jobs, args.max_bytes)
    for key, value in stats.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
