"""FrEIA's ``SequenceINN``, trained block by block through its inverses.

FrEIA (0.2) builds normalizing flows as a chain of invertible modules (``AllInOneBlock``,
``GLOWCouplingBlock``, ``RNVPCouplingBlock``, ``ActNorm``, permutations, ...), each
returning its output and ``log|det J|``. Its ``SequenceINN`` stores every activation, so
memory grows with depth; inverting block by block instead (the request of FrEIA's issue #36,
open since 2020) is what revtree does with [`Invertible`][revtree.Invertible] steps: each
block is undone by its own inverse in backward and run again with autograd on, and its
log-determinant leaves the sequence as a side output, summed over blocks, whose gradient
flows back into the block's recomputation. Nothing of it lives in the core.

The class takes FrEIA's arguments, appends FrEIA's modules, indexes and iterates them, and
names their parameters as FrEIA does (``module_list.{i}.*``): state dicts load both ways.
``forward(x, c=None, rev=False, jac=True)`` returns ``(z, log_jac_det)`` as FrEIA's does;
the inverse direction (``rev=True``, sampling) runs FrEIA's own loop. A module's
data-dependent initialisation (``ActNorm``) runs on the first batch, as in FrEIA.

Blocks whose inverse is exact up to rounding give gradients exact up to rounding. Two
FrEIA blocks are not: ``AllInOneBlock(permute_soft=True)`` rounds its soft permutation
through float32, and ``IResNetLayer`` inverts by a fixed-point iteration; a reversible
engine rebuilds their inputs that far off (``check_drift=`` tells how far).

Examples:
    >>> import torch
    >>> from torch import nn
    >>> import FrEIA.modules as Fm
    >>> from revtree.adapters.freia import SequenceINN
    >>> def subnet(c_in, c_out):
    ...     return nn.Sequential(nn.Linear(c_in, 16), nn.ReLU(), nn.Linear(16, c_out))
    >>> flow = SequenceINN(4)
    >>> for _ in range(3):
    ...     flow.append(Fm.AllInOneBlock, subnet_constructor=subnet)
    >>> z, log_jac_det = flow(torch.randn(8, 4))
    >>> z.shape, log_jac_det.shape
    (torch.Size([8, 4]), torch.Size([8]))
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .._block import Invertible
from .._sequence import ReversibleSequence
from ..codecs import Whole
from ._built import built
from ._patching import constructed_as, swapped
from ._versions import require

TESTED = "0.2"

require("FrEIA", TESTED, "freia")

from FrEIA.modules import InvertibleModule  # noqa: E402


class _Step(nn.Module):
    """One FrEIA module as a revtree step: its forward and its inverse on one tensor."""

    def __init__(self, module: nn.Module, condition: int | None) -> None:
        super().__init__()
        self.module = module
        self.condition = condition

    def _call(self, x: torch.Tensor, c: Any, rev: bool) -> tuple[torch.Tensor, Any]:
        if self.condition is None:
            out, jac = self.module((x,), rev=rev, jac=True)
        else:
            out, jac = self.module((x,), c=[c[self.condition]], rev=rev, jac=True)
        return out[0], jac

    def forward(self, x: torch.Tensor, c: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        y, jac = self._call(x, c, rev=False)
        if not isinstance(jac, torch.Tensor):  # a permutation's 0.0
            jac = torch.zeros((), dtype=y.dtype, device=y.device)
        return y, jac

    def inverse(self, y: torch.Tensor, c: Any = None) -> torch.Tensor:
        return self._call(y, c, rev=True)[0]


class SequenceINN(InvertibleModule):
    """``FrEIA.framework.SequenceINN``, on the revtree engine.

    Args:
        *dims: The input's shape, without the batch dimension.
        force_tuple_output: Return ``((z,), log_jac_det)``, as FrEIA's does.
    """

    def __init__(self, *dims: int, force_tuple_output: bool = False) -> None:
        super().__init__([dims])
        self.shapes = [tuple(dims)]
        self.conditions: list[int | None] = []
        self.module_list = nn.ModuleList()
        self.force_tuple_output = force_tuple_output

    def append(
        self, module_class: type, cond: int | None = None, cond_shape: Any = None, **kwargs: Any
    ) -> None:
        """Append a block of ``FrEIA.modules``, built with ``kwargs``, as FrEIA's does.

        Args:
            module_class: A class of ``FrEIA.modules``.
            cond: The index of the condition it takes, in the list ``forward`` is given.
            cond_shape: That condition's shape.
            **kwargs: For ``module_class``'s constructor.
        """
        dims_in = [self.shapes[-1]]
        self.conditions.append(cond)
        if cond is not None:
            kwargs["dims_c"] = [cond_shape]
        module = module_class(dims_in, **kwargs)
        self.module_list.append(module)
        dims_out = module.output_dims(dims_in)
        if len(dims_out) != 1:
            raise ValueError(f"{module_class.__name__} has more than one output")
        self.shapes.append(dims_out[0])

    def __getitem__(self, item: Any) -> Any:
        return self.module_list.__getitem__(item)

    def __len__(self) -> int:
        return self.module_list.__len__()

    def __iter__(self) -> Iterator[nn.Module]:
        return self.module_list.__iter__()

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:  # noqa: D102
        if not self.force_tuple_output:
            raise ValueError(
                "You can only call output_dims on a SequentialINN when setting "
                "force_tuple_output=True."
            )
        return input_dims

    @property
    def sequence(self) -> ReversibleSequence:
        """The sequence that runs the blocks as they are now."""
        modules = list(self.module_list)
        conditions = tuple(self.conditions)
        return built(self, (*modules, conditions), lambda: self._build(modules))

    def _build(self, modules: list[nn.Module]) -> ReversibleSequence:
        steps = [
            Invertible(_Step(m, cond), side=True, kwargs=cond is not None)
            for m, cond in zip(modules, self.conditions)
        ]
        return ReversibleSequence(steps, codec=Whole())

    def forward(
        self,
        x_or_z: torch.Tensor | Iterable[torch.Tensor],
        c: Iterable[torch.Tensor] | None = None,
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[Any, Any]:
        """The flow forward (``rev=False``) or inverted; returns ``(out, log_jac_det)``.

        Args:
            x_or_z: The input tensor (or a tuple of one).
            c: The list of conditions.
            rev: Invert the flow (FrEIA's own loop, plain autograd).
            jac: Accepted as FrEIA takes it; the log-determinant is returned either way.
        """
        x = x_or_z if isinstance(x_or_z, torch.Tensor) else tuple(x_or_z)[0]
        if rev or not len(self.module_list):
            return self._plain(x, c, rev, jac)
        kwargs = {"c": list(c)} if c is not None else {}
        z, log_jac_det = self.sequence(x, **kwargs)
        return ((z,) if self.force_tuple_output else z), log_jac_det

    def _plain(self, x: torch.Tensor, c: Any, rev: bool, jac: bool) -> tuple[Any, Any]:
        """FrEIA's own loop over the blocks."""
        out: Any = (x,)
        log_jac_det: Any = 0
        order = range(len(self.module_list))
        for i in reversed(order) if rev else order:
            module, cond = self.module_list[i], self.conditions[i]
            if cond is None:
                out, j = module(out, jac=jac, rev=rev)
            else:
                out, j = module(out, c=[c[cond]], jac=jac, rev=rev)
            log_jac_det = j + log_jac_det
        return (out if self.force_tuple_output else out[0]), log_jac_det


@contextmanager
def patch() -> Iterator[None]:
    """Make every ``FrEIA.framework.SequenceINN`` built inside the context this one.

    Examples:
        >>> import FrEIA.framework as Ff
        >>> with patch():
        ...     flow = Ff.SequenceINN(4)
        >>> type(flow).__module__
        'revtree.adapters.freia'
    """
    import FrEIA.framework as framework
    import FrEIA.framework.sequence_inn as sequence_inn

    with (
        constructed_as(sequence_inn.SequenceINN, SequenceINN),
        swapped([framework, sequence_inn], SequenceINN=SequenceINN),
    ):
        yield
