"""Swapping a client package's classes for an adapter's while a model is built."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType


@contextmanager
def swapped(modules: Sequence[ModuleType], **classes: object) -> Iterator[None]:
    """Set each of ``classes`` as a global of every module in ``modules``; put them back on exit.

    The packages look their sequence classes up as module globals when a model is built,
    so a model built inside the context uses the adapter's.
    """
    saved = [(module, name, getattr(module, name)) for module in modules for name in classes]
    for module, name, _ in saved:
        setattr(module, name, classes[name])
    try:
        yield
    finally:
        for module, name, original in reversed(saved):
            setattr(module, name, original)


@contextmanager
def constructed_as(cls: type, replacement: type) -> Iterator[None]:
    """Make ``cls(...)`` build a ``replacement`` instead, inside the context.

    For a class the user's code has imported by name before the context (``from package
    import Layer``): swapping the package's globals cannot reach that name, but the
    class's own construction can.
    """
    original = cls.__dict__.get("__new__")

    def __new__(kind: type, *args: object, **kwargs: object) -> object:
        if kind is cls:
            return replacement(*args, **kwargs)
        return object.__new__(kind)

    setattr(cls, "__new__", __new__)  # noqa: B010 (a class attribute, put back below)
    try:
        yield
    finally:
        if original is None:
            delattr(cls, "__new__")
        else:
            setattr(cls, "__new__", original)  # noqa: B010
