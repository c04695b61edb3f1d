"""``fairseq-kd-benchmark`` prints and writes every figure, and the checkpoint timing helper works.

No timing thresholds here (the figures live in the README, measured by the command itself): the
tests check that each section runs through the real objects (fairseq's HubertModel teacher, the
presets' students, fairseq's Trainer) and reports finite, positive ratios. The models are shrunk
with the command's own override options so that the whole file takes ~30 s on two cores.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from conftest import MANIFESTS, REPO, console_script, run
from fairseq_checkpoints import make_hubert_checkpoint

# a HuBERT-Base-shaped teacher and the two presets, shrunk in width and depth
TINY = [
    "--threads", "1",  # tiny models are all small ops: a second OpenMP thread on busy cores only waits
    "--batch", "1", "--seconds", "0.5", "--lengths", "0.5", "1", "--repeats", "2", "--warmup", "1",
    "--teacher-override", "encoder_layers=2", "encoder_embed_dim=64", "encoder_ffn_embed_dim=128",
    "encoder_attention_heads=4", "conv_feature_layers=[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2",
    "--override", "model.teacher_embed_dim=64", "model.encoder_embed_dim=64", "model.encoder_ffn_embed_dim=128",
    "model.encoder_attention_heads=4", "thin_deep:model.encoder_layers=2", "thin_deep:model.hint_layer_ids=[1,2]",
    "thin_deep:model.conv_channels=[32,32,32,32,32,32,64,64,64]",
    "distilhubert:model.conv_channels=[64,64,64,64,64,64,64]", "distilhubert:model.pred_layer_ids=[1,2]",
]
PRESETS = ("thin_deep", "distilhubert")
LOADER = ["--manifest", str(MANIFESTS), "--split", "valid", "--loader-workers", "0", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The in-process tests too (restored afterwards for the rest of the session)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = run([console_script("fairseq-kd-benchmark"), *TINY, *LOADER, "--out", str(out)], timeout=300)
    return proc.stdout, json.loads(out.read_text())


def test_report_has_every_section(bench):
    stdout, result = bench
    assert set(result) >= {"machine", "config", "load", "inference", "training", "memory", "scaling", "throughput",
                           "loader"}
    for heading in ("inference:", "training:", "memory:", "scaling:", "distillation throughput", "data loading:"):
        assert heading in stdout, heading
    for preset in PRESETS:
        assert stdout.count(preset) >= 5, preset  # a row in each section
    machine = result["machine"]
    assert machine["nproc"] >= 1 and machine["cpu_model"] and machine["torch"] and machine["device"] == "cpu"
    assert all(v is None or len(v) == 3 for v in result["load"].values())


def test_inference_ratios(bench):
    _, result = bench
    rows = result["inference"]["models"]
    assert list(rows) == ["hubert_base", *PRESETS]
    assert rows["hubert_base"]["time_ratio"] == 1.0 and rows["hubert_base"]["macs_ratio"] == 1.0
    for name in PRESETS:
        row = rows[name]
        assert positive(row["time_ratio"]) and positive(row["macs_ratio"]) and positive(row["median_s"]), row
        assert len(row["times_s"]) == 2  # --repeats
        assert row["target"] == {"thin_deep": 0.25, "distilhubert": 0.5}[name]
        assert row["target_met"] == (row["time_ratio"] <= row["target"])
    # the thin CNN + time reduction is cheaper than the teacher's CNN, the same-shape student is not
    assert rows["thin_deep"]["macs_ratio"] < 1.0
    assert rows["thin_deep"]["params"] < rows["distilhubert"]["params"]


def test_training_overhead_memory_and_throughput(bench):
    _, result = bench
    for name in PRESETS:
        row = result["training"]["presets"][name]
        assert positive(row["update_s"]) and all(positive(v) for v in row["parts_s"].values()), row
        assert set(row["parts_s"]) == {"teacher_forward", "student_forward_backward", "optimizer_step"}
        assert math.isfinite(row["overhead"]) and row["overhead"] > -1.0
        assert row["target_met"] == (row["overhead"] <= 0.10)

        mem = result["memory"]["rows"][name]
        assert positive(mem["peak_over_base_mb"]) and positive(mem["ratio_to_teacher_forward"])
        # an update holds the teacher plus a student, its gradients and Adam's moments
        assert mem["ratio_to_teacher_forward"] > 1.0, mem

        speed = result["throughput"][name]
        assert positive(speed["audio_s_per_s"])
        assert speed["audio_s_per_s"] == pytest.approx(0.5 / row["update_s"])  # 1 x 0.5 s per update
        assert speed["schedule_days_15_6s"] / speed["schedule_days_12_3s"] == pytest.approx(15.625 / 12.3, rel=0.01)
        # real audio of the bundled valid split, read by fairseq's iterator with 0 and 1 DataLoader workers
        loaded = result["loader"]["presets"][name]
        assert set(loaded) == {"0", "1"} and all(positive(r["audio_s_per_s"]) and r["batches"] >= 1 for r in loaded.values())
        assert set(speed["loader_headroom"]) == {"0", "1"} and all(positive(h) for h in speed["loader_headroom"].values())
    assert positive(result["memory"]["rows"]["teacher_forward"]["peak_over_base_mb"])


def test_scaling_has_every_length_and_model(bench):
    _, result = bench
    lengths = result["scaling"]["lengths"]
    assert [float(k) for k in lengths] == [0.5, 1.0]
    for row in lengths.values():
        assert set(row) == {"hubert_base", *PRESETS}
        assert all(positive(v["ms_per_audio_s"]) and positive(v["time_ratio"]) for v in row.values())


def test_bad_settings_fail_before_any_model_is_built(tmp_path, capsys):
    from fairseq_kd.cli.benchmark import main

    assert main(["--presets", "no_such_preset"]) == 2
    assert "thin_deep" in capsys.readouterr().err  # lists the presets there are
    assert main(["--amp", "bf16"]) == 2
    assert "GPU" in capsys.readouterr().err
    assert main(["--teacher-override", "encoder_layers=2", "--sections", "training"]) == 2
    assert "teacher layer 3 is out of range" in capsys.readouterr().err  # thin_deep's hints need 12 teacher layers
    existing = tmp_path / "bench.json"
    existing.write_text("mine")
    assert main(["--out", str(existing)]) == 2
    assert "--force" in capsys.readouterr().err and existing.read_text() == "mine"


# every way a tensor's value reaches Python; on a GPU each one waits for the queued work
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


@pytest.mark.parametrize("preset", PRESETS)
def test_distillation_step_reads_the_device_once(preset, monkeypatch):
    """Criterion forward (teacher + student + losses + logging) and backward: the only value read
    back to Python is the teacher's copy of the batch lengths, taken before any compute is queued."""
    import collections
    import tempfile

    import torch

    from fairseq_kd import benchmark

    overrides = TINY[TINY.index("--override") + 1:]
    teacher_overrides = TINY[TINY.index("--teacher-override") + 1:TINY.index("--override")]
    cfg = benchmark.BenchmarkConfig(batch=2, seconds=0.5, teacher_overrides=teacher_overrides, overrides=overrides)
    teacher = benchmark.build_teacher(teacher_overrides)
    with tempfile.TemporaryDirectory() as work_dir:
        dist = benchmark.build_distillation(cfg, preset, teacher, torch.device("cpu"), work_dir)
    reads = collections.Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, __name=name, __original=original, **kwargs):
            reads[__name] += 1
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    net_input = dist.sample["net_input"]
    net_input["padding_mask"][1, 6000:] = True  # a padded batch: the masked paths run
    loss, sample_size, logging_output = dist.criterion(dist.model, dist.sample)
    loss.backward()
    assert dict(reads) == {"tolist": 1}
    reads.clear()
    net_input["padding_mask"] = None  # crop-to-shortest batches: nothing at all
    loss, sample_size, logging_output = dist.criterion(dist.model, dist.sample)
    loss.backward()
    assert dict(reads) == {}
    monkeypatch.undo()
    assert sample_size.item() > 0 and all(v.item() > 0 for k, v in logging_output.items() if k.startswith("l"))


