"""``fairseq-kd-analyze``: what distilled students hold, layer by layer, beside their teacher.

    fairseq-kd-analyze --teacher hubert_base_ls960.pt --manifest manifests/train.tsv \
        --student deep=outputs/.../checkpoint_best.pt --student wide=runs/wide/checkpoint_best.pt --out runs/analysis

Writes into --out: ``cka_<name>.png`` (linear CKA of every student layer against every teacher
layer), ``cosine.png`` (each distilled output against its mapped teacher layer), ``probes.png``
(content CER by a CTC letter probe and speaker accuracy by a logistic-regression probe, per layer,
teacher and students side by side) and ``analysis.json`` with every number. The probes need the
manifest's ``.ltr`` + ``dict.ltr.txt`` and ``.spk`` labels; they train on every other utterance of
each speaker and score the rest.
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from fairseq_kd.analysis.analyze import run_analysis
from fairseq_kd.analysis.cka import CKAError
from fairseq_kd.analysis.probes import ProbeError
from fairseq_kd.cli.errors import clean_errors, report
from fairseq_kd.cli.logs import add_verbose_argument, configure
from fairseq_kd.teacher import TeacherError


def parse_students(values: List[str]):
    students = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).parent.name or Path(value).stem, value
        if not name or name in students or name == "teacher":
            raise ValueError(f"--student {value!r}: give NAME=CHECKPOINT with a unique name other than 'teacher'")
        students[name] = path
    return students


@clean_errors
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fairseq-kd-analyze", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--teacher", required=True, help="the students' HuBERT / wav2vec 2.0 teacher checkpoint")
    parser.add_argument("--student", action="append", default=[], metavar="NAME=CHECKPOINT",
                        help="a distillation checkpoint (repeat for several)")
    parser.add_argument("--manifest", required=True, help="fairseq manifest (.tsv) with .ltr and .spk beside it")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--max-utterances", type=int, default=None, help="first N rows only")
    parser.add_argument("--probe-steps", type=int, default=300, help="Adam steps of each CTC probe")
    parser.add_argument("--cosine-utterances", type=int, default=None,
                        help="first N rows for the cosine to the teacher (default: --max-utterances)")
    parser.add_argument("--no-content-probe", action="store_true")
    parser.add_argument("--no-speaker-probe", action="store_true")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    configure(args.verbose)
    try:
        students = parse_students(args.student)
        if not students:
            raise ValueError("give at least one --student NAME=CHECKPOINT")
        results = run_analysis(
            args.teacher, students, args.manifest, args.out, max_utterances=args.max_utterances,
            content_probe=not args.no_content_probe, speaker=not args.no_speaker_probe,
            probe_steps=args.probe_steps, cosine_utterances=args.cosine_utterances, log=lambda m: print(f"fairseq-kd-analyze: {m}", flush=True),
        )
    except (CKAError, ProbeError, TeacherError, ValueError, FileNotFoundError) as error:
        return report(error, "fairseq-kd-analyze")
    for name, result in results["models"].items():
        line = f"{name:>16} ({result['layers']} layers)"
        if result.get("content_error"):
            line += "  content CER " + " ".join(f"{v:.2f}" for v in result["content_error"])
        if result.get("speaker_accuracy"):
            line += "  speaker acc " + " ".join(f"{v:.2f}" for v in result["speaker_accuracy"])
        print(line)
        if "cosine" in result:
            print(f"{'':>16} cosine to teacher: " + ", ".join(f"{k} {v:.3f}" for k, v in result["cosine"].items()))
    print(f"wrote {args.out}/analysis.json and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
