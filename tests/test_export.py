"""Exporting students: the standalone torch.export file, the s3prl upstream, ONNX, bad input.

Two tiny students are written as fairseq writes checkpoints (real task, model and config classes,
``torch_persistent_save``), covering both rate cases:

- ``reduced``: time reduction x2 before layer 2 (layers 0-1 at 50 Hz, layer 2 at 25 Hz), pre-LN,
  layer-norm CNN, trained with ``task.normalize=true`` (the HuBERT Large conventions);
- ``plain``: no reduction, post-LN, group-norm CNN, ``normalize=false`` (HuBERT Base's); it is
  fine-tuned into a real ``hubert_ctc`` model by ``kd_audio_finetuning`` (weights then perturbed,
  as fine-tuning would), and that CTC checkpoint is what gets exported.

The real ``fairseq-kd-export`` console script exports both in parallel (ONNX, ``--check`` and a
short ``--benchmark`` for the reduced one). The upstream directory is copied as s3prl's
registration does, and runs in a subprocess in which importing fairseq, fairseq_kd, omegaconf or
hydra raises; its outputs are compared here with the originals loaded by fairseq's own
``load_model_ensemble_and_task``. s3prl itself cannot be installed beside fairseq (omegaconf pins,
torchaudio), so its Featurizer's rules are checked directly (``featurize`` below).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict

from conftest import MANIFESTS, console_script
from fairseq_checkpoints import (
    MISSING_DATA_DIR,
    _save,
    _trainer_state,
    make_hubert_checkpoint,
    make_wav2vec2_checkpoint,
    rewrite_checkpoint,
)

TINY = dict(
    encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=64, encoder_attention_heads=4,
    conv_channels=[32, 32, 32, 32, 64, 64, 64], conv_pos=16, conv_pos_groups=4,
    hint_layer_ids=[1, 2], teacher_embed_dim=48, hint_head_type="convt_linear",
)
STUDENTS = {
    "reduced": dict(time_reduction_factor=2, time_reduction_layer=1, layer_norm_first=True,
                    extractor_mode="layer_norm", normalize=True),
    "plain": dict(time_reduction_factor=1, normalize=False),
}
TOLERANCE = 1e-4  # fp32, max abs
TOLERABLE_SEQLEN_DIFF = 5  # s3prl/upstream/interfaces.py
BLOCKED = ("fairseq", "fairseq_kd", "fairseq_kd_compat", "omegaconf", "hydra")


# -- checkpoints, written as fairseq writes them ----------------------------------------------------
def full_cfg(task_cfg, task_name, model_cfg, model_name, criterion_cfg, criterion_name):
    from fairseq.dataclass.configs import FairseqConfig

    cfg = OmegaConf.structured(FairseqConfig)
    with open_dict(cfg):
        cfg.task = OmegaConf.structured(task_cfg)
        cfg.task._name = task_name
        cfg.model = OmegaConf.structured(model_cfg)
        cfg.model._name = model_name
        cfg.criterion = OmegaConf.structured(criterion_cfg)
        cfg.criterion._name = criterion_name
    return cfg


def make_student_checkpoint(path: Path, normalize: bool, seed: int, criterion: Tuple[Any, str, str] = None,
                            **arch) -> Path:
    """A distillation checkpoint (task distill_hubert, model thin_hubert with hint heads);
    ``criterion``: (config, registered name, class name), FitHuBERT's hints by default."""
    from fairseq import tasks

    from fairseq_kd.criterions.layer_distill import FitHubertHintConfig
    from fairseq_kd.models.thin_hubert import ThinHubertConfig
    from fairseq_kd.tasks.distill_hubert import DistillHubertConfig

    criterion_cfg, criterion_name, criterion_class = criterion or (
        FitHubertHintConfig(), "fithubert_hint", "FitHubertHintCriterion")
    task_cfg = DistillHubertConfig(data=MISSING_DATA_DIR, teacher_path="/checkpoint/teacher.pt", normalize=normalize)
    cfg = full_cfg(task_cfg, "distill_hubert", ThinHubertConfig(**{**TINY, **arch}), "thin_hubert",
                   criterion_cfg, criterion_name)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(seed)
    model = task.build_model(cfg.model, from_checkpoint=True)  # the teacher is not needed here
    return _save(_trainer_state(cfg, model, task, criterion_class), path)


def make_ctc_checkpoint(path: Path, student: Path) -> Path:
    """hubert_ctc built by kd_audio_finetuning from ``student`` (model.w2v_path), encoder perturbed."""
    from fairseq import tasks
    from fairseq.criterions.ctc import CtcCriterionConfig
    from fairseq.models.hubert.hubert_asr import HubertCtcConfig

    from fairseq_kd.tasks.kd_finetuning import KDAudioFinetuningConfig

    task_cfg = KDAudioFinetuningConfig(data=str(MANIFESTS), labels="ltr", normalize=False)
    cfg = full_cfg(task_cfg, "kd_audio_finetuning", HubertCtcConfig(w2v_path=str(student)), "hubert_ctc",
                   CtcCriterionConfig(), "ctc")
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    torch.manual_seed(5)
    with torch.no_grad():  # stands for fine-tuning: the export must read these weights
        for p in model.w2v_encoder.w2v_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return _save(_trainer_state(cfg, model, task, "CtcCriterion"), path)


