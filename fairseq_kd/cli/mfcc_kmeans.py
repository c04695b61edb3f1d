"""``fairseq-kd-mfcc-kmeans``: first-iteration HuBERT targets (MFCC features clustered with k-means).

The command line of ``fairseq_kd/prep/mfcc_kmeans.py`` (which documents the recipe and its
outputs)::

    fairseq-kd-mfcc-kmeans --manifest-dir manifests --splits train valid \\
        --n-clusters 100 --out-dir labels/
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from fairseq_kd.prep.mfcc_kmeans import HOP_BY_LABEL_RATE, KMEANS_DEFAULTS, make_labels
from fairseq_kd.cli.errors import clean_errors, report
from fairseq_kd.cli.logs import add_verbose_argument, configure

logger = logging.getLogger(__name__)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-mfcc-kmeans",
        description=(
            "Make first-iteration HuBERT targets: MFCC (+delta, +delta-delta) features clustered "
            "with MiniBatchKMeans, written as {split}.km and dict.km.txt for fairseq's "
            "hubert_pretraining task."
        ),
    )
    parser.add_argument("--manifest-dir", required=True, type=Path,
                        help="folder with fairseq manifests {split}.tsv")
    parser.add_argument("--splits", nargs="+", required=True,
                        help="splits to label, e.g. train valid")
    parser.add_argument("--out-dir", required=True, type=Path,
                        help="where to write {split}.km, dict.km.txt and kmeans.joblib")
    parser.add_argument("--n-clusters", type=int, default=None,
                        help="number of clusters (fairseq uses 100 for MFCC targets); required "
                             "unless --kmeans is given")
    parser.add_argument("--kmeans", type=Path, default=None,
                        help="label with this previously fitted kmeans.joblib instead of fitting")
    parser.add_argument("--fit-split", default="train",
                        help="split whose features k-means is fitted on (default: train)")
    parser.add_argument("--label-rate", type=int, choices=sorted(HOP_BY_LABEL_RATE), default=100,
                        help="labels per second: 100 (10 ms hop) or 50 (20 ms hop); must match "
                             "model.label_rate (default: 100)")
    parser.add_argument("--percent", type=float, default=1.0,
                        help="fraction of --fit-split utterances to fit on, in (0, 1] "
                             "(default: 1.0, all); their features are held in memory, about "
                             "56 MB per hour of audio at 100 Hz, so use e.g. 0.1 for 960 h")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the utterance sample and k-means (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files")
    km = parser.add_argument_group("k-means (defaults: fairseq simple_kmeans/learn_kmeans.py)")
    km.add_argument("--init", default=KMEANS_DEFAULTS["init"])
    km.add_argument("--max-iter", type=int, default=KMEANS_DEFAULTS["max_iter"])
    km.add_argument("--batch-size", type=int, default=KMEANS_DEFAULTS["batch_size"])
    km.add_argument("--tol", type=float, default=KMEANS_DEFAULTS["tol"])
    km.add_argument("--max-no-improvement", type=int,
                    default=KMEANS_DEFAULTS["max_no_improvement"])
    km.add_argument("--n-init", type=int, default=KMEANS_DEFAULTS["n_init"])
    km.add_argument("--reassignment-ratio", type=float,
                    default=KMEANS_DEFAULTS["reassignment_ratio"])
    add_verbose_argument(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` and write the labels; errors the user can fix are raised (see ``cli_main``)."""
    parser = get_parser()
    args = parser.parse_args(argv)
    configure(args.verbose, keep=("fairseq_kd.prep.mfcc_kmeans",))  # its progress lines stay
    if args.kmeans is None and args.n_clusters is None:
        parser.error("--n-clusters is required unless --kmeans is given")
    if args.n_clusters is not None and args.n_clusters < 2:
        parser.error("--n-clusters must be at least 2")
    logger.info(args)
    make_labels(
        args.manifest_dir, args.splits, args.out_dir,
        n_clusters=args.n_clusters, kmeans=args.kmeans, fit_split=args.fit_split,
        label_rate=args.label_rate, percent=args.percent, seed=args.seed, overwrite=args.overwrite,
        init=args.init, max_iter=args.max_iter, batch_size=args.batch_size, tol=args.tol,
        max_no_improvement=args.max_no_improvement, n_init=args.n_init,
        reassignment_ratio=args.reassignment_ratio,
    )


@clean_errors
def cli_main() -> None:
    """Console entry point: fairseq-style logging, and a one-line message instead of a traceback
    for the errors a user can fix (existing outputs, bad manifests or audio)."""
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        level=os.environ.get("LOGLEVEL", "INFO").upper(),
        stream=sys.stdout,
    )
    try:
        main()
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        sys.exit(report(e, "fairseq-kd-mfcc-kmeans"))


if __name__ == "__main__":
    cli_main()
