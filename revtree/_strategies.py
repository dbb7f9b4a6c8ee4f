"""How a block runs forward, in reverse and inverted: one strategy per kind of coupling.

``ElementwiseStrategy`` serves the couplings of the form ``y1 = combine(x1, f(x2))``,
``y2 = combine(x2, g(y1))`` (``Additive``, ``Affine``): its reverse step rebuilds a
block's inputs and back-propagates through it in one pass, ``g`` and then ``f`` each run
once with autograd on, so a block costs one extra forward in all (the 4/3 floor of
reversible networks). ``GenericStrategy`` serves any other coupling (``Momentum``, your
own): its reverse step inverts the block with the coupling's ``inverse``, then runs its
``forward`` again with autograd on (5/3). The strategy is chosen once per coupling
(``strategy_for``); nothing else in the engine asks which kind a coupling is.

Gradients are taken by ``Backward.vjp``, which hands back those of the rebuilt streams
(detached leaves the strategy owns) and keeps those of the sources for the Function to
return: nothing is written to a caller's tensor from inside.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from . import _checks, _trees
from ._errors import RevtreeError, RevtreeWarning
from ._step import WHO, Backward, Step
from .couplings import Additive, Coupling, Elementwise

Leaves = list[torch.Tensor]
Grads = list[Any]  # tensors, or None where no gradient flows


class Strategy:
    """A block forward, in reverse (rebuilding its inputs and their gradients) and inverted."""

    arity = 1  # how many pytrees f and g return

    def __init__(self, coupling: Coupling) -> None:
        self.coupling = coupling

    def forward(self, step: Step, x1: Leaves, x2: Leaves) -> tuple[Leaves, Leaves]:
        """The block's output streams (under whatever autograd mode is on)."""
        raise NotImplementedError

    def reverse(
        self, step: Step, back: Backward, y1: Leaves, y2: Leaves, dy1: Grads, dy2: Grads
    ) -> tuple[Leaves, Leaves, Grads, Grads]:
        """The block's input streams rebuilt from its outputs, and their gradients.

        The gradients of the sources (parameters, keyword tensors) accumulate into
        ``.grad`` of their aliases in ``back``.
        """
        raise NotImplementedError

    def inverse(
        self, step: Step, y1: Leaves, y2: Leaves, back: Backward | None = None
    ) -> tuple[Leaves, Leaves]:
        """The block's input streams for the outputs ``y1``, ``y2``.

        With ``back``, ``f`` and ``g`` replay their recorded forward calls (a recomputation);
        without, they are simply called.
        """
        raise NotImplementedError


def strategy_for(coupling: Coupling, compile: bool = False) -> Strategy:
    """The strategy for ``coupling``, on the compiled engine (elementwise couplings) if asked."""
    if isinstance(coupling, Elementwise):
        if compile:
            from ._compiled import CompiledStrategy

            return CompiledStrategy(coupling)
        return ElementwiseStrategy(coupling)
    if compile:
        warnings.warn(
            f"compile=True compiles elementwise couplings (Additive, Affine); {coupling!r} "
            "runs on the eager engine.",
            RevtreeWarning,
            stacklevel=4,
        )
    return GenericStrategy(coupling)


# ---------------------------------------------------------------------------- elementwise


