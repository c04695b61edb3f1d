from fairseq_kd.tasks import distill_hubert  # noqa: F401
