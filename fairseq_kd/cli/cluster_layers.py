"""``fairseq-kd-cluster-layers``: SKILL-style targets, the teacher's layers clustered by linear CKA.

    fairseq-kd-cluster-layers --teacher hubert_base_ls960.pt --manifest manifests/valid.tsv --groups 4 --student-layers 12
    fairseq-kd-cluster-layers --teacher hubert_base_ls960.pt --lighthubert --student-layers 12

Prints the ``model.hint_layer_ids`` / ``criterion.hint_targets`` overrides for the ``layer_distill``
criterion (e.g. the ``skill_hubert_base`` preset): K groups of similar teacher layers (average-linkage
hierarchical clustering of 1 - CKA), each learnt as its mean by one of K student layers spread over
the student's depth. --lighthubert prints LightHuBERT's target instead (no audio needed).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from fairseq_kd.analysis.cka import CKAError
from fairseq_kd.analysis.clustering import ClusterError, cluster_layers, hint_spec, lighthubert_spec, overrides
from fairseq_kd.cli.errors import clean_errors, report
from fairseq_kd.cli.logs import add_verbose_argument, configure
from fairseq_kd.teacher import FrozenTeacher, TeacherError


@clean_errors
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fairseq-kd-cluster-layers", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--teacher", required=True, help="HuBERT / wav2vec 2.0 checkpoint")
    parser.add_argument("--manifest", help="fairseq manifest whose audio the CKA is measured on")
    parser.add_argument("--groups", type=int, default=4, help="number of target groups K")
    parser.add_argument("--student-layers", type=int, required=True, help="the student's depth")
    parser.add_argument("--max-utterances", type=int, default=None)
    parser.add_argument("--lighthubert", action="store_true", help="mean of the teacher's last 8 layers instead")
    parser.add_argument("--out", help="folder for cka_teacher.png and clusters.json")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    configure(args.verbose)
    try:
        if args.student_layers < 1:
            raise ClusterError(f"--student-layers must be >= 1, got {args.student_layers}")
        if args.lighthubert:
            spec = lighthubert_spec(FrozenTeacher.from_checkpoint(args.teacher).num_layers, args.student_layers)
            result = {"spec": spec}
        else:
            if not args.manifest:
                raise ClusterError("--manifest is needed to measure the teacher's layer similarity")
            from fairseq_kd.analysis.analyze import teacher_layer_cka

            cka, layers = teacher_layer_cka(args.teacher, args.manifest, args.max_utterances)
            groups = cluster_layers(cka, layers, args.groups)
            spec = hint_spec(groups, args.student_layers)
            result = {"layers": layers, "cka": cka.tolist(), "groups": groups, "spec": spec}
            if args.out:
                from fairseq_kd.analysis.plots import cka_heatmap

                Path(args.out).mkdir(parents=True, exist_ok=True)
                cka_heatmap(cka.tolist(), Path(args.out) / "cka_teacher.png",
                            f"teacher layers 1..{len(layers)}: linear CKA; groups {spec['hint_targets']}",
                            ylabel="teacher layer - 1", xlabel="teacher layer - 1")
            print("groups: " + "  ".join("{" + ",".join(map(str, g)) + "}" for g in groups))
    except (CKAError, ClusterError, TeacherError, ValueError, FileNotFoundError) as error:
        return report(error, "fairseq-kd-cluster-layers")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "clusters.json").write_text(json.dumps(result, indent=1))
    print(" ".join(overrides(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
