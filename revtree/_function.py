"""A run of reversible blocks: its forward pass, and the autograd Function that reverses it.

The blocks run under ``no_grad`` (``Tape.run``), each call of ``f`` and ``g`` recording
what it read (``_step``); the Function then takes the run's input streams, the keyword
tensors and every tensor the blocks read that needs a gradient (``sources``: parameters,
or what ``torch.func.functional_call`` put in their place) as its inputs, and returns the
output streams, which it alone stores. Running the blocks before the Function is built
lets it take the tensors the forward actually used: lazy modules' parameters exist only
once they ran.

Backward walks the blocks in reverse, rebuilding each block's inputs from its outputs,
and returns every gradient through the Function: the inputs', the keyword tensors' and
the sources'. Nothing is written to ``.grad`` of a caller's tensor from inside, so
``loss.backward()`` and ``torch.autograd.grad`` see what plain autograd gives, a
parameter's hooks fire once, and a source that does not reach the loss gets ``None``.
"""

from __future__ import annotations

from functools import partial
from itertools import chain
from typing import Any

import torch

from . import _checks, _drift, _fsdp
from ._autocast import NOTHING
from ._block import Block, _Run
from ._call import Call
from ._errors import RevtreeError
from ._rng import preserved
from ._step import Backward, Step

Leaves = list[torch.Tensor]


class Tape:
    """A run of consecutive reversible blocks in one call, and what its backward needs."""

    __slots__ = (
        "__weakref__",
        "call",
        "hooked",
        "managed",
        "outputs",
        "positions",
        "sources",
        "steps",
        "versions",
    )

    def __init__(self, call: Call) -> None:
        self.call = call
        self.steps: list[Step] = []
        self.sources: Leaves = []  # every tensor read that needs a gradient, once each
        self.positions: dict[int, int] = {}  # id(source) -> its position in sources
        self.versions: list[int] = []
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.hooked = False  # whether a block's f or g has hooks of its own
        self.managed = False  # whether FSDP manages parameters of a block

    def run(self, blocks: list[tuple[int, Block]], x1: Leaves, x2: Leaves) -> tuple[Leaves, Leaves]:
        """Run ``blocks`` forward, storing nothing; return the output streams.

        The blocks run under ``no_grad``; if anything they read needs a gradient, the output
        streams come out of the Function, else as they are (nothing to reverse).
        """
        call = self.call
        strategy = call.strategy
        y1, y2 = [t.detach() for t in x1], [t.detach() for t in x2]  # nothing to record here
        with torch.no_grad():
            for index, block in blocks:
                step = Step(call, index, block, record=(self.positions, self.sources))
                self.hooked = self.hooked or _has_hooks(block.f) or _has_hooks(block.g)
                self.managed = self.managed or step.managed
                if call.check_drift is not None:
                    step.sample = _drift.sample([*y1, *y2])
                if step.unit:  # an FSDP unit: its hooks gather its parameters around it
                    y1, y2 = block(_Run(partial(strategy.forward, step, y1, y2)))
                else:
                    y1, y2 = strategy.forward(step, y1, y2)
                self.steps.append(step)
        kw = call.context.tensors
        sources = self.sources
        if self.managed and torch.is_grad_enabled():
            # FSDP's parameters are no inputs of the Function (FSDP hands them their
            # gradients): one input that needs a gradient keeps the outputs in the graph
            sources = [*sources, _fsdp.anchor(y1[0].device)]
        if not (sources or any(t.requires_grad for t in chain(x1, x2, kw))):
            return y1, y2
        n = len(y1)
        self.versions = _checks.versions(self.sources)
        self.outputs = (*y1, *y2)
        out = ReversibleFunction.apply(self, *x1, *x2, *kw, *sources)
        return list(out[:n]), list(out[n:])


