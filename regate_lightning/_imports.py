"""Names a package exports, imported on first use (PEP 562).

A package ``__init__`` that imported its drivers eagerly would make ``import regate_lightning.policy``
import Lightning, and ``import regate_lightning.data.vision`` import PyAV; with a lazy ``__init__``
every submodule costs only what it imports itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package whose names live in its submodules.

    Args:
        package: the package's ``__name__`` (for the error message).
        exports: exported name -> the dotted module that defines it.

    Returns:
        ``(__getattr__, __dir__)`` to assign in the package's ``__init__``.

    Example:
        >>> getattr_, dir_ = lazy_exports("pkg", {"sqrt": "math"})
        >>> getattr_("sqrt")(4.0), dir_()
        (2.0, ['sqrt'])
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
