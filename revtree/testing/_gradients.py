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

from .. import _rng, _trees
from .._sequence import ReversibleSequence


@dataclass
class GradientReport:
    """Relative gradient differences, reversible vs plain autograd, for every source.

    Attributes:
        differences: For each source (an input leaf ``x[...]``, a keyword tensor
            ``kwargs[...]`` or a parameter name), ``max|reversible - plain| / max|plain|``.
        worst: The largest of them.
        where: The source with the worst difference.

    Example:
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

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import revtree
        >>> from revtree.testing import compare_gradients
        >>> seq = revtree.ReversibleSequence([(nn.Linear(2, 2), nn.Linear(2, 2))] * 4).double()
        >>> report = compare_gradients(seq, torch.randn(3, 4, dtype=torch.float64))
        >>> report.worst < 1e-10
        True
    """
    sources: dict[str, torch.Tensor] = {}
    paths, names, leaves, _ = _trees.flatten_with_names(x, seq.namespace)
    sources.update({n: t for n, t in zip(names, leaves) if _needs_grad(t)})
    kw_paths, kw_leaves, _ = optree.tree_flatten_with_path(kwargs, namespace=seq.namespace)
    sources.update(
        {f"kwargs{_format(p)}": t for p, t in zip(kw_paths, kw_leaves) if _needs_grad(t)}
    )
    sources.update({n: p for n, p in seq.named_parameters() if p.requires_grad})

    saved = seq.reversible
    devices = rng_devices()
    grads = {}
    try:
        for reversible in (True, False):
            seq.reversible = reversible
            with isolated(seq, devices):
                _seed(seed, devices)
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


def _seed(seed: int, devices: tuple[int, ...]) -> None:
    # not torch.manual_seed: it reseeds every CUDA device too, or, before CUDA starts,
    # queues that reseeding for when it does; neither would be undone
    torch.default_generator.manual_seed(seed)
    for device in devices:
        torch.cuda.default_generators[device].manual_seed(seed)


def rng_devices() -> tuple[int, ...]:
    """The CUDA devices whose generators a check must fork: all, once CUDA is initialised.

    As in ``revtree._rng``, an uninitialised CUDA is left alone (touching it would
    initialise it); unlike the engine, which knows the devices its tensors live on, a
    check cannot tell which devices the model draws from, so it takes every one.
    """
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return ()
    return tuple(range(torch.cuda.device_count()))


@contextmanager
def isolated(module: nn.Module, devices: tuple[int, ...]) -> Iterator[None]:
    """Restore, on exit, the buffers of ``module`` and the CPU and ``devices``' generators."""
    with _rng.preserved(devices), kept_buffers(module):
        yield


_MISSING = object()


@contextmanager
def kept_buffers(module: nn.Module) -> Iterator[None]:
    """Put the buffers of ``module`` and of its submodules back as they were, on exit.

    A run in training mode updates buffers in place (batch norm's running statistics) or
    by assignment (``self.count = self.count + 1``, which leaves a new tensor in the
    module's slot): each slot gets its own tensor object back, with its own values, and a
    buffer registered during the run is removed. Unchanged buffers are not written to.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from revtree.testing._gradients import kept_buffers
        >>> bn = nn.BatchNorm1d(2)
        >>> with kept_buffers(bn):
        ...     _ = bn(torch.randn(4, 2))
        >>> bn.num_batches_tracked.item(), bn.running_mean.tolist()
        (0, [0.0, 0.0])
    """
    saved = [
        (
            m,
            dict(m._buffers),
            set(m._non_persistent_buffers_set),
            {
                name: b.clone()
                for name, b in m._buffers.items()
                if b is not None and not b.is_inference()  # these cannot change in place
            },
        )
        for m in module.modules()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, slots, non_persistent, values in saved:
                for name in [name for name in m._buffers if name not in slots]:
                    del m._buffers[name]
                for name, buffer in slots.items():
                    if m._buffers.get(name, _MISSING) is not buffer:
                        m._buffers[name] = buffer
                    value = values.get(name)
                    if value is not None and not torch.equal(buffer, value):
                        buffer.copy_(value)
                m._non_persistent_buffers_set.clear()
                m._non_persistent_buffers_set.update(non_persistent)
