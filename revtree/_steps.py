"""One block, forward and in reverse, on flat lists of leaves.

Forward runs the coupling. The reverse step rebuilds the block's inputs from its outputs
and back-propagates through it. For an [`Elementwise`][revtree.couplings.Elementwise]
coupling both happen in one pass: ``g`` runs once with autograd on, ``x2`` is rebuilt
from that call and the gradients flow through it; then the same for ``f``. A block costs
one extra forward in all (the 4/3 floor of reversible networks). Any other coupling is
reversed with its ``inverse`` and then run forward again with autograd on (5/3).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from optree import PyTreeSpec
from torch.overrides import has_torch_function

from . import _buffers, _rng, _trees
from ._block import Block, StepInputs, Versions, call, check_unchanged, combine
from ._errors import RevtreeError
from ._state import running
from .couplings import Additive, Coupling, Elementwise

Leaves = list[torch.Tensor]


# ------------------------------------------------------------------------------------ forward


def forward_step(
    block: Block,
    index: int,
    x1: Leaves,
    x2: Leaves,
    inputs: StepInputs,
    record: bool = False,
    devices: tuple[int, ...] = (),
) -> tuple[Leaves, Leaves, Any]:
    """Run one block forward; with ``record``, also return the generator states it drew from."""
    with running(index, recomputing=False):
        if isinstance(inputs.coupling, Elementwise):
            return _forward_elementwise(block, index, x1, x2, inputs, record, devices)
        return _forward_generic(block, index, x1, x2, inputs, record, devices)


def _forward_elementwise(
    block: Block,
    index: int,
    x1: Leaves,
    x2: Leaves,
    inputs: StepInputs,
    record: bool,
    devices: tuple[int, ...],
) -> tuple[Leaves, Leaves, Any]:
    layout, coupling, spec = inputs.layout, inputs.coupling, inputs.update_spec
    f_state = _rng.capture(devices) if record else None
    fu = call(block.f, "f", index, x2, inputs, spec)
    y1 = combine(coupling, x1, fu, "f", index, layout)  # type: ignore[arg-type]
    del fu
    g_state = _rng.capture(devices) if record else None
    gu = call(block.g, "g", index, y1, inputs, spec)
    y2 = combine(coupling, x2, gu, "g", index, layout)  # type: ignore[arg-type]
    return y1, y2, (f_state, g_state) if record else None


_FROM_BLOCK = "_revtree_from_block"  # marks an exception raised inside f or g


class _Bound:
    """``f`` or ``g`` with its keyword arguments bound, for a coupling's own methods to call.

    Records the generator state before each call, or replays recorded states in order.
    Checks every call as the elementwise path does: no input leaf or keyword tensor
    modified in place; for an elementwise coupling, its ``arity`` trees of the input's
    structure (``combine`` checks the shapes); for a coupling whose updates are shaped like
    their input (``Coupling.updates_like_input``), that structure and those shapes. An
    error ``f`` or ``g`` raises passes on as raised.
    """

    def __init__(
        self,
        which: str,
        index: int,
        module: torch.nn.Module,
        inputs: StepInputs,
        devices: tuple[int, ...],
        record: list | None = None,
        replay: Iterator[Any] | None = None,
    ) -> None:
        self.which, self.index, self.module, self.inputs = which, index, module, inputs
        self.devices, self.record, self.replay = devices, record, replay

    def __call__(self, tree: Any) -> Any:
        if self.record is not None:
            self.record.append(_rng.capture(self.devices))
        if self.replay is not None:
            _rng.replay_now(next(self.replay, None), self.devices)
        inputs, which, index = self.inputs, self.which, self.index
        kwargs, keywords = inputs.keywords(which)
        leaves, spec = _trees.flatten(tree, inputs.namespace)
        streams, watched = Versions(leaves), Versions(keywords)
        try:
            out = self.module(tree, **kwargs)
        except Exception as e:  # f's own error: passed on as raised, not as the coupling's
            setattr(e, _FROM_BLOCK, True)
            raise
        names = _names(tree, spec, inputs)
        check_unchanged(which, index, streams, names, watched, inputs.context)
        coupling = inputs.coupling
        if isinstance(coupling, Elementwise) and spec == inputs.layout.spec:
            # arity trees like the input, each leaf a tensor; combine checks that an update
            # keeps its stream's shape (a broadcast update is fine, as in the forward)
            expected = inputs.update_spec
            n = coupling.arity
            _check_like(out, leaves * n, expected, names * n, which, index, inputs, shapes=False)
        elif coupling.updates_like_input:
            _check_like(out, leaves, spec, names, which, index, inputs)
        return out


def _names(tree: Any, spec: PyTreeSpec, inputs: StepInputs) -> tuple[str, ...]:
    """Printable key paths of the leaves of a tree ``f`` or ``g`` was given."""
    if spec == inputs.layout.spec:
        return inputs.layout.names
    return tuple(_trees.flatten_with_names(tree, inputs.namespace)[1])


def _check_like(
    out: Any,
    leaves: Leaves,
    spec: PyTreeSpec,
    names: tuple[str, ...],
    which: str,
    index: int,
    inputs: StepInputs,
    shapes: bool = True,
) -> None:
    """Raise unless ``out`` has the structure ``spec`` and a tensor at every leaf.

    With ``shapes``, each tensor must also have its input leaf's shape and device.
    """
    out_leaves, out_spec = _trees.leaves_as(out, spec, inputs.namespace)
    if _trees.differ(out_spec, spec):
        raise RevtreeError(
            f"block {index}: {which} returned a pytree of structure {out_spec}, where "
            f"{spec} is expected. Hint: {which} must return a pytree with the structure of "
            "its input (same keys, same nesting, one tensor per leaf), or for a coupling "
            "taking several updates, a tuple of them."
        )
    for name, y, x in zip(names, out_leaves, leaves):
        if not isinstance(y, torch.Tensor) or (
            shapes and (y.shape != x.shape or y.device != x.device)
        ):
            raise RevtreeError(
                f"block {index}: {which} returned {_trees.describe(y)} at {name} for an input "
                f"leaf of {_trees.describe(x)} on {x.device}. Hint: {which} must return, for "
                "every leaf, a tensor of its input's shape on its device."
            )


def _forward_generic(
    block: Block,
    index: int,
    x1: Leaves,
    x2: Leaves,
    inputs: StepInputs,
    record: bool,
    devices: tuple[int, ...],
) -> tuple[Leaves, Leaves, Any]:
    spec = inputs.layout.spec
    f_states: list | None = [] if record else None
    g_states: list | None = [] if record else None
    f = _Bound("f", index, block.f, inputs, devices, record=f_states)
    g = _Bound("g", index, block.g, inputs, devices, record=g_states)
    with _coupling_errors(inputs.coupling, "forward", index):
        y1, y2 = inputs.coupling.forward(f, g, spec.unflatten(x1), spec.unflatten(x2))
    y1, y2 = _leaves_like(y1, x1, inputs, index), _leaves_like(y2, x2, inputs, index)
    return y1, y2, (f_states, g_states) if record else None


@contextmanager
def _coupling_errors(coupling: Coupling, method: str, index: int) -> Iterator[None]:
    """Name the block and the coupling in an error a generic coupling's method raises.

    Errors raised inside ``f`` or ``g`` themselves, and running out of memory, pass as
    they are.
    """
    try:
        yield
    except RevtreeError:
        raise
    except (ValueError, TypeError, RuntimeError) as e:
        if getattr(e, _FROM_BLOCK, False) or isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        reason = str(e).split("\n", 1)[0]
        reason = reason if len(reason) <= 300 else reason[:300] + "..."
        raise RevtreeError(
            f"block {index}: {coupling!r}.{method} raised {type(e).__name__}: {reason}. Hint: "
            "f and g must return what the coupling expects of them (for the couplings of "
            "revtree.couplings, a pytree with the structure and shapes of their input)."
        ) from e


def _leaves_like(tree: Any, like: Leaves, inputs: StepInputs, index: int) -> Leaves:
    """The leaves of a coupling's output stream, checked against its input stream."""
    layout = inputs.layout
    leaves, spec = _trees.leaves_as(tree, layout.spec, inputs.namespace)
    if _trees.differ(spec, layout.spec):
        raise RevtreeError(
            f"block {index}: {inputs.coupling!r} returned a stream of structure {spec}, but "
            f"its input stream has structure {layout.spec}. Hint: a coupling's forward and "
            "inverse return two pytrees with the structure of their inputs."
        )
    for name, y, x in zip(layout.names, leaves, like):
        if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
            raise RevtreeError(
                f"block {index}: {inputs.coupling!r} returned {_trees.describe(y)} at {name} "
                f"for a stream leaf of {_trees.describe(x)}. Hint: each output leaf must keep "
                "its input's shape and dtype."
            )
    return leaves


