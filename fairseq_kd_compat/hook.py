"""A post-import hook: run a patch on a module right after its own code has executed.

Used so that each fix touches only the module it mends, and only when that module is imported
(``python -c pass`` pays nothing for fairseq modules it never loads).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, patches: List[Callable[[ModuleType], None]]):
        self._loader = loader
        self._patches = patches

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        for patch in self._patches:
            patch(module)

    def __getattr__(self, name):  # get_source, get_filename, is_package, ... for inspect/pkgutil
        return getattr(self._loader, name)


class PostImportPatcher(importlib.abc.MetaPathFinder):
    """Meta-path finder that wraps the real loader of the watched modules."""

    def __init__(self, patches: Dict[str, List[Callable[[ModuleType], None]]]):
        self._patches = patches

    @classmethod
    def register(cls, patches: Dict[str, List[Callable[[ModuleType], None]]]) -> None:
        if not patches:
            return
        finder = cls(patches)
        sys.meta_path.insert(0, finder)
        # A module imported before the hook existed is patched in place.
        for name, module_patches in patches.items():
            module = sys.modules.get(name)
            if module is not None:
                for patch in module_patches:
                    patch(module)

    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname not in self._patches:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, self._patches[fullname])
        return spec
