"""``fairseq-kd-export``: a distilled (or fine-tuned) student as a file that runs with torch alone.

    fairseq-kd-export checkpoint_best.pt student.pt2                 # torch.export program + metadata
    fairseq-kd-export checkpoint_best.pt student.pt2 --check         # reload it and compare again
    fairseq-kd-export checkpoint_best.pt student.pt2 --outputs heads # the distillation heads' outputs
    fairseq-kd-export checkpoint_best.pt student.pt2 --onnx student.onnx --check --benchmark
    fairseq-kd-export checkpoint_best.pt student.pt2 --onnx student.onnx --int8 student.int8.onnx --benchmark
    fairseq-kd-export --s3prl-upstream <s3prl>/s3prl/upstream/fairseq_kd_student
    fairseq-kd-export checkpoint_best.pt student_hf --format hf     # a transformers HubertModel folder

CHECKPOINT is a distillation checkpoint (``thin_hubert``) or a ``hubert_ctc`` / ``wav2vec_ctc``
checkpoint fine-tuned from one; the file holds the encoder without CTC layer, and returns either
the student's layers or its distillation heads' outputs (``--outputs``, default per student: see
``fairseq_kd/export/standalone.py``).
Every export is compared with the original model (a padded batch with a 0.05 s row, 0.05 s alone)
before it is written, and the ONNX model with the PyTorch program under onnxruntime; ``--check``
also loads the written .pt2 back and compares it with the model on more shapes; ``--benchmark``
prints the median CPU latency of the eager model, the torch.export program and onnxruntime on the
same batch. Existing files are not overwritten without ``--force``.
"""

import argparse
import json
import os
import shutil
import sys
from typing import List, Optional

from fairseq_kd.cli.errors import clean_errors, report

S3PRL_HUB_LINE = "from s3prl.upstream.{name}.hubconf import *"


