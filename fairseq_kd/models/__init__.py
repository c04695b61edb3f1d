from fairseq_kd.models import thin_hubert  # noqa: F401
