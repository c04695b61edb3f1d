# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``fairseq-kd-score RESULTS_DIR``: WER and CER from fairseq infer.py's result files.

fairseq's ``examples/speech_recognition/new/infer.py`` (``fairseq-kd-infer``) writes, for every
utterance, one line ``TEXT (SPEAKER-ID)`` to ``hypo.word``/``ref.word`` (words) and
``hypo.units``/``ref.units`` (the label units, e.g. letters with ``|`` between words). Its own WER
file needs CUDA to be merged across shards and has no CER. This command pairs the lines by
utterance id and writes:

* ``wer.txt``: word error rate, errors / reference words, utterances;
* ``cer.txt``: character (unit) error rate over ``*.units``, ``|`` word boundaries included,
  i.e. the same definition as the ``uer`` fairseq's ``ctc`` criterion logs on the valid set.

Edit distances come from ``editdistance``, the library fairseq's criterion and infer.py use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import editdistance

from fairseq_kd.cli.errors import clean_errors, report
from fairseq_kd.cli.logs import add_verbose_argument, configure

LINE = re.compile(r"^(?P<text>.*?)\s*\((?P<speaker>[^()\s]*)-(?P<id>\d+)\)\s*$")


class ScoreError(ValueError):
    """Result files that cannot be scored."""


def read_results(path: str) -> Dict[int, str]:
    """``{utterance id: text}`` from one of infer.py's result files."""
    if not os.path.isfile(path):
        raise ScoreError(f"{path} does not exist: run fairseq-kd-infer with decoding.results_path set to this folder")
    texts: Dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            match = LINE.match(line)
            if match is None:
                raise ScoreError(f"{path}:{number}: expected 'TEXT (SPEAKER-ID)' as infer.py writes it, got {line[:80]!r}")
            utt = int(match.group("id"))
            if utt in texts:
                raise ScoreError(f"{path}:{number}: utterance id {utt} appears twice")
            texts[utt] = match.group("text")
    return texts


def paired(hypo_path: str, ref_path: str) -> List[Tuple[int, str, str]]:
    hypos, refs = read_results(hypo_path), read_results(ref_path)
    if set(hypos) != set(refs):
        only_h, only_r = sorted(set(hypos) - set(refs)), sorted(set(refs) - set(hypos))
        raise ScoreError(
            f"{hypo_path} and {ref_path} hold different utterances (only in hypotheses: {only_h[:5]}, "
            f"only in references: {only_r[:5]}); were they written by the same run?"
        )
    if not refs:
        raise ScoreError(f"{ref_path} holds no utterances")
    return [(utt, hypos[utt], refs[utt]) for utt in sorted(refs)]


def error_rate(pairs: Sequence[Tuple[int, str, str]]) -> Tuple[int, int]:
    """(edit distance summed over utterances, reference length) over whitespace-separated tokens."""
    errors = length = 0
    for _, hypo, ref in pairs:
        h, r = hypo.split(), ref.split()
        errors += editdistance.eval(h, r)
        length += len(r)
    return errors, length


def write_score(path: str, name: str, unit: str, errors: int, length: int, utterances: int) -> float:
    rate = 100.0 * errors / length if length else float("nan")
    with open(path, "w") as f:
        f.write(f"{name}: {rate:.2f}\n")
        f.write(f"err / num_ref_{unit} = {errors} / {length}\n")
        f.write(f"utterances: {utterances}\n")
    return rate


def score(results_dir: str) -> Dict[str, float]:
    """Write ``wer.txt`` and ``cer.txt`` into ``results_dir``; returns both rates (in %)."""
    words = paired(os.path.join(results_dir, "hypo.word"), os.path.join(results_dir, "ref.word"))
    units = paired(os.path.join(results_dir, "hypo.units"), os.path.join(results_dir, "ref.units"))
    w_err, w_len = error_rate(words)
    c_err, c_len = error_rate(units)
    return {
        "wer": write_score(os.path.join(results_dir, "wer.txt"), "WER", "words", w_err, w_len, len(words)),
        "cer": write_score(os.path.join(results_dir, "cer.txt"), "CER", "units", c_err, c_len, len(units)),
        "utterances": len(words),
    }


@clean_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-score",
        description="Write wer.txt and cer.txt from fairseq-kd-infer's hypo/ref files (editdistance).",
    )
    parser.add_argument("results_dir", help="decoding.results_path of a fairseq-kd-infer run")
    parser.add_argument("--json", action="store_true", help="print the scores as one json line")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    configure(args.verbose)
    try:
        scores = score(args.results_dir)
    except ScoreError as error:
        return report(error, "fairseq-kd-score")
    if args.json:
        print(json.dumps(scores))
    else:
        print(f"WER {scores['wer']:.2f}  CER {scores['cer']:.2f}  ({scores['utterances']} utterances, {args.results_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
