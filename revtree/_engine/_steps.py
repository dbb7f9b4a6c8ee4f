"""How each kind of step runs forward, in reverse and inverted.

- **update** (``Update``, and ``f``/``g`` of a block under an elementwise coupling):
  ``x[w] = combine(x[w], fn(x[r], ...))``. Its reverse step rebuilds ``x[w]`` and
  back-propagates through ``fn`` in one pass, ``fn`` running once with autograd on, so a
  two-stream block costs one extra forward in all (the 4/3 floor of reversible networks).
- **coupled** (``f``/``g`` under any other coupling: ``Momentum``, your own): inverted with
  the coupling's ``inverse``, then run forward again with autograd on (5/3).
- **invertible** (``Invertible``): the module's inverse, then the module again with
  autograd on.

A step's side output (``side=True``) leaves the block beside the state; in reverse, its
cotangent joins the recomputation's. Gradients are taken by ``Backward.vjp``, which hands
back those of the rebuilt parts (detached leaves the step owns) and keeps those of the
sources for the node to return: nothing is written to a caller's tensor from inside.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import repeat
from operator import attrgetter, is_
from typing import Any, cast

import torch

from .. import _checks, _trees
from .._block import Spec
from .._errors import RevtreeError
from .._layout import Layout
from ..couplings import Additive, Coupling, Elementwise
from ._run import BlockRun, Call
from ._sink import Backward

Leaves = list[torch.Tensor]
Grads = list[Any]  # tensors, or None where no gradient flows
State = list[Leaves]


def _leaves(tensors: Leaves) -> Leaves:
    """Detached leaves requiring grad, for a recomputation to back-propagate into."""
    return [t.detach().requires_grad_() for t in tensors]


def plus(a: Grads, b: Grads) -> Grads:
    """Leafwise ``a + b``, where ``None`` stands for zero."""
    if len(a) > 1 and all(x is not None for x in a) and all(y is not None for y in b):
        return list(torch._foreach_add(a, b))  # one dispatch for many small leaves
    return [y if x is None else x if y is None else x + y for x, y in zip(a, b)]


def _side(run: BlockRun, j: int, out: Any) -> tuple[Any, Any]:
    """``(update, side output)`` of what function ``j`` returned (built with ``side=True``)."""
    if not (isinstance(out, tuple) and len(out) == 2):
        _checks.fail(
            run.index,
            run.names[j],
            f"returned {_trees.describe(out)}, where side=True asks for a pair "
            "(update, side_output). Hint: return both, or build the step with side=False.",
        )
    return out


def side_leaves(run: BlockRun, j: int, side: Any, namespace: str) -> Leaves:
    """The tensors of a side output, which must all be tensors."""
    leaves = _trees.flatten(side, namespace)[0]
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            _checks.fail(
                run.index,
                run.names[j],
                f"returned a side output holding {_trees.describe(leaf)}. Hint: a side output "
                "is a tensor or a pytree of tensors (a loss, a log-determinant).",
            )
    return leaves


# ---------------------------------------------------------------------------- update


def _update_spec(layout: Layout, part: int, arity: int) -> Any:
    """The structure an update of ``part`` has: the part's, or a tuple of ``arity`` of it."""
    spec = layout.specs[part]
    if arity == 1:
        return spec
    key = ("update", part, arity)
    found = layout.cache.get(key)
    if found is None:
        import optree

        found = layout.cache[key] = optree.treespec_tuple(
            [spec] * arity, none_is_leaf=_trees.NONE_IS_LEAF, namespace=spec.namespace
        )
    return found


_SHAPE, _DTYPE, _DEVICE = attrgetter("shape"), attrgetter("dtype"), attrgetter("device")
_SCALAR = torch.Size([])


def _is_additive(coupling: Elementwise) -> bool:
    """``x + u`` passes gradients through unchanged (unless a subclass redefines combine)."""
    return isinstance(coupling, Additive) and type(coupling).combine is Additive.combine


