"""A run of reversible blocks as one autograd node: what it holds, and how it reverses.

The blocks run under ``no_grad`` first (``_pass``), each call of a function recording what
it read; the node (``Node``) then takes the run's input parts, the keyword tensors and
every tensor the blocks read that needs a gradient (its *sources*) as inputs, and returns
the output parts and the side outputs. Its backward rebuilds each block's input from its
output, last block first, and returns every gradient through the node.

What the graph keeps for backward is the ``Tape``, and nothing else: the node's saved
tensor is packed by a saved-tensor hook into the tape itself, so autograd owns it and lets
it go after backward (or keeps it under ``retain_graph=True``), as it would saved tensors.

**Outputs held once.** A node holds its outputs (detached aliases, so a change in place
is seen) until someone who can give them back takes over:

- the next node of the same call, which hands its rebuilt input back in its backward;
- for the last node, the decoded output: for a bijective codec (``Split``) the output
  leaf is held instead of its pieces, which are cut from it again in backward;
- a later call of a reversible sequence that takes that output as its input (``h =
  layer(h)`` over separately called layers): it relieves the holder and hands the leaf
  back in its backward. Should its backward not run (its result unused), the holder asks
  it to rebuild the leaf by inverting its blocks.

So a stack, or a chain of separately called stacks, holds one output in all. A caller who
keeps using an output (a skip connection) keeps it alive; nothing is ever freed under them.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from functools import partial
from itertools import chain
from operator import attrgetter
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import _checks, _drift, _torch
from .._block import _Run
from .._errors import RevtreeError
from .._replay._protocol import Record
from . import _fsdp
from ._run import BlockRun, Shared
from ._sink import Backward
from ._steps import KINDS, rebuild_block

Leaves = list[torch.Tensor]
State = list[Leaves]

_REQUIRES_GRAD = attrgetter("requires_grad")
_KIND = attrgetter("dtype", "device")

# the decoded outputs of reversible calls, to be relieved by a later call taking one as input
_OUTPUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class Held:
    """A node's outputs, for its backward: kept, handed back, or rebuilt on request."""

    __slots__ = (
        "aliases",
        "checked",
        "decoded",
        "leaf_providers",
        "provider",
        "received",
        "received_leaves",
    )

    def __init__(self, state: State) -> None:
        self.aliases: list[list[torch.Tensor | None]] = [[t.detach() for t in p] for p in state]
        # (alias, version, description) for the in-place check in backward
        self.checked: list[tuple[torch.Tensor, int, str]] = []
        self.decoded: dict[int, torch.Tensor] = {}  # output leaf i, held instead of its pieces
        self.provider: Tape | None = None  # the next node of the call: gives the whole state
        self.leaf_providers: dict[int, tuple[Tape, int]] = {}  # leaf i: a later call's input
        self.received: State | None = None
        self.received_leaves: dict[int, torch.Tensor] = {}

    def receive(self, state: State) -> None:
        """The rebuilt outputs, handed back by the node that took over."""
        self.received, self.provider = state, None


