"""momentumnet's ``MomentumNet`` and ``transform_to_momentumnet``, on the revtree engine.

momentumnet (0.10) implements Momentum ResNets (Sander, Ablin, Blondel and Peyré, ICML
2021): one function per step on a position ``x`` and a velocity ``v``,
``v = gamma * v + (1 - gamma) * f(x)``, ``x = x + v``, the velocity starting at zero (or at
``init_function(x)``) and dropped at the end. Its memory-saving path (``use_backprop=False``)
has a backward written by hand. Here the same network is a ``ReversibleSequence`` with the
[`Momentum`][revtree.couplings.Momentum] coupling (two steps per block; an odd last step is
paired with a ``g`` that skips its step) and the
[`ZeroVelocity`][revtree.codecs.ZeroVelocity] codec: dropout, autocast, buffers and
``torch.autograd.grad`` behave as under plain autograd.

The classes take the package's arguments and name their parameters as it does
(``network.{i}.*`` for the functions, ``network.init.*`` for the velocity's
``init_function``), so state dicts load both ways with ``strict=True``. ``use_backprop=True``
runs plain autograd (the package's reference path); ``use_backprop=False`` runs the
reversible engine. [`patch`][revtree.adapters.momentumnet.patch] swaps ``MomentumNet`` into
the package, so that its own ``transform_to_momentumnet`` and model zoo use it.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from revtree.adapters.momentumnet import MomentumNet
    >>> functions = [nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)) for _ in range(5)]
    >>> net = MomentumNet(functions, gamma=0.9, use_backprop=False)
    >>> net(torch.randn(4, 8)).shape
    torch.Size([4, 8])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy
from typing import Any, cast

import torch
from torch import nn

from .._block import Fn
from .._errors import RevtreeError
from .._sequence import ReversibleSequence
from ..codecs import Rearrange, ZeroVelocity
from ..couplings import Momentum
from ..couplings._momentum import momentum_term
from ._built import built
from ._patching import swapped
from ._versions import require

TESTED = "0.10"


class MomentumNet(nn.Module):
    """``momentumnet.MomentumNet``, on the revtree engine.

    Args:
        functions: One module per step, each called as ``function(x, *args)``; the same
            module may appear more than once (its weights are then shared).
        gamma: The momentum term, in ``(0, 1]``.
        init_speed: Start the velocity at ``init_function(x)`` instead of zero.
        init_function: The module that gives the initial velocity.
        use_backprop: ``True``: plain autograd, storing every step's activations;
            ``False``: the reversible engine, storing none.
        is_residual: ``True``: the update is ``function(x)``; ``False``: ``function(x) - x``
            (for functions that add their input themselves, such as ResNet blocks).
    """

    def __init__(
        self,
        functions: Iterable[nn.Module],
        gamma: float,
        init_speed: bool = False,
        init_function: nn.Module | None = None,
        use_backprop: bool = True,
        is_residual: bool = True,
    ) -> None:
        super().__init__()
        if init_speed and init_function is None:
            raise RevtreeError(
                "MomentumNet(init_speed=True) needs init_function, the module that gives the "
                "initial velocity. Hint: pass init_function=..., or init_speed=False to start "
                "at rest."
            )
        self.network = _Network(
            list(functions), gamma, init_speed, init_function, use_backprop, is_residual
        )
        self.use_backprop = use_backprop
        self.gamma = gamma
        self.init_speed = init_speed

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the steps; ``args`` reach every function after ``x``.

        ``kwargs`` are ignored, as by the package.
        """
        return self.network(x, *args)

    @property
    def functions(self) -> list[nn.Module]:
        """The step functions, in order."""
        return cast(_Network, self.network).functions

    @property
    def init_function(self) -> nn.Module:
        """The module that gives the initial velocity."""
        return cast(nn.Module, self.network.init)


class _Network(nn.Module):
    """The package's ``network``: the functions as ``0``, ``1``, ..., the velocity's as ``init``.

    Its attributes are the package's (``gamma``, ``init_speed``, ``is_residual``, the
    submodules), read at every call as the package reads them: a function replaced after
    construction (``nn.SyncBatchNorm.convert_sync_batchnorm``, a replica of
    ``nn.DataParallel``) or a new ``gamma`` takes effect at the next call. The
    ``ReversibleSequence`` that runs them is built from them, then again whenever they
    change, and held outside the module tree, so that parameter names, state dicts and
    ``.to()`` see the functions under the package's names only.
    """

    def __init__(
        self,
        functions: Sequence[nn.Module],
        gamma: float,
        init_speed: bool,
        init_function: nn.Module | None,
        use_backprop: bool,
        is_residual: bool,
    ) -> None:
        super().__init__()
        _gamma(gamma)
        for i, function in enumerate(functions):
            self.add_module(str(i), function)
        if init_function is not None:
            self.add_module("init", init_function)
        self.n_functions = len(functions)
        self.gamma = gamma
        self.init_speed = init_speed
        self.is_residual = is_residual
        self.use_backprop = use_backprop

    @property
    def functions(self) -> list[nn.Module]:
        return [self._modules[str(i)] for i in range(self.n_functions)]  # type: ignore[misc]

    @property
    def sequence(self) -> ReversibleSequence:
        """The sequence that runs the functions as they are now."""
        functions = self.functions
        key = (
            *functions,
            self.gamma,
            self.init_speed,
            self.is_residual,
            self.use_backprop,
        )
        return built(self, key, lambda: self._build(functions))

    def _build(self, functions: list[nn.Module]) -> ReversibleSequence:
        steps: list[nn.Module | Fn] = [_Step(f, self.is_residual) for f in functions]
        if len(steps) % 2:
            steps.append(Fn(_skip))
        # the initial velocity, when not zero, is stacked under the position
        codec = Rearrange("two ... -> two ...") if self.init_speed else ZeroVelocity()
        return ReversibleSequence(
            list(zip(steps[::2], steps[1::2])),
            coupling=Momentum(_gamma(self.gamma)),
            codec=codec,
            route="both",
            reversible=not self.use_backprop,
        )

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        if not self.n_functions:
            return x
        sequence = self.sequence
        kwargs = {"args": args} if args else {}
        if self.init_speed:
            init = cast(nn.Module, self.init)
            # an initial velocity that broadcasts against x (a learned (d,) vector) is
            # taken as the package takes it
            return sequence(torch.stack(torch.broadcast_tensors(x, init(x))), **kwargs)[0]
        return sequence(x, **kwargs)


