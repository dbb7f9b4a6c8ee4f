"""The compiled engine (``compile=True``): a block forward and in reverse as compiled functions.

Each is a pure function of the block's modules and tensors (parameters through
``torch.func.functional_call``, gradients through ``torch.func.vjp``), compiled with
``torch.compile(fullgraph=True)`` once per layout and keyword structure, and shared by every
block: dynamo's guards decide whether a block's modules fit a graph already compiled, so
blocks of one structure share one graph, and no call or block recompiles.

A block runs compiled once it has been trusted: its first forward and backward run on the
eager engine, which checks everything it checks on every call, and learns what the
compiled functions cannot do. A block stays on the eager engine, with a warning naming it
and the reason, where its ``f`` or ``g``

- draws random numbers (compiled code cannot replay the forward's draws in the recompute),
- changes its buffers, or has hooks of its own,
- leaves a gradient ``None`` (a compiled gradient cannot tell ``None`` from zero),
- or cannot be traced without a graph break.

The recompute is exact as the eager one is: the same arithmetic on the same parameters, the
forward's autocast state around the recomputed calls only.
"""

from __future__ import annotations

import types
import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch.func import functional_call, vjp

from ._autocast import AutocastState
from ._buffers import Policy
from ._errors import RevtreeWarning
from ._step import Backward, Step, restore_modes, set_modes
from ._strategies import ElementwiseStrategy, Grads, Leaves
from .couplings import Elementwise

# why a block stays eager, once known, by block index and input signature
Verdict = str | None


