"""Capture and replay of the autocast state, so a recomputation casts as the forward did."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AutocastState:
    """Whether autocast was on, and with which dtype, for each device type in use."""

    settings: tuple[tuple[str, bool, torch.dtype], ...]
    cache_enabled: bool

    @classmethod
    def capture(cls, device_types: tuple[str, ...]) -> AutocastState:
        """Read the autocast state of ``device_types`` (the CPU always included)."""
        types = ("cpu", *(t for t in device_types if t != "cpu"))
        return cls(
            tuple((t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types),
            torch.is_autocast_cache_enabled(),
        )

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Enter the captured state, whatever the state around the call."""
        with ExitStack() as stack:
            for device_type, enabled, dtype in self.settings:
                stack.enter_context(
                    torch.autocast(
                        device_type, dtype=dtype, enabled=enabled, cache_enabled=self.cache_enabled
                    )
                )
            yield