def inverse_step(
    block: Block, index: int, y1: Leaves, y2: Leaves, inputs: StepInputs
) -> tuple[Leaves, Leaves]:
    """Undo one block with its coupling's ``inverse``, under whatever autograd mode is on.

    ``f`` and ``g`` are checked as ``_Bound`` checks them, and the inputs the coupling
    returns against the outputs' structure, shapes and dtypes.
    """
    spec, coupling = inputs.layout.spec, inputs.coupling
    f = _Bound("f", index, block.f, inputs, ())
    g = _Bound("g", index, block.g, inputs, ())
    with running(index, recomputing=False), _coupling_errors(coupling, "inverse", index):
        x1, x2 = coupling.inverse(f, g, spec.unflatten(y1), spec.unflatten(y2))
    return _leaves_like(x1, y1, inputs, index), _leaves_like(x2, y2, inputs, index)


# ------------------------------------------------------------------------------------ reverse


def _grad_outputs(outputs: Leaves, grads: Sequence[Any]) -> tuple[Leaves, Leaves]:
    """Pair each output that requires grad with its gradient, cast and reduced as autograd would."""
    kept, kept_grads = [], []
    for out, grad in zip(outputs, grads):
        if out.requires_grad and grad is not None:
            if grad.shape != out.shape:  # the output was broadcast when combined
                grad = grad.sum_to_size(out.shape)
            if grad.dtype != out.dtype:  # autocast: combining promoted a lower precision
                grad = grad.to(out.dtype)
            kept.append(out)
            kept_grads.append(grad)
    return kept, kept_grads


