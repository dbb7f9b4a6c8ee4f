"""Training flags: each module recomputes in the mode its forward call found.

A module switched to ``eval()`` (or back) between forward and backward would otherwise
recompute another function (dropout off, batch statistics replaced by running ones);
plain autograd's graph keeps what the forward did. A flag read from outside the modules
(a closure over ``model.training``) is not among these.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

from torch import nn

Modes = list[bool]  # the training flag of each module a function holds, as a call found it


def modes_of(modules: Sequence[nn.Module]) -> Modes:
    """The training flag of each module."""
    return list(map(_TRAINING, modules))


_TRAINING = attrgetter("training")


def set_modes(modules: Sequence[nn.Module], modes: Modes) -> list[tuple[nn.Module, bool]]:
    """Set each module's training flag to ``modes``; the ``(module, flag)`` pairs it changed."""
    changed = []
    for m, mode in zip(modules, modes):
        if m.training is not mode:
            changed.append((m, m.training))
            m.training = mode
    return changed


def restore_modes(changed: list[tuple[nn.Module, bool]]) -> None:
    """Undo ``set_modes``: each flag as it was before (last changed first)."""
    for m, mode in reversed(changed):
        m.training = mode
