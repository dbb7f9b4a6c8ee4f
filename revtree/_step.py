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

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import has_torch_function

from . import _checks, _state, _trees
from ._autocast import NOTHING
from ._buffers import Snapshot
from ._fsdp import is_unit
from ._rng import State

if TYPE_CHECKING:
    from ._block import Block
    from ._call import Call

Leaves = list[torch.Tensor]
WHO = ("f", "g")

# a parameter slot: (the module's parameter dict, a name, the tensor in it, its position
# among the sources whose gradients the Function returns, or -1 if it needs none)
Param = tuple[dict[str, Any], str, torch.Tensor, int]
Signature = list[Any]  # the shape of each leaf a call returned
Modes = list[bool]  # the training flag of each module a function holds, as a call found it


class Reads:
    """What one function (``f`` or ``g``) of a block read, call after call, in the forward pass."""

    __slots__ = (
        "calls",
        "managed",
        "modules",
        "names",
        "outputs",
        "params",
        "sources",
        "walked",
    )

    def __init__(
        self,
        module: nn.Module,
        positions: dict[int, int],
        sources: Leaves,
        managed: bool = False,
    ) -> None:
        params: list[Param] = []
        names: list[str] = []  # each parameter's name in the module, for functional_call
        used: list[int] = []
        modules: list[nn.Module] = []  # those holding buffers
        # FSDP units put their gathered parameters in their slots when called: those are
        # theirs to manage, not recorded here (see _fsdp)
        self.managed = managed
        stack: list[tuple[nn.Module, str, bool]] = [(module, "", managed)]
        walked: list[nn.Module] = []  # every module, for its training flag
        while stack:
            m, prefix, unit = stack.pop()
            walked.append(m)
            if not unit and is_unit(m):
                unit = self.managed = True
            slots = m._parameters
            if slots and not unit:
                for name, p in slots.items():
                    if p is None:
                        continue
                    k = -1
                    if p.requires_grad:
                        k = positions.get(id(p), -1)
                        if k < 0:
                            k = positions[id(p)] = len(sources)
                            sources.append(p)
                        used.append(k)
                    params.append((slots, name, p, k))
                    names.append(prefix + name)
            if m._buffers:
                modules.append(m)
            if m._modules:
                stack.extend(
                    (c, f"{prefix}{n}.", unit) for n, c in m._modules.items() if c is not None
                )
        self.params = params
        self.names = names
        self.sources = list(dict.fromkeys(used)) if used else used  # each once
        self.modules = modules
        self.walked = walked
        # per call: the random state, the buffers and the modules' training flags it read
        self.calls: list[tuple[State | None, Snapshot | None, Modes]] = []
        self.outputs: list[Signature] = []  # the shapes each call returned


def set_modes(modules: Sequence[nn.Module], modes: Modes) -> list[tuple[nn.Module, bool]]:
    """Set each module's training flag to ``modes``; the ``(module, flag)`` pairs it changed.

    A module switched to ``eval()`` (or back) between forward and backward would otherwise
    recompute another function (dropout off, batch statistics replaced by running ones);
    plain autograd's graph keeps what the forward did. ``restore_modes`` puts the flags
    back as they were.
    """
    changed = []
    for m, mode in zip(modules, modes):
        if m.training is not mode:
            changed.append((m, m.training))
            m.training = mode
    return changed


def restore_modes(changed: list[tuple[nn.Module, bool]]) -> None:
    """Undo ``set_modes``: each flag as it was before (last changed first)."""
    for m, mode in reversed(changed):
        m.training = mode


