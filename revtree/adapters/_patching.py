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
