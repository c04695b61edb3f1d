"""HuggingFace interop (issue #15): transformers teachers, the index convention, student init, the
``--format hf`` export and its refusals, distillation from a tiny folder of each of the four
architectures through fairseq-hydra-train.

Every transformers model here is a tiny random one made by transformers' own config classes and
written by ``save_pretrained`` into a temporary folder; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairseq_kd.encoders.frames import conv_output_lengths
from fairseq_kd.encoders.hf import (
    fairseq_to_hf_state_dict,
    hubert_config_kwargs,
    require_transformers,
)
from fairseq_kd.teacher import FrozenTeacher, HFTeacher, TeacherError

from conftest import CPU, REPO, console_script, run, waves
from fairseq_checkpoints import make_hubert_checkpoint

transformers = require_transformers()  # the "test" extra installs it

CONV = dict(conv_dim=(48,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2))
ONE_SECOND = 16000


def hf_folder(path: Path, kind: str, *, stable: bool = False, norm: str = "group", normalize: bool = False,
              seed: int = 0) -> Path:
    """A tiny random transformers encoder of ``kind`` saved with ``save_pretrained``."""
    arch = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, feat_extract_norm=norm,
                do_stable_layer_norm=stable, **CONV)
    config_cls, model_cls = {
        "hubert": (transformers.HubertConfig, transformers.HubertModel),
        "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model),
        "wavlm": (transformers.WavLMConfig, transformers.WavLMModel),
        "data2vec-audio": (transformers.Data2VecAudioConfig, transformers.Data2VecAudioModel),
    }[kind]
    if kind == "data2vec-audio":  # post-LN only, a stack of positional convolutions
        arch.pop("do_stable_layer_norm")
        arch.update(feat_extract_norm="layer", num_conv_pos_embeddings=3, conv_pos_kernel_size=5)
    if kind == "wavlm":
        arch.update(num_buckets=16, max_bucket_distance=40)
    torch.manual_seed(seed)
    model_cls(config_cls(**arch)).save_pretrained(path)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=normalize, sampling_rate=ONE_SECOND).save_pretrained(path)
    return path


FOLDERS = {  # name -> (kind, kwargs)
    "hubert": ("hubert", {}),
    "wav2vec2_preln": ("wav2vec2", dict(stable=True, norm="layer")),
    "wavlm": ("wavlm", {}),
    "data2vec": ("data2vec-audio", dict(normalize=True)),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: hf_folder(root / name, kind, **kw) for name, (kind, kw) in FOLDERS.items()}


# -- 1. the fairseq <-> transformers parity and the layer-0 convention ------------------------------
@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_fairseq_hubert_converted_to_transformers_gives_every_layer(tmp_path, layer_norm_first):
    ckpt = make_hubert_checkpoint(tmp_path / "hubert.pt", layer_norm_first=layer_norm_first,
                                  extractor_mode="layer_norm" if layer_norm_first else "default")
    ours = {c: FrozenTeacher.from_checkpoint(str(ckpt), layer0=c) for c in ("projection", "layer_input")}
    teacher = ours["projection"]
    kwargs = hubert_config_kwargs(teacher.cfg.model, teacher.conv_layers)
    hubert = transformers.HubertModel(transformers.HubertConfig(**kwargs)).eval()
    weights, unmapped, unfilled = fairseq_to_hf_state_dict(
        teacher.model.state_dict(), list(hubert.state_dict()), kwargs["feat_extract_norm"])
    assert set(unmapped) <= {"mask_emb", "label_embs_concat"} and not unfilled, (unmapped, unfilled)
    hubert.load_state_dict(weights, strict=True)
    folder = tmp_path / "hf"
    hubert.save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=False).save_pretrained(folder)
    converted = {c: FrozenTeacher.from_checkpoint(str(folder), layer0=c) for c in ("projection", "layer_input")}
    assert isinstance(converted["projection"], HFTeacher)

    source, mask, _ = waves(ONE_SECOND, 9_001, seed=1)
    for convention in ("projection", "layer_input"):
        a, _ = ours[convention].hidden_states(source, mask)
        b, _ = converted[convention].hidden_states(source, mask)
        assert len(a) == len(b) == 3
        for layer, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=f"{convention} layer {layer}")
    # transformers' own forward (no padding): its hidden_states[0] is our "layer_input", not layer 0
    with torch.no_grad():
        out = hubert(source[:1], output_hidden_states=True)
    proj, _ = ours["projection"].hidden_states(source[:1])
    inp, _ = ours["layer_input"].hidden_states(source[:1])
    torch.testing.assert_close(inp[0], out.hidden_states[0], atol=1e-5, rtol=0)
    assert (proj[0] - out.hidden_states[0]).abs().max() > 1e-2
    torch.testing.assert_close(proj[1], out.hidden_states[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(proj[-1], out.last_hidden_state, atol=1e-5, rtol=0)
    last_gap = (proj[-1] - out.hidden_states[-1]).abs().max()
    assert (last_gap > 1e-2) if layer_norm_first else (last_gap < 1e-5)  # theirs: before the final LN


# -- 2. the teacher's guarantees for each architecture ----------------------------------------------
@pytest.mark.parametrize("name", list(FOLDERS))
def test_padded_rows_equal_the_utterances_alone(folders, name):
    teacher = FrozenTeacher.from_checkpoint(str(folders[name]))
    lengths = [ONE_SECOND, 11_111, 4_321]
    source, mask, rows = waves(*lengths, seed=3)
    hidden, frame_mask = teacher.hidden_states(source, mask)
    valid = conv_output_lengths(torch.tensor(lengths), teacher.conv_layers)
    assert torch.equal((~frame_mask).sum(-1), valid)
    assert len(hidden) == teacher.num_layers + 1 == 3
    for i, row in enumerate(rows):
        alone, _ = teacher.hidden_states(row.unsqueeze(0))
        for layer, (batched, single) in enumerate(zip(hidden, alone)):
            torch.testing.assert_close(batched[i, : valid[i]], single[0], atol=1e-5, rtol=0,
                                       msg=f"{name} row {i} layer {layer}")


def test_hf_teacher_is_frozen_eval_only_and_normalize_comes_from_the_folder(folders):
    teacher = FrozenTeacher.from_checkpoint(str(folders["data2vec"]))
    teacher.holder.train()
    assert not teacher.model.training and not any(m.training for m in teacher.model.modules())
    assert not any(p.requires_grad for p in teacher.model.parameters())
    source, _, _ = waves(8000)
    states, _ = teacher.hidden_states(source.requires_grad_())
    assert not states[-1].requires_grad
    assert teacher.normalize is True and "preprocessor_config.json: do_normalize" in teacher.normalize_source
    assert teacher.cfg.task.sample_rate == ONE_SECOND and teacher.embed_dim == 32


def test_the_fairseq_path_never_imports_transformers(tmp_path):
    ckpt = make_hubert_checkpoint(tmp_path / "hubert.pt")
    code = (
        "import sys, torch\nfrom fairseq_kd.teacher import FrozenTeacher\n"
        "import fairseq_kd.tasks.distill_hubert, fairseq_kd.export.checkpoints\n"
        f"t = FrozenTeacher.from_checkpoint({str(ckpt)!r})\nt.hidden_states(torch.randn(1, 8000))\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\nprint('clean')\n"
    )
    assert "clean" in run([sys.executable, "-c", code]).stdout


# -- 3. bad input --------------------------------------------------------------------------------------
def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda d: _edit_json(d / "config.json", model_type="sew"), ["config.json", "model_type='sew'", "hubert, wav2vec2, wavlm, data2vec-audio"]),
        (lambda d: _edit_json(d / "config.json", architectures=["HubertForCTC"]), ["config.json", "architectures=['HubertForCTC']", "fine-tuned", "pre-trained model"]),
        (lambda d: _edit_json(d / "config.json", architectures=["WavLMForXVector"]), ["architectures=['WavLMForXVector']", "classification"]),
        (lambda d: (d / "preprocessor_config.json").unlink(), ["has no preprocessor_config.json", "do_normalize"]),
        (lambda d: _edit_json(d / "preprocessor_config.json", do_normalize=None), ["preprocessor_config.json: key do_normalize"]),
        (lambda d: (d / "model.safetensors").unlink(), ["from_pretrained failed", "model.safetensors"]),
    ],
    ids=["unsupported", "ctc_head", "xvector_head", "no_preprocessor", "no_do_normalize", "no_weights"],
)
def test_bad_folders_are_refused_naming_file_and_key(tmp_path, edit, expected):
    folder = hf_folder(tmp_path / "m", "hubert")
    edit(folder)
    with pytest.raises(TeacherError) as info:
        FrozenTeacher.from_checkpoint(str(folder))
    for part in expected:
        assert part in str(info.value), str(info.value)


def test_missing_or_old_transformers_names_the_extra(monkeypatch):
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.20.0")
    with pytest.raises(ImportError, match=r"transformers >= 4\.46.*4\.20\.0.*\.\[hf\]"):
        require_transformers()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"optional 'hf' extra.*pip install -e '\.\[hf\]'"):
        require_transformers()


def test_task_normalize_against_the_folder(folders):
    from conftest import compose_preset
    from fairseq import tasks

    cfg = compose_preset("thin_deep", [*CPU, f"task.data={REPO / 'manifests'}",
                                       f"task.teacher_path={folders['data2vec']}", "task.normalize=false"])
    from omegaconf import OmegaConf

    task = tasks.setup_task(OmegaConf.create(cfg)["task"])
    with pytest.raises(TeacherError, match=r"task.normalize=False.*normalize=True \(.*preprocessor_config.json: do_normalize\).*task.normalize=true"):
        task.load_teacher()


# -- 4. students initialised from a transformers teacher ------------------------------------------------
def _student_cfg(**kw):
    from fairseq_kd.models.thin_hubert import ThinHubertConfig

    base = dict(conv_channels=[48] * 7, conv_kernels=list(CONV["conv_kernel"]), conv_strides=list(CONV["conv_stride"]),
                encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2,
                conv_pos=8, conv_pos_groups=4, hint_layer_ids=[], pred_layer_ids=[])
    base.update(kw)
    return ThinHubertConfig(**base)


def test_student_init_from_a_transformers_hubert_equals_the_teacher(folders):
    from fairseq_kd.models.thin_hubert import ThinHubertModel

    teacher = FrozenTeacher.from_checkpoint(str(folders["hubert"]))
    student = ThinHubertModel(_student_cfg()).eval()
    copied = student.init_from_teacher(teacher.fairseq_state_dict(), teacher.cfg.model,
                                       init_cnn=True, init_pos_conv=True, init_layers=2)
    assert "encoder.layers.1.fc2.weight" in copied and "encoder.pos_conv.0.weight_v" in copied
    source, _, _ = waves(ONE_SECOND)
    with torch.no_grad():
        mine = student.encode(source)["hidden_states"]
    theirs, _ = teacher.hidden_states(source)
    for layer, (a, b) in enumerate(zip(mine, theirs)):  # the same network: every layer equal
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"layer {layer}")


def test_data2vec_positional_convs_cannot_be_copied(folders):
    from fairseq_kd.models.thin_hubert import ThinHubertModel

    teacher = FrozenTeacher.from_checkpoint(str(folders["data2vec"]))
    student = ThinHubertModel(_student_cfg(extractor_mode="layer_norm"))
    assert student.init_from_teacher(teacher.fairseq_state_dict(), teacher.cfg.model, init_cnn=True, init_layers=1)
    with pytest.raises(ValueError, match="encoder.pos_conv"):
        student.init_from_teacher(teacher.fairseq_state_dict(), teacher.cfg.model, init_pos_conv=True)


# -- 5. the --format hf export and its refusal -----------------------------------------------------------
def _loaded(cfg, tmp_path):
    from dataclasses import fields

    from fairseq_kd.export.checkpoints import LoadedStudent
    from fairseq_kd.models.thin_hubert import ThinHubertModel

    torch.manual_seed(0)
    model = ThinHubertModel(cfg)
    model.remove_pretraining_modules()
    return LoadedStudent(model=model.eval(), path=str(tmp_path / "checkpoint_best.pt"), source="distillation",
                         normalize=False, sample_rate=ONE_SECOND,
                         model_cfg={f.name: getattr(cfg, f.name) for f in fields(cfg)})


def test_time_reduced_student_is_refused_with_the_reason(tmp_path):
    from fairseq_kd.export.checkpoints import ExportInputError
    from fairseq_kd.export.hf import export_hf

    loaded = _loaded(_student_cfg(time_reduction_factor=2, time_reduction_layer=1), tmp_path)
    with pytest.raises(ExportInputError) as info:
        export_hf(loaded, str(tmp_path / "out"))
    message = str(info.value)
    for part in ("cannot be written as a transformers HubertModel", "time_reduction_factor=2",
                 "no time-reduction layer", "standalone export", "student.pt2"):
        assert part in message, message
    assert not (tmp_path / "out").exists()


def test_pre_ln_layer_norm_cnn_student_exports(tmp_path):
    from fairseq_kd.export.hf import export_hf

    loaded = _loaded(_student_cfg(layer_norm_first=True, extractor_mode="layer_norm", encoder_embed_dim=48,
                                  encoder_attention_heads=4), tmp_path)
    info = export_hf(loaded, str(tmp_path / "out"))
    assert info["max_abs_diff_vs_student"] < 1e-4 and info["reloaded_max_abs_diff_vs_student"] < 1e-4


# -- 6. distillation from each tiny folder through fairseq-hydra-train, then the export -----------------
NO_INIT = ["model.init_teacher_cnn=false", "model.init_teacher_pos_conv=false", "model.init_teacher_layers=0"]
# folder -> extra overrides: one 2-update run per architecture, all four started together. HuBERT
# and WavLM with the distilhubert init (CNN, pos conv, 2 layers); the pre-LN wav2vec 2.0 (layer-norm
# CNN, which the group-norm student cannot copy) and data2vec-audio (positional conv stack,
# normalize=true) without it
RUNS = {
    "hubert": [],
    "wavlm": [],
    "wav2vec2_preln": [*NO_INIT],
    "data2vec": [*NO_INIT, "task.normalize=true"],
}
KINDS = {"hubert": "HubertModel", "wavlm": "WavLMModel", "wav2vec2_preln": "Wav2Vec2Model",
         "data2vec": "Data2VecAudioModel"}


@pytest.fixture(scope="module")
def hydra_runs(tmp_path_factory, folders):
    """A 2-update fairseq-hydra-train run of the distilhubert preset (tiny student) per RUNS
    folder, started together. Returns {name: (work dir, exit code, output)}."""
    work = tmp_path_factory.mktemp("hf_runs")
    common = [
        console_script("fairseq-hydra-train"), "--config-name", "distilhubert", *CPU,
        f"task.data={REPO / 'manifests'}",
        "model.conv_channels=[48,48,48,48,48,48,48]", "model.encoder_layers=2", "model.encoder_embed_dim=32",
        "model.encoder_ffn_embed_dim=64", "model.encoder_attention_heads=2", "model.conv_pos=8",
        "model.conv_pos_groups=4", "model.teacher_embed_dim=32", "model.pred_layer_ids=[1,2]",
        "task.max_sample_size=32000", "dataset.batch_size=2", "optimization.max_update=2",
        "common.log_interval=1", "common.log_format=json", "checkpoint.save_interval_updates=2",
        "checkpoint.no_epoch_checkpoints=true", "dataset.disable_validation=true",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = {}
    try:
        for name, extra in RUNS.items():
            (work / name).mkdir()
            with open(work / f"{name}.log", "w") as log:
                procs[name] = subprocess.Popen(
                    [*common, f"task.teacher_path={folders[name]}", *extra,
                     f"checkpoint.save_dir={work / name / 'ckpt'}", f"hydra.run.dir={work / name / 'run'}"],
                    cwd=work / name, env=env, stdout=log, stderr=subprocess.STDOUT)
        codes = {name: proc.wait(timeout=600) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {name: (work / name, codes[name], (work / f"{name}.log").read_text()) for name in RUNS}


@pytest.mark.parametrize("name", list(RUNS))
def test_distillation_from_each_folder(hydra_runs, name):
    work, code, output = hydra_runs[name]
    assert code == 0, output[-3000:]
    assert f"transformers {KINDS[name]}" in output, output[-3000:]
    assert '"num_updates": "2"' in output, output[-3000:]
    assert (work / "ckpt" / "checkpoint_last.pt").is_file()
    if name == "wavlm":  # initialised from the teacher, without WavLM's relative position bias
        assert "initialised" in output and "gated relative position bias" in output, output[-3000:]


@pytest.fixture(scope="module")
def wavlm_run(hydra_runs):
    work, code, output = hydra_runs["wavlm"]
    assert code == 0, output[-3000:]
    return work, output


def test_exported_distilhubert_shaped_student_loads_in_transformers(wavlm_run, tmp_path):
    from fairseq_kd.cli.export import main
    from fairseq_kd.export.checkpoints import load_student

    work, _ = wavlm_run
    ckpt, out = work / "ckpt" / "checkpoint_last.pt", tmp_path / "student_hf"
    assert main([str(ckpt), str(out), "--format", "hf"]) == 0
    assert main([str(ckpt), str(out), "--format", "hf"]) == 2  # not empty: needs --force
    model = transformers.AutoModel.from_pretrained(out, local_files_only=True).eval()
    assert type(model).__name__ == "HubertModel"
    assert json.loads((out / "preprocessor_config.json").read_text())["do_normalize"] is False
    student = load_student(str(ckpt)).model
    source = torch.randn(1, 20_000)
    with torch.no_grad():
        theirs = model(source, output_hidden_states=True).hidden_states
        mine = student.encode(source)["hidden_states"]
    assert len(theirs) == len(mine) == 3
    for layer in (1, 2):
        torch.testing.assert_close(theirs[layer], mine[layer], atol=1e-4, rtol=0)