_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None)


def vjp(outputs: Leaves, grads: Sequence[Any], inputs: Sequence[torch.Tensor]) -> list[Any]:
    """The vector-Jacobian product w.r.t. ``inputs``, ``None`` for an input left unused.

    Calls the autograd engine as ``torch.autograd.grad`` does, without its Python wrapper,
    which re-validates every output and input: with a block's parameters among the inputs
    that costs 0.1-0.2 ms a call, twice a block, on outputs checked here already.
    """
    kept, kept_grads = _grad_outputs(outputs, grads)
    if not kept:
        return [None] * len(inputs)
    if _ENGINE is None or has_torch_function((*kept, *inputs)):
        return list(torch.autograd.grad(kept, inputs, kept_grads, allow_unused=True))
    # (outputs, grad_outputs, retain_graph, create_graph, inputs, allow_unused, accumulate_grad)
    grads = _ENGINE.run_backward(
        tuple(kept), tuple(kept_grads), False, False, tuple(inputs), True, False
    )
    return list(grads)


def _plus(a: Sequence[Any], b: Sequence[Any]) -> list[Any]:
    """Leafwise ``a + b``, where ``None`` stands for zero."""
    if all(x is not None for x in a) and all(y is not None for y in b):
        return list(torch._foreach_add(a, b)) if a else []
    return [y if x is None else x if y is None else x + y for x, y in zip(a, b)]


def _leaves_requiring_grad(leaves: Leaves) -> Leaves:
    return [t.detach().requires_grad_() for t in leaves]


@dataclass
class Reversed:
    """What reversing one block gives: its inputs, their gradients, and the sources' gradients."""

    x1: Leaves
    x2: Leaves
    dx1: list[Any]
    dx2: list[Any]
    f_grads: list[Any]
    g_grads: list[Any]


def reverse_step(
    block: Block,
    index: int,
    y1: Leaves,
    y2: Leaves,
    dy1: Sequence[Any],
    dy2: Sequence[Any],
    inputs: StepInputs,
    f_sources: Sequence[torch.Tensor],
    g_sources: Sequence[torch.Tensor],
    states: Any,
    devices: tuple[int, ...],
    buffered: list[torch.nn.Module],
) -> Reversed:
    """Rebuild one block's inputs from its outputs and back-propagate through it.

    Args:
        block: The block.
        index: Its index in the sequence.
        y1: The block's first output stream.
        y2: Its second output stream.
        dy1: The gradient of the loss w.r.t. ``y1``.
        dy2: The gradient w.r.t. ``y2``.
        inputs: Layout, coupling and keyword arguments.
        f_sources: Tensors besides the streams whose gradient through ``f`` is wanted (its
            parameters, keyword tensors). For a generic coupling: through ``f`` and ``g``.
        g_sources: Likewise for ``g`` (empty for a generic coupling).
        states: The generator states ``forward_step`` recorded, or ``None``.
        devices: The CUDA devices whose generators were captured.
        buffered: The block's submodules that hold buffers, to be left as they are.
    """
    with running(index, recomputing=True), _buffers.kept(buffered):
        if isinstance(inputs.coupling, Elementwise):
            return _reverse_elementwise(
                block, index, y1, y2, dy1, dy2, inputs, f_sources, g_sources, states, devices
            )
        return _reverse_generic(block, index, y1, y2, dy1, dy2, inputs, f_sources, states, devices)


