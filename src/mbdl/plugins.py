"""User code by name: ``package.module:Name`` strings and installed packages' entry points.

Every extensible thing (losses, data sources, backbones) is a :class:`Registry`: a name maps to
the built-in declaration, to an object named by an import path (``my_pkg.losses:MyLoss``) or to
an object an installed package declares in the entry-point group ``mbdl.<kind>s``, e.g. in its
``pyproject.toml``::

    [project.entry-points."mbdl.losses"]
    my_loss = "my_pkg.losses:MyLoss"

so that ``loss.name=my_loss`` finds it. Built-in names win over entry points of the same name.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

from mbdl.errors import UserError

T = TypeVar("T")


class PluginError(UserError):
    """A plugin name that cannot be imported or does not name a usable object."""


#: set to 1 to load checkpoints and model directories that name import-path plugins
TRUST_ENV = "MBDL_TRUST_PLUGINS"


def check_stored_name(name: object, *, key: str, where: str) -> None:
    """Refuse an import path read from a stored file (checkpoint, model directory) unless
    ``MBDL_TRUST_PLUGINS=1``: loading it would import and call code the file names (a source
    function is called with the file's ``data.root``, a backbone builder with its weights path),
    so a file received from someone else could run code. Names of installed packages' entry
    points and built-in names pass."""
    if isinstance(name, str) and is_import_path(name) and os.environ.get(TRUST_ENV) != "1":
        raise PluginError(
            f"{where}: {key}={name} names code to import and run (a plugin); if you trust where "
            f"this file came from, set {TRUST_ENV}=1"
        )


#: prefixes of names that look up a class of one installed library (never an arbitrary import):
#: ``pml:<LossClass>`` is a class of pytorch_metric_learning.losses
LIBRARY_PREFIXES = ("pml:",)


def is_import_path(name: str) -> bool:
    """Whether ``name`` is a ``package.module:Name`` import path rather than a registered name
    (or a library class, :data:`LIBRARY_PREFIXES`)."""
    return ":" in name and not name.startswith(LIBRARY_PREFIXES)


def import_object(path: str, *, kind: str) -> Any:
    """The object named by ``package.module:Name`` (``Name`` may be dotted: ``Outer.Inner``)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise PluginError(f"{kind} {path!r}: write an import path as package.module:Name")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise PluginError(
            f"{kind} {path!r}: cannot import module {module_name!r} ({error}); is its package "
            "installed or on PYTHONPATH?"
        ) from error
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise PluginError(f"{kind} {path!r}: module {module_name!r} has no {attribute!r}")
        found = getattr(found, part)
    return found


def plugin_entry_points(group: str) -> dict[str, EntryPoint]:
    """The entry points installed packages declare in ``group``, by name."""
    return {point.name: point for point in entry_points(group=group)}


class Registry(Generic[T]):
    """Names of one kind of extensible thing -> the object that implements it.

    ``builtin`` maps each built-in name to a zero-argument loader (imports stay lazy, so
    ``import mbdl`` stays light). :meth:`get` also accepts import paths and entry-point names;
    ``check(obj, name)`` validates a resolved object and returns it (or raises
    :class:`PluginError`).
    """

    def __init__(
        self,
        kind: str,
        group: str,
        builtin: Mapping[str, Callable[[], T]],
        check: Callable[[Any, str], T] | None = None,
    ) -> None:
        self.kind = kind
        self.group = group
        self._builtin = builtin
        self._check = check

    def builtin_names(self) -> tuple[str, ...]:
        """The built-in names, in declaration order."""
        return tuple(self._builtin)

    def names(self) -> tuple[str, ...]:
        """Built-in names, then the names installed packages declare (sorted)."""
        extra = sorted(set(plugin_entry_points(self.group)) - set(self._builtin))
        return self.builtin_names() + tuple(extra)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (
            name in self._builtin or is_import_path(name) or name in plugin_entry_points(self.group)
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The object registered as ``name`` (a built-in name, an entry point or an import path)."""
        if name in self._builtin:
            found: Any = self._builtin[name]()
        elif is_import_path(name):
            found = import_object(name, kind=self.kind)
        else:
            points = plugin_entry_points(self.group)
            if name not in points:
                raise PluginError(
                    f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}, "
                    "or give an import path package.module:Name"
                )
            try:
                found = points[name].load()
            except Exception as error:  # a broken installed plugin: name it, do not crash
                raise PluginError(
                    f"{self.kind} {name!r} (entry point {points[name].value!r} of an installed "
                    f"package) failed to load: {error}"
                ) from error
        return self._check(found, name) if self._check is not None else found