class CompiledStrategy(ElementwiseStrategy):
    """Elementwise couplings, their blocks compiled once trusted (see the module's docstring)."""

    def __init__(self, coupling: Elementwise) -> None:
        super().__init__(coupling)
        self.verdicts: dict[tuple[Any, ...], Verdict] = {}
        self._signatures: dict[tuple[Any, ...], int] = {}
        self._warned: set[tuple[int, str]] = set()

    # ------------------------------------------------------------------ which blocks

    def _per_call(self, call: Any, x: Leaves) -> _PerCall:
        """What is the same for every block of a call, worked out once."""
        known = call.memo.get(self)
        if known is None:
            signature = (
                call.layout.spec,
                tuple((t.shape, t.dtype, t.device) for t in x),
                tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in call.context.tensors),
                call.autocast,
            )
            number = self._signatures.setdefault(signature, len(self._signatures))
            known = call.memo[self] = _PerCall(number)
        return known

    def _key(self, step: Step, x: Leaves) -> tuple[Any, ...]:
        block = step.block
        per_call = self._per_call(step.call, x)
        return (step.index, block.f.training, block.g.training, per_call.signature)

    def _compiled(self, step: Step, key: tuple[Any, ...]) -> bool:
        return key in self.verdicts and self.verdicts[key] is None

    def _judge(self, step: Step, key: tuple[Any, ...], verdict: Verdict) -> None:
        """Record whether the block may run compiled; warn once per block and reason."""
        if key in self.verdicts and self.verdicts[key] is not None:
            return
        self.verdicts[key] = verdict
        if verdict is not None and (step.index, verdict) not in self._warned:
            self._warned.add((step.index, verdict))
            warnings.warn(
                f"block {step.index} runs on the eager engine under compile=True: {verdict}. "
                "Its gradients are exact either way; only its speed differs.",
                RevtreeWarning,
                stacklevel=6,
            )

    # ------------------------------------------------------------------------ forward

    def forward(self, step: Step, x1: Leaves, x2: Leaves) -> tuple[Leaves, Leaves]:  # noqa: D102
        if step.reads is None:  # plain autograd, no grad, or measuring: eager
            return super().forward(step, x1, x2)
        key = self._key(step, x1)
        if self._compiled(step, key):
            out = self._run_forward(step, x1, x2)
            if out is not None:
                return out
        # eager, learning what stands in the way of compiling the block
        generators = step.call.generators
        before = generators.capture() if generators is not None else ()
        y1, y2 = super().forward(step, x1, x2)
        if key not in self.verdicts:
            self._judge(step, key, _forward_verdict(step, before))
        return y1, y2

    def _run_forward(self, step: Step, x1: Leaves, x2: Leaves) -> tuple[Leaves, Leaves] | None:
        call, block = step.call, step.block
        assert step.reads is not None
        pf, pg = (_params(r) for r in step.reads)
        kt, kother = _keywords(call)
        modes = [[m.training for m in reads.walked] for reads in step.reads]
        try:
            forward, _ = self._functions_for(step)
            y1, y2 = forward(block.f, block.g, pf, pg, x1, x2, kt, kother)
        except Exception as e:  # dynamo could not trace it whole: eager from now on
            self._judge(step, self._key(step, x1), _untraceable(e))
            return None
        # nothing else to replay: the block draws nothing and its buffers stay
        for reads, found in zip(step.reads, modes):
            reads.calls.append((None, None, found))
        step.compiled = True
        return y1, y2

    # ------------------------------------------------------------------------ reverse

    def reverse(  # noqa: D102
        self, step: Step, back: Backward, y1: Leaves, y2: Leaves, dy1: Grads, dy2: Grads
    ) -> tuple[Leaves, Leaves, Grads, Grads]:
        # the training flags the forward found, for the key and the compiled reverse (the
        # eager one sets each call's own); none where f and g found a module in two modes
        modules, modes = _forward_modes(step)
        flipped = set_modes(modules, modes)
        try:
            key = self._key(step, y1)
            if step.compiled and len(modes) == len(modules):
                out = self._run_reverse(step, back, y1, y2, dy1, dy2, key)
                if out is not None:
                    return out
        finally:
            restore_modes(flipped)
        x1, x2, dx1, dx2 = super().reverse(step, back, y1, y2, dy1, dy2)
        if self.verdicts.get(key, "") is None and not back.accumulate:
            # the compiled gradient cannot say None: trusted only where every one flowed
            missing = any(g is None for g in (*dy1, *dy2, *dx1, *dx2))
            positions = [*step.positions(0), *step.positions(1)]
            missing = missing or any(back.totals[p] is None for p in positions)
            if missing:
                self._judge(
                    step,
                    key,
                    "a gradient it passes on is None (an output or a "
                    "parameter that does not reach the loss)",
                )
        return x1, x2, dx1, dx2

    def _run_reverse(
        self,
        step: Step,
        back: Backward,
        y1: Leaves,
        y2: Leaves,
        dy1: Grads,
        dy2: Grads,
        key: tuple[Any, ...],
    ) -> tuple[Leaves, Leaves, Grads, Grads] | None:
        if back.accumulate or any(g is None for g in (*dy1, *dy2)):
            return None  # hooks watch the recomputation, or an output reaches nothing: eager
        call, block = step.call, step.block
        assert step.reads is not None
        handles = back.handles
        pf, pg = (_handles(r, handles) for r in step.reads)
        kt, kother = _keywords(call, back)
        try:
            _, reverse = self._functions_for(step)
            y1, y2 = [t.detach() for t in y1], [t.detach() for t in y2]  # the saved outputs
            out = reverse(block.f, block.g, *pf, *pg, y1, y2, dy1, dy2, kt, kother)
        except Exception as e:
            self._judge(step, key, _untraceable(e))
            return None
        x1, x2, dx1, dx2, dpf, dpg, dkt = out
        totals = back.totals
        for reads, grads in zip(step.reads, (dpf, dpg)):
            for (_, _, _, p), name in zip(reads.params, reads.names):
                if p >= 0:
                    g = grads[name]
                    totals[p] = g if totals[p] is None else totals[p] + g
        kw_totals = back.kw_totals
        for i, g in enumerate(dkt):
            kw_totals[i] = g if kw_totals[i] is None else kw_totals[i] + g
        return x1, x2, dx1, dx2

    # ---------------------------------------------------------------------- functions

    def _functions_for(self, step: Step) -> tuple[Any, Any]:
        call = step.call
        per_call = call.memo.get(self)
        if per_call is not None and per_call.functions is not None:
            return per_call.functions
        context = call.context
        rest = (
            self.additive,
            call.layout.spec,
            call.update_spec,
            context.spec,
            context.positions,
            context.to_f,
            context.to_g,
            tuple(t.requires_grad for t in context.tensors),
            call.autocast,
            call.namespace,
        )
        lookup = (_value(self.elementwise), *rest)
        functions = _FUNCTIONS.get(lookup)
        if functions is None:
            functions = _FUNCTIONS[lookup] = _build((self.elementwise, *rest))
        if per_call is not None:
            per_call.functions = functions
        return functions


# the compiled functions of every sequence, by coupling, layout and keyword structure: two
# sequences of one layout (or one rebuilt, copied or loaded) share them, and their graphs
_FUNCTIONS: dict[tuple[Any, ...], tuple[Any, Any]] = {}


def _value(coupling: Elementwise) -> Any:
    """A coupling as a key: its type and settings, else the object itself.

    Settings that are plain values make ``Affine(2.0)`` and a copy of it one key.
    """
    settings = vars(coupling)
    if all(isinstance(v, (bool, int, float, str, type(None))) for v in settings.values()):
        return type(coupling), tuple(sorted(settings.items()))
    return coupling


class _PerCall:
    """What the compiled engine works out once per call: its signature, its functions."""

    __slots__ = ("functions", "signature")

    def __init__(self, signature: int) -> None:
        self.signature = signature
        self.functions: tuple[Any, Any] | None = None


