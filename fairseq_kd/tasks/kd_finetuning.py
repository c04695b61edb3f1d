# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``kd_audio_finetuning``: fairseq's ``audio_finetuning`` with the checks a distilled student needs.

The data, the batching, the labels and the model are fairseq's own (``AudioFinetuningTask``:
``{split}.tsv`` + ``{split}.{labels}`` + ``dict.{labels}.txt``; ``hubert_ctc`` or ``wav2vec_ctc``
build the student from ``model.w2v_path``). Like ``audio_finetuning`` (``AudioPretrainingTask.build_model``),
it copies ``w2v_args`` back into the model config, so the fine-tuned checkpoint is self-contained:
decoding and validation rebuild the student from it without the distillation checkpoint or the
teacher. What the task adds, all before the first training step:

* **w2v_path**: a missing file, a file that is not a fairseq checkpoint, an already fine-tuned CTC
  model, a model kind the chosen CTC model cannot wrap, or a ``normalize`` mismatch stop with a
  message saying what to pass instead (fairseq would fail inside ``HubertEncoder`` with a
  ``FileNotFoundError``, an ``AttributeError`` or a bare ``assert``).
* **labels** (``check_labels``): a label file with fewer or more lines than the manifest has rows
  (labels are matched to audio by line number), and symbols missing from ``dict.{labels}.txt``,
  which fairseq would silently encode as ``<unk>``; the messages name the files and lines.
* **CTC lengths** (``ctc_length_check``): CTC needs one output frame per label token plus one blank
  between two equal adjacent tokens. A time-reduced student (25 Hz after x2 reduction, 12.5 Hz after
  x4) can have fewer frames than a fast utterance needs; with ``zero_infinity: true`` fairseq's ``ctc``
  criterion gives such an utterance zero loss, so it silently teaches nothing. The task counts them
  from the model's own conv arithmetic and time reduction and warns with examples (``warn``), stops
  (``error``) or leaves them out of the batches (``skip``).
* **wav2vec_ctc** with a distilled student: fairseq's ``Wav2VecEncoder`` wants ``extract_features``
  to return wav2vec 2.0's dict (``x``, ``padding_mask``, ``layer_results``) while ``thin_hubert``
  returns HuBERT's ``(x, padding_mask)`` tuple (what ``hubert_ctc`` wants). After fairseq has built
  and strictly loaded the student, the task switches it to ``thin_hubert_w2v`` (same parameters,
  dict output) and records that name in ``w2v_args``, so the fine-tuned checkpoint rebuilds the
  right class on its own (decoding then works with plain ``audio_finetuning``).
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import open_dict

from fairseq.data import AddTargetDataset, Dictionary
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.audio_finetuning import AudioFinetuningConfig, AudioFinetuningTask

from fairseq_kd.data.audio_checks import ManifestCheckConfig, check_max_tokens, checked_split
from fairseq_kd.encoders.frames import conv_specs, output_lengths, samples_per_frame
from fairseq_kd.encoders.pretrained import check_channel_masking, is_fine_tuned, read_checkpoint, trained_normalize
from fairseq_kd.tasks.run_folder import RunFolderConfig, check_run_folder

logger = logging.getLogger(__name__)

CTC_LENGTH_CHECK_CHOICES = ChoiceEnum(["warn", "error", "skip", "off"])

# what each of fairseq's CTC models can wrap (cfg.model._name of the w2v_path checkpoint)
PRETRAINED_MODELS = {
    "hubert_ctc": ("thin_hubert", "hubert"),
    "wav2vec_ctc": ("thin_hubert", "thin_hubert_w2v", "wav2vec2", "data2vec_audio"),
}
SHOWN_EXAMPLES = 5


class FinetuneInputError(ValueError):
    """Fine-tuning input that fairseq would crash on, or silently misuse, found before training."""


