# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""An s3prl upstream for distilled students, loading only the standalone ``.pt2`` file.

Everything in this directory imports torch and the standard library only, because s3prl cannot
share fairseq's environment (s3prl 0.4.18 needs ``omegaconf>=2.1.1``, fairseq 0.12.2 ``<2.1``).
Install it into s3prl by copying the directory (the README's "SUPERB" section)::

    cp -r fairseq_kd/s3prl_upstream  <s3prl>/s3prl/upstream/fairseq_kd_student
    echo "from s3prl.upstream.fairseq_kd_student.hubconf import *" >> <s3prl>/s3prl/hub.py

then ``run_downstream.py -u fairseq_kd_student -k student.pt2 ...`` or
``S3PRLUpstream("fairseq_kd_student", path_or_url="student.pt2")``.
"""

from .expert import UpstreamExpert  # noqa: F401
from .runtime import StandaloneFileError, StandaloneStudent, read_metadata  # noqa: F401
