"""HuggingFace ``transformers`` speech encoders as teachers, and the fairseq <-> transformers weight names.

A teacher folder is what ``save_pretrained`` writes (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``) plus the feature extractor's ``preprocessor_config.json``. Four encoders are
supported, by ``config.json``'s ``model_type``: ``hubert`` (``HubertModel``), ``wav2vec2``
(``Wav2Vec2Model``), ``wavlm`` (``WavLMModel``) and ``data2vec-audio`` (``Data2VecAudioModel``).
Nothing is downloaded: the folder is opened with ``local_files_only=True``.

Everything here is checked before the model is built, with errors naming the file and the key:
an unsupported ``model_type``, a fine-tuned head (``*ForCTC``, ``*ForSequenceClassification``, ...)
named in ``architectures``, adapters, a missing ``preprocessor_config.json`` (its ``do_normalize``
is the teacher's normalisation, checked against ``task.normalize`` by the task), a ``transformers``
older than :data:`MIN_TRANSFORMERS`, weights missing from the folder.

**Index convention** (``hidden_states``, :data:`LAYER0_CHOICES`). Layers ``1..L`` are the outputs of
the transformer layers, the last one after the final encoder LayerNorm for pre-LN
(``do_stable_layer_norm``) models, i.e. the model's output (transformers' own ``hidden_states[-1]``
is taken before that LayerNorm; its ``last_hidden_state`` after it). Layer 0 is selectable:

* ``"projection"`` (default; fairseq_kd's and DPHuBERT's layer 0, what the fairseq teacher gives):
  the CNN feature after the feature projection, before the positional convolution;
* ``"layer_input"`` (transformers' and s3prl's ``hidden_states[0]``, SUPERB's layer 0): the input
  of the first transformer layer, after the positional convolution and, for post-LN models, the
  encoder LayerNorm.

**Padding-exact**, as ``layers.py`` for fairseq models: the group norm of the first conv layer
(``feat_extract_norm="group"``) is computed over each row's own frames (transformers' forward lets
the padded zeros into its statistics and documents that such models should not be given an
attention mask at all), padded frames are zeroed before every positional convolution (data2vec-audio
stacks five: the second one would otherwise see the first one's output on the padded frames) and
are masked out of every attention. The layers are called one by one: no forward hooks, no layerdrop.

**Weight names** (:func:`hf_to_fairseq_name`, :func:`fairseq_to_hf_state_dict`): transformers' HuBERT /
wav2vec 2.0 parameter names against fairseq's (``HubertModel`` / ``Wav2Vec2Model`` and
``thin_hubert``, which uses the same modules), as transformers' own fairseq conversion scripts map
them. Used by the parity test, by students initialised from a transformers teacher and by
``fairseq-kd-export --format hf``.

Imports torch only at module level; ``transformers`` is imported lazily (:func:`require_transformers`),
so the fairseq path never imports it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from fairseq_kd.encoders.frames import conv_output_lengths, frames_padding_mask
from fairseq_kd.encoders.layers import masked_group_norm

logger = logging.getLogger(__name__)

MIN_TRANSFORMERS = (4, 46)  # WavLM / data2vec-audio layer signatures as used here; tested with 5.24.0
INSTALL_HINT = "pip install -e '.[hf]' (or pip install 'fairseq_kd[hf]'), which installs transformers and safetensors"
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"

LAYER0_CHOICES = ("projection", "layer_input")
LAYER0_HELP = (
    "projection: the CNN feature after the feature projection, before the positional convolution "
    "(fairseq_kd's and DPHuBERT's layer 0); layer_input: the first transformer layer's input, after "
    "the positional convolution (and the encoder LayerNorm of post-LN models), transformers' and "
    "s3prl's hidden_states[0], SUPERB's layer 0"
)

# model_type -> (model class name in transformers, family)
SUPPORTED = {
    "hubert": ("HubertModel", "wav2vec2"),
    "wav2vec2": ("Wav2Vec2Model", "wav2vec2"),
    "wavlm": ("WavLMModel", "wavlm"),
    "data2vec-audio": ("Data2VecAudioModel", "data2vec"),
}
# what people point at by mistake: model_types of other speech models
_OTHER_SPEECH = {
    "wav2vec2-conformer": "a wav2vec 2.0 Conformer (conformer layers have no thin_hubert counterpart)",
    "unispeech": "a UniSpeech model",
    "unispeech-sat": "a UniSpeech-SAT model",
    "sew": "a SEW model (squeezed frame rate)",
    "sew-d": "a SEW-D model (squeezed frame rate)",
    "whisper": "a Whisper model (log-mel input, encoder-decoder)",
    "wav2vec2-bert": "a Wav2Vec2-BERT model (mel input)",
}
_HEAD_SUFFIXES = (
    "ForCTC", "ForSequenceClassification", "ForAudioFrameClassification", "ForXVector",
    "ForSpeechToText", "ForMaskedLM",
)


class HFTeacherError(ValueError):
    """A transformers folder or setting that cannot be used as a teacher; the message says why."""


def _hide_unloadable_torchaudio() -> None:
    """fairseq 0.12.2's metadata pulls a torchaudio wheel that cannot load with a CPU torch here
    (README, Install facts); transformers imports torchaudio whenever it is found, so a broken one
    would stop every speech model. Mark it absent (as if not installed) when it cannot be imported."""
    import importlib.util
    import sys

    if "torchaudio" in sys.modules or importlib.util.find_spec("torchaudio") is None:
        return
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        for name in [n for n in sys.modules if n == "torchaudio" or n.startswith("torchaudio.")]:
            del sys.modules[name]
        sys.modules["torchaudio"] = None  # find_spec -> None, import -> ImportError


def require_transformers(what: str = "a transformers teacher folder"):
    """``transformers`` imported, or an ImportError that names the extra to install."""
    _hide_unloadable_torchaudio()
    try:
        import transformers
    except ImportError:
        raise ImportError(
            f"{what} needs the optional 'hf' extra, which is not installed: {INSTALL_HINT}"
        ) from None
    found = tuple(int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])
    if found < MIN_TRANSFORMERS:
        need = ".".join(map(str, MIN_TRANSFORMERS))
        raise ImportError(
            f"{what} needs transformers >= {need}, but transformers {transformers.__version__} is "
            f"installed ({transformers.__file__}); upgrade it: pip install 'transformers>={need}' "
            f"(or {INSTALL_HINT})"
        )
    return transformers


def is_hf_folder(path: str) -> bool:
    """Whether ``path`` is a folder with a ``config.json`` (a transformers model)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def check_layer0(layer0: str, key: str = "layer0") -> str:
    if layer0 not in LAYER0_CHOICES:
        raise ValueError(f"{key}={layer0!r}: must be one of {', '.join(LAYER0_CHOICES)} ({LAYER0_HELP})")
    return layer0


