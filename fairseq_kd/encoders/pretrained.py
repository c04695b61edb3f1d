"""Open, check and rebuild any checkpoint a user names as a speech encoder, with errors that name
the file and say what to pass instead.

One path for every entry point that takes a checkpoint (the distillation teacher, ``model.w2v_path``
of the CTC and keyword / speaker fine-tuning, ``fairseq-kd-export``, ``fairseq-kd-summary``, the
benchmark and the report):

1. :func:`read_checkpoint`: cheap file checks first (existence, torch's file signature, and for
   zip-format files the zip directory, missing after an interrupted copy, and every record's CRC,
   which ``torch.load`` verifies neither: a damaged record would load as silently wrong weights;
   ~0.25 s per GB), then fairseq's own reader (``checkpoint_utils.load_checkpoint_to_cpu``:
   allow-listed unpickling through the compatibility layer, legacy ``args`` converted to ``cfg``).
2. :func:`encoder_state`: the encoder's config and weights out of what the file holds: a
   pre-trained fairseq HuBERT / wav2vec 2.0 model, a distilled ``thin_hubert`` student, or a CTC
   model fine-tuned from either (its ``w2v_args`` and ``w2v_encoder.w2v_model.*`` weights).
3. :func:`build_encoder`: the model rebuilt the way fairseq's ``hubert_ctc`` does (``setup_task`` +
   ``build_model(from_checkpoint=True)``, which never reads the task's data, label folder or a
   distillation teacher), config overrides applied first (only keys the model's dataclass has), the
   weights loaded strictly, the pre-training-only modules dropped.

Every function takes the caller's exception class and a ``label`` that names the file the way the
user named it (``"teacher checkpoint /x.pt"``, ``"model.w2v_path=/x.pt"``).
"""

from __future__ import annotations

import inspect
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Type

from torch import nn

# The two ways torch.save starts a file: a zip archive (torch >= 1.6) or the legacy pickle stream,
# whose first record is the pickled magic number 0x1950a86a20f9469cfc6c (protocol 2).
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)

STUDENT_MODELS = ("thin_hubert", "thin_hubert_w2v")
FAIRSEQ_ENCODERS = ("hubert", "wav2vec2")
CTC_MODELS = ("hubert_ctc", "wav2vec_ctc")
CTC_ENCODER_PREFIX = "w2v_encoder.w2v_model."  # HubertEncoder and Wav2VecEncoder both name it so
# HuBERT's label embeddings: sized by the pre-training label dictionaries, used by no encoder path
HUBERT_LABEL_EMBEDDINGS = "label_embs_concat"

# Model fields that make a forward stochastic or pad it: zeroed (or set to 1) for a frozen teacher.
FROZEN_MODEL_FIELDS: Dict[str, Any] = {
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "dropout_input": 0.0,
    "dropout_features": 0.0,
    "encoder_layerdrop": 0.0,
    # fairseq pads T to a multiple of 2 otherwise (an utterance's frames would depend on its batch,
    # the s3prl #331 off-by-one)
    "required_seq_len_multiple": 1,
    # fairscale activation checkpointing wraps the layers; useless without backward
    "checkpoint_activations": False,
    "offload_activations": False,
}


# -- 1. the file ------------------------------------------------------------------------------------
def check_checkpoint_file(path: str, label: str, fix: str, error: Type[Exception] = ValueError) -> bytes:
    """Existence, torch's signature and zip integrity; returns the file's first bytes.

    ``label`` names the file in messages, ``fix`` says what to pass instead.
    """
    if not os.path.exists(path):
        raise error(f"{label} does not exist; {fix}")
    if not os.path.isfile(path):
        raise error(f"{label} is not a file: give the checkpoint file itself; {fix}")
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_TORCH_MAGIC))
    if head.startswith(ZIP_MAGIC):
        check_zip(path, label, error)
    elif head != LEGACY_TORCH_MAGIC:
        raise error(f"{label} is not a PyTorch checkpoint (it starts with {head[:8]!r}); {fix}")
    return head