# ---------------------------------------------------------------------------- verdicts


def _forward_verdict(step: Step, before: tuple[torch.Tensor, ...]) -> Verdict:
    """Why the block's forward, just run eagerly, cannot run compiled (``None``: it can)."""
    call, block = step.call, step.block
    generators = call.generators
    if generators is not None and not all(map(torch.equal, before, generators.capture())):
        return "it draws random numbers (dropout)"
    assert step.reads is not None
    policy: Policy = call.policy
    if any(policy.changes(m) for reads in step.reads for m in reads.modules):
        return "it changes its buffers (running statistics)"
    if any(
        m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks
        for m in (*block.f.modules(), *block.g.modules())
    ):
        return "it has hooks of its own"
    return None


def _untraceable(error: Exception) -> str:
    reason = str(error).strip().split("\n", 1)[0][:200]
    return f"torch.compile cannot trace it whole ({type(error).__name__}: {reason})"


# ------------------------------------------------------------------------ tensors in


def _params(reads: Any) -> dict[str, torch.Tensor]:
    return {name: slots[n] for (slots, n, _, _), name in zip(reads.params, reads.names)}


def _handles(
    reads: Any, handles: Leaves
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The parameters to differentiate (by name) and the others, for the recompute.

    The compiled reverse runs without autograd (inside the Function's backward): the
    transforms inside it differentiate, whatever ``requires_grad`` says.
    """
    wanted, fixed = {}, {}
    for (_, _, t, p), name in zip(reads.params, reads.names):
        if p >= 0:
            wanted[name] = handles[p]
        else:
            fixed[name] = t
    return wanted, fixed


def _forward_modes(step: Step) -> tuple[list[Any], list[bool]]:
    """The modules of ``f`` and ``g`` and the training flags their first calls found.

    The flags come back shorter than the modules where one module was found in two modes
    (``f`` switched it for ``g``): no single setting replays both calls then.
    """
    assert step.reads is not None
    found: dict[int, tuple[Any, bool]] = {}
    for reads in step.reads:
        if not reads.calls:
            continue
        for m, mode in zip(reads.walked, reads.calls[0][2]):
            seen = found.setdefault(id(m), (m, mode))
            if seen[1] is not mode:
                return [m for m, _ in found.values()], []
    return [m for m, _ in found.values()], [mode for _, mode in found.values()]


def _keywords(call: Any, back: Backward | None = None) -> tuple[Leaves, list[Any]]:
    """The keyword tensors (for the forward: the call's copies) and every other leaf."""
    context = call.context
    tensors = (
        call.keywords[0] or call.keywords[1]
        if back is None
        else back.keywords[0] or back.keywords[1]
    )
    return [t.detach() for t in tensors], list(context.leaves)


# ---------------------------------------------------------------------- the functions


def _build(key: tuple[Any, ...]) -> tuple[Any, Any]:
    """The compiled forward and reverse of a block, for one layout and keyword structure."""
    coupling, additive, spec, update_spec, kw_spec, positions, to_f, to_g, needs, autocast, _ = key
    wanted = [i for i, need in enumerate(needs) if need]

    # dynamo traces no optree structure built outside it: the trees are rebuilt and read
    # by plain Python along a template (supported: dicts, lists, tuples, named tuples)
    stream, updates = _template(spec), _template(update_spec)
    keywords = _template(kw_spec)

    def tree(leaves: Leaves) -> Any:
        return _unflatten(stream, leaves)

    def leaves_of(out: Any) -> Leaves:  # what f or g returned: arity trees like the stream
        found: list[Any] = [None] * update_spec.num_leaves
        _flatten_like(updates, out, found)
        return found

    def kwargs(tensors: Leaves, others: list[Any]) -> dict[str, Any]:
        leaves = list(others)
        for i, t in zip(positions, tensors):
            leaves[i] = t
        return _unflatten(keywords, leaves)

    def combine(x: Leaves, u: Leaves) -> Leaves:
        n = len(x)
        return [coupling.combine(a, *u[i::n]) for i, a in enumerate(x)]

    def uncombine(y: Leaves, u: Leaves) -> Leaves:
        n = len(y)
        return [coupling.uncombine(b, *u[i::n]) for i, b in enumerate(y)]

    def forward(f, g, pf, pg, x1, x2, kt, kother):
        kw = kwargs(kt, kother)
        fu = leaves_of(functional_call(f, pf, (tree(x2),), kw if to_f else {}))
        y1 = combine(x1, fu)
        gu = leaves_of(functional_call(g, pg, (tree(y1),), kw if to_g else {}))
        return y1, combine(x2, gu)

    def half(fn, wanted_p, fixed_p, x_in, y_self, dy_self, kt, kother, routed):
        """One function of the block in reverse: rebuild its stream, back-propagate."""

        def call(p, xs, k):
            kw = kwargs(k, kother) if routed else {}
            return functional_call(fn, {**fixed_p, **p}, (tree(xs),), kw)

        def run(p, xs, ks):
            k = list(kt)
            for i, t in zip(wanted, ks):
                k[i] = t
            return leaves_of(_with_autocast(autocast, call, p, xs, k))

        ks = [kt[i] for i in wanted] if routed else []
        u, pull = vjp(run, wanted_p, x_in, ks)
        x_self = uncombine(y_self, u)
        if additive:
            du = [_like(d, v) for d, v in zip(dy_self, u)]
            dx_self = list(dy_self)
        else:
            _, pull_c = vjp(lambda xs, us: _with_autocast(autocast, combine, xs, us), x_self, u)
            dx_self, du = pull_c(list(dy_self))
        dp, dx_in, dks = pull(du)
        return x_self, dx_self, dx_in, dp, dks

    def reverse(f, g, pf, ff, pg, fg, y1, y2, dy1, dy2, kt, kother):
        x2, dx2, dx1_g, dpg, dk_g = half(g, pg, fg, y1, y2, dy2, kt, kother, to_g)
        dx1 = [a + b for a, b in zip(dy1, dx1_g)]
        x1, dx1, dx2_f, dpf, dk_f = half(f, pf, ff, x2, y1, dx1, kt, kother, to_f)
        dx2 = [a + b for a, b in zip(dx2, dx2_f)]
        dk = [a + b for a, b in zip(dk_f, dk_g)] if to_f and to_g else (dk_f or dk_g)
        return x1, x2, dx1, dx2, dpf, dpg, dk

    compile_ = torch.compile(fullgraph=True, dynamic=False)
    return compile_(_own_code(forward)), compile_(_own_code(reverse))


def _own_code(fn: Any) -> Any:
    """``fn`` with a code object of its own.

    Dynamo keeps its graphs, and counts recompilations against its limit, per code object:
    each layout's functions get their own, so that sequences of different layouts (and the
    block structures within each) do not share the limit.
    """
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


class _Leaf:
    """Where leaf ``i`` of a tree sits, in a template of the tree's structure."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i


_NODES = (dict, list, tuple)


def _template(spec: Any) -> Any:
    """A tree of the structure ``spec`` with a ``_Leaf`` marker for each leaf.

    Raises ``TypeError`` for a node the plain-Python rebuild cannot make (a custom node).
    """
    template = spec.unflatten([_Leaf(i) for i in range(spec.num_leaves)])

    def check(node: Any) -> None:
        if isinstance(node, _Leaf) or node is None:
            return
        if type(node) not in (dict, OrderedDict, list, tuple) and not _is_namedtuple(node):
            raise TypeError(f"a {type(node).__name__} node")
        for child in node.values() if isinstance(node, dict) else node:
            check(child)

    check(template)
    return template


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def _unflatten(template: Any, leaves: Leaves) -> Any:
    if isinstance(template, _Leaf):
        return leaves[template.i]
    if template is None:
        return None
    if isinstance(template, dict):
        return type(template)((k, _unflatten(v, leaves)) for k, v in template.items())
    children = [_unflatten(c, leaves) for c in template]
    if isinstance(template, list):
        return children
    if _is_namedtuple(template):
        return type(template)(*children)
    return tuple(children)


def _flatten_like(template: Any, tree: Any, found: Leaves) -> None:
    """The leaves of ``tree``, read along ``template`` (mappings by key, as optree reads them)."""
    if isinstance(template, _Leaf):
        found[template.i] = tree
    elif isinstance(template, dict):
        for k, v in template.items():
            _flatten_like(v, tree[k], found)
    elif template is not None:
        for i, v in enumerate(template):
            _flatten_like(v, tree[i], found)


def _like(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``grad`` reduced to ``out``'s shape and cast to its dtype, as autograd would."""
    if grad.shape != out.shape:
        grad = grad.sum_to_size(out.shape)
    return grad.to(out.dtype)


def _with_autocast(state: AutocastState | None, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a captured autocast state, with ``with`` statements dynamo can trace."""
    settings = () if state is None else state.settings
    cache = True if state is None else state.cache_enabled
    if not settings:
        return fn(*args)
    (t0, on0, dt0), rest = settings[0], settings[1:]
    with torch.autocast(t0, dtype=dt0, enabled=on0, cache_enabled=cache):
        if not rest:
            return fn(*args)
        (t1, on1, dt1), *more = rest
        if more:
            raise TypeError("autocast on more than two device types")
        with torch.autocast(t1, dtype=dt1, enabled=on1, cache_enabled=cache):
            return fn(*args)
