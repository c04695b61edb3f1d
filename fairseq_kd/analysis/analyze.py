"""``fairseq-kd-analyze``'s work: CKA maps, cosine to the mapped teacher layer, probes, plots, JSON.

For every student (a distillation checkpoint) against its teacher on one manifest:

* linear CKA between every student layer (0..L) and every teacher layer (0..T), on the same frames
  (``cka_<name>.png``, numbers in ``analysis.json``);
* the cosine similarity of every distilled output (``h4``, ``p8``) to its mapped teacher target, as
  the training criterion pairs them (``evaluation/similarity.py``; ``cosine.png``);
* per-layer content (CTC letters, CER) and speaker (accuracy) linear probes on frozen features, for
  the teacher and every student (``probes.png``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from fairseq_kd.analysis.cka import cka_matrix
from fairseq_kd.analysis.features import collect_features
from fairseq_kd.analysis.plots import cka_heatmap, cosine_plot, probe_plot
from fairseq_kd.analysis.probes import (
    check_speakers, ctc_probe, read_letters, read_speakers, select_rows, speaker_probe, split_by_speaker,
)
from fairseq_kd.data.manifest import read_manifest
from fairseq_kd.evaluation.similarity import load_distilled, similarity_to_teacher
from fairseq_kd.teacher import FrozenTeacher


def probe_layers(feats, targets, vocab, speakers, train, test, steps: int) -> Dict[str, Any]:
    content = speaker = None
    if targets is not None:
        content = [ctc_probe(layer, targets, vocab, train, test, steps=steps) for layer in feats.layers]
    if speakers is not None:
        speaker = [speaker_probe(feats.pooled(l), speakers, train, test) for l in range(len(feats.layers))]
    return {"content_error": content, "speaker_accuracy": speaker}


def run_analysis(
    teacher_path: str,
    students: Dict[str, str],
    manifest: str,
    out_dir: str,
    *,
    max_utterances: Optional[int] = None,
    content_probe: bool = True,
    speaker: bool = True,
    probe_steps: int = 300,
    cosine_utterances: Optional[int] = None,
    log=print,
) -> Dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    _, all_rows = read_manifest(manifest)
    # labels first: a manifest without them fails before any model runs
    all_speakers = read_speakers(manifest, all_rows) if speaker else None
    indices = select_rows(all_speakers, len(all_rows), max_utterances)
    count = len(indices)
    speakers = [all_speakers[i] for i in indices] if speaker else None
    targets, symbols = read_letters(manifest, all_rows, indices) if content_probe else (None, [])
    train, test = split_by_speaker(speakers, count)
    if speakers is not None:
        check_speakers(speakers, train, test)
    teacher = FrozenTeacher.from_checkpoint(teacher_path)
    models, cfgs = {}, {}
    for name, path in students.items():
        models[name], cfgs[name] = load_distilled(path)
    log(f"features of {count} utterances: teacher ({teacher.num_layers} layers) and {', '.join(models)}")
    rows, teacher_feats, feats, pairs = collect_features(
        manifest, teacher, models, {n: bool(c.task.normalize) for n, c in cfgs.items()}, indices=indices
    )
    results: Dict[str, Any] = {
        "manifest": str(manifest), "utterances": count, "teacher": str(teacher_path),
        "probe_split": {"train": len(train), "test": len(test)},
        "cosine_utterances": cosine_utterances or max_utterances or len(all_rows), "models": {},
    }
    probes = {}
    log("probes: teacher")
    probes["teacher"] = probe_layers(teacher_feats, targets, len(symbols), speakers, train, test, probe_steps)
    results["models"]["teacher"] = {"layers": teacher.num_layers, **probes["teacher"]}
    cosines = {}
    for name, model in models.items():
        log(f"CKA, cosine and probes: {name}")
        p = pairs[name]
        cka = torch.stack([cka_matrix([p.student[l]], p.teacher[l])[0] for l in range(len(p.student))])
        cka_heatmap(cka.tolist(), out / f"cka_{name}.png", f"linear CKA: {name} vs teacher")
        cosines[name] = similarity_to_teacher(
            model, cfgs[name], teacher, manifest, cosine_utterances or max_utterances)
        probes[name] = probe_layers(feats[name], targets, len(symbols), speakers, train, test, probe_steps)
        results["models"][name] = {
            "checkpoint": str(students[name]), "layers": feats[name].num_layers, "cka": cka.tolist(),
            "cka_frames": [int(s.shape[0]) for s in p.student], "cosine": cosines[name], **probes[name],
        }
    if models:
        cosine_plot(cosines, out / "cosine.png")
    if content_probe or speaker:
        probe_plot(probes, out / "probes.png")
    (out / "analysis.json").write_text(json.dumps(results, indent=1))
    return results


__all__ = ["run_analysis"]


def teacher_layer_cka(teacher_path: str, manifest: str, max_utterances: Optional[int] = None):
    """Linear CKA between the teacher's transformer layers 1..T on the manifest's frames: (T, T)."""
    teacher = FrozenTeacher.from_checkpoint(teacher_path)
    _, teacher_feats, _, _ = collect_features(manifest, teacher, {}, {}, max_utterances)
    layers = [torch.cat(frames) for frames in teacher_feats.layers[1:]]
    return cka_matrix(layers, layers), list(range(1, teacher.num_layers + 1))


__all__ += ["teacher_layer_cka"]