@dataclass
class KDAudioFinetuningConfig(AudioFinetuningConfig, ManifestCheckConfig, RunFolderConfig):
    # input checks; the manifest and audio checks (task.validate_audio, audio_check, skip_bad_rows)
    # are ManifestCheckConfig's, the same as distill_hubert's and kws_sv's
    check_labels: bool = field(
        default=True,
        metadata={
            "help": "before loading a split, check that {split}.{labels} has one line per manifest "
            "row and only symbols of dict.{labels}.txt (fairseq would map unknown ones to <unk>)"
        },
    )
    ctc_length_check: CTC_LENGTH_CHECK_CHOICES = field(
        default="warn",
        metadata={
            "help": "utterances with fewer output frames than their label needs (tokens + adjacent "
            "repeats): warn (count + examples), error (stop), skip (leave them out of the "
            "batches) or off"
        },
    )


@register_task("kd_audio_finetuning", dataclass=KDAudioFinetuningConfig)
class KDAudioFinetuningTask(AudioFinetuningTask):
    cfg: KDAudioFinetuningConfig

    def __init__(self, cfg: KDAudioFinetuningConfig):
        super().__init__(cfg)
        self.output_frames: Optional[Callable[[np.ndarray], np.ndarray]] = None
        self.output_frame_rate: Optional[float] = None
        self.ctc_too_short: Dict[str, np.ndarray] = {}  # split -> dataset indices (skip mode)
        self._ctc_checked = set()

    # -- data ------------------------------------------------------------------------------------
    def load_dataset(self, split: str, task_cfg: AudioFinetuningConfig = None, **kwargs):
        task_cfg = task_cfg or self.cfg
        label_exts = [task_cfg.labels] if task_cfg.labels else []
        # the manifest check every task runs first, then the labels against it
        with checked_split(self.cfg.data, split, self.cfg, label_exts) as data:
            if self.cfg.check_labels and task_cfg.labels and not getattr(task_cfg, "binarized_dataset", False):
                check_dictionary_file(self.cfg.data, task_cfg.labels)
                check_label_file(
                    os.path.join(self.cfg.data, f"{split}.tsv"),
                    os.path.join(self.cfg.data, f"{split}.{task_cfg.labels}"),
                    self.target_dictionary,
                    os.path.join(self.cfg.data, f"dict.{task_cfg.labels}.txt"),
                )
            if task_cfg.labels:
                self.target_dictionary  # read from the configured folder before it is swapped below
            original_data = self.cfg.data
            self.cfg.data = data  # a filtered copy of the split when task.skip_bad_rows skipped rows
            try:
                super().load_dataset(split, task_cfg, **kwargs)
            finally:
                self.cfg.data = original_data
        self._ctc_checked.discard(split)
        self.ctc_too_short.pop(split, None)
        self.check_ctc_lengths(split)

    def check_ctc_lengths(self, split: str) -> None:
        """Count (and report / stop / mark for skipping) utterances CTC cannot align."""
        mode = str(self.cfg.ctc_length_check)
        if mode == "off" or self.output_frames is None or split in self._ctc_checked:
            return
        dataset = self.datasets.get(split)
        if not isinstance(dataset, AddTargetDataset):
            return
        self._ctc_checked.add(split)
        report = ctc_length_report(dataset, self.output_frames, self.cfg.sample_rate)
        if report.too_short.size == 0:
            slack = report.frames / np.maximum(report.needed, 1)
            logger.info(
                f"CTC length check ({split}): all {len(dataset)} utterances have enough output "
                f"frames for their labels ({self.output_frame_rate:g} per second; frames / frames "
                f"needed: min {slack.min():.2f}, median {np.median(slack):.2f})"
            )
            return
        manifest = os.path.join(self.cfg.data, f"{split}.tsv")
        message = report.message(split, manifest, self.output_frame_rate)
        if mode == "error":
            raise FinetuneInputError(
                message + " Set task.ctc_length_check=skip to leave them out, or =warn to train anyway."
            )
        if mode == "skip":
            self.ctc_too_short[split] = report.too_short
            logger.warning(message + f" task.ctc_length_check=skip: they are left out of the {split} batches.")
        else:
            logger.warning(
                message + " fairseq's ctc criterion gives them an infinite loss, or with zero_infinity: "
                "true (the presets) a zero loss and gradient, so they teach nothing "
                "(task.ctc_length_check=skip leaves them out, =error stops)."
            )

    def get_batch_iterator(self, dataset, max_tokens=None, *args, **kwargs):
        check_max_tokens(dataset, max_tokens, self.cfg.sample_rate)
        return super().get_batch_iterator(dataset, max_tokens, *args, **kwargs)

    def filter_indices_by_size(self, indices, dataset, max_positions=None, ignore_invalid_inputs=False):
        indices = super().filter_indices_by_size(indices, dataset, max_positions, ignore_invalid_inputs)
        for split, too_short in self.ctc_too_short.items():
            if self.datasets.get(split) is dataset and too_short.size:
                kept = indices[~np.isin(indices, too_short)]
                logger.info(f"{split}: left out {len(indices) - len(kept)} utterances too short for CTC")
                indices = kept
        return indices

    # -- model -----------------------------------------------------------------------------------
    def build_model(self, model_cfg, from_checkpoint: bool = False):
        name = getattr(model_cfg, "_name", None)
        if name in PRETRAINED_MODELS and model_cfg.get("w2v_args", None) is None:
            # a new fine-tuning run (a fine-tuned checkpoint carries w2v_args and needs no file)
            if self.cfg.labels:
                check_dictionary_file(self.cfg.data, self.cfg.labels)
            pretrained = check_pretrained_checkpoint(name, model_cfg.w2v_path, bool(self.cfg.normalize))
            check_channel_masking(model_cfg, pretrained.model, FinetuneInputError)
        model = super().build_model(model_cfg, from_checkpoint)
        if not from_checkpoint:
            check_run_folder(self.cfg, model_cfg, model)  # resuming save_dir must continue this run

        encoder = getattr(getattr(model, "w2v_encoder", None), "w2v_model", None)
        if encoder is None:
            return model
        if name == "wav2vec_ctc":
            encoder = as_wav2vec_features(encoder, model, model_cfg)
        self.output_frames, self.output_frame_rate = output_frames_fn(encoder, self.cfg.sample_rate)
        for split in list(self.datasets):
            self.check_ctc_lengths(split)
        return model


