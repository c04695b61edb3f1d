"""distill_hubert beyond one process: two CPU ranks (gloo) that provably train one model, and a
resume that continues the uninterrupted run exactly (update count, LR schedule, data, losses).

All runs go through the real console scripts (``torchrun``, ``fairseq-hydra-train``) with the
``thin_deep`` preset shrunk by overrides and a tiny real HuBERT teacher.

How two CPU processes train with fairseq 0.12.2 (no GPU, no code of ours in the launch path):

* ``torchrun --standalone --nproc_per_node 2 fairseq-hydra-train ...``: torchrun sets
  MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK, which ``fairseq.distributed.utils.infer_init_method``
  turns into ``env://`` with ``distributed_no_spawn=True`` (fairseq's own spawn cannot be used on
  CPU: it starts ``min(torch.cuda.device_count(), world_size)`` = 0 processes);
* ``distributed_training.distributed_backend=gloo`` (the default is nccl) and ``common.cpu=true``;
* ``distributed_training.ddp_backend=legacy_ddp``: fairseq's ``c10d`` wrapper always passes
  ``device_ids=[device_id]`` to torch's DistributedDataParallel, which torch rejects for a CPU
  module ("device_ids and output_device arguments only work with ... GPU modules").

Resume: fairseq restores the batch order, LR schedule and update count exactly, but the random
crops of utterances longer than ``max_sample_size`` come from numpy's global generator, re-seeded
at start-up, so without ``task.seeded_crops`` (default on) a resumed run trains on other crops from
its first cropped batch on (here updates 5 and 6: losses off by ~5e-3).
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import MANIFESTS, REPO, console_script, run
from fairseq_checkpoints import make_hubert_checkpoint

TINY_STUDENT = [
    "model.encoder_layers=2",
    "model.encoder_embed_dim=64",
    "model.encoder_ffn_embed_dim=64",
    "model.encoder_attention_heads=4",
    "model.hint_layer_ids=[1,2]",
    "model.teacher_embed_dim=64",
    "model.conv_channels=[32,32,32,32,32,32,32,32,32]",
]
NO_DROPOUT = [
    "model.dropout=0",
    "model.attention_dropout=0",
    "model.activation_dropout=0",
    "model.dropout_input=0",
    "model.encoder_layerdrop=0",
]
CHECKSUMS = re.compile(r"parameter checksums across (\d+) ranks: \[([^\]]*)\]")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_hubert_checkpoint(
        tmp_path_factory.mktemp("teacher") / "teacher.pt", layers=2, embed_dim=64, ffn_dim=128, heads=4
    )


def distill_cmd(teacher: Path, save_dir: Path, *overrides: str) -> List[str]:
    """A tiny thin_deep distillation on the bundled corpus, json logs of every update."""
    return [
        console_script("fairseq-hydra-train"),
        "--config-name", "thin_deep",
        f"task.data={MANIFESTS}", f"task.teacher_path={teacher}",
        "task.max_sample_size=32000",  # most training utterances are longer: random crops
        *TINY_STUDENT,
        "common.fp16=false", "dataset.num_workers=0",
        "dataset.batch_size=2", "optimization.update_freq=[1]",
        "common.log_format=json", "common.log_interval=1",
        f"checkpoint.save_dir={save_dir}", f"hydra.run.dir={save_dir}",
        *overrides,
    ]


def json_records(stdout: str, tag: str) -> List[Dict[str, str]]:
    """fairseq's json log records of one kind: train_inner (every update), valid, train."""
    pattern = re.compile(r"\]\[" + re.escape(tag) + r"\]\[INFO\] - (\{.*\})$")
    return [json.loads(m.group(1)) for m in map(pattern.search, stdout.splitlines()) if m]


def logged_checksums(stdout: str) -> List[List[float]]:
    found = []
    for ranks, values in CHECKSUMS.findall(stdout):
        checksums = [float(v) for v in values.split(",")]
        assert len(checksums) == int(ranks)
        found.append(checksums)
    return found


# -- two ranks, one model -------------------------------------------------------------------------


def test_two_cpu_ranks_train_one_model(tmp_path, teacher):
    save_dir = tmp_path / "ddp"
    proc = run(
        [
            console_script("torchrun"), "--standalone", "--nproc_per_node", "2",
            *distill_cmd(
                teacher, save_dir,
                "common.cpu=true",
                "distributed_training.distributed_world_size=2",
                "distributed_training.distributed_backend=gloo",
                "distributed_training.ddp_backend=legacy_ddp",
                "optimization.max_update=4", "lr_scheduler.warmup_updates=1",
                "dataset.validate_interval_updates=2",  # validations after updates 2 and 4
            ),
        ],
        cwd=tmp_path,
        timeout=300,
    )
    out = proc.stdout + proc.stderr

    assert "initialized host" in out and " as rank 0" in out and " as rank 1" in out
    updates = json_records(out, "train_inner")
    assert [r["num_updates"] for r in updates] == ["1", "2", "3", "4"]
    # every update saw 2 utterances on each of the 2 ranks
    assert all(float(r["bsz"]) == 4 for r in updates), updates
    assert "done training" in out
    assert (save_dir / "checkpoint_last.pt").is_file()

    checksums = logged_checksums(out)
    assert len(checksums) == 2, out[-4000:]  # one per validation, logged by rank 0 only
    for per_rank in checksums:
        assert len(per_rank) == 2 and per_rank[0] == per_rank[1], per_rank
    assert checksums[0][0] != checksums[1][0]  # the weights did change between the validations

    # and the weights rank 0 saved are the ones both ranks reported
    import torch

    state = torch.load(str(save_dir / "checkpoint_last.pt"), map_location="cpu", weights_only=False)
    saved = sum(float(v.double().sum()) for v in state["model"].values() if v.is_floating_point())
    assert saved == pytest.approx(checksums[1][0], rel=1e-12)


def test_replica_mismatch_is_an_error():
    from fairseq_kd.distributed import ReplicaMismatchError, compare_replica_checksums

    compare_replica_checksums([498.99903003025685, 498.99903003025685])
    compare_replica_checksums([1.5])
    with pytest.raises(ReplicaMismatchError, match=r"across 3 ranks.*ranks \[2\] differ"):
        compare_replica_checksums([1.0, 1.0, 1.0 + 2**-40])
    with pytest.raises(ReplicaMismatchError, match=r"ranks \[1\] differ"):
        compare_replica_checksums([1.0, float("nan")])
    compare_replica_checksums([float("nan"), float("nan")])  # broken alike, not diverged


