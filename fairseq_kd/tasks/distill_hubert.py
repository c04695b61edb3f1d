"""``distill_hubert``: audio-only distillation task on fairseq's manifest pipeline.

The dataset is fairseq's own ``FileAudioDataset`` (through ``AudioPretrainingTask``): tsv manifests,
``min/max_sample_size``, random crops, crop-to-shortest or padded batches, length buckets and
``max_tokens`` counted in samples. The task adds the teacher:

* it lives here, on the task: not a child of the model or the criterion, so fairseq's trainer never
  casts it, wraps it in DDP, flips it to train mode or writes it into a checkpoint;
* it is loaded by ``build_model`` when training starts (so a bad teacher fails before any step) and
  never when fine-tuning rebuilds the student with ``from_checkpoint=True``: a distilled checkpoint
  fine-tunes on a machine where the teacher file no longer exists.

With ``check_replicas`` (default on) every validation also proves that data-parallel training kept
one model: each rank sums its student's parameters in float64, the sums are all-gathered, rank 0
logs ``parameter checksums across N ranks: [...]`` and a difference stops training with an error.
fairseq saves checkpoints on rank 0 only, so without this a diverged replica would go unnoticed.

With ``init_student`` the student is not built from ``model`` but taken whole (config and weights)
from a materialised structured-pruning checkpoint (``fairseq-kd-materialise``): DPHuBERT's stage 2,
the final distillation. Its fields are written into ``cfg.model``, so every checkpoint of the run is
an ordinary one of the pruned, per-layer-width student. The update number reaches a criterion that
wants it (``prune_distill``'s sparsity ramp) through ``train_step``.

With ``seeded_crops`` (default on) random crops are a function of (seed, epoch, utterance), not of
numpy's global generator, so a run resumed from ``checkpoint_last.pt`` trains on exactly the data
the uninterrupted run would have (fairseq already restores the batch order).
"""


import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.audio_pretraining import AudioPretrainingConfig, AudioPretrainingTask
from omegaconf import II, MISSING, open_dict
from omegaconf.errors import MissingMandatoryValue

from fairseq_kd.data.audio_checks import ManifestCheckConfig, check_max_tokens, checked_split
from fairseq_kd.data.seeded_crops import seed_crops, task_crop_seed
from fairseq_kd.distributed import check_replicas
from fairseq_kd.encoders.hf import LAYER0_CHOICES, LAYER0_HELP
from fairseq_kd.encoders.pretrained import read_checkpoint
from fairseq_kd.models.pruning import PruningError, check_stage2_checkpoint
from fairseq_kd.tasks.run_folder import FINGERPRINT_KEY, RunFolderConfig, check_run_folder, fingerprint
from fairseq_kd.teacher import FrozenTeacher, TeacherError, check_layers, initialise_student

logger = logging.getLogger(__name__)

TEACHER_DTYPE_CHOICES = ChoiceEnum(["fp32", "bf16", "fp16"])
TEACHER_LAYER0_CHOICES = ChoiceEnum(list(LAYER0_CHOICES))


@dataclass
class DistillHubertConfig(AudioPretrainingConfig, ManifestCheckConfig, RunFolderConfig):
    # data checks (task.validate_audio, audio_check, skip_bad_rows): ManifestCheckConfig
    # teacher
    teacher_path: str = field(
        default=MISSING,
        metadata={"help": "fairseq HuBERT / wav2vec 2.0 checkpoint to distil from (e.g. hubert_base_ls960.pt), "
                  "or a local transformers HuBERT / wav2vec 2.0 / WavLM / data2vec-audio folder (config.json; "
                  "the 'hf' extra)"},
    )
    teacher_layer0: TEACHER_LAYER0_CHOICES = field(
        default="projection",
        metadata={"help": "what teacher layer 0 is: " + LAYER0_HELP},
    )
    teacher_dtype: TEACHER_DTYPE_CHOICES = field(
        default="fp32",
        metadata={"help": "dtype of the teacher's forward pass; its outputs are always float32"},
    )
    # structured pruning, stage 2
    init_student: Optional[str] = field(
        default=None,
        metadata={
            "help": "start from this materialised pruned student (fairseq-kd-materialise's output): its "
            "cfg.model replaces every model.* field (the pruned per-layer widths; also dropouts and heads) "
            "and its weights are loaded; a stage-1 or other non-materialised checkpoint is refused. "
            "None = build the student from model.*"
        },
    )
    # reproducibility
    seeded_crops: bool = field(
        default=True,
        metadata={
            "help": "draw each random crop offset (utterances longer than max_sample_size, or than the "
            "batch's crop length) from a generator seeded by (seed, epoch, utterance id) instead of "
            "numpy's global state: a run resumed mid-epoch sees the same crops as an uninterrupted one, "
            "validation crops are the same at every validation, and prefetch threads or data workers "
            "cannot change them"
        },
    )
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of the crop offsets (common.seed)"})
    # distributed checks
    check_replicas: bool = field(
        default=True,
        metadata={
            "help": "at each validation (fairseq's begin_valid_epoch hook, which runs on every rank), "
            "all-gather a float64 checksum of the student's parameters from every data-parallel rank, "
            "log them on rank 0 and stop with an error if they differ; skipped with a single process"
        },
    )