# -- CTC lengths ---------------------------------------------------------------------------------
def time_reduction_factor(model: torch.nn.Module) -> int:
    cfg = getattr(model, "cfg", None)
    factor = getattr(cfg, "time_reduction_factor", None) if cfg is not None else None
    if factor is None:
        factor = getattr(getattr(model, "encoder", None), "time_reduction_factor", 1)
    return int(factor or 1)


def output_frames_fn(model: torch.nn.Module, sample_rate: int) -> Tuple[Callable[[np.ndarray], np.ndarray], float]:
    """A function from input samples to output frames (``encoders/frames.output_lengths``: the
    conv arithmetic, then ``ceil(T / r)`` for a student with time reduction by ``r``, so an
    utterance alone and in a padded batch gets the same count), and the output frame rate."""
    specs = conv_specs(model)
    factor = time_reduction_factor(model)

    def frames(samples: np.ndarray) -> np.ndarray:
        return output_lengths(samples, specs, factor)

    return frames, sample_rate / (samples_per_frame(specs) * factor)


def ctc_min_frames(tokens: Sequence[str]) -> int:
    """Frames CTC needs to emit ``tokens``: one per token plus a blank between equal neighbours."""
    repeats = sum(1 for a, b in zip(tokens, tokens[1:]) if a == b)
    return len(tokens) + repeats


@dataclass
class CtcLengthReport:
    too_short: np.ndarray  # dataset indices
    frames: np.ndarray
    needed: np.ndarray
    num_tokens: np.ndarray
    samples: np.ndarray
    rows: np.ndarray  # manifest row (0-based, first line after the root) of each dataset index
    names: Callable[[int], str]
    total: int
    sample_rate: int

    def message(self, split: str, manifest: str, rate: float) -> str:
        examples = []
        order = self.too_short[np.argsort((self.frames - self.needed)[self.too_short])]
        for index in order[:SHOWN_EXAMPLES]:
            examples.append(
                f"{os.path.basename(manifest)}:{self.rows[index] + 2} {self.names(index)} "
                f"({self.samples[index] / self.sample_rate:.2f} s): {self.frames[index]} frames < {self.needed[index]} "
                f"needed ({self.num_tokens[index]} tokens + {self.needed[index] - self.num_tokens[index]} repeats)"
            )
        return (
            f"CTC length check ({split}): {self.too_short.size} of {self.total} utterances have fewer "
            f"output frames ({rate:g} per second) than their labels need (one frame per token plus "
            f"a blank between repeated tokens), so CTC cannot align them. Shortest by margin: "
            + "; ".join(examples)
            + ("; ..." if self.too_short.size > SHOWN_EXAMPLES else "")
            + "."
        )


