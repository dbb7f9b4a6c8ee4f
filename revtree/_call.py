"""One call of a sequence: what every block of it shares, built once per call."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import optree
import torch
from optree import PyTreeSpec

from . import _trees
from ._autocast import AutocastState
from ._buffers import Policy
from ._context import Context, Route
from ._layout import Layout
from ._rng import Generators, State, generators_for

if TYPE_CHECKING:
    from ._strategies import Strategy


class Call:
    """One call of a ``ReversibleSequence``: layout, strategy, keyword arguments, replay state.

    The keyword arguments ``f`` and ``g`` see in the forward pass hold copies of the
    caller's tensors: were ``f`` to modify one in place, the error raised would come after
    the caller's tensor had changed. ``generators`` and ``autocast`` are captured only
    for a call whose reversible blocks will be recomputed (``record``).
    """

    __slots__ = (
        "autocast",
        "check_drift",
        "context",
        "generators",
        "keywords",
        "kwargs",
        "layout",
        "memo",
        "namespace",
        "policy",
        "rng_state",
        "strategy",
        "strict_drift",
        "update_spec",
        "verified",
    )

    def __init__(
        self,
        layout: Layout,
        strategy: Strategy,
        context: Context,
        namespace: str,
        owner: Any,
    ) -> None:
        self.layout = layout
        self.strategy = strategy
        self.context = context
        self.namespace = namespace
        self.update_spec = _update_spec(layout.spec, strategy.arity, namespace)
        self.check_drift: float | None = owner.check_drift
        self.strict_drift: bool = owner.on_drift == "raise"
        self.policy: Policy = owner._buffer_policy
        self.verified: set[tuple[int, int]] = owner._verified
        copies = [t.clone() for t in context.tensors]
        self.kwargs = context.rebuild(copies)
        self.keywords = (copies if context.to_f else [], copies if context.to_g else [])
        self.generators: Generators | None = None
        self.rng_state: State | None = None  # the last state captured, for the next to share
        self.autocast: AutocastState | None = None
        self.memo: dict[Any, Any] = {}  # what a strategy works out once per call

    @classmethod
    def build(
        cls,
        owner: Any,
        layout: Layout,
        kwargs: dict[str, Any],
        route: Route,
    ) -> Call:
        """The call of ``owner`` (a ``ReversibleSequence``) on an input of this ``layout``."""
        context = Context.build(kwargs, route, owner.namespace)
        return cls(layout, owner._strategy, context, owner.namespace, owner)

    def record(self, streams: list[torch.Tensor], preserve_rng: bool) -> None:
        """Capture what a recomputation replays: the generators in use and the autocast state."""
        tensors = [*streams, *self.context.tensors]
        generators = generators_for(tensors)
        if preserve_rng:
            self.generators = generators
        types = tuple(d.type for d in generators.devices)
        self.autocast = AutocastState.capture(types)

    def name(self, which: int, k: int) -> str:
        """The name of keyword tensor ``k`` of ``f`` (``which == 0``) or ``g``."""
        return self.context.name(k)


def _update_spec(spec: PyTreeSpec, arity: int, namespace: str) -> PyTreeSpec:
    """The structure ``f`` and ``g`` return for an elementwise coupling of ``arity``."""
    if arity == 1:
        return spec
    return optree.treespec_tuple(
        [spec] * arity, none_is_leaf=_trees.NONE_IS_LEAF, namespace=namespace
    )