def _student_checkpoint(path: Path) -> Path:
    """A tiny thin_hubert checkpoint in the layout fairseq's trainer writes (cfg + model + history)."""
    from fairseq import checkpoint_utils
    from fairseq.dataclass.configs import FairseqConfig
    from omegaconf import OmegaConf, open_dict

    from fairseq_kd.models.thin_hubert import ThinHubertConfig, ThinHubertModel
    from fairseq_kd.tasks.distill_hubert import DistillHubertConfig

    model_cfg = ThinHubertConfig(
        conv_channels=[32] * 6 + [64] * 3, conv_kernels=[10, 1, 3, 3, 3, 3, 1, 2, 2],
        conv_strides=[5, 1, 2, 2, 2, 2, 1, 2, 2], encoder_layers=2, encoder_embed_dim=64,
        encoder_ffn_embed_dim=64, encoder_attention_heads=4, time_reduction_factor=2,
        hint_layer_ids=[1, 2], teacher_embed_dim=64, hint_head_type="convt_linear",
    )
    cfg = OmegaConf.structured(FairseqConfig)
    with open_dict(cfg):
        cfg.task = OmegaConf.structured(DistillHubertConfig(data=str(path.parent), teacher_path="gone.pt"))
        cfg.task._name = "distill_hubert"
        cfg.model = OmegaConf.structured(model_cfg)
        cfg.model._name = "thin_hubert"
    model = ThinHubertModel(model_cfg)
    state = {
        "args": None, "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": model.state_dict(), "criterion": None, "task_state": {}, "last_optimizer_state": None,
        "optimizer_history": [{"criterion_name": "FitHubertHintCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": None}, "num_updates": 2}],
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 2}, "val_loss": None},
    }
    checkpoint_utils.torch_persistent_save(state, str(path))
    return path


