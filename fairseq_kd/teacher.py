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

Index convention (s3prl, DPHuBERT): ``hidden_states[0]`` is the CNN feature after
``layer_norm`` + ``post_extract_proj`` (before ``pos_conv``), ``hidden_states[l]`` is the output
of transformer layer ``l``; for pre-LN (``layer_norm_first``) models the last one also gets
``encoder.layer_norm``, as fairseq's encoder output does.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fairseq_kd.checkpoints import read_fairseq_checkpoint

logger = logging.getLogger(__name__)

TEACHER_MODELS = ("hubert", "wav2vec2")

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

# Model fields that make the forward stochastic or pad it; zeroed (or set to 1) before building.
_FROZEN_MODEL_FIELDS = {
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "dropout_input": 0.0,
    "dropout_features": 0.0,
    "encoder_layerdrop": 0.0,
    "required_seq_len_multiple": 1,
    # fairscale activation checkpointing wraps the layers; useless without backward
    "checkpoint_activations": False,
    "offload_activations": False,
}

_HOW_TO_FIX = (
    "point the teacher path to a pre-trained fairseq HuBERT or wav2vec 2.0 checkpoint "
    "(e.g. hubert_base_ls960.pt or wav2vec_small.pt)"
)


class TeacherError(ValueError):
    """A teacher checkpoint or teacher setting that cannot be used; the message says how to fix it."""


# -- pure frame arithmetic (shared with the student) ------------------------------------------------
def conv_output_lengths(lengths: Tensor, conv_layers: Sequence[Tuple[int, int, int]]) -> Tensor:
    """Frames produced by a stack of unpadded 1-D convs: ``floor((L - k) / s) + 1`` per layer.

    Args:
        lengths: (B,) integer input lengths in samples (or frames of the previous stack)
        conv_layers: ``(dim, kernel, stride)`` per layer, as in ``conv_feature_layers``
    Returns:
        (B,) long, clamped at 0 for inputs shorter than the receptive field
    """
    lengths = lengths.long()
    for _, kernel, stride in conv_layers:
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        lengths = lengths.clamp(min=0)  # 0 frames stay 0 frames in the next layer
    return lengths


def frames_padding_mask(
    padding_mask: Optional[Tensor],
    conv_layers: Sequence[Tuple[int, int, int]],
    num_frames: int,
) -> Optional[Tensor]:
    """Frame padding mask from a sample padding mask, exact for any length.

    A frame is valid iff its whole receptive field lies inside the utterance. fairseq's HuBERT
    instead reshapes the sample mask into ``num_frames`` chunks, which is off for lengths that are
    not a multiple of the hop.

    Args:
        padding_mask: (B, S) bool, True = pad (right padding), or None
        conv_layers: ``(dim, kernel, stride)`` per conv layer
        num_frames: T, the number of frames the conv stack produced for S samples
    Returns:
        (B, T) bool, True = pad, or None when ``padding_mask`` is None
    """
    if padding_mask is None:
        return None
    lengths = conv_output_lengths((~padding_mask).sum(-1), conv_layers)
    frames = torch.arange(num_frames, device=padding_mask.device)
    return frames.unsqueeze(0) >= lengths.unsqueeze(1)


