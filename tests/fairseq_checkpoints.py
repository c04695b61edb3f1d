"""Build small but REAL fairseq-format teacher checkpoints for tests.

The checkpoints are made the way fairseq makes them: the registered task is set up from its
dataclass config, the model is built by ``task.build_model(cfg.model)``, and the file is written by
``fairseq.checkpoint_utils.torch_persistent_save`` in the layout of ``Trainer.state_dict`` (hydra
era: ``cfg`` holds the full ``FairseqConfig`` as plain containers, ``args`` is None). A legacy
writer reproduces the pre-hydra layout of ``wav2vec_small.pt`` (``args`` = ``argparse.Namespace``,
no ``cfg``).

The task's ``data``/``label_dir`` point to a folder that does not exist, as they do in the
official checkpoints (``/checkpoint/...``): loading a teacher must never need them. HuBERT's
dictionaries travel in ``task_state`` as in a checkpoint written during pre-training.

This module holds helpers only (no tests); import it from a test file.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from fairseq import checkpoint_utils, tasks
from fairseq.criterions.hubert_criterion import HubertCriterionConfig
from fairseq.criterions.wav2vec_criterion import Wav2VecCriterionConfig
from fairseq.data.dictionary import Dictionary
from fairseq.dataclass.configs import FairseqConfig
from fairseq.models.hubert.hubert import HubertConfig
from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config
from fairseq.optim.adam import FairseqAdamConfig
from fairseq.optim.lr_scheduler.polynomial_decay_schedule import PolynomialDecayLRScheduleConfig
from fairseq.tasks.audio_pretraining import AudioPretrainingConfig
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

PathLike = Union[str, Path]

# Where the official checkpoints' task.data points: a cluster path that exists nowhere else.
MISSING_DATA_DIR = "/checkpoint/fairseq_kd_tests/does/not/exist"
TINY_CONV = "[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2"


@dataclass(frozen=True)
class TinyArch:
    """The architecture knobs of the tiny checkpoints, with their defaults: the keyword arguments
    of :func:`hubert_cfg`, :func:`wav2vec2_cfg`, :func:`make_hubert_checkpoint` and
    :func:`make_wav2vec2_checkpoint` (``normalize`` is the task's)."""

    layers: int = 2
    embed_dim: int = 64
    ffn_dim: int = 128
    heads: int = 4
    conv_layers: str = TINY_CONV
    layer_norm_first: bool = False
    extractor_mode: Optional[str] = None
    normalize: bool = False
    dropout: float = 0.1
    conv_pos: int = 16
    conv_pos_groups: int = 4

    def model_fields(self) -> Dict[str, Any]:
        """Architecture fields shared by HubertConfig and Wav2Vec2Config (fairseq's own names)."""
        return dict(
            encoder_layers=self.layers,
            encoder_embed_dim=self.embed_dim,
            encoder_ffn_embed_dim=self.ffn_dim,
            encoder_attention_heads=self.heads,
            conv_feature_layers=self.conv_layers,
            layer_norm_first=self.layer_norm_first,
            # the official recipes pair pre-LN (Large) with the layer-norm CNN and post-LN (Base)
            # with the group-norm CNN ("default")
            extractor_mode=self.extractor_mode or ("layer_norm" if self.layer_norm_first else "default"),
            conv_pos=self.conv_pos,
            conv_pos_groups=self.conv_pos_groups,
            final_dim=16,
            # non-zero training-time regularisation, as in the real configs, so that tests can show
            # the teacher switches it off
            dropout=self.dropout,
            attention_dropout=self.dropout,
            activation_dropout=self.dropout,
            dropout_input=self.dropout,
            dropout_features=self.dropout,
            encoder_layerdrop=0.05 if self.dropout > 0 else 0.0,
        )


def _full_cfg(task_cfg: Any, model_cfg: Any, criterion_cfg: Any, model_name: str) -> DictConfig:
    """A complete ``FairseqConfig`` with every group, as ``hydra_train`` composes it."""
    cfg = OmegaConf.structured(FairseqConfig)
    with open_dict(cfg):
        cfg.task = OmegaConf.structured(task_cfg)
        cfg.model = OmegaConf.structured(model_cfg)
        cfg.criterion = OmegaConf.structured(criterion_cfg)
        cfg.optimizer = OmegaConf.structured(FairseqAdamConfig(adam_betas="(0.9,0.98)"))
        cfg.lr_scheduler = OmegaConf.structured(PolynomialDecayLRScheduleConfig(warmup_updates=32))
        cfg.task._name = _task_name(task_cfg)
        cfg.model._name = model_name
        cfg.criterion._name = "hubert" if model_name == "hubert" else "wav2vec"
        cfg.optimizer._name = "adam"
        cfg.lr_scheduler._name = "polynomial_decay"
    return cfg


def _task_name(task_cfg: Any) -> str:
    return "hubert_pretraining" if isinstance(task_cfg, HubertPretrainingConfig) else "audio_pretraining"


def _km_dictionary(num_classes: int) -> Dictionary:
    """A k-means label dictionary like ``dict.km.txt`` (symbols "0".."K-1" after the 4 specials)."""
    dictionary = Dictionary()
    for k in range(num_classes):
        dictionary.add_symbol(str(k))
    return dictionary


def _trainer_state(cfg: DictConfig, model: torch.nn.Module, task: Any, criterion_name: str) -> Dict[str, Any]:
    """The dict ``Trainer.state_dict`` returns (criterion without parameters, optimizer state dropped)."""
    return {
        "args": None,  # legacy
        "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": model.state_dict(),
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": criterion_name,
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": None},
                "num_updates": 0,
            }
        ],
        "task_state": task.state_dict(),
        "extra_state": {
            "metrics": {},
            "previous_training_time": 0.0,
            "train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "shuffle": True},
            "val_loss": None,
        },
        "last_optimizer_state": None,
    }