# -- reading and checking the folder ---------------------------------------------------------------
def _read_json(path: str, error: Type[Exception]) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} cannot be read as JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, not an object of settings")
    return data


@dataclass
class HFFolder:
    """What a teacher folder says, checked."""

    path: str
    model_type: str
    class_name: str
    family: str  # "wav2vec2" (HuBERT and wav2vec 2.0), "wavlm" or "data2vec"
    config: Dict[str, Any]
    normalize: bool
    sample_rate: int
    normalize_source: str = field(default="")


def read_folder(path: str, error: Type[Exception] = HFTeacherError) -> HFFolder:
    """Check ``config.json`` and ``preprocessor_config.json`` of a transformers folder."""
    path = os.fspath(path)
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise error(f"{path} is not a transformers model folder: it has no {CONFIG_FILE}")
    config = _read_json(config_path, error)
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    heads = [a for a in architectures if isinstance(a, str) and a.endswith(_HEAD_SUFFIXES)]
    if heads:
        raise error(
            f"{config_path}: architectures={heads} is a fine-tuned model with a task head (CTC or "
            f"classification), not a self-supervised encoder; its upper layers are tuned to that "
            f"task. A teacher must be the pre-trained model it was fine-tuned from (e.g. "
            f"facebook/hubert-base-ls960 rather than facebook/hubert-large-ls960-ft, "
            f"microsoft/wavlm-base-plus rather than a *-sv / *-sd model)"
        )
    if model_type not in SUPPORTED:
        what = _OTHER_SPEECH.get(model_type, f"a {model_type!r} model")
        raise error(
            f"{config_path}: model_type={model_type!r} ({what}) is not supported as a teacher; "
            f"supported model_type values: {', '.join(SUPPORTED)}"
        )
    class_name, family = SUPPORTED[model_type]
    for key in ("add_adapter",):
        if config.get(key):
            raise error(f"{config_path}: {key}={config[key]!r} (an adapter after the encoder) is not supported as a teacher")
    if config.get("adapter_attn_dim") not in (None, 0):
        raise error(f"{config_path}: adapter_attn_dim={config['adapter_attn_dim']!r} (per-layer adapters) is not supported as a teacher")
    if config.get("conv_pos_batch_norm"):
        raise error(f"{config_path}: conv_pos_batch_norm=true is not supported as a teacher")
    norm = config.get("feat_extract_norm", "layer" if family == "data2vec" else "group")
    if norm not in ("group", "layer"):
        raise error(f"{config_path}: feat_extract_norm={norm!r}; expected 'group' or 'layer'")

    pre_path = os.path.join(path, PREPROCESSOR_FILE)
    if not os.path.isfile(pre_path):
        raise error(
            f"{path} has no {PREPROCESSOR_FILE}, so the teacher's input normalisation (do_normalize) "
            f"is unknown; copy it from where the model came from, or write one, e.g. "
            f'{{"feature_extractor_type": "Wav2Vec2FeatureExtractor", "do_normalize": false, '
            f'"sampling_rate": 16000}} (false for HuBERT Base / WavLM Base(+) / wav2vec 2.0 Base, '
            f"true for the Large models and data2vec)"
        )
    pre = _read_json(pre_path, error)
    if "do_normalize" not in pre or not isinstance(pre["do_normalize"], bool):
        raise error(f"{pre_path}: key do_normalize is missing or not true/false (found {pre.get('do_normalize')!r})")
    rate = pre.get("sampling_rate", 16000)
    if not isinstance(rate, int) or rate <= 0:
        raise error(f"{pre_path}: key sampling_rate={rate!r} is not a positive integer")
    return HFFolder(path, model_type, class_name, family, config, bool(pre["do_normalize"]), int(rate),
                    normalize_source=f"{pre_path}: do_normalize")


