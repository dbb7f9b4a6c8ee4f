"""How far a stack drifts when its inputs are rebuilt from its outputs, block by block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import _trees
from .._context import Context
from .._drift import relative_errors
from .._sequence import ReversibleSequence
from .._state import running
from .._steps import StepInputs, _Bound, forward_step
from ..couplings import Elementwise
from ._gradients import isolated, kept_buffers, rng_devices


@dataclass(frozen=True)
class BlockDrift:
    """The reconstruction error of one block, relative to the size of its input.

    Each stream leaf's largest error is divided by the largest entry of the input leaf
    it comes from (the larger of its two streams), so that a stream which is exactly zero,
    like the starting velocity of [`ZeroVelocity`][revtree.codecs.ZeroVelocity], is
    measured against its partner; the worst leaf gives the block's error.

    Attributes:
        index: The block's index.
        local: The error of rebuilding this block's input from its own (exact) output.
        accumulated: The error of rebuilding this block's input from the stack's final
            output, through every block above it: what backward actually sees.

    Example:
        >>> from revtree.testing import BlockDrift
        >>> BlockDrift(index=3, local=1e-7, accumulated=2e-6).accumulated
        2e-06
    """

    index: int
    local: float
    accumulated: float


def _error(rebuilt: tuple[list, list], exact: tuple[list, list]) -> float:
    return max(relative_errors([*rebuilt[0], *rebuilt[1]], [*exact[0], *exact[1]]), default=0.0)


def reconstruction_errors(seq: ReversibleSequence, x: Any, /, **kwargs: Any) -> list[BlockDrift]:
    """Measure, block by block, how exactly inputs are rebuilt from outputs.

    Runs the stack forward without autograd (in the dtype of ``x`` and of the model, so
    cast both to check float32 or bfloat16), keeping every block's input, then rebuilds
    them as backward would, with the forward's random states replayed. A block whose
    ``local`` error is large is ill-conditioned (e.g. a near-zero affine scale, a momentum
    ``gamma`` far below 1); a steadily growing ``accumulated`` error warns of drift at depth
    before training diverges. Each block is rebuilt from the buffers the forward left, as
    in backward. The model's buffers (batch norm statistics) and the CPU and CUDA random
    generators end as they were.

    Args:
        seq: The sequence.
        x: An input pytree.
        **kwargs: Keyword arguments for ``seq``.

    Returns:
        One [`BlockDrift`][revtree.testing.BlockDrift] per block, first block first.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import revtree
        >>> from revtree.testing import reconstruction_errors
        >>> seq = revtree.ReversibleSequence([(nn.Linear(2, 2), nn.Linear(2, 2))] * 3)
        >>> drift = reconstruction_errors(seq, torch.randn(8, 4))
        >>> max(d.accumulated for d in drift) < 1e-5
        True
    """
    layout = seq._layout(x)
    context = Context.build(kwargs, seq.route, seq.namespace)
    inputs = StepInputs.build(layout, seq.namespace, seq.coupling, context, context.tensors)
    devices = rng_devices()
    with torch.no_grad(), isolated(seq, devices):
        x1, x2 = layout.encode(_trees.flatten(x, seq.namespace)[0])
        stored, states = [], []
        for index, block in enumerate(seq.blocks):
            stored.append((x1, x2))
            x1, x2, block_states = forward_step(
                block, index, x1, x2, inputs, record=True, devices=devices
            )
            states.append(block_states)
        outputs = [None] * len(seq.blocks)
        for index in range(len(seq.blocks)):
            outputs[index] = stored[index + 1] if index + 1 < len(seq.blocks) else (x1, x2)

        drift = []
        y1, y2 = x1, x2
        for index in reversed(range(len(seq.blocks))):
            block, exact = seq.blocks[index], stored[index]
            with kept_buffers(block):
                local = _invert(seq, index, *outputs[index], inputs, states[index], devices)
            with kept_buffers(block):
                y1, y2 = _invert(seq, index, y1, y2, inputs, states[index], devices)
            drift.append(BlockDrift(index, _error(local, exact), _error((y1, y2), exact)))
    return drift[::-1]


def _invert(
    seq: ReversibleSequence,
    index: int,
    y1: list,
    y2: list,
    inputs: StepInputs,
    states: Any,
    devices: tuple[int, ...],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    block, spec = seq.blocks[index], inputs.layout.spec
    if isinstance(seq.coupling, Elementwise):
        f_states, g_states = [states[0]], [states[1]]
    else:
        f_states, g_states = states
    f = _Bound("f", index, block.f, inputs, devices, replay=reversed(f_states))
    g = _Bound("g", index, block.g, inputs, devices, replay=reversed(g_states))
    with running(index, recomputing=True):
        t1, t2 = seq.coupling.inverse(f, g, spec.unflatten(y1), spec.unflatten(y2))
    return _trees.flatten(t1, seq.namespace)[0], _trees.flatten(t2, seq.namespace)[0]
