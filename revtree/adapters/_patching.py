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

    Args:
        modules: The package's modules whose globals to set.
        **classes: The adapter's classes, by the name the package knows them by.

    Examples:
        >>> import types
        >>> from revtree.adapters.toolkit import swapped
        >>> package = types.ModuleType("package")
        >>> package.Sequence = list
        >>> with swapped([package], Sequence=tuple):
        ...     package.Sequence([1, 2])
        (1, 2)
        >>> package.Sequence is list
        True
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
    class's own construction can. Subclasses of ``cls`` are left alone.

    Args:
        cls: The package's class.
        replacement: The adapter's class, taking the same arguments (a subclass of
            ``cls`` is initialised once, by the call itself).

    Examples:
        >>> from revtree.adapters.toolkit import constructed_as
        >>> class Theirs:
        ...     pass
        >>> class Ours:
        ...     pass
        >>> with constructed_as(Theirs, Ours):
        ...     type(Theirs()).__name__
        'Ours'
        >>> type(Theirs()).__name__
        'Theirs'
    """
    original = cls.__dict__.get("__new__")
    inherited = cls.__new__

    def __new__(kind: type, *args: object, **kwargs: object) -> object:
        if kind is cls:
            if issubclass(replacement, cls):  # made here, initialised once by the call
                return _new(inherited, replacement, args, kwargs)
            return replacement(*args, **kwargs)
        return _new(inherited, kind, args, kwargs)

    setattr(cls, "__new__", __new__)  # noqa: B010 (a class attribute, put back below)
    try:
        yield
    finally:
        if original is not None:
            setattr(cls, "__new__", original)  # noqa: B010
        else:
            # deleting it would leave CPython's slot pointing at a __new__ lookup that then
            # hands object.__new__ the constructor's arguments: one that drops them instead
            def restored(kind: type, *args: object, **kwargs: object) -> object:
                return _new(inherited, kind, args, kwargs)

            setattr(cls, "__new__", restored)  # noqa: B010


def _new(inherited: object, kind: type, args: tuple[object, ...], kwargs: dict) -> object:
    if inherited is object.__new__:
        return object.__new__(kind)
    return inherited(kind, *args, **kwargs)  # type: ignore[operator]
