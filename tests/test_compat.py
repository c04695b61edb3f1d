"""The start-up compatibility layer: each fix works, and each one's absence shows the upstream break."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import console_script, python_snippet, run

OFF = {"FAIRSEQ_KD_COMPAT": "0"}


def without(fix: str) -> dict:
    return {"FAIRSEQ_KD_COMPAT_DISABLE": fix}


# -- 1. dataclass-instance defaults (import fairseq) ----------------------------------------------
def test_import_fairseq_works_and_breaks_without_layer(tmp_path):
    python_snippet("import fairseq, fairseq_kd; import fairseq.models.hubert", cwd=tmp_path)
    if sys.version_info >= (3, 11):
        proc = python_snippet("import fairseq", cwd=tmp_path, env=OFF, check=False)
        assert proc.returncode != 0
        assert "mutable default" in proc.stderr and "CommonConfig" in proc.stderr


def test_dataclass_rule_is_relaxed_only_for_dataclass_instances():
    from dataclasses import dataclass, field

    @dataclass
    class Inner:
        x: int = 1

    @dataclass
    class Outer:
        inner: Inner = Inner()  # Python <= 3.10 rule: allowed

    assert Outer().inner.x == 1
    assert Inner.__hash__ is None  # the class is left as it was
    with pytest.raises(ValueError, match="mutable default"):

        @dataclass
        class Bad:
            items: list = field(default=[])  # still refused, as on every Python


# -- 2. hydra 1.0.7 error printing ----------------------------------------------------------------
HYDRA_APP = textwrap.dedent(
    """
    import hydra

    @hydra.main(config_path=None)
    def main(cfg):
        raise RuntimeError("the real error: boom-4711")

    main()
    """
)


def test_hydra_shows_the_real_error(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(HYDRA_APP)
    cmd = [sys.executable, str(script), f"hydra.run.dir={tmp_path}/out"]
    fixed = run(cmd, cwd=tmp_path, check=False)
    assert fixed.returncode != 0
    assert "etype" not in fixed.stderr
    assert "RuntimeError: the real error: boom-4711" in fixed.stderr.splitlines()
    broken = run(cmd, cwd=tmp_path, env=without("hydra_traceback"), check=False)
    # upstream: the report itself crashes, so the user's error is buried under a TypeError
    assert "unexpected keyword argument 'etype'" in broken.stderr.strip().splitlines()[-1]


# -- 3. numpy aliases --------------------------------------------------------------------------------
MASK_SNIPPET = (
    "from fairseq.data.data_utils import compute_mask_indices\n"
    "m = compute_mask_indices((2, 200), None, 0.5, 5, no_overlap=True)\n"
    "assert m.shape == (2, 200) and m.any(), m\n"
)


def test_compute_mask_indices_no_overlap(tmp_path):
    python_snippet(MASK_SNIPPET, cwd=tmp_path)
    proc = python_snippet(MASK_SNIPPET, cwd=tmp_path, env=without("numpy_aliases"), check=False)
    assert proc.returncode != 0 and "has no attribute 'int'" in proc.stderr


def test_numpy_proxy_is_local_to_the_mended_module():
    import fairseq.data.data_utils as data_utils

    assert data_utils.np.int is int
    assert not hasattr(np, "int")  # numpy itself is untouched


# -- 4. safe checkpoint loading ------------------------------------------------------------------
def _legacy_checkpoint(path: Path) -> None:
    """A checkpoint in the pre-hydra and early-hydra layouts: Namespace args, DictConfig cfg,
    a task_state holding a Dictionary, numpy scalars in the training state."""
    from fairseq.data import Dictionary
    from omegaconf import OmegaConf

    dictionary = Dictionary()
    dictionary.add_symbol("A")
    state = {
        "args": argparse.Namespace(arch="hubert", lr=[5e-4], normalize=False, max_tokens=1400000),
        "cfg": OmegaConf.create({"model": {"_name": "hubert", "layers": [1, 2]}, "task": {"_name": "x"}}),
        "model": {"w": torch.zeros(3)},
        "task_state": {"dictionaries": [dictionary]},
        "optimizer_history": [
            {"criterion_name": "HubertCriterion", "optimizer_name": "Adam",
             "lr_scheduler_state": {"best": np.float64(1.5)}, "num_updates": 7}
        ],
        "extra_state": {"val_loss": np.float32(2.0), "array": np.arange(3), "dtype": np.dtype("float32")},
    }
    with open(path, "wb") as f:
        torch.save(state, f)


def test_legacy_fairseq_checkpoint_loads_with_allow_list(tmp_path):
    from fairseq import checkpoint_utils
    from fairseq.data import Dictionary

    path = tmp_path / "legacy.pt"
    _legacy_checkpoint(path)
    # the very torch.load that load_checkpoint_to_cpu / the trainer / hubert_ctc call
    with open(path, "rb") as f:
        state = checkpoint_utils.torch.load(f, map_location=torch.device("cpu"))
    assert isinstance(state["args"], argparse.Namespace)
    assert isinstance(state["task_state"]["dictionaries"][0], Dictionary)
    assert state["cfg"]["model"]["layers"] == [1, 2]
    assert state["optimizer_history"][-1]["num_updates"] == 7

    load = f"from fairseq import checkpoint_utils; checkpoint_utils.load_checkpoint_to_cpu({str(path)!r})"
    broken = python_snippet(load, cwd=tmp_path, env=without("safe_checkpoint_load"), check=False)
    assert broken.returncode != 0 and "Unsupported global" in broken.stderr


class _Exploit:
    """Unpickling this would run code that creates a file."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').close()",))


