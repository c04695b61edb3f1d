from fairseq_kd.criterions import layer_distill  # noqa: F401
from fairseq_kd.criterions import kws_sv  # noqa: F401
from fairseq_kd.criterions import temporal_relation  # noqa: F401
from fairseq_kd.criterions import prune_distill  # noqa: F401