def check_zip(path: str, label: str, error: Type[Exception] = ValueError) -> None:
    """Truncation and CRC check of a zip-format checkpoint."""
    if not zipfile.is_zipfile(path):  # the zip directory sits at the end: a cut-off file has none
        raise error(
            f"{label} is truncated (its zip directory is missing, as after an interrupted download "
            f"or copy); download or copy it again"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        damaged = f"? ({exc})"
    if damaged is not None:
        raise error(f"{label} is corrupt (record {damaged} fails its CRC check); download or copy it again")


def read_checkpoint(
    path: str,
    label: str,
    fix: str,
    error: Type[Exception] = ValueError,
    arg_overrides: Optional[Dict[str, Any]] = None,
    require_cfg: bool = True,
) -> Dict[str, Any]:
    """The checked file read with fairseq's own reader.

    With ``require_cfg`` the state must hold ``model`` weights and a ``cfg`` with a ``model``
    section (what every fairseq training checkpoint has).
    """
    from fairseq import checkpoint_utils

    check_checkpoint_file(path, label, fix, error)
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides=arg_overrides)
    except pickle.UnpicklingError as exc:  # includes the compat layer's refusal of unknown globals
        raise error(f"{label} cannot be unpickled: {str(exc)[:400]}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise error(
            f"{label} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); the file is corrupt or "
            f"truncated: download or copy it again"
        ) from None
    except KeyError as exc:
        # fairseq's _upgrade_state_dict indexes the keys a fairseq training checkpoint has; the
        # minimal layout of old releases and converters (only `args`/`cfg` and `model`) has none
        state = _minimal_layout(path, arg_overrides)
        if state is None:
            raise error(
                f"{label} is a PyTorch file but not a fairseq training checkpoint (fairseq's loader failed "
                f"with {type(exc).__name__}: {str(exc)[:200]}); {fix}"
            ) from None
    except (TypeError, AttributeError, ValueError) as exc:
        raise error(
            f"{label} is a PyTorch file but not a fairseq training checkpoint (fairseq's loader failed "
            f"with {type(exc).__name__}: {str(exc)[:200]}); {fix}"
        ) from None
    if require_cfg:
        cfg = state.get("cfg") if isinstance(state, dict) else None
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or cfg is None or cfg.get("model") is None:
            raise error(
                f"{label} is a PyTorch file but not a fairseq training checkpoint (no 'model' weights "
                f"with a 'cfg'/'args' describing them); {fix}"
            )
    return state


