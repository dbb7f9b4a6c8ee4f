"""``ReversibleSequence``: a stack of reversible blocks over any pytree."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from itertools import groupby
from typing import Any, Literal, cast

import optree
import torch
from optree import PyTreeSpec
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from . import _checks, _torch, _trees
from ._block import Block, Fn, Invertible, Spec, Update, as_block
from ._budget import MemoryPlan, choose, measure
from ._context import Context, Route, parse_route
from ._engine import _node, _pass
from ._engine._compiled import Compiled
from ._engine._fsdp import is_unit
from ._engine._learned import Learned
from ._engine._run import Call, Settings, Shared, transform_error
from ._errors import RevtreeError, RevtreeWarning
from ._layout import Layout
from .codecs import Codec, Duplicate, Split
from .couplings import Additive, Coupling, Elementwise

Leaves = list[torch.Tensor]
_SELECTION = "__revtree_selection__"  # run()'s route and blocks, passed through __call__

_LAYOUT_CACHE_SIZE = 32


class _Branch(nn.Module):
    """The branch ``h`` of a residual layer ``x + h(x)``: ``layer(x) - x``, leaf by leaf."""

    def __init__(self, layer: nn.Module | Callable[..., Any]) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return optree.tree_map(torch.sub, self.layer(x, *args, **kwargs), x)


# the codec when none is given: a split of the last axis (silently wrong for images, so
# recognised by identity and warned about; any codec given, Split(-1) too, silences it)
DEFAULT_CODEC = Split(-1)


class ReversibleSequence(nn.Module):
    """A stack of reversible blocks over an arbitrary pytree of tensors.

    Each leaf of the input ``x`` is turned into two half-streams by its codec; every
    block then computes ``y1 = x1 + f(x2, **kwargs)`` and ``y2 = x2 + g(y1)`` on the
    half-stream pytrees, and the codecs merge the final streams into a pytree with the
    structure of ``x``. Reversible blocks store no activations: backward reconstructs
    each block's inputs from its outputs, so activation memory does not grow with depth,
    and the gradients are those of plain autograd (dropout masks and autocast replayed).

    Args:
        blocks: ``(f, g)`` pairs of modules (or [`Block`][revtree.Block]s). ``f`` and ``g``
            take a half-stream pytree and return a pytree of the same structure, a tensor
            of the same shape for every leaf.
        codec: One [`Codec`][revtree.codecs.Codec] for every leaf, or a pytree of codecs
            that is a prefix of the input (e.g. ``{"tokens": Split(-1), "cls": Duplicate()}``).
        coupling: How ``f`` and ``g`` combine with the streams:
            [`Additive`][revtree.couplings.Additive] (the default),
            [`Affine`][revtree.couplings.Affine], [`Momentum`][revtree.couplings.Momentum]
            or your own [`Coupling`][revtree.couplings.Coupling].
        reversible: ``True`` recomputes every block in backward; ``False`` runs the same
            function with plain autograd (for A/B checks); a sequence of booleans, one per
            block, mixes the two (blocks marked ``False`` store their activations).
        route: Which of the two functions receive the keyword arguments of a call:
            ``"f"`` (the default), ``"g"`` or ``"both"``.
        preserve_rng_state: Replay the random generators in the recomputation so that
            dropout draws the forward's masks. Turn off only for blocks that draw no
            random numbers.
        check_drift: If set, a relative error: backward compares each block's rebuilt
            inputs with a small sample kept from the forward pass and warns
            ([`RevtreeWarning`][revtree.RevtreeWarning]), naming the block, past it.
        on_drift: ``"warn"`` (the default), or ``"raise"``: a drift past ``check_drift`` is
            a [`RevtreeError`][revtree.RevtreeError] (as ``torch.utils.checkpoint``'s
            ``determinism_check`` is an error).
        memory_budget: Bytes of activations the stack may store beyond what the fully
            reversible stack holds. ``0`` (the default) recomputes every block;
            ``float("inf")`` stores every block's activations, like plain autograd; in
            between, the blocks that save the most recomputation per byte store theirs
            (measured on the first call for each input shape: see
            [`plan`][revtree.ReversibleSequence.plan]). Gradients are the same either way.
        namespace: The optree namespace of custom pytree nodes in the input.
        compile: Run each block's forward and reverse as compiled functions of its
            tensors (``torch.compile``), one graph shared by every block of the same
            structure. A block's first step runs eagerly, checked; blocks that draw random
            numbers, change buffers, have hooks or cannot be traced stay eager, with a
            [`RevtreeWarning`][revtree.RevtreeWarning]. Gradients are the same either way.
            A number ``n`` (``compile=4``) runs up to ``n`` consecutive blocks of one
            structure as one graph: less host work per block for small blocks, at about
            ``n`` times the compile time (``True`` is ``1``).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import revtree
        >>> from revtree.codecs import Duplicate, Split
        >>> def mlp():
        ...     return nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        >>> class PerLeaf(nn.Module):  # applies one MLP to each leaf of a dict
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.tokens, self.cls = mlp(), mlp()
        ...     def forward(self, x):
        ...         return {"tokens": self.tokens(x["tokens"]), "cls": self.cls(x["cls"])}
        >>> seq = revtree.ReversibleSequence(
        ...     [(PerLeaf(), PerLeaf()) for _ in range(3)],
        ...     codec={"tokens": Split(-1), "cls": Duplicate()},
        ... )
        >>> x = {"tokens": torch.randn(2, 5, 8), "cls": torch.randn(2, 4)}
        >>> y = seq(x)
        >>> y["tokens"].shape, y["cls"].shape
        (torch.Size([2, 5, 8]), torch.Size([2, 4]))
        >>> y["tokens"].sum().backward()
    """

    def __init__(
        self,
        blocks: Sequence[
            Block
            | Update
            | Invertible
            | tuple[nn.Module | Callable[..., Any], nn.Module | Callable[..., Any]]
        ],
        *,
        codec: Codec | Any = DEFAULT_CODEC,
        coupling: Coupling = Additive(),
        reversible: bool | Sequence[bool] = True,
        route: Route = "f",
        preserve_rng_state: bool = True,
        check_drift: float | None = None,
        on_drift: Literal["warn", "raise"] = "warn",
        memory_budget: float = 0,
        namespace: str = "",
        compile: bool = False,
        sides: Literal["sum", "list"] = "sum",
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([as_block(i, b) for i, b in enumerate(blocks)])
        self._layouts: dict[PyTreeSpec, Layout] = {}
        self.codec = codec
        if not isinstance(compile, (bool, int)) or compile < 0:
            raise RevtreeError(
                f"compile={compile!r} is not a bool or a number of blocks. Hint: "
                "compile=True runs each block's forward and reverse as compiled functions; "
                "compile=4 runs up to 4 blocks of one structure as one graph (see the "
                "performance page)."
            )
        self._compile = bool(compile)
        # what the engine learns of the blocks as they run (not state: never saved)
        self._learned = Learned()
        self._compiled_engine = Compiled(self._learned, int(compile)) if compile else None
        self.coupling = coupling
        self._reversible: tuple[bool, ...] = ()
        self._reversible_all: bool | None = None
        self.reversible = reversible
        self.route = route
        self.preserve_rng_state = preserve_rng_state
        self.check_drift = check_drift
        self.on_drift = on_drift
        self.memory_budget = memory_budget
        self._plans: dict[tuple, MemoryPlan] = {}
        self._measured: dict[tuple, tuple[list[int], list[float]]] = {}
        self.namespace = namespace
        if sides not in ("sum", "list"):
            raise RevtreeError(
                f"sides={sides!r} is not 'sum' or 'list'. Hint: 'sum' returns the side outputs "
                "of every block added up, 'list' one entry per block (None where it has none)."
            )
        self.sides = sides
        self._materialised = False

    @classmethod
    def from_layers(
        cls,
        layers: Iterable[nn.Module | Callable[..., Any]],
        /,
        residual: bool = False,
        **kwargs: Any,
    ) -> ReversibleSequence:
        """A reversible stack from the residual branches of a network, two at a time.

        Layers ``l0, l1, l2, l3, ...`` (an ``nn.Sequential`` of residual branches, each the
        ``h(x)`` of ``x = x + h(x)``) become the blocks ``(l0, l1), (l2, l3), ...``; an odd
        last layer is paired with a ``g`` that updates nothing. Layers that add their own
        input (residual blocks computing ``x + h(x)``, as most do) need ``residual=True``:
        their branch ``layer(x) - x`` is then what the streams add. The codec is
        ``Duplicate()`` unless given: both streams start as the input, at its full width,
        so layers built for that width fit unchanged, and the output is the streams' mean.

        This is a different function from the residual network: its block computes
        ``y1 = x1 + l0(x2)``, ``y2 = x2 + l1(y1)``, not ``x + l1(x + l0(x))``. Pretrained
        weights are a starting point to fine-tune from, as with RevLib's
        ``sequential_to_revnet``.

        Args:
            layers: Modules or functions, each mapping the input's structure to itself.
            residual: The layers return ``x + h(x)`` (a residual block), not ``h(x)``.
            **kwargs: As for ``ReversibleSequence`` (``codec`` defaults to ``Duplicate()``).

        Returns:
            The sequence.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> import revtree
            >>> residual = nn.Sequential(*(nn.Linear(8, 8) for _ in range(5)))
            >>> seq = revtree.ReversibleSequence.from_layers(residual)
            >>> len(seq.blocks), seq(torch.randn(2, 8)).shape
            (3, torch.Size([2, 8]))
            >>> class Residual(nn.Module):  # x + h(x)
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.h = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
            ...     def forward(self, x):
            ...         return x + self.h(x)
            >>> net = nn.Sequential(*(Residual() for _ in range(4)))
            >>> seq = revtree.ReversibleSequence.from_layers(net, residual=True)
        """
        layers = list(layers)
        if residual:
            layers = [_Branch(layer) for layer in layers]
        if len(layers) % 2:
            layers.append(Fn(_no_update))
        kwargs.setdefault("codec", Duplicate())
        return cls(list(zip(layers[::2], layers[1::2])), **kwargs)

    @classmethod
    def from_factory(
        cls, make: Callable[[], nn.Module | Callable[..., Any]], depth: int, /, **kwargs: Any
    ) -> ReversibleSequence:
        """A stack of ``depth`` blocks, each ``f`` and ``g`` a fresh ``make()``.

        Args:
            make: Builds one function (``f`` or ``g``) for a half-stream.
            depth: The number of blocks.
            **kwargs: As for ``ReversibleSequence``.

        Returns:
            The sequence.

        Examples:
            >>> from torch import nn
            >>> import revtree
            >>> seq = revtree.ReversibleSequence.from_factory(lambda: nn.Linear(4, 4), 6)
            >>> len(seq.blocks), sum(p.numel() for p in seq.parameters())
            (6, 240)
        """
        return cls([(make(), make()) for _ in range(depth)], **kwargs)

    def _block(self, index: int) -> Block:
        return cast(Block, self.blocks[index])

    @property
    def coupling(self) -> Coupling:
        """How ``f`` and ``g`` combine with the streams; setting it applies from the next call."""
        return self._coupling

    @coupling.setter
    def coupling(self, value: Coupling) -> None:
        if not isinstance(value, Coupling):
            raise RevtreeError(
                f"coupling={value!r} is not a revtree Coupling. Hint: use "
                "revtree.couplings.Additive(), Affine(), Momentum() or a Coupling subclass."
            )
        if self._compile and not isinstance(value, Elementwise):
            warnings.warn(
                f"compile=True compiles elementwise couplings (Additive, Affine); {value!r} "
                "runs on the eager engine.",
                RevtreeWarning,
                stacklevel=3,
            )
        self._coupling = value

    @property
    def route(self) -> Route:
        """Which of ``f`` and ``g`` receive the keyword arguments of a call."""
        return self._route

    @route.setter
    def route(self, value: Route) -> None:
        parse_route(value)
        self._route = value

    @property
    def preserve_rng_state(self) -> bool:
        """Whether the recomputation replays the random generators (dropout) as they were."""
        return self._preserve_rng_state

    @preserve_rng_state.setter
    def preserve_rng_state(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise RevtreeError(
                f"preserve_rng_state={value!r} is not a bool. Hint: True replays the random "
                "generators in the recomputation (dropout), False skips it."
            )
        self._preserve_rng_state = value

    @property
    def on_drift(self) -> Literal["warn", "raise"]:
        """What a drift past ``check_drift`` does: ``"warn"`` or ``"raise"``."""
        return self._on_drift

    @on_drift.setter
    def on_drift(self, value: Literal["warn", "raise"]) -> None:
        if value not in ("warn", "raise"):
            raise RevtreeError(
                f"on_drift={value!r} is not 'warn' or 'raise'. Hint: on_drift='raise' makes "
                "a drift past check_drift an error instead of a warning."
            )
        self._on_drift = value

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "compile" and not callable(value):
            # nn.Module.compile is a method; an attribute would shadow it and change nothing
            raise RevtreeError(
                f"seq.compile = {value!r} would not change how the sequence runs. Hint: pass "
                "compile=True when building it (ReversibleSequence(..., compile=True)); "
                "seq.compile() is nn.Module's, compiling the whole module with torch.compile."
            )
        super().__setattr__(name, value)

    @property
    def check_drift(self) -> float | None:
        """The relative reconstruction error past which backward warns; ``None``: no check."""
        return self._check_drift

    @check_drift.setter
    def check_drift(self, value: float | None) -> None:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0
        ):
            raise RevtreeError(
                f"check_drift={value!r} is not a relative error >= 0 or None. Hint: e.g. "
                "check_drift=1e-4 warns when a block's inputs are rebuilt 1e-4 off."
            )
        self._check_drift = None if value is None else float(value)

    @property
    def memory_budget(self) -> float:
        """Bytes of activations the stack may store beyond the fully reversible stack's."""
        return self._memory_budget

    @memory_budget.setter
    def memory_budget(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise RevtreeError(
                f"memory_budget={value!r} is not a number of bytes >= 0. Hint: 0 "
                "recomputes every block, float('inf') stores every block's activations."
            )
        self._memory_budget = value

    @property
    def codec(self) -> Codec | Any:
        """The leaf codec, or prefix tree of codecs; setting it applies from the next call."""
        return self._codec

    @codec.setter
    def codec(self, value: Codec | Any) -> None:
        self._codec = value
        self._layouts.clear()  # layouts are built from the codec, per input structure

    @property
    def namespace(self) -> str:
        """The optree namespace of custom pytree nodes in the input."""
        return self._namespace

    @namespace.setter
    def namespace(self, value: str) -> None:
        self._namespace = value
        self._layouts.clear()

    @property
    def reversible(self) -> tuple[bool, ...]:
        """For each block, whether it is recomputed in backward (``True``) or stores activations."""
        if len(self._reversible) != len(self.blocks):  # blocks added or removed since
            if self._reversible_all is None:
                raise RevtreeError(
                    f"reversible has {len(self._reversible)} flags for {len(self.blocks)} "
                    "blocks: blocks were added or removed since it was set. Hint: set "
                    "seq.reversible = [...] again, one flag per block (or True for all)."
                )
            self._reversible = (self._reversible_all,) * len(self.blocks)
        return self._reversible

    @reversible.setter
    def reversible(self, value: bool | Sequence[bool]) -> None:
        self._reversible_all = value if isinstance(value, bool) else None
        if isinstance(value, bool):
            flags = (value,) * len(self.blocks)
        else:
            flags = tuple(value)
            if len(flags) != len(self.blocks) or not all(isinstance(v, bool) for v in flags):
                raise RevtreeError(
                    f"reversible must be a bool or one bool per block ({len(self.blocks)}), "
                    f"got {value!r}. Hint: reversible=[True, False, ...] marks each block."
                )
        self._reversible = flags

    def extra_repr(self) -> str:  # noqa: D102
        flags = self.reversible
        mode = flags[0] if flags and len(set(flags)) == 1 else list(flags)
        return (
            f"codec={self.codec!r}, coupling={self.coupling!r}, reversible={mode}, "
            f"route={self.route!r}"
        )

    def forward(self, x: Any, /, **kwargs: Any) -> Any:
        """Run every block on ``x``; keyword arguments go to ``f`` (or as ``route`` says).

        Args:
            x: A pytree of floating-point tensors.
            **kwargs: Context for the blocks, any pytree; its tensors get exact gradients.

        Returns:
            A pytree with the structure of ``x``.
        """
        selection = kwargs.pop(_SELECTION, None)
        if selection is not None:  # from run(): this call's route and blocks
            return self._run(x, kwargs, *selection)
        return self._run(x, kwargs, self.route)

    def run(
        self,
        x: Any,
        /,
        kwargs: dict[str, Any] | None = None,
        *,
        route: Route | tuple[bool, bool] | None = None,
        blocks: Sequence[int] | None = None,
    ) -> Any:
        """Run some of the blocks, with a route for this call: what adapters need.

        ``seq(x, **kwargs)`` is ``seq.run(x, kwargs)``. ``route`` overrides the sequence's
        for this call (``"f"``, ``"g"``, ``"both"`` or a pair ``(to_f, to_g)``, as
        reformer-pytorch's ``arg_route``); ``blocks`` are the indices of the blocks to run,
        in order (layer dropout skips some). It runs through the module's own call, so
        that hooks on the sequence (FSDP's) run as for ``seq(x)``; from a subclass's own
        ``forward`` (an adapter's), it runs the blocks directly.

        Args:
            x: A pytree of floating-point tensors.
            kwargs: The keyword arguments for the blocks.
            route: Which of ``f`` and ``g`` receive ``kwargs`` in this call.
            blocks: The indices of the blocks to run, increasing; all by default.

        Returns:
            A pytree with the structure of ``x``.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> import revtree
            >>> seq = revtree.ReversibleSequence.from_factory(lambda: nn.Linear(2, 2), 3)
            >>> x = torch.randn(5, 4)
            >>> torch.equal(seq.run(x, blocks=[0, 2]), seq.run(seq.run(x, blocks=[0]), blocks=[2]))
            True
        """
        if blocks is not None:
            blocks = list(blocks)
            if any(not 0 <= i < len(self.blocks) for i in blocks) or blocks != sorted(set(blocks)):
                raise RevtreeError(
                    f"blocks={blocks} must be increasing indices below {len(self.blocks)}. "
                    "Hint: pass the indices of the blocks to run, in order, each once."
                )
        if route is not None:
            parse_route(route)
        selection = (self.route if route is None else route, blocks)
        if type(self).forward is not ReversibleSequence.forward:
            # a subclass's forward (an adapter's) calls run: its call ran the hooks already
            return self._run(x, kwargs or {}, *selection)
        # through the module's own call, so that its hooks (FSDP's among them) run
        return self(x, **(kwargs or {}), **{_SELECTION: selection})

    def inverse(self, y: Any, /, **kwargs: Any) -> Any:
        """Compute the input that gives the output ``y``: the blocks undone, last to first.

        Runs with ordinary autograd (so it is differentiable, e.g. for a normalizing flow).
        Every codec must be bijective (``Split``, ``Rearrange``; not ``Duplicate``, whose
        output is the mean of two streams). Blocks that draw random numbers (dropout in
        training mode) cannot be undone exactly: call ``.eval()`` first.

        Args:
            y: A pytree with the structure of the sequence's output.
            **kwargs: The keyword arguments the forward call was given.

        Returns:
            The input ``x`` with ``self(x, **kwargs) == y`` up to rounding.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> import revtree
            >>> seq = revtree.ReversibleSequence.from_factory(lambda: nn.Linear(2, 2), 3)
            >>> x = torch.randn(5, 4)
            >>> torch.allclose(seq.inverse(seq(x)), x, atol=1e-5)
            True
        """
        layout = self._layout(y)
        for name, codec in zip(layout.names, layout.codecs):
            if not codec.bijective:
                raise RevtreeError(
                    f"inverse: the codec {codec!r} of output leaf {name} cannot split the output "
                    "back into its two streams. Hint: use a bijective codec (Split, Rearrange) "
                    "to invert the sequence."
                )
        state = layout.encode(_trees.flatten(y, self.namespace)[0])
        call = self._new_call(layout, kwargs)
        _pass.inverse(call, self._planned(layout, self.route, range(len(self.blocks))), state)
        return layout.decode(state)

    def plan(self, x: Any, /, **kwargs: Any) -> MemoryPlan:
        """The memory plan for an input like ``x``: which blocks store, and what they cost.

        Made (and kept) on the first training call for each input signature when
        ``memory_budget`` lies strictly between 0 and infinity; calling ``plan`` makes it
        for any budget, e.g. to choose one. Measuring runs every block once with autograd
        on and keeps nothing (the random generators and the modules' buffers are put back).

        Args:
            x: An input of the shapes the plan is for.
            **kwargs: The keyword arguments of such a call.

        Returns:
            The [`MemoryPlan`][revtree.MemoryPlan].

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> import revtree
            >>> blocks = [(nn.Linear(32, 32), nn.Linear(32, 32)) for _ in range(6)]
            >>> seq = revtree.ReversibleSequence(blocks, memory_budget=40_000)
            >>> plan = seq.plan(torch.randn(64, 64))
            >>> any(plan.stored), plan.used_bytes <= 40_000  # which: by measured time per byte
            (True, True)
        """
        call, state, planned = self._start(x, kwargs, self.route, None)
        return self._plan(call, state, planned)

    def _plan(self, call: Call, state: list[Leaves], planned: list[Any]) -> MemoryPlan:
        shared = call.shared
        signature = (
            shared.layout.spec,
            self.training,
            tuple((t.shape, t.dtype, t.device) for part in state for t in part),
            tuple((t.shape, t.dtype) for t in shared.context.tensors),
        )
        fixed = tuple(not r for r in self.reversible)
        key = (signature, self.memory_budget, fixed)
        plan = self._plans.get(key)
        if plan is None:
            measured = self._measured.get(signature)
            if measured is None:
                held = [*self.parameters(), *self.buffers(), *shared.context.tensors]
                measured = measure(call, planned, state, held, self)
                _remember(self._measured, signature, measured)
            sizes, seconds = measured
            stream_bytes = sum(t.numel() * t.element_size() for part in state for t in part)
            stored = choose(sizes, seconds, stream_bytes, self.memory_budget, fixed)
            plan = MemoryPlan(
                self.memory_budget, stream_bytes, tuple(sizes), tuple(seconds), stored
            )
            _remember(self._plans, key, plan)
        return plan

    def _layout(self, x: Any) -> Layout:
        spec = optree_structure(x, self.namespace)
        layout = self._layouts.get(spec)
        if layout is None:
            layout = Layout.build(x, self.codec, self.namespace)
            _remember(self._layouts, spec, layout)
            if self._codec is DEFAULT_CODEC:
                _checks.default_codec_on_images(layout.names, _trees.flatten(x, self.namespace)[0])
        return layout

    def _new_call(self, layout: Layout, kwargs: dict[str, Any]) -> Call:
        context = Context.build(kwargs, self.namespace)
        return Call(Shared(layout, context, Settings(self)))

    def _planned(
        self, layout: Layout, route: Any, indices: Sequence[int]
    ) -> list[tuple[int, Block, list[Spec]]]:
        """The blocks ``indices``, each with the program it runs for ``layout`` and ``route``."""
        normal = parse_route(route)
        programs = self._learned.programs
        planned = []
        for index in indices:
            block = self._block(index)
            if _torch.forward_hooks(block) and not is_unit(block):  # (FSDP units call it)
                raise RevtreeError(
                    f"block {index} has forward hooks of its own: a Block is not called as a "
                    "module (its functions are, and again in backward). Hint: register the "
                    "hook on seq.blocks[i].f or .g (revtree.is_recomputing() tells the "
                    "recomputation apart), or on the sequence."
                )
            key = (block, self._coupling, normal, layout.parts)
            program = programs.get(key)
            if program is None:
                program = programs[key] = block.program(self._coupling, normal)
                _checks_program(index, block, program, layout)
            planned.append((index, block, program))
        return planned

    def _has_sides(self, planned: list[Any]) -> bool:
        """Whether a step of the blocks ``planned`` returns a side output."""
        programs = {id(program): program for _, _, program in planned}
        return any(any(spec.side) for program in programs.values() for spec in program)

    def _start(
        self, x: Any, kwargs: dict[str, Any], route: Any, indices: Sequence[int] | None
    ) -> tuple[Call, list[Leaves], list[Any]]:
        """The call on ``x``: its forward objects, the encoded state and the blocks to run.

        No function sees the caller's storage: the parts a block reads before it writes
        them are copied, so that an in-place change inside one raises before the caller's
        tensors change.
        """
        leaves, spec = _trees.flatten(x, self.namespace)
        layout = self._layouts.get(spec) or self._layout(x)
        state = layout.encode(leaves)
        call = self._new_call(layout, kwargs)
        indices = range(len(self.blocks)) if indices is None else indices
        planned = self._planned(layout, route, indices) if leaves else []
        if planned:
            for k in _read_first(planned[0][2], layout.parts):
                state[k] = [t.clone() for t in state[k]]
        return call, state, planned

    @torch.compiler.disable
    def _run(
        self,
        x: Any,
        kwargs: dict[str, Any],
        route: Route,
        indices: Sequence[int] | None = None,
    ) -> Any:
        """Run the blocks ``indices`` (all, by default) in order."""
        reversible = torch.is_grad_enabled() and any(self.reversible)
        if _torch.functorch_active() or (
            _torch.forward_ad_active() and any(map(_torch.has_tangent, _tensors(x, kwargs)))
        ):
            if reversible:
                raise transform_error()
            return self._run_plainly(x, kwargs, route, indices)
        call, state, planned = self._start(x, kwargs, route, indices)
        layout = call.shared.layout
        if self._compiled_engine is not None:
            self._compiled_engine.ran = set()
        if not planned:
            return layout.decode(state)
        leaves = _trees.flatten(x, self.namespace)[0]
        flags = self._stored_flags(call, state, planned)
        sides: list[list[Any]] = []
        tape = None
        first = True
        at = 0
        for stored, group in groupby(flags):
            count = len(list(group))
            chunk = planned[at : at + count]
            at += count
            if stored:  # plain autograd, or no gradient at all
                sides += _pass.forward_plain(call, chunk, state)
                tape = None
            else:
                state, found, tape = _pass.forward_nodes(
                    call, chunk, state, leaves if first else None
                )
                sides += found
            first = False
        if call.tracker is not None:
            call.tracker.flush()
        if self._learned.grown:  # forget what was learned of modules replaced since
            self._learned.prune(set(self.modules()))
        out = [layout.leaf(state, i) for i in range(len(layout.codecs))]
        if tape is not None:
            _node.hold_decoded(tape, out)
        y = layout.spec.unflatten(out)
        if self._has_sides(planned):
            return y, self._gather_sides(sides)
        return y

    def _run_plainly(
        self, x: Any, kwargs: dict[str, Any], route: Route, indices: Sequence[int] | None
    ) -> Any:
        """Every block with plain autograd, as leaf-by-leaf torch ops (``torch.func``)."""
        call, state, planned = self._start(x, kwargs, route, indices)
        sides = _pass.forward_plain(call, planned, state)
        y = call.shared.layout.decode(state)
        if self._has_sides(planned):
            return y, self._gather_sides(sides)
        return y

    def _gather_sides(self, sides: list[list[Any]]) -> Any:
        """The side outputs of the call: summed over blocks, or one entry per block."""
        per_block = []
        for steps in sides:
            found = [s for s in steps if s is not None]
            per_block.append(_sum_trees(found, self.namespace) if found else None)
        if self.sides == "list":
            return per_block
        found = [s for s in per_block if s is not None]
        return _sum_trees(found, self.namespace)

    def _stored_flags(self, call: Call, state: list[Leaves], planned: list[Any]) -> list[bool]:
        """For each block to run, whether it runs with plain autograd in this call.

        Every block does without a gradient; under autograd, those built with
        ``reversible=False``, those the memory budget stores, and those with modules still
        to be materialised (lazy modules run once, as plain autograd, on their first call).
        """
        if not torch.is_grad_enabled():
            return [True] * len(planned)
        every = tuple(not r for r in self.reversible)
        if self.memory_budget == float("inf"):
            every = (True,) * len(every)
        elif self.memory_budget:
            every_block = self._planned(call.shared.layout, self.route, range(len(self.blocks)))
            plan = self._plan(call, state, every_block).stored
            every = tuple(a or b for a, b in zip(every, plan))
        if not self._materialised:
            lazy = tuple(_is_lazy(b) for b in self.blocks)
            self._materialised = not any(lazy)
            every = tuple(a or b for a, b in zip(every, lazy))
        return [every[index] for index, _, _ in planned]


def _tensors(x: Any, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    leaves: list[Any] = optree.tree_leaves(cast(Any, (x, kwargs)), none_is_leaf=_trees.NONE_IS_LEAF)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _sum_trees(trees: list[Any], namespace: str) -> Any:
    """The leafwise sum of side outputs of one structure."""
    total = trees[0]
    for tree in trees[1:]:
        try:
            total = optree.tree_map(
                torch.add, total, tree, none_is_leaf=_trees.NONE_IS_LEAF, namespace=namespace
            )
        except ValueError as e:
            raise RevtreeError(
                f"the side outputs of the blocks have different structures, so they cannot be "
                f"summed ({str(e).splitlines()[0]}). Hint: ReversibleSequence(..., "
                "sides='list') returns one per block."
            ) from None
    return total


def _read_first(program: list[Spec], parts: int) -> list[int]:
    """The parts a block's program reads before writing them (they hold the caller's storage)."""
    written: set[int] = set()
    out: list[int] = []
    for spec in program:
        every = spec.writes or tuple(range(parts))
        reads = spec.reads if spec.kind == "update" else every
        out.extend(r for r in reads if r not in written and r not in out)
        written.update(every)
    return out


def _checks_program(index: int, block: Block, program: list[Spec], layout: Layout) -> None:
    """A block's steps must fit the parts the codecs make, and update every one of them."""
    parts = layout.parts
    names = block.names()
    if block.two_stream and parts != 2:
        raise RevtreeError(
            f"block {index} is a pair (f, g) over two streams, but the codecs make {parts} "
            f"part(s) of the input. Hint: use two-part codecs (Split(dim), Duplicate()), or "
            "build the block from steps over the parts: Block(Update(f0, writes=0, reads=1), "
            "...)."
        )
    written: set[int] = set()
    for spec in program:
        for part in (*spec.writes, *spec.reads):
            if part >= parts:
                raise RevtreeError(
                    f"block {index}: {names[spec.fns[0]]} uses part {part}, but the codecs make "
                    f"{parts} part(s) of the input (0..{parts - 1}). Hint: give the input a "
                    f"codec with more parts (Split(dim, parts={part + 1})), or use parts "
                    "that exist."
                )
        written.update(spec.writes or range(parts))
    missing = sorted(set(range(parts)) - written)
    if missing:
        raise RevtreeError(
            f"block {index} updates parts {sorted(written)} of the {parts} the codecs make: "
            f"part(s) {missing} would pass through it unchanged. Hint: add an Update that "
            "writes each part, or cut the input in fewer parts."
        )


def _no_update(tree: Any, **kwargs: Any) -> None:
    """A ``g`` that leaves its stream as it is (``None``: no update, see ``Fn``)."""
    return None


def _is_lazy(module: nn.Module) -> bool:
    return any(
        isinstance(m, LazyModuleMixin) and m.has_uninitialized_params() for m in module.modules()
    )


def _remember(cache: dict, key: Any, value: Any) -> None:
    """Keep ``value`` under ``key``, forgetting everything once the cache is full."""
    if len(cache) >= _LAYOUT_CACHE_SIZE:
        cache.clear()
    cache[key] = value


def optree_structure(x: Any, namespace: str) -> PyTreeSpec:
    """The structure of ``x`` under revtree's pytree policy."""
    return _trees.flatten(x, namespace)[1]
