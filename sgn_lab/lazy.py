"""Lazy package exports (PEP 562): a package's public names, imported from their modules on
first use, so that importing the package (and ``sgn-lab --help``) loads nothing heavy.

A package maps each public name to the module that defines it and takes its module-level
``__getattr__``, ``__dir__`` and ``__all__`` from :func:`lazy_exports`; it keeps the same names
as real imports under ``if TYPE_CHECKING:`` for type checkers and editors.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def homes(module: str, names: Iterable[str]) -> dict[str, str]:
    """``{name: module}`` for each of ``names``: one part of a package's table of homes."""
    return dict.fromkeys(names, module)


def lazy_exports(package: str, home: Mapping[str, str], *, submodules: bool = False
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` of ``package``, whose public names are the keys of
    ``home`` (name -> the module that defines it).

    ``__getattr__`` imports a name's module when the name is first used and keeps the value in
    the package, so it runs once per name. A public name must not be the name of one of the
    package's modules: importing that module would bind the name to it. With ``submodules``,
    any other public attribute is the package's module of that name (``sgn_lab.models`` after
    a bare ``import sgn_lab``), imported on first use.
    """

    def __getattr__(name: str) -> Any:
        if name in home:
            value = getattr(importlib.import_module(home[name]), name)
        elif submodules and not name.startswith("_"):
            value = _submodule(package, name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *home})

    return __getattr__, __dir__, sorted(home)


def _submodule(package: str, name: str) -> Any:
    try:
        return importlib.import_module(f"{package}.{name}")
    except ModuleNotFoundError as missing:
        if missing.name != f"{package}.{name}":
            raise  # the module exists and one of its own imports is missing
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
