"""One block in one call: ``f`` and ``g`` run checked, recording or replaying what they read.

In the forward pass of a reversible block, each call of ``f`` or ``g`` records what it
read: the state of the random generators, its buffers (``_buffers.Snapshot``) and the
tensors in its modules' parameter slots (which ``torch.func.functional_call`` may have
replaced by tensors computed upstream). Its recomputation runs with all of it back in
place: the generators set, the recorded buffers in the slots, and in each parameter slot
a detached alias of the recorded tensor, so that gradients reach the parameters (or the
upstream tensors) once, through the autograd Function, and never from inside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from . import _checks, _trees
from ._autocast import NOTHING
from ._buffers import Snapshot
from ._rng import State
from ._state import running

if TYPE_CHECKING:
    from ._block import Block
    from ._call import Call

Leaves = list[torch.Tensor]
WHO = ("f", "g")

# a parameter slot: (the module's parameter dict, a name, the tensor in it, its position
# among the sources whose gradients the Function returns, or -1 if it needs none)
Param = tuple[dict[str, Any], str, torch.Tensor, int]
Signature = list[tuple[torch.Size, torch.dtype]]


class Reads:
    """What one function (``f`` or ``g``) of a block read, call after call, in the forward pass."""

    __slots__ = ("calls", "lazy", "modules", "outputs", "params", "sources")

    def __init__(self, module: nn.Module, positions: dict[int, int], sources: Leaves) -> None:
        params: list[Param] = []
        used: list[int] = []
        modules: list[nn.Module] = []  # those holding buffers
        lazy = False
        stack = [module]
        while stack:
            m = stack.pop()
            if m._parameters:
                for name, p in m._parameters.items():
                    if p is None:
                        continue
                    k = -1
                    if p.requires_grad:
                        k = positions.get(id(p), -1)
                        if k < 0:
                            k = positions[id(p)] = len(sources)
                            sources.append(p)
                        used.append(k)
                    params.append((m._parameters, name, p, k))
            if m._buffers:
                modules.append(m)
            if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
                lazy = True
            if m._modules:
                stack.extend(c for c in m._modules.values() if c is not None)
        self.params = params
        self.sources = list(dict.fromkeys(used))  # a parameter shared inside the function: once
        self.modules = modules
        self.lazy = lazy
        self.calls: list[tuple[State | None, Snapshot | None]] = []
        self.outputs: list[Signature] = []  # the shapes and dtypes each call returned


class Backward:
    """What the recomputations of one backward pass share: detached aliases of every source.

    ``keywords`` are the keyword tensors ``f`` and ``g`` see in the recomputation: detached
    aliases of those that need a gradient (``grads`` of each function), the caller's own
    tensors otherwise.
    """

    __slots__ = ("aliases", "autocast", "grads", "keywords", "kwargs", "verify")

    def __init__(self, call: Call, aliases: Leaves, keywords: Leaves, verify: bool = True) -> None:
        context = call.context
        self.verify = verify  # check, once per block, what else f and g depend on
        self.aliases = aliases
        self.kwargs = context.rebuild(keywords)
        self.keywords = (keywords if context.to_f else [], keywords if context.to_g else [])
        wanted = [t for t in keywords if t.requires_grad]
        self.grads = (wanted if context.to_f else [], wanted if context.to_g else [])
        state = call.autocast
        self.autocast: Any = NOTHING if state is None or state.is_current else state.replay()


class Step:
    """Block ``index`` of ``call``: calls ``f`` and ``g`` on half-streams, checked.

    With ``record``, the forward calls record what they read (``reads``), for the
    recomputation to replay.
    """

    __slots__ = ("block", "call", "index", "reads", "sample")

    def __init__(
        self,
        call: Call,
        index: int,
        block: Block,
        record: tuple[dict[int, int], Leaves] | None = None,
    ) -> None:
        self.call, self.index, self.block = call, index, block
        self.reads: tuple[Reads, Reads] | None = None
        if record is not None:
            self.reads = (Reads(block.f, *record), Reads(block.g, *record))
        self.sample: Leaves | None = None

    @property
    def lazy(self) -> bool:
        """Whether a module of the block has parameters still to be materialised."""
        return self.reads is not None and (self.reads[0].lazy or self.reads[1].lazy)

    def forward(self, which: int, tree: Any, leaves: Leaves) -> Any:
        """Call ``f`` (``which == 0``) or ``g`` on a half-stream in the forward pass.

        ``tree`` is the half-stream, ``leaves`` its leaves. Returns what the function
        returned; raises if it modified its input or keyword tensors in place.
        """
        call, index = self.call, self.index
        module = self.block.f if which == 0 else self.block.g
        keywords = call.keywords[which]
        before = _checks.versions(leaves)
        kw_before = _checks.versions(keywords) if keywords else None
        reads = self.reads[which] if self.reads is not None else None
        if reads is not None:
            state = call.generators.capture() if call.generators is not None else None
            snapshot = Snapshot.take(reads.modules, call.policy) if reads.modules else None
        with running(index, recomputing=False):
            try:
                out = module(tree, **call.kwargs[which])
            except Exception as e:
                self._note(e, which, tree, leaves)
                raise
        self._unchanged(which, tree, leaves, before, keywords, kw_before)
        if reads is not None:
            if snapshot is not None:
                surprise = snapshot.settle(call.policy)
                if surprise is not None:
                    _checks.buffer_modified(index, WHO[which], surprise)
            reads.calls.append((state, snapshot))
        return out

    def recompute(self, which: int, tree: Any, leaves: Leaves, k: int, back: Backward) -> Any:
        """Call ``f`` or ``g`` again as its ``k``-th forward call ran, with autograd on.

        The generators, buffers and parameter tensors of that call are put in place, as
        detached aliases (``back.aliases``) where a gradient is wanted; the live ones are
        put back afterwards.
        """
        assert self.reads is not None
        call, index = self.call, self.index
        reads = self.reads[which]
        state, snapshot = reads.calls[k]
        module = self.block.f if which == 0 else self.block.g
        keywords = back.keywords[which]
        kw_before = _checks.versions(keywords) if keywords else None
        aliases = back.aliases
        live = []
        for slots, name, t, position in reads.params:
            live.append(slots[name])
            slots[name] = aliases[position] if position >= 0 else t
        if state is not None:
            assert call.generators is not None
            call.generators.set(state)
        try:
            with (
                snapshot.swapped() if snapshot is not None else NOTHING,
                running(index, recomputing=True),
                torch.enable_grad(),
            ):
                try:
                    out = module(tree, **back.kwargs[which])
                except Exception as e:
                    self._note(e, which, tree, leaves)
                    raise
        finally:
            for (slots, name, _, _), t in zip(reversed(reads.params), reversed(live)):
                slots[name] = t
        if keywords:
            k_ = _checks.modified(keywords, kw_before)  # type: ignore[arg-type]
            if k_ is not None:
                _checks.keyword_modified(index, WHO[which], call.context.name(k_), keywords[k_])
        if back.verify and (index, which) not in call.verified:  # once: what else it reads
            outputs = [t for t in _trees.flatten(out, call.namespace)[0] if _requires_grad(t)]
            found = _checks.foreign(outputs, [*leaves, *aliases, *keywords])
            if found is not None:
                _checks.foreign_found(index, WHO[which], found)
            call.verified.add((index, which))
        return out

    def returned(self, which: int, leaves: Leaves) -> None:
        """Note what a forward call of ``f`` or ``g`` returned (its leaves), for the recompute."""
        if self.reads is not None:
            self.reads[which].outputs.append(_signature(leaves))

    def returned_again(self, which: int, k: int, leaves: Leaves) -> None:
        """Raise unless the ``k``-th call, recomputed, returns the shapes and dtypes it did."""
        assert self.reads is not None
        expected = self.reads[which].outputs[k]
        got = _signature(leaves)
        if got != expected:
            _checks.recompute_differs(self.index, WHO[which], expected, got)

    def grad_inputs(self, which: int, back: Backward) -> Leaves:
        """The aliases whose gradients a recomputed ``f`` or ``g`` contributes to."""
        assert self.reads is not None
        aliases = back.aliases
        return [*(aliases[p] for p in self.reads[which].sources), *back.grads[which]]

    def _unchanged(
        self,
        which: int,
        tree: Any,
        leaves: Leaves,
        before: list[int],
        keywords: Leaves,
        kw_before: list[int] | None,
    ) -> None:
        k = _checks.modified(leaves, before)
        if k is not None:
            _checks.input_modified(self.index, WHO[which], self._names(tree)[k], leaves[k])
        if kw_before is not None:
            k = _checks.modified(keywords, kw_before)
            if k is not None:
                name = self.call.context.name(k)
                _checks.keyword_modified(self.index, WHO[which], name, keywords[k])

    def _names(self, tree: Any) -> tuple[str, ...]:
        """Printable key paths of the leaves of a tree ``f`` or ``g`` was given."""
        layout = self.call.layout
        names = tuple(_trees.flatten_with_names(tree, self.call.namespace)[1])
        return layout.names if len(names) == len(layout.names) else names

    def _note(self, error: BaseException, which: int, tree: Any, leaves: Leaves) -> None:
        names = self._names(tree)
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, leaves))
        hint = self.call.layout.hint(leaves, str(error), WHO[which])
        _checks.note(error, self.index, WHO[which], shapes, hint)


def _signature(leaves: list[Any]) -> Signature:
    return [(getattr(t, "shape", None), getattr(t, "dtype", type(t))) for t in leaves]


def _requires_grad(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad
