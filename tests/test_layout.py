"""The layout README.md describes ("How the code is laid out"): imports only go downwards.

Each package sits on a level; a module may import its own package and the levels below it, never a
level above or a neighbour on its own level. ``import fairseq_kd`` (the package root, whose import
registers the tasks, models and criterions with fairseq) is allowed everywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "fairseq_kd"
LEVELS = [
    ("encoders", "s3prl_upstream"),  # torch + fairseq plumbing; the upstream needs torch alone
    ("data", "distributed"),
    ("models", "teacher"),
    ("criterions",),
    ("evaluation",),
    ("analysis",),  # the Deep-versus-Wide study: reads evaluation, teacher, criterions, data
    ("tasks",),
    ("export", "presets", "prep"),
    ("benchmark",),
    ("cli",),
]
LEVEL = {name: i for i, names in enumerate(LEVELS) for name in names}


def part(module: str) -> str:
    """``fairseq_kd.models.kws_sv`` -> ``models``."""
    return module.split(".")[1]


def internal_imports() -> Iterator[Tuple[str, str]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                if name.startswith("fairseq_kd.") or name == "fairseq_kd":
                    yield module, name


def test_every_package_has_a_level():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert parts == set(LEVEL), sorted(parts ^ set(LEVEL))


def test_imports_only_go_downwards():
    upward = []
    for module, target in internal_imports():
        if target == "fairseq_kd" or module == "fairseq_kd.__init__":
            continue  # the package root: registration side effects only
        source, goal = part(module), part(target)
        if source == goal:
            continue
        if LEVEL[goal] >= LEVEL[source]:
            upward.append(f"{module} imports {target}")
    assert not upward, "\n".join(upward)
