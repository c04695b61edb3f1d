# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``kws_sv``: keyword spotting and speaker verification on one encoder, jointly or alone.

Data (``task.data``, see ``fairseq_kd/data/kws_sv.py``): ``{split}.tsv`` fairseq manifests with
``{split}.kw`` keyword and ``{split}.spk`` speaker labels, ``dict.kw.txt``, and ``trials.txt`` over
the ``test`` split. Audio is read by fairseq's ``FileAudioDataset`` (padded batches; training
utterances longer than ``max_sample_size`` are randomly cropped, other splits are never cropped).

Several corpora (``task.data='data/sc12,data/vox1'``, comma- or os.pathsep-separated; quote a
comma on hydra's command line): each folder keeps its own labels (a missing or all-``-`` label
file = none), keyword classes come from the first keyword corpus' ``dict.kw.txt``, the speaker
classes are the training speakers of every speaker corpus. Training draws utterances per epoch
in ``task.corpus_ratios`` (fairseq's ``MultiCorpusDataset``, ``batch_sample``: every batch from
one corpus, ``max_tokens`` per corpus); the other splits are the corpora one after another, batched
per corpus, with paths prefixed ``{corpus index}:`` so that each speaker corpus' trials stay its
own. A corpus carrying no label of a task switched on is refused, with its files.

``task.kws`` / ``task.sv`` choose the tasks: both (joint fine-tuning), or one alone (its labels,
head and loss only). The keyword classes (``dict.kw.txt``) and the training speakers (the classes
of the speaker loss) are kept in the task state, so a fine-tuned checkpoint evaluates without the
training data.

Validation logs ``kws_accuracy`` and, for speaker verification, ``eer`` (percent) and ``min_dcf``
(p_target 0.01, c_miss = c_fa = 1) from cosine scores of the split's embeddings over a trial list:
``task.trials`` for ``task.trials_split``, otherwise trials built from the split's own speaker
labels (all pairs, or ``valid_max_trials`` seeded pairs, half of them same-speaker). The EER is a
fairseq derived metric computed once every utterance of the split has been embedded, so it can be
``checkpoint.best_checkpoint_metric`` (``joint_error`` = keyword error + EER, both in percent, for
the joint recipe). Under DDP the embeddings are gathered from every rank.

Checked before the first step, with file and line: keyword labels outside ``dict.kw.txt``, label
files out of step with their manifests, trial lines naming utterances that are not in the split or
disagreeing with the speaker labels, and speakers of a verification split (valid, the trial
split) who also speak in the training split (``task.disjoint_speakers``, on by default: the
VoxCeleb1 and Speech Commands protocols are speaker-disjoint).
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from omegaconf import II, MISSING

from fairseq import metrics
from fairseq.data import BaseWrapperDataset, ConcatDataset, FileAudioDataset
from fairseq.data.multi_corpus_dataset import MultiCorpusDataset
from fairseq.tasks import FairseqTask, register_task

from fairseq_kd.data.audio_checks import ManifestCheckConfig, check_max_tokens, checked_split
from fairseq_kd.data.kws_sv import (
    NO_LABEL,
    KwsSvDataError,
    Trial,
    build_trials,
    check_disjoint_speakers,
    check_keyword_labels,
    check_trial_speakers,
    check_trials,
    first_lines,
    read_keywords,
    read_labels,
    read_trials,
    split_paths,
)
from fairseq_kd.evaluation.kws_sv import verification_metrics
from fairseq_kd.tasks.run_folder import RunFolderConfig, check_run_folder

logger = logging.getLogger(__name__)

TRIALS_SEED = 1234