class ElementwiseStrategy(Strategy):
    """Couplings ``y = combine(x, *update)``: rebuilt and back-propagated in one pass."""

    def __init__(self, coupling: Elementwise) -> None:
        super().__init__(coupling)
        self.elementwise = coupling
        self.arity = coupling.arity
        # x + u passes gradients through unchanged (unless a subclass redefines combine)
        self.additive = (
            isinstance(coupling, Additive) and type(coupling).combine is Additive.combine
        )

    def _update(self, step: Step, which: int, out: Any, stream: Leaves) -> Leaves:
        """The leaves of what ``f`` or ``g`` returned; ``None`` for a leaf is a zero update."""
        call = step.call
        spec = call.layout.spec
        update = _checks.update_leaves(
            out, call.update_spec, spec, call.namespace, step.index, WHO[which]
        )
        if any(u is None for u in update):
            n = len(stream)
            update = [
                torch.zeros((), dtype=stream[i % n].dtype, device=stream[i % n].device)
                if u is None
                else u
                for i, u in enumerate(update)
            ]
        return update

    def _combine(
        self, step: Step, which: int, x: Leaves, update: Leaves, undo: bool, checked: bool = False
    ) -> Leaves:
        """``combine`` (or with ``undo``, ``uncombine``) over the leaves, checked.

        ``checked``: the update's shapes are known good (a recomputation that returned
        what its forward call did), so only a failure is looked into.
        """
        c = self.elementwise
        out = None
        if checked or all(isinstance(u, torch.Tensor) for u in update):
            try:
                out = c.uncombine_leaves(x, update) if undo else c.combine_leaves(x, update)
            except (RuntimeError, TypeError):
                pass
            if checked and out is not None:
                return out
        leafwise = c.uncombine if undo else c.combine
        names = step.call.layout.names
        return _checks.combined(out, x, update, leafwise, names, step.index, WHO[which], undo)

    def forward(self, step: Step, x1: Leaves, x2: Leaves) -> tuple[Leaves, Leaves]:  # noqa: D102
        unflatten = step.call.layout.spec.unflatten
        fu = self._update(step, 0, step.forward(0, unflatten(x2), x2), x1)
        y1 = self._combine(step, 0, x1, fu, undo=False)
        step.returned(0, fu)
        del fu
        gu = self._update(step, 1, step.forward(1, unflatten(y1), y1), x2)
        y2 = self._combine(step, 1, x2, gu, undo=False)
        step.returned(1, gu)
        return y1, y2

    def inverse(  # noqa: D102
        self, step: Step, y1: Leaves, y2: Leaves, back: Backward | None = None
    ) -> tuple[Leaves, Leaves]:
        unflatten = step.call.layout.spec.unflatten

        def call(which: int, leaves: Leaves) -> Any:
            tree = unflatten(leaves)
            if back is None:
                return step.forward(which, tree, leaves)
            return step.recompute(which, tree, leaves, 0, back)

        gu = self._update(step, 1, call(1, y1), y2)
        x2 = self._combine(step, 1, y2, gu, undo=True)
        fu = self._update(step, 0, call(0, x2), y1)
        return self._combine(step, 0, y1, fu, undo=True), x2

    def reverse(  # noqa: D102
        self, step: Step, back: Backward, y1: Leaves, y2: Leaves, dy1: Grads, dy2: Grads
    ) -> tuple[Leaves, Leaves, Grads, Grads]:
        unflatten = step.call.layout.spec.unflatten
        c = self.elementwise
        n = len(y1)

        # g: x2 = uncombine(y2, g(y1)); gradients for y1, x2 and g's sources
        y1_ = _leaves(y1)
        with back.autocast:
            gu = self._update(step, 1, step.recompute(1, unflatten(y1_), y1_, 0, back), y2)
        step.returned_again(1, 0, gu)
        x2 = self._combine(step, 1, y2, gu, undo=True, checked=True)  # (backward: no grad)
        to_g = step.call.context.to_g
        if self.additive:
            dx1, dx2 = _plus(dy1, back.vjp(gu, dy2, y1_, step.positions(1), to_g)), list(dy2)
        else:
            x2_ = _leaves(x2)
            with back.autocast, torch.enable_grad():
                y2_ = [c.combine(x, *gu[i::n]) for i, x in enumerate(x2_)]
            grads = back.vjp(y2_, dy2, [*y1_, *x2_], step.positions(1), to_g)
            dx1, dx2 = _plus(dy1, grads[:n]), grads[n:]
        del gu, y1_

        # f: x1 = uncombine(y1, f(x2)); gradients for x1, x2 and f's sources
        x2r = _leaves(x2)
        with back.autocast:
            fu = self._update(step, 0, step.recompute(0, unflatten(x2r), x2r, 0, back), y1)
        step.returned_again(0, 0, fu)
        x1 = self._combine(step, 0, y1, fu, undo=True, checked=True)
        to_f = step.call.context.to_f
        if self.additive:
            dx2 = _plus(dx2, back.vjp(fu, dx1, x2r, step.positions(0), to_f))
        else:
            x1_ = _leaves(x1)
            with back.autocast, torch.enable_grad():
                y1_r = [c.combine(x, *fu[i::n]) for i, x in enumerate(x1_)]
            grads = back.vjp(y1_r, dx1, [*x1_, *x2r], step.positions(0), to_f)
            dx1, dx2 = grads[:n], _plus(dx2, grads[n:])
        return x1, x2, dx1, dx2


# -------------------------------------------------------------------------------- generic


class _Fn:
    """``f`` or ``g`` with the call bound, as a coupling's own methods call it: on trees.

    In the forward pass it records what each call reads; in a recomputation it replays
    the recorded calls in ``order``. Every call is checked as the elementwise path checks
    it: for an elementwise coupling, its ``arity`` trees of the input's structure; for a
    coupling whose updates are shaped like their input (``updates_like_input``), that
    structure and those shapes.
    """

    __slots__ = ("back", "order", "step", "which")

    def __init__(
        self, step: Step, which: int, back: Backward | None = None, order: Iterable[int] = ()
    ) -> None:
        self.step, self.which, self.back, self.order = step, which, back, iter(order)

    def __call__(self, tree: Any) -> Any:
        step, which = self.step, self.which
        call = step.call
        leaves, spec = _trees.flatten(tree, call.namespace)
        if self.back is None:
            out = step.forward(which, tree, leaves)
            step.returned(which, _trees.flatten(out, call.namespace)[0])
        else:
            k = next(self.order)
            out = step.recompute(which, tree, leaves, k, self.back)
            step.returned_again(which, k, _trees.flatten(out, call.namespace)[0])
        coupling = call.strategy.coupling
        if out is None and coupling.skips_none:
            return None
        names = step._names(tree)
        if isinstance(coupling, Elementwise) and spec == call.layout.spec:
            n = coupling.arity
            expected = call.update_spec
            _checks.like_input(
                out, leaves * n, expected, names * n, call.namespace, step.index, WHO[which], False
            )
        elif coupling.updates_like_input:
            _checks.like_input(out, leaves, spec, names, call.namespace, step.index, WHO[which])
        return out


