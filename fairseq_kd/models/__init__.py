from fairseq_kd.models import thin_hubert  # noqa: F401
from fairseq_kd.models import thin_hubert_ctc  # noqa: F401
from fairseq_kd.models import kws_sv  # noqa: F401
