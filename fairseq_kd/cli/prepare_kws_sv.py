"""``fairseq-kd-prepare-kws-sv``: keyword-spotting / speaker-verification data in the kws_sv layout.

The command line of ``fairseq_kd/prep/prepare_kws_sv.py``, which documents the corpora, protocols
and checks. Usage::

    fairseq-kd-prepare-kws-sv speech-commands --root /data/speech_commands_v0.02 --dest data/sc12
    fairseq-kd-prepare-kws-sv voxceleb1 --root /data/VoxCeleb1 --dest data/vox1
    fairseq-kd-prepare-kws-sv view --data manifests/keywords --view speakers --dest data/mini_spk
    fairseq-kd-prepare-kws-sv check --data manifests/keywords
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from fairseq_kd.data.kws_sv import KwsSvDataError
from fairseq_kd.prep.prepare_asr import PrepareError
from fairseq_kd.prep.prepare_kws_sv import (
    SPLITS, TF_SEED, VIEWS, check, prepare_speech_commands, prepare_view, prepare_voxceleb1,
)
from fairseq_kd.cli.errors import clean_errors, report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-prepare-kws-sv",
        description="Keyword-spotting / speaker-verification data in the kws_sv layout.",
    )
    sub = parser.add_subparsers(dest="corpus", required=True)

    sc = sub.add_parser("speech-commands", help="Google Speech Commands v1 / v2")
    sc.add_argument("--root", required=True, help="the extracted archive (word folders, _background_noise_, lists)")
    sc.add_argument("--dest", required=True)
    sc.add_argument("--protocol", choices=["12", "35", "all"], default="12",
                    help="12: 10 keywords + _unknown_ + _silence_; 35: every word of v2; all: every word")
    sc.add_argument("--unknown-percentage", type=float, default=10.0, help="12-class: _unknown_ clips per keyword clip (%%)")
    sc.add_argument("--silence-percentage", type=float, default=10.0, help="12-class: _silence_ clips per keyword clip (%%)")
    sc.add_argument("--test-set", default=None, metavar="DIR",
                    help="12-class: the extracted official test set (speech_commands_test_set_v0.0X) as the "
                    "test split (default: the only such folder inside or next to --root, if any)")
    sc.add_argument("--trials-per-utterance", type=int, default=4, help="verification trials per test utterance")
    sc.add_argument("--seed", type=int, default=TF_SEED)
    sc.add_argument("--jobs", type=int, default=8, help="threads reading audio headers")
    sc.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    sc.set_defaults(run=prepare_speech_commands)

    vox = sub.add_parser("voxceleb1", help="VoxCeleb1 (verification or identification protocol)")
    vox.add_argument("--root", required=True, help="folder holding wav/ (and veri_test2.txt, iden_split.txt)")
    vox.add_argument("--dest", required=True)
    vox.add_argument("--protocol", choices=["verification", "identification"], default="verification")
    vox.add_argument("--trials", default=None, help="verification trial list (default ROOT/veri_test2.txt)")
    vox.add_argument("--iden-split", default=None, help="identification split file (default ROOT/iden_split.txt)")
    vox.add_argument("--valid-speakers", type=int, default=10, help="dev speakers held out for validation")
    vox.add_argument("--seed", type=int, default=1)
    vox.add_argument("--jobs", type=int, default=8)
    vox.add_argument("--overwrite", action="store_true")
    vox.set_defaults(run=prepare_voxceleb1)

    view = sub.add_parser("view", help="a keyword-only or speaker-only view of a folder with both labels "
                          "(two views with disjoint rows and speakers stand in for two corpora)")
    view.add_argument("--data", required=True, help="a prepared folder with .kw and .spk labels (e.g. manifests/keywords)")
    view.add_argument("--view", required=True, choices=list(VIEWS), help="which labels the view keeps")
    view.add_argument("--dest", required=True)
    view.add_argument("--all-rows", action="store_true",
                      help="no split: every row carrying the view's label (e.g. a keyword-only copy of data/sc12)")
    view.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    view.set_defaults(run=prepare_view)

    chk = sub.add_parser("check", help="check a prepared folder (e.g. manifests/keywords) as the task will")
    chk.add_argument("--data", required=True)
    chk.add_argument("--splits", nargs="+", default=list(SPLITS))
    chk.add_argument("--no-kws", action="store_true", help="no keyword labels (speaker verification only)")
    chk.add_argument("--no-sv", action="store_true", help="no speaker labels (keyword spotting only)")
    chk.add_argument("--allow-seen-speakers", action="store_true", help="splits may share speakers")
    chk.set_defaults(run=check)
    return parser


@clean_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(format="%(levelname)s | %(message)s", level=logging.WARNING, stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (PrepareError, KwsSvDataError) as error:
        return report(error, f"fairseq-kd-prepare-kws-sv {args.corpus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