# -- building the model ----------------------------------------------------------------------------
@dataclass
class HFEncoder:
    """A loaded transformers encoder and the facts the teacher needs."""

    model: nn.Module
    folder: HFFolder
    conv_layers: List[Tuple[int, int, int]]
    num_layers: int
    embed_dim: int
    layer_norm_first: bool

    @property
    def kind(self) -> str:
        return f"transformers {self.folder.class_name}"

    def fairseq_cfg(self) -> Dict[str, Any]:
        """A fairseq-shaped description (``model`` / ``task`` sections) for code that reads
        ``teacher.cfg`` (sample rate, normalisation, layer count, LN placement)."""
        c = self.folder.config
        return {
            "model": {
                "_name": f"hf_{self.folder.model_type}",
                "encoder_layers": self.num_layers,
                "encoder_embed_dim": self.embed_dim,
                "encoder_ffn_embed_dim": c.get("intermediate_size"),
                "encoder_attention_heads": c.get("num_attention_heads"),
                "layer_norm_first": self.layer_norm_first,
                "extractor_mode": "default" if _feat_norm(c, self.folder.family) == "group" else "layer_norm",
                "conv_feature_layers": str([tuple(s) for s in self.conv_layers]),
            },
            "task": {"sample_rate": self.folder.sample_rate, "normalize": self.folder.normalize},
        }

    def fairseq_state_dict(self) -> Dict[str, Tensor]:
        """The weights under fairseq's names (what ``thin_hubert.init_from_teacher`` reads); see
        :func:`hf_to_fairseq_state_dict`."""
        state = self.model.state_dict()
        left_out = [k for k in state if WAVLM_ONLY.match(k) or k.startswith("encoder.pos_conv_embed.layers.")]
        if left_out:
            logger.warning(
                f"{self.folder.path}: {len(left_out)} {self.folder.class_name} tensors have no thin_hubert "
                f"counterpart and are never copied into a student (e.g. {left_out[0]}: "
                + ("WavLM's gated relative position bias; copied layers start without it)" if self.folder.family == "wavlm"
                   else "data2vec-audio's stack of positional convolutions; use model.init_teacher_pos_conv=false)")
            )
        return hf_to_fairseq_state_dict(state, _feat_norm(self.folder.config, self.folder.family))


