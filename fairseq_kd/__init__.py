"""fairseq_kd: knowledge distillation of self-supervised speech models, as a fairseq plugin.

Importing the package registers its task, models and criterions with fairseq, so it works both as
``common.user_dir=fairseq_kd`` and as a plain import (fairseq skips the user-dir scan for a package
that is already imported).
"""

import os as _os
import sys as _sys

if _os.path.basename(_sys.argv[0] if _sys.argv else "").startswith("fairseq-kd-"):
    # our console scripts: fairseq logs at INFO while it is imported (below), before any
    # script can set its log level; --verbose / FAIRSEQ_KD_VERBOSE=1 keep those lines
    from fairseq_kd.cli.logs import quiet_imports

    quiet_imports()

from fairseq_kd import criterions, models, tasks  # noqa: E402,F401  (registration side effects)

__version__ = "0.1.0"
