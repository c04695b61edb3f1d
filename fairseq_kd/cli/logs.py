"""How loud every console script is: the user's answer, not fairseq's INFO dumps.

By default fairseq's loggers (``fairseq``, ``fairseq_cli``, ``hydra``) and the project's own
(``fairseq_kd``: e.g. the ``ThinHubertModel Config: ...`` dump of every model build) are set to
WARNING, so a script prints what it was asked for, plus warnings and errors. ``--verbose`` (added to
a parser by ``add_verbose_argument``) or ``FAIRSEQ_KD_VERBOSE=1`` restores the INFO lines and the
library warnings filtered below. A script's own progress logger (``keep``) stays at INFO.

Known limit: ``import fairseq`` itself logs ``Please install tensorboardX`` at INFO (and
``fairseq.tasks.text_to_speech`` configures the root logger at INFO) while ``fairseq_kd`` is being
imported, before any code of this folder runs; ``quiet_imports()`` silences that when it is called
before the first ``import fairseq`` (the compatibility layer's start-up or ``fairseq_kd/__init__``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Iterable, Optional, Sequence

ENV_VERBOSE = "FAIRSEQ_KD_VERBOSE"
QUIET_LOGGERS = ("fairseq", "fairseq_cli", "fairseq_kd", "hydra", "examples")

__all__ = ["ENV_VERBOSE", "add_verbose_argument", "configure", "quiet_imports", "verbose_requested"]


def verbose_requested(argv: Optional[Sequence[str]] = None) -> bool:
    """``FAIRSEQ_KD_VERBOSE=1`` (or true/yes) in the environment, or ``--verbose`` in ``argv``
    (default ``sys.argv``)."""
    if os.environ.get(ENV_VERBOSE, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return "--verbose" in (sys.argv[1:] if argv is None else argv)


def add_verbose_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--verbose", action="store_true",
        help=f"also show fairseq's and the models' INFO lines and library warnings (or {ENV_VERBOSE}=1)",
    )
    return parser


def _filter_library_warnings() -> None:
    # fairseq's wav2vec 2.0 / HuBERT positional convolution (fairseq.models.wav2vec.wav2vec2.
    # make_conv_pos, which every student and teacher here builds) calls the deprecated
    # torch.nn.utils.weight_norm; torch >= 2.1 warns about it once per build. The call is fairseq's,
    # not ours, and switching it to torch.nn.utils.parametrizations.weight_norm would rename the
    # checkpoint keys (weight_g/weight_v -> parametrizations.weight.original0/1) of every fairseq
    # checkpoint, so the warning is filtered here and nothing else.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.nn\.utils\.weight_norm.*")


def quiet_imports() -> None:
    """Before the first ``import fairseq``: keep its import-time INFO lines out of the console
    unless verbose is requested. Safe to call more than once."""
    if not verbose_requested():
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        _filter_library_warnings()


def configure(verbose: Optional[bool] = None, keep: Iterable[str] = ()) -> bool:
    """Set the loggers for a script; ``verbose=None`` reads ``--verbose`` / ``FAIRSEQ_KD_VERBOSE``.
    ``keep``: loggers (the script's own progress) left at INFO. Returns whether verbose is on."""
    verbose = verbose_requested() if verbose is None else (verbose or verbose_requested([]))
    level = logging.INFO if verbose else logging.WARNING
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name in keep:
        logging.getLogger(name).setLevel(logging.INFO)
    if not verbose:
        _filter_library_warnings()
    return verbose