def test_inference_time_ratios_of_checkpoints(tmp_path):
    """What the main job's results table calls: real fairseq checkpoints, timed side by side."""
    from fairseq_kd.benchmark import inference_time_ratios

    teacher = str(make_hubert_checkpoint(tmp_path / "teacher.pt", layers=4))
    student = str(_student_checkpoint(tmp_path / "student.pt"))
    ratios = inference_time_ratios(teacher, [student], seconds=0.5, batch=2, repeats=3)
    assert set(ratios) == {teacher, student}
    assert ratios[teacher]["time_ratio"] == 1.0
    assert positive(ratios[student]["time_ratio"]) and positive(ratios[student]["median_s"])
    with pytest.raises(ValueError, match="does not exist"):
        inference_time_ratios(teacher, [str(tmp_path / "missing.pt")])


def test_gpu_script_runs_end_to_end_on_cpu(tmp_path):
    """examples/gpu/bench.sh with --device cpu --tiny: every step the GPU run takes (both presets'
    training and memory sections, the summary JSON and table), so nothing in it is untested."""
    out = tmp_path / "gpu"
    env = {"FAIRSEQ_KD_BIN": str(Path(sys.executable).parent), "FAIRSEQ_KD_PYTHON": sys.executable}
    proc = run(["bash", str(REPO / "examples/gpu/bench.sh"), "--device", "cpu", "--tiny", str(out)], env=env)
    summary = json.loads((out / "gpu.json").read_text())
    rows = {row["preset"]: row for row in summary["rows"]}
    assert set(rows) == {"distilhubert", "thin_deep"}
    assert (rows["distilhubert"]["batch"], rows["thin_deep"]["batch"]) == (2, 1)
    for row in rows.values():
        assert row["distill_audio_s_per_s"] > 0 and row["teacher_forward_audio_s_per_s"] > 0
        assert row["update_peak_mb"] is not None and row["update_peak_mb"] > 0
        hours = 200_000 * 24 * (250_000 / 16_000) / row["distill_audio_s_per_s"] / 3600
        assert math.isclose(row["distilhubert_schedule_hours"], hours, rel_tol=1e-9)
    table = (out / "gpu.md").read_text()
    assert "| distilhubert | 2 x 0.5 s |" in table and "| thin_deep | 1 x 0.5 s |" in table
    assert "8,000 goal" in table and table in proc.stdout