class ReversibleFunction(torch.autograd.Function):
    """The output streams of a ``Tape``'s run, from its inputs; backward reverses the blocks."""

    @staticmethod
    def forward(ctx: Any, tape: Tape, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: D102
        outputs, tape.outputs = tape.outputs, ()  # the graph holds them, not the tape
        ctx.tape = tape
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*outputs, *tape.call.context.tensors)
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:  # noqa: D102
        if torch.is_grad_enabled():
            raise RevtreeError(
                "double backward (create_graph=True) through a reversible stack is not "
                "supported: its backward recomputes the blocks and is not itself differentiable. "
                "Hint: for higher-order gradients run the stack on plain autograd: "
                "reversible=False when you build it, or seq.reversible = False on one built "
                "(an adapter's sequence too)."
            )
        tape: Tape = ctx.tape
        call = tape.call
        indices = [step.index for step in tape.steps]
        if _checks.versions(tape.sources) != tape.versions:
            k = _checks.modified(tape.sources, tape.versions)
            _checks.parameter_modified(indices, tuple(tape.sources[k or 0].shape))
        n = len(grads) // 2
        saved = ctx.saved_tensors
        y1, y2, kw = list(saved[:n]), list(saved[n : 2 * n]), saved[2 * n :]
        dy1, dy2 = list(grads[:n]), list(grads[n:])

        needs = ctx.needs_input_grad
        kw_needs = needs[1 + 2 * n : 1 + 2 * n + len(kw)]
        keywords = [t.detach().requires_grad_() if need else t for t, need in zip(kw, kw_needs)]
        back = Backward(
            call,
            tape.sources,
            keywords,
            accumulate=tape.hooked or _tracked(),
            open=tape.managed,
        )
        strategy = call.strategy
        warned = False
        with preserved(call.generators) if call.generators is not None else NOTHING:
            for step in reversed(tape.steps):
                if step.unit:
                    y1, y2, dy1, dy2 = _reverse_unit(step, back, y1, y2, dy1, dy2)
                else:
                    y1, y2, dy1, dy2 = strategy.reverse(step, back, y1, y2, dy1, dy2)
                if step.sample is not None and not warned:
                    assert call.check_drift is not None
                    rebuilt = [*y1, *y2]
                    names, limit = call.layout.names, call.check_drift
                    warned = _drift.check(
                        step.index, names, rebuilt, step.sample, limit, call.strict_drift
                    )

        dx = [d if need else None for d, need in zip(chain(dy1, dy2), needs[1 : 1 + 2 * n])]
        wanted = iter(back.keyword_grads())
        dkw = [next(wanted) if need else None for need in kw_needs]
        anchors = [None] * (len(needs) - 1 - 2 * n - len(kw) - len(tape.sources))
        return (None, *dx, *dkw, *back.source_grads(), *anchors)


def _reverse_unit(
    step: Step, back: Backward, y1: Leaves, y2: Leaves, dy1: list[Any], dy2: list[Any]
) -> tuple[Leaves, Leaves, list[Any], list[Any]]:
    """The reverse step of a block that is an FSDP unit, inside its own call.

    The unit's pre-hook gathers its parameters and hooks its post-backward (the
    reduce-scatter of its gradients, and freeing its parameters) onto the anchor, which the
    step back-propagates into once it is done (see ``_fsdp``).
    """
    source = _fsdp.anchor(y1[0].device)

    def run(carried: torch.Tensor) -> tuple[Leaves, Leaves, list[Any], list[Any]]:
        with torch.no_grad():
            out = step.call.strategy.reverse(step, back, y1, y2, dy1, dy2)
        _fsdp.release(carried, source)
        return out

    with torch.enable_grad():  # so that the unit hooks its post-backward onto the anchor
        return step.block(_Run(run), source)


def _tracked() -> bool:
    """Whether hooks on every module (a profiler's module tracker) may watch the recompute."""
    hooks = torch.nn.modules.module
    return bool(
        hooks._global_forward_pre_hooks
        or hooks._global_forward_hooks
        or hooks._global_backward_pre_hooks
        or hooks._global_backward_hooks
    )


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(
        module._forward_pre_hooks
        or module._forward_hooks
        or module._backward_pre_hooks
        or module._backward_hooks
    )
