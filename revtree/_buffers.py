"""Running state (BatchNorm statistics and the like) left as the forward pass left it.

A recomputed block runs its modules a second time in training mode, which would update
running statistics twice per step. The buffers of every module in training mode are
snapshotted before the recomputation and those it changed are put back afterwards, so
they end the step exactly where plain autograd leaves them. Changes are found by value,
since batch norm updates its statistics inside its kernel without bumping their version
counters; unchanged buffers are not written to (autograd may have saved them elsewhere).
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
        (buffer, buffer.clone())
        for module in modules
        if module.training
        for buffer in module._buffers.values()
        if buffer is not None and not buffer.is_inference()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                if not torch.equal(buffer, value):
                    buffer.copy_(value)