class Tape:
    """A node's run of blocks, and everything its backward reads."""

    __slots__ = (
        "__weakref__",
        "externals",
        "feeds",
        "held",
        "hooked",
        "kinds",
        "kw_versions",
        "managed",
        "positions",
        "previous",
        "runs",
        "shared",
        "side_specs",
        "sizes",
        "sources",
        "versions",
    )

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.runs: list[BlockRun] = []
        self.sources: Leaves = []  # every tensor read that needs a gradient, once each
        self.positions: dict[int, int] = {}  # id(source) -> its position in sources
        self.externals: frozenset[int] = frozenset()  # positions of sources read by closure
        self.versions: list[int] = []
        self.kinds: list[tuple[torch.dtype, torch.device]] = []  # the sources' dtypes, devices
        self.kw_versions: list[int] = []
        self.hooked = False  # whether a function has module hooks of its own
        self.managed = False  # whether FSDP manages parameters of a block
        self.held: Held | None = None
        self.previous: weakref.ref[Tape] | None = None  # the node whose outputs it took
        self.feeds: list[tuple[weakref.ref[Tape], int, int]] = []  # (holder, its leaf, ours)
        self.sizes: list[int] = []  # tensors per part
        self.side_specs: list[list[Any]] = []  # per run, per step: the side output's structure

    # ---------------------------------------------------------------------- forward

    def add_sources(self, record: Record) -> None:
        """Give each tensor the record's call read that needs a gradient a source position."""
        positions, sources = self.positions, self.sources
        params = record.params
        ids = list(map(id, params))
        if positions.keys().isdisjoint(ids) and all(map(_REQUIRES_GRAD, params)):
            # the common case, all new and all trained: numbered in order, in C loops
            start = len(sources)
            where = list(range(start, start + len(params)))
            if len(set(ids)) == len(ids):
                sources.extend(params)
                positions.update(zip(ids, where))
                record.positions = record.used = where
                return
        where = []
        for t in record.params:
            if t.requires_grad:
                k = positions.get(id(t))
                if k is None:
                    k = positions[id(t)] = len(sources)
                    sources.append(t)
                where.append(k)
            else:
                where.append(-1)
        record.positions = where
        used = [k for k in where if k >= 0]
        record.used = list(dict.fromkeys(used)) if used else used

    def add_externals(self, record: Record, tensors: Leaves, where: str) -> None:
        """Sources the call read beyond its modules (see ``_externals``)."""
        for t in tensors:
            if _torch.has_tensor_hooks(t):
                raise RevtreeError(
                    f"{where} reads a "
                    f"tensor of shape {tuple(t.shape)} with hooks of its own (register_hook) "
                    "through a closure or a plain attribute; its recomputation cannot pass "
                    "the gradient on without firing them twice. Hint: register it as a "
                    "parameter of the function's module, or pass it as a keyword argument."
                )
            k = self.positions.get(id(t))
            if k is None:
                k = self.positions[id(t)] = len(self.sources)
                self.sources.append(t)
            self.externals = self.externals | {k}
            if k not in record.used:
                record.used.append(k)

    # --------------------------------------------------------------------- backward

    def indices(self) -> list[int]:
        return [run.index for run in self.runs]

    def check(self, keywords: Leaves) -> None:
        """Raise if what backward reads changed since the forward: in place, or otherwise."""
        if self.versions and _torch.versions(self.sources) != self.versions:
            k = _checks.modified(self.sources, self.versions) or 0
            _checks.parameter_modified(self.indices(), tuple(self.sources[k].shape))
        if self.kinds and list(map(_KIND, self.sources)) != self.kinds:
            k = next(i for i, t in enumerate(self.sources) if _KIND(t) != self.kinds[i])
            dtype, device = self.kinds[k]
            t = self.sources[k]
            was = f"converted from {dtype} on {device} to {t.dtype} on {t.device}"
            _checks.parameter_converted(self.indices(), tuple(t.shape), was)
        for run in self.runs:
            if not all(w.valid() for w in run.walks):
                who = next(n for n, w in zip(run.names, run.walks) if not w.valid())
                what = "a submodule, parameter or buffer was added or replaced"
                _checks.function_changed(run.index, who, what)
            if run.hooks != run.hooks_now():
                who = " or ".join(run.names)
                _checks.function_changed(
                    run.index, who, "hooks of its modules were added or removed"
                )
        if self.kw_versions and _torch.versions(keywords) != self.kw_versions:
            k = _checks.modified(keywords, self.kw_versions) or 0
            _checks.keyword_changed(self.indices(), self.shared.context.name(k), keywords[k])
        held = self.held
        if held is not None:
            for alias, version, name in held.checked:
                if alias._version != version:
                    _checks.output_modified(self.indices(), name, alias)

    def outputs(self) -> State:
        """The node's output parts, from wherever they are now."""
        held = self.held
        if held is None:
            raise RuntimeError(
                "Trying to backward through the graph a second time (or directly access saved "
                "tensors after they have already been freed). Saved intermediate values of the "
                "graph are freed when you call .backward() or autograd.grad(). Specify "
                "retain_graph=True if you need to backward through the graph a second time."
            )
        if held.received is not None:
            return [list(p) for p in held.received]
        if held.provider is not None:
            return held.provider.rebuild_inputs()
        state: list[list[Any]] = [list(p) for p in held.aliases]
        layout = self.shared.layout
        leaves: dict[int, torch.Tensor] = dict(held.decoded)
        leaves.update(held.received_leaves)
        for i, (tape, j) in held.leaf_providers.items():
            if i not in held.received_leaves:
                leaves[i] = tape.input_leaf(j)
        for i, leaf in leaves.items():
            for (k, at), piece in zip(layout.homes[i], layout.pieces(leaf, i)):
                state[k][at] = piece
        return state

    def rebuild_inputs(self) -> State:
        """The node's input parts, rebuilt by inverting its blocks (no gradient)."""
        state = self.outputs()
        back = Backward(self, [False] * len(self.shared.context.tensors))
        with torch.no_grad():
            for run in reversed(self.runs):
                rebuild_block(run, back, state)
        return state

    def input_leaf(self, j: int) -> torch.Tensor:
        """Input leaf ``j`` of the call, rebuilt."""
        state = self.rebuild_inputs()
        return self.shared.layout.leaf(state, j)

    def backward(self, needs: Sequence[bool], grads: Sequence[Any]) -> tuple[Any, ...]:
        """The node's backward (see the module's docstring)."""
        if torch.is_grad_enabled():
            raise RevtreeError(
                "double backward (create_graph=True) through a reversible stack is not "
                "supported: its backward recomputes the blocks and is not itself "
                "differentiable. Hint: for higher-order gradients run the stack on plain "
                "autograd: reversible=False when you build it, or seq.reversible = False on "
                "one built (an adapter's sequence too)."
            )
        shared = self.shared
        context = shared.context
        keywords = context.tensors
        self.check(keywords)
        state = self.outputs()
        n = sum(self.sizes)
        flat_grads = list(grads[:n])
        dstate: list[list[Any]] = []
        at = 0
        for size in self.sizes:
            dstate.append(flat_grads[at : at + size])
            at += size
        dsides = list(grads[n:])

        kw_needs = needs[1 + n : 1 + n + len(keywords)]
        back = Backward(
            self,
            kw_needs,
            accumulate=self.hooked or _torch.has_global_module_hooks(),
            open=self.managed,
        )
        settings = shared.settings
        warned = False
        side_at = len(dsides)
        runs = self.runs
        at = len(runs)
        while at:
            at -= 1
            run, specs = runs[at], self.side_specs[at]
            count = sum(s for s in specs if s)
            mine = dsides[side_at - count : side_at]
            side_at -= count
            compiled = settings.compiled
            if run.unit:
                _reverse_unit(run, back, state, dstate, mine, specs)
            elif compiled is not None and compiled.takes(run):
                # (blocks run as one graph with it, before it, are reversed with it)
                at -= compiled.reverse(
                    run, back, state, dstate, partial(_eager, mine, specs), runs, at
                )
            else:
                reverse_block(run, back, state, dstate, mine, specs)
            if run.sample is not None and not warned:
                assert settings.check_drift is not None
                warned = _drift.check(
                    run.index,
                    shared.layout,
                    state,
                    run.sample,
                    settings.check_drift,
                    settings.strict_drift,
                )
        self._hand_back(state)
        dx = [d if need else None for d, need in zip(chain.from_iterable(dstate), needs[1 : 1 + n])]
        kw_grads = back.keyword_grads()
        dkw = [g if need else None for g, need in zip(kw_grads, kw_needs)]
        anchors = [None] * (len(needs) - 1 - n - len(keywords) - len(self.sources))
        return (None, *dx, *dkw, *back.source_grads(), *anchors)

    def _hand_back(self, state: State) -> None:
        """Give the rebuilt input to the nodes whose outputs this one took."""
        if self.previous is not None:
            previous = self.previous()
            if previous is not None and previous.held is not None:
                previous.held.receive(state)
        for ref, i, j in self.feeds:
            holder = ref()
            if holder is not None and holder.held is not None:
                holder.held.received_leaves[i] = self.shared.layout.leaf(state, j)
                holder.held.leaf_providers.pop(i, None)


