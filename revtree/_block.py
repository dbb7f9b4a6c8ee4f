"""A block: the functions of one reversible map over the parts of the state, held as modules.

The classic block is two functions ``(f, g)`` on two half-streams, combined by the
sequence's coupling. A block may instead be an ordered list of *steps*, each changing some
parts of the state: an [`Update`][revtree.Update] (one part from others, combined
invertibly: RevGNN's sweep over K groups, RevCol's levels) or an
[`Invertible`][revtree.Invertible] module with an inverse (a normalizing flow's coupling,
ActNorm, a permutation). ``Block(f, g)`` is the two steps ``Update(f, writes=0, reads=1)``
and ``Update(g, writes=1, reads=0)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union, cast

from torch import nn

from ._context import Normal, Receives, Route, parse_receives, parse_route
from ._errors import RevtreeError
from .couplings import Additive, Coupling, Elementwise

Function = Union[nn.Module, Callable[..., Any]]  # noqa: UP007


class Fn(nn.Module):
    """A plain function as ``f`` or ``g``: a module with no parameters of its own.

    The function may close over tensors; one that needs a gradient gets it, as in plain
    autograd (found on the function's first call, and looked for again at every call
    from then on).

    Args:
        fn: The function, called with the half-stream and the keyword arguments.

    Examples:
        >>> import torch, revtree
        >>> seq = revtree.ReversibleSequence([(torch.tanh, torch.sin)] * 2)
        >>> seq.blocks[0].f
        Fn(tanh)
        >>> seq(torch.zeros(3, 4)).shape
        torch.Size([3, 4])
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def as_module(fn: Function) -> nn.Module:
    """``fn`` as a module: itself, or a plain callable held by an [`Fn`][revtree.Fn]."""
    return fn if isinstance(fn, nn.Module) else Fn(fn)


class _Step(nn.Module):
    """What the steps of a block have in common: one function, its keywords, its side output."""

    side: bool
    receives: Normal

    def __init__(self, side: bool, kwargs: Receives) -> None:
        super().__init__()
        if not isinstance(side, bool):
            raise RevtreeError(
                f"side={side!r} is not a bool. Hint: side=True when the function returns "
                "(update, side_output)."
            )
        self.side = side
        self.receives = parse_receives(kwargs, "kwargs")


class Update(_Step):
    """One part of the state updated from others: ``x[w] = combine(x[w], fn(x[r], ...))``.

    ``fn`` is called with the trees of the parts ``reads``, in that order (and the keyword
    arguments it receives), and returns an update shaped like part ``writes`` (for an
    [`Affine`][revtree.couplings.Affine] coupling, a pair of them). The update never reads
    the part it writes, so it is undone exactly: ``x[w] = uncombine(y[w], fn(y[r], ...))``.

    Args:
        fn: A module or function.
        writes: The part it changes.
        reads: The part (or parts) ``fn`` is called with.
        coupling: How the update combines with the part: ``Additive()`` (the default),
            ``Affine()``, or your own [`Elementwise`][revtree.couplings.Elementwise].
        side: ``fn`` returns ``(update, side_output)``: a pytree of tensors the sequence
            returns beside its output (summed over blocks), whose gradient flows back
            into ``fn`` (an auxiliary loss, a log-determinant).
        kwargs: Which keyword arguments of the call ``fn`` receives: all (``True``),
            none (``False``) or those named.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import revtree
        >>> from revtree.codecs import Split
        >>> def sweep():  # RevGNN's: group 0 from the sum of the others, then each from the last
        ...     return revtree.Block(
        ...         revtree.Update(lambda a, b: torch.tanh(a + b), writes=0, reads=(1, 2)),
        ...         revtree.Update(nn.Linear(4, 4), writes=1, reads=0),
        ...         revtree.Update(nn.Linear(4, 4), writes=2, reads=1),
        ...     )
        >>> seq = revtree.ReversibleSequence([sweep() for _ in range(3)], codec=Split(-1, parts=3))
        >>> seq(torch.randn(5, 12)).shape
        torch.Size([5, 12])
    """

    fn: nn.Module
    writes: int
    reads: tuple[int, ...]
    coupling: Elementwise

    def __init__(
        self,
        fn: Function,
        /,
        writes: int,
        reads: int | Sequence[int],
        *,
        coupling: Elementwise = Additive(),
        side: bool = False,
        kwargs: Receives = True,
    ) -> None:
        super().__init__(side, kwargs)
        self.fn = as_module(fn)
        reads = (reads,) if isinstance(reads, int) else tuple(reads)
        for part in (writes, *reads):
            if isinstance(part, bool) or not isinstance(part, int) or part < 0:
                raise RevtreeError(
                    f"Update(writes={writes!r}, reads={reads!r}): parts are ints >= 0. "
                    "Hint: e.g. Update(fn, writes=0, reads=1)."
                )
        if not reads:
            raise RevtreeError(
                "Update(reads=()): an update reads at least one other part. Hint: an update "
                "of a part from nothing is not invertible from its output; read another part."
            )
        if writes in reads:
            raise RevtreeError(
                f"Update(writes={writes}, reads={reads}): the update reads the part it writes, "
                "so it cannot be undone from its output. Hint: read other parts only; a map "
                "of a part onto itself is an Invertible step."
            )
        if not isinstance(coupling, Elementwise):
            raise RevtreeError(
                f"Update(coupling={coupling!r}): an update combines elementwise. Hint: use "
                "Additive(), Affine() or an Elementwise subclass; other couplings are blocks "
                "of their own (ReversibleSequence(coupling=...))."
            )
        self.writes, self.reads, self.coupling = writes, reads, coupling

    def extra_repr(self) -> str:
        return f"writes={self.writes}, reads={self.reads}, coupling={self.coupling!r}"


