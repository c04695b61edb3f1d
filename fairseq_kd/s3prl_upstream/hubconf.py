# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""s3prl hub entry: each public callable here becomes an upstream name (``-u fairseq_kd_student``).

s3prl's ``hub.py`` does ``from s3prl.upstream.<dir>.hubconf import *``, hence ``__all__``.
"""

from .expert import UpstreamExpert as _UpstreamExpert

__all__ = ["fairseq_kd_student"]


def fairseq_kd_student(ckpt: str = None, *args, **kwargs) -> _UpstreamExpert:
    """A distilled student exported by fairseq-kd-export: ``-u fairseq_kd_student -k student.pt2``."""
    return _UpstreamExpert(ckpt, *args, **kwargs)
