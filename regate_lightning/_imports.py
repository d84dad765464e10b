"""Importing by name: a package's lazy exports (PEP 562), and objects named by dotted path in recipes.

A package ``__init__`` that imported its drivers eagerly would make ``import regate_lightning.policy``
import Lightning, and ``import regate_lightning.data.vision`` import PyAV; with a lazy ``__init__``
every submodule costs only what it imports itself.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import pkgutil
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from types import ModuleType
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
        >>> import_object("math.sqroot", "function")
        Traceback (most recent call last):
        ...
        ValueError: `function` 'math.sqroot': module 'math' has no attribute 'sqroot'; closest existing path: math.sqrt
    """
    if not is_dotted_path(path):
        raise ValueError(f"`{argument}` {path!r} is not a dotted path (package.module.name)")
    module, _, name = path.rpartition(".")
    try:
        found = importlib.import_module(module)
    except ImportError as err:
        missing = getattr(err, "name", None)
        hint = _closest_hint(path) if missing and (module == missing or module.startswith(f"{missing}.")) else ""
        raise ValueError(f"`{argument}` {path!r}: module {module!r} cannot be imported ({err}){hint}") from err
    if not hasattr(found, name):
        raise ValueError(f"`{argument}` {path!r}: module {module!r} has no attribute {name!r}{_closest_hint(path)}")
    return getattr(found, name)


def _closest_hint(path: str) -> str:
    """``"; closest existing path: X"`` for a path that names nothing, or ``""``."""
    found = closest_path(path)
    return f"; closest existing path: {found}" if found else ""


# ---------------------------------------------------------------------------------------------------
# Moved modules: recipes written against an earlier layout keep working, with a warning naming the new path.

MOVED_MODULES: dict[str, str] = {
    "regate_lightning.tiny": "regate_lightning.testing.tiny",
    "regate_lightning.data.debug": "regate_lightning.testing.datamodule",
    "regate_lightning.data.random_batches": "regate_lightning.testing.batches",
    "regate_lightning.smollm2": "regate_lightning.demo.smollm2",
}
"""Old module path -> where its contents live now (the test and demo scaffolding left the core)."""

_warned_moved: set[str] = set()


def new_path(module: str, name: str) -> str:
    """The path to recommend for ``module.name``: its package's export when the package exports it.

    Example:
        >>> new_path("regate_lightning.testing.tiny", "tiny_llava")
        'regate_lightning.testing.tiny_llava'
    """
    package = module.rpartition(".")[0]
    if package:
        found = importlib.import_module(package)
        if name in dir(found) and getattr(found, name, None) is getattr(importlib.import_module(module), name):
            return f"{package}.{name}"
    return f"{module}.{name}"


def _moved_module(old: str, new: str) -> ModuleType:
    """A module at ``old`` whose attributes are those of ``new``, each warning once that it moved."""

    def __getattr__(name: str) -> Any:
        target = importlib.import_module(new)
        if name.startswith("__") or not hasattr(target, name):
            raise AttributeError(f"module {old!r} (moved to {new!r}) has no attribute {name!r}")
        if f"{old}.{name}" not in _warned_moved:
            _warned_moved.add(f"{old}.{name}")
            warnings.warn(
                f"{old}.{name} has moved to {new_path(new, name)}; the old path works for now: update the recipe "
                "or import",
                FutureWarning,
                stacklevel=2,
            )
        return getattr(target, name)

    module = ModuleType(old, f"Moved to {new}: every attribute is read from there, with a warning.")
    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    module.__dir__ = lambda: dir(importlib.import_module(new))  # type: ignore[method-assign]
    return module


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the modules of :data:`MOVED_MODULES` at their old paths."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        """A spec for an old path of :data:`MOVED_MODULES`, else None (the other finders look)."""
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        """The forwarding module."""
        return _moved_module(spec.name, MOVED_MODULES[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module forwards every attribute."""


def install_moved_modules() -> None:
    """Make the old paths of :data:`MOVED_MODULES` importable (once per process; ``regate_lightning`` does it)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


# ---------------------------------------------------------------------------------------------------
# The closest existing path, for a dotted path that names nothing.


def _public_paths(module: ModuleType) -> set[str]:
    """``module.name`` for its public names and ``module.sub`` for its submodules."""
    names = {n for n in dir(module) if not n.startswith("_")}
    if hasattr(module, "__path__"):
        names |= {info.name for info in pkgutil.iter_modules(module.__path__) if not info.name.startswith("_")}
    return {f"{module.__name__}.{n}" for n in names}


@functools.cache
def package_paths(package: str) -> frozenset[str]:
    """Every public dotted path of ``package``: its modules and packages and the public names in them.

    Imports each of its modules (those that fail to import, e.g. for lack of an optional dependency, are
    left out); meant for error messages.
    """
    root = importlib.import_module(package)
    paths = _public_paths(root)
    for info in pkgutil.walk_packages(root.__path__, f"{package}.", onerror=lambda name: None):
        if any(part.startswith("_") for part in info.name.split(".")) or info.name in MOVED_MODULES:
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:  # a module that cannot be imported here names nothing usable
            continue
        paths |= {p for p in _public_paths(module) if p.rpartition(".")[0] == info.name}
    return frozenset(p for p in paths if p.rpartition(".")[0] not in MOVED_MODULES and p not in MOVED_MODULES)


def closest_path(path: str, candidates: Iterable[str] = ()) -> str | None:
    """The existing dotted path most like ``path`` (a typo, a moved name, a short class name), or None.

    Looked for among ``candidates``, the public names of the deepest module of ``path`` that imports, and,
    for a path in this package or a short name, every public path of ``regate_lightning``: first a path
    with the same last name (a moved object), then a close name in the deepest module that imports or
    among ``candidates``, then a close name anywhere in the package (:func:`difflib.get_close_matches`).

    Example:
        >>> closest_path("regate_lightning.testing.tiny_lava")
        'regate_lightning.testing.tiny_llava'
        >>> closest_path("math.sqroot")
        'math.sqrt'
    """
    parts = path.split(".")
    local = set(candidates)
    for depth in range(len(parts) - 1, 0, -1):
        try:
            local |= _public_paths(importlib.import_module(".".join(parts[:depth])))
            break
        except Exception:  # not importable: try a shorter prefix
            continue
    wide = set(package_paths(__package__)) if parts[0] == __package__ or len(parts) == 1 else set()
    local.discard(path)
    wide.discard(path)
    last = parts[-1]
    same_name = [p for p in local | wide if p.rpartition(".")[2] == last]
    if same_name:
        return max(same_name, key=lambda p: (difflib.SequenceMatcher(None, path, p).ratio(), -len(p)))
    for pool in (local, wide):
        by_name: dict[str, str] = {}
        for p in sorted(pool, key=lambda p: (len(p), p)):  # the shortest path of a name: its public export
            by_name.setdefault(p.rpartition(".")[2], p)
        same_letters = [name for name in by_name if name.lower() == last.lower()]
        match = same_letters or difflib.get_close_matches(last, sorted(by_name), n=1, cutoff=0.6)
        if match:
            return by_name[match[0]]
    return None