def _gamma(gamma: object) -> float:
    return momentum_term(
        gamma,
        "MomentumNet",
        "the velocity is divided by gamma when a step is undone; gamma=0 is a plain ResNet",
    )


class _Step(nn.Module):
    """One step's update: ``function(x, *args)``, less ``x`` for a function that adds it."""

    def __init__(self, function: nn.Module, is_residual: bool) -> None:
        super().__init__()
        self.function = function
        self.is_residual = is_residual

    def forward(self, x: torch.Tensor, args: tuple[Any, ...] = ()) -> torch.Tensor:
        out = self.function(x, *args)
        return out if self.is_residual else out - x


def _skip(x: Any, **kwargs: Any) -> None:
    """The ``g`` of an odd last step: ``None`` skips it (see ``Momentum``)."""
    return None


def transform_to_momentumnet(
    model: nn.Module,
    sub_layers: Sequence[str] = ("layer1", "layer2", "layer3", "layer4"),
    keep_first_layer: bool = True,
    gamma: float = 0.9,
    use_backprop: bool = False,
    is_residual: bool = False,
) -> nn.Module:
    """``momentumnet.transform_to_momentumnet``: residual stages made momentum stages.

    A copy of ``model`` in which each submodule named in ``sub_layers`` (a sequence of
    residual blocks, e.g. a torchvision ResNet's ``layer1``) becomes a ``MomentumNet`` of its
    blocks, keeping their weights. ``keep_first_layer`` leaves each stage's first block as it
    is (it changes the shape); ``is_residual=False`` because such blocks add their input
    themselves. The converted network is a different function from the original (each
    block's update is mixed into a velocity): fine-tune it.

    Args:
        model: The network; it is copied, not changed.
        sub_layers: Dotted names of the stages to convert.
        keep_first_layer: Keep each stage's first block outside the momentum steps.
        gamma: The momentum term.
        use_backprop: ``False`` (the default): the reversible engine; ``True``: plain
            autograd.
        is_residual: As for ``MomentumNet``.

    Returns:
        The converted copy.

    Examples:
        >>> from torch import nn
        >>> from revtree.adapters.momentumnet import transform_to_momentumnet
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
        >>> converted = transform_to_momentumnet(model, ["1"], keep_first_layer=False)
        >>> type(converted[1][0]).__name__
        'MomentumNet'
    """
    converted = deepcopy(model)
    for name in sub_layers:
        *parents, key = name.split(".")
        parent = converted
        for part in parents:
            parent = _child(parent, part, name)
        stage = _child(parent, key, name)
        if not isinstance(stage, (nn.Sequential, nn.ModuleList)):
            raise RevtreeError(
                f"transform_to_momentumnet: {name!r} is a {type(stage).__name__}, not a sequence "
                "of blocks. Hint: name the nn.Sequential (or ModuleList) of residual blocks."
            )
        functions = list(stage.children())
        first, rest = (functions[:1], functions[1:]) if keep_first_layer else ([], functions)
        momentum = MomentumNet(rest, gamma, use_backprop=use_backprop, is_residual=is_residual)
        # nested as the package nests it, so that state dicts carry the same names
        wrapped = nn.Sequential(momentum)
        setattr(parent, key, nn.Sequential(*first, wrapped) if keep_first_layer else wrapped)
    return converted


def _child(parent: nn.Module, key: str, name: str) -> nn.Module:
    module = parent._modules.get(key)
    if module is None:
        raise RevtreeError(
            f"transform_to_momentumnet: the model has no submodule {name!r} (no {key!r} in "
            f"{type(parent).__name__}). Hint: sub_layers are dotted names from "
            "model.named_modules(), e.g. 'layer1' or 'encoder.layers'."
        )
    return module


@contextmanager
def patch() -> Iterator[None]:
    """Make momentumnet's own code build this ``MomentumNet``.

    Inside the context, ``momentumnet.MomentumNet``, the package's
    ``transform_to_momentumnet`` and its model zoo (``momentumnet.models``) use the revtree
    engine.

    Examples:
        >>> import momentumnet  # doctest: +SKIP
        >>> with patch():  # doctest: +SKIP
        ...     net = momentumnet.MomentumNet(functions, gamma=0.9, use_backprop=False)
    """
    require("momentumnet", TESTED, "momentumnet")
    import momentumnet
    import momentumnet.models
    import momentumnet.momentum_net
    import momentumnet.resnet_to_momentumnet

    modules = [
        momentumnet,
        momentumnet.momentum_net,
        momentumnet.resnet_to_momentumnet,
        momentumnet.models,
    ]
    with swapped(modules, MomentumNet=MomentumNet):
        yield
