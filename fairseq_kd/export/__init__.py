# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Export distilled students for deployment and SUPERB: standalone torch.export files and ONNX."""

from fairseq_kd.export.checkpoints import ExportInputError, LoadedStudent, load_student  # noqa: F401
from fairseq_kd.export.standalone import StudentEncoder, export_standalone  # noqa: F401