def ctc_length_report(
    dataset: AddTargetDataset, output_frames: Callable[[np.ndarray], np.ndarray], sample_rate: int = 16000
) -> CtcLengthReport:
    audio = dataset.dataset
    sizes = np.asarray(audio.sizes, dtype=np.int64)
    max_size = getattr(audio, "max_sample_size", None)
    if max_size:
        sizes = np.minimum(sizes, max_size)  # longer utterances are cropped by the collater
    frames = output_frames(sizes)
    num_tokens = np.zeros(len(dataset), dtype=np.int64)
    needed = np.zeros(len(dataset), dtype=np.int64)
    for i in range(len(dataset)):
        tokens = dataset.get_label(i).split()
        num_tokens[i] = len(tokens)
        needed[i] = ctc_min_frames(tokens)
    skipped = sorted(getattr(audio, "skipped_indices", ()) or ())
    rows = np.arange(len(dataset))
    for row in skipped:  # fairseq dropped these manifest rows (min_sample_size): shift the rest
        rows[rows >= row] += 1
    return CtcLengthReport(
        too_short=np.nonzero(frames < needed)[0],
        frames=frames,
        needed=needed,
        num_tokens=num_tokens,
        samples=sizes,
        rows=rows,
        names=lambda index: audio_name(audio, index),
        total=len(dataset),
        sample_rate=sample_rate,
    )


def audio_name(audio, index: int) -> str:
    fnames = getattr(audio, "fnames", None)
    if fnames is None:
        return f"#{index}"
    name = fnames[index]
    name = name if isinstance(name, (str, bytes)) else name.as_py()  # pyarrow array
    compressor = getattr(audio, "text_compressor", None)
    return compressor.decompress(name) if compressor is not None else str(name)


# -- labels --------------------------------------------------------------------------------------
def check_dictionary_file(data: str, labels: str) -> None:
    path = os.path.join(data, f"dict.{labels}.txt")
    if not os.path.isfile(path):
        raise FinetuneInputError(
            f"task.labels={labels} needs the label dictionary {path}, which does not exist: write it "
            f"beside the manifests (fairseq-kd-prepare-asr does, as fairseq's libri_labels.py + "
            f"'fairseq-preprocess --only-source' would)"
        )


def check_label_file(manifest: str, label_path: str, dictionary: Dictionary, dict_path: str) -> None:
    """One label line per manifest row, every symbol in the dictionary; errors name file and line."""
    if not os.path.isfile(manifest):
        return  # fairseq's own error names the manifest
    with open(manifest) as f:
        rows = f.read().split("\n")[1:]
    if rows and rows[-1] == "":
        rows.pop()  # the newline that ends the last row
    if not os.path.isfile(label_path):
        raise FinetuneInputError(
            f"{label_path} does not exist: the labels of {manifest} are read from the file with the "
            f"same name and the task.labels extension, one line per manifest row"
        )
    with open(label_path) as f:
        labels = [line.rstrip("\n") for line in f]
    if len(labels) != len(rows):
        label_name, manifest_name = os.path.basename(label_path), os.path.basename(manifest)
        if len(labels) < len(rows):
            first = len(labels)  # 0-based row without a label line
            detail = (
                f"{manifest_name}:{first + 2} ({rows[first].split(chr(9))[0]}) and every later row "
                f"(lines {first + 2}-{len(rows) + 1}) have no label line"
            )
        else:
            detail = (
                f"{label_name} lines {len(rows) + 1}-{len(labels)} have no manifest row "
                f"(the first is {labels[len(rows)][:60]!r})"
            )
        raise FinetuneInputError(
            f"{label_path} has {len(labels)} lines but {manifest} has {len(rows)} rows (audio files "
            f"after the root line); labels are matched to audio by line number, so one of them is "
            f"stale or truncated: {detail}. Regenerate the labels from this manifest (e.g. "
            f"fairseq-kd-prepare-asr --from-manifest {manifest} --dest DIR)"
        )

    missing: Dict[str, int] = {}
    bad_lines: List[Tuple[int, List[str]]] = []
    for number, line in enumerate(labels, start=1):
        unknown = [s for s in line.split() if s not in dictionary.indices]
        if unknown:
            bad_lines.append((number, unknown))
            for symbol in unknown:
                missing[symbol] = missing.get(symbol, 0) + 1
    if bad_lines:
        examples = "; ".join(
            f"{os.path.basename(label_path)}:{number}: {' '.join(repr(s) for s in dict.fromkeys(unknown))}"
            for number, unknown in bad_lines[:SHOWN_EXAMPLES]
        )
        counts = ", ".join(f"{s!r} x{n}" for s, n in sorted(missing.items(), key=lambda kv: -kv[1])[:20])
        raise FinetuneInputError(
            f"{label_path}: {len(bad_lines)} lines hold symbols that are not in {dict_path}, which "
            f"fairseq would silently encode as <unk> (the model could never learn or output them): "
            f"{examples}{'; ...' if len(bad_lines) > SHOWN_EXAMPLES else ''}. Missing symbols: {counts}. "
            f"Normalise the transcripts, or add the symbols to the dictionary (before fine-tuning: "
            f"its size fixes the output layer)"
        )