class UpdateStep:
    """``x[w] = combine(x[w], fn(x[r], ...))`` (see the module's docstring).

    Every call is checked; the checks read what is there in a few C-level passes and look
    closer only when something is off (a structure, a shape, ``None`` for a leaf).
    """

    @staticmethod
    def _leaves_of(run: BlockRun, spec: Spec, out: Any, stream: Leaves) -> Leaves:
        """The leaves of an update; ``None`` for a leaf is a zero update."""
        layout = run.shared.layout
        (w,), coupling = spec.writes, cast(Elementwise, spec.coupling)
        arity = coupling.arity
        expected = layout.specs[w] if arity == 1 else _update_spec(layout, w, arity)
        update: list[Any] | None
        try:
            update = expected.flatten_up_to(out)
        except (ValueError, TypeError):
            update = None
        if update is None or not all(map(isinstance, update, repeat(torch.Tensor))):
            update = _checks.update_leaves(
                out,
                expected,
                layout.specs[w],
                run.shared.settings.namespace,
                run.index,
                run.names[spec.fns[0]],
            )
            if any(map(is_, update, repeat(None))):
                n = len(stream)
                update = [
                    torch.zeros((), dtype=stream[i % n].dtype, device=stream[i % n].device)
                    if u is None
                    else u
                    for i, u in enumerate(update)
                ]
        return cast(Leaves, update)

    @staticmethod
    def _combine(run: BlockRun, spec: Spec, x: Leaves, update: Leaves, undo: bool) -> Leaves:
        """``combine`` (or with ``undo``, ``uncombine``) over the leaves, checked."""
        c = cast(Elementwise, spec.coupling)
        out = None
        if all(map(isinstance, update, repeat(torch.Tensor))):
            try:
                out = c.uncombine_leaves(x, update) if undo else c.combine_leaves(x, update)
            except (RuntimeError, TypeError):
                pass
            shapes = list(map(_SHAPE, x))
            if (
                out is not None
                and list(map(_SHAPE, out)) == shapes
                and list(map(_DTYPE, out)) == list(map(_DTYPE, x))
                # a CPU scalar combines with a CUDA one: for 0-dim leaves, the devices too
                and (_SCALAR not in shapes or list(map(_DEVICE, out)) == list(map(_DEVICE, x)))
            ):
                return out
        leafwise = c.uncombine if undo else c.combine
        names = run.shared.layout.part_names(spec.writes[0])
        who = run.names[spec.fns[0]]
        return _checks.combined(out, x, update, leafwise, names, run.index, who, undo)

    @staticmethod
    def _args(run: BlockRun, spec: Spec, state: State) -> tuple[list[Any], Leaves]:
        specs = run.shared.layout.specs
        reads = spec.reads
        if len(reads) == 1:
            leaves = state[reads[0]]
            return [specs[reads[0]].unflatten(leaves)], leaves
        return [specs[r].unflatten(state[r]) for r in reads], [t for r in reads for t in state[r]]

    @classmethod
    def forward(cls, run: BlockRun, call: Call, spec: Spec, state: State) -> Any:
        (j,), (w,) = spec.fns, spec.writes
        args, leaves = cls._args(run, spec, state)
        out = run.call(call, j, args, leaves, spec.receives[0])
        side = None
        if spec.side[0]:
            out, side = _side(run, j, out)
        update = cls._leaves_of(run, spec, out, state[w])
        state[w] = cls._combine(run, spec, state[w], update, undo=False)
        run.returned(j, update)
        return side

    @classmethod
    def inverse(cls, run: BlockRun, call: Call, spec: Spec, state: State) -> None:
        (j,), (w,) = spec.fns, spec.writes
        args, leaves = cls._args(run, spec, state)
        out = run.call(call, j, args, leaves, spec.receives[0])
        if spec.side[0]:
            out, _ = _side(run, j, out)
        update = cls._leaves_of(run, spec, out, state[w])
        state[w] = cls._combine(run, spec, state[w], update, undo=True)

    @classmethod
    def rebuild(cls, run: BlockRun, back: Backward, spec: Spec, state: State) -> None:
        """The inverse, replaying the forward call (no gradient: a rebuild only)."""
        (j,), (w,) = spec.fns, spec.writes
        args, leaves = cls._args(run, spec, state)
        out = run.recall(back, j, 0, args, leaves, spec.receives[0], grad=False)
        if spec.side[0]:
            out, _ = _side(run, j, out)
        update = cls._leaves_of(run, spec, out, state[w])
        state[w] = cls._combine(run, spec, state[w], update, undo=True)

    @classmethod
    def reverse(
        cls,
        run: BlockRun,
        back: Backward,
        spec: Spec,
        state: State,
        grads: list[Grads],
        dside: Grads,
    ) -> None:
        (j,), (w,) = spec.fns, spec.writes
        reads = spec.reads
        specs = run.shared.layout.specs
        if len(reads) == 1:
            flat = _leaves(state[reads[0]])
            args = [specs[reads[0]].unflatten(flat)]
        else:
            parts = [_leaves(state[r]) for r in reads]
            flat = [t for part in parts for t in part]
            args = [specs[r].unflatten(part) for r, part in zip(reads, parts)]
        out = run.recall(back, j, 0, args, flat, spec.receives[0])
        sides: Leaves = []
        if spec.side[0]:
            out, side = _side(run, j, out)
            sides = side_leaves(run, j, side, run.shared.settings.namespace)
        update = cls._leaves_of(run, spec, out, state[w])
        run.returned_again(j, 0, update)
        c = cast(Elementwise, spec.coupling)
        x = c.uncombine_leaves(state[w], update)  # its shapes known good (no grad)
        keywords = back.view(spec.receives[0])[3]
        used = run.records[j][0].used
        where = (run.index, run.names[j])
        if _is_additive(c):
            got = back.vjp([*update, *sides], [*grads[w], *dside], flat, used, keywords, where)
        else:
            n = len(x)
            x_ = _leaves(x)
            with back.autocast, torch.enable_grad():
                y = [c.combine(a, *update[i::n]) for i, a in enumerate(x_)]
            outs, cots = [*y, *sides], [*grads[w], *dside]
            got = back.vjp(outs, cots, [*x_, *flat], used, keywords, where)
            grads[w], got = got[:n], got[n:]
        if len(reads) == 1:
            grads[reads[0]] = plus(grads[reads[0]], got)
        else:
            at = 0
            for r in reads:
                n = len(state[r])
                grads[r] = plus(grads[r], got[at : at + n])
                at += n
        state[w] = x