class Backward:
    """What the recomputations of one backward pass share, and where their gradients go.

    Each source (a tensor the forward read that needs a gradient) has a *handle*: the
    tensor its slots hold in the recomputation, whose gradient the engine computes. Where
    nothing else could see that gradient, the handle is the source itself and the engine
    hands its gradient back (capture); a source with tensor hooks, or one a
    ``functional_call`` put in a slot only for the forward, gets a detached alias instead,
    so that its hooks fire once, on the total, when the Function returns it. Where hooks
    on the modules might ask the engine about the recomputation's inputs (``FlopCounterMode``
    and other module trackers ask whether their nodes will run, which ``autograd.grad``
    cannot say of a leaf), every handle is an alias and the engine accumulates into their
    ``.grad`` instead (``accumulate``). Where FSDP manages parameters of a block, the engine
    accumulates into every leaf the recomputation reaches (``open``): the aliases, and the
    parameters FSDP gathered, whose gradients it reduce-scatters itself (see ``_fsdp``).

    ``keywords`` are the keyword tensors ``f`` and ``g`` see: detached aliases of those
    that need a gradient, the caller's own otherwise.
    """

    __slots__ = (
        "accumulate",
        "autocast",
        "handles",
        "keywords",
        "kw_totals",
        "kwargs",
        "open",
        "plain",
        "totals",
        "verify",
        "wanted",
    )

    def __init__(
        self,
        call: Call,
        sources: Leaves,
        keywords: Leaves,
        accumulate: bool = False,
        verify: bool = True,
        open: bool = False,
    ) -> None:
        context = call.context
        self.verify = verify  # check, once per block, what else f and g depend on
        self.open = open
        self.accumulate = accumulate = accumulate or open
        self.handles = [
            t.detach().requires_grad_() if accumulate or not t.is_leaf or t._backward_hooks else t
            for t in sources
        ]
        self.totals: list[Any] = [None] * len(sources)
        wanted = [t for t in keywords if t.requires_grad]
        self.kw_totals: list[Any] = [None] * len(wanted)
        self.kwargs = context.rebuild(keywords)
        self.keywords = (keywords if context.to_f else [], keywords if context.to_g else [])
        self.wanted = (wanted if context.to_f else [], wanted if context.to_g else [])
        state = call.autocast
        self.autocast: Any = NOTHING if state is None or state.is_current else state.replay()
        self.plain = not (has_torch_function(self.handles) or has_torch_function(wanted))

    def vjp(
        self,
        outputs: Leaves,
        grads: Sequence[Any],
        leaves: Leaves,
        positions: list[int],
        keywords: bool,
    ) -> list[Any]:
        """Back-propagate ``grads`` from ``outputs``; return the gradients of ``leaves``.

        The gradients of the sources at ``positions`` (and of the keyword tensors, with
        ``keywords``) are kept for the Function to return; ``None`` where none flows.
        """
        kept, kept_grads = _grad_outputs(outputs, grads)
        if not kept:
            return [None] * len(leaves)
        handles = self.handles
        kw = self.wanted[0] or self.wanted[1] if keywords else []
        inputs = () if self.open else (*leaves, *(handles[p] for p in positions), *kw)
        if self.plain and _ENGINE is not None:
            # as torch.autograd.grad/backward run it, without their Python wrappers, which
            # re-validate every output and input: (outputs, grad_outputs, retain_graph,
            # create_graph, inputs, allow_unused, accumulate_grad)
            out = _ENGINE.run_backward(
                tuple(kept), tuple(kept_grads), False, False, inputs, True, self.accumulate
            )
        elif self.accumulate:
            torch.autograd.backward(kept, kept_grads, inputs=list(inputs) or None)
        else:
            out = torch.autograd.grad(kept, inputs, kept_grads, allow_unused=True)
        n = len(leaves)
        if self.accumulate:
            return [t.grad for t in leaves]
        totals = self.totals
        for p, g in zip(positions, out[n : n + len(positions)]):
            if g is not None:
                totals[p] = g if totals[p] is None else totals[p] + g
        if kw:
            kw_totals = self.kw_totals
            for i, g in enumerate(out[n + len(positions) :]):
                if g is not None:
                    kw_totals[i] = g if kw_totals[i] is None else kw_totals[i] + g
        return list(out[:n])

    def source_grads(self) -> list[Any]:
        """The gradient of each source (``None`` where none reached it)."""
        if self.accumulate:
            return [h.grad for h in self.handles]
        return self.totals

    def keyword_grads(self) -> list[Any]:
        """The gradient of each keyword tensor that needs one."""
        if self.accumulate:
            return [t.grad for t in self.wanted[0] or self.wanted[1]]
        return self.kw_totals


def _grad_outputs(outputs: Leaves, grads: Sequence[Any]) -> tuple[Leaves, Leaves]:
    """Pair each output that requires grad with its gradient, cast and reduced as autograd would."""
    kept, kept_grads = [], []
    for out, grad in zip(outputs, grads):
        if grad is not None and out.requires_grad:
            if grad.shape != out.shape:  # the output was broadcast when combined
                grad = grad.sum_to_size(out.shape)
            if grad.dtype != out.dtype:  # autocast: combining promoted a lower precision
                grad = grad.to(out.dtype)
            kept.append(out)
            kept_grads.append(grad)
    return kept, kept_grads


_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None)


