"""The frozen teacher: a pre-trained fairseq HuBERT / wav2vec 2.0 model that gives layer targets.

The teacher is a guest, not family (data2vec's ``_ema``, DPHuBERT, s3prl's distiller):

* :class:`FrozenTeacher` is a plain Python object, never an ``nn.Module`` attribute of the student
  or the criterion, so it is not in the optimiser, not wrapped in DDP, not cast by the trainer's
  ``.half()`` and not written into checkpoints (``Trainer.state_dict`` saves the criterion's
  ``state_dict`` whenever it has parameters).
* It is loaded with fairseq's own reader (``checkpoint_utils.load_checkpoint_to_cpu`` +
  ``tasks.setup_task`` + ``task.build_model``), with everything that makes a forward
  non-deterministic or length-dependent switched off: dropouts and ``encoder_layerdrop`` are 0 and
  ``required_seq_len_multiple`` is 1 (fairseq pads T to a multiple of 2 otherwise, the s3prl #331
  off-by-one). The task's ``data``/``label_dir`` are never read.
* ``eval()`` is enforced on every call (fairseq's trainer calls ``.train()`` on model and criterion
  at every step), parameters are frozen and the forward runs under ``torch.no_grad()`` -- not
  ``inference_mode``, whose tensors cannot be saved for backward by the student's loss.
* Layer outputs come from ``TransformerEncoder.extract_features``' ``layer_results``, not from
  forward hooks.
* Padding-exact: the frame padding mask comes from the conv arithmetic
  (``floor((L - k) / s) + 1`` per layer), and the group norm of the Base models' first conv layer
  (``extractor_mode="default"``) is computed over each row's own frames. fairseq's forward lets
  the padded zeros into those statistics, so a row's features would depend on its batch mates.

Index convention (``encoders/layers.py``, ``encoders/hf.py``): ``hidden_states[l]`` is the output of
transformer layer ``l``; for pre-LN (``layer_norm_first``) models the last one also gets
``encoder.layer_norm``, as fairseq's encoder output does (transformers' own last ``hidden_states``
entry is taken before it). Layer 0 is selectable (``layer0``, ``task.teacher_layer0``):
``"projection"`` (default, this project's and DPHuBERT's layer 0) is the CNN feature after
``layer_norm`` + ``post_extract_proj``, before ``pos_conv``; ``"layer_input"`` is the first
transformer layer's input (after the positional convolution and, for post-LN models, the encoder
LayerNorm), which is what transformers' and s3prl's HuBERT ``hidden_states[0]`` is, and SUPERB's
layer 0. Layers 1..L agree in both.

A folder with a ``config.json`` (a transformers ``HubertModel`` / ``Wav2Vec2Model`` / ``WavLMModel``
/ ``Data2VecAudioModel``, ``encoders/hf.py``) is loaded as an :class:`HFTeacher`, with the same
guarantees; ``transformers`` is imported only then.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from fairseq_kd.encoders.frames import conv_specs, receptive_field, samples_per_frame
from fairseq_kd.encoders.hf import HFTeacherError, check_layer0, is_hf_folder
from fairseq_kd.encoders.layers import fairseq_hidden_states
from fairseq_kd.encoders.pretrained import (
    FAIRSEQ_ENCODERS,
    FROZEN_MODEL_FIELDS,
    apply_model_overrides,
    build_encoder,
    model_name,
    read_checkpoint,
)

logger = logging.getLogger(__name__)

TEACHER_MODELS = FAIRSEQ_ENCODERS

# model._name of checkpoints people point at by mistake -> (what the file is, what to use instead)
_FINE_TUNED_FIX = (
    "a teacher must be the pre-trained checkpoint it was fine-tuned from (model 'hubert' or "
    "'wav2vec2'), e.g. hubert_base_ls960.pt rather than a *_finetune_* file, wav2vec_small.pt "
    "rather than wav2vec_small_960h.pt"
)
_NOT_A_TEACHER = {
    "hubert_ctc": ("a fine-tuned CTC model (hubert_ctc)", _FINE_TUNED_FIX),
    "hubert_seq2seq": ("a fine-tuned seq2seq model (hubert_seq2seq)", _FINE_TUNED_FIX),
    "wav2vec_ctc": ("a fine-tuned CTC model (wav2vec_ctc)", _FINE_TUNED_FIX),
    "wav2vec_seq2seq": ("a fine-tuned seq2seq model (wav2vec_seq2seq)", _FINE_TUNED_FIX),
    "thin_hubert": (
        "a distilled student (thin_hubert), not a teacher",
        "use the pre-trained HuBERT / wav2vec 2.0 checkpoint it was distilled from",
    ),
}

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

_HOW_TO_FIX = (
    "point the teacher path to a pre-trained fairseq HuBERT or wav2vec 2.0 checkpoint "
    "(e.g. hubert_base_ls960.pt or wav2vec_small.pt)"
)


class TeacherError(ValueError):
    """A teacher checkpoint or teacher setting that cannot be used; the message says how to fix it."""


def check_layers(teacher: "FrozenTeacher", layer_ids: Iterable[int], key: str) -> List[int]:
    """Validate teacher layer ids requested by config ``key``; returns them as a list."""
    ids = list(layer_ids)
    for layer in ids:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= teacher.num_layers:
            raise TeacherError(
                f"{key}: teacher layer {layer!r} is out of range for {teacher.path}, which has "
                f"{teacher.num_layers} transformer layers; use ids 0 (CNN features after "
                + ("post_extract_proj" if getattr(teacher, "layer0", "projection") == "projection"
                   else "the positional convolution: the first layer's input")
                + f", task.teacher_layer0) to {teacher.num_layers} (last layer)"
            )
    return ids


# -- the eval-only holder -----------------------------------------------------------------------------
class _EvalOnlyHolder(nn.Module):
    """Wraps the fairseq model; ``train()`` keeps it in eval mode whoever calls it.

    A parent that calls ``.train()`` on its children (fairseq's trainer does, every step) would
    otherwise turn dropout and layerdrop back on.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.train(False)

    def train(self, mode: bool = True) -> "_EvalOnlyHolder":
        return super().train(False)


# -- checkpoint validation ----------------------------------------------------------------------------
def _parse_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise TeacherError(f"teacher dtype must be one of 'fp32', 'bf16', 'fp16', not {dtype!r}")


def _checkpoint_cfg(state: Dict[str, Any], path: str):
    """The checkpoint's config (``args`` were converted by the reader); checks the model kind."""
    weights = state.get("model")
    if not isinstance(weights, dict) or not weights:
        raise TeacherError(
            f"teacher checkpoint {path} holds no model weights (no 'model' state dict); it may be a "
            f"stripped or optimizer-only file; {_HOW_TO_FIX}"
        )
    cfg = state.get("cfg")
    if cfg is None or cfg.get("model") is None or cfg.get("task") is None:
        raise TeacherError(
            f"teacher checkpoint {path} has neither a 'cfg' nor an 'args' entry with model and task "
            f"settings, so the architecture is unknown; {_HOW_TO_FIX}"
        )
    name = model_name(cfg)
    if name in _NOT_A_TEACHER:
        what, fix = _NOT_A_TEACHER[name]
        raise TeacherError(f"teacher checkpoint {path} is {what}; {fix}")
    if name not in TEACHER_MODELS:
        raise TeacherError(
            f"{path} holds a {name!r} model; supported teachers are {', '.join(TEACHER_MODELS)} "
            f"pre-trained checkpoints: {_HOW_TO_FIX}"
        )
    layer_type = getattr(cfg.model, "layer_type", "transformer")
    if layer_type != "transformer":
        raise TeacherError(
            f"{path} is a {name} model with layer_type={layer_type!r}; only transformer layers "
            f"are supported as teacher"
        )
    return cfg


def _build_model(cfg, state, path: str) -> nn.Module:
    model = build_encoder(cfg, state["model"], f"teacher checkpoint {path}", TeacherError)
    if getattr(model, "input_quantizer", None) is not None:
        raise TeacherError(f"{path} quantizes its input (quantize_input=True); not supported as teacher")
    return model


class FrozenTeacher:
    """A frozen, eval-only fairseq HuBERT / wav2vec 2.0 model that returns per-layer features.

    Build it with :meth:`from_checkpoint`; keep it as a plain attribute (it is not an ``nn.Module``,
    so it never lands in a ``state_dict``, the optimiser or DDP). Never attach ``teacher.holder``
    (an ``nn.Module``) to a module. For the same reason the trainer's ``.to(device)`` / ``.half()``
    do not reach it: move it with :meth:`to` (inputs on another device are moved to it).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str,
        normalize: bool,
        path: str,
        dtype: torch.dtype = torch.float32,
        cfg: Any = None,
        layer0: str = "projection",
    ):
        self._setup(model, kind=kind, normalize=normalize, path=path, cfg=cfg, dtype=dtype, layer0=layer0,
                    num_layers=len(model.encoder.layers), embed_dim=int(model.encoder.embedding_dim),
                    conv_layers=conv_specs(model))

    def _setup(self, model: nn.Module, *, kind: str, normalize: bool, path: str, cfg: Any, dtype: torch.dtype,
               layer0: str, num_layers: int, embed_dim: int, conv_layers: List[Tuple[int, int, int]]) -> None:
        """What every teacher holds, whichever library built its model; then frozen and cast."""
        self.layer0 = check_layer0(layer0)
        self.holder = _EvalOnlyHolder(model)
        self.kind = kind
        self.normalize = bool(normalize)
        self.path = path
        self.cfg = cfg
        self.num_layers = num_layers
        self.embed_dim = embed_dim
        self.conv_layers = list(conv_layers)
        self.dtype = dtype
        self.device = torch.device("cpu")
        self._freeze()
        self.holder.to(dtype=dtype)

    def _log_loaded(self) -> None:
        logger.info(
            f"teacher {self.path}: {self.kind}, {self.num_layers} layers x {self.embed_dim}, "
            f"{self.samples_per_frame} samples/frame, normalize={self.normalize}, {self.dtype}, "
            f"layer 0 = {self.layer0}"
        )

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls, path: str, dtype: str = "fp32", device: Any = "cpu", layer0: str = "projection"
    ) -> "FrozenTeacher":
        """Load a pre-trained ``hubert`` / ``wav2vec2`` fairseq checkpoint, or a transformers folder
        (``config.json``), as a frozen teacher; ``layer0``: see the module docstring."""
        path = os.fspath(path)
        torch_dtype = _parse_dtype(dtype)
        if is_hf_folder(path):
            return HFTeacher.from_folder(path, torch_dtype, device, layer0)
        state = read_checkpoint(path, f"teacher checkpoint {path}", _HOW_TO_FIX, TeacherError, require_cfg=False)
        cfg = _checkpoint_cfg(state, path)
        apply_model_overrides(cfg, FROZEN_MODEL_FIELDS)
        model = _build_model(cfg, state, path)
        del state
        teacher = cls(
            model,
            kind=cfg.model._name,
            normalize=bool(cfg.task.get("normalize", False)),
            path=path,
            dtype=torch_dtype,
            cfg=cfg,
            layer0=layer0,
        )
        teacher._log_loaded()
        return teacher.to(device)

    def _freeze(self) -> None:
        model = self.model
        model.requires_grad_(False)
        # belt and braces for what the cfg already says (an old cfg may have lacked the keys)
        model.encoder.layerdrop = 0.0
        model.encoder.required_seq_len_multiple = 1
        self.holder.eval()

    def to(self, device: Any) -> "FrozenTeacher":
        device = torch.device(device)
        if device != self.device:  # the criterion calls this every step: moved once
            self.holder.to(device)
            self.device = device
        return self

    # -- properties --------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The fairseq ``HubertModel`` / ``Wav2Vec2Model``."""
        return self.holder.model

    @property
    def samples_per_frame(self) -> int:
        return samples_per_frame(self.conv_layers)

    @property
    def receptive_field(self) -> int:
        """Samples seen by one frame: the shortest input that yields a frame."""
        return receptive_field(self.conv_layers)

    def __repr__(self) -> str:
        return (
            f"FrozenTeacher(kind={self.kind!r}, num_layers={self.num_layers}, embed_dim={self.embed_dim}, "
            f"dtype={self.dtype}, device={self.device}, path={self.path!r})"
        )

    # -- forward -----------------------------------------------------------------------------------
    def hidden_states(
        self, source: Tensor, padding_mask: Optional[Tensor] = None
    ) -> Tuple[List[Tensor], Optional[Tensor]]:
        """Per-layer features of a batch of waveforms.

        Args:
            source: (B, S) float waveform, already normalised by the dataset if ``self.normalize``
            padding_mask: (B, S) bool, True = pad (right padding), or None
        Returns:
            ``[layer0, ..., layerL]``, each (B, T, embed_dim) float32 without grad, and the frame
            padding mask (B, T) bool (None when ``padding_mask`` is None)
        """
        if padding_mask is not None:
            padding_mask = padding_mask.to(self.device)
        host_lengths = self._check_input(source, padding_mask)
        self.holder.eval()  # whoever called train() in between
        # the caller's amp autocast must not change the dtype the teacher was asked to run in
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            x = source.to(device=self.device, dtype=self.dtype)
            states, frame_mask = self._layers(x, padding_mask, host_lengths)
        return [h.float() for h in states], frame_mask

    def _layers(self, x: Tensor, padding_mask: Optional[Tensor], host_lengths: Optional[List[int]]):
        return fairseq_hidden_states(
            self.model, self.conv_layers, x, padding_mask, host_lengths=host_lengths, layer0=self.layer0
        )

    def fairseq_state_dict(self) -> Dict[str, Tensor]:
        """The teacher's weights under fairseq's names (what ``init_from_teacher`` copies from)."""
        return self.model.state_dict()

    def masked_hidden_states(
        self,
        source: Tensor,
        padding_mask: Optional[Tensor],
        mask_indices: Tensor,
        mask_emb: Optional[Tensor] = None,
    ) -> Tuple[List[Tensor], Optional[Tensor]]:
        """:meth:`hidden_states` of the input masked at ``mask_indices`` (masking distillation).

        Args:
            source, padding_mask: as :meth:`hidden_states`
            mask_indices: (B, T) bool at the teacher's frame rate, True = replaced by the mask
                embedding (the positions the student was masked at)
            mask_emb: (embed_dim,) embedding to write there; default the teacher's own
                ``mask_emb`` (a student of another width cannot lend its own)
        Returns: as :meth:`hidden_states`; still frozen, eval-mode and without grad.
        """
        if padding_mask is not None:
            padding_mask = padding_mask.to(self.device)
        host_lengths = self._check_input(source, padding_mask)
        self.holder.eval()
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            x = source.to(device=self.device, dtype=self.dtype)
            states, frame_mask = fairseq_hidden_states(
                self.model, self.conv_layers, x, padding_mask, host_lengths=host_lengths,
                mask_indices=mask_indices.to(self.device),
                mask_emb=None if mask_emb is None else mask_emb.detach(),
            )
        return [h.float() for h in states], frame_mask

    def _check_input(self, source: Tensor, padding_mask: Optional[Tensor]) -> Optional[List[int]]:
        """Shape checks; returns the host copy of the sample lengths (None without padding).

        The host copy is the one device-to-host transfer of a forward, made before any compute
        is queued (on a GPU a later one would wait for the queued work and stall the pipeline).
        """
        if source.dim() != 2:
            raise TeacherError(f"teacher input must be (B, S) waveforms, got shape {tuple(source.shape)}")
        if padding_mask is None:
            host_lengths, shortest = None, source.size(1)
        else:
            if padding_mask.shape != source.shape or padding_mask.dtype != torch.bool:
                raise TeacherError(
                    f"teacher padding_mask must be a bool tensor of shape {tuple(source.shape)}, got "
                    f"{padding_mask.dtype} {tuple(padding_mask.shape)}"
                )
            host_lengths = (~padding_mask).sum(-1).tolist()
            shortest = min(host_lengths) if host_lengths else source.size(1)
        if shortest < self.receptive_field:
            raise TeacherError(
                f"an utterance of {shortest} samples is shorter than the teacher's receptive field "
                f"({self.receptive_field} samples) and yields no frame; filter such utterances "
                f"(dataset min_sample_size)"
            )
        return host_lengths


# -- transformers teachers ----------------------------------------------------------------------------
class HFTeacher(FrozenTeacher):
    """A frozen transformers ``HubertModel`` / ``Wav2Vec2Model`` / ``WavLMModel`` /
    ``Data2VecAudioModel`` from a local folder (``encoders/hf.py``): the same guarantees and interface
    as the fairseq teacher (eval-only holder, frozen, ``no_grad``, no layerdrop, padding-exact, the
    same index convention). ``cfg`` is a fairseq-shaped summary (``model`` / ``task`` sections);
    ``normalize`` comes from the folder's ``preprocessor_config.json`` (``do_normalize``)."""

    def __init__(self, encoder: Any, *, path: str, dtype: torch.dtype = torch.float32, layer0: str = "projection"):
        from omegaconf import OmegaConf

        self.encoder = encoder
        self.normalize_source = encoder.folder.normalize_source
        self._setup(encoder.model, kind=encoder.kind, normalize=encoder.folder.normalize, path=path,
                    cfg=OmegaConf.create(encoder.fairseq_cfg()), dtype=dtype, layer0=layer0,
                    num_layers=encoder.num_layers, embed_dim=encoder.embed_dim, conv_layers=encoder.conv_layers)

    @classmethod
    def from_folder(cls, path: str, dtype: torch.dtype = torch.float32, device: Any = "cpu",
                    layer0: str = "projection") -> "HFTeacher":
        from fairseq_kd.encoders.hf import open_folder

        try:
            encoder = open_folder(path, TeacherError)
        except HFTeacherError as error:
            raise TeacherError(str(error)) from None
        teacher = cls(encoder, path=path, dtype=dtype, layer0=layer0)
        teacher._log_loaded()
        return teacher.to(device)

    def _freeze(self) -> None:
        model = self.model
        model.requires_grad_(False)
        model.config.layerdrop = 0.0  # never used by the layer-by-layer loop; belt and braces
        self.holder.eval()

    def _layers(self, x: Tensor, padding_mask: Optional[Tensor], host_lengths: Optional[List[int]]):
        from fairseq_kd.encoders.hf import hf_hidden_states

        return hf_hidden_states(self.encoder, x, padding_mask, layer0=self.layer0, host_lengths=host_lengths)

    def masked_hidden_states(self, *args, **kwargs):
        raise TeacherError(
            f"masking distillation (a masked teacher pass) is not supported with the transformers "
            f"teacher {self.path}; use a fairseq checkpoint as teacher for it"
        )

    def fairseq_state_dict(self) -> Dict[str, Tensor]:
        """The weights under fairseq's names where fairseq has them (``encoders/hf.py``): WavLM's
        relative position bias and data2vec-audio's positional conv stack have no counterpart."""
        return self.encoder.fairseq_state_dict()


def copies_from_teacher(model_cfg: Any) -> bool:
    """Whether :func:`initialise_student` copies anything for this student config."""
    return bool(model_cfg.init_teacher_cnn or model_cfg.init_teacher_pos_conv or model_cfg.init_teacher_layers)


def initialise_student(student: nn.Module, model_cfg: Any, teacher: FrozenTeacher) -> List[str]:
    """Copy into a freshly built student what its config takes from the teacher
    (``init_teacher_cnn``, ``init_teacher_pos_conv``, ``init_teacher_layers``): the starting point
    of distillation (``distill_hubert``'s ``build_model``) and of the report's update-0 student.
    Returns the names of the tensors copied."""
    return student.init_from_teacher(
        teacher.fairseq_state_dict(),
        teacher.cfg.model,
        init_cnn=model_cfg.init_teacher_cnn,
        init_pos_conv=model_cfg.init_teacher_pos_conv,
        init_layers=model_cfg.init_teacher_layers,
    )


__all__ = ["FrozenTeacher", "HFTeacher", "TeacherError", "check_layers", "copies_from_teacher", "initialise_student"]