def _feat_norm(config: Mapping[str, Any], family: str) -> str:
    return config.get("feat_extract_norm", "layer" if family == "data2vec" else "group")


def load_encoder(folder: HFFolder, error: Type[Exception] = HFTeacherError) -> HFEncoder:
    """Build the folder's encoder in float32, eval mode, dropouts and layerdrop off, weights checked."""
    transformers = require_transformers(f"the teacher folder {folder.path}")
    cls = getattr(transformers, folder.class_name)
    overrides = dict(
        layerdrop=0.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, mask_time_prob=0.0, mask_feature_prob=0.0,
    )
    try:
        config = cls.config_class.from_pretrained(folder.path, local_files_only=True)
        for key, value in overrides.items():
            if hasattr(config, key):
                setattr(config, key, value)
        # torch's SDPA where transformers has it for the model (WavLM: eager, its own attention)
        attn = "eager" if folder.family == "wavlm" else "sdpa"
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its load report; missing weights are checked below
        bar = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        try:
            model, info = cls.from_pretrained(
                folder.path, config=config, local_files_only=True, output_loading_info=True, attn_implementation=attn
            )
        finally:
            transformers.logging.set_verbosity(verbosity)
            if bar:
                transformers.utils.logging.enable_progress_bar()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise error(
            f"{folder.path}: transformers' {folder.class_name}.from_pretrained failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); the folder needs {CONFIG_FILE} "
            f"and the weights (model.safetensors or pytorch_model.bin) written by save_pretrained"
        ) from None
    missing = [k for k in info.get("missing_keys", []) if "masked_spec_embed" not in k]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise error(
            f"{folder.path}: the weights do not fill the model {CONFIG_FILE} describes ("
            + (f"{len(missing)} missing, e.g. {sorted(missing)[:3]}" if missing else "")
            + (f"; {len(mismatched)} of another shape, e.g. {mismatched[:2]}" if mismatched else "")
            + "): transformers would initialise them at random; the folder mixes two models or was edited"
        )
    model = model.float().eval()
    config = model.config
    conv_layers = [(int(d), int(k), int(s)) for d, k, s in zip(config.conv_dim, config.conv_kernel, config.conv_stride)]
    return HFEncoder(
        model=model,
        folder=folder,
        conv_layers=conv_layers,
        num_layers=len(model.encoder.layers),
        embed_dim=int(config.hidden_size),
        layer_norm_first=bool(getattr(config, "do_stable_layer_norm", False)),
    )


def open_folder(path: str, error: Type[Exception] = HFTeacherError) -> HFEncoder:
    return load_encoder(read_folder(path, error), error)


# -- hidden states ---------------------------------------------------------------------------------
def _padding_exact_cnn(model: nn.Module, source: Tensor, lengths: Optional[Tensor], padded: bool) -> Tensor:
    """transformers' feature encoder with the first layer's GroupNorm over each row's own frames:
    (B, S) -> (B, C, T)."""
    x = source.unsqueeze(1)
    frame_lengths = lengths
    for layer in model.feature_extractor.conv_layers:
        conv, norm = layer.conv, getattr(layer, "layer_norm", None)
        if padded:
            frame_lengths = conv_output_lengths(frame_lengths, [(conv.out_channels, conv.kernel_size[0], conv.stride[0])])
        if padded and isinstance(norm, nn.GroupNorm):
            # per-channel statistics over time must not see the padded frames
            x = layer.activation(masked_group_norm(conv(x), frame_lengths, norm))
        else:
            x = layer(x)
    return x