def _minimal_layout(path: str, arg_overrides: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """A checkpoint holding only ``model`` weights and ``args`` (or ``cfg``), completed with an empty
    training history so that fairseq's own upgrade (``args`` -> ``cfg``) reads it; None otherwise."""
    from fairseq import checkpoint_utils

    try:
        with open(path, "rb") as f:
            state = checkpoint_utils.torch.load(f, map_location="cpu")
    except Exception:  # noqa: BLE001 - the caller reports the original error
        return None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        return None
    if state.get("args") is None and state.get("cfg") is None or "optimizer_history" in state:
        return None
    state["optimizer_history"] = [
        {"criterion_name": None, "optimizer_name": None, "lr_scheduler_state": {"best": None}, "num_updates": 0}
    ]
    state.setdefault("extra_state", {"train_iterator": {"epoch": 1}, "val_loss": None})
    state.setdefault("last_optimizer_state", None)
    if arg_overrides and state.get("args") is not None:
        for name, value in arg_overrides.items():
            setattr(state["args"], name, value)
    if state.get("cfg") is not None:
        from omegaconf import OmegaConf

        state["cfg"] = OmegaConf.create(state["cfg"])
    try:
        return checkpoint_utils._upgrade_state_dict(state)
    except Exception:  # noqa: BLE001
        return None


# -- 2. what the file holds ------------------------------------------------------------------------
def model_name(cfg: Any) -> Optional[str]:
    """``cfg.model._name`` of a checkpoint's (or ``w2v_args``') config."""
    model = cfg.get("model") if cfg is not None else None
    return model.get("_name", None) if model is not None else None


def is_fine_tuned(model_cfg: Any) -> bool:
    """Whether a model config wraps a pre-trained encoder (fairseq's CTC / seq2seq models, kws_sv)."""
    return "w2v_path" in model_cfg or "w2v_args" in model_cfg


def trained_normalize(cfg: Any) -> bool:
    """Whether the model was trained on normalised waveforms (``task.normalize``)."""
    task_cfg = cfg.get("task") or {}
    return bool(task_cfg.get("normalize", cfg.model.get("normalize", False)))


def trained_sample_rate(cfg: Any) -> int:
    task_cfg = cfg.get("task") or {}
    return int(task_cfg.get("sample_rate", 16000) or 16000)


@dataclass
class EncoderState:
    """An encoder's config and weights as found in a checkpoint."""

    cfg: Any  # the encoder's own full config (the checkpoint's cfg, or a CTC model's w2v_args)
    weights: Dict[str, Any]  # the encoder's state dict, keys as the encoder names them
    kind: str  # the encoder's cfg.model._name
    source: str  # "pretrained" (the checkpoint is the encoder itself) or the CTC model's name
    normalize: bool  # what the checkpoint was trained on (a CTC model's own task wins)
    sample_rate: int


def encoder_state(
    state: Mapping[str, Any], path: str, error: Type[Exception], accept: Iterable[str], fix: str
) -> EncoderState:
    """The encoder inside a read checkpoint: the model itself, or the encoder of a CTC model.

    ``accept``: the encoder kinds the caller can use; anything else raises ``error`` with ``fix``.
    """
    accept = tuple(accept)
    cfg = state["cfg"]
    name = model_name(cfg)
    if name in CTC_MODELS:
        w2v_args = cfg.model.get("w2v_args", None)
        inner = model_name(w2v_args) if w2v_args is not None else None
        if inner is None:
            raise error(
                f"{path} is a {name} checkpoint without w2v_args (the pre-trained model's config), so "
                f"it does not say which encoder it holds; fine-tune with task=kd_audio_finetuning (or "
                f"audio_finetuning), which stores it: {fix}"
            )
        if inner not in accept:
            raise error(f"{path} is a {name} model fine-tuned from a {inner!r} model; {fix}")
        weights = {
            k[len(CTC_ENCODER_PREFIX):]: v for k, v in state["model"].items() if k.startswith(CTC_ENCODER_PREFIX)
        }
        if not weights:
            raise error(
                f"{path}: {name} checkpoint has no {CTC_ENCODER_PREFIX}* weights (found e.g. "
                f"{sorted(state['model'])[:3]}): it was not written by fairseq's {name}"
            )
        # kd_audio_finetuning checks that fine-tuning normalises as the encoder was trained
        return EncoderState(w2v_args, weights, inner, name, trained_normalize(cfg) if "task" in cfg else
                            trained_normalize(w2v_args), trained_sample_rate(cfg))
    if name not in accept:
        raise error(f"{path} holds a {name!r} model; {fix}")
    return EncoderState(cfg, dict(state["model"]), name, "pretrained", trained_normalize(cfg), trained_sample_rate(cfg))


# -- 3. the model -----------------------------------------------------------------------------------
def apply_model_overrides(cfg: Any, overrides: Mapping[str, Any]) -> None:
    """Write ``overrides`` into ``cfg.model`` in place, only the keys its model dataclass has.

    Set directly rather than through fairseq's ``arg_overrides``, which only override keys the
    stored config already has: older checkpoints lack ``required_seq_len_multiple`` (default 2).
    """
    from omegaconf import open_dict

    from fairseq.models import MODEL_DATACLASS_REGISTRY

    known = MODEL_DATACLASS_REGISTRY[cfg.model._name].__dataclass_fields__
    with open_dict(cfg):
        for key, value in overrides.items():
            if key in known:
                cfg.model[key] = value


def check_channel_masking(model_cfg: Any, encoder_model_cfg: Any, error: Type[Exception] = ValueError) -> None:
    """Channel masking that a fine-tuning config asks of this encoder must be drawable.

    fairseq's ``compute_mask_indices`` draws ``int(prob * dim / length + U(0, 1))`` channel spans
    and fails with an IndexError when that is 0: with ``prob * dim / length < 1`` (a narrow student
    under the recipes' ``mask_channel_length: 64``) some batch sooner or later crashes training.
    """
    prob = float(model_cfg.get("mask_channel_prob", 0.0) or 0.0)
    length = int(model_cfg.get("mask_channel_length", 0) or 0)
    dim = encoder_model_cfg.get("encoder_embed_dim", None)
    if not model_cfg.get("apply_mask", False) or prob <= 0 or length <= 0 or not dim:
        return
    if prob * dim / length < 1:
        longest = int(prob * dim)
        raise error(
            f"model.mask_channel_prob={prob:g} x encoder_embed_dim {dim} / model.mask_channel_length="
            f"{length} = {prob * dim / length:.3g} < 1: fairseq's compute_mask_indices then draws no "
            f"channel span for some batches and fails with an IndexError mid-training. For this "
            f"{dim}-dimensional model use model.mask_channel_length={max(longest, 1)} or less (or "
            f"model.mask_channel_prob=0 to switch channel masking off)"
        )


def build_encoder(
    cfg: Any,
    weights: Optional[Mapping[str, Any]],
    label: str,
    error: Type[Exception],
    keep_heads: bool = False,
) -> nn.Module:
    """Rebuild the encoder ``cfg`` describes; load ``weights`` strictly when given.

    A HuBERT is built without label dictionaries (so neither its k-means label folder nor its task
    state is read); its label embeddings, which only score pre-training targets, are not loaded.
    ``keep_heads`` keeps a student's distillation heads (and a pre-trained model's pre-training
    modules); by default ``remove_pretraining_modules`` drops them.
    """
    from fairseq import tasks

    task = tasks.setup_task(cfg.task)  # a student's distill_hubert task never loads its teacher here
    if model_name(cfg) == "hubert":
        # one None per label set keeps final_proj's shape (final_dim x label sets) and skips the
        # label embeddings
        labels = cfg.task.get("labels", None) or [None]
        task.load_state_dict({"dictionaries": [None] * len(labels)})
    if "from_checkpoint" in inspect.getfullargspec(task.build_model).args:
        model = task.build_model(cfg.model, from_checkpoint=True)  # drops cfg keys it does not know
    else:
        model = task.build_model(cfg.model)
    if not keep_heads and hasattr(model, "remove_pretraining_modules"):
        # before loading: the removed modules become None, so their keys (present in a training
        # checkpoint, absent from a CTC model's encoder) are ignored even by strict loading
        model.remove_pretraining_modules()
    if weights is not None:
        own = model.state_dict()
        weights = {k: v for k, v in weights.items() if k != HUBERT_LABEL_EMBEDDINGS or k in own}
        try:
            model.load_state_dict(weights, strict=True, model_cfg=cfg.model)
        except RuntimeError as exc:
            raise error(
                f"the weights in {label} do not fit the model its cfg describes "
                f"({str(exc).splitlines()[0]} ...); the file is inconsistent or was edited"
            ) from None
    return model


def open_encoder(
    path: str,
    label: str,
    fix: str,
    error: Type[Exception],
    accept: Iterable[str] = STUDENT_MODELS + FAIRSEQ_ENCODERS,
    overrides: Optional[Mapping[str, Any]] = None,
    keep_heads: bool = False,
) -> Tuple[nn.Module, EncoderState]:
    """Read, check and rebuild the encoder of the checkpoint at ``path`` (steps 1-3)."""
    state = read_checkpoint(os.fspath(path), label, fix, error)
    found = encoder_state(state, path, error, accept, fix)
    del state
    if overrides:
        apply_model_overrides(found.cfg, overrides)
    model = build_encoder(found.cfg, found.weights, label, error, keep_heads=keep_heads)
    return model, found


__all__ = [
    "CTC_ENCODER_PREFIX",
    "CTC_MODELS",
    "EncoderState",
    "FAIRSEQ_ENCODERS",
    "FROZEN_MODEL_FIELDS",
    "STUDENT_MODELS",
    "apply_model_overrides",
    "build_encoder",
    "check_channel_masking",
    "check_checkpoint_file",
    "check_zip",
    "encoder_state",
    "is_fine_tuned",
    "model_name",
    "open_encoder",
    "read_checkpoint",
    "trained_normalize",
    "trained_sample_rate",
]