def check_layers(teacher: "FrozenTeacher", layer_ids: Iterable[int], key: str) -> List[int]:
    """Validate teacher layer ids requested by config ``key``; returns them as a list."""
    ids = list(layer_ids)
    for layer in ids:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= teacher.num_layers:
            raise TeacherError(
                f"{key}: teacher layer {layer!r} is out of range for {teacher.path}, which has "
                f"{teacher.num_layers} transformer layers; use ids 0 (CNN features after "
                f"post_extract_proj) to {teacher.num_layers} (last layer)"
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
    name = getattr(cfg.model, "_name", None)
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


def _freeze_cfg(cfg) -> None:
    """Switch off dropout/layerdrop/length padding in the model config before it is built.

    Set directly rather than via ``arg_overrides``: fairseq only overrides keys the stored cfg
    already has, and older checkpoints lack ``required_seq_len_multiple`` (whose default is 2).
    """
    from omegaconf import open_dict

    from fairseq.models import MODEL_DATACLASS_REGISTRY

    known = MODEL_DATACLASS_REGISTRY[cfg.model._name].__dataclass_fields__
    with open_dict(cfg):
        for key, value in _FROZEN_MODEL_FIELDS.items():
            if key in known:
                cfg.model[key] = value


def _task_with_dictionaries(cfg, state: Dict[str, Any], path: str):
    """``setup_task`` + saved task state; HuBERT's label dictionaries never come from disk."""
    from fairseq import tasks
    from fairseq.data.dictionary import Dictionary

    task = tasks.setup_task(cfg.task)
    task.load_state_dict(state.get("task_state") or {})
    if cfg.model._name != "hubert" or "dictionaries" in task.state_dict():
        return task
    # An old checkpoint without task_state: HubertModel only needs the label count, which the
    # label embeddings hold; the task would otherwise read label_dir/dict.*.txt.
    label_embs = state["model"].get("label_embs_concat")
    if label_embs is None:
        dictionaries = [None]  # no label embeddings to load: HubertModel skips them
    elif len(cfg.task.get("labels", [None])) == 1:
        dictionary = Dictionary()
        while len(dictionary) < label_embs.size(0):
            dictionary.add_symbol(str(len(dictionary)))
        dictionaries = [dictionary]
    else:
        raise TeacherError(
            f"teacher checkpoint {path} has several label sets but no task_state dictionaries; "
            f"re-save it from a fairseq-train run"
        )
    task.load_state_dict({"dictionaries": dictionaries})
    return task


def _build_model(cfg, state: Dict[str, Any], path: str) -> nn.Module:
    task = _task_with_dictionaries(cfg, state, path)
    # from_checkpoint=True drops cfg keys this fairseq version does not know (as fairseq's loader)
    if "from_checkpoint" in inspect.getfullargspec(task.build_model).args:
        model = task.build_model(cfg.model, from_checkpoint=True)
    else:
        model = task.build_model(cfg.model)
    try:
        model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    except RuntimeError as error:
        raise TeacherError(
            f"the weights in teacher checkpoint {path} do not fit the model its cfg describes "
            f"({str(error).splitlines()[0]} ...); the file is inconsistent or was edited"
        ) from None
    if hasattr(model, "remove_pretraining_modules"):
        model.remove_pretraining_modules()  # final_proj / quantizer: never used for features
    if getattr(model, "input_quantizer", None) is not None:
        raise TeacherError(f"{path} quantizes its input (quantize_input=True); not supported as teacher")
    return model


def conv_specs(model: nn.Module) -> List[Tuple[int, int, int]]:
    """``(dim, kernel, stride)`` of each CNN layer of a wav2vec 2.0 / HuBERT / thin_hubert model, read
    from its built ``feature_extractor`` (the first module of every block is its Conv1d)."""
    specs = []
    for block in model.feature_extractor.conv_layers:
        conv = block[0]
        specs.append((conv.out_channels, conv.kernel_size[0], conv.stride[0]))
    return specs


def padding_exact_cnn(
    model: nn.Module,
    specs: Sequence[Tuple[int, int, int]],
    source: Tensor,
    lengths: Optional[Tensor],
    padded: Optional[bool] = None,
) -> Tensor:
    """fairseq's CNN with the GroupNorm of the first layer over each row's own frames:
    (B, S) -> (B, C, T). fairseq lets the padded zeros into those statistics, so a padded row would
    differ from the utterance alone.

    ``padded``: whether any row is shorter than S (computed from ``lengths`` if not given).
    """
    x = source.unsqueeze(1)  # (B, 1, S)
    if padded is None:
        padded = lengths is not None and bool((lengths < source.size(1)).any())
    frame_lengths = lengths
    for block, spec in zip(model.feature_extractor.conv_layers, specs):
        if padded:
            frame_lengths = conv_output_lengths(frame_lengths, [spec])
        for module in block:
            if padded and isinstance(module, nn.GroupNorm):
                # per-channel statistics over time must not see the padded frames
                x = _masked_group_norm(x, frame_lengths, module)
            else:
                x = module(x)
    return x


def _masked_group_norm(x: Tensor, lengths: Tensor, norm: nn.GroupNorm) -> Tensor:
    """GroupNorm over each row's first ``lengths`` frames only (fp32, as ``Fp32GroupNorm``).

    Args:
        x: (B, C, T); lengths: (B,) valid frames per row
    """
    bsz, channels, frames = x.shape
    groups = norm.num_groups
    xf = x.float().view(bsz, groups, channels // groups, frames)
    valid = (torch.arange(frames, device=x.device) < lengths.unsqueeze(1)).view(bsz, 1, 1, frames)
    count = (valid.sum(-1, keepdim=True) * (channels // groups)).clamp(min=1)
    mean = (xf * valid).sum((2, 3), keepdim=True) / count
    var = (((xf - mean) * valid) ** 2).sum((2, 3), keepdim=True) / count
    y = ((xf - mean) * torch.rsqrt(var + norm.eps)).view(bsz, channels, frames)
    if norm.affine:
        y = y * norm.weight.float().view(1, -1, 1) + norm.bias.float().view(1, -1, 1)
    return y.type_as(x)


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
    ):
        self.holder = _EvalOnlyHolder(model)
        self.kind = kind
        self.normalize = bool(normalize)
        self.path = path
        self.cfg = cfg
        self.num_layers: int = len(model.encoder.layers)
        self.embed_dim: int = int(model.encoder.embedding_dim)
        self.conv_layers: List[Tuple[int, int, int]] = conv_specs(model)
        self.dtype = dtype
        self.device = torch.device("cpu")
        self._freeze()
        self.holder.to(dtype=dtype)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str, dtype: str = "fp32", device: Any = "cpu") -> "FrozenTeacher":
        """Load a pre-trained ``hubert`` / ``wav2vec2`` fairseq checkpoint as a frozen teacher."""
        path = os.fspath(path)
        torch_dtype = _parse_dtype(dtype)
        state = read_fairseq_checkpoint(path, f"teacher checkpoint {path}", _HOW_TO_FIX, TeacherError, require_cfg=False)
        cfg = _checkpoint_cfg(state, path)
        _freeze_cfg(cfg)
        model = _build_model(cfg, state, path)
        del state
        teacher = cls(
            model,
            kind=cfg.model._name,
            normalize=bool(cfg.task.get("normalize", False)),
            path=path,
            dtype=torch_dtype,
            cfg=cfg,
        )
        logger.info(
            f"teacher {path}: {teacher.kind}, {teacher.num_layers} layers x {teacher.embed_dim}, "
            f"{teacher.samples_per_frame} samples/frame, normalize={teacher.normalize}, {torch_dtype}"
        )
        return teacher.to(device)

    def _freeze(self) -> None:
        model = self.model
        model.requires_grad_(False)
        # belt and braces for what the cfg already says (an old cfg may have lacked the keys)
        model.encoder.layerdrop = 0.0
        model.encoder.required_seq_len_multiple = 1
        self.holder.eval()

    def to(self, device: Any) -> "FrozenTeacher":
        self.device = torch.device(device)
        self.holder.to(self.device)
        return self

    # -- properties --------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The fairseq ``HubertModel`` / ``Wav2Vec2Model``."""
        return self.holder.model

    @property
    def samples_per_frame(self) -> int:
        hop = 1
        for _, _, stride in self.conv_layers:
            hop *= stride
        return hop

    @property
    def receptive_field(self) -> int:
        """Samples seen by one frame: the shortest input that yields a frame."""
        field, hop = 1, 1
        for _, kernel, stride in self.conv_layers:
            field += (kernel - 1) * hop
            hop *= stride
        return field

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
        lengths, host_lengths = self._check_input(source, padding_mask)
        self.holder.eval()  # whoever called train() in between
        # the caller's amp autocast must not change the dtype the teacher was asked to run in
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            x = source.to(device=self.device, dtype=self.dtype)
            # decided from the host copy of the lengths: no GPU sync once the CNN is queued
            padded = bool(host_lengths) and min(host_lengths) < source.size(1)
            features = self.forward_features(x, lengths, padded=padded)  # (B, C, T)
            frame_mask = frames_padding_mask(padding_mask, self.conv_layers, features.size(-1))
            layer0 = self.forward_projection(features)  # (B, T, D)
            has_padding = self._has_padded_frames(host_lengths, features.size(-1))
            layers = self.forward_encoder(layer0, frame_mask, has_padding=has_padding)
        return [h.float() for h in [layer0] + layers], frame_mask

    def _check_input(
        self, source: Tensor, padding_mask: Optional[Tensor]
    ) -> Tuple[Optional[Tensor], Optional[List[int]]]:
        """Shape checks; returns the sample lengths (None without padding) and their host copy.

        The host copy is the one device-to-host transfer of a forward, made before any compute
        is queued (on a GPU a later one would wait for the queued work and stall the pipeline).
        """
        if source.dim() != 2:
            raise TeacherError(f"teacher input must be (B, S) waveforms, got shape {tuple(source.shape)}")
        if padding_mask is None:
            lengths, host_lengths = None, None
            shortest = source.size(1)
        else:
            if padding_mask.shape != source.shape or padding_mask.dtype != torch.bool:
                raise TeacherError(
                    f"teacher padding_mask must be a bool tensor of shape {tuple(source.shape)}, got "
                    f"{padding_mask.dtype} {tuple(padding_mask.shape)}"
                )
            lengths = (~padding_mask).sum(-1)
            host_lengths = lengths.tolist()
            shortest = min(host_lengths) if host_lengths else source.size(1)
        if shortest < self.receptive_field:
            raise TeacherError(
                f"an utterance of {shortest} samples is shorter than the teacher's receptive field "
                f"({self.receptive_field} samples) and yields no frame; filter such utterances "
                f"(dataset min_sample_size)"
            )
        return lengths, host_lengths

    def _has_padded_frames(self, host_lengths: Optional[List[int]], num_frames: int) -> bool:
        """Whether any row has fewer than ``num_frames`` valid frames (host arithmetic only)."""
        if host_lengths is None:
            return False
        for length in host_lengths:
            for _, kernel, stride in self.conv_layers:  # conv_output_lengths, in Python ints
                length = max((length - kernel) // stride + 1, 0)
            if length < num_frames:
                return True
        return False

    def forward_features(self, source: Tensor, lengths: Optional[Tensor], padded: Optional[bool] = None) -> Tensor:
        """The CNN, padding-exact: (B, S) -> (B, C, T).

        ``padded``: whether any row is shorter than S (computed from ``lengths`` if not given).
        """
        return padding_exact_cnn(self.model, self.conv_layers, source, lengths, padded)

    def forward_projection(self, features: Tensor) -> Tensor:
        """(B, C, T) CNN features -> (B, T, D) after ``layer_norm`` and ``post_extract_proj``."""
        x = self.model.layer_norm(features.transpose(1, 2))
        if self.model.post_extract_proj is not None:
            x = self.model.post_extract_proj(x)
        return x

    def forward_encoder(
        self, x: Tensor, frame_mask: Optional[Tensor], has_padding: Optional[bool] = None
    ) -> List[Tensor]:
        """Transformer layers 1..L, each (B, T, D).

        ``has_padding``: whether ``frame_mask`` has any True (computed from it if not given).
        """
        encoder = self.model.encoder
        if has_padding is None:
            has_padding = frame_mask is not None and bool(frame_mask.any())
        # an all-False mask changes nothing but costs the masked attention path
        mask = frame_mask if has_padding else None
        # extract_features zeroes x's padded frames in place, as fairseq's own forward does
        _, layer_results = encoder.extract_features(x, padding_mask=mask)
        if len(layer_results) != self.num_layers:  # would mean layerdrop is on
            raise RuntimeError(f"teacher returned {len(layer_results)} of {self.num_layers} layers")
        layers = [result[0].transpose(0, 1) for result in layer_results]  # (T, B, D) -> (B, T, D)
        if encoder.layer_norm_first:
            layers[-1] = encoder.layer_norm(layers[-1])
        return layers


__all__ = [
    "FrozenTeacher",
    "TeacherError",
    "check_layers",
    "conv_output_lengths",
    "frames_padding_mask",
]
