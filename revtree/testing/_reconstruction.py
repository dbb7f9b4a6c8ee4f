"""How far a stack drifts when its inputs are rebuilt from its outputs, block by block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import _rng, _trees
from .._call import Call
from .._drift import relative_errors
from .._sequence import ReversibleSequence
from .._step import Backward, Step
from ._gradients import isolated


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

    Examples:
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
    before training diverges. Each block is rebuilt as backward rebuilds it, from the
    random states, buffers and parameters its forward read. The model's buffers (batch
    norm statistics) and the random generators end as they were.

    Args:
        seq: The sequence.
        x: An input pytree.
        **kwargs: Keyword arguments for ``seq``.

    Returns:
        One [`BlockDrift`][revtree.testing.BlockDrift] per block, first block first.

    Examples:
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
    call = Call.build(seq, layout, kwargs, seq.route)
    strategy = call.strategy
    with torch.no_grad(), isolated(seq, _rng.every_generator()):
        x1, x2 = layout.encode(_trees.flatten(x, seq.namespace)[0])
        call.record([*x1, *x2], preserve_rng=True)
        positions: dict[int, int] = {}
        sources: list[torch.Tensor] = []
        inputs, steps = [], []
        for index in range(len(seq.blocks)):
            inputs.append((x1, x2))
            step = Step(call, index, seq._block(index), record=(positions, sources))
            x1, x2 = strategy.forward(step, x1, x2)
            steps.append(step)
        outputs = [*inputs[1:], (x1, x2)]
        # rebuilt as backward rebuilds them: the forward's random states, buffers and tensors
        back = Backward(call, [s.detach() for s in sources], call.context.tensors, verify=False)
        drift = []
        y1, y2 = x1, x2
        for index in reversed(range(len(seq.blocks))):
            step, exact = steps[index], inputs[index]
            local = strategy.inverse(step, *outputs[index], back)
            y1, y2 = strategy.inverse(step, y1, y2, back)
            drift.append(BlockDrift(index, _error(local, exact), _error((y1, y2), exact)))
    return drift[::-1]