@register_task("distill_hubert", dataclass=DistillHubertConfig)
class DistillHubertTask(AudioPretrainingTask):
    cfg: DistillHubertConfig

    def __init__(self, cfg: DistillHubertConfig, teacher: Optional[FrozenTeacher] = None):
        super().__init__(cfg)
        self._teacher = teacher

    @classmethod
    def setup_task(cls, cfg: DistillHubertConfig, teacher: Optional[FrozenTeacher] = None, **kwargs):
        """No file I/O: hubert_ctc / wav2vec_ctc rebuild this task when fine-tuning.

        ``teacher``: an already built teacher (the benchmark's random HuBERT Base, the report's
        loaded one) used instead of reading ``task.teacher_path``; ``tasks.setup_task(cfg,
        teacher=...)`` passes it through.
        """
        return cls(cfg, teacher=teacher)

    # -- data ------------------------------------------------------------------------------------
    def load_dataset(self, split: str, task_cfg=None, **kwargs):
        result = self._load_checked_dataset(split, task_cfg, **kwargs)
        if self.cfg.seeded_crops:
            seed_crops(self.datasets[split], task_crop_seed(self.cfg))
        return result

    def _load_checked_dataset(self, split: str, task_cfg=None, **kwargs):
        task_cfg = task_cfg or self.cfg
        if getattr(task_cfg, "binarized_dataset", False):
            return super().load_dataset(split, task_cfg, **kwargs)
        with checked_split(self.cfg.data, split, self.cfg) as data:
            # point fairseq's loader at the checked folder (a filtered copy when rows are skipped)
            original_data = self.cfg.data
            self.cfg.data = data
            try:
                return super().load_dataset(split, task_cfg, **kwargs)
            finally:
                self.cfg.data = original_data

    def get_batch_iterator(self, dataset, max_tokens=None, *args, **kwargs):
        check_max_tokens(dataset, max_tokens, self.cfg.sample_rate)
        return super().get_batch_iterator(dataset, max_tokens, *args, **kwargs)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        set_num_updates = getattr(criterion, "set_num_updates", None)  # prune_distill's target ramp
        if callable(set_num_updates):
            set_num_updates(update_num)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    # -- distributed checks ----------------------------------------------------------------------
    def begin_valid_epoch(self, epoch, model):
        """fairseq's trainer calls this on every rank before each validation pass."""
        super().begin_valid_epoch(epoch, model)
        if self.cfg.check_replicas:
            check_replicas(model)

    # -- teacher ---------------------------------------------------------------------------------
    @property
    def teacher(self) -> FrozenTeacher:
        if self._teacher is None:
            self._teacher = self.load_teacher()
        return self._teacher

    def load_teacher(self) -> FrozenTeacher:
        try:
            path = self.cfg.teacher_path
        except MissingMandatoryValue:  # `???` in the yaml and not given on the command line
            path = None
        if path in (None, "", MISSING, "???"):
            raise TeacherError(
                "task.teacher_path is not set: give the teacher checkpoint, "
                "e.g. task.teacher_path=hubert_base_ls960.pt"
            )
        try:
            teacher = FrozenTeacher.from_checkpoint(
                path, dtype=str(self.cfg.teacher_dtype), layer0=str(self.cfg.teacher_layer0)
            )
        except TeacherError as error:
            raise TeacherError(f"task.teacher_path: {error}") from None
        teacher_rate = teacher.cfg.task.get("sample_rate", 16000) if teacher.cfg is not None else 16000
        if int(teacher_rate) != int(self.cfg.sample_rate):
            raise TeacherError(
                f"task.sample_rate={self.cfg.sample_rate} but the teacher {path} was trained on "
                f"{teacher_rate} Hz audio: resample the data to {teacher_rate} Hz "
                f"(fairseq-kd-prepare-asr --resample) and set task.sample_rate={teacher_rate}"
            )
        if bool(teacher.normalize) != bool(self.cfg.normalize):
            raise TeacherError(
                f"task.normalize={self.cfg.normalize} but the teacher {path} was trained with "
                f"normalize={teacher.normalize}{_source(teacher)}: set task.normalize={str(teacher.normalize).lower()} "
                "so the student sees the audio the way the teacher did"
            )
        return teacher

    def build_model(self, model_cfg, from_checkpoint: bool = False):
        model = super().build_model(model_cfg, from_checkpoint)
        if from_checkpoint:
            return model  # fine-tuning / decoding: never touch the teacher
        if self.cfg.init_student:
            return self.build_init_student(model_cfg)
        teacher = self.teacher
        check_student_against_teacher(model_cfg, teacher)
        copied = initialise_student(model, model_cfg, teacher)
        if copied:
            logger.info(f"initialised {len(copied)} student tensors from the teacher")
        self.check_run_folder(model_cfg, model)
        return model

    def build_init_student(self, model_cfg):
        """``task.init_student``: the materialised student, its fields written into ``model_cfg``
        (the run's ``cfg.model``, which every checkpoint of the run stores)."""
        path = self.cfg.init_student
        checkpoint = read_init_student(path)
        check_distilled_outputs(model_cfg, checkpoint["cfg"]["model"], path)
        with open_dict(model_cfg):
            for key, value in checkpoint["cfg"]["model"].items():
                model_cfg[key] = value
        model = super().build_model(model_cfg, False)
        model.load_state_dict(checkpoint["model"], strict=True, model_cfg=model_cfg)
        check_student_against_teacher(model_cfg, self.teacher)
        logger.info(f"student: the materialised pruned model of {path} (task.init_student)")
        self.check_run_folder(model_cfg, model)
        return model

    def check_run_folder(self, model_cfg, model) -> None:
        """Resuming ``checkpoint.save_dir`` must continue this run (tasks/run_folder.py); the
        teacher's fingerprint goes into the task state, so into every checkpoint."""
        path = getattr(self._teacher, "path", None) or self.cfg.get("teacher_path", None)
        if not isinstance(path, str) or not os.path.exists(path):
            return  # a teacher built in memory (benchmark, report)
        digest = fingerprint(path)
        self.state.merge_state_dict({FINGERPRINT_KEY: digest})
        check_run_folder(self.cfg, model_cfg, model, teacher_path=path, teacher_fingerprint=digest)