# --------------------------------------------------------------------------- coupled


class _Fn:
    """``f`` or ``g`` with the call bound, as a coupling's own methods call it: on trees.

    In the forward pass it records what each call reads; in a recomputation it replays
    the recorded calls in ``order``. Every call is checked as the update path checks it:
    for an elementwise coupling, its ``arity`` trees of the input's structure; for a
    coupling whose updates are shaped like their input (``updates_like_input``), that
    structure and those shapes.
    """

    __slots__ = ("back", "call", "grad", "j", "order", "run", "spec")

    def __init__(
        self,
        run: BlockRun,
        spec: Spec,
        j: int,
        call: Call | None = None,
        back: Backward | None = None,
        order: Iterable[int] = (),
        grad: bool = True,
    ) -> None:
        self.run, self.spec, self.j = run, spec, j
        self.call, self.back, self.order, self.grad = call, back, iter(order), grad

    def __call__(self, tree: Any) -> Any:
        run, j = self.run, self.j
        namespace = run.shared.settings.namespace
        layout = run.shared.layout
        leaves, spec = _trees.flatten(tree, namespace)
        receives = self.spec.receives[self.spec.fns.index(j)]
        if self.back is None:
            assert self.call is not None
            out = run.call(self.call, j, (tree,), leaves, receives)
            run.returned(j, _trees.flatten(out, namespace)[0])
        else:
            k = next(self.order)
            out = run.recall(self.back, j, k, (tree,), leaves, receives, grad=self.grad)
            run.returned_again(j, k, _trees.flatten(out, namespace)[0])
        coupling = self.spec.coupling
        assert coupling is not None
        if out is None and coupling.skips_none:
            return None
        names = [layout.names[i] for i in layout.members[0]]
        if isinstance(coupling, Elementwise) and spec == layout.specs[0]:
            n = coupling.arity
            expected = _update_spec(layout, 0, n)
            _checks.like_input(
                out, leaves * n, expected, names * n, namespace, run.index, run.names[j], False
            )
        elif coupling.updates_like_input:
            _checks.like_input(out, leaves, spec, names, namespace, run.index, run.names[j])
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