CHECK_REPLICAS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from fairseq_kd.distributed import ReplicaMismatchError, check_replicas

    dist.init_process_group("gloo")  # env:// from torchrun
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    same = check_replicas(model)
    assert same is not None and len(same) == 2 and same[0] == same[1], same
    with torch.no_grad():
        model.weight[0, 0] += 1e-6 * rank  # rank 1 drifts by one small step
    try:
        check_replicas(model)
    except ReplicaMismatchError as error:
        print(f"rank {rank} stopped: {error}", flush=True)
    else:
        sys.exit(f"rank {rank}: no error for different weights")
    dist.destroy_process_group()
    """
)


def test_check_replicas_collective_on_gloo(tmp_path):
    """The real all-gather over two processes: equal weights pass, a drifted replica stops both."""
    script = tmp_path / "check_replicas.py"
    script.write_text(CHECK_REPLICAS_SCRIPT)
    proc = run(
        [console_script("torchrun"), "--standalone", "--nproc_per_node", "2", str(script)],
        cwd=REPO, timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert "rank 0 stopped: data-parallel replicas hold different student weights" in out
    assert "rank 1 stopped: data-parallel replicas hold different student weights" in out


def test_check_replicas_skips_a_single_process():
    import torch

    from fairseq_kd.distributed import check_replicas

    assert not torch.distributed.is_initialized()
    assert check_replicas(torch.nn.Linear(2, 2)) is None


# -- resume -----------------------------------------------------------------------------------------

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # two runs share the CPU cores
SCHEDULE = [
    "distributed_training.distributed_world_size=1",
    "+lr_scheduler.total_num_update=6",  # the schedule is fixed: it does not follow max_update
    "lr_scheduler.warmup_updates=2",
    "common.seed=7",
]


def test_resume_continues_the_uninterrupted_run(tmp_path, teacher):
    def train(save_dir: str, max_update: int) -> str:
        cmd = distill_cmd(teacher, tmp_path / save_dir, *NO_DROPOUT, *SCHEDULE, f"optimization.max_update={max_update}")
        return run(cmd, cwd=tmp_path, env=ONE_THREAD).stdout

    # the uninterrupted run and the first half are independent: run them side by side
    with ThreadPoolExecutor(max_workers=2) as pool:
        full, first = pool.map(train, ["full", "resumed"], [6, 3])
    second = train("resumed", 6)

    full_log = {r["num_updates"]: r for r in json_records(full, "train_inner")}
    first_log = json_records(first, "train_inner")
    second_log = json_records(second, "train_inner")
    assert list(full_log) == ["1", "2", "3", "4", "5", "6"]
    assert [r["num_updates"] for r in first_log] == ["1", "2", "3"]

    # it continues: checkpoint_last.pt of the first run, update numbers 4, 5, 6
    assert re.search(r"Loaded checkpoint \S*checkpoint_last\.pt \(epoch 1 @ 3 updates\)", second), second[-3000:]
    assert [r["num_updates"] for r in second_log] == ["4", "5", "6"]

    # same LR schedule: polynomial decay from 5e-4 to 0 over updates 2..6 -> lr(4) = 5e-4 * 2/4
    assert float(second_log[0]["lr"]) == pytest.approx(2.5e-4, rel=1e-6)
    for record in first_log + second_log:
        assert record["lr"] == full_log[record["num_updates"]]["lr"], record["num_updates"]

    # same data (batch order and crops) and no dropout -> the same losses; fairseq logs 4 decimals.
    # Updates 5 and 6 crop utterances longer than max_sample_size (32000 samples): with fairseq's
    # global-numpy crops they differ by ~5e-3 after a resume; task.seeded_crops makes them equal.
    for record in first_log + second_log:
        expected = full_log[record["num_updates"]]
        for key in ("loss", "loss_h1", "loss_h2"):
            assert float(record[key]) == pytest.approx(float(expected[key]), abs=1e-4), (record["num_updates"], key)
    assert float(json_records(second, "valid")[-1]["valid_loss"]) == pytest.approx(
        float(json_records(full, "valid")[-1]["valid_loss"]), abs=1e-4
    )


# -- seeded crops -----------------------------------------------------------------------------------


def _seeded_train_set(seed: int):
    from fairseq.data.audio.raw_audio_dataset import FileAudioDataset

    from fairseq_kd.data.seeded_crops import seed_crops

    dataset = FileAudioDataset(str(MANIFESTS / "train.tsv"), sample_rate=16_000, max_sample_size=16_000, pad=True)
    seed_crops(dataset, seed)
    assert isinstance(dataset, FileAudioDataset)
    return dataset


def test_seeded_crops_ignore_numpy_global_state():
    import numpy as np

    dataset = _seeded_train_set(seed=7)
    long_ids = [i for i, size in enumerate(dataset.sizes) if size > 16_000][:3]
    samples = [dataset[i] for i in long_ids]

    np.random.seed(0)
    a = dataset.collater(samples)["net_input"]["source"]
    np.random.seed(123)
    np.random.rand(17)
    b = dataset.collater(samples)["net_input"]["source"]
    assert a.shape == (3, 16_000)
    assert (a == b).all()

    # a crop depends on the utterance, the epoch and the seed, not on its batch-mates
    alone = dataset.collater(samples[:1])["net_input"]["source"]
    assert (alone[0] == a[0]).all()
    dataset.set_epoch(2)
    assert not (dataset.collater(samples)["net_input"]["source"] == a).all()
    other_seed = _seeded_train_set(seed=8)
    assert not (other_seed.collater(samples)["net_input"]["source"] == a).all()

    # each crop is a window of the utterance
    wav, window = samples[0]["source"], a[0]
    candidates = (wav[: len(wav) - 16_000 + 1] == window[0]).nonzero().flatten().tolist()
    assert any((wav[s : s + 16_000] == window).all() for s in candidates), "not a window of the utterance"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