@dataclass
class KwsSvConfig(ManifestCheckConfig, RunFolderConfig):
    data: str = field(
        default=MISSING,
        metadata={"help": "folder with {split}.tsv/.kw/.spk, dict.kw.txt, trials.txt; several folders "
                  "comma-separated (e.g. data/sc12,data/vox1) train on several corpora"},
    )
    corpus_ratios: Optional[List[float]] = field(
        default=None,
        metadata={"help": "with several task.data folders: relative share of training utterances drawn "
                  "from each per epoch (null = each corpus' size)"},
    )
    seed: int = II("common.seed")

    # tasks
    kws: bool = field(default=True, metadata={"help": "train and evaluate keyword spotting"})
    sv: bool = field(default=True, metadata={"help": "train and evaluate speaker verification"})
    kw_labels: str = field(default="kw", metadata={"help": "extension of the keyword label files (dict.{ext}.txt)"})
    spk_labels: str = field(default="spk", metadata={"help": "extension of the speaker label files"})

    # audio
    sample_rate: int = field(default=16_000, metadata={"help": "audio sample rate (Hz)"})
    normalize: bool = field(
        default=False, metadata={"help": "layer-normalise each waveform; must match the encoder's pre-training"}
    )
    max_sample_size: Optional[int] = field(
        default=48_000, metadata={"help": "training utterances longer than this are randomly cropped (samples)"}
    )
    valid_max_sample_size: Optional[int] = field(
        default=None, metadata={"help": "crop length for the other splits; null = whole utterances"}
    )
    min_sample_size: int = field(
        default=400, metadata={"help": "leave out utterances shorter than this (the CNN's receptive field)"}
    )
    # task.validate_audio, audio_check, skip_bad_rows: ManifestCheckConfig (the same check as distill_hubert's)

    # speaker verification protocol
    trials: str = field(
        default="trials.txt",
        metadata={"help": "trial list (<1|0> <path_a> <path_b>, relative to data) over trials_split; '' = none"},
    )
    trials_split: str = field(default="test", metadata={"help": "the split the trial list is made for"})
    valid_max_trials: int = field(
        default=50_000, metadata={"help": "trials built from the speaker labels of other splits: at most this many"}
    )
    disjoint_speakers: bool = field(
        default=True,
        metadata={"help": "stop if a speaker of a verification split also speaks in the training split"},
    )
    train_subset: str = II("dataset.train_subset")


class KwsSvDataset(BaseWrapperDataset):
    """fairseq's ``FileAudioDataset`` with keyword / speaker targets (-1 = no label) added by the collater."""

    def __init__(self, dataset: FileAudioDataset, split: str, paths: List[str], keywords: np.ndarray,
                 speakers: np.ndarray, speaker_names: List[str]):
        super().__init__(dataset)
        self.split = split
        self.paths = paths  # manifest row path of each index
        self.keywords = keywords
        self.speakers = speakers
        self.speaker_names = speaker_names

    def path_of(self, index: int) -> str:
        return self.paths[index]

    def collater(self, samples):
        batch = self.dataset.collater(samples)
        if not batch:
            return batch
        ids = batch["id"].numpy()
        batch["target_kw"] = torch.from_numpy(self.keywords[ids])
        batch["target_spk"] = torch.from_numpy(self.speakers[ids])
        batch["split"] = self.split
        return batch


class CorpusConcatDataset(ConcatDataset):
    """Several corpora's splits one after another, for evaluation: every batch holds one corpus
    (clips of different corpora never share a padded batch), ids and paths are global."""

    def __init__(self, datasets: Sequence[KwsSvDataset], split: str, prefixes: Sequence[str]):
        super().__init__(list(datasets))
        self.split = split
        self.offsets = [0] + self.cumulative_sizes[:-1]
        # paths of different corpora may coincide: prefix each with its corpus
        self.paths = [f"{prefix}{path}" for d, prefix in zip(datasets, prefixes) for path in d.paths]
        self.keywords = np.concatenate([d.keywords for d in datasets])
        self.speakers = np.concatenate([d.speakers for d in datasets])
        self.speaker_names = [name for d in datasets for name in d.speaker_names]

    def path_of(self, index: int) -> str:
        return self.paths[index]

    def corpus_of(self, index: int) -> int:
        return self._get_dataset_and_sample_index(index)[0]

    def collater(self, samples):
        if not samples:
            return {}
        corpus = samples[0]["corpus"]
        batch = self.datasets[corpus].collater(samples)
        if batch:
            batch["id"] = batch["id"] + self.offsets[corpus]
        return batch

    def __getitem__(self, idx):
        corpus, local = self._get_dataset_and_sample_index(idx)
        item = self.datasets[corpus][local]  # "id" is the corpus-local index the collater reads
        item["corpus"] = corpus
        return item

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        corpus = np.searchsorted(np.asarray(self.cumulative_sizes), indices, side="right")
        batches = []
        for c in range(len(self.datasets)):
            batches += super().batch_by_size(
                indices[corpus == c], max_tokens, max_sentences, required_batch_size_multiple
            )
        return batches


