"""DPHuBERT's two stages through fairseq's own trainer, on the bundled corpus.

Stage 1 (``--config-name dphubert``: criterion prune_distill, fairseq's composite optimizer) prunes a
full copy of the session's small fairseq HuBERT teacher (2 x 64) towards a target size; the masks
live in the criterion, so they are in the checkpoint. ``fairseq-kd-materialise`` turns that checkpoint
into an ordinary, smaller per-layer-width student, equal to the masked one (eval masks) to float
tolerance. Stage 2 (``--config-name dphubert_final task.init_student=...``) trains it further and
refuses a stage-1 checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from conftest import CPU, MANIFESTS, console_script, json_logs, run, train_logs, waves

TARGET = 0.25
TINY = [  # the student: the teacher's shape (tests/conftest.py TINY_HUBERT), heads on 0, 1, 2
    "model.conv_channels=[64,64,64,64,64,64,64]", "model.encoder_layers=2", "model.encoder_embed_dim=64",
    "model.encoder_ffn_embed_dim=128", "model.encoder_attention_heads=4", "model.teacher_embed_dim=64",
    "model.hint_layer_ids=[0,1,2]", "model.hint_head_groups=[0,1,1]",
]
QUICK = [
    *CPU, "task.min_sample_size=16000", "task.max_sample_size=24000", "dataset.max_tokens=100000",
    "optimization.update_freq=[1]", "dataset.disable_validation=true", "common.log_format=json",
]
# a short stage 1: target ramp over 20 updates; the masks and multipliers at lr 1.0 with a 5-update
# warm-up, (almost) no decay and little momentum, so that the masks, which start at P(kept) = 0.998,
# reach the target in 40 updates and the multipliers correct the overshoot (DPHuBERT: 0.02 over 50k)
STAGE1 = [
    *TINY, "model.init_teacher_layers=2", "model.encoder_layerdrop=0.0", *QUICK,
    "optimization.max_update=40", "common.log_interval=4",
    "optimizer.groups.default.lr_scheduler.warmup_updates=5",
    "optimizer.groups.pruning.lr_scheduler.warmup_updates=5", "optimizer.groups.pruning.lr_float=1.0",
    "+optimizer.groups.pruning.lr_scheduler.total_num_update=1000",
    "optimizer.groups.pruning.optimizer.adam_betas='(0.5,0.9)'",
    f"criterion.target_sparsity={TARGET}", "criterion.sparsity_warmup_updates=20",
]


def hydra_train(name: str, teacher: Path, save_dir: Path, extra: List[str], check: bool = True):
    return run([console_script("fairseq-hydra-train"), "--config-name", name, f"task.data={MANIFESTS}",
                f"task.teacher_path={teacher}", *extra, f"checkpoint.save_dir={save_dir}",
                f"hydra.run.dir={save_dir}"], cwd=save_dir.parent, check=check)


@pytest.fixture(scope="module")
def stage1(trained_teacher, tmp_path_factory) -> Dict[str, object]:
    work = tmp_path_factory.mktemp("dphubert")
    out = hydra_train("dphubert", trained_teacher, work / "stage1", STAGE1).stdout
    return {"work": work, "teacher": trained_teacher, "ckpt": work / "stage1" / "checkpoint_last.pt",
            "logs": train_logs(out)}


@pytest.fixture(scope="module")
def materialised(stage1) -> Dict[str, object]:
    out_path = stage1["work"] / "pruned.pt"
    proc = run([console_script("fairseq-kd-materialise"), str(stage1["ckpt"]), str(out_path)])
    return {"path": out_path, "stdout": proc.stdout}


def test_stage1_reaches_the_target_size(stage1):
    from fairseq import checkpoint_utils

    logs = stage1["logs"]
    assert [int(r["num_updates"]) for r in logs] == list(range(4, 41, 4))
    first, last = logs[0], logs[-1]
    assert float(first["expected_sparsity"]) < 0.01  # a full copy at first
    assert float(last["target_sparsity"]) == pytest.approx(TARGET)
    assert abs(float(last["expected_sparsity"]) - TARGET) < 0.05, last
    assert float(max(logs, key=lambda r: float(r["expected_sparsity"]))["expected_sparsity"]) > TARGET + 0.05
    assert 0 < float(last["lambda2"])  # ascent: lambda2 only grows; lambda1 swings with the overshoot
    assert float(logs[2]["lr_pruning"]) > 100 * float(logs[2]["lr_default"]) > 0  # two learning rates
    state = checkpoint_utils.load_checkpoint_to_cpu(str(stage1["ckpt"]))
    masks = [k for k in state["criterion"] if k.endswith("log_alpha")]
    assert len(masks) == 6 + 2 + 2 and {"lambda1", "lambda2"} <= set(state["criterion"])
    assert not [k for k in state["model"] if "log_alpha" in k]  # the model itself stays ordinary


def test_materialised_student_equals_the_masked_one(stage1, materialised):
    from fairseq import checkpoint_utils
    from fairseq.models import build_model

    from fairseq_kd.criterions.prune_distill import stage1_masks
    from fairseq_kd.models.pruning import attach_student_masks, check_stage2_checkpoint, model_size

    stdout = materialised["stdout"]
    assert "size before: 166,464 parameters" in stdout and "size after:" in stdout
    full = checkpoint_utils.load_checkpoint_to_cpu(str(stage1["ckpt"]))
    masked = build_model(full["cfg"].model, task=None)
    masked.load_state_dict(full["model"], strict=True)
    masks = stage1_masks(full["cfg"].criterion, full["cfg"].model, full["criterion"])
    attach_student_masks(masked, *masks.hooks())

    small_state = checkpoint_utils.load_checkpoint_to_cpu(str(materialised["path"]))
    check_stage2_checkpoint(small_state)  # an ordinary, materialised student
    assert small_state["cfg"].criterion._name == "layer_distill" and not small_state.get("criterion")
    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([str(materialised["path"])])
    small = models[0]
    kept = 1.0 - model_size(small) / model_size(masked)
    assert abs(kept - TARGET) < 0.1, kept
    assert f"sparsity {kept:.4f}" in stdout
    assert [l.self_attn.num_heads for l in small.encoder.layers] == list(cfg.model.encoder_attention_heads_per_layer)
    assert [l.fc1.out_features for l in small.encoder.layers] == list(cfg.model.encoder_ffn_embed_dim_per_layer)
    assert 1 < max(cfg.model.encoder_ffn_embed_dim_per_layer) < 128  # pruned, not gutted

    source, padding_mask, _ = waves(16000, 9000, seed=3)
    masked.eval(), small.eval()
    with torch.no_grad():
        want, got = masked(source, padding_mask=padding_mask), small(source, padding_mask=padding_mask)
    assert len(got["hidden_states"]) == 3 and sorted(got["hints"]) == [0, 1, 2]
    for g, w in zip(got["hidden_states"] + [got["hints"][k] for k in (0, 1, 2)],
                    want["hidden_states"] + [want["hints"][k] for k in (0, 1, 2)]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_stage2_trains_the_materialised_student_and_refuses_stage1(stage1, materialised):
    from fairseq import checkpoint_utils

    work, teacher = stage1["work"], stage1["teacher"]
    stage2 = ["model.hint_layer_ids=[0,1,2]", "model.hint_head_groups=[0,1,1]", *QUICK,
              "optimization.max_update=3", "lr_scheduler.warmup_updates=1", "common.log_interval=1"]
    out = hydra_train("dphubert_final", teacher, work / "stage2",
                      [f"task.init_student={materialised['path']}", *stage2]).stdout
    assert [r["num_updates"] for r in train_logs(out)] == ["1", "2", "3"]
    state = checkpoint_utils.load_checkpoint_to_cpu(str(work / "stage2" / "checkpoint_last.pt"))
    pruned = checkpoint_utils.load_checkpoint_to_cpu(str(materialised["path"]))["cfg"].model
    for key in ("conv_channels", "encoder_attention_heads_per_layer", "encoder_ffn_embed_dim_per_layer"):
        assert list(state["cfg"].model[key]) == list(pruned[key]), key
    assert state["cfg"].model.pruning_materialised

    refused = hydra_train("dphubert_final", teacher, work / "stage2_refused",
                          [f"task.init_student={stage1['ckpt']}", *stage2], check=False)
    assert refused.returncode != 0
    assert ("still holds 10 HardConcrete masks (e.g. criterion masks.conv.0.log_alpha): a stage-1 "
            "(masked, full-size) checkpoint; materialise it first") in refused.stderr
    assert "Traceback" not in refused.stderr


def test_pruned_student_fine_tunes_with_the_ctc_and_kws_sv_recipes(stage1, materialised):
    """The materialised student (per-layer widths) as model.w2v_path of fairseq's hubert_ctc recipe
    and of the kws_sv joint recipe, both through fairseq-hydra-train, two at a time; each
    fine-tuned checkpoint carries the pruned sizes."""
    from fairseq import checkpoint_utils
    from test_finetune import FINETUNE_QUICK
    from test_kws_sv import KEYWORDS, SMALL_HEADS, run_parallel

    work, pruned = stage1["work"] / "finetune", materialised["path"]
    work.mkdir()
    jobs = {
        "ctc": [console_script("fairseq-hydra-train"), "--config-name", "finetune_base_10h", f"task.data={MANIFESTS}",
                f"model.w2v_path={pruned}", *FINETUNE_QUICK, "model.freeze_finetune_updates=0",
                f"checkpoint.save_dir={work / 'ctc'}", f"hydra.run.dir={work / 'ctc'}"],
        "kws_sv": [console_script("fairseq-hydra-train"), "--config-name", "kws_sv_joint", *CPU, f"task.data={KEYWORDS}",
                   f"model.w2v_path={pruned}", *SMALL_HEADS, "optimization.max_update=3", "dataset.batch_size=8",
                   "dataset.validate_interval_updates=3", "dataset.validate_interval=1000",
                   "checkpoint.save_interval_updates=3", "common.log_format=json", "common.log_interval=1",
                   f"checkpoint.save_dir={work / 'kws_sv'}", f"hydra.run.dir={work / 'kws_sv'}"],
    }
    out = run_parallel(jobs, work)
    ctc_valid, kws_valid = json_logs(out["ctc"].stdout, "valid"), json_logs(out["kws_sv"].stdout, "valid")
    assert ctc_valid and "valid_uer" in ctc_valid[-1], out["ctc"].stdout[-3000:]
    assert kws_valid and "valid_kws_accuracy" in kws_valid[-1] and "valid_eer" in kws_valid[-1], out["kws_sv"].stdout[-3000:]
    sizes = checkpoint_utils.load_checkpoint_to_cpu(str(pruned))["cfg"].model
    for run_name in jobs:
        encoder = checkpoint_utils.load_checkpoint_to_cpu(str(work / run_name / "checkpoint_last.pt"))["cfg"].model.w2v_args.model
        for key in ("conv_channels", "encoder_attention_heads_per_layer", "encoder_ffn_embed_dim_per_layer"):
            assert list(encoder[key]) == list(sizes[key]), (run_name, key)


def test_the_same_recipe_prunes_a_wav2vec2_teacher(tmp_path):
    """dphubert's stage 1 with a (random, tiny) fairseq Wav2Vec2Model as the teacher: the same
    overrides reach the same target, and the checkpoint materialises."""
    from fairseq_checkpoints import make_wav2vec2_checkpoint

    teacher = make_wav2vec2_checkpoint(tmp_path / "wav2vec2.pt", layers=2, embed_dim=64, ffn_dim=128, heads=4,
                                       conv_layers="[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2",
                                       conv_pos=128, conv_pos_groups=16)
    logs = train_logs(hydra_train("dphubert", teacher, tmp_path / "stage1", STAGE1).stdout)
    last = logs[-1]
    assert int(last["num_updates"]) == 40 and float(logs[0]["expected_sparsity"]) < 0.01
    assert abs(float(last["expected_sparsity"]) - TARGET) < 0.05, last
    out = run([console_script("fairseq-kd-materialise"), str(tmp_path / "stage1" / "checkpoint_last.pt"),
               str(tmp_path / "pruned.pt")]).stdout
    assert (tmp_path / "pruned.pt").is_file(), out


def test_materialise_refuses_bad_checkpoints(stage1, tmp_path, capsys):
    from fairseq import checkpoint_utils
    from omegaconf import open_dict

    from fairseq_kd.cli.materialise import main

    def edited(name: str, edit) -> Path:
        state = checkpoint_utils.load_checkpoint_to_cpu(str(stage1["ckpt"]))
        with open_dict(state["cfg"]):
            edit(state)
        path = tmp_path / name
        checkpoint_utils.torch_persistent_save(state, str(path))
        return path

    def no_masks(state):
        state["criterion"], state["cfg"].criterion._name = None, "layer_distill"

    def bad_target(state):
        state["cfg"].criterion.target_sparsity = 1.5

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    cases = [(tmp_path / "missing.pt", r"missing\.pt does not exist; give a stage-1 checkpoint"),
             (text, r"notes\.pt is not a PyTorch checkpoint"),
             (edited("plain.pt", no_masks), r"plain\.pt holds no pruning masks \(criterion 'layer_distill', "
                                            r"0 HardConcrete masks"),
             (edited("target.pt", bad_target), r"target\.pt: criterion\.target_sparsity=1\.5 must be in \(0, 1\)")]
    for path, message in cases:
        assert main([str(path), str(tmp_path / "out.pt")]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert "Traceback" not in err and not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("edits, message", [
    ({"target_sparsity": 1.0}, r"criterion\.target_sparsity=1\.0 must be in \(0, 1\)"),
    ({"target_sparsity": 0.0}, r"criterion\.target_sparsity=0\.0 must be in \(0, 1\)"),
    ({"init_teacher_layers": 1}, r"starts from a full copy of the teacher .*model\.init_teacher_layers=2"),
    ({"prune_conv": False, "prune_heads": False, "prune_ffn": False}, "nothing to prune"),
])
def test_prune_config_errors_name_the_key(edits, message):
    from fairseq_kd.criterions.prune_distill import PruneDistillConfig, check_prune_config
    from fairseq_kd.models.pruning import PruningError

    cfg = PruneDistillConfig(encoder_layers=2, init_teacher_cnn=True, init_teacher_pos_conv=True,
                             init_teacher_layers=2)
    for key, value in edits.items():
        setattr(cfg, key, value)
    with pytest.raises(PruningError, match=message):
        check_prune_config(cfg)
