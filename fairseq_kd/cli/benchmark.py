# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``fairseq-kd-benchmark``: students beside a HuBERT Base teacher, as ratios measured in one run.

    fairseq-kd-benchmark --out bench.json                     # everything, CPU (~15 min on 2 cores)
    fairseq-kd-benchmark --quick                              # a short look (~2 min)
    fairseq-kd-benchmark --device cuda --amp bf16 --batch 24  # on a GPU
    fairseq-kd-benchmark --sections inference --presets thin_deep --repeats 9

Inference time and MACs against the teacher, the overhead of a distill_hubert update over its
parts, its peak memory against the teacher's forward, time per audio-second for several
utterance lengths and the distillation throughput. Random weights: speed does not depend on them.
"""

import argparse
import json
import os
import sys
from typing import List, Optional

from fairseq_kd.cli.errors import clean_errors, report
from fairseq_kd.cli.logs import add_verbose_argument, configure

QUICK = dict(batch=1, seconds=2.0, lengths=[1.0, 2.0], repeats=2, warmup=1)


def build_parser() -> argparse.ArgumentParser:
    from fairseq_kd.benchmark import AMP_DTYPES, DEFAULT_SECTIONS, SECTIONS, BenchmarkConfig

    d = BenchmarkConfig()
    p = argparse.ArgumentParser(
        prog="fairseq-kd-benchmark", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--presets", nargs="+", default=d.presets, help="student presets (names in fairseq_kd/config)")
    p.add_argument("--device", default=d.device, help="cpu or cuda[:N]")
    p.add_argument("--amp", choices=list(AMP_DTYPES), default=None,
                   help="GPU only: autocast dtype of the inference forwards; training then uses the presets' "
                        "fp16 (default on cuda: bf16; none = fp32 everywhere)")
    p.add_argument("--batch", type=int, default=None,
                   help=f"utterances per batch (inference, training, memory; default {d.batch} on CPU, 24 on a GPU)")
    p.add_argument("--seconds", type=float, default=d.seconds, help="utterance length in seconds")
    p.add_argument("--lengths", type=float, nargs="+", default=d.lengths, help="utterance lengths of the scaling section")
    p.add_argument("--scaling-batch", type=int, default=d.scaling_batch, help="utterances per batch in the scaling section")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed rounds (medians are reported)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed rounds first")
    p.add_argument("--sections", nargs="+", default=list(DEFAULT_SECTIONS), choices=list(SECTIONS),
                   help="int8 (ONNX export + onnxruntime int8 vs fp32, needs the export extra) runs only when named")
    p.add_argument("--quick", action="store_true",
                   help="a short run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--manifest", default=None,
                   help="a fairseq manifest folder: adds the data-loading section (e.g. the bundled manifests/)")
    p.add_argument("--split", default=d.split, help="manifest split of the data-loading section")
    p.add_argument("--loader-workers", type=int, nargs="+", default=d.loader_workers,
                   help="DataLoader worker counts of the data-loading section")
    p.add_argument("--teacher-override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="HubertConfig fields of the teacher, e.g. encoder_layers=4")
    p.add_argument("--override", nargs="*", default=[], metavar="[PRESET:]GROUP.KEY=VALUE",
                   help="preset overrides, for every preset or one (thin_deep:model.encoder_layers=6)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    add_verbose_argument(p)
    return p


def config_from_args(args: argparse.Namespace):
    from fairseq_kd.benchmark import BenchmarkConfig

    gpu = args.device.startswith("cuda")
    values = dict(
        presets=args.presets, device=args.device, amp=args.amp or ("bf16" if gpu else "none"),
        batch=args.batch or (24 if gpu else BenchmarkConfig().batch), seconds=args.seconds,
        lengths=args.lengths, scaling_batch=args.scaling_batch, repeats=args.repeats, warmup=args.warmup,
        sections=args.sections, teacher_overrides=args.teacher_override, overrides=args.override,
        threads=args.threads, seed=args.seed, manifest=args.manifest, split=args.split,
        loader_workers=args.loader_workers,
    )
    if args.quick:  # what the user set explicitly still wins
        defaults = vars(build_parser().parse_args([]))
        for key, value in QUICK.items():
            if key == "batch" and args.batch is None or key != "batch" and getattr(args, key) == defaults[key]:
                values[key] = value
    return BenchmarkConfig(**values)


@clean_errors
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    configure(args.verbose)
    from fairseq_kd.benchmark import BenchmarkError, format_report, quiet, run_benchmark

    quiet()
    if args.out and os.path.isdir(args.out):
        print(f"fairseq-kd-benchmark: error: --out {args.out} is a directory; give a file name", file=sys.stderr)
        return 2
    if args.out and os.path.exists(args.out) and not args.force:
        print(f"fairseq-kd-benchmark: error: --out {args.out} exists; add --force to overwrite it", file=sys.stderr)
        return 2
    try:
        result = run_benchmark(config_from_args(args), progress=lambda line: print(line, flush=True))
    except BenchmarkError as error:
        return report(error, "fairseq-kd-benchmark")
    print()
    print(format_report(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