# -- the pre-trained checkpoint ------------------------------------------------------------------
def check_pretrained_checkpoint(ctc_model: str, path: str, normalize: bool):
    """``model.w2v_path`` must be a checkpoint ``ctc_model`` can wrap, with the same ``normalize``.

    Returns the checkpoint's config.
    """
    key = "model.w2v_path"
    if path in (None, "", "???"):
        raise FinetuneInputError(f"{key} is not set: give the distilled student (or HuBERT / wav2vec 2.0) checkpoint")
    state = read_checkpoint(
        path, f"{key}={path}", "give the distilled student's checkpoint_best.pt / checkpoint_last.pt "
        "(or a pre-trained HuBERT / wav2vec 2.0 checkpoint)", FinetuneInputError,
    )
    cfg = state["cfg"]
    name = cfg.model.get("_name", None)
    if is_fine_tuned(cfg.model):
        source = cfg.model.get("w2v_path", None)
        raise FinetuneInputError(
            f"{key}={path} is already a fine-tuned model ({name}"
            + (f", fine-tuned from {source}" if source else "")
            + "): fine-tune from the distilled student (or pre-trained) checkpoint instead; to decode "
            "this one, use fairseq-kd-infer --config-name decode_viterbi common_eval.path=" + str(path)
        )
    accepted = PRETRAINED_MODELS[ctc_model]
    if name not in accepted:
        other = [m for m, names in PRETRAINED_MODELS.items() if name in names and m != ctc_model]
        hint = f"; {name} checkpoints fine-tune with model._name={other[0]}" if other else ""
        raise FinetuneInputError(
            f"{key}={path} holds a {name!r} model; model._name={ctc_model} fine-tunes "
            f"{' / '.join(accepted)} checkpoints (a distilled student is thin_hubert){hint}"
        )
    was = str(trained_normalize(cfg)).lower()
    if trained_normalize(cfg) != normalize:
        raise FinetuneInputError(
            f"task.normalize={str(normalize).lower()} but {path} was trained with normalize={was}: set "
            f"task.normalize={was} so fine-tuning feeds the audio the way the model saw it"
        )
    return cfg


# -- wav2vec_ctc ---------------------------------------------------------------------------------
def as_wav2vec_features(encoder: torch.nn.Module, model: torch.nn.Module, model_cfg) -> torch.nn.Module:
    """Give a thin_hubert student wav2vec 2.0's ``extract_features`` output for ``Wav2VecEncoder``."""
    from fairseq_kd.models.thin_hubert import ThinHubertModel
    from fairseq_kd.models.thin_hubert_ctc import ThinHubertW2vModel

    if type(encoder) is not ThinHubertModel:
        return encoder
    encoder.__class__ = ThinHubertW2vModel  # same module tree and parameters, dict output
    for cfg in (model_cfg, getattr(model, "cfg", None)):
        w2v_args = cfg.get("w2v_args", None) if cfg is not None else None
        if w2v_args is not None:
            with open_dict(w2v_args):
                w2v_args.model._name = "thin_hubert_w2v"
    return encoder