class CliError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fairseq-kd-export",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", nargs="?", help="distillation or fine-tuned CTC checkpoint (.pt)")
    p.add_argument("output", nargs="?", help="standalone student file to write (.pt2)")
    p.add_argument("--outputs", choices=["layers", "heads"], default=None,
                   help="what the file's hidden_states are (the s3prl upstream serves them): layers = the "
                        "CNN/projection output and every transformer layer (STaRHuBERT's, DistilHuBERT's SUPERB "
                        "input); heads = the distillation heads' outputs, one per teacher layer in teacher-layer "
                        "order (ARMHuBERT's / MaskHuBERT's: the 12 projection-head outputs). Default: heads for a "
                        "masking-distillation student (criterion=masked_hint) with a hint head on every layer "
                        "learning the teacher layer of the same depth, else layers (FitHuBERT included)")
    p.add_argument("--onnx", default=None, metavar="FILE", help="also write an ONNX model here")
    p.add_argument("--int8", default=None, metavar="FILE",
                   help="also write onnxruntime's dynamic int8 quantisation of the ONNX model here (needs --onnx), "
                        "with its per-layer cosine to fp32 on --int8-audio")
    p.add_argument("--int8-conv", action="store_true",
                   help="quantise the convolutions too (ConvInteger; often slower on CPU and further from fp32)")
    p.add_argument("--int8-audio", default=None, metavar="MANIFEST_DIR",
                   help="fairseq manifest folder whose valid split measures the int8 fidelity (default: the bundled "
                        "manifests/ if present, else noise)")
    p.add_argument("--check", action="store_true",
                   help="load the written .pt2 back and compare it with the model (mixed lengths, 0.05 s, batch of one)")
    p.add_argument("--benchmark", action="store_true", help="CPU latency: eager vs torch.export vs onnxruntime (needs --onnx)")
    p.add_argument("--seconds", type=float, default=10.0, help="utterance length of the benchmark")
    p.add_argument("--batch", type=int, default=1, help="utterances per benchmark batch")
    p.add_argument("--repeats", type=int, default=10, help="timed benchmark rounds (median reported)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both PyTorch and onnxruntime in the benchmark")
    p.add_argument("--s3prl-upstream", default=None, metavar="DIR",
                   help="copy the s3prl upstream (torch-only) to DIR, e.g. <s3prl>/s3prl/upstream/fairseq_kd_student")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--format", choices=["standalone", "hf"], default="standalone",
                   help="hf: OUTPUT is a folder for transformers' HubertModel (fairseq_kd/export/hf.py; the 'hf' extra)")
    return p


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse before any work: missing arguments, clobbering, an output equal to the input."""
    if args.checkpoint is None and args.s3prl_upstream is None:
        raise CliError("give CHECKPOINT and OUTPUT (or --s3prl-upstream DIR)")
    if args.checkpoint is not None and args.output is None:
        raise CliError("give the OUTPUT file to write, e.g. student.pt2")
    if args.int8 and not args.onnx:
        raise CliError("--int8 quantises the ONNX model: add --onnx FILE")
    if args.benchmark and not args.onnx:
        raise CliError("--benchmark compares onnxruntime with PyTorch: add --onnx FILE")
    outputs = [p for p in (args.output, args.onnx, args.int8) if p]
    for path in outputs:
        if os.path.isdir(path):
            raise CliError(f"{path} is a directory; give a file name")
        if args.checkpoint and os.path.abspath(path) == os.path.abspath(args.checkpoint):
            raise CliError(f"{path} is the input checkpoint; write the export to another file")
        if os.path.exists(path) and not args.force:
            raise CliError(f"{path} exists; add --force to overwrite it")
    if len(set(map(os.path.abspath, outputs))) != len(outputs):
        raise CliError("OUTPUT and --onnx name the same file")
    if args.s3prl_upstream and os.path.exists(args.s3prl_upstream) and not args.force:
        raise CliError(f"{args.s3prl_upstream} exists; add --force to replace it")


def copy_s3prl_upstream(dest: str) -> str:
    """Copy fairseq_kd/s3prl_upstream (torch-only files) to ``dest``; returns the hub.py line to add."""
    import fairseq_kd.s3prl_upstream as upstream

    source = os.path.dirname(upstream.__file__)
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise CliError(f"--s3prl-upstream {dest} is a file; give a folder")
    # --force replaces the upstream's own files only: anything else the user keeps in DEST stays
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    return S3PRL_HUB_LINE.format(name=os.path.basename(os.path.normpath(dest)))


def check_batches():
    """Inputs of ``--check``: mixed lengths with a 0.05 s row, a batch of one, 0.05 s alone, no padding."""
    import torch

    gen = torch.Generator().manual_seed(7)
    return [
        (torch.randn(3, 24000, generator=gen), torch.tensor([24000, 9001, 800])),
        (torch.randn(1, 16000, generator=gen), torch.tensor([16000])),
        (torch.randn(1, 800, generator=gen), torch.tensor([800])),
        (torch.randn(2, 20000, generator=gen), torch.tensor([20000, 20000])),
    ]


def run(args: argparse.Namespace) -> int:
    if args.s3prl_upstream:
        line = copy_s3prl_upstream(args.s3prl_upstream)
        print(f"s3prl upstream copied to {args.s3prl_upstream}")
        print(f"register it: add this line to s3prl/hub.py:\n    {line}")
        if args.checkpoint is None:
            return 0

    from fairseq_kd.export.checkpoints import load_student
    from fairseq_kd.export.standalone import HEADS, choose_outputs, export_standalone, parity

    loaded = load_student(args.checkpoint, keep_heads=True)  # every input error is raised before any export work
    outputs = choose_outputs(loaded, args.outputs)
    heads = loaded.head_targets if outputs == HEADS else None
    program, meta, diff = export_standalone(loaded, args.output, outputs)
    print(
        f"wrote {args.output}: {describe_outputs(meta)} x {meta['hidden_size']}, {meta['downsample_rate']} "
        f"samples per frame ({meta['rate_policy']}), normalize={str(meta['normalize']).lower()}, "
        f"{meta['parameters']:,} parameters, from a {meta['source_kind']} checkpoint"
    )
    print(f"export check: max abs diff vs the model {diff:.3g}")
    result = {"standalone": args.output, "outputs": outputs, "export_max_abs_diff": diff}

    if args.check:
        import torch

        reloaded = torch.export.load(args.output).module()
        reloaded_diff = max(parity(loaded.model, reloaded, w, l, heads) for w, l in check_batches())
        print(f"check: reloaded {args.output}, max abs diff vs the model {reloaded_diff:.3g} "
              f"(mixed lengths, 0.05 s, batch of one)")
        result["reloaded_max_abs_diff"] = reloaded_diff

    if args.onnx:
        from fairseq_kd.export.onnx_export import export_onnx, latency_comparison, onnx_session

        onnx_diff = export_onnx(program, meta, args.onnx, check_batches())
        print(f"wrote {args.onnx}: onnxruntime vs PyTorch max abs diff {onnx_diff:.3g} (mixed lengths, "
              f"0.05 s, batch of one)")
        result["onnx_max_abs_diff"] = onnx_diff
        if args.benchmark:
            session = onnx_session(args.onnx, threads=args.threads)
            figures = latency_comparison(
                loaded.model, program.module(), session, seconds=args.seconds, batch_size=args.batch,
                repeats=args.repeats, threads=args.threads, sample_rate=meta["sample_rate"],
            )
            print(
                f"benchmark ({figures['batch_size']} x {figures['audio_seconds']:g} s, {figures['threads']} "
                f"thread(s), median of {figures['repeats']}): eager {figures['pytorch_eager_s'] * 1e3:.1f} ms, "
                f"torch.export {figures['torch_export_s'] * 1e3:.1f} ms, onnxruntime "
                f"{figures['onnxruntime_s'] * 1e3:.1f} ms; onnxruntime / eager = "
                f"{figures['onnxruntime_vs_eager']:.2f}, onnxruntime / torch.export = "
                f"{figures['onnxruntime_vs_torch_export']:.2f}"
            )
            result["benchmark"] = figures
        if args.int8:
            result["int8"] = write_int8(args, meta)
    print("result: " + json.dumps(result))
    return 0


def describe_outputs(meta: dict) -> str:
    """What the file's hidden_states are, for the summary line."""
    if meta["outputs"] == "heads":
        teachers = ", ".join("+".join(map(str, layers)) for layers in meta["head_teacher_layers"])
        return f"{meta['num_hidden_states']} head outputs (--outputs heads; teacher layers {teachers})"
    return (f"{meta['num_hidden_states']} hidden states (--outputs layers; CNN/projection + "
            f"{meta['num_layers']} layers)")