def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    from fairseq import checkpoint_utils
    from fairseq_kd_compat.safe_load import ENV_TRUSTED, UnsafeCheckpointError

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "args": None, "payload": _Exploit(str(marker))}, path)
    monkeypatch.delenv(ENV_TRUSTED, raising=False)
    with pytest.raises(UnsafeCheckpointError) as err:
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    message = str(err.value)
    assert "builtins.exec" in message and ENV_TRUSTED in message and str(path) in message
    assert not marker.exists()

    # the documented opt-in for trusted files really is the full unpickler
    monkeypatch.setenv(ENV_TRUSTED, str(tmp_path))
    with open(path, "rb") as f:
        checkpoint_utils.torch.load(f, map_location="cpu")
    assert marker.exists()


def test_trusted_paths():
    from fairseq_kd_compat.safe_load import is_trusted

    env = {"FAIRSEQ_KD_TRUSTED_CHECKPOINTS": os.pathsep.join(["/ckpts/ok", "/other/file.pt"])}
    old = dict(os.environ)
    try:
        os.environ.update(env)
        assert is_trusted("/ckpts/ok/a/b.pt") and is_trusted("/other/file.pt")
        assert not is_trusted("/ckpts/okay.pt") and not is_trusted(None)
    finally:
        os.environ.clear()
        os.environ.update(old)


# -- 5. manifest roots relative to the manifest ---------------------------------------------------
def _tiny_manifest(folder: Path) -> Path:
    (folder / "audio").mkdir(parents=True)
    sf.write(folder / "audio" / "a.flac", np.zeros(16000, dtype="float32"), 16000)
    (folder / "train.tsv").write_text("audio\na.flac\t16000\n")
    return folder / "train.tsv"


SNIPPET_DATASET = (
    "import sys\n"
    "from fairseq.data.audio.raw_audio_dataset import FileAudioDataset\n"
    "ds = FileAudioDataset(sys.argv[1], sample_rate=16000)\n"
    "assert ds[0]['source'].shape[0] == 16000\n"
)


