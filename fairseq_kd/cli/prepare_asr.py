"""``fairseq-kd-prepare-asr``: a fairseq ASR fine-tuning set from LibriSpeech / Libri-light.

The command line of ``fairseq_kd/prep/prepare_asr.py``, which documents what is written and
checked. Usage::

    fairseq-kd-prepare-asr --librispeech /data/LibriSpeech --split train-clean-100 --name train \\
        --dest data/ls100 --sentencepiece-vocab 1000
    fairseq-kd-prepare-asr --libri-light /data/librispeech_finetuning --subset 10h --dest data/ll10h
    fairseq-kd-prepare-asr --from-manifest manifests/train.tsv --dest /tmp/labels
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from fairseq_kd.prep.prepare_asr import (
    LIBRI_LIGHT_SUBSETS,
    LabelOptions,
    PrepareError,
    libri_light_dirs,
    librispeech_dirs,
    prepare_corpus,
    prepare_from_manifest,
)
from fairseq_kd.cli.errors import clean_errors, report
from fairseq_kd.cli.logs import add_verbose_argument, configure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-prepare-asr",
        description=(
            "Write a fairseq ASR fine-tuning set ({name}.tsv/.ltr/.wrd/.spk, dict.ltr.txt, "
            "optional sentencepiece labels) from LibriSpeech or Libri-light limited supervision, "
            "or only the labels for an existing manifest. Input problems are reported before "
            "anything is written; existing outputs are kept unless --overwrite."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--librispeech",
        type=Path,
        metavar="ROOT",
        help="LibriSpeech folder (holding train-clean-100, dev-other, ...)",
    )
    source.add_argument(
        "--libri-light",
        type=Path,
        metavar="ROOT",
        help="librispeech_finetuning folder of Libri-light",
    )
    source.add_argument(
        "--from-manifest",
        type=Path,
        metavar="TSV",
        help="existing manifest: write only its label files from --words",
    )
    parser.add_argument(
        "--split",
        action="append",
        metavar="DIR",
        help="LibriSpeech split folder; repeat to merge several into one manifest",
    )
    parser.add_argument(
        "--subset",
        choices=list(LIBRI_LIGHT_SUBSETS),
        help="Libri-light subset: 10min (1h/0), 1h (1h/*), 10h (1h/* + 9h)",
    )
    parser.add_argument(
        "--words",
        type=Path,
        metavar="WRD",
        help="with --from-manifest: its word transcripts (default: the manifest with .wrd)",
    )
    parser.add_argument(
        "--dest",
        type=Path,
        help="output folder (default with --from-manifest: the manifest's folder)",
    )
    parser.add_argument(
        "--name",
        help="output set name: {name}.tsv, ... (default: the split, 'train' for Libri-light, "
        "the manifest's name)",
    )
    parser.add_argument(
        "--dict",
        type=Path,
        metavar="DICT",
        help="reuse this dict.ltr.txt (and check the transcripts against it) instead of "
        "building one from this set",
    )
    spm_group = parser.add_mutually_exclusive_group()
    spm_group.add_argument(
        "--sentencepiece-vocab",
        type=int,
        metavar="N",
        help="train an N-piece sentencepiece unigram model on this set's words",
    )
    spm_group.add_argument(
        "--sentencepiece-model",
        type=Path,
        metavar="MODEL",
        help="reuse a model written by --sentencepiece-vocab (its dict.spm{N}.txt must lie "
        "beside it)",
    )
    parser.add_argument(
        "--resample",
        action="store_true",
        help="convert audio that is not 16 kHz mono into 16 kHz mono FLAC under --dest/audio "
        "(the others are hard-linked there) and point the manifest there",
    )
    parser.add_argument("--ext", default="flac", help="audio file extension (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="parallel audio workers (default %(default)s)",
    )
    add_verbose_argument(parser)
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.librispeech is not None and not args.split:
        parser.error("--librispeech needs at least one --split (e.g. --split train-clean-100)")
    if args.split and args.librispeech is None:
        parser.error("--split only applies to --librispeech")
    if args.split and len(set(args.split)) != len(args.split):
        parser.error(f"a --split is given twice: {args.split}")
    if args.libri_light is not None and args.subset is None:
        parser.error(f"--libri-light needs --subset ({', '.join(LIBRI_LIGHT_SUBSETS)})")
    if args.subset and args.libri_light is None:
        parser.error("--subset only applies to --libri-light")
    if args.words and args.from_manifest is None:
        parser.error("--words only applies to --from-manifest")
    if args.from_manifest is not None and (args.resample or args.ext != "flac"):
        parser.error("--resample/--ext do not apply to --from-manifest (it writes labels only)")
    if args.from_manifest is None and args.dest is None:
        parser.error("--dest is required")
    if args.librispeech is not None and len(args.split) > 1 and not args.name:
        parser.error("--name is required when merging several --split folders")
    if args.sentencepiece_vocab is not None and args.sentencepiece_vocab < 5:
        parser.error(
            "--sentencepiece-vocab must be at least 5 (4 ids are fairseq's special symbols)"
        )
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")


def default_name(args: argparse.Namespace) -> str:
    if args.name:
        return args.name
    if args.from_manifest is not None:
        return args.from_manifest.stem
    if args.libri_light is not None:
        return "train"
    return args.split[0]


@clean_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(args.verbose, keep=("fairseq_kd.prep.prepare_asr", __name__))  # its progress lines stay
    check_args(parser, args)
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO
    )
    dest = args.dest if args.dest is not None else args.from_manifest.parent
    opts = LabelOptions(
        dest=dest,
        name=default_name(args),
        dict_path=args.dict,
        spm_vocab=args.sentencepiece_vocab,
        spm_model=args.sentencepiece_model,
        overwrite=args.overwrite,
    )
    try:
        if args.from_manifest is not None:
            words = args.words or args.from_manifest.with_suffix(".wrd")
            prepare_from_manifest(args.from_manifest, words, opts)
        else:
            if args.librispeech is not None:
                root, dirs = librispeech_dirs(args.librispeech, args.split)
            else:
                root, dirs = libri_light_dirs(args.libri_light, args.subset)
            prepare_corpus(root, dirs, opts, args.resample, args.ext, args.jobs)
    except PrepareError as error:
        return report(error, "fairseq-kd-prepare-asr")
    return 0


if __name__ == "__main__":
    sys.exit(main())