def fairseq_encoder(path: Path) -> torch.nn.Module:
    """The student as fairseq itself loads the checkpoint (independent of fairseq_kd.export)."""
    from fairseq import checkpoint_utils

    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    model = models[0]
    model = getattr(getattr(model, "w2v_encoder", None), "w2v_model", model)
    return model.eval()


def native_hidden_states(model, wav: torch.Tensor) -> List[torch.Tensor]:
    """(T_l, D) per layer, each at its own rate, for one utterance."""
    with torch.no_grad():
        return [h[0] for h in model.encode(wav[None])["hidden_states"]]


def result_json(stdout: str) -> Dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("result: ")]
    assert len(lines) == 1, stdout[-3000:]
    return json.loads(lines[0][len("result: "):])


# -- the upstream, run where fairseq cannot be imported -------------------------------------------
BLOCKED_RUNNER = r'''
import importlib.abc, json, sys
BLOCKED = {blocked!r}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked in this test: " + name)
        return None

sys.meta_path.insert(0, Blocker())
preloaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
sys.path.append({site_packages!r})  # python -S: torch's folder only, no .pth start-up hooks
sys.path.insert(0, {upstream_root!r})
import torch
from fairseq_kd_student.hubconf import fairseq_kd_student  # as s3prl.hub imports it

inputs = torch.load({inputs!r})
results = {{}}
for name, path in {files!r}.items():
    upstream = fairseq_kd_student(ckpt=path)
    upstream.eval()
    with torch.no_grad():
        mixed = upstream(inputs["mixed"])
        again = upstream(inputs["mixed"])
        singles = [upstream([w])["hidden_states"] for w in inputs["mixed"]]
        short = upstream([inputs["short"]])
        tiny = upstream([inputs["tiny"]])
        offset = upstream([inputs["offset"]])
        # the program follows the input's device (s3prl moves inputs to cuda): checked on "meta"
        on_meta = upstream([w.to("meta") for w in inputs["mixed"]])["hidden_states"]
    results[name] = {{
        "mixed": mixed["hidden_states"], "last": mixed["last_hidden_state"], "again": again["hidden_states"],
        "hidden_state_1": mixed["hidden_state_1"], "singles": singles,
        "short": short["hidden_states"], "tiny": tiny["hidden_states"], "offset": offset["hidden_states"],
        "on_meta": [(str(h.device), tuple(h.shape)) for h in on_meta],
        "rates": {{k: upstream.get_downsample_rates(k) for k in ("hidden_states", "last_hidden_state")}},
        "meta": upstream.student.meta,
    }}


def error_of(call):
    try:
        call()
    except Exception as error:
        return type(error).__name__ + ": " + str(error)
    return None


from fairseq_kd_student.expert import UpstreamExpert
from fairseq_kd_student.runtime import StandaloneStudent

results["errors"] = {{
    "fairseq_checkpoint": error_of(lambda: StandaloneStudent({not_standalone!r})),
    "truncated": error_of(lambda: StandaloneStudent({truncated!r})),
    "model_config": error_of(lambda: UpstreamExpert({files!r}["reduced"], model_config="student.yaml")),
    "two_dim_wav": error_of(lambda: upstream([torch.zeros(1600), torch.zeros(2, 1600)])),
    "unknown_feature": error_of(lambda: upstream.get_downsample_rates("PR")),
}}
torch.save(results, {output!r})
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({{"preloaded": preloaded, "leaked": leaked}}))
'''


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Dict[str, Any]:
    work = tmp_path_factory.mktemp("export")
    start, stages = time.monotonic(), {}
    ckpt = {}
    for seed, (name, arch) in enumerate(STUDENTS.items()):
        arch = dict(arch)
        ckpt[name] = make_student_checkpoint(work / f"{name}.pt", arch.pop("normalize"), seed, **arch)
    ckpt["ctc"] = make_ctc_checkpoint(work / "ctc.pt", ckpt["plain"])

    stages["checkpoints"] = time.monotonic() - start
    # the console script exports the CTC checkpoint while this process exports the reduced one
    # (both CPU-bound: two cores)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [console_script("fairseq-kd-export"), str(ckpt["ctc"]), "ctc.pt2", "--check",
           "--s3prl-upstream", "s3prl_root/fairseq_kd_student"]
    with open(work / "ctc.out", "w") as out, open(work / "ctc.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=err, text=True)
    from fairseq_kd.cli.export import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        # --outputs layers: FitHuBERT-shaped, its default; named here as a user would
        code = main([str(ckpt["reduced"]), str(work / "reduced.pt2"), "--outputs", "layers", "--onnx", str(work / "reduced.onnx"),
                     "--int8", str(work / "reduced.int8.onnx"), "--int8-audio", str(MANIFESTS),
                     "--benchmark", "--seconds", "1", "--repeats", "2"])
    proc.wait(timeout=600)
    runs = {"reduced": subprocess.CompletedProcess([], code, stdout.getvalue(), ""),
            "ctc": subprocess.CompletedProcess(cmd, proc.returncode, (work / "ctc.out").read_text(),
                                               (work / "ctc.err").read_text())}
    for name, run in runs.items():
        assert run.returncode == 0, f"{name}: {run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    files = {"reduced": str(work / "reduced.pt2"), "ctc": str(work / "ctc.pt2")}
    stages["export"] = time.monotonic() - start - sum(stages.values())

    # wavs: mixed lengths (2.3 s, 1 s, 0.05 s), 0.05 s alone, shorter than 0.05 s
    gen = torch.Generator().manual_seed(3)
    inputs = {
        "mixed": [torch.randn(n, generator=gen) * 0.1 for n in (36800, 16000, 800)],
        "short": torch.randn(800, generator=gen) * 0.1,
        "tiny": torch.randn(300, generator=gen) * 0.1,
    }
    inputs["offset"] = inputs["mixed"][1] * 7.0 + 0.3  # far from zero mean and unit variance
    torch.save(inputs, work / "inputs.pt")
    (work / "cut.pt2").write_bytes((work / "reduced.pt2").read_bytes()[:20000])
    script = BLOCKED_RUNNER.format(blocked=BLOCKED, upstream_root=str(work / "s3prl_root"),
                                   not_standalone=str(ckpt["reduced"]), truncated=str(work / "cut.pt2"),
                                   site_packages=str(Path(torch.__file__).parents[1]),
                                   inputs=str(work / "inputs.pt"), files=files, output=str(work / "results.pt"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["FAIRSEQ_KD_COMPAT"] = "0"  # not even the start-up hook of the plugin's environment
    blocked = subprocess.Popen([sys.executable, "-S", "-c", script], cwd=work, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    # meanwhile, the originals as fairseq loads them
    models = {name: fairseq_encoder(ckpt[name]) for name in ("reduced", "ctc", "plain")}
    out, err = blocked.communicate(timeout=300)
    assert blocked.returncode == 0, err[-5000:]
    stages["upstream without fairseq"] = time.monotonic() - start - sum(stages.values())
    print("export stages (s):", {k: round(v, 1) for k, v in stages.items()})
    return {
        "work": work, "ckpt": ckpt, "runs": runs, "files": files, "inputs": inputs, "models": models,
        "results": torch.load(work / "results.pt"), "blocked": json.loads(out.strip().splitlines()[-1]),
    }


def reference(exported, name: str, wav: torch.Tensor) -> List[torch.Tensor]:
    """The original model's hidden states for one raw utterance, normalised as its task did."""
    normalize = name == "reduced"
    wav = F.layer_norm(wav, wav.shape) if normalize else wav
    return native_hidden_states(exported["models"][name], wav)


def assert_matches_reference(hidden: List[torch.Tensor], expected: List[torch.Tensor], factor: int,
                             reduced_from: int) -> None:
    """``hidden`` (T, D) per layer at the CNN rate vs ``expected`` at each layer's own rate."""
    assert len(hidden) == len(expected)
    cnn_frames = expected[0].size(0)
    for layer_id, (got, want) in enumerate(zip(hidden, expected)):
        step = factor if layer_id >= reduced_from else 1
        assert got.size(0) >= cnn_frames
        torch.testing.assert_close(got[:cnn_frames:step], want, atol=TOLERANCE, rtol=0)
        if step > 1:  # up-sampled by repetition: every frame of a reduced pair is the same
            torch.testing.assert_close(got[1:cnn_frames:step], want[: len(got[1:cnn_frames:step])], atol=TOLERANCE, rtol=0)


# -- the standalone file ----------------------------------------------------------------------------
def test_upstream_runs_without_fairseq_omegaconf_or_hydra(exported):
    assert exported["blocked"] == {"preloaded": [], "leaked": []}
    copied = sorted(p.name for p in (exported["work"] / "s3prl_root" / "fairseq_kd_student").iterdir())
    assert copied == ["__init__.py", "expert.py", "hubconf.py", "runtime.py"]
    assert "from s3prl.upstream.fairseq_kd_student.hubconf import *" in exported["runs"]["ctc"].stdout


@pytest.mark.parametrize("name", ["reduced", "ctc"])
def test_standalone_file_equals_original_model(exported, name):
    """Each utterance alone: every layer equals fairseq's model (reduced layers: every r-th frame)."""
    results = exported["results"][name]
    factor, reduced_from = (2, 2) if name == "reduced" else (1, 99)
    for wav, single in zip(exported["inputs"]["mixed"], results["singles"]):
        assert_matches_reference([h[0] for h in single], reference(exported, name, wav), factor, reduced_from)


def test_ctc_export_holds_the_finetuned_encoder_not_the_distilled_one(exported):
    wav = exported["inputs"]["mixed"][1]
    got = exported["results"]["ctc"]["singles"][1][-1][0]
    tuned = reference(exported, "ctc", wav)[-1]
    distilled = native_hidden_states(exported["models"]["plain"], wav)[-1]
    torch.testing.assert_close(got, tuned, atol=TOLERANCE, rtol=0)
    assert (got - distilled).abs().max() > 100 * TOLERANCE


def test_metadata_describes_rates_and_normalisation(exported):
    reduced, ctc = exported["results"]["reduced"]["meta"], exported["results"]["ctc"]["meta"]
    assert reduced["native_downsample_rates"] == [320, 320, 640]
    assert (reduced["downsample_rate"], reduced["rate_policy"], reduced["normalize"]) == (320, "upsampled", True)
    assert (ctc["native_downsample_rates"], ctc["normalize"], ctc["source_kind"]) == ([320, 320, 320], False, "hubert_ctc")
    for meta in (reduced, ctc):
        assert (meta["num_hidden_states"], meta["hidden_size"], meta["min_samples"]) == (3, 64, 400)
        assert meta["student_config"]["encoder_layers"] == 2 and meta["source_sha256"]


def test_cli_check_and_benchmark_figures(exported):
    reduced = result_json(exported["runs"]["reduced"].stdout)
    ctc = result_json(exported["runs"]["ctc"].stdout)
    assert reduced["export_max_abs_diff"] <= TOLERANCE and ctc["export_max_abs_diff"] <= TOLERANCE
    assert ctc["reloaded_max_abs_diff"] <= TOLERANCE and "reloaded_max_abs_diff" not in reduced  # --check
    assert reduced["onnx_max_abs_diff"] <= TOLERANCE and "onnx_max_abs_diff" not in ctc
    bench = reduced["benchmark"]
    assert bench["pytorch_eager_s"] > 0 and bench["onnxruntime_s"] > 0 and bench["torch_export_s"] > 0
    assert bench["onnxruntime_vs_eager"] == pytest.approx(bench["onnxruntime_s"] / bench["pytorch_eager_s"])
    assert "onnxruntime / eager = " in exported["runs"]["reduced"].stdout


# -- the s3prl contract ------------------------------------------------------------------------------
def featurize(wavs: List[torch.Tensor], hidden_states: List[torch.Tensor], rate: int,
              weights: torch.Tensor) -> List[torch.Tensor]:
    """s3prl's legacy Featurizer (upstream/interfaces.py): weighted sum of all layers, then tolist."""
    stacked = torch.stack(hidden_states, dim=0)  # fails unless all layers have one shape
    norm_weights = F.softmax(weights, dim=-1)
    summed = (norm_weights[:, None, None, None] * stacked).sum(dim=0)
    max_len = max(len(w) for w in wavs)
    assert abs(summed.size(1) - round(max_len / rate)) < TOLERABLE_SEQLEN_DIFF
    return [f[: round(len(w) / rate)] for f, w in zip(summed, wavs)]


@pytest.mark.parametrize("name", ["reduced", "ctc"])
def test_s3prl_contract(exported, name):
    results, wavs = exported["results"][name], exported["inputs"]["mixed"]
    rate = results["rates"]["hidden_states"]
    assert results["rates"] == {"hidden_states": 320, "last_hidden_state": 320}
    mixed = results["mixed"]
    assert len(mixed) == 3 and len({tuple(h.shape) for h in mixed}) == 1 and mixed[0].shape[::2] == (3, 64)
    assert torch.equal(results["last"], mixed[-1]) and torch.equal(results["hidden_state_1"], mixed[1])
    features = featurize(wavs, mixed, rate, torch.tensor([0.3, -1.0, 2.0]))
    frames = mixed[0].size(1)
    assert [tuple(f.shape) for f in features] == [(min(round(len(w) / rate), frames), 64) for w in wavs]
    # one-hot weights pick a layer: the weighted sum really is over every layer
    for layer_id in range(3):
        onehot = torch.full((3,), -1e4)
        onehot[layer_id] = 0
        picked = featurize(wavs, mixed, rate, onehot)[0]
        torch.testing.assert_close(picked, mixed[layer_id][0, : picked.size(0)])
    # 0.05 s (800 samples: 2 CNN frames, 1 after x2 reduction) and shorter (padded to 0.05 s)
    for key in ("short", "tiny"):
        assert [tuple(h.shape) for h in results[key]] == [(1, 2, 64)] * 3, key
        assert torch.isfinite(torch.stack(results[key])).all()
    featurize([exported["inputs"]["short"]], results["short"], rate, torch.zeros(3))
    # on another device (moved with torch.export's move_to_device_pass): same shapes, that device
    assert results["on_meta"] == [("meta", tuple(mixed[0].shape))] * 3


@pytest.mark.parametrize("name", ["reduced", "ctc"])
def test_s3prl_mixed_lengths_and_determinism(exported, name):
    results = exported["results"][name]
    assert all(torch.equal(a, b) for a, b in zip(results["mixed"], results["again"]))
    frames = [s[0].size(1) for s in results["singles"]]
    for layer_id, batch in enumerate(results["mixed"]):
        for row, n in enumerate(frames):
            assert (batch[row, n:] == 0).all()  # nothing beyond a row's frames
            single = results["singles"][row][layer_id][0]
            # layer-norm CNN: a padded row equals the utterance alone; group-norm CNN (HuBERT
            # Base's) normalises over the padding too, so only the unpadded row is equal
            if name == "reduced" or row == 0:
                torch.testing.assert_close(batch[row, :n], single, atol=TOLERANCE, rtol=0)


def test_normalisation_is_applied_when_the_student_was_trained_with_it(exported):
    wav = exported["inputs"]["offset"]
    got = exported["results"]["reduced"]["offset"][-1][0]
    normalised = reference(exported, "reduced", wav)[-1]  # F.layer_norm(wav, wav.shape) first
    raw = native_hidden_states(exported["models"]["reduced"], wav)[-1]
    torch.testing.assert_close(got[::2], normalised, atol=TOLERANCE, rtol=0)
    assert (got[::2] - raw).abs().max() > 100 * TOLERANCE
    # the un-normalised student gets the audio as it is
    got_plain = exported["results"]["ctc"]["offset"][-1][0]
    torch.testing.assert_close(got_plain, reference(exported, "ctc", wav)[-1], atol=TOLERANCE, rtol=0)


# -- ONNX ----------------------------------------------------------------------------------------------
def test_onnx_dynamic_batch_and_length_equal_the_original(exported):
    from fairseq_kd.export.onnx_export import onnx_session, run_onnx

    path = exported["work"] / "reduced.onnx"
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["fairseq_kd.json"])["native_downsample_rates"] == [320, 320, 640]
    session = onnx_session(str(path), threads=1)
    for lengths in ([36800, 16000, 800], [12000]):
        wavs = [F.layer_norm(w, w.shape) for w in (torch.randn(n) * 0.1 for n in lengths)]
        batch = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
        hidden, frame_lengths = run_onnx(session, batch, torch.tensor(lengths))
        assert hidden.shape[:2] == (3, len(lengths))
        for row, wav in enumerate(wavs):
            expected = native_hidden_states(exported["models"]["reduced"], wav)
            assert frame_lengths[row] == expected[0].size(0)
            assert_matches_reference([torch.from_numpy(h[row]) for h in hidden], expected, 2, 2)


def test_int8_onnx_is_quantised_and_close_to_fp32_on_real_audio(exported):
    """Dynamic int8 (MatMuls): int8 kernels in the graph, the student's metadata kept, same frames,
    every layer's cosine to fp32 >= 0.99 on the mini corpus, but not bit-identical (it did quantise)."""
    import onnx

    from fairseq_kd.export.int8 import FIDELITY_TARGET, layer_fidelity, manifest_batches, quantize_int8
    from fairseq_kd.export.onnx_export import onnx_session, run_onnx

    fp32_path, int8_path = exported["work"] / "reduced.onnx", exported["work"] / "reduced.int8.onnx"
    reported = result_json(exported["runs"]["reduced"].stdout)["int8"]  # fairseq-kd-export --int8
    assert reported["op_types"] == ["MatMul"] and len(reported["cosines"]) == 3
    assert min(reported["cosines"]) >= FIDELITY_TARGET and reported["int8_vs_fp32"] > 0
    before = fp32_path.read_bytes()
    again = exported["work"] / "again.int8.onnx"
    assert quantize_int8(str(fp32_path), str(again))["op_types"] == ["MatMul"]
    assert fp32_path.read_bytes() == before and again.read_bytes() == int8_path.read_bytes()
    model = onnx.load(str(int8_path))
    assert sum(n.op_type == "MatMulInteger" for n in model.graph.node) >= 6  # q, k, v, out, 2 FFN per layer
    meta = json.loads({p.key: p.value for p in model.metadata_props}["fairseq_kd.json"])
    assert meta["native_downsample_rates"] == [320, 320, 640] and meta["quantization"]["weights"].startswith("int8")
    fp32, int8 = onnx_session(str(fp32_path), threads=1), onnx_session(str(int8_path), threads=1)
    batches = manifest_batches(str(MANIFESTS), "valid", count=4, normalize=True)
    cosines = layer_fidelity(fp32, int8, batches)
    assert len(cosines) == 3 and min(cosines) >= FIDELITY_TARGET, cosines
    a, _ = run_onnx(fp32, *batches[0])
    b, _ = run_onnx(int8, *batches[0])
    assert float(abs(a - b).max()) > 0.0


# -- bad input -------------------------------------------------------------------------------------------
def edit_cfg(**model_edits):
    def edit(state):
        state["cfg"]["model"].update(model_edits)
        return state
    return edit


def edit_w2v_args(**edits):
    def edit(state):
        state["cfg"]["model"]["w2v_args"]["model"].update(edits)
        return state
    return edit


@pytest.fixture(scope="module")
def bad_inputs(exported) -> Dict[str, Tuple[Path, str]]:
    work, ckpt = exported["work"] / "bad", exported["ckpt"]
    work.mkdir()
    truncated = work / "truncated.pt"
    truncated.write_bytes(ckpt["reduced"].read_bytes()[:5000])
    text = work / "notes.txt"
    text.write_text("not a checkpoint\n")
    bare = work / "bare.pt"
    torch.save({"weights": torch.zeros(2)}, bare)
    help_ = "pass a distillation checkpoint"  # what every message for a wrong file suggests
    return {  # case: (file, what the message says, how to fix it)
        "missing": (work / "nowhere.pt", "does not exist", help_),
        "directory": (work, "is not a file", "give the checkpoint file itself"),
        "text": (text, "is not a PyTorch checkpoint", help_),
        "truncated": (truncated, "is truncated", "copy it again"),
        "bare_torch": (bare, "not a fairseq training checkpoint", help_),
        "hubert_teacher": (make_hubert_checkpoint(work / "hubert.pt"), "holds a fairseq 'hubert' model: a teacher",
                           "Distil it first (fairseq-hydra-train --config-name thin_deep task.teacher_path="),
        "wav2vec2_teacher": (make_wav2vec2_checkpoint(work / "w2v.pt"), "holds a fairseq 'wav2vec2' model: a teacher",
                             help_),
        "ctc_of_teacher": (rewrite_checkpoint(ckpt["ctc"], work / "ctc_teacher.pt", edit_w2v_args(_name="hubert")),
                           "fine-tuned from a 'hubert' model", help_),
        "unknown_model": (rewrite_checkpoint(ckpt["plain"], work / "lm.pt", edit_cfg(_name="transformer_lm")),
                          "holds a 'transformer_lm' model, not a distilled student", help_),
        "mismatched_config": (rewrite_checkpoint(ckpt["plain"], work / "layers.pt", edit_cfg(encoder_layers=3)),
                              "the weights do not match the student config stored with them (16 weights missing",
                              "export the checkpoint_*.pt written by training"),
        "unknown_key": (rewrite_checkpoint(ckpt["plain"], work / "key.pt", edit_cfg(future_option=1)),
                        "keys thin_hubert does not know: ['future_option']", "with the fairseq_kd version that trained it"),
        "invalid_config": (rewrite_checkpoint(ckpt["plain"], work / "heads.pt", edit_cfg(encoder_attention_heads=5)),
                           "must be divisible by encoder_attention_heads (5)",
                           "export the checkpoint_*.pt written by training"),
        "standalone_again": (Path(exported["files"]["reduced"]), "already a standalone student", help_),
    }


BAD_CASES = ["missing", "directory", "text", "truncated", "bare_torch", "hubert_teacher", "wav2vec2_teacher",
             "ctc_of_teacher", "unknown_model", "mismatched_config", "unknown_key", "invalid_config",
             "standalone_again"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_checkpoint_is_refused_naming_the_file(bad_inputs, case, capsys):
    from fairseq_kd.cli.export import main

    path, expected, fix = bad_inputs[case]
    out = bad_inputs["text"][0].parent / f"{case}.pt2"
    assert main([str(path), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"fairseq-kd-export: error: {path}" in err, err
    assert expected in err and fix in err, err
    assert not out.exists()


def test_existing_output_is_not_overwritten(exported, capsys):
    from fairseq_kd.cli.export import main

    target = Path(exported["files"]["ctc"])
    before = target.read_bytes()
    assert main([str(exported["ckpt"]["plain"]), str(target)]) == 2
    assert "exists; add --force" in capsys.readouterr().err
    assert target.read_bytes() == before
    assert main([str(exported["ckpt"]["plain"]), str(target.with_name("x.pt2")), "--benchmark"]) == 2
    assert "--benchmark compares onnxruntime with PyTorch: add --onnx" in capsys.readouterr().err


def test_runtime_refuses_what_is_not_a_standalone_student(exported):
    """Run in the subprocess without fairseq: errors name the file and say what to pass."""
    errors, reduced = exported["results"]["errors"], exported["ckpt"]["reduced"]
    assert errors["fairseq_checkpoint"].startswith(f"StandaloneFileError: {reduced} is a zip archive but has no "
                                                   "fairseq_kd.json"), errors
    assert "fairseq-kd-export checkpoint_best.pt student.pt2" in errors["fairseq_checkpoint"]
    assert errors["truncated"].startswith(f"StandaloneFileError: {exported['work'] / 'cut.pt2'} is not a standalone")
    assert errors["model_config"] == ("ValueError: model_config='student.yaml' is not used by fairseq_kd students "
                                      "(the .pt2 file describes itself): drop -g / model_config")
    assert errors["two_dim_wav"] == "ValueError: wavs[1] must be a 1-D waveform tensor (samples,), got (2, 1600)"
    assert errors["unknown_feature"].startswith("ValueError: unknown feature 'PR'")


# -- what each paper feeds SUPERB: ARMHuBERT's head outputs, STaRHuBERT's layers (--outputs) -----------
# ARMHuBERT-shaped: attention reuse, a linear hint head on every layer learning the teacher layer of
# the same depth, masking distillation; STaRHuBERT-shaped: no heads, temporal Gram losses
HEAD_STUDENTS = {
    "arm": dict(hint_layer_ids=[1, 2], hint_head_type="linear", reuse_pattern=[True, False], layer_grad_scale=True),
    "star": dict(hint_layer_ids=[]),
}


@pytest.fixture(scope="module")
def heads_exported(tmp_path_factory) -> Dict[str, Any]:
    """Both exported by ``fairseq-kd-export`` with no --outputs (each student's default), ARM with ONNX."""
    from fairseq_kd.cli.export import main
    from fairseq_kd.criterions.layer_distill import MaskedHintConfig
    from fairseq_kd.criterions.temporal_relation import TemporalGramConfig

    work = tmp_path_factory.mktemp("heads")
    criteria = {"arm": (MaskedHintConfig(), "masked_hint", "MaskedHintCriterion"),
                "star": (TemporalGramConfig(gram_layers=[0, 1, 2], intra_layers=[1, 2]), "temporal_gram",
                         "TemporalGramCriterion")}
    ckpt = {name: make_student_checkpoint(work / f"{name}.pt", False, 10 + i, criteria[name], **arch)
            for i, (name, arch) in enumerate(HEAD_STUDENTS.items())}
    runs = {}
    for name, extra in (("arm", ["--onnx", str(work / "arm.onnx"), "--check"]), ("star", [])):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert main([str(ckpt[name]), str(work / f"{name}.pt2"), *extra]) == 0, stdout.getvalue()[-3000:]
        runs[name] = stdout.getvalue()
    return {"work": work, "ckpt": ckpt, "runs": runs, "models": {n: fairseq_encoder(p) for n, p in ckpt.items()},
            "files": {name: str(work / f"{name}.pt2") for name in HEAD_STUDENTS}}


def eager_heads(model, wavs: torch.Tensor, lengths: torch.Tensor) -> List[torch.Tensor]:
    """The eager model's hint-head outputs (B, T, D_t) in teacher-layer order (student l -> teacher l)."""
    padding_mask = torch.arange(wavs.size(1))[None] >= lengths[:, None]
    with torch.no_grad():
        hints = model(wavs, padding_mask=padding_mask if (lengths < wavs.size(1)).any() else None)["hints"]
    return [hints[layer] for layer in sorted(hints)]


def test_arm_defaults_to_heads_and_star_to_layers_in_the_metadata(heads_exported):
    from fairseq_kd.models.thin_hubert import ThinHubertModel
    from fairseq_kd.s3prl_upstream import read_metadata

    arm, star = (read_metadata(heads_exported["files"][name]) for name in ("arm", "star"))
    assert (arm["outputs"], arm["num_hidden_states"], arm["hidden_size"]) == ("heads", 2, 48)
    assert arm["head_teacher_layers"] == [[1], [2]] and len(arm["head_sources"]) == 2
    assert (arm["downsample_rate"], arm["native_downsample_rates"], arm["rate_policy"]) == (320, [320, 320], "native")
    assert arm["parameters"] == ThinHubertModel.count_parameters(heads_exported["models"]["arm"], include_heads=True)
    assert (star["outputs"], star["num_hidden_states"], star["hidden_size"]) == ("layers", 3, 64)
    assert "head_teacher_layers" not in star and star["downsample_rate"] == 320
    arm_run, star_run = (result_json(heads_exported["runs"][n]) for n in ("arm", "star"))
    assert (arm_run["outputs"], star_run["outputs"]) == ("heads", "layers")
    assert max(arm_run["export_max_abs_diff"], arm_run["reloaded_max_abs_diff"], arm_run["onnx_max_abs_diff"]) <= TOLERANCE
    assert "2 head outputs (--outputs heads; teacher layers 1, 2) x 48" in heads_exported["runs"]["arm"]


def test_s3prl_upstream_serves_the_heads_or_the_layers_the_file_holds(heads_exported):
    from fairseq_kd.s3prl_upstream import UpstreamExpert

    gen = torch.Generator().manual_seed(11)
    wavs = [torch.randn(n, generator=gen) * 0.1 for n in (12000, 5000, 800)]
    for name, count, dim in (("arm", 2, 48), ("star", 3, 64)):
        upstream, model = UpstreamExpert(heads_exported["files"][name]), heads_exported["models"][name]
        assert upstream.get_downsample_rates("hidden_states") == 320 and upstream.student.outputs == (
            "heads" if name == "arm" else "layers")
        with torch.no_grad():
            batch = upstream(wavs)
        assert [tuple(h.shape) for h in batch["hidden_states"]] == [(3, 37, dim)] * count, name  # 12000 samples
        assert torch.equal(batch["last_hidden_state"], batch["hidden_states"][-1])
        features = featurize(wavs, batch["hidden_states"], 320, torch.zeros(count))  # s3prl's weighted sum
        assert [tuple(f.shape) for f in features] == [(min(round(len(w) / 320), 37), dim) for w in wavs]
        for wav in wavs:  # each utterance alone against the eager model fairseq loads
            with torch.no_grad():
                got = upstream([wav])["hidden_states"]
                want = eager_heads(model, wav[None], torch.tensor([len(wav)])) if name == "arm" else [
                    h for h in model.encode(wav[None])["hidden_states"]]
            assert len(got) == len(want) == count
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=TOLERANCE, rtol=0)


def test_onnx_of_the_heads_equals_the_eager_heads(heads_exported):
    import onnx

    from fairseq_kd.export.onnx_export import onnx_session, run_onnx

    path = heads_exported["work"] / "arm.onnx"
    meta = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["fairseq_kd.json"])
    assert (meta["outputs"], meta["head_teacher_layers"]) == ("heads", [[1], [2]])
    gen = torch.Generator().manual_seed(12)
    wavs, lengths = torch.randn(2, 12000, generator=gen) * 0.1, torch.tensor([12000, 7000])
    hidden, frame_lengths = run_onnx(onnx_session(str(path), threads=1), wavs, lengths)
    want = eager_heads(heads_exported["models"]["arm"], wavs, lengths)
    assert hidden.shape == (2, 2, want[0].size(1), 48)
    for g, w in zip(hidden, want):  # the same padded batch: equal on each row's valid frames
        for row, n in enumerate(frame_lengths.tolist()):
            torch.testing.assert_close(torch.from_numpy(g[row, :n]), w[row, :n], atol=TOLERANCE, rtol=0)


def test_time_reduced_heads_follow_the_rate_policy():
    """Linear hints on a reduced layer and prediction heads come back at the CNN rate, repeated, and
    equal the eager model's heads at their own rate; the default follows the config."""
    from types import SimpleNamespace

    from fairseq_kd.criterions.layer_distill import DistillTarget
    from fairseq_kd.export.standalone import default_outputs, export_program, output_factors, parity
    from fairseq_kd.models.thin_hubert import ThinHubertConfig, ThinHubertModel

    arch = {**TINY, "hint_layer_ids": [0, 2], "hint_head_type": "linear", "pred_layer_ids": [4, 8],
            "time_reduction_factor": 2, "time_reduction_layer": 1, "layer_norm_first": True,
            "extractor_mode": "layer_norm"}
    torch.manual_seed(0)
    model = ThinHubertModel(ThinHubertConfig(**arch)).eval()
    heads = [DistillTarget("h0", "hints", 0, [0], 1.0), DistillTarget("h2", "hints", 2, [2], 1.0),
             DistillTarget("p4", "preds", 4, [4], 1.0), DistillTarget("p8", "preds", 8, [8], 1.0)]
    assert output_factors(model, heads) == [1, 2, 2, 2]
    program = export_program(model, example_samples=4000, heads=heads).module()
    wavs, lengths = torch.randn(3, 9000, generator=torch.Generator().manual_seed(4)), torch.tensor([9000, 5000, 800])
    assert parity(model, program, wavs, lengths, heads) <= TOLERANCE
    with torch.no_grad():
        hidden, _ = program(wavs, lengths)
    assert hidden.shape[:2] == (4, 3) and hidden.size(-1) == 48
    assert torch.equal(hidden[1][0, 0:26:2], hidden[1][0, 1:26:2])  # repeated, not interpolated
    # the default: heads only for a masking-distillation student (ARMHuBERT / MaskHuBERT) with a hint
    # head on every layer learning the same teacher layer; FitHuBERT's hints feed SUPERB its layers
    one_to_one = [DistillTarget(f"h{l}", "hints", l, [l], 1.0) for l in (1, 2)]
    cases = ((one_to_one, "masked_hint", "heads"), (one_to_one, "fithubert_hint", "layers"),
             (heads, "masked_hint", "layers"), ([], "masked_hint", "layers"), (one_to_one[:1], "masked_hint", "layers"))
    for targets, criterion, expected in cases:
        loaded = SimpleNamespace(model=model, head_targets=targets, criterion=criterion)
        assert default_outputs(loaded) == expected, (targets, criterion)


def test_heads_asked_of_a_student_without_heads_is_refused(heads_exported, exported):
    """STaRHuBERT-shaped: the console script names the checkpoint and the option, no traceback."""
    star, out = heads_exported["ckpt"]["star"], heads_exported["work"] / "star_heads.pt2"
    run = subprocess.run([console_script("fairseq-kd-export"), str(star), str(out), "--outputs", "heads"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"fairseq-kd-export: error: {star}: --outputs heads" in run.stderr, run.stderr
    assert "has no distillation heads" in run.stderr and "--outputs layers" in run.stderr
    assert "Traceback" not in run.stderr and not out.exists()
    # a fine-tuned CTC checkpoint lost its heads: export the distillation checkpoint instead
    from fairseq_kd.cli.export import main

    ctc = exported["ckpt"]["ctc"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([str(ctc), str(out), "--outputs", "heads"]) == 2
    assert f"{ctc}: --outputs heads" in err.getvalue() and "fine-tuned hubert_ctc" in err.getvalue()
    assert not out.exists()