class CoupledStep:
    """Any coupling: inverted with its ``inverse``, then run forward again with autograd on."""

    @staticmethod
    def _apply(
        run: BlockRun, spec: Spec, method: str, f: _Fn, g: _Fn, a: Leaves, b: Leaves
    ) -> tuple[Leaves, Leaves]:
        layout = run.shared.layout
        coupling = spec.coupling
        assert coupling is not None
        tree = layout.specs[0].unflatten
        before = _checks.versions([*a, *b])
        with _CouplingErrors(coupling, method, run.index):
            u, v = getattr(coupling, method)(f, g, tree(a), tree(b))
        k = _checks.modified([*a, *b], before)
        if k is not None:
            name = layout.names[layout.members[0][k % len(a)]] if a else ""
            _checks.stream_modified(run.index, coupling, name, [*a, *b][k])
        ns = run.shared.settings.namespace
        return (
            _checks.stream_leaves(u, a, layout, ns, coupling, run.index),
            _checks.stream_leaves(v, b, layout, ns, coupling, run.index),
        )

    @classmethod
    def forward(cls, run: BlockRun, call: Call, spec: Spec, state: State) -> Any:
        f, g = (_Fn(run, spec, j, call=call) for j in spec.fns)
        a, b = spec.writes
        state[a], state[b] = cls._apply(run, spec, "forward", f, g, state[a], state[b])
        return None

    @classmethod
    def inverse(cls, run: BlockRun, call: Call, spec: Spec, state: State) -> None:
        f, g = (_Fn(run, spec, j, call=call) for j in spec.fns)
        a, b = spec.writes
        state[a], state[b] = cls._apply(run, spec, "inverse", f, g, state[a], state[b])

    @classmethod
    def rebuild(cls, run: BlockRun, back: Backward, spec: Spec, state: State) -> None:
        # inverse calls f and g in the reverse order of forward
        f, g = (
            _Fn(run, spec, j, back=back, order=reversed(range(run.calls(j))), grad=False)
            for j in spec.fns
        )
        a, b = spec.writes
        state[a], state[b] = cls._apply(run, spec, "inverse", f, g, state[a], state[b])

    @classmethod
    def reverse(
        cls,
        run: BlockRun,
        back: Backward,
        spec: Spec,
        state: State,
        grads: list[Grads],
        dside: Grads,
    ) -> None:
        a, b = spec.writes
        n = len(state[a])
        with torch.no_grad():
            cls.rebuild(run, back, spec, state)
        x1_, x2_ = _leaves(state[a]), _leaves(state[b])
        with torch.enable_grad():
            f, g = (_Fn(run, spec, j, back=back, order=range(run.calls(j))) for j in spec.fns)
            r1, r2 = cls._apply(run, spec, "forward", f, g, x1_, x2_)
        used = list(
            dict.fromkeys(p for j in spec.fns for k in range(run.calls(j)) for p in run.used(j, k))
        )
        context = run.shared.context
        receiving = sorted({k for r in spec.receives for k in context.receiving(r)})
        keywords = back.keyword_positions(receiving)
        where = (run.index, " or ".join(run.names[j] for j in spec.fns))
        got = back.vjp([*r1, *r2], [*grads[a], *grads[b]], [*x1_, *x2_], used, keywords, where)
        grads[a], grads[b] = got[:n], got[n:]


# ------------------------------------------------------------------------ invertible