def reverse_block(
    run: BlockRun,
    back: Backward,
    state: State,
    dstate: list[list[Any]],
    dsides: list[Any],
    sides: list[Any],
) -> None:
    """Rebuild block ``run``'s input from its output, and its gradients, in place."""
    at = len(dsides)
    for spec, count in zip(reversed(run.program), reversed(sides)):
        count = count or 0
        mine = dsides[at - count : at]
        at -= count
        KINDS[spec.kind].reverse(run, back, spec, state, dstate, mine)


def _eager(
    dsides: list[Any],
    sides: list[Any],
    run: BlockRun,
    back: Backward,
    state: State,
    dstate: list[list[Any]],
) -> None:
    reverse_block(run, back, state, dstate, dsides, sides)


def _reverse_unit(
    run: BlockRun,
    back: Backward,
    state: State,
    dstate: list[list[Any]],
    dsides: list[Any],
    sides: list[Any],
) -> None:
    """The reverse step of a block that is an FSDP unit, inside its own call.

    The unit's pre-hook gathers its parameters and hooks its post-backward (the
    reduce-scatter of its gradients, and freeing its parameters) onto the anchor, which the
    step back-propagates into once it is done (see ``_fsdp``).
    """
    source = _fsdp.anchor(state[0][0].device if state and state[0] else torch.device("cpu"))

    def go(carried: torch.Tensor) -> None:
        with torch.no_grad():
            reverse_block(run, back, state, dstate, dsides, sides)
        _fsdp.release(carried, source)

    with torch.enable_grad():  # so that the unit hooks its post-backward onto the anchor
        run.block(_Run(go), source)


