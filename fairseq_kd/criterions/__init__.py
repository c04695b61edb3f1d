from fairseq_kd.criterions import layer_distill  # noqa: F401