def write_int8(args: argparse.Namespace, meta) -> dict:
    """``--int8``: quantise the written ONNX model, report its fidelity (and speed with --benchmark)."""
    from fairseq_kd.export.int8 import fidelity_report, layer_fidelity, manifest_batches, quantize_int8
    from fairseq_kd.export.onnx_export import interleaved_medians, onnx_session, run_onnx

    done = quantize_int8(args.onnx, args.int8, conv=args.int8_conv)
    audio = args.int8_audio or ("manifests" if os.path.isfile(os.path.join("manifests", "valid.tsv")) else None)
    batches = manifest_batches(audio, "valid", count=8, normalize=meta["normalize"]) if audio else check_batches()
    fp32, int8 = onnx_session(args.onnx, threads=args.threads), onnx_session(args.int8, threads=args.threads)
    cosines = layer_fidelity(fp32, int8, batches)
    print(f"wrote {args.int8}: {done['bytes_int8'] / 1e6:.2f} MB (fp32 {done['bytes_fp32'] / 1e6:.2f} MB), "
          f"{'+'.join(done['op_types'])} in int8")
    print(fidelity_report(cosines) + f" ({'the valid split of ' + audio if audio else 'noise'})")
    figures = {**done, "cosines": cosines, "audio": audio}
    if args.benchmark:
        import torch

        samples = int(args.seconds * meta["sample_rate"])
        wavs = torch.randn(args.batch, samples, generator=torch.Generator().manual_seed(0))
        lengths = torch.full((args.batch,), samples, dtype=torch.long)
        medians = interleaved_medians({"fp32": lambda: run_onnx(fp32, wavs, lengths),
                                       "int8": lambda: run_onnx(int8, wavs, lengths)}, args.repeats)
        figures.update(onnxruntime_fp32_s=medians["fp32"], onnxruntime_int8_s=medians["int8"],
                       int8_vs_fp32=medians["int8"] / medians["fp32"])
        print(f"int8 benchmark: onnxruntime int8 {medians['int8'] * 1e3:.1f} ms vs fp32 {medians['fp32'] * 1e3:.1f} ms "
              f"= {figures['int8_vs_fp32']:.2f}")
    return figures


def run_hf(args: argparse.Namespace) -> int:
    """``--format hf``: OUTPUT is a transformers HubertModel folder."""
    if args.checkpoint is None or args.output is None:
        raise CliError("give CHECKPOINT and the OUTPUT folder, e.g. fairseq-kd-export checkpoint_best.pt student_hf --format hf")
    if args.onnx or args.benchmark or args.check or args.s3prl_upstream:
        raise CliError("--format hf writes the transformers folder only (it is always checked); drop --onnx/--benchmark/--check/--s3prl-upstream")
    if args.outputs == "heads":
        raise CliError("--format hf writes a transformers HubertModel, which has no distillation heads: drop "
                       "--outputs heads (or export a .pt2 with --format standalone)")
    from fairseq_kd.export.checkpoints import load_student
    from fairseq_kd.export.hf import export_hf

    info = export_hf(load_student(args.checkpoint), args.output, force=args.force)
    print(f"wrote {args.output}: transformers HubertModel, {info['num_layers']} layers x {info['hidden_size']}, "
          f"normalize={str(info['normalize']).lower()}; max abs diff vs the student {info['max_abs_diff_vs_student']:.3g}, "
          f"reloaded with AutoModel {info['reloaded_max_abs_diff_vs_student']:.3g}")
    print("result: " + json.dumps({"hf": args.output, **{k: info[k] for k in ("max_abs_diff_vs_student", "reloaded_max_abs_diff_vs_student")}}))
    return 0


@clean_errors
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.format == "hf":
            return run_hf(args)
        check_outputs(args)
        return run(args)
    except (CliError, ImportError) as error:
        return report(error, "fairseq-kd-export")
    except ValueError as error:
        from fairseq_kd.export.checkpoints import ExportInputError

        if not isinstance(error, ExportInputError):
            raise
        return report(error, "fairseq-kd-export")


if __name__ == "__main__":
    sys.exit(main())