class Invertible(_Step):
    """A module with an inverse, as one step: it maps some parts of the state to new values.

    The module is called with the trees of its parts (all of them by default) and returns
    as many trees (one tree for one part, else a tuple), or ``(trees, side_output)`` with
    ``side=True``; its inverse takes the outputs back. Backward inverts it, then runs it
    again with autograd on: nothing of it is stored (the 5/3 cost of a generic coupling).
    Data-dependent initialisation on the first batch (ActNorm) works: the first call
    runs as any other.

    Args:
        module: The module.
        inverse: The name of the module's inverse method (``"inverse"``), or a function
            ``inverse(*trees, **kwargs)``.
        parts: The parts it maps (all, by default).
        side: The module returns ``(out, side_output)`` (a log-determinant): the sequence
            returns it beside its output, summed over blocks.
        kwargs: Which keyword arguments of the call it receives.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import revtree
        >>> from revtree.codecs import Whole
        >>> class Scale(nn.Module):  # y = x * exp(s), log|det| = sum(s)
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.s = nn.Parameter(torch.zeros(3))
        ...     def forward(self, x):
        ...         return x * self.s.exp(), self.s.sum().expand(x.shape[0])
        ...     def inverse(self, y):
        ...         return y * (-self.s).exp()
        >>> flow = revtree.ReversibleSequence(
        ...     [revtree.Invertible(Scale(), side=True) for _ in range(4)], codec=Whole()
        ... )
        >>> z, log_det = flow(torch.randn(2, 3))
        >>> z.shape, log_det.shape
        (torch.Size([2, 3]), torch.Size([2]))
    """

    module: nn.Module
    parts: tuple[int, ...] | None

    def __init__(
        self,
        module: nn.Module,
        /,
        *,
        inverse: str | Callable[..., Any] = "inverse",
        parts: Sequence[int] | None = None,
        side: bool = False,
        kwargs: Receives = True,
    ) -> None:
        super().__init__(side, kwargs)
        self.module = as_module(module)
        if isinstance(inverse, str):
            if not callable(getattr(self.module, inverse, None)):
                raise RevtreeError(
                    f"Invertible({type(module).__name__}): the module has no method "
                    f"{inverse!r}. Hint: give it one, or pass inverse=<a function of the "
                    "outputs> (or the name of its inverse method)."
                )
        elif not callable(inverse):
            raise RevtreeError(
                f"Invertible(inverse={inverse!r}) is neither a method name nor a function."
            )
        self.inverse_of = inverse
        self.parts = None if parts is None else tuple(parts)

    def inverse(self, *trees: Any, **kwargs: Any) -> Any:
        """The inverse of the module: the inputs for outputs ``trees``."""
        if isinstance(self.inverse_of, str):
            return getattr(self.module, self.inverse_of)(*trees, **kwargs)
        return self.inverse_of(*trees, **kwargs)


Step = Union[Update, Invertible]  # noqa: UP007


@dataclass(frozen=True)
class Spec:
    """One step of a block, as the engine runs it (the modules come from ``functions``)."""

    kind: str  # "update", "coupled" (a generic two-stream coupling), "invertible"
    fns: tuple[int, ...]  # which of the block's functions it calls
    writes: tuple[int, ...]  # the parts it changes
    reads: tuple[int, ...]  # the parts its function reads (update)
    coupling: Coupling | None
    side: tuple[bool, ...]  # per function: returns (out, side output)
    receives: tuple[Normal, ...]  # per function: the keyword arguments it gets