def _positional(encoder: nn.Module, x: Tensor, frame_mask: Optional[Tensor]) -> Tensor:
    """The positional convolution(s) of (B, T, D) with padded frames zeroed before each one."""
    pos = encoder.pos_conv_embed
    layers = getattr(pos, "layers", None)
    if layers is None:  # one convolution (HuBERT, wav2vec 2.0, WavLM)
        return pos(x)
    h = x.transpose(1, 2)  # data2vec-audio: a stack of conv + LayerNorm + GELU
    keep = None if frame_mask is None else (~frame_mask).unsqueeze(1).to(h.dtype)
    for i, layer in enumerate(layers):
        if i > 0 and keep is not None:
            h = h * keep
        h = layer(h)
    return h.transpose(1, 2)


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def hf_hidden_states(
    encoder: HFEncoder,
    source: Tensor,
    padding_mask: Optional[Tensor],
    *,
    layer0: str = "projection",
    host_lengths: Optional[Sequence[int]] = None,
) -> Tuple[List[Tensor], Optional[Tensor]]:
    """``[layer 0, layer 1, ..., layer L]`` of a transformers encoder (the convention: module docstring).

    Args:
        source: (B, S) waveform; padding_mask: (B, S) bool, True = pad (right padding), or None
        layer0: one of :data:`LAYER0_CHOICES`
        host_lengths: the rows' sample lengths as Python ints, if the caller has them
    Returns:
        the hidden states, each (B, T, D), and the frame padding mask (B, T) (None without mask)
    """
    model, family = encoder.model, encoder.folder.family
    specs = encoder.conv_layers
    lengths = (~padding_mask).sum(-1) if padding_mask is not None else None
    if host_lengths is not None:
        padded = bool(host_lengths) and min(host_lengths) < source.size(1)
    else:
        padded = lengths is not None and bool((lengths < source.size(1)).any())
    features = _padding_exact_cnn(model, source, lengths, padded)  # (B, C, T)
    num_frames = features.size(-1)
    frame_mask = frames_padding_mask(padding_mask, specs, num_frames)
    any_padding = padded and frame_mask is not None and bool(frame_mask.any())
    x = _first(model.feature_projection(features.transpose(1, 2)))  # (B, T, D)
    enc = model.encoder
    if any_padding:  # padded frames are zero in layer 0, as in fairseq's encoder
        x = x.masked_fill(frame_mask.unsqueeze(-1), 0.0)
    projected = x
    x = x + _positional(enc, x, frame_mask if any_padding else None)
    if not encoder.layer_norm_first:
        x = enc.layer_norm(x)
    layer_input = x
    states: List[Tensor] = []
    if family == "wavlm":
        # WavLM's attention takes the 2-D mask (1 = keep) and returns the relative position bias
        # that layer 0 computes for the layers after it
        mask2d = (~frame_mask).long() if any_padding else None
        bias = None
        for i, layer in enumerate(enc.layers):
            kwargs = {} if encoder.layer_norm_first else {"index": i}
            out = layer(x, attention_mask=mask2d, position_bias=bias, **kwargs)
            x, bias = out[0], out[1]
            states.append(x)
    else:
        additive = None
        if any_padding:  # (B, 1, 1, T): padded keys get the dtype's minimum, as transformers' masks
            additive = torch.zeros(frame_mask.shape, dtype=x.dtype, device=x.device)
            additive = additive.masked_fill(frame_mask, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in enc.layers:
            x = _first(layer(x, attention_mask=additive))
            states.append(x)
    if encoder.layer_norm_first:
        states[-1] = enc.layer_norm(states[-1])
    first = projected if layer0 == "projection" else layer_input
    return [first] + states, frame_mask


# -- fairseq <-> transformers weight names ---------------------------------------------------------
_LAYER_NAMES = [  # transformers' encoder.layers.<i>.X <-> fairseq's encoder.layers.<i>.Y
    ("attention.k_proj.", "self_attn.k_proj."),
    ("attention.v_proj.", "self_attn.v_proj."),
    ("attention.q_proj.", "self_attn.q_proj."),
    ("attention.out_proj.", "self_attn.out_proj."),
    ("layer_norm.", "self_attn_layer_norm."),
    ("feed_forward.intermediate_dense.", "fc1."),
    ("feed_forward.output_dense.", "fc2."),
    ("final_layer_norm.", "final_layer_norm."),
]
# weight norm as named by torch's parametrizations API (transformers >= 4.3x) or the old hook
_WEIGHT_NORM = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v",
                "weight_g": "weight_g", "weight_v": "weight_v"}
