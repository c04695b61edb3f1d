"""``distill_hubert``: audio-only distillation task on fairseq's manifest pipeline.

The dataset is fairseq's own ``FileAudioDataset`` (through ``AudioPretrainingTask``): tsv manifests,
``min/max_sample_size``, random crops, crop-to-shortest or padded batches, length buckets and
``max_tokens`` counted in samples. The task adds the teacher:

* it lives here, on the task: not a child of the model or the criterion, so fairseq's trainer never
  casts it, wraps it in DDP, flips it to train mode or writes it into a checkpoint;
* it is loaded by ``build_model`` when training starts (so a bad teacher fails before any step) and
  never when fine-tuning rebuilds the student with ``from_checkpoint=True``: a distilled checkpoint
  fine-tunes on a machine where the teacher file no longer exists.
"""


import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.audio_pretraining import AudioPretrainingConfig, AudioPretrainingTask
from omegaconf import MISSING

from fairseq_kd.data.audio_checks import validated_manifest
from fairseq_kd.teacher import FrozenTeacher, TeacherError, check_layers

logger = logging.getLogger(__name__)

TEACHER_DTYPE_CHOICES = ChoiceEnum(["fp32", "bf16", "fp16"])


@dataclass
class DistillHubertConfig(AudioPretrainingConfig):
    # teacher
    teacher_path: str = field(
        default=MISSING,
        metadata={"help": "fairseq HuBERT / wav2vec 2.0 checkpoint to distil from (e.g. hubert_base_ls960.pt)"},
    )
    teacher_dtype: TEACHER_DTYPE_CHOICES = field(
        default="fp32",
        metadata={"help": "dtype of the teacher's forward pass; its outputs are always float32"},
    )
    # data checks
    validate_audio: bool = field(
        default=True,
        metadata={
            "help": "before training, read every manifest row's audio header: missing files, wrong "
            "sample rate, multi-channel or empty audio and stale sample counts are errors"
        },
    )
    skip_bad_rows: bool = field(
        default=False,
        metadata={"help": "skip (and count) bad manifest rows instead of stopping with an error"},
    )


@register_task("distill_hubert", dataclass=DistillHubertConfig)
class DistillHubertTask(AudioPretrainingTask):
    cfg: DistillHubertConfig

    def __init__(self, cfg: DistillHubertConfig):
        super().__init__(cfg)
        self._teacher: Optional[FrozenTeacher] = None
        self.student_cfg = None

    @classmethod
    def setup_task(cls, cfg: DistillHubertConfig, **kwargs):
        return cls(cfg)  # no file I/O: hubert_ctc / wav2vec_ctc rebuild this task when fine-tuning

    # -- data ------------------------------------------------------------------------------------
    def load_dataset(self, split: str, task_cfg=None, **kwargs):
        task_cfg = task_cfg or self.cfg
        manifest = os.path.join(self.cfg.data, f"{split}.tsv")
        if getattr(task_cfg, "binarized_dataset", False) or not self.cfg.validate_audio:
            return super().load_dataset(split, task_cfg, **kwargs)
        checked = validated_manifest(manifest, self.cfg.sample_rate, self.cfg.skip_bad_rows)
        if checked == manifest:
            return super().load_dataset(split, task_cfg, **kwargs)
        # point fairseq's loader at the filtered copy, then restore the configured data folder
        original_data = self.cfg.data
        self.cfg.data = os.path.dirname(checked)
        try:
            return super().load_dataset(split, task_cfg, **kwargs)
        finally:
            self.cfg.data = original_data

    # -- teacher ---------------------------------------------------------------------------------
    @property
    def teacher(self) -> FrozenTeacher:
        if self._teacher is None:
            self._teacher = self.load_teacher()
        return self._teacher

    def load_teacher(self) -> FrozenTeacher:
        path = self.cfg.teacher_path
        if path in (None, "", MISSING, "???"):
            raise TeacherError("task.teacher_path is not set: give the teacher checkpoint, e.g. task.teacher_path=hubert_base_ls960.pt")
        teacher = FrozenTeacher.from_checkpoint(path, dtype=str(self.cfg.teacher_dtype))
        if bool(teacher.normalize) != bool(self.cfg.normalize):
            raise TeacherError(
                f"task.normalize={self.cfg.normalize} but the teacher {path} was trained with "
                f"normalize={teacher.normalize}: set task.normalize={str(teacher.normalize).lower()} "
                "so the student sees the audio the way the teacher did"
            )
        logger.info(
            f"teacher {path}: {teacher.kind}, {teacher.num_layers} layers x {teacher.embed_dim}, "
            f"normalize={teacher.normalize}, dtype={self.cfg.teacher_dtype}"
        )
        return teacher

    def teacher_on(self, device) -> FrozenTeacher:
        """The teacher on the device of the batch (moved once, lazily)."""
        return self.teacher.to(device)

    def build_model(self, model_cfg, from_checkpoint: bool = False):
        model = super().build_model(model_cfg, from_checkpoint)
        if from_checkpoint:
            return model  # fine-tuning / decoding: never touch the teacher
        teacher = self.teacher
        check_student_against_teacher(model_cfg, teacher)
        self.student_cfg = model_cfg  # lets the criterion check its layer mapping before training
        copied = model.init_from_teacher(
            teacher.model.state_dict(),
            teacher.cfg.model,
            init_cnn=model_cfg.init_teacher_cnn,
            init_pos_conv=model_cfg.init_teacher_pos_conv,
            init_layers=model_cfg.init_teacher_layers,
        )
        if copied:
            logger.info(f"initialised {len(copied)} student tensors from the teacher")
        return model


def check_student_against_teacher(model_cfg, teacher: FrozenTeacher) -> None:
    """Settings that only make sense for this teacher, checked before any compute."""
    heads = list(model_cfg.hint_layer_ids) + list(model_cfg.pred_layer_ids)
    if heads and model_cfg.teacher_embed_dim != teacher.embed_dim:
        raise TeacherError(
            f"model.teacher_embed_dim={model_cfg.teacher_embed_dim} but the teacher {teacher.path} "
            f"has {teacher.embed_dim}-dimensional layers: set model.teacher_embed_dim={teacher.embed_dim}"
        )
    check_layers(teacher, model_cfg.pred_layer_ids, "model.pred_layer_ids")
