"""One call of a sequence, and each block's functions called in it: checked, recorded, replayed.

Objects by lifetime:

- ``Shared``: what every node of one call keeps for backward (layout, keyword context,
  autocast state, generators, settings);
- ``Call``: what only the forward pass needs (keyword copies, the random tracker): it
  dies with the forward;
- ``BlockRun``: one block in one call, its functions' records, kept by its node.

``BlockRun.call`` runs a function in the forward pass: checked (its input and keyword
tensors left as they were), and, when recorded, with what it read captured for the
recomputation (``_replay``) and, on its first call, with autograd on to find what it reads
beyond its modules (``_externals``). ``BlockRun.recall`` runs it again in backward with all
of it put back.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from itertools import chain
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import optree
import torch
from torch import nn

from .. import _checks, _state, _torch, _trees
from .._context import Context, Normal
from .._errors import RevtreeError
from .._layout import Layout
from .._replay import _protocol
from .._replay._autocast import NOTHING, AutocastState
from .._replay._rng import (
    LOCK,
    Generators,
    PerModule,
    Tracker,
    around_submodules,
    generators_for,
)
from . import _externals
from ._fsdp import is_unit
from ._learned import Learned, Walk

if TYPE_CHECKING:
    from .._block import Block, Spec
    from ._sink import Backward

Leaves = list[torch.Tensor]


_SHAPE = attrgetter("shape")
_MODULES = attrgetter("modules")


class Settings:
    """A sequence's settings, frozen for one call."""

    __slots__ = ("check_drift", "compiled", "learned", "namespace", "preserve_rng", "strict_drift")

    def __init__(self, owner: Any) -> None:
        self.compiled: Any = owner._compiled_engine
        self.namespace: str = owner.namespace
        self.check_drift: float | None = owner.check_drift
        self.strict_drift: bool = owner.on_drift == "raise"
        self.preserve_rng: bool = owner.preserve_rng_state
        self.learned: Learned = owner._learned


class Shared:
    """What every node of one call of a sequence keeps for its backward."""

    __slots__ = ("autocast", "context", "generators", "layout", "settings", "signatures")

    def __init__(self, layout: Layout, context: Context, settings: Settings) -> None:
        self.layout = layout
        self.context = context
        self.settings = settings
        self.generators: Generators | None = None
        self.autocast: AutocastState | None = None
        self.signatures: dict[Any, int] = {}  # the compiled engine's, per coupling and route


class Call:
    """One call of a sequence, for its forward pass only (it dies with the forward)."""

    __slots__ = (
        "_kwargs",
        "_views",
        "as_recomputed",
        "generators",
        "pending",
        "policy",
        "shared",
        "tracker",
        "uncached",
    )

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.policy = shared.settings.learned.policy
        self.tracker: Tracker | None = None
        self.generators: Generators | None = None
        self._kwargs: dict[bool, tuple[dict[str, Any], Leaves]] = {}
        self._views: dict[tuple[bool, Normal], View] = {}
        self.pending: Any = None  # blocks the compiled engine runs together, not yet run
        # parametrized tensors computed from their originals in every recorded call, even
        # under parametrize.cached() (a cached value from a no_grad call carries no graph)
        self.uncached: Any = (
            _torch.parametrizations_uncached() if _torch.parametrizations_cached() else NOTHING
        )
        self.as_recomputed = _torch.forward_as_recomputed()

    def record(self, state: list[Leaves], preserve_rng: bool | None = None) -> None:
        """Capture what a recomputation replays: the generators in use and the autocast state."""
        shared = self.shared
        if shared.autocast is not None:
            return
        tensors = [t for part in state for t in part]
        tensors += shared.context.tensors
        generators = generators_for(tensors)
        if shared.settings.preserve_rng if preserve_rng is None else preserve_rng:
            self.tracker = Tracker(generators)
            self.generators = shared.generators = generators
        types = tuple(d.type for d in generators.devices)
        shared.autocast = AutocastState.capture(types)

    def kwargs(self, recorded: bool) -> tuple[dict[str, Any], Leaves]:
        """The keyword arguments the functions see, and their tensors: copies of the caller's.

        Were a function to modify one in place, the error raised would come after the
        caller's tensor had changed. Recorded (reversible) calls get detached copies; the
        plain ones copies that pass gradients on.
        """
        known = self._kwargs.get(recorded)
        if known is None:
            context = self.shared.context
            if recorded:
                copies = [t.detach().clone() for t in context.tensors]
            else:
                copies = [t.clone() for t in context.tensors]
            known = self._kwargs[recorded] = (context.rebuild(copies), copies)
        return known

    def view(self, recorded: bool, receives: Normal) -> View:
        """What a function that ``receives`` gets: its keyword arguments, their tensors."""
        context = self.shared.context
        if context.empty:
            return _NO_KEYWORDS
        key = (recorded, receives)
        view = self._views.get(key)
        if view is None:
            kwargs, copies = self.kwargs(recorded)
            receiving = context.receiving(receives)
            view = (context.select(kwargs, receives), [copies[k] for k in receiving], receiving)
            self._views[key] = view
        return view

    def buffer_surprise(self, name: str) -> None:
        raise _Surprise(name)


