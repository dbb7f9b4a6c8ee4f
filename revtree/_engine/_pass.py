"""The passes over blocks: forward into nodes, forward with plain autograd, inverse.

Every loop over blocks is here: the sequence's call, its ``inverse``, the memory budget's
measurement and ``revtree.testing`` call these; a node's backward reverses its own blocks
(``_node``), each step by its kind (``_steps``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from itertools import chain
from operator import attrgetter
from typing import Any

import torch

from .. import _drift, _torch, _trees
from .._block import Block, Spec, _Run
from . import _fsdp
from ._node import Held, Tape, apply, relieve
from ._run import BlockRun, Call
from ._steps import KINDS

Leaves = list[torch.Tensor]
State = list[Leaves]
Planned = tuple[int, Block, list[Spec]]  # a block to run: its index, itself, its program
_KIND = attrgetter("dtype", "device")


def forward_block(run: BlockRun, call: Call, state: State) -> list[Any]:
    """Run one block on ``state`` (in place); its steps' side outputs (``None`` where none)."""
    if run.unit and run.tape is not None:  # an FSDP unit: its hooks gather its parameters
        return run.block(_Run(partial(_steps, run, call, state)))
    return _steps(run, call, state)


def _steps(run: BlockRun, call: Call, state: State) -> list[Any]:
    return [KINDS[spec.kind].forward(run, call, spec, state) for spec in run.program]


def forward_plain(call: Call, blocks: Sequence[Planned], state: State) -> list[list[Any]]:
    """Run ``blocks`` with plain autograd (or none at all), in place; their side outputs."""
    sides = []
    for index, block, program in blocks:
        sides.append(forward_block(BlockRun(call.shared, index, block, program), call, state))
    return sides


def inverse(call: Call, blocks: Sequence[Planned], state: State) -> None:
    """Undo ``blocks``, last first, with plain autograd (differentiable), in place."""
    for index, block, program in reversed(blocks):
        run = BlockRun(call.shared, index, block, program)
        for spec in reversed(program):
            KINDS[spec.kind].inverse(run, call, spec, state)


def record(call: Call, blocks: Sequence[Planned], state: State) -> tuple[Tape, list[State]]:
    """Run ``blocks`` forward without autograd, recording; the tape and each block's input."""
    tape = Tape(call.shared)
    inputs = []
    with torch.no_grad():
        for index, block, program in blocks:
            inputs.append([list(p) for p in state])
            run = BlockRun(call.shared, index, block, program, tape)
            forward_block(run, call, state)
            run.tape = None
            tape.runs.append(run)
    if call.tracker is not None:
        call.tracker.flush()
    return tape, inputs


def forward_nodes(
    call: Call,
    blocks: Sequence[Planned],
    state: State,
    leaves: Leaves | None = None,
) -> tuple[State, list[list[Any]], Tape | None]:
    """Run ``blocks`` reversibly: nodes that store nothing but their output, chained.

    A node runs until a block whose sources carry post-accumulate-grad hooks (an optimizer
    applied in backward): those get a node each, so their gradients arrive block by block.
    ``leaves`` are the call's input leaves, if these blocks start the call: the outputs of
    earlier reversible calls among them are taken over (see ``_node``). Returns the output
    parts, each block's side outputs and the last node's tape (``None`` if no node).
    """
    shared = call.shared
    settings = shared.settings
    call.record(state)
    keywords = shared.context.tensors
    sides: list[list[Any]] = []
    previous: Tape | None = None
    first = True
    at = 0
    while at < len(blocks):
        tape = Tape(shared)
        before = state
        state = [[t.detach() for t in part] for part in before]
        block_sides = []
        checked = 0
        with torch.no_grad():
            while at < len(blocks):
                index, block, program = blocks[at]
                at += 1
                run = BlockRun(shared, index, block, program, tape)
                tape.hooked = tape.hooked or any(map(_torch.has_module_hooks, run.fns))
                run.hooks = run.hooks_now()
                tape.managed = tape.managed or run.managed
                if settings.check_drift is not None:
                    run.sample = _drift.sample([t for part in state for t in part])
                compiled = settings.compiled
                if compiled is not None and compiled.takes(run):
                    compiled.forward(run, call, state, forward_block)
                    block_sides.append([None, None])
                else:
                    if compiled is not None:
                        compiled.flush(call, state)  # the blocks before it first
                    block_sides.append(forward_block(run, call, state))
                tape.runs.append(run)
                fresh = tape.sources[checked:]
                checked = len(tape.sources)
                if fresh and _torch.any_post_accumulate_hooks(fresh):
                    break
            if settings.compiled is not None:
                settings.compiled.flush(call, state)  # a node's blocks run within it
        for run in tape.runs:
            run.tape = None  # recorded: no cycle keeps the tape alive past its graph
        inputs = [t for part in before for t in part]
        sources = tape.sources
        if tape.managed and torch.is_grad_enabled():
            # FSDP's parameters are no inputs of the node (FSDP hands them their
            # gradients): one input that needs a gradient keeps the outputs in the graph
            sources = [*sources, _fsdp.anchor(inputs[0].device)]
        if not (sources or any(t.requires_grad for t in chain(inputs, keywords))):
            sides.extend(block_sides)  # nothing to differentiate: no node
            previous, first = None, False
            continue
        side_leaves, side_specs = _flatten_sides(block_sides, settings.namespace)
        tape.side_specs = [[0 if s is None else s[1] for s in row] for row in side_specs]
        tape.sizes = [len(part) for part in state]
        tape.versions = _torch.versions(tape.sources)
        tape.kinds = list(map(_KIND, tape.sources))
        tape.kw_versions = _torch.versions(keywords) if keywords else []
        outputs = [t for part in state for t in part]
        out = apply(tape, [*outputs, *side_leaves], [*inputs, *keywords, *sources])
        state = _unflatten(out[: len(outputs)], tape.sizes)
        tape.held = Held(state)
        if previous is not None:  # this node gives the previous one its outputs back
            assert previous.held is not None
            previous.held.aliases = [[None] * len(p) for p in previous.held.aliases]
            previous.held.provider = tape
            tape.previous = _weak(previous)
        elif first and leaves is not None:
            relieve(tape, leaves)
        previous, first = tape, False
        sides.extend(_unflatten_sides(out[len(outputs) :], side_specs))
    return state, sides, previous


def _weak(tape: Tape) -> Any:
    import weakref

    return weakref.ref(tape)


def _unflatten(flat: Sequence[torch.Tensor], sizes: list[int]) -> State:
    state, at = [], 0
    for size in sizes:
        state.append(list(flat[at : at + size]))
        at += size
    return state


def _flatten_sides(block_sides: list[list[Any]], namespace: str) -> tuple[Leaves, list[list[Any]]]:
    leaves: Leaves = []
    specs: list[list[Any]] = []
    for steps in block_sides:
        row: list[Any] = []
        for side in steps:
            if side is None:
                row.append(None)
                continue
            found, spec = _trees.flatten(side, namespace)
            leaves.extend(found)
            row.append((spec, len(found)))
        specs.append(row)
    return leaves, [[None if s is None else s for s in row] for row in specs]


def _unflatten_sides(flat: Sequence[torch.Tensor], specs: list[list[Any]]) -> list[list[Any]]:
    out, at = [], 0
    for row in specs:
        steps: list[Any] = []
        for entry in row:
            if entry is None:
                steps.append(None)
                continue
            spec, n = entry
            steps.append(spec.unflatten(list(flat[at : at + n])))
            at += n
        out.append(steps)
    return out
