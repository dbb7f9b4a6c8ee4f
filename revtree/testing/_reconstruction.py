"""How far a stack drifts when its inputs are rebuilt from its outputs, block by block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import _trees
from .._context import Context
from .._sequence import ReversibleSequence
from .._state import running
from .._steps import StepInputs, _Bound, forward_step
from ..couplings import Elementwise


@dataclass(frozen=True)
class BlockDrift:
    """The reconstruction error of one block, relative to the size of its input.

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


def _error(rebuilt: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(rebuilt, exact):
        scale = max(b.abs().max().item(), 1e-30) if b.numel() else 1.0
        diff = (a - b).abs().max().item() if b.numel() else 0.0
        worst = max(worst, diff / scale)
    return worst


def reconstruction_errors(seq: ReversibleSequence, x: Any, /, **kwargs: Any) -> list[BlockDrift]:
    """Measure, block by block, how exactly inputs are rebuilt from outputs.

    Runs the stack forward without autograd (in the dtype of ``x`` and of the model, so
    cast both to check float32 or bfloat16), keeping every block's input, then rebuilds
    them as backward would, with the forward's random states replayed. A block whose
    ``local`` error is large is ill-conditioned (e.g. a near-zero affine scale, a momentum
    ``gamma`` far below 1); a steadily growing ``accumulated`` error warns of drift at depth
    before training diverges. The caller's random generator is left as it was.

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
    f_kwargs, g_kwargs = context.rebuild(context.tensors)
    inputs = StepInputs(layout, seq.namespace, seq.coupling, f_kwargs, g_kwargs)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        x1, x2 = layout.encode(_trees.flatten(x, seq.namespace)[0])
        stored, states = [], []
        for index, block in enumerate(seq.blocks):
            stored.append((x1, x2))
            x1, x2, block_states = forward_step(block, index, x1, x2, inputs, record=True)
            states.append(block_states)
        outputs = [None] * len(seq.blocks)
        for index in range(len(seq.blocks)):
            outputs[index] = stored[index + 1] if index + 1 < len(seq.blocks) else (x1, x2)

        drift = []
        y1, y2 = x1, x2
        for index in reversed(range(len(seq.blocks))):
            exact = stored[index]
            local = _invert(seq, index, *outputs[index], inputs, states[index])
            y1, y2 = _invert(seq, index, y1, y2, inputs, states[index])
            drift.append(
                BlockDrift(
                    index,
                    _error([*local[0], *local[1]], [*exact[0], *exact[1]]),
                    _error([*y1, *y2], [*exact[0], *exact[1]]),
                )
            )
    return drift[::-1]


def _invert(
    seq: ReversibleSequence, index: int, y1: list, y2: list, inputs: StepInputs, states: Any
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    block, spec = seq.blocks[index], inputs.layout.spec
    if isinstance(seq.coupling, Elementwise):
        f_states, g_states = [states[0]], [states[1]]
    else:
        f_states, g_states = states
    f = _Bound(block.f, inputs.f_kwargs, (), replay=reversed(f_states))
    g = _Bound(block.g, inputs.g_kwargs, (), replay=reversed(g_states))
    with running(index, recomputing=True):
        t1, t2 = seq.coupling.inverse(f, g, spec.unflatten(y1), spec.unflatten(y2))
    return _trees.flatten(t1, seq.namespace)[0], _trees.flatten(t2, seq.namespace)[0]
