"""How far a stack drifts when its inputs are rebuilt from its outputs, block by block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._drift import relative_errors
from .._engine import _pass
from .._engine._sink import Backward
from .._engine._steps import rebuild_block
from .._replay import _rng
from .._sequence import ReversibleSequence
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


def _error(rebuilt: list[list[Any]], exact: list[list[Any]], owners: list[int]) -> float:
    flat = [t for part in rebuilt for t in part]
    return max(relative_errors(flat, [t for part in exact for t in part], owners), default=0.0)


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
        >>> seq = revtree.ReversibleSequence.from_factory(lambda: nn.Linear(2, 2), 3)
        >>> drift = reconstruction_errors(seq, torch.randn(8, 4))
        >>> max(d.accumulated for d in drift) < 1e-5
        True
    """
    with torch.no_grad(), isolated(seq, _rng.every_generator()):
        call, state, planned = seq._start(x, kwargs, seq.route, None)
        layout = call.shared.layout
        owners = [i for members in layout.members for i in members]
        call.record(state, preserve_rng=True)
        tape, inputs = _pass.record(call, planned, state)
        outputs = [*inputs[1:], state]
        # rebuilt as backward rebuilds them: the forward's random states, buffers and tensors
        back = Backward(tape, [False] * len(call.shared.context.tensors))
        drift = []
        running = [list(part) for part in state]
        for run, exact, out in zip(reversed(tape.runs), reversed(inputs), reversed(outputs)):
            local = [list(part) for part in out]
            rebuild_block(run, back, local)
            rebuild_block(run, back, running)
            drift.append(
                BlockDrift(run.index, _error(local, exact, owners), _error(running, exact, owners))
            )
    return drift[::-1]
