"""Running state (BatchNorm statistics and the like) left as the forward pass left it.

A recomputed block runs its modules a second time in training mode, which would update
running statistics twice per step. The buffers of every module in training mode are
snapshotted before the recomputation and put back afterwards, so they end the step
exactly where plain autograd leaves them. Both ways of updating a buffer are undone:
in place (batch norm updates its statistics inside its kernel without bumping their
version counters, so changes are found by value) and by assignment
(``self.count = self.count + 1`` puts a new tensor in the module's slot, so the slot
gets the forward's tensor back). Unchanged buffers are not written to (autograd may have
saved them elsewhere).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def kept(modules: list[nn.Module]) -> Iterator[None]:
    """Undo, on exit, any change the context makes to the buffers of ``modules`` in training mode.

    ``modules`` are the modules that hold buffers (not their children), as the engine's
    walk over a block collects them.
    """
    saved = [
        (module, name, buffer, buffer.clone())
        for module in modules
        if module.training
        for name, buffer in module._buffers.items()
        if buffer is not None and not buffer.is_inference()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buffer, value in saved:
                if module._buffers.get(name) is not buffer:
                    module._buffers[name] = buffer
                if not torch.equal(buffer, value):
                    buffer.copy_(value)
