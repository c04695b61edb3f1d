"""Seeded random crops for fairseq's audio datasets (``task.seeded_crops`` of ``distill_hubert``).

fairseq's ``RawAudioDataset.collater`` crops every utterance longer than the batch's target length
at an offset from ``np.random.randint``, i.e. numpy's global generator. That generator is seeded
once when training starts (``fairseq_cli/train.py``) and then advanced by every crop, in whichever
thread collates (the ``BufferedIterator`` prefetch thread, or each DataLoader worker). After a
resume it is re-seeded, so from the first cropped batch on, a resumed run trains on different crops
than the uninterrupted run, although fairseq restores the batch order exactly. Here a crop offset is
a function of (seed, epoch, utterance id) instead.
"""

import logging
from typing import List

import numpy as np
import torch
from fairseq.data.audio.raw_audio_dataset import BinarizedAudioDataset, FileAudioDataset, RawAudioDataset

logger = logging.getLogger(__name__)


def task_crop_seed(cfg) -> int:
    """``task.seed`` (= ``common.seed``), or 1 where the task config is used outside a training config."""
    try:
        seed = cfg.seed
    except Exception:  # an unresolvable ${common.seed} (task config built on its own)
        return 1
    return abs(seed) if isinstance(seed, int) else 1


class SeededCropsMixin(RawAudioDataset):
    """Crop offsets from a generator seeded by (seed, epoch, utterance id).

    A RawAudioDataset subclass (not a plain mixin) so that the combined classes keep the object
    layout of fairseq's datasets, which lets ``seed_crops`` switch a loaded dataset's class.
    """

    crop_seed: int = 1
    crop_epoch: int = 1  # validation never calls set_epoch: its crops stay those of epoch 1

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        self.crop_epoch = epoch

    def collater(self, samples):
        # the crop fairseq's collater would do, done first with seeded offsets; the collater then
        # finds every source already at its target length (same target: see crop_target)
        kept = [s for s in samples if s["source"] is not None]
        if kept:
            target = self.crop_target([len(s["source"]) for s in kept])
            samples = [
                s if s["source"] is None else {**s, "source": self.seeded_crop(s["source"], target, int(s["id"]))}
                for s in samples
            ]
        return super().collater(samples)

    def crop_target(self, sizes: List[int]) -> int:
        """RawAudioDataset.collater's target length (unchanged by cropping to it)."""
        return min(max(sizes) if self.pad else min(sizes), self.max_sample_size)

    def seeded_crop(self, wav: torch.Tensor, target_size: int, index: int) -> torch.Tensor:
        diff = len(wav) - target_size
        if diff <= 0:
            return wav
        rng = np.random.default_rng([self.crop_seed, self.crop_epoch, index])
        start = int(rng.integers(0, diff + 1))
        return wav[start : start + target_size]


class SeededCropsFileAudioDataset(SeededCropsMixin, FileAudioDataset):
    pass


class SeededCropsBinarizedAudioDataset(SeededCropsMixin, BinarizedAudioDataset):
    pass


SEEDED_CLASSES = {
    FileAudioDataset: SeededCropsFileAudioDataset,
    BinarizedAudioDataset: SeededCropsBinarizedAudioDataset,
}


def seed_crops(dataset, seed: int) -> None:
    """Give a loaded fairseq audio dataset seeded crop offsets (other datasets are left alone)."""
    if isinstance(dataset, SeededCropsMixin):
        dataset.crop_seed = seed
        return
    seeded = SEEDED_CLASSES.get(type(dataset))
    if seeded is None:
        logger.warning(
            f"task.seeded_crops: {type(dataset).__name__} is not one of fairseq's audio datasets; "
            "its crops are left as they are"
        )
        return
    # Switch the class of the loaded instance, in place: AudioPretrainingTask.load_dataset builds it
    # (building the subclass directly would copy that method), and a wrapper would be another object
    # without FileAudioDataset's attributes (pad, fnames, ...) or isinstance. Same state; only the
    # collater and set_epoch change.
    dataset.__class__ = seeded
    dataset.crop_seed = seed