class Block(nn.Module):
    """One reversible block: ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``, or a list of steps.

    Holds the functions as modules, so that their parameters are named ``blocks.{i}.f.*``
    and ``blocks.{i}.g.*`` (``blocks.{i}.steps.{k}.*`` for steps) in the sequence's state
    dict.

    Args:
        *functions: ``f`` and ``g`` (each a module or any callable, kept as a
            [`Fn`][revtree.Fn]), combined by the sequence's coupling; or the block's
            steps, [`Update`][revtree.Update] and [`Invertible`][revtree.Invertible]
            modules, run in order.
        route: For ``(f, g)``: which keyword arguments each receives, as the sequence's
            ``route`` (which it overrides for this block).
        side: For ``(f, g)``: ``True`` (both), or a pair: which return
            ``(update, side_output)``.

    Examples:
        >>> from torch import nn
        >>> import revtree
        >>> block = revtree.Block(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> sorted(name for name, _ in block.named_parameters())
        ['f.bias', 'f.weight', 'g.bias', 'g.weight']
    """

    def __init__(
        self,
        *functions: Any,
        route: Route | None = None,
        side: bool | tuple[bool, bool] = False,
    ) -> None:
        super().__init__()
        steps = [s for s in functions if isinstance(s, _Step)]
        if steps and len(steps) == len(functions):
            if route is not None or side is not False:
                raise RevtreeError(
                    "Block(*steps, route=..., side=...): a block of steps says these per "
                    "step. Hint: Update(fn, ..., kwargs=..., side=...)."
                )
            self.steps = nn.ModuleList(steps)
            self._route = None
            self._side = (False, False)
            return
        if len(functions) != 2 or steps or not all(map(callable, functions)):
            raise RevtreeError(
                f"Block({_describe(functions)}): a block is two functions (f, g) or a list of "
                "steps (revtree.Update, revtree.Invertible). Hint: Block(f, g), or "
                "Block(Update(f0, writes=0, reads=1), ...)."
            )
        self.f = as_module(functions[0])
        self.g = as_module(functions[1])
        self._route = None if route is None else parse_route(route)
        if isinstance(side, bool):
            side = (side, side)
        if not (
            isinstance(side, tuple) and len(side) == 2 and all(isinstance(s, bool) for s in side)
        ):
            raise RevtreeError(
                f"side={side!r} is not a bool or a pair of bools. Hint: side=(True, False) "
                "when f returns (update, side_output) and g returns its update only."
            )
        self._side = side

    @property
    def two_stream(self) -> bool:
        """Whether the block is ``(f, g)`` (not a list of steps)."""
        return "steps" not in self._modules

    def functions(self) -> list[nn.Module]:
        """The modules the block calls, in the order its program numbers them."""
        if self.two_stream:
            return [self.f, self.g]
        out: list[nn.Module] = []
        for step in self.steps:
            out.append(step.fn if isinstance(step, Update) else cast(Invertible, step).module)
        return out

    def names(self) -> list[str]:
        """Each function's name in errors: ``f``, ``g``, or ``steps[k]``."""
        if self.two_stream:
            return ["f", "g"]
        return [f"steps[{k}]" for k in range(len(self.steps))]

    def program(self, coupling: Coupling, route: tuple[Normal, Normal]) -> list[Spec]:
        """The steps the engine runs, for the sequence's ``coupling`` and ``route``."""
        if not self.two_stream:
            specs = []
            for k, step in enumerate(self.steps):
                if isinstance(step, Update):
                    specs.append(
                        Spec(
                            "update",
                            (k,),
                            (step.writes,),
                            step.reads,
                            step.coupling,
                            (step.side,),
                            (step.receives,),
                        )
                    )
                else:
                    inv = cast(Invertible, step)
                    specs.append(
                        Spec(
                            "invertible",
                            (k,),
                            inv.parts or (),  # () : every part
                            (),
                            None,
                            (inv.side,),
                            (inv.receives,),
                        )
                    )
            return specs
        to_f, to_g = self._route if self._route is not None else route
        side_f, side_g = self._side
        if isinstance(coupling, Elementwise):
            return [
                Spec("update", (0,), (0,), (1,), coupling, (side_f,), (to_f,)),
                Spec("update", (1,), (1,), (0,), coupling, (side_g,), (to_g,)),
            ]
        return [Spec("coupled", (0, 1), (0, 1), (), coupling, self._side, (to_f, to_g))]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Not callable on its own: a block runs inside a ``ReversibleSequence``.

        The sequence calls a block that is an FSDP unit with the step to run, so that the
        unit's hooks gather and free its parameters around it.
        """
        if args and isinstance(args[0], _Run):
            return args[0](*args[1:])
        raise RevtreeError(
            "a revtree Block is run by its ReversibleSequence, not called directly. "
            "Hint: call the sequence, or call block.f / block.g."
        )


def as_block(index: int, block: Any) -> Block:
    """Accept a ``Block``, an ``(f, g)`` pair of modules or callables, or one step."""
    if isinstance(block, Block):
        return block
    if isinstance(block, _Step):
        return Block(block)
    if isinstance(block, (tuple, list)) and len(block) == 2 and all(map(callable, block)):
        return Block(*block)
    hint = (
        " An nn.Sequential of residual layers becomes a reversible stack with "
        "ReversibleSequence.from_layers(layers)."
        if isinstance(block, nn.Module)
        else ""
    )
    raise RevtreeError(
        f"block {index} is {_describe(block)}, not a pair (f, g) of modules or functions. "
        "Hint: pass blocks=[(f0, g0), (f1, g1), ...], each f and g a torch module or a "
        f"callable taking a half-stream pytree, or revtree.Block(...) of steps.{hint}"
    )


def _describe(block: Any) -> str:
    if isinstance(block, (tuple, list)):
        kinds = ", ".join(type(b).__name__ for b in block)
        return f"a {type(block).__name__} of {len(block)} ({kinds})"
    return type(block).__name__


class _Run:
    """A step the sequence runs inside a block's own call (see ``Block.forward``)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)