def _raised_inside(error: BaseException) -> bool:
    """Whether ``error`` was raised inside ``f`` or ``g`` (they carry revtree's note)."""
    return any(n.startswith("revtree: raised in") for n in getattr(error, "__notes__", ()))


class _CouplingErrors:
    """Name the block and the coupling in an error a generic coupling's method raises.

    Errors raised inside ``f`` or ``g`` themselves, and running out of memory, pass as
    they are.
    """

    __slots__ = ("coupling", "index", "method")

    def __init__(self, coupling: Coupling, method: str, index: int) -> None:
        self.coupling, self.method, self.index = coupling, method, index

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if error is None or isinstance(error, RevtreeError):
            return
        if not isinstance(error, (ValueError, TypeError, RuntimeError)):
            return
        if _raised_inside(error) or isinstance(error, torch.OutOfMemoryError):
            return
        _checks.coupling_raised(self.index, self.coupling, self.method, error)


class GenericStrategy(Strategy):
    """Any coupling: inverted with its ``inverse``, then run forward again with autograd on."""

    def _apply(
        self, step: Step, method: str, f: _Fn, g: _Fn, a: Leaves, b: Leaves
    ) -> tuple[Leaves, Leaves]:
        call = step.call
        spec = call.layout.spec
        before = _checks.versions([*a, *b])
        with _CouplingErrors(self.coupling, method, step.index):
            u, v = getattr(self.coupling, method)(f, g, spec.unflatten(a), spec.unflatten(b))
        k = _checks.modified([*a, *b], before)
        if k is not None:
            name = call.layout.names[k % len(a)] if a else ""
            _checks.stream_modified(step.index, self.coupling, name, [*a, *b][k])
        layout, ns = call.layout, call.namespace
        return (
            _checks.stream_leaves(u, a, layout, ns, self.coupling, step.index),
            _checks.stream_leaves(v, b, layout, ns, self.coupling, step.index),
        )

    def forward(self, step: Step, x1: Leaves, x2: Leaves) -> tuple[Leaves, Leaves]:  # noqa: D102
        return self._apply(step, "forward", _Fn(step, 0), _Fn(step, 1), x1, x2)

    def inverse(  # noqa: D102
        self, step: Step, y1: Leaves, y2: Leaves, back: Backward | None = None
    ) -> tuple[Leaves, Leaves]:
        if back is None:
            return self._apply(step, "inverse", _Fn(step, 0), _Fn(step, 1), y1, y2)
        assert step.reads is not None  # inverse calls f and g in the reverse order of forward
        f = _Fn(step, 0, back, reversed(range(len(step.reads[0].calls))))
        g = _Fn(step, 1, back, reversed(range(len(step.reads[1].calls))))
        return self._apply(step, "inverse", f, g, y1, y2)

    def reverse(  # noqa: D102
        self, step: Step, back: Backward, y1: Leaves, y2: Leaves, dy1: Grads, dy2: Grads
    ) -> tuple[Leaves, Leaves, Grads, Grads]:
        assert step.reads is not None
        calls = len(step.reads[0].calls), len(step.reads[1].calls)
        n = len(y1)
        with torch.no_grad(), back.autocast:
            x1, x2 = self.inverse(step, y1, y2, back)
        x1_, x2_ = _leaves(x1), _leaves(x2)
        with torch.enable_grad(), back.autocast:
            f, g = (
                _Fn(step, 0, back, iter(range(calls[0]))),
                _Fn(step, 1, back, iter(range(calls[1]))),
            )
            r1, r2 = self._apply(step, "forward", f, g, x1_, x2_)
        positions = list(dict.fromkeys([*step.positions(0), *step.positions(1)]))
        context = step.call.context
        keywords = context.to_f or context.to_g
        grads = back.vjp([*r1, *r2], [*dy1, *dy2], [*x1_, *x2_], positions, keywords)
        return x1, x2, grads[:n], grads[n:]


# ------------------------------------------------------------------------------ gradients


def _leaves(tensors: Leaves) -> Leaves:
    """Detached leaves requiring grad, for a recomputation to back-propagate into."""
    return [t.detach().requires_grad_() for t in tensors]


def _plus(a: Grads, b: Grads) -> Grads:
    """Leafwise ``a + b``, where ``None`` stands for zero."""
    if len(a) > 1 and all(x is not None for x in a) and all(y is not None for y in b):
        return list(torch._foreach_add(a, b))  # one dispatch for many small leaves
    return [y if x is None else x if y is None else x + y for x, y in zip(a, b)]