def _build(cfg: DictConfig, task_state: Optional[Dict[str, Any]], seed: int):
    """Set up the task and build the model through it, as ``fairseq_cli.train`` does."""
    task = tasks.setup_task(cfg.task)
    if task_state:
        task.load_state_dict(task_state)
    torch.manual_seed(seed)
    model = task.build_model(cfg.model)
    return task, model


def _save(state: Dict[str, Any], path: PathLike, legacy_serialization: bool = False) -> Path:
    """fairseq's writer; ``legacy_serialization`` writes torch's pre-1.6 (non-zip) format instead,
    as the 2020 release files have it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if legacy_serialization:
        torch.save(state, str(path), _use_new_zipfile_serialization=False)
    else:
        checkpoint_utils.torch_persistent_save(state, str(path))
    return path


def hubert_cfg(**arch: Any) -> DictConfig:
    """Full hydra config of a tiny HuBERT pre-training run (task ``hubert_pretraining``);
    ``arch``: :class:`TinyArch` fields."""
    a = TinyArch(**arch)
    task_cfg = HubertPretrainingConfig(
        data=MISSING_DATA_DIR,
        label_dir=MISSING_DATA_DIR + "/labels",
        labels=["km"],
        label_rate=50.0,
        sample_rate=16_000,
        normalize=a.normalize,
    )
    model_cfg = HubertConfig(**a.model_fields())
    return _full_cfg(task_cfg, model_cfg, HubertCriterionConfig(pred_masked_weight=1.0), "hubert")


def wav2vec2_cfg(**arch: Any) -> DictConfig:
    """Full hydra config of a tiny wav2vec 2.0 pre-training run (task ``audio_pretraining``);
    ``arch``: :class:`TinyArch` fields."""
    a = TinyArch(**arch)
    task_cfg = AudioPretrainingConfig(data=MISSING_DATA_DIR, sample_rate=16_000, normalize=a.normalize)
    model_cfg = Wav2Vec2Config(latent_vars=8, latent_groups=2, latent_dim=0, **a.model_fields())
    return _full_cfg(task_cfg, model_cfg, Wav2VecCriterionConfig(), "wav2vec2")


def make_hubert_checkpoint(path: PathLike, *, num_classes: int = 20, seed: int = 0, **arch: Any) -> Path:
    """Write a tiny pre-trained-HuBERT checkpoint (hydra layout) and return its path;
    ``arch``: :class:`TinyArch` fields."""
    cfg = hubert_cfg(**arch)
    # the dictionaries arrive through the task state, as after load_dictionaries() in training
    task, model = _build(cfg, {"dictionaries": [_km_dictionary(num_classes)]}, seed)
    return _save(_trainer_state(cfg, model, task, "HubertCriterion"), path)


def make_wav2vec2_checkpoint(path: PathLike, *, seed: int = 0, **arch: Any) -> Path:
    """Write a tiny pre-trained-wav2vec 2.0 checkpoint (hydra layout) and return its path;
    ``arch``: :class:`TinyArch` fields."""
    cfg = wav2vec2_cfg(**arch)
    task, model = _build(cfg, None, seed)
    return _save(_trainer_state(cfg, model, task, "Wav2vecCriterion"), path)


def _flat_args(cfg: DictConfig) -> argparse.Namespace:
    """The flat argparse namespace a pre-hydra ``fairseq-train`` run stored as ``state["args"]``."""
    flat: Dict[str, Any] = {}
    for group in ("common", "dataset", "optimization", "checkpoint", "criterion", "optimizer",
                  "lr_scheduler", "task", "model"):
        for key, value in OmegaConf.to_container(cfg[group], resolve=True, enum_to_str=True).items():
            if not key.startswith("_"):
                flat[key] = value
    flat.update(
        task=cfg.task._name,
        arch=cfg.model._name,
        criterion=cfg.criterion._name,
        optimizer=cfg.optimizer._name,
        lr_scheduler=cfg.lr_scheduler._name,
        # argparse stored strings for what hydra now types (fairseq literal_evals them back)
        adam_betas=str(cfg.optimizer.adam_betas),
    )
    return argparse.Namespace(**flat)


def make_legacy_args_checkpoint(
    path: PathLike,
    *,
    kind: str = "wav2vec2",
    seed: int = 0,
    legacy_serialization: bool = False,
    **arch: Any,
) -> Path:
    """Write a pre-hydra checkpoint: ``args`` is an ``argparse.Namespace`` and there is no ``cfg``.

    This is the layout of the 2020 releases (``wav2vec_small.pt``, ``libri960_big.pt``). fairseq
    reads it back through ``convert_namespace_to_omegaconf``. ``kind`` is "wav2vec2" or "hubert";
    ``arch`` takes the :class:`TinyArch` knobs; ``legacy_serialization``
    also uses torch's old non-zip file format.
    """
    num_classes = arch.pop("num_classes", 20)
    if kind == "hubert":
        cfg = hubert_cfg(**arch)
        task_state: Optional[Dict[str, Any]] = {"dictionaries": [_km_dictionary(num_classes)]}
    elif kind == "wav2vec2":
        cfg = wav2vec2_cfg(**arch)
        task_state = None
    else:
        raise ValueError(f"kind must be 'wav2vec2' or 'hubert', not {kind!r}")
    task, model = _build(cfg, task_state, seed)
    state = {
        "args": _flat_args(cfg),
        "model": model.state_dict(),
        "optimizer_history": [
            {
                "criterion_name": "Wav2vecCriterion" if kind == "wav2vec2" else "HubertCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": None},
                "num_updates": 0,
            }
        ],
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}, "val_loss": None},
        "last_optimizer_state": None,
    }
    if task_state:
        state["task_state"] = task.state_dict()
    return _save(state, path, legacy_serialization)


def rewrite_checkpoint(src: PathLike, dst: PathLike, edit, legacy_serialization: bool = False) -> Path:
    """Load a checkpoint written here, apply ``edit(state) -> state`` and save it to ``dst``.

    For building broken or foreign variants (no ``model``, a ``hubert_ctc`` cfg, ...) that still
    go through fairseq's own writer.
    """
    state = torch.load(str(src), map_location="cpu", weights_only=False)  # our own file
    return _save(edit(state), dst, legacy_serialization)


__all__ = [
    "MISSING_DATA_DIR",
    "TINY_CONV",
    "TinyArch",
    "hubert_cfg",
    "wav2vec2_cfg",
    "make_hubert_checkpoint",
    "make_wav2vec2_checkpoint",
    "make_legacy_args_checkpoint",
    "rewrite_checkpoint",
]