def read_init_student(path: str) -> dict:
    """A ``task.init_student`` checkpoint (the project's checked reader), checked to be a
    materialised student."""
    checkpoint = read_checkpoint(path, f"task.init_student={path}",
                                 "give the checkpoint that fairseq-kd-materialise wrote", PruningError)
    check_stage2_checkpoint(checkpoint, f"task.init_student={path}")
    return checkpoint


def check_distilled_outputs(model_cfg, student_cfg, path: str) -> None:
    """The criterion pairs teacher layers with ``model.hint_layer_ids`` / ``pred_layer_ids`` as the
    run's config resolved them, so they must be the ``init_student`` checkpoint's own."""
    for key in ("hint_layer_ids", "pred_layer_ids"):
        given, own = list(model_cfg.get(key, None) or []), list(student_cfg.get(key, None) or [])
        if given != own:
            raise PruningError(f"model.{key}={given} but the student of task.init_student={path} has {own}: "
                               f"set model.{key}={own} (the criterion distils the outputs the config names)")


def _source(teacher: FrozenTeacher) -> str:
    where = getattr(teacher, "normalize_source", None)  # a transformers teacher: file and key
    return f" ({where})" if where else ""


def check_student_against_teacher(model_cfg, teacher: FrozenTeacher) -> None:
    """Settings that only make sense for this teacher, checked before any compute."""
    heads = list(model_cfg.hint_layer_ids) + list(model_cfg.pred_layer_ids)
    if heads and model_cfg.teacher_embed_dim != teacher.embed_dim:
        raise TeacherError(
            f"model.teacher_embed_dim={model_cfg.teacher_embed_dim} but the teacher {teacher.path} "
            f"has {teacher.embed_dim}-dimensional layers: set model.teacher_embed_dim={teacher.embed_dim}"
        )
    check_layers(teacher, model_cfg.pred_layer_ids, "model.pred_layer_ids")
