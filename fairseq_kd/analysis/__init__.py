"""The Deep-versus-Wide study and layer analysis (``fairseq-kd-family``, ``fairseq-kd-analyze``,
``fairseq-kd-cluster-layers``): linear CKA, constant-budget student families, per-layer features of
students and teachers, linear probes, SKILL-style layer clustering and their plots."""
