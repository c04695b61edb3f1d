"""Shared helpers: paths of the repo and the bundled corpus, and running console scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
BIN = Path(sys.executable).parent


def console_script(name: str) -> str:
    """Path of a console script installed beside this interpreter (the test venv's bin/)."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed beside {sys.executable}; run the README's install")
    return str(path)


def run(
    cmd: List[str],
    cwd: Optional[Path] = None,
    env: Optional[Dict[str, str]] = None,
    timeout: int = 600,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run a command; on failure show its output, which is where fairseq puts the reason."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def python_snippet(code: str, **kwargs) -> subprocess.CompletedProcess:
    return run([sys.executable, "-c", code], **kwargs)


@pytest.fixture(scope="session")
def fairseq_dir() -> Path:
    import fairseq

    return Path(fairseq.__file__).parent