def split_roots(data: str) -> List[str]:
    """The corpus folders of ``task.data``: comma- or os.pathsep-separated."""
    return [root.strip() for root in str(data).replace(",", os.pathsep).split(os.pathsep) if root.strip()]


def corpus_distribution(ratios: Optional[Sequence[float]], sizes: Sequence[int], roots: Sequence[str]) -> List[float]:
    """``task.corpus_ratios`` (or the corpus sizes) normalised to sum to 1, as MultiCorpusDataset asserts."""
    weights = [float(r) for r in ratios] if ratios is not None else [float(n) for n in sizes]
    if len(weights) != len(roots):
        raise KwsSvDataError(
            f"task.corpus_ratios has {len(weights)} values but task.data names {len(roots)} folders "
            f"({', '.join(roots)}): give one ratio per folder"
        )
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise KwsSvDataError(f"task.corpus_ratios={list(weights)}: ratios must be >= 0 and not all 0")
    total = sum(weights)
    distribution = [w / total for w in weights]
    distribution[-1] = 1.0 - sum(distribution[:-1])  # exact sum 1
    return distribution


@register_task("kws_sv", dataclass=KwsSvConfig)
class KwsSvTask(FairseqTask):
    cfg: KwsSvConfig

    def __init__(self, cfg: KwsSvConfig):
        super().__init__(cfg)
        self.state.add_factory("keywords", self.load_keywords)
        self.state.add_factory("speakers", self.load_speakers)
        self.trials: Dict[str, List[Trial]] = {}
        self._embeddings: Dict[str, Dict[int, np.ndarray]] = {}  # split -> dataset index -> embedding
        self._sv_results: Dict[str, tuple] = {}  # split -> (embedded count, metrics)
        self._corpus_labels: Dict[str, tuple] = {}  # corpus folder -> (keyword labels?, speaker labels?)
        self._trials: Dict[tuple, List[Trial]] = {}  # (split, corpus folder) -> its trials, while loading

    @classmethod
    def setup_task(cls, cfg: KwsSvConfig, **kwargs):
        if not (cfg.kws or cfg.sv):
            raise KwsSvDataError("task.kws and task.sv are both false: nothing to train")
        return cls(cfg)

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None

    def max_positions(self):
        return sys.maxsize, sys.maxsize

    # -- label sets (kept in the checkpoint's task state) ---------------------------------------------
    @property
    def keywords(self) -> List[str]:
        return self.state.keywords if self.cfg.kws else []

    @property
    def speakers(self) -> List[str]:
        return self.state.speakers if self.cfg.sv else []

    def load_keywords(self) -> List[str]:
        return read_keywords(self.dict_path)

    def load_speakers(self) -> List[str]:
        """The training speakers of every speaker corpus, sorted: the classes of the speaker loss."""
        speakers = sorted({s for root in self.roots if self.corpus_labels(root)[1] for s in self.train_speaker_lines(root)})
        if len(speakers) < 2:
            raise KwsSvDataError(
                f"{self.label_path(self.cfg.train_subset, self.cfg.spk_labels)} names {len(speakers)} speaker(s); "
                f"training speaker embeddings needs at least 2"
            )
        return speakers

    # -- corpora (task.data may name several folders) -------------------------------------------------
    @property
    def roots(self) -> List[str]:
        return split_roots(self.cfg.data)

    @property
    def multi(self) -> bool:
        return len(self.roots) > 1

    def prefix(self, root: str) -> str:
        """What a corpus' row paths are prefixed with in a combined split (rows of two corpora may share a path)."""
        return f"{self.roots.index(root)}:" if self.multi else ""

    def corpus_labels(self, root: str) -> tuple:
        """(keyword labels?, speaker labels?) of a corpus. One corpus: the tasks switched on (a missing
        label file is an error); several: a label file whose training rows are not all '-'."""
        if not self.multi:
            return bool(self.cfg.kws), bool(self.cfg.sv)
        if root not in self._corpus_labels:
            split = self.cfg.train_subset
            if "speakers" in self.state.state_dict and not os.path.isfile(os.path.join(root, f"{split}.tsv")):
                return bool(self.cfg.kws), bool(self.cfg.sv)  # evaluating a checkpoint away from its training data
            found = [on and self.has_labels(os.path.join(root, f"{split}.{ext}"))
                     for ext, on in ((self.cfg.kw_labels, self.cfg.kws), (self.cfg.spk_labels, self.cfg.sv))]
            if not any(found):
                raise KwsSvDataError(
                    f"corpus {root} (task.data): no row of {split}.tsv carries a label of a task switched on "
                    f"(" + " / ".join(os.path.join(root, f"{split}.{ext}") for ext, on in
                                      ((self.cfg.kw_labels, self.cfg.kws), (self.cfg.spk_labels, self.cfg.sv)) if on)
                    + f" missing or all '{NO_LABEL}'): it would add nothing to any loss; remove it from task.data "
                    f"or write its labels"
                )
            self._corpus_labels[root] = tuple(found)
        return self._corpus_labels[root]

    @staticmethod
    def has_labels(path: str) -> bool:
        if not os.path.isfile(path):
            return False
        with open(path) as f:
            return any(line.split() and line.split()[0] != NO_LABEL for line in f)

    def train_speaker_lines(self, root: Optional[str] = None) -> Dict[str, int]:
        """``{speaker: first line in the training .spk}`` of a corpus; when evaluating a checkpoint away
        from its training data, the speakers saved in its task state (line 0: unknown)."""
        root = root or self.roots[0]
        split = self.cfg.train_subset
        if "speakers" in self.state.state_dict and not os.path.isfile(os.path.join(root, f"{split}.tsv")):
            return {speaker: 0 for speaker in self.state.speakers}
        _, paths = split_paths(root, split)
        return first_lines(read_labels(root, split, self.cfg.spk_labels, len(paths), "speaker"))

    @property
    def dict_path(self) -> str:
        """dict.kw.txt of the first corpus with keyword labels (they must all share it)."""
        keyword_roots = [root for root in self.roots if self.corpus_labels(root)[0]] or self.roots
        return os.path.join(keyword_roots[0], f"dict.{self.cfg.kw_labels}.txt")

    def label_path(self, split: str, ext: str, root: Optional[str] = None) -> str:
        return os.path.join(root or self.roots[0], f"{split}.{ext}")

    # -- data ------------------------------------------------------------------------------------------
    def load_dataset(self, split: str, combine: bool = False, task_cfg=None, **kwargs):
        parts = []
        for root in self.roots:
            kws, sv = self.corpus_labels(root)
            exts = [ext for ext, on in ((self.cfg.kw_labels, kws), (self.cfg.spk_labels, sv)) if on]
            # the manifest check every task runs; a filtered copy of the split when rows are skipped
            with checked_split(root, split, self.cfg, exts) as data:
                parts.append(self._load_split(split, data, root))
        if not self.multi:
            self.datasets[split] = parts[0]
        elif split == self.cfg.train_subset:
            # per-corpus batches in the sampled ratio (fairseq's MultiCorpusDataset, batch_sample)
            distribution = corpus_distribution(self.cfg.corpus_ratios, [len(p) for p in parts], self.roots)
            self.datasets[split] = MultiCorpusDataset(
                OrderedDict(zip(self.roots, parts)), distribution, seed=int(self.cfg.seed), sort_indices=True,
                batch_sample=True,
            )
        else:
            self.datasets[split] = CorpusConcatDataset(parts, split, [self.prefix(root) for root in self.roots])
        trials = [t for root in self.roots for t in self._trials.pop((split, root), [])]
        if any(self.corpus_labels(root)[1] for root in self.roots) and split != self.cfg.train_subset:
            self.trials[split] = trials

    def get_batch_iterator(self, dataset, max_tokens=None, *args, **kwargs):
        check_max_tokens(dataset, max_tokens, self.cfg.sample_rate)
        return super().get_batch_iterator(dataset, max_tokens, *args, **kwargs)

    def _load_split(self, split: str, data: str, root: str) -> KwsSvDataset:
        cfg = self.cfg
        kws, sv = self.corpus_labels(root)
        manifest, paths = split_paths(data, split)
        keyword_labels = [NO_LABEL] * len(paths)
        if kws and (not self.multi or os.path.isfile(os.path.join(data, f"{split}.{cfg.kw_labels}"))):
            keyword_labels = read_labels(data, split, cfg.kw_labels, len(paths), "keyword")
            check_keyword_labels(keyword_labels, self.keywords, self.label_path(split, cfg.kw_labels, root), self.dict_path)
        speaker_labels = [NO_LABEL] * len(paths)
        is_train = split == cfg.train_subset
        if sv and (not self.multi or os.path.isfile(os.path.join(data, f"{split}.{cfg.spk_labels}"))):
            speaker_labels = read_labels(data, split, cfg.spk_labels, len(paths), "speaker")
            if not is_train and cfg.disjoint_speakers:
                check_disjoint_speakers(
                    self.train_speaker_lines(root), self.label_path(cfg.train_subset, cfg.spk_labels, root),
                    first_lines(speaker_labels), self.label_path(split, cfg.spk_labels, root), f"the {split} split",
                )

        audio = FileAudioDataset(
            manifest_path=manifest,
            sample_rate=cfg.sample_rate,
            max_sample_size=cfg.max_sample_size if is_train else cfg.valid_max_sample_size,
            min_sample_size=cfg.min_sample_size,
            pad=True,
            normalize=cfg.normalize,
        )
        kept = [i for i in range(len(paths)) if i not in audio.skipped_indices]
        if not kept:
            raise KwsSvDataError(f"{manifest}: every utterance is shorter than task.min_sample_size={cfg.min_sample_size}")
        keyword_index = {k: i for i, k in enumerate(self.keywords)}
        speaker_index = {s: i for i, s in enumerate(self.speakers)}
        dataset = KwsSvDataset(
            audio,
            split,
            paths=[paths[i] for i in kept],
            keywords=np.array([keyword_index.get(keyword_labels[i], -1) for i in kept], dtype=np.int64),
            speakers=np.array([speaker_index.get(speaker_labels[i], -1) for i in kept], dtype=np.int64),
            speaker_names=[speaker_labels[i] for i in kept],
        )
        if sv and not is_train:
            self._trials[(split, root)] = self.trials_for(split, manifest, paths, speaker_labels, kept, root)
        logger.info(
            f"{root} {split}: {len(kept)} utterances"
            + (f" ({len(paths) - len(kept)} shorter than {cfg.min_sample_size} samples left out)" if len(kept) < len(paths) else "")
            + (f", {len(self._trials[(split, root)])} verification trials" if (split, root) in self._trials else "")
        )
        return dataset

    def trials_for(self, split: str, manifest: str, paths: List[str], speakers: List[str], kept: List[int],
                   root: str) -> List[Trial]:
        """The split's trial list (checked), or trials built from its speaker labels; paths prefixed
        with their corpus when there are several."""
        trials_path = os.path.join(root, self.cfg.trials) if self.cfg.trials else None
        if split == self.cfg.trials_split and trials_path and os.path.isfile(trials_path):
            trials = read_trials(trials_path)
            check_trials(trials, trials_path, paths, manifest)
            check_trial_speakers(trials, trials_path, dict(zip(paths, speakers)))
        else:
            trials = build_trials([paths[i] for i in kept], [speakers[i] for i in kept], self.cfg.valid_max_trials,
                                  TRIALS_SEED)
            kinds = {t.target for t in trials}
            if kinds != {0, 1}:  # an EER needs both: without, every checkpoint's metric is null
                labelled = {speakers[i] for i in kept if speakers[i] != NO_LABEL}
                raise KwsSvDataError(
                    f"{os.path.join(root, f'{split}.{self.cfg.spk_labels}')}: the {split} split's "
                    f"{len(labelled)} speaker(s) give no {'non-target' if 1 in kinds else 'target'} trial, so its "
                    f"EER (and checkpoint_best by it) is undefined: give it at least 2 speakers with 2 or more "
                    f"utterances each (fairseq-kd-prepare-kws-sv voxceleb1 --valid-speakers), or a trial list"
                )
        prefix = self.prefix(root)
        return [Trial(t.target, prefix + t.a, prefix + t.b, t.line) for t in trials] if prefix else trials

    def check_trial_split(self) -> None:
        """Each speaker corpus' trial list against its split and its training speakers, before
        training (the trial split itself is usually not loaded during training)."""
        if self.cfg.trials_split in self.datasets:
            return
        for root in self.roots:
            if self.corpus_labels(root)[1]:
                self.check_corpus_trials(root)

    def check_corpus_trials(self, root: str) -> None:
        cfg = self.cfg
        trials_path = os.path.join(root, cfg.trials) if cfg.trials else None
        if not trials_path or not os.path.isfile(trials_path):
            return
        if not os.path.isfile(os.path.join(root, f"{cfg.trials_split}.tsv")):
            logger.warning(f"{trials_path} is for task.trials_split={cfg.trials_split}, which has no manifest: not checked")
            return
        manifest, paths = split_paths(root, cfg.trials_split)
        speakers = read_labels(root, cfg.trials_split, cfg.spk_labels, len(paths), "speaker")
        trials = read_trials(trials_path)
        check_trials(trials, trials_path, paths, manifest)
        check_trial_speakers(trials, trials_path, dict(zip(paths, speakers)))
        if cfg.disjoint_speakers:
            listed = {p for t in trials for p in (t.a, t.b)}
            speaker_of = dict(zip(paths, speakers))
            check_disjoint_speakers(
                self.train_speaker_lines(root), self.label_path(cfg.train_subset, cfg.spk_labels, root),
                first_lines([speaker_of[p] for p in paths if p in listed]),
                self.label_path(cfg.trials_split, cfg.spk_labels, root), f"the trial list {trials_path}",
            )

    # -- model -----------------------------------------------------------------------------------------
    def build_model(self, model_cfg, from_checkpoint: bool = False):
        if not from_checkpoint:
            self.check_trial_split()
        model = super().build_model(model_cfg, from_checkpoint)
        if not from_checkpoint:
            check_run_folder(self.cfg, model_cfg, model)  # resuming save_dir must continue this run
        # as fairseq's audio_pretraining: the encoder's config goes into the saved config
        actual = getattr(model, "cfg", None)
        if actual is not None and actual.get("w2v_args", None) is not None:
            from omegaconf import open_dict

            with open_dict(model_cfg):
                model_cfg.w2v_args = actual.w2v_args
        return model

    # -- validation: keyword accuracy (criterion) and verification metrics (here) ---------------------
    def begin_valid_epoch(self, epoch, model):
        super().begin_valid_epoch(epoch, model)
        self._embeddings.clear()
        self._sv_results.clear()

    def valid_step(self, sample, model, criterion):
        model.eval()
        with torch.no_grad():
            net_output = model(**sample["net_input"])
            loss, sample_size, logging_output = criterion.compute(model, net_output, sample)
        split = sample.get("split")
        embedding = net_output.get("sv_embedding")
        if split in self.trials and embedding is not None:
            self.collect(split, sample["id"].tolist(), embedding.float().cpu().numpy())
            metrics.log_derived("eer", lambda meters, s=split: self.sv_metric(s, "eer"))
            metrics.log_derived("min_dcf", lambda meters, s=split: self.sv_metric(s, "min_dcf"))
            if self.cfg.kws:
                metrics.log_derived("joint_error", lambda meters, s=split: self.joint_error(s, meters))
        return loss, sample_size, logging_output

    def collect(self, split: str, ids: List[int], embeddings: np.ndarray) -> None:
        pairs = list(zip(ids, embeddings))
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, pairs)
            pairs = [pair for part in gathered for pair in part]
        self._embeddings.setdefault(split, {}).update(pairs)

    def sv_metric(self, split: str, key: str) -> Optional[float]:
        """EER / minDCF of ``split`` once all its utterances are embedded (None before)."""
        embedded = self._embeddings.get(split, {})
        dataset = self.datasets[split]
        if len(embedded) < len(dataset):
            return None
        cached = self._sv_results.get(split)
        if cached is None or cached[0] != len(embedded):
            named = {dataset.path_of(i): emb for i, emb in embedded.items()}
            result = verification_metrics(named, self.trials[split])
            if not result:
                logger.warning(f"{split}: no EER (the trials need target and non-target pairs of embedded utterances)")
            elif result["unscored_trials"]:
                logger.warning(f"{split}: {int(result['unscored_trials'])} trials name utterances left out of the split")
            cached = (len(embedded), result)
            self._sv_results[split] = cached
        value = cached[1].get(key)
        return None if value is None else round(value, 3 if key == "eer" else 4)

    def joint_error(self, split: str, meters) -> Optional[float]:
        eer = self.sv_metric(split, "eer")
        if eer is None or "kws_count" not in meters or float(meters["kws_count"].sum) == 0:
            return None
        return round(100.0 - 100.0 * float(meters["kws_correct"].sum) / float(meters["kws_count"].sum) + eer, 3)
