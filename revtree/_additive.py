"""The additive coupling on leaf lists: its forward step, and its reversal with gradients.

Forward: ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``. The reversal runs ``g`` and then ``f``
once each with autograd on, reconstructs ``x2 = y2 - g(y1)`` and ``x1 = y1 - f(x2)``
from the same calls, and back-propagates through them at once, so a block costs one
extra forward in all (the 4/3 floor of reversible networks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import _rng
from ._block import Block, add, call
from ._layout import Layout
from ._state import running

Leaves = list[torch.Tensor]


@dataclass
class StepInputs:
    """What one block needs besides its streams: where it is and what it is called with."""

    layout: Layout
    namespace: str
    f_kwargs: dict[str, Any]
    g_kwargs: dict[str, Any]


def forward_step(
    block: Block,
    index: int,
    x1: Leaves,
    x2: Leaves,
    inputs: StepInputs,
    rng: list[_rng.RngState] | None = None,
    devices: tuple[int, ...] = (),
) -> tuple[Leaves, Leaves]:
    """Run one block forward; if ``rng`` is a list, append the generator state before each call."""
    layout, ns = inputs.layout, inputs.namespace
    with running(index, recomputing=False):
        if rng is not None:
            rng.append(_rng.capture(devices))
        y1 = add(x1, call(block.f, "f", index, layout, x2, inputs.f_kwargs, ns), "f", index, layout)
        if rng is not None:
            rng.append(_rng.capture(devices))
        y2 = add(x2, call(block.g, "g", index, layout, y1, inputs.g_kwargs, ns), "g", index, layout)
    return y1, y2


def _grad_outputs(outputs: Leaves, grads: Leaves) -> tuple[Leaves, Leaves]:
    """Pair each output that requires grad with its gradient, cast and reduced as autograd would."""
    kept, kept_grads = [], []
    for out, grad in zip(outputs, grads):
        if out.requires_grad:
            if grad.shape != out.shape:  # the output was broadcast in the addition
                grad = grad.sum_to_size(out.shape)
            if grad.dtype != out.dtype:  # autocast: the addition promoted a lower precision
                grad = grad.to(out.dtype)
            kept.append(out)
            kept_grads.append(grad)
    return kept, kept_grads


def vjp(outputs: Leaves, grads: Leaves, inputs: Sequence[torch.Tensor]) -> list[Any]:
    """The vector-Jacobian product w.r.t. ``inputs``, ``None`` for an input left unused."""
    kept, kept_grads = _grad_outputs(outputs, grads)
    if not kept:
        return [None] * len(inputs)
    return list(torch.autograd.grad(kept, inputs, kept_grads, allow_unused=True))


def _plus(a: Leaves, b: list[Any]) -> Leaves:
    return [x if y is None else x + y for x, y in zip(a, b)]


def reverse_step(
    block: Block,
    index: int,
    y1: Leaves,
    y2: Leaves,
    dy1: Leaves,
    dy2: Leaves,
    inputs: StepInputs,
    f_sources: Sequence[torch.Tensor],
    g_sources: Sequence[torch.Tensor],
    rng: tuple[_rng.RngState | None, _rng.RngState | None],
    devices: tuple[int, ...],
) -> tuple[Leaves, Leaves, Leaves, Leaves, list[Any], list[Any]]:
    """Reconstruct one block's inputs from its outputs and back-propagate through it.

    Args:
        block: The block.
        index: Its index in the sequence.
        y1: The block's first output stream.
        y2: Its second output stream.
        dy1: The gradient of the loss w.r.t. ``y1``.
        dy2: The gradient w.r.t. ``y2``.
        inputs: Layout and keyword arguments.
        f_sources: Tensors besides ``x2`` whose gradient through ``f`` is wanted
            (its parameters, keyword tensors).
        g_sources: Likewise for ``g``.
        rng: The generator states captured before ``f`` and before ``g`` in the forward pass.
        devices: The CUDA devices whose generators were captured.

    Returns:
        ``(x1, x2, dx1, dx2, f_grads, g_grads)``, the gradients w.r.t. the sources being
        ``None`` where a source was not used.
    """
    layout, ns = inputs.layout, inputs.namespace
    n = len(y1)
    with running(index, recomputing=True):
        y1_ = [t.detach().requires_grad_() for t in y1]
        with _rng.replayed(rng[1], devices), torch.enable_grad():
            gy = call(block.g, "g", index, layout, y1_, inputs.g_kwargs, ns)
        grads = vjp(gy, dy2, [*y1_, *g_sources])
        dx1 = _plus(dy1, grads[:n])
        g_grads = grads[n:]
        with torch.no_grad():
            x2 = [a - b for a, b in zip(y2, gy)]
        del gy, y1_

        x2_ = [t.detach().requires_grad_() for t in x2]
        with _rng.replayed(rng[0], devices), torch.enable_grad():
            fx = call(block.f, "f", index, layout, x2_, inputs.f_kwargs, ns)
        grads = vjp(fx, dx1, [*x2_, *f_sources])
        dx2 = _plus(dy2, grads[:n])
        f_grads = grads[n:]
        with torch.no_grad():
            x1 = [a - b for a, b in zip(y1, fx)]
    return x1, x2, dx1, dx2, f_grads, g_grads
