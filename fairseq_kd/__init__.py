"""fairseq_kd: knowledge distillation of self-supervised speech models, as a fairseq plugin.

Importing the package registers its task, models and criterions with fairseq, so it works both as
``common.user_dir=fairseq_kd`` and as a plain import (fairseq skips the user-dir scan for a package
that is already imported).
"""

from fairseq_kd import criterions, models, tasks  # noqa: F401  (registration side effects)

__version__ = "0.1.0"
