"""How every console script reports the project's own errors: one message, exit code 2.

The project's errors (every exception class defined in ``fairseq_kd`` or ``fairseq_kd_compat``:
``ManifestError``, ``TeacherError``, ``UnsafeCheckpointError``, ...) already name the file, line
or key and say how to fix it, so a traceback only hides the message. ``@clean_errors`` on a
script's ``main`` prints ``<script>: error: <message>`` on stderr and returns 2;
``FAIRSEQ_KD_DEBUG=1`` prints the traceback too. Other exceptions (bugs) keep their traceback.
``fairseq-hydra-train`` gets the same treatment from the compatibility layer's ``clean_errors``
fix (hydra prints the job's errors there), with the same rule (``is_project_error``).
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Callable, Optional

from fairseq_kd_compat.errors import ENV_DEBUG, debug_enabled, is_project_error

__all__ = ["ENV_DEBUG", "clean_errors", "debug_enabled", "is_project_error", "report"]


def report(error: BaseException, prog: Optional[str] = None) -> int:
    """Print ``error`` as the scripts do; returns the exit code (2)."""
    prog = prog or os.path.basename(sys.argv[0] or "fairseq-kd")
    if debug_enabled():
        traceback.print_exception(type(error), error, error.__traceback__)
    message = str(error) or type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    if not debug_enabled():
        print(f"({ENV_DEBUG}=1 shows the traceback)", file=sys.stderr)
    return 2


def clean_errors(main: Callable) -> Callable:
    """Decorate a console script's ``main``: the project's errors become ``report`` + exit code 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as error:  # noqa: BLE001 - only the project's own errors are reported cleanly
            if not is_project_error(error):
                raise
            return report(error)

    return wrapped
