"""The offline data commands' work (run once, before training): corpora, manifests, labels, lexicons.

Their command lines are in ``fairseq_kd/cli/``. These modules may import ``fairseq_kd.data`` (what
training reads at run time); nothing under ``fairseq_kd.data`` imports them.
"""