View = tuple[dict[str, Any], Leaves, list[int]]  # keyword arguments, their tensors, positions
_NO_KEYWORDS: View = ({}, [], [])


class _Surprise(Exception):
    """A buffer recorded without a copy was changed in place (located by ``BlockRun.call``)."""


def _same(t: Any) -> Any:
    return t


def _detach(t: torch.Tensor) -> torch.Tensor:
    return t.detach()  # not t: a node saving its own output would then never be freed


def _detached(out: Any, namespace: str) -> Any:
    return optree.tree_map(
        lambda t: t.detach() if isinstance(t, torch.Tensor) else t,
        out,
        none_is_leaf=_trees.NONE_IS_LEAF,
        namespace=namespace,
    )


class BlockRun:
    """Block ``index`` in one call: its functions called checked, recorded, replayed.

    ``records`` holds, per function, the records of its forward calls in order; ``walks``
    the functions' walks. With ``tape`` (a node recording), forward calls are recorded.
    """

    __slots__ = (
        "block",
        "compiled",
        "fns",
        "group",
        "hooks",
        "index",
        "managed",
        "names",
        "program",
        "records",
        "sample",
        "shared",
        "tape",
        "unit",
        "walks",
    )

    def __init__(
        self,
        shared: Shared,
        index: int,
        block: Block,
        program: list[Spec],
        tape: Any = None,
    ) -> None:
        self.shared, self.index, self.block, self.program = shared, index, block, program
        known = shared.settings.learned.block(block)
        self.fns: list[nn.Module] = known.fns
        self.names: list[str] = known.names
        self.unit = is_unit(block)  # an FSDP unit: run through its own call (see _fsdp)
        self.tape = tape
        self.walks: list[Walk] = known.walks
        self.managed = known.managed  # FSDP manages parameters of it (they get gradients from it)
        self.records: list[list[_protocol.Record]] = []
        if tape is not None:
            self.records = [[] for _ in self.fns]
        self.sample: Any = None
        self.compiled = False  # whether its forward ran compiled (see _compiled)
        self.group: Any = None  # the compiled engine's mark: run in one graph with others
        self.hooks = 0  # how many hooks its modules carried in the forward (for backward)

    def hooks_now(self) -> int:
        """How many hooks the modules of its functions carry now."""
        return _torch.hooks_count(chain.from_iterable(map(_MODULES, self.walks)))

    # ----------------------------------------------------------------------- forward

    def call(
        self,
        call: Call,
        j: int,
        args: Sequence[Any],
        leaves: Leaves,
        receives: Normal,
        method: Any = None,
        submodules: bool = False,
    ) -> Any:
        """Call function ``j`` (or its ``method``) on ``args`` in the forward pass.

        ``leaves`` are the tensors of ``args``; ``receives`` what it gets of the keyword
        arguments; ``submodules``: record the random state at each submodule call (an
        invertible module, whose inverse may call them in another order). Raises if it
        modified its input or keyword tensors in place.
        """
        fn = self.fns[j] if method is None else method
        recorded = self.tape is not None
        kwargs, keywords, receiving = call.view(recorded, receives)
        before = _torch.versions(leaves)
        kw_before = _torch.versions(keywords) if keywords else None
        if recorded:
            out = self._recorded(call, j, fn, args, leaves, kwargs, submodules)
        else:
            previous = _state.enter(self.index, False)
            try:
                out = fn(*args, **kwargs)
            except Exception as e:
                self.note(e, j, args, leaves)
                raise
            finally:
                _state.leave(previous)
        if _torch.versions(leaves) != before:
            k = _checks.modified(leaves, before)
            assert k is not None
            _checks.input_modified(self.index, self.names[j], self._leaf_name(j, k), leaves[k])
        if kw_before is not None:
            k = _checks.modified(keywords, kw_before)
            if k is not None:
                name = self.shared.context.name(receiving[k])
                _checks.keyword_modified(self.index, self.names[j], name, keywords[k])
        return out

    def _recorded(
        self,
        call: Call,
        j: int,
        fn: Any,
        args: Sequence[Any],
        leaves: Leaves,
        kwargs: Any,
        submodules: bool = False,
    ) -> Any:
        # the random state captured and the call's draws, with no other thread's between
        with LOCK if call.tracker is not None else NOTHING:
            record, walk = self._capture(call, j)
            discover = not walk.managed and (not walk.discovered or walk.open)
            local = _state._local
            previous = getattr(local, "now", _state._OUTSIDE)
            local.now = (self.index, False, record)  # (its memo is made on first use)
            per = PerModule(call.generators) if submodules and call.generators else None
            try:
                with (
                    call.uncached,
                    call.as_recomputed,
                    around_submodules(per.record) if per else NOTHING,
                ):
                    if discover:
                        out = self._discover(j, walk, record, fn, args, kwargs)
                    else:
                        out = fn(*args, **kwargs)
            except Exception as e:
                self.note(e, j, args, leaves)
                raise
            finally:
                local.now = previous
            if per is not None:
                record.substates = per.kept()
        try:
            _protocol.settle(record, walk, call)
        except _Surprise as s:
            _checks.buffer_modified(self.index, self.names[j], str(s))
        self.records[j].append(record)
        return out

    def _capture(self, call: Call, j: int) -> tuple[_protocol.Record, Walk]:
        """A record of what the next call of function ``j`` reads, its sources numbered."""
        walk = self.walks[j]
        record = _protocol.Record()
        try:
            _protocol.capture(record, walk, call)
        except KeyError:  # a slot the walk recorded is gone: walk it again
            learned = self.shared.settings.learned
            learned.forget(self.fns[j])
            self.walks = list(self.walks)
            walk = self.walks[j] = learned.walk(self.fns[j], self.unit)
            record = _protocol.Record()
            _protocol.capture(record, walk, call)
        assert self.tape is not None
        self.tape.add_sources(record)
        return record, walk

    def _discover(
        self,
        j: int,
        walk: Walk,
        record: _protocol.Record,
        fn: Any,
        args: Sequence[Any],
        kwargs: Any,
    ) -> Any:
        """Call ``fn`` with autograd on and find what it reads beyond its modules."""
        boundary = _torch.next_sequence_number()
        namespace = self.shared.settings.namespace
        # its input needs a gradient, as in plain autograd (and in the recomputation): a
        # copy of a leaf that does, which it may even change in place (it is checked below)
        trees = [_trees.flatten(a, namespace) for a in args]
        leaves = [[t.detach().requires_grad_() for t in found] for found, _ in trees]
        inputs = [t for part in leaves for t in part]
        # the graph is the engine's own, let go right after: hooks around the call (a
        # checkpoint's, a memory count's) must not see what it saves
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_detach, _same):
            copies = [t.clone() for t in inputs]
            sizes = [len(part) for part in leaves]
            starts = [sum(sizes[:k]) for k in range(len(sizes))]
            args = [
                spec.unflatten(copies[start : start + size])
                for (_, spec), start, size in zip(trees, starts, sizes)
            ]
            before = _torch.versions(copies)
            out = fn(*args, **kwargs)
        outputs = [
            t
            for t in _trees.flatten(out, namespace)[0]
            if isinstance(t, torch.Tensor) and t.requires_grad
        ]
        if _torch.versions(copies) != before:
            k = _checks.modified(copies, before)
            assert k is not None
            _checks.input_modified(self.index, self.names[j], self._leaf_name(j, k), copies[k])
        found, older = _externals.walk(outputs, [*record.params, *inputs], boundary)
        del outputs
        if older is not None:
            _checks.foreign_found(self.index, self.names[j])
        out = _detached(out, namespace)  # the call's graph is let go: what it created dies with it
        watched = [weakref.ref(t) for t in inputs]
        del args, copies, inputs, leaves, trees
        # something kept a graph of the call (tools that watch every module keep the inputs:
        # a flop counter, a module tracker)
        if any(ref() is not None for ref in watched) and not (
            _torch.has_global_module_hooks() or _torch.modes_active()
        ):
            _checks.escaped(self.index, self.names[j])
        externals = _externals.alive(found)
        walk.discovered = True
        walk.open = bool(externals)
        if externals:
            tape = self.tape
            tape.add_externals(record, externals, _checks.where(self.index, self.names[j]))
        return out

    def returned(self, j: int, leaves: list[Any]) -> None:
        """Note what the last forward call of function ``j`` returned, for the recompute."""
        if self.tape is not None:
            self.records[j][-1].shapes = _signature(leaves)

    # ---------------------------------------------------------------------- backward

    def recall(
        self,
        back: Backward,
        j: int,
        k: int,
        args: Sequence[Any],
        leaves: Leaves,
        receives: Normal,
        method: Any = None,
        grad: bool = True,
    ) -> Any:
        """Call function ``j`` (or its ``method``) again as its ``k``-th forward call ran.

        Everything that call read is put back (``_replay``), with autograd on unless
        ``grad`` is off (an inverse that only rebuilds), and the live state is left as it
        was.
        """
        record = self.records[j][k]
        walk = self.walks[j]
        fn = self.fns[j] if method is None else method
        kwargs, keywords, receiving, _ = back.view(receives)
        kw_before = _torch.versions(keywords) if keywords else None
        tokens = _protocol.restore(record, walk, back)
        local = _state._local
        previous = getattr(local, "now", _state._OUTSIDE)
        local.now = (self.index, True, None if record.memo is None else record.memo.replay())
        grad_mode = torch.is_grad_enabled()
        _torch.set_grad_enabled(grad)
        substates = record.substates
        try:
            if substates is None:
                out = fn(*args, **kwargs)
            else:  # each submodule from the state it started from in the forward
                assert back.generators is not None  # it drew: its state was kept
                with around_submodules(PerModule(back.generators, substates).replay):
                    out = fn(*args, **kwargs)
        except Exception as e:
            self.note(e, j, args, leaves)
            raise
        finally:
            _torch.set_grad_enabled(grad_mode)
            local.now = previous
            if tokens:
                _protocol.undo(tokens)
        if kw_before is not None:
            i = _checks.modified(keywords, kw_before)
            if i is not None:
                name = self.shared.context.name(receiving[i])
                _checks.keyword_modified(self.index, self.names[j], name, keywords[i])
        return out

    def returned_again(self, j: int, k: int, leaves: list[Any]) -> None:
        """Raise unless the ``k``-th call, recomputed, returns the shapes it did.

        A shape that still broadcasts would otherwise rebuild the inputs wrong, silently.
        """
        expected = self.records[j][k].shapes
        if expected is None:  # a compiled forward call, trusted (see _compiled)
            return
        got = _signature(leaves)
        if got != expected:
            _checks.recompute_differs(self.index, self.names[j], expected, got)

    def used(self, j: int, k: int = 0) -> list[int]:
        """The sources the ``k``-th call of function ``j`` read (their positions)."""
        return self.records[j][k].used

    def calls(self, j: int) -> int:
        """How many times function ``j`` was called in the forward pass."""
        return len(self.records[j])

    # ------------------------------------------------------------------------ errors

    def note(self, error: BaseException, j: int, args: Sequence[Any], leaves: Leaves) -> None:
        """Say, on an exception raised inside function ``j``, where it was raised and on what."""
        layout = self.shared.layout
        shapes = ", ".join(f"{tuple(t.shape)}" for t in leaves if isinstance(t, torch.Tensor))
        names = self._arg_names(args)
        if names is not None:
            shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, leaves))
        reads = self._reads(j, leaves)
        hint = layout.hint(reads, str(error), self.names[j]) if reads else None
        message = str(error)
        if isinstance(error, TypeError) and "argument" in message and hint is None:
            hint = (
                f"Hint: a call's keyword arguments reach f only, by default (route='f'); "
                f"route='g' sends them to g, route='both' to both, and route=(('mask',), "
                f"('mask', 'context')) names them per function (on the sequence or per "
                f"block). {self.names[j]} raised the TypeError above: does it take the "
                "keyword arguments it is given, and get those it needs?"
            )
        if "cannot register a hook on a tensor that doesn't require gradient" in message:
            hint = (
                f"Hint: {self.names[j]}'s forward call runs under torch.no_grad() (nothing is "
                "stored for backward), so its intermediates need no gradient there; register "
                "the hook only when one does: `if h.requires_grad: h.register_hook(...)` (it "
                "then fires in the recomputation, as in plain autograd)."
            )
        _checks.note(error, self.index, self.names[j], shapes, hint)

    def _arg_names(self, args: Sequence[Any]) -> list[str] | None:
        if len(args) != 1:
            return None
        layout = self.shared.layout
        names = _trees.flatten_with_names(args[0], self.shared.settings.namespace)[1]
        return names if len(names) != len(layout.names) else list(layout.names)

    def _reads(self, j: int, leaves: Leaves) -> list[tuple[int, list[Any]]]:
        """The parts function ``j`` read, each with its tensors among ``leaves``."""
        layout = self.shared.layout
        for spec in self.program:
            if j in spec.fns and spec.kind == "update":
                out, at = [], 0
                for r in spec.reads:
                    n = len(layout.members[r])
                    out.append((r, leaves[at : at + n]))
                    at += n
                return out
        if len(leaves) == len(layout.members[0]):
            return [(0, leaves)]
        return []

    def _leaf_name(self, j: int, k: int) -> str:
        """The key path of the ``k``-th input tensor of function ``j``."""
        layout = self.shared.layout
        parts = next(
            (spec.reads for spec in self.program if j in spec.fns and spec.kind == "update"),
            tuple(range(layout.parts)),
        )
        for part in parts:
            members = layout.members[part]
            if k < len(members):
                return layout.names[members[k]]
            k -= len(members)
        return f"leaf {k}"


def _signature(leaves: list[Any]) -> list[Any]:
    try:
        return list(map(_SHAPE, leaves))
    except AttributeError:  # a coupling's own methods may take what is no tensor
        return [getattr(t, "shape", type(t)) for t in leaves]


def transform_error() -> RevtreeError:
    """A ``RevtreeError`` for a reversible call under a ``torch.func`` transform."""
    return RevtreeError(
        "a reversible stack runs under a torch.func transform (grad, vjp, jacrev, jvp, "
        "vmap with autograd on): its backward recomputes the blocks inside an autograd "
        "Function these transforms cannot see through. Hint: build the sequence with "
        "reversible=False (or set seq.reversible = False) for torch.func, or call it under "
        "torch.no_grad() for vmap; the gradients are the same, the activations stored."
    )
