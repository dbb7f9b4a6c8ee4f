"""Reversible against plain-autograd gradients, leaf by leaf, with the worst one named.

Also what every check runs inside, ``isolated``: it leaves the model's buffers and the
random generators as the caller had them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import optree
import torch
from torch import nn

from .. import _trees
from .._replay import _buffers, _rng
from .._sequence import ReversibleSequence


@dataclass
class GradientReport:
    """Relative gradient differences, reversible vs plain autograd, for every source.

    Attributes:
        differences: For each source (an input leaf ``x[...]``, a keyword tensor
            ``kwargs[...]`` or a parameter name), ``max|reversible - plain| / max|plain|``.
        worst: The largest of them.
        where: The source with the worst difference.

    Examples:
        >>> from revtree.testing import GradientReport
        >>> report = GradientReport({"x['a']": 1e-16, "blocks.0.f.weight": 3e-4})
        >>> report.where, f"{report.worst:.0e}"
        ('blocks.0.f.weight', '3e-04')
    """

    differences: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        """The largest relative difference (0 when there is nothing to compare)."""
        return max(self.differences.values(), default=0.0)

    @property
    def where(self) -> str | None:
        """The name of the source with the largest difference."""
        if not self.differences:
            return None
        return max(self.differences, key=self.differences.__getitem__)

    def __str__(self) -> str:
        return (
            f"worst relative gradient difference {self.worst:.3e} at {self.where} "
            f"({len(self.differences)} sources compared)"
        )


def _default_loss(y: Any) -> torch.Tensor:
    """A loss that weighs every output entry differently, so no gradient is uniform."""
    g = torch.Generator().manual_seed(0)
    total = torch.zeros(())
    for leaf in optree.tree_leaves(y):
        w = torch.randn(leaf.shape, generator=g, dtype=torch.float64).to(leaf)
        total = total + (w * leaf).sum()
    return total


def compare_gradients(
    seq: ReversibleSequence,
    x: Any,
    /,
    loss: Callable[[Any], torch.Tensor] = _default_loss,
    *,
    seed: int = 0,
    **kwargs: Any,
) -> GradientReport:
    """Run ``seq`` reversibly and with plain autograd; compare every gradient leaf by leaf.

    Both runs start from the same random seed and the same buffers, so dropout draws the
    same masks and batch norm starts from the same statistics. The check leaves no trace:
    the model's buffers and the CPU and CUDA generators end as they were, and no ``.grad``
    is written (gradients are taken with ``torch.autograd.grad``).

    Args:
        seq: The sequence to check; its ``reversible`` setting is restored afterwards.
        x: An input pytree.
        loss: Maps the output to a scalar; by default a fixed random weighting.
        seed: The random seed both runs start from.
        **kwargs: Keyword arguments for ``seq``; their tensors that require grad are compared.

    Returns:
        A [`GradientReport`][revtree.testing.GradientReport].

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import revtree
        >>> from revtree.testing import compare_gradients
        >>> seq = revtree.ReversibleSequence.from_factory(lambda: nn.Linear(2, 2), 4).double()
        >>> report = compare_gradients(seq, torch.randn(3, 4, dtype=torch.float64))
        >>> report.worst < 1e-10
        True
    """
    sources: dict[str, torch.Tensor] = {}
    paths, names, leaves, _ = _trees.flatten_with_names(x, seq.namespace)
    sources.update({n: t for n, t in zip(names, leaves) if _needs_grad(t)})
    kw_paths, kw_leaves, _ = optree.tree_flatten_with_path(kwargs, namespace=seq.namespace)  # type: ignore[var-annotated,arg-type]
    sources.update(
        {f"kwargs{_format(p)}": t for p, t in zip(kw_paths, kw_leaves) if _needs_grad(t)}
    )
    sources.update({n: p for n, p in seq.named_parameters() if p.requires_grad})

    saved = seq.reversible
    generators = _rng.every_generator()
    grads = {}
    try:
        for reversible in (True, False):
            seq.reversible = reversible
            with isolated(seq, generators):
                _seed(seed, generators)
                value = loss(seq(x, **kwargs))
                grads[reversible] = torch.autograd.grad(
                    value, list(sources.values()), allow_unused=True, retain_graph=True
                )
    finally:
        seq.reversible = saved

    report = GradientReport()
    for name, a, b in zip(sources, grads[True], grads[False]):
        if a is None or b is None:
            report.differences[name] = 0.0 if a is None and b is None else float("inf")
            continue
        scale = b.abs().max().item() if b.numel() else 0.0
        diff = (a - b).abs().max().item() if b.numel() else 0.0
        report.differences[name] = diff / scale if scale > 0 else diff
    return report


def _needs_grad(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


def _format(path: tuple[Any, ...]) -> str:
    return "".join(f"[{key!r}]" for key in path)


def _seed(seed: int, generators: _rng.Generators) -> None:
    # not torch.manual_seed: it reseeds every CUDA device too, or, before CUDA starts,
    # queues that reseeding for when it does; neither would be undone
    generators.seed(seed)


@contextmanager
def isolated(module: nn.Module, generators: _rng.Generators) -> Iterator[None]:
    """Leave the buffers of ``module`` and the ``generators`` as they were, on exit."""
    with _rng.preserved(generators), _buffers.kept(module):
        yield
