"""The autocast state of a call, replayed around each recomputed ``f`` and ``g`` only.

The recomputation must cast as the forward did, so it runs in the forward's autocast
state whatever the state around ``backward()``. The gradient computation must not: plain
autograd back-propagates in the dtypes its forward recorded, under the state in which
``backward()`` was called, and a float32 island (``torch.autocast(..., enabled=False)``
inside ``f``) would otherwise have its backward matmuls autocast to bfloat16. So the state
is entered around the recomputed calls and left before their gradients are taken.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class AutocastState:
    """Whether autocast is on, and with which dtype, for each device type a call uses.

    Examples:
        >>> import torch
        >>> from revtree._replay._autocast import AutocastState
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     state = AutocastState.capture(("cpu",))
        >>> with state.replay():
        ...     torch.is_autocast_enabled("cpu")
        True
    """

    settings: tuple[tuple[str, bool, torch.dtype], ...]
    cache_enabled: bool

    @classmethod
    def capture(cls, device_types: tuple[str, ...]) -> AutocastState:
        """Read the autocast state of ``device_types`` (the CPU always included)."""
        types = ("cpu", *(t for t in device_types if t != "cpu"))
        return cls(
            tuple(
                (t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t))
                for t in types
                if torch.amp.is_autocast_available(t)
            ),
            torch.is_autocast_cache_enabled(),
        )

    @property
    def is_current(self) -> bool:
        """Whether the state now in force is this one (then replaying it changes nothing)."""
        return all(
            torch.is_autocast_enabled(t) == on and (not on or torch.get_autocast_dtype(t) == dt)
            for t, on, dt in self.settings
        )

    def replay(self) -> Replay:
        """A context (reusable) that enters this state, whatever the state around it."""
        return Replay(self)


class Replay:
    """Enters an ``AutocastState`` on each entry, leaves it on exit; reusable and reentrant."""

    __slots__ = ("stacks", "state")

    def __init__(self, state: AutocastState) -> None:
        self.state = state
        self.stacks: list[ExitStack] = []

    def __enter__(self) -> None:
        stack = ExitStack()
        state = self.state
        for device_type, enabled, dtype in state.settings:
            stack.enter_context(
                torch.autocast(
                    device_type, dtype=dtype, enabled=enabled, cache_enabled=state.cache_enabled
                )
            )
        self.stacks.append(stack)

    def __exit__(self, *exc: Any) -> None:
        self.stacks.pop().__exit__(*exc)


class _Nothing:
    """A do-nothing context, reusable (for a state already in force)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


NOTHING = _Nothing()