def _reverse_elementwise(
    block: Block,
    index: int,
    y1: Leaves,
    y2: Leaves,
    dy1: Sequence[Any],
    dy2: Sequence[Any],
    inputs: StepInputs,
    f_sources: Sequence[torch.Tensor],
    g_sources: Sequence[torch.Tensor],
    states: Any,
    devices: tuple[int, ...],
) -> Reversed:
    coupling, spec = inputs.coupling, inputs.update_spec
    assert isinstance(coupling, Elementwise)
    # x + u passes gradients through unchanged (unless a subclass redefines combine)
    additive = isinstance(coupling, Additive) and type(coupling).combine is Additive.combine
    f_state, g_state = states if states is not None else (None, None)
    n = len(y1)

    # g: rebuild x2 = uncombine(y2, g(y1)); gradients for y1, x2 and g's sources
    y1_ = _leaves_requiring_grad(y1)
    with _rng.replayed(g_state, devices), torch.enable_grad():
        gu = call(block.g, "g", index, y1_, inputs, spec)
    with torch.no_grad():
        x2 = coupling.uncombine_leaves(y2, gu)
    if additive:
        grads = vjp(gu, dy2, [*y1_, *g_sources])
        dx1, dx2, g_grads = _plus(dy1, grads[:n]), list(dy2), grads[n:]
    else:
        x2_ = _leaves_requiring_grad(x2)
        with torch.enable_grad():
            y2_ = [coupling.combine(x, *gu[i::n]) for i, x in enumerate(x2_)]
        grads = vjp(y2_, dy2, [*y1_, *x2_, *g_sources])
        dx1, dx2, g_grads = _plus(dy1, grads[:n]), grads[n : 2 * n], grads[2 * n :]
    del gu, y1_

    # f: rebuild x1 = uncombine(y1, f(x2)); gradients for x1, x2 and f's sources
    x2r = _leaves_requiring_grad(x2)
    with _rng.replayed(f_state, devices), torch.enable_grad():
        fu = call(block.f, "f", index, x2r, inputs, spec)
    with torch.no_grad():
        x1 = coupling.uncombine_leaves(y1, fu)
    if additive:
        grads = vjp(fu, dx1, [*x2r, *f_sources])
        dx2, f_grads = _plus(dx2, grads[:n]), grads[n:]
    else:
        x1_ = _leaves_requiring_grad(x1)
        with torch.enable_grad():
            y1r = [coupling.combine(x, *fu[i::n]) for i, x in enumerate(x1_)]
        grads = vjp(y1r, dx1, [*x1_, *x2r, *f_sources])
        dx1, dx2, f_grads = grads[:n], _plus(dx2, grads[n : 2 * n]), grads[2 * n :]
    return Reversed(x1, x2, dx1, dx2, f_grads, g_grads)


def _reverse_generic(
    block: Block,
    index: int,
    y1: Leaves,
    y2: Leaves,
    dy1: Sequence[Any],
    dy2: Sequence[Any],
    inputs: StepInputs,
    sources: Sequence[torch.Tensor],
    states: Any,
    devices: tuple[int, ...],
) -> Reversed:
    spec, coupling = inputs.layout.spec, inputs.coupling
    f_states, g_states = states if states is not None else ([], [])
    n = len(y1)
    with torch.no_grad(), _coupling_errors(coupling, "inverse", index):
        # inverse calls f and g in the reverse order of forward
        f = _Bound("f", index, block.f, inputs, devices, replay=reversed(f_states))
        g = _Bound("g", index, block.g, inputs, devices, replay=reversed(g_states))
        x1, x2 = coupling.inverse(f, g, spec.unflatten(y1), spec.unflatten(y2))
    x1 = _leaves_like(x1, y1, inputs, index)
    x2 = _leaves_like(x2, y2, inputs, index)
    x1_, x2_ = _leaves_requiring_grad(x1), _leaves_requiring_grad(x2)
    with torch.enable_grad():
        f = _Bound("f", index, block.f, inputs, devices, replay=iter(f_states))
        g = _Bound("g", index, block.g, inputs, devices, replay=iter(g_states))
        r1, r2 = coupling.forward(f, g, spec.unflatten(x1_), spec.unflatten(x2_))
    outputs = _trees.flatten(r1, inputs.namespace)[0] + _trees.flatten(r2, inputs.namespace)[0]
    grads = vjp(outputs, [*dy1, *dy2], [*x1_, *x2_, *sources])
    zeros = [torch.zeros_like(t) for t in x1]
    dx1 = [g if g is not None else z for g, z in zip(grads[:n], zeros)]
    dx2 = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads[n : 2 * n], x2)]
    return Reversed(x1, x2, dx1, dx2, grads[2 * n :], [])
