"""``clean_errors``: a fairseq_kd error in a ``fairseq-hydra-train`` job is one message, exit code 2.

hydra 1.0's ``run_and_report`` prints every exception of the job as a traceback (the message on the
last line) and exits with 1. The project's errors (classes defined in ``fairseq_kd`` or
``fairseq_kd_compat``) name the file, line or key and the fix already: the fix prints them as
``<Type>: <message>`` and exits with 2; ``FAIRSEQ_KD_DEBUG=1`` (or hydra's ``HYDRA_FULL_ERROR=1``)
shows the traceback. Any other exception is reported as hydra does. Only ``hydra._internal.utils``
is changed; the console scripts of fairseq_kd use the same rule (``fairseq_kd/cli/errors.py``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

ENV_DEBUG = "FAIRSEQ_KD_DEBUG"
PROJECT_MODULES = ("fairseq_kd", "fairseq_kd_compat")


def debug_enabled() -> bool:
    return os.environ.get(ENV_DEBUG, "").strip().lower() in ("1", "true", "yes", "on")


def is_project_error(error: BaseException) -> bool:
    """Whether ``error`` is one of the project's own (a class defined in fairseq_kd*)."""
    for cls in type(error).__mro__:
        module = getattr(cls, "__module__", "") or ""
        if module.split(".")[0] in PROJECT_MODULES:
            return True
    return False


def patch_run_and_report(module: Any) -> None:
    original = module.run_and_report

    def run_and_report(func: Any) -> Any:
        caught = []

        def job() -> Any:
            try:
                return func()
            except Exception as error:
                if is_project_error(error) and not debug_enabled() and not os.environ.get("HYDRA_FULL_ERROR"):
                    caught.append(error)
                    return None
                raise

        result = original(job)
        if caught:
            error = caught[0]
            sys.stderr.write(f"{type(error).__name__}: {error}\n({ENV_DEBUG}=1 shows the traceback)\n")
            sys.stderr.flush()
            sys.exit(2)
        return result

    module.run_and_report = run_and_report
