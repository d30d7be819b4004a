"""Named sources of tasks, students and teachers: ``task=addition``, ``student=testbed``,
``teacher=oracle``.

The run resolves such a name through this registry and never imports what provides it:
the testbed registers its names when it is imported (``opd.testbed``), and any package can
register more, directly or through the ``opd.sources`` entry-point group (a module whose
import calls :func:`register`), loaded the first time a name is not found.

A factory's signature depends on its kind (``settings`` is the run's flat config as a dict):

- ``task``: ``factory(horizon) -> Task``;
- ``student``: ``factory(settings) -> path`` of a model directory;
- ``teacher``: ``factory(settings, task, tokenizer) -> path | Teacher`` (a model directory,
  or an object that scores sequences, like the testbed's oracle).

Anything else a user writes for ``student=`` / ``teacher=`` is a model directory or hub id.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable

from opd.errors import UserError

KINDS = ("task", "student", "teacher")
ENTRY_POINT_GROUP = "opd.sources"
_SOURCES: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}
_plugins_loaded = False


def register(kind: str, name: str, factory: Callable) -> None:
    """Make ``name`` resolvable for ``kind`` (``task``, ``student`` or ``teacher``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown source kind {kind!r}; one of {', '.join(KINDS)}")
    _SOURCES[kind][name] = factory


def _load_plugins() -> None:
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            entry.load()


def lookup(kind: str, name: str | None) -> Callable | None:
    """The factory registered as ``name`` for ``kind``, or None (a path or hub id)."""
    if name is None:
        return None
    if name not in _SOURCES[kind]:
        _load_plugins()
    return _SOURCES[kind].get(name)


def names(kind: str) -> list[str]:
    """Every name registered for ``kind`` (plug-ins included)."""
    _load_plugins()
    return sorted(_SOURCES[kind])


def task_source(name: str) -> Callable:
    """The task factory ``name``; an unknown name is refused with the known ones."""
    factory = lookup("task", name)
    if factory is None:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(names('task'))} (or give dataset=PATH)")
    return factory
