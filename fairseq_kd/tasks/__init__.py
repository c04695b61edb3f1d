from fairseq_kd.tasks import distill_hubert  # noqa: F401
from fairseq_kd.tasks import kd_finetuning  # noqa: F401
from fairseq_kd.tasks import kws_sv  # noqa: F401