class Step:
    """Block ``index`` of ``call``: calls ``f`` and ``g`` on half-streams, checked.

    With ``record``, the forward calls record what they read (``reads``), for the
    recomputation to replay.
    """

    __slots__ = ("block", "call", "compiled", "index", "reads", "sample", "unit")

    def __init__(
        self,
        call: Call,
        index: int,
        block: Block,
        record: tuple[dict[int, int], Leaves] | None = None,
    ) -> None:
        self.call, self.index, self.block = call, index, block
        self.reads: tuple[Reads, Reads] | None = None
        # a block that is an FSDP unit runs through its own call (see _fsdp)
        self.unit = is_unit(block)
        if record is not None:
            self.reads = (
                Reads(block.f, *record, managed=self.unit),
                Reads(block.g, *record, managed=self.unit),
            )
        self.sample: Leaves | None = None
        self.compiled = False  # whether its forward ran compiled (see _compiled)

    @property
    def managed(self) -> bool:
        """Whether FSDP manages parameters of the block (they get their gradients from it)."""
        return self.reads is not None and (self.reads[0].managed or self.reads[1].managed)

    def forward(self, which: int, tree: Any, leaves: Leaves) -> Any:
        """Call ``f`` (``which == 0``) or ``g`` on a half-stream in the forward pass.

        ``tree`` is the half-stream, ``leaves`` its leaves. Returns what the function
        returned; raises if it modified its input or keyword tensors in place.
        """
        call, index = self.call, self.index
        module = self.block.g if which else self.block.f
        keywords = call.keywords[which]
        before = _checks.versions(leaves)
        kw_before = _checks.versions(keywords) if keywords else None
        reads = self.reads[which] if self.reads is not None else None
        if reads is not None:
            state = None
            if call.generators is not None:
                state = call.rng_state = call.generators.capture_since(call.rng_state)
            snapshot = Snapshot.take(reads.modules, call.policy) if reads.modules else None
            modes = [m.training for m in reads.walked]
        previous = _state.enter(index, False)
        try:
            out = module(tree, **call.kwargs[which])
        except Exception as e:
            self._note(e, which, tree, leaves)
            raise
        finally:
            _state.leave(previous)
        if _checks.versions(leaves) != before or kw_before is not None:
            self._unchanged(which, tree, leaves, before, keywords, kw_before)
        if reads is not None:
            if snapshot is not None:
                surprise = snapshot.settle(call.policy)
                if surprise is not None:
                    _checks.buffer_modified(index, WHO[which], surprise)
            reads.calls.append((state, snapshot, modes))
        return out

    def recompute(self, which: int, tree: Any, leaves: Leaves, k: int, back: Backward) -> Any:
        """Call ``f`` or ``g`` again as its ``k``-th forward call ran, with autograd on.

        The generators, buffers, training flags and parameter tensors of that call are put
        in place, the parameters as detached aliases (``back.aliases``) where a gradient is
        wanted; the live ones are put back afterwards.
        """
        assert self.reads is not None
        call, index = self.call, self.index
        reads = self.reads[which]
        state, snapshot, modes = reads.calls[k]
        module = self.block.g if which else self.block.f
        keywords = back.keywords[which]
        kw_before = _checks.versions(keywords) if keywords else None
        handles = back.handles
        swapped = []  # the slots whose live tensor is not what the recomputation needs
        for slots, name, t, position in reads.params:
            needed = handles[position] if position >= 0 else t
            live = slots[name]
            if live is not needed:
                swapped.append((slots, name, live))
                slots[name] = needed
        if state is not None:
            call.generators.set(state)  # type: ignore[union-attr]
        buffers = snapshot.swapped() if snapshot is not None else NOTHING
        flipped = set_modes(reads.walked, modes)  # the training flags the call found
        previous = _state.enter(index, True)
        grad_mode = torch.is_grad_enabled()
        torch._C._set_grad_enabled(True)
        try:
            with buffers:
                out = module(tree, **back.kwargs[which])
        except Exception as e:
            self._note(e, which, tree, leaves)
            raise
        finally:
            torch._C._set_grad_enabled(grad_mode)
            _state.leave(previous)
            for slots, name, live in swapped:
                slots[name] = live
            restore_modes(flipped)
        if kw_before is not None:
            k_ = _checks.modified(keywords, kw_before)
            if k_ is not None:
                _checks.keyword_modified(index, WHO[which], call.context.name(k_), keywords[k_])
        if back.verify and not reads.managed and (index, which) not in call.verified:
            outputs = [t for t in _trees.flatten(out, call.namespace)[0] if _requires_grad(t)]
            found = _checks.foreign(outputs, [*leaves, *handles, *keywords])
            if found is not None:
                _checks.foreign_found(index, WHO[which], found)
            call.verified.add((index, which))
        return out

    def returned(self, which: int, leaves: Leaves) -> None:
        """Note what a forward call of ``f`` or ``g`` returned (its leaves), for the recompute."""
        if self.reads is not None:
            self.reads[which].outputs.append(_signature(leaves))

    def returned_again(self, which: int, k: int, leaves: Leaves) -> None:
        """Raise unless the ``k``-th call, recomputed, returns the shapes it did.

        A shape that still broadcasts would otherwise rebuild the inputs wrong, silently.
        """
        assert self.reads is not None
        outputs = self.reads[which].outputs
        if k >= len(outputs):  # a compiled forward call, trusted (see _compiled)
            return
        expected = outputs[k]
        got = _signature(leaves)
        if got != expected:
            _checks.recompute_differs(self.index, WHO[which], expected, got)

    def positions(self, which: int) -> list[int]:
        """The sources ``f`` or ``g`` read (their positions), whose gradients it contributes to."""
        assert self.reads is not None
        return self.reads[which].sources

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
    try:
        return [t.shape for t in leaves]
    except AttributeError:  # a coupling's own methods may take what is no tensor
        return [getattr(t, "shape", type(t)) for t in leaves]


def _requires_grad(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad
