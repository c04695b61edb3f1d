# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``fairseq-kd-eval-kws-sv CHECKPOINT [...] --data DIR --split test``: keyword accuracy, EER, minDCF.

Rebuilds a fine-tuned ``kws_sv`` checkpoint on its own (the encoder's config and the label sets
travel inside it: neither the distilled student, nor the teacher, nor the training data are
needed), runs it over one split of a prepared folder (whole utterances, padding-aware batches)
and reports:

* ``kws_accuracy`` (percent) over the utterances with a keyword label, and per keyword;
* ``eer`` (percent) and ``min_dcf`` (p_target 0.01, c_miss = c_fa = 1) from cosine scores of
  the speaker embeddings over the trial list: ``--trials FILE``; by default ``DIR/trials.txt``
  for the checkpoint's trial split (``test``), otherwise trials built from the split's speaker
  labels (as validation does).

Results go to ``--results-path`` (default: beside each checkpoint) as
``{checkpoint}.{split}.json`` plus ``{checkpoint}.{split}.scores`` (one ``target score path_a
path_b`` line per scored trial). Several checkpoints (e.g. a frozen and a fine-tuned run) are
evaluated one after the other in one process. Every trial must name an utterance of the split, and
(unless ``--allow-seen-speakers``) no speaker of the split may be one the checkpoint was trained on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from fairseq_kd.cli.errors import clean_errors, report
from fairseq_kd.cli.logs import add_verbose_argument, configure

logger = logging.getLogger("fairseq_kd.eval_kws_sv")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-eval-kws-sv",
        description="Keyword accuracy and speaker-verification EER / minDCF of a fine-tuned kws_sv checkpoint.",
    )
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="checkpoint_best.pt / checkpoint_last.pt of kws_sv runs")
    parser.add_argument("--data", required=True, help="prepared folder ({split}.tsv/.kw/.spk, dict.kw.txt, trials.txt)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--trials", default=None, help="trial list for this split (default: see above)")
    parser.add_argument("--results-path", default=None, help="folder for the results (default: the checkpoint's)")
    parser.add_argument("--max-tokens", type=int, default=1_600_000, help="audio samples per batch")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")
    parser.add_argument(
        "--allow-seen-speakers", action="store_true",
        help="do not stop when the split's speakers were training speakers (identification-style protocols)",
    )
    add_verbose_argument(parser)
    return parser


def load(checkpoint: str, data: str, split: str, trials: Optional[str], allow_seen: bool):
    """The model and the task with ``split`` loaded (all input checks included)."""
    from fairseq import checkpoint_utils

    import fairseq_kd  # noqa: F401  (registers kws_sv)
    from fairseq_kd.data.kws_sv import KwsSvDataError

    if not os.path.isfile(checkpoint):
        raise KwsSvDataError(f"checkpoint {checkpoint} does not exist")
    overrides: Dict[str, Any] = {"data": os.path.abspath(data)}
    if trials is not None:
        if not os.path.isfile(trials):
            raise KwsSvDataError(f"--trials {trials} does not exist")
        overrides.update(trials=os.path.abspath(trials), trials_split=split)
    if allow_seen:
        overrides["disjoint_speakers"] = False
    state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint, arg_overrides=overrides)
    cfg = state["cfg"]
    if cfg.task.get("_name") != "kws_sv":
        raise KwsSvDataError(
            f"{checkpoint} is a {cfg.task.get('_name')!r} checkpoint, not a kws_sv one (fairseq-hydra-train "
            f"--config-name kws_sv_joint / kws_sv_kws / kws_sv_sv writes those)"
        )
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides=overrides, state=state)
    task.load_dataset(split)
    return models[0], cfg, task


def evaluate(model, task, split: str, max_tokens: int, device: str) -> Dict[str, Any]:
    from fairseq_kd.evaluation.kws_sv import keyword_metrics, run_split, score_trials, verification_metrics

    outputs = run_split(model, task, split, max_tokens, device)
    results: Dict[str, Any] = {}
    results.update(keyword_metrics(outputs, task.keywords))
    if split in task.trials and outputs.embeddings:
        trials = task.trials[split]
        results.update(verification_metrics(outputs.embeddings, trials))
        scores, targets, _ = score_trials(outputs.embeddings, trials)
        scored = [t for t in trials if t.a in outputs.embeddings and t.b in outputs.embeddings]
        results["_scores"] = [(int(t.target), float(s), t.a, t.b) for t, s in zip(scored, scores)]
    return results


def trial_source(task, split: str) -> Optional[str]:
    cfg = task.cfg
    if not cfg.sv:
        return None
    path = os.path.join(cfg.data, cfg.trials) if cfg.trials else ""
    if split == cfg.trials_split and path and os.path.isfile(path):
        return path
    return f"built from {split}.{cfg.spk_labels} (all pairs, or {cfg.valid_max_trials} seeded pairs)"


def write_results(results: Dict[str, Any], out_dir: str, stem: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    written = []
    scores = results.pop("_scores", None)
    json_path = os.path.join(out_dir, f"{stem}.json")
    if os.path.exists(json_path):
        logger.info(f"replacing {json_path} (an earlier evaluation of the same checkpoint and split)")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")
    written.append(json_path)
    if scores is not None:
        score_path = os.path.join(out_dir, f"{stem}.scores")
        with open(score_path, "w") as f:
            for target, score, a, b in scores:
                f.write(f"{target} {score:.6f} {a} {b}\n")
        written.append(score_path)
    return written


@clean_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO, stream=sys.stdout)
    args = build_parser().parse_args(argv)
    configure(args.verbose, keep=(logger.name,))  # its progress lines stay
    outputs = [
        os.path.join(args.results_path or os.path.dirname(os.path.abspath(c)),
                     f"{os.path.splitext(os.path.basename(c))[0]}.{args.split}")
        for c in args.checkpoints
    ]
    if len(set(outputs)) < len(outputs):
        print("fairseq-kd-eval-kws-sv: two checkpoints would write the same results file in --results-path; "
              "leave --results-path out (results then go beside each checkpoint)", file=sys.stderr)
        return 2
    for checkpoint, stem in zip(args.checkpoints, outputs):
        status = evaluate_checkpoint(args, checkpoint, stem)
        if status:
            return status
    return 0


def evaluate_checkpoint(args: argparse.Namespace, checkpoint: str, stem: str) -> int:
    from fairseq_kd.data.audio_checks import ManifestError
    from fairseq_kd.data.kws_sv import KwsSvDataError
    from fairseq_kd.models.kws_sv import KwsSvModelError

    try:
        model, cfg, task = load(checkpoint, args.data, args.split, args.trials, args.allow_seen_speakers)
    except (KwsSvDataError, KwsSvModelError, ManifestError) as error:
        return report(error, "fairseq-kd-eval-kws-sv")
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    results = evaluate(model, task, args.split, args.max_tokens, device)
    results.update(
        checkpoint=os.path.abspath(checkpoint),
        data=os.path.abspath(args.data),
        split=args.split,
        encoder=cfg.model.w2v_args.model._name,
        encoder_params=int(sum(p.numel() for p in model.w2v_model.parameters())),
        head_params=int(sum(p.numel() for n, p in model.named_parameters() if not n.startswith("w2v_model."))),
        trial_list=trial_source(task, args.split),
    )
    for name, mix in (("kws", model.kws_mix), ("sv", model.sv_mix)):
        if mix is not None:
            results[f"{name}_layer_weights"] = mix.layer_weights() or f"layer {mix.layer}"
    written = write_results(results, os.path.dirname(stem), os.path.basename(stem))
    shown = {k: v for k, v in results.items() if k in ("kws_accuracy", "eer", "min_dcf", "trials", "kws_utterances")}
    print(f"{checkpoint} ({args.split}): " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