# WavLM-only parameters (gated relative position bias): no fairseq / thin_hubert counterpart
WAVLM_ONLY = re.compile(r"^encoder\.layers\.\d+\.attention\.(gru_rel_pos_const|gru_rel_pos_linear\.|rel_attn_embed\.)")


def hf_to_fairseq_name(name: str, feat_norm: str = "group") -> Optional[str]:
    """fairseq's name for a transformers HuBERT / wav2vec 2.0 / WavLM / data2vec-audio parameter
    (None when fairseq has none: WavLM's relative position bias, data2vec's positional conv stack,
    pre-training heads)."""
    m = re.match(r"^feature_extractor\.conv_layers\.(\d+)\.(conv|layer_norm)\.(weight|bias)$", name)
    if m:
        i, part, kind = m.groups()
        if part == "conv":
            return f"feature_extractor.conv_layers.{i}.0.{kind}"
        return f"feature_extractor.conv_layers.{i}.2.{kind}" if feat_norm == "group" else f"feature_extractor.conv_layers.{i}.2.1.{kind}"
    if name.startswith("feature_projection.layer_norm."):
        return "layer_norm." + name.rsplit(".", 1)[1]
    if name.startswith("feature_projection.projection."):
        return "post_extract_proj." + name.rsplit(".", 1)[1]
    if name == "masked_spec_embed":
        return "mask_emb"
    m = re.match(r"^encoder\.pos_conv_embed\.conv\.(.+)$", name)
    if m:
        rest = m.group(1)
        if rest == "bias":
            return "encoder.pos_conv.0.bias"
        return f"encoder.pos_conv.0.{_WEIGHT_NORM[rest]}" if rest in _WEIGHT_NORM else None
    if name.startswith("encoder.layer_norm."):
        return name
    m = re.match(r"^encoder\.layers\.(\d+)\.(.+)$", name)
    if m:
        i, rest = m.groups()
        for hf, fs in _LAYER_NAMES:
            if rest.startswith(hf):
                return f"encoder.layers.{i}.{fs}{rest[len(hf):]}"
    return None


def hf_to_fairseq_state_dict(state: Mapping[str, Tensor], feat_norm: str) -> Dict[str, Tensor]:
    """A transformers encoder's weights under fairseq's names (``feat_norm``: its config's
    ``feat_extract_norm``); parameters without a fairseq counterpart (WavLM's relative position
    bias, data2vec-audio's positional conv stack) are left out."""
    out: Dict[str, Tensor] = {}
    for name, tensor in state.items():
        target = hf_to_fairseq_name(name, feat_norm)
        if target is not None:
            out[target] = tensor
    return out


