# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Standalone student files: a ``torch.export`` program that runs with torch alone.

The program is the student's inference path (CNN, projection, positional convolution, time
reduction, transformer layers; no masking, no dropout; the distillation heads only with
``outputs="heads"``, below) traced by
``torch.export`` with a dynamic batch size and a dynamic number of samples, and saved by
``torch.export.save`` with a JSON description (sample rate, normalisation, downsample rate,
layer count and width, the student config, the source checkpoint) as an extra file. Loading it
needs neither fairseq, hydra, omegaconf nor this package: see ``fairseq_kd/s3prl_upstream/runtime.py``.

Signature: ``(wavs (B, S) float32, lengths (B,) int64) -> (hidden_states (L + 1, B, T, D),
frame_lengths (B,) int64)``. Rows are right-padded; ``lengths`` are the valid samples of each row
(at least one CNN receptive field, 400 samples with HuBERT's CNN). A padded row gives the same
frames as the row would alone, except through the group-norm CNN of ``extractor_mode=default``
(HuBERT Base's), which normalises over the padded samples too, exactly as the original model
does when given the same padded batch. Frames beyond ``frame_lengths`` are zero.

What ``hidden_states`` holds (``outputs`` in the metadata, ``fairseq-kd-export --outputs``), as each
paper feeds SUPERB:

- ``layers``: the student's own hidden states, the CNN/projection output then every transformer
  layer (``L + 1`` of width D). STaRHuBERT (no heads), DistilHuBERT (its prediction heads are
  dropped), fine-tuned students.
- ``heads``: the distillation heads' outputs, one per teacher-layer target in teacher-layer order
  (``N`` of the teacher's width; ``head_teacher_layers`` in the metadata names the teacher layer(s)
  each one learnt): ARMHuBERT / MaskHuBERT feed SUPERB their 12 projection-head outputs. The heads
  are computed by ``ThinHubertModel.forward`` itself (:func:`head_outputs`).

The default (:func:`default_outputs`) follows the student's config: ``heads`` for a
masking-distillation student (``criterion=masked_hint``) with a hint head on every transformer layer
learning the teacher layer of the same depth (ARMHuBERT's / MaskHuBERT's 12 <-> 12), ``layers``
otherwise.

Rate policy for time-reduced students (``time_reduction_factor`` r > 1): **every hidden state is
returned at the CNN rate** (320 samples per frame with HuBERT's CNN): a layer after the reduction
is up-sampled with ``repeat_interleave(r)`` (each reduced frame repeated r times, no new values)
and cut to the CNN length, and ``downsample_rate`` reports the CNN stride. Why not the honest
alternative of declaring 640 and returning only the reduced layers:

- SUPERB's weighted sum is over *all* hidden states, and the CNN/projection output (layer 0) and
  any layers before ``time_reduction_layer`` only exist at the CNN rate; dropping or pooling them
  would change what the featurizer can learn from. Up-sampling keeps every layer, unchanged.
- It is s3prl's own precedent for mixed-rate models (``multires_hubert`` repeats lower-rate
  layers and reports 320), and the rate FitHuBERT's published SUPERB numbers were run at.
- s3prl's downstream recipes assume 20 ms frames: PR's config (``downstream/ctc/libriphone.yaml``)
  has ``total_rate: 320`` and ``asr/model.py`` derives ``round(total_rate / upstream_rate)``, which
  is 0 at 640; CTC for PR/ASR/SF needs enough frames per label (25 Hz is short for fast
  speech); SD takes its label frame shift from the rate. At 320 every task runs unchanged and
  stays comparable with the HuBERT-family rows of the leaderboard.

The cost is downstream compute on repeated frames; the values at the reduced rate are recovered
exactly as ``hidden_states[l][:, ::r]``. ``native_downsample_rates`` in the metadata records each
layer's own rate. Head outputs follow the same policy: a ``convt_linear`` head already up-samples to
the CNN rate, a ``linear`` head on a reduced layer (and a prediction head on a reduced last layer)
is repeated like its layer.
"""

import datetime
import hashlib
import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fairseq_kd.encoders.frames import receptive_field, reduced_lengths, repeat_frames, samples_per_frame
from fairseq_kd.criterions.layer_distill import DistillTarget
from fairseq_kd.export.checkpoints import ExportInputError, LoadedStudent
from fairseq_kd.models.thin_hubert import ThinHubertModel
from fairseq_kd.s3prl_upstream.runtime import FORMAT, FORMAT_VERSION, META_NAME

PARITY_TOLERANCE = 1e-4  # max abs difference accepted between the program and the model (fp32)
LAYERS, HEADS = "layers", "heads"
OUTPUT_CHOICES = (LAYERS, HEADS)
PROBE_SAMPLES = 16000  # a probe input long enough for >= 2 frames after any time reduction


class SdpaSelfAttention(nn.Module):
    """fairseq's ``MultiheadAttention`` (self-attention, no bias_k/v, no zero attention) as one
    ``scaled_dot_product_attention`` call, sharing its projection modules.

    torch's ``multi_head_attention_forward``, which fairseq calls, makes torch.export
    specialise on a batch of one and on single-frame sequences; this computes the same function
    (the parity check at export time holds the two to 1e-4).
    """

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.q_proj, self.k_proj = attention.q_proj, attention.k_proj
        self.v_proj, self.out_proj = attention.v_proj, attention.out_proj
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim

    @staticmethod
    def replaceable(attention: nn.Module) -> bool:
        from fairseq.modules import MultiheadAttention

        return (
            type(attention) is MultiheadAttention
            and attention.self_attention
            and attention.bias_k is None
            and not attention.add_zero_attn
        )

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=False,
                attn_mask=None, **kwargs):
        # query: (T, B, C); key_padding_mask: (B, T), True = pad
        if attn_mask is not None:
            raise ValueError("SdpaSelfAttention: attn_mask is not supported (the student uses none)")
        tsz, bsz, dim = query.shape
        # (B, T, C) copied to a contiguous layout whatever the layer passed (a transposed view
        # after post-LN, a fresh tensor after pre-LN): a Linear on a non-contiguous input makes
        # torch.export specialise on B != 1
        x = query.transpose(0, 1).clone(memory_format=torch.contiguous_format)

        def split_heads(y: torch.Tensor) -> torch.Tensor:
            # (B, T, C) -> (B, H, T, head_dim)
            return y.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

        q, k, v = (split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        allowed = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        # (B, H, T, head_dim) -> (B, T, C) -> (T, B, C) as fairseq returns it
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        return out.transpose(0, 1), None


class StudentEncoder(nn.Module):
    """The student's inference path with the standalone signature (see the module docstring).

    Built on a copy of the student (rebuilt from its config and weights: a weight-normed module
    cannot be deep-copied), prepared for tracing without changing its function:
    weight norm of the positional convolution folded into a plain weight (torch.export would
    see an attribute assigned by a hook), ``required_seq_len_multiple`` set to 1 (its padding
    is masked and cut off again, so it never changes the outputs), fairseq's attention computed
    by :class:`SdpaSelfAttention`.

    ``heads`` (the student's head targets, teacher-layer order): return those head outputs instead
    of the hidden states; the student must have its heads.
    """

    def __init__(self, student: ThinHubertModel, heads: Optional[Sequence[DistillTarget]] = None) -> None:
        super().__init__()
        model = type(student)(student.cfg)
        self.heads = list(heads or [])
        if not self.heads:
            model.remove_pretraining_modules()
        model.load_state_dict(student.state_dict(), strict=True)  # dropped heads' keys are ignorable
        model.eval()
        pos_conv = model.encoder.pos_conv[0]
        if hasattr(pos_conv, "weight_g"):
            torch.nn.utils.remove_weight_norm(pos_conv)
        elif hasattr(pos_conv, "parametrizations"):
            torch.nn.utils.parametrize.remove_parametrizations(pos_conv, "weight")
        model.encoder.required_seq_len_multiple = 1
        for layer in model.encoder.layers:
            if SdpaSelfAttention.replaceable(getattr(layer, "self_attn", None)):
                layer.self_attn = SdpaSelfAttention(layer.self_attn)
        self.model = model
        self.factor = int(model.cfg.time_reduction_factor)
        # each output's rate as a multiple of the CNN stride: repeated that often back to the CNN rate
        self.factors = output_factors(model, self.heads or None)
        # spare all-padding frames after the CNN output: every layer keeps >= 2 frames, so the
        # traced graph never meets a length-1 sequence (which torch.export would specialise)
        self.spare_frames = self.factor

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        # wavs: (B, S), lengths: (B,) valid samples
        features = model.feature_extractor(wavs).transpose(1, 2)
        features = model.layer_norm(features)
        # features: (B, T, C); frame_lengths: (B,) valid CNN frames (wav2vec2's exact rule)
        frame_lengths = model.get_feat_extract_output_lengths(lengths)
        num_frames = features.size(1)
        if model.post_extract_proj is not None:
            features = model.post_extract_proj(features)
        # x: (B, T + spare, D); padding_mask: (B, T + spare), True = pad
        x = F.pad(features, (0, 0, 0, self.spare_frames))
        frames = torch.arange(x.size(1), device=x.device)
        padding_mask = frames.unsqueeze(0) >= frame_lengths.unsqueeze(1)
        layers, _ = model.encoder(x, padding_mask)
        selected = [x] + layers
        if self.heads:
            # contiguous copies: a head's Linear on a transposed view makes torch.export
            # specialise on B != 1 (as in SdpaSelfAttention)
            selected = [h.clone(memory_format=torch.contiguous_format) for h in selected]
            computed = head_outputs(model, {"x": selected[-1], "hidden_states": selected})
            selected = [computed[target.kind][target.key] for target in self.heads]
        outputs = [repeat_frames(hidden, factor, num_frames) for hidden, factor in zip(selected, self.factors)]
        # hidden_states: (L + 1, B, T, D) or (N heads, B, T, teacher D), zero beyond each row's frames
        hidden_states = torch.stack(outputs)
        hidden_states = hidden_states.masked_fill(padding_mask[:, :num_frames].unsqueeze(-1), 0.0)
        return hidden_states, frame_lengths


def head_outputs(model: ThinHubertModel, encoded: Dict[str, Any]) -> Dict[str, Dict[int, torch.Tensor]]:
    """The distillation heads on already-encoded hidden states, computed by ``ThinHubertModel.forward``.

    ``forward`` holds the one rule of the heads (which layer feeds which hint head, the up-sampling
    heads' cut to the CNN length, the prediction head's split per teacher layer); it starts with
    ``self.encode(...)``, so an instance attribute shadowing that method for the call hands it
    ``encoded`` (the export's own padding-exact encoding) instead. Returns ``{"hints": {student
    layer: (B, T_l or T, D_t)}, "preds": {teacher layer: (B, T', D_t)}}``.
    """
    model.encode = lambda *args, **kwargs: dict(encoded)
    try:
        result = model.forward(encoded["x"])
    finally:
        del model.encode
    return {"hints": result["hints"], "preds": result["preds"]}


def output_factors(model: ThinHubertModel, heads: Optional[Sequence[DistillTarget]] = None) -> List[int]:
    """Each output's own rate as a multiple of the CNN stride (1, or the time reduction factor).

    Layers: from ``is_time_reduced``. Heads: read off the model's own outputs on a probe (a head at
    the CNN length is at the CNN rate), so the rate rule stays in ``forward`` alone.
    """
    factor = int(model.cfg.time_reduction_factor)
    if not heads:
        return [factor if model.is_time_reduced(l) else 1 for l in range(len(model.encoder.layers) + 1)]
    if factor == 1:
        return [1] * len(heads)
    probe = torch.zeros(1, max(PROBE_SAMPLES, 2 * factor * min_samples(model)))
    with torch.no_grad():
        result = model(probe)
    cnn_frames = result["hidden_states"][0].size(1)
    return [1 if result[t.kind][t.key].size(1) == cnn_frames else factor for t in heads]


def default_outputs(loaded: LoadedStudent) -> str:
    """What the student's paper feeds SUPERB, read off its config (``fairseq-kd-export --outputs``).

    ``heads`` for the masking-distillation students (criterion ``masked_hint``: ARMHuBERT,
    ARMHuBERT-S, MaskHuBERT) that kept a hint head on every transformer layer, each learning the
    teacher layer of the same depth alone: their SUPERB upstream returns
    ``results['projections']``, the 12 projection-head outputs. ``layers`` otherwise: FitHuBERT
    (its inference keeps only the last head, as ``final_proj``; SUPERB reads the layers),
    STaRHuBERT (no heads), DistilHuBERT (prediction heads dropped for SUPERB), the Deep-vs-Wide
    students, fine-tuned CTC checkpoints. See docs/ for the sources.
    """
    num_layers = len(loaded.model.encoder.layers)
    pairs = [(t.kind, t.key, list(t.teacher_layers)) for t in loaded.head_targets]
    one_to_one = [("hints", layer, [layer]) for layer in range(1, num_layers + 1)]
    return HEADS if loaded.criterion == "masked_hint" and pairs == one_to_one else LAYERS


def choose_outputs(loaded: LoadedStudent, requested: Optional[str] = None) -> str:
    """``requested`` (or the student's default), refused with what to do when the student lacks heads."""
    outputs = requested or default_outputs(loaded)
    if outputs not in OUTPUT_CHOICES:
        raise ExportInputError(f"--outputs {outputs!r}: choose one of {', '.join(OUTPUT_CHOICES)}")
    if outputs == HEADS and not loaded.head_targets:
        declared = loaded.model_cfg.get("hint_layer_ids") or loaded.model_cfg.get("pred_layer_ids")
        if loaded.source == "distillation" and declared:  # an API caller's load_student(path)
            raise ExportInputError(f"{loaded.path}: outputs=heads needs the heads: load it with "
                                   f"load_student(path, keep_heads=True)")
        if loaded.source != "distillation":
            why = (f"it is a fine-tuned {loaded.source} checkpoint, which holds the encoder without the "
                   f"distillation heads; export the distillation checkpoint it was fine-tuned from")
        else:
            why = ("its student has no distillation heads (model.hint_layer_ids and model.pred_layer_ids "
                   "are empty, as for STaRHuBERT, which feeds SUPERB its layers)")
        raise ExportInputError(
            f"{loaded.path}: --outputs heads exports the distillation heads' outputs, but {why}; "
            f"export the student's layers with --outputs layers"
        )
    return outputs


def min_samples(model: ThinHubertModel) -> int:
    """The fewest samples that give one CNN frame (the CNN's receptive field: 400 for HuBERT's)."""
    return receptive_field(model.conv_specs)


def sample_padding_mask(wavs: torch.Tensor, lengths: torch.Tensor) -> Optional[torch.Tensor]:
    """(B, S) True = pad, as fairseq's fine-tuning code passes it: None when no row is padded."""
    if not bool((lengths < wavs.size(1)).any()):
        return None
    return torch.arange(wavs.size(1)).unsqueeze(0) >= lengths.unsqueeze(1)


def reference_hidden_states(model: ThinHubertModel, wavs: torch.Tensor, lengths: torch.Tensor) -> List[torch.Tensor]:
    """The original model's hidden states (each at its own rate) for a right-padded batch.

    Runs ``model.encode`` as fairseq's fine-tuning code does: with a sample-level padding mask
    when rows are padded, without one otherwise.
    """
    with torch.no_grad():
        return model.encode(wavs, padding_mask=sample_padding_mask(wavs, lengths))["hidden_states"]


def reference_head_outputs(model: ThinHubertModel, heads: Sequence[DistillTarget], wavs: torch.Tensor,
                           lengths: torch.Tensor) -> List[torch.Tensor]:
    """The original model's head outputs (each at its own rate), in ``heads`` order: its eager ``forward``."""
    with torch.no_grad():
        result = model(wavs, padding_mask=sample_padding_mask(wavs, lengths))
    return [result[target.kind][target.key] for target in heads]


def parity(model: ThinHubertModel, program: Any, wavs: torch.Tensor, lengths: torch.Tensor,
           heads: Optional[Sequence[DistillTarget]] = None) -> float:
    """Max abs difference over valid frames between ``program`` and the model, at each output's own rate.

    ``heads``: the program returns these head outputs (the model must have its heads); else the layers.
    """
    with torch.no_grad():
        hidden_states, frame_lengths = program(wavs, lengths)
    if heads:
        reference = reference_head_outputs(model, heads, wavs, lengths)
    else:
        reference = reference_hidden_states(model, wavs, lengths)
    if hidden_states.size(0) != len(reference):
        raise RuntimeError(f"the program returns {hidden_states.size(0)} outputs, the model {len(reference)}")
    worst = 0.0
    for output_id, (expected, step) in enumerate(zip(reference, output_factors(model, heads))):
        got = hidden_states[output_id]
        for row, valid in enumerate(frame_lengths.tolist()):
            n = int(reduced_lengths(valid, step))  # the reduced frames the row keeps (an int)
            diff = (got[row, :valid:step] - expected[row, :n]).abs().max().item()
            worst = max(worst, diff)
    return worst


def export_program(student: ThinHubertModel, example_samples: int = 16000,
                   heads: Optional[Sequence[DistillTarget]] = None) -> Any:
    """``torch.export`` the student with dynamic batch size and length (>= one CNN frame);
    returning the ``heads`` outputs (:class:`StudentEncoder`) when given."""
    encoder = StudentEncoder(student, heads).eval()
    wavs = torch.randn(2, example_samples, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([example_samples, example_samples * 3 // 4])
    dynamic = torch.export.Dim.DYNAMIC
    dynamic_shapes = ({0: dynamic, 1: dynamic}, {0: dynamic})
    # without this, torch.export assumes sizes are never 1 (its 0/1 specialisation) and the
    # program would refuse a batch of one; the spare frames keep sequences >= 2 long anyway
    import torch.fx.experimental._config as fx_config

    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        program = torch.export.export(encoder, (wavs, lengths), dynamic_shapes=dynamic_shapes, strict=False)
    check_ranges(program, min_samples(student))
    return program


def check_ranges(program: Any, fewest_samples: int) -> None:
    """The exported input ranges must admit a batch of one and one CNN frame."""
    batch_sym, samples_sym = None, None
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == "wavs":
            shape = node.meta["val"].shape
            batch_sym, samples_sym = shape[0], shape[1]
    ranges = {str(k): v for k, v in program.range_constraints.items()}
    for what, sym, needed in (("batch size", batch_sym, 1), ("samples", samples_sym, fewest_samples)):
        if not isinstance(sym, torch.SymInt):
            raise RuntimeError(f"torch.export made the {what} static ({sym}); the standalone file needs it dynamic")
        low = ranges.get(str(sym.node.expr))
        if low is not None and int(low.lower) > needed:
            raise RuntimeError(
                f"torch.export only admits {what} >= {low.lower} (needed >= {needed}); this torch "
                f"version ({torch.__version__}) cannot export the student for all inputs"
            )


def metadata(loaded: LoadedStudent, program_device: str = "cpu", outputs: str = LAYERS) -> Dict[str, Any]:
    model = loaded.model
    heads = loaded.head_targets if outputs == HEADS else []
    cnn_rate = samples_per_frame(model.conv_specs)
    factor = int(model.cfg.time_reduction_factor)
    num_layers = len(model.encoder.layers)
    factors = output_factors(model, heads)
    width = model.cfg.teacher_embed_dim if heads else model.cfg.encoder_embed_dim
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sample_rate": loaded.sample_rate,
        "normalize": loaded.normalize,
        "outputs": outputs,  # what hidden_states holds: the student's layers or its heads' outputs
        "downsample_rate": cnn_rate,
        "native_downsample_rates": [cnn_rate * f for f in factors],
        "time_reduction_factor": factor,
        "rate_policy": "upsampled" if max(factors) > 1 else "native",
        "num_hidden_states": len(factors),
        "num_layers": num_layers,
        "hidden_size": int(width),
        "min_samples": min_samples(model),
        "inputs": {"wavs": "(B, S) float32", "lengths": "(B,) int64 valid samples"},
        "output_shapes": {"hidden_states": "(N, B, T, D)" if heads else "(L + 1, B, T, D)",
                          "frame_lengths": "(B,) int64"},
        "device": program_device,
        # what the program holds: ARMHuBERT's published count includes its heads
        "parameters": ThinHubertModel.count_parameters(model, include_heads=bool(heads)),
        "source_checkpoint": os.path.abspath(loaded.path),
        "source_sha256": sha256(loaded.path),
        "source_kind": loaded.source,
        "student_config": loaded.model_cfg,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if heads:
        meta["head_teacher_layers"] = [list(t.teacher_layers) for t in heads]  # mean of several if > 1
        meta["head_sources"] = [f"hint head on student layer {t.key}" if t.kind == "hints" else
                                f"prediction head (teacher layer {t.key}) on the last layer" for t in heads]
    return meta


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_program(program: Any, meta: Dict[str, Any], output: str) -> None:
    """``torch.export.save`` through a temporary file in the same folder, then an atomic rename."""
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    # same base name inside a temporary folder: the archive's inner folder is named after the file
    with tempfile.TemporaryDirectory(prefix=".fairseq_kd_export_", dir=folder) as tmp:
        tmp_path = os.path.join(tmp, os.path.basename(output))
        torch.export.save(program, tmp_path, extra_files={META_NAME: json.dumps(meta, indent=1)})
        os.replace(tmp_path, output)


def export_standalone(loaded: LoadedStudent, output: str,
                      outputs: Optional[str] = None) -> Tuple[Any, Dict[str, Any], float]:
    """Export, check against the model on a padded batch, save. Returns (program, metadata, max diff).

    ``outputs``: ``layers`` or ``heads`` (:func:`choose_outputs`; None = the student's default).
    """
    outputs = choose_outputs(loaded, outputs)
    heads = loaded.head_targets if outputs == HEADS else None
    program = export_program(loaded.model, heads=heads)
    module, gen = program.module(), torch.Generator().manual_seed(1)
    # a padded batch with a 0.05 s row, and 0.05 s alone (batch of one, 2 CNN frames)
    batches = [(torch.randn(3, 12345, generator=gen), torch.tensor([12345, 7000, 800])),
               (torch.randn(1, 800, generator=gen), torch.tensor([800]))]
    diff = 0.0
    for wavs, lengths in batches:
        try:
            diff = max(diff, parity(loaded.model, module, wavs, lengths, heads))
        except AssertionError as error:  # a shape guard torch.export added (see export_program)
            raise RuntimeError(
                f"the exported program rejects a batch of {tuple(wavs.shape)} ({error}); torch "
                f"{torch.__version__} specialised a shape of this student; nothing was written"
            ) from None
    if not diff <= PARITY_TOLERANCE:
        raise RuntimeError(
            f"the exported program differs from the model by {diff:.3g} (> {PARITY_TOLERANCE}); "
            "nothing was written"
        )
    meta = metadata(loaded, outputs=outputs)
    meta["export_check_max_abs_diff"] = diff
    save_program(program, meta, output)
    return program, meta, diff
