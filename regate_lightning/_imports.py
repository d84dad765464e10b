"""Importing by name: a package's lazy exports (PEP 562), and objects named by dotted path in recipes.

A package ``__init__`` that imported its drivers eagerly would make ``import regate_lightning.policy``
import Lightning, and ``import regate_lightning.data.vision`` import PyAV; with a lazy ``__init__``
every submodule costs only what it imports itself.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


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


def is_dotted_path(text: str) -> bool:
    """Whether ``text`` reads as a Python dotted path (``package.module.name``), not a hub id or a file path.

    Example:
        >>> is_dotted_path("regate_lightning.testing.tiny_llava"), is_dotted_path("Qwen/Qwen2.5-VL-3B-Instruct")
        (True, False)
    """
    return _DOTTED.fullmatch(text) is not None


def import_object(path: str, argument: str) -> Any:
    """The object a dotted path names (``package.module.name``), with errors that name the argument and the path.

    Args:
        path: the dotted path.
        argument: the argument that gave it, quoted in errors (e.g. ``"model"``).

    Raises:
        ValueError: ``path`` is not a dotted path, its module cannot be imported (the import error is
            included), or the module has no such attribute.

    Example:
        >>> import_object("math.sqrt", "function")(9.0)
        3.0
        >>> import_object("math.cube", "function")
        Traceback (most recent call last):
        ...
        ValueError: `function` 'math.cube': module 'math' has no attribute 'cube'
    """
    if not is_dotted_path(path):
        raise ValueError(f"`{argument}` {path!r} is not a dotted path (package.module.name)")
    module, _, name = path.rpartition(".")
    try:
        found = importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"`{argument}` {path!r}: module {module!r} cannot be imported ({err})") from err
    if not hasattr(found, name):
        raise ValueError(f"`{argument}` {path!r}: module {module!r} has no attribute {name!r}")
    return getattr(found, name)