def fairseq_to_hf_state_dict(
    fairseq_state: Mapping[str, Tensor], hf_names: Sequence[str], feat_norm: str
) -> Tuple[Dict[str, Tensor], List[str], List[str]]:
    """fairseq weights under the names of a transformers model whose state dict has ``hf_names``.

    Returns ``(weights, unmapped_fairseq, unfilled_hf)``: the fairseq tensors no transformers name
    maps to, and the transformers names no fairseq tensor fills. A fairseq model whose CNN is as
    wide as its encoder has no ``post_extract_proj``; transformers' HuBERT always projects, so it
    gets the identity.
    """
    if "post_extract_proj.weight" not in fairseq_state and "layer_norm.weight" in fairseq_state:
        dim = fairseq_state["layer_norm.weight"].shape[0]
        like = fairseq_state["layer_norm.weight"]
        fairseq_state = {**fairseq_state, "post_extract_proj.weight": torch.eye(dim, dtype=like.dtype),
                         "post_extract_proj.bias": torch.zeros(dim, dtype=like.dtype)}
    mapped: Dict[str, str] = {}
    for hf in hf_names:
        fs = hf_to_fairseq_name(hf, feat_norm)
        if fs is not None:
            mapped[fs] = hf
    weights, unmapped = {}, []
    for name, tensor in fairseq_state.items():
        target = mapped.get(name) or mapped.get(_alias(name))
        if target is None:
            unmapped.append(name)
        else:
            weights[target] = tensor
    unfilled = [n for n in hf_names if n not in weights]
    return weights, unmapped, unfilled


def _alias(name: str) -> str:
    """``...parametrizations.weight.original0/1`` -> ``...weight_g/v`` (fairseq's own spelling)."""
    for long, short in _WEIGHT_NORM.items():
        if name.endswith("." + long):
            return name[: -len(long)] + short
    return name


_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_accurate": "gelu_new", "gelu_fast": "gelu_new"}


def hubert_config_kwargs(model_cfg: Mapping[str, Any], conv_layers: Sequence[Tuple[int, int, int]]) -> Dict[str, Any]:
    """``transformers.HubertConfig`` arguments for a fairseq HuBERT / thin_hubert model config
    (encoder_* fields, extractor_mode, conv_bias, conv_pos(_groups), layer_norm_first, activation_fn).
    Dropouts, layerdrop and masking are 0: the folder is for inference and feature extraction."""
    act = str(model_cfg.get("activation_fn", "gelu"))
    if act not in _ACTIVATIONS:
        raise ValueError(f"activation_fn={act!r} has no transformers counterpart (supported: {', '.join(_ACTIVATIONS)})")
    return dict(
        hidden_size=int(model_cfg["encoder_embed_dim"]),
        num_hidden_layers=int(model_cfg["encoder_layers"]),
        num_attention_heads=int(model_cfg["encoder_attention_heads"]),
        intermediate_size=int(model_cfg["encoder_ffn_embed_dim"]),
        hidden_act=_ACTIVATIONS[act],
        conv_dim=[int(d) for d, _, _ in conv_layers],
        conv_kernel=[int(k) for _, k, _ in conv_layers],
        conv_stride=[int(s) for _, _, s in conv_layers],
        num_feat_extract_layers=len(conv_layers),
        conv_bias=bool(model_cfg.get("conv_bias", False)),
        feat_extract_norm="group" if model_cfg.get("extractor_mode", "default") == "default" else "layer",
        feat_extract_activation="gelu",
        num_conv_pos_embeddings=int(model_cfg.get("conv_pos", 128)),
        num_conv_pos_embedding_groups=int(model_cfg.get("conv_pos_groups", 16)),
        do_stable_layer_norm=bool(model_cfg.get("layer_norm_first", False)),
        feat_proj_layer_norm=True,
        layer_norm_eps=1e-5,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0,
    )


__all__ = [
    "HFEncoder",
    "HFFolder",
    "HFTeacherError",
    "LAYER0_CHOICES",
    "LAYER0_HELP",
    "MIN_TRANSFORMERS",
    "SUPPORTED",
    "WAVLM_ONLY",
    "check_layer0",
    "fairseq_to_hf_state_dict",
    "hf_hidden_states",
    "hf_to_fairseq_name",
    "hf_to_fairseq_state_dict",
    "hubert_config_kwargs",
    "is_hf_folder",
    "load_encoder",
    "open_folder",
    "read_folder",
    "require_transformers",
]