class InvertibleStep:
    """A module and its inverse, over some parts (see ``revtree.Invertible``)."""

    @staticmethod
    def _parts(run: BlockRun, spec: Spec) -> tuple[int, ...]:
        return spec.writes or tuple(range(run.shared.layout.parts))

    @staticmethod
    def _outputs(
        run: BlockRun, spec: Spec, parts: tuple[int, ...], out: Any, like: State, what: str
    ) -> State:
        """The new parts a module (or its inverse) returned, checked against ``like``."""
        layout = run.shared.layout
        ns = run.shared.settings.namespace
        j = spec.fns[0]
        trees = (out,) if len(parts) == 1 else out
        if not isinstance(trees, (tuple, list)) or len(trees) != len(parts):
            _checks.fail(
                run.index,
                run.names[j],
                f"{what} returned {_trees.describe(out)} for {len(parts)} parts. Hint: return "
                "one tree per part it takes (a tuple of them for several).",
            )
        result = []
        for k, tree, old in zip(parts, trees, like):
            names = layout.part_names(k)
            # the structure and tensors are checked; an invertible module may reshape
            structure = layout.specs[k]
            _checks.like_input(tree, old, structure, names, ns, run.index, run.names[j], False)
            result.append(_trees.leaves_as(tree, structure, ns)[0])
        return result

    @staticmethod
    def _args(run: BlockRun, parts: tuple[int, ...], state: State) -> tuple[list[Any], Leaves]:
        layout = run.shared.layout
        return [layout.tree(k, state[k]) for k in parts], [t for k in parts for t in state[k]]

    @classmethod
    def forward(cls, run: BlockRun, call: Call, spec: Spec, state: State) -> Any:
        parts = cls._parts(run, spec)
        j = spec.fns[0]
        args, leaves = cls._args(run, parts, state)
        out = run.call(call, j, args, leaves, spec.receives[0], submodules=True)
        out, side = _side(run, j, out) if spec.side[0] else (out, None)
        new = cls._outputs(run, spec, parts, out, [state[k] for k in parts], "it")
        run.returned(j, [t for part in new for t in part])
        for k, part in zip(parts, new):
            state[k] = part
        return side

    @classmethod
    def inverse(cls, run: BlockRun, call: Call, spec: Spec, state: State) -> None:
        parts = cls._parts(run, spec)
        j = spec.fns[0]
        step = run.block.steps[j]
        args, leaves = cls._args(run, parts, state)
        out = run.call(call, j, args, leaves, spec.receives[0], method=step.inverse)
        new = cls._outputs(run, spec, parts, out, [state[k] for k in parts], "its inverse")
        for k, part in zip(parts, new):
            state[k] = part

    @classmethod
    def rebuild(cls, run: BlockRun, back: Backward, spec: Spec, state: State) -> None:
        parts = cls._parts(run, spec)
        j = spec.fns[0]
        step = run.block.steps[j]
        args, leaves = cls._args(run, parts, state)
        out = run.recall(
            back, j, 0, args, leaves, spec.receives[0], method=step.inverse, grad=False
        )
        new = cls._outputs(run, spec, parts, out, [state[k] for k in parts], "its inverse")
        for k, part in zip(parts, new):
            state[k] = part

    @classmethod
    def reverse(
        cls,
        run: BlockRun,
        back: Backward,
        spec: Spec,
        state: State,
        grads: list[Grads],
        dside: Grads,
    ) -> None:
        parts = cls._parts(run, spec)
        j = spec.fns[0]
        with torch.no_grad():
            cls.rebuild(run, back, spec, state)
        x_ = [_leaves(state[k]) for k in parts]
        args = [run.shared.layout.tree(k, part) for k, part in zip(parts, x_)]
        flat = [t for part in x_ for t in part]
        out = run.recall(back, j, 0, args, flat, spec.receives[0])
        out, side = _side(run, j, out) if spec.side[0] else (out, None)
        new = cls._outputs(run, spec, parts, out, x_, "it")
        outs = [t for part in new for t in part]
        run.returned_again(j, 0, outs)
        sides = side_leaves(run, j, side, run.shared.settings.namespace) if side is not None else []
        cots = [g for k in parts for g in grads[k]]
        keywords = back.view(spec.receives[0])[3]
        where = (run.index, run.names[j])
        got = back.vjp([*outs, *sides], [*cots, *dside], flat, run.used(j), keywords, where)
        at = 0
        for k in parts:
            n = len(state[k])
            grads[k] = got[at : at + n]
            at += n


KINDS: dict[str, Any] = {"update": UpdateStep, "coupled": CoupledStep, "invertible": InvertibleStep}


def rebuild_block(run: BlockRun, back: Backward, state: State) -> None:
    """Block ``run``'s input from its output, in place, replaying its forward calls."""
    for spec in reversed(run.program):
        KINDS[spec.kind].rebuild(run, back, spec, state)