def test_relative_manifest_root_works_from_any_directory(tmp_path):
    manifest = _tiny_manifest(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run([sys.executable, "-c", SNIPPET_DATASET, str(manifest)], cwd=elsewhere)
    broken = run(
        [sys.executable, "-c", SNIPPET_DATASET, str(manifest)],
        cwd=elsewhere, env=without("manifest_root"), check=False,
    )
    assert broken.returncode != 0 and "audio/a.flac" in broken.stderr


# -- 7. input paths relative to the launch directory (hydra runs the job in hydra.run.dir) ---------
def test_relative_input_paths_resolve_against_the_launch_directory(tmp_path):
    from omegaconf import OmegaConf

    from fairseq_kd_compat.fixes import absolute_input_paths

    launch, run_dir = tmp_path / "launch", tmp_path / "launch" / "outputs" / "run"
    (launch / "data").mkdir(parents=True)
    (launch / "teacher.pt").write_bytes(b"")
    run_dir.mkdir(parents=True)
    cfg = OmegaConf.create({
        "task": {"data": "data", "teacher_path": "teacher.pt", "label_dir": "???"},
        "model": {"w2v_path": "not_there.pt", "data": "${task.data}"},
        "common_eval": {"path": f"teacher.pt{os.pathsep}/abs/other.pt"},
        "checkpoint": {"save_dir": "checkpoints"},
    })
    cwd = os.getcwd()
    os.chdir(run_dir)
    try:
        absolute_input_paths(cfg, str(launch))
    finally:
        os.chdir(cwd)
    assert cfg.task.data == str(launch / "data") and cfg.model.data == str(launch / "data")
    assert cfg.task.teacher_path == str(launch / "teacher.pt")
    assert cfg.common_eval.path == f"{launch / 'teacher.pt'}{os.pathsep}/abs/other.pt"
    assert cfg.model.w2v_path == "not_there.pt"  # missing everywhere: fairseq's own error names it
    assert cfg.checkpoint.save_dir == "checkpoints"  # outputs stay in the run folder, as in fairseq
    assert OmegaConf.is_missing(cfg.task, "label_dir")


def test_without_the_fix_relative_paths_are_read_from_the_run_folder(tmp_path):
    from fairseq_checkpoints import make_hubert_checkpoint

    make_hubert_checkpoint(tmp_path / "teacher.pt")
    manifests = Path(__file__).resolve().parents[1] / "manifests"
    broken = run(
        [console_script("fairseq-hydra-train"), "--config-name", "thin_deep",
         f"task.data={os.path.relpath(manifests, tmp_path)}", "task.teacher_path=teacher.pt",
         "common.fp16=false", "distributed_training.distributed_world_size=1", "hydra.run.dir=outputs/run"],
        cwd=tmp_path, env=without("launch_relative_paths"), check=False,
    )
    assert broken.returncode != 0
    assert "teacher checkpoint teacher.pt does not exist" in broken.stdout + broken.stderr


# -- 6. common.user_dir naming the installed package ----------------------------------------------
def test_user_dir_may_name_the_installed_package(tmp_path):
    snippet = (
        "import argparse\n"
        "from fairseq import utils\n"
        "utils.import_user_module(argparse.Namespace(user_dir='fairseq_kd'))\n"
        "import sys; assert 'fairseq_kd' in sys.modules\n"
    )
    python_snippet(snippet, cwd=tmp_path)


# -- the console scripts ---------------------------------------------------------------------------
def test_console_scripts_start(tmp_path):
    hydra_help = run([console_script("fairseq-hydra-train"), "--help"], cwd=tmp_path).stdout
    assert "Configuration groups" in hydra_help and "task" in hydra_help
    for script in ("fairseq-train", "fairseq-validate"):
        proc = run([console_script(script), "--help"], cwd=tmp_path)
        assert f"usage: {script}" in proc.stdout
    conf = run([console_script("fairseq-kd-infer"), "--conf-dir"], cwd=tmp_path).stdout.strip()
    assert Path(conf, "infer.yaml").is_file()


def test_switching_the_whole_layer_off_leaves_no_trace(tmp_path):
    snippet = (
        "import sys, dataclasses\n"
        "assert not any(type(f).__name__ == 'PostImportPatcher' for f in sys.meta_path)\n"
        "assert not getattr(dataclasses._get_field, '_fairseq_kd_compat', False)\n"
    )
    python_snippet(snippet, cwd=tmp_path, env=OFF)


# -- 8. numpy 2 / bitarray 3 / torch 2 breaks outside the HuBERT paths ----------------------------
BREAKS_SNIPPET = textwrap.dedent(
    """
    import torch

    def np_compat():  # numpy 2 removed np.compat
        from fairseq.data import TokenBlockDataset
        ds = TokenBlockDataset([torch.tensor([5, 6, 2]), torch.tensor([7, 2])], [3, 2], block_size=None,
                               pad=1, eos=2, break_mode="eos")
        assert ds[1].tolist() == [7, 2]

    def huffman():  # bitarray 3 removed util.rindex
        from fairseq.data.huffman import HuffmanCodeBuilder
        builder = HuffmanCodeBuilder()
        builder.add_symbols("a", "b", "a", "c", "a", "b")
        code = builder.build_code()
        assert [s.symbol for s in code.decode(code.encode(["a", "b", "c", "a"]))] == ["a", "b", "c", "a"]

    def uint8_mask():  # torch 2: only bool and float masks
        from fairseq.modules.multihead_attention import MultiheadAttention
        m = MultiheadAttention(16, 2, self_attention=True).eval()
        y = torch.randn(5, 2, 16)
        pad = torch.zeros(2, 5, dtype=torch.uint8)
        pad[1, 3:] = 1
        assert torch.equal(m(y, y, y, key_padding_mask=pad)[0], m(y, y, y, key_padding_mask=pad.bool())[0])

    def fast_path():  # the encoder layer's eval fast path with a padded batch
        from fairseq.models.transformer import TransformerConfig
        from fairseq.modules.transformer_layer import TransformerEncoderLayerBase
        cfg = TransformerConfig()
        cfg.encoder.embed_dim, cfg.encoder.ffn_embed_dim, cfg.encoder.attention_heads = 16, 32, 2
        cfg.dropout = cfg.attention_dropout = 0.0
        layer = TransformerEncoderLayerBase(cfg)
        layer.load_state_dict(layer.state_dict())  # as a checkpoint load does: enables the fast path
        layer.eval()
        x = torch.randn(2, 5, 16)  # batch first, as TransformerEncoder hands it over
        pad = torch.zeros(2, 5, dtype=torch.bool)
        pad[1, 3:] = True
        with torch.no_grad():
            fast = layer(x, pad)
            layer.load_to_BT = False
            slow = layer(x.transpose(0, 1), pad).transpose(0, 1)
        assert torch.allclose(fast[0], slow[0], atol=1e-5) and torch.allclose(fast[1, :3], slow[1, :3], atol=1e-5)

    for check in (np_compat, huffman, uint8_mask, fast_path):
        try:
            check()
            print(check.__name__, "OK")
        except Exception as error:
            print(check.__name__, type(error).__name__, str(error).splitlines()[0])
    """
)


def test_numpy2_bitarray3_torch2_breaks_are_mended(tmp_path):
    fixed = python_snippet(BREAKS_SNIPPET, cwd=tmp_path).stdout.splitlines()
    assert fixed[-4:] == ["np_compat OK", "huffman OK", "uint8_mask OK", "fast_path OK"], fixed
    broken = python_snippet(BREAKS_SNIPPET, cwd=tmp_path,
                            env=without("numpy_aliases,bitarray_rindex,torch2_masks")).stdout.splitlines()[-4:]
    assert broken[0].startswith("np_compat AttributeError module 'numpy' has no attribute 'compat'"), broken
    assert broken[1].startswith("huffman AttributeError module 'bitarray.util' has no attribute 'rindex'"), broken
    assert broken[2] == "uint8_mask AssertionError only bool and floating types of key_padding_mask are supported", broken
    assert broken[3] == "fast_path RuntimeError Mask Type should be defined", broken


# -- 9. the project's errors in a hydra job: one message, exit code 2 ------------------------------
HYDRA_PROJECT_ERROR_APP = textwrap.dedent(
    """
    import hydra
    from fairseq_kd_compat.resume import UnreadableCheckpointError

    @hydra.main(config_path=None)
    def main(cfg):
        raise UnreadableCheckpointError("train.tsv:3: the message, with the fix")

    main()
    """
)


def test_project_errors_in_a_hydra_job_are_one_message(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(HYDRA_PROJECT_ERROR_APP)
    cmd = [sys.executable, str(script), f"hydra.run.dir={tmp_path}/out"]
    fixed = run(cmd, cwd=tmp_path, check=False)
    assert fixed.returncode == 2 and "Traceback" not in fixed.stderr, fixed.stderr
    assert fixed.stderr.splitlines()[0] == "UnreadableCheckpointError: train.tsv:3: the message, with the fix"
    debug = run(cmd, cwd=tmp_path, check=False, env={"FAIRSEQ_KD_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    broken = run(cmd, cwd=tmp_path, env=without("clean_errors"), check=False)
    assert broken.returncode == 1 and "Traceback" in broken.stderr