class Node(torch.autograd.Function):
    """The output parts and side outputs of a ``Tape``'s run, from its inputs."""

    @staticmethod
    def forward(ctx: Any, tape: Tape, outputs: Leaves, *inputs: torch.Tensor) -> Any:  # noqa: D102
        ctx.tape = weakref.ref(tape)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0])  # packed into the tape: autograd owns it
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:  # noqa: D102
        tape = ctx.tape()
        if tape is None:
            tape = Tape.__new__(Tape)  # let go: the same error plain autograd gives
            tape.held = None
            tape.outputs()
        result = tape.backward(ctx.needs_input_grad[1:], grads)
        return (None, *result)


_apply = _torch.apply_function(Node)


class _Keep:
    """A pack hook that keeps the tape where autograd keeps saved tensors."""

    __slots__ = ("tape",)

    def __init__(self, tape: Tape) -> None:
        self.tape = tape

    def pack(self, t: torch.Tensor) -> Tape:
        return self.tape

    @staticmethod
    def unpack(tape: Tape) -> torch.Tensor:  # pragma: no cover (never unpacked)
        raise RuntimeError("revtree: a node's saved tape is not a tensor")


def apply(tape: Tape, outputs: Leaves, inputs: Leaves) -> tuple[torch.Tensor, ...]:
    """The node's outputs, through ``Node``, the tape kept by autograd for its backward."""
    keep = _Keep(tape)
    if _torch.saved_tensors_hooks_enabled():
        with torch.autograd.graph.saved_tensors_hooks(keep.pack, keep.unpack):
            return _apply(tape, outputs, *inputs)
    out = _apply(tape, outputs, *inputs)
    out[0].grad_fn._revtree_tape = tape  # hooks disabled here: kept with the graph instead
    return out


def hold_decoded(tape: Tape, out: Leaves) -> None:
    """Hold the call's decoded output leaves instead of their pieces, where the codec allows.

    Each such leaf is registered so that a later call taking it as input can relieve the
    tape of it (see the module's docstring).
    """
    held = tape.held
    if held is None:
        return
    layout = tape.shared.layout
    for i, (codec, leaf) in enumerate(zip(layout.codecs, out)):
        if not codec.bijective:
            continue
        alias = leaf.detach()
        held.decoded[i] = alias
        held.checked.append((alias, alias._version, layout.names[i].replace("x", "y", 1)))
        for k, at in layout.homes[i]:
            held.aliases[k][at] = None
        _OUTPUTS[leaf] = (weakref.ref(tape), i)


def relieve(tape: Tape, leaves: Leaves) -> None:
    """Take over holding the outputs of earlier calls that are this call's input ``leaves``."""
    for j, leaf in enumerate(leaves):
        entry = _OUTPUTS.get(leaf)
        if entry is None:
            continue
        holder = entry[0]()
        i = entry[1]
        if holder is None or holder is tape or holder.held is None:
            continue
        held = holder.held
        alias = held.decoded.get(i)
        recorded = next((v for a, v, _ in held.checked if a is alias), None)
        if alias is None or alias._version != recorded:
            continue  # already taken over, or changed in place since: it stays held
        del held.decoded[i]
        held.checked = [c for c in held.checked if c[0] is not alias]
        held.leaf_providers[i] = (tape, j)
        tape.feeds.append((weakref.ref(holder), i, j))
        del _OUTPUTS[leaf]
