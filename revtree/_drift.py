"""The drift guard: how far a block's rebuilt inputs stray from the forward's, cheaply.

With ``check_drift`` set, the forward pass keeps a strided sample of at most 64 entries of
every input leaf of every block (a few hundred bytes a block), and backward compares the
rebuilt inputs with it, warning past the threshold with the block and the leaf named.

An error is measured against the size of the input leaf the stream came from, the larger
of its two streams: a stream can be exactly zero (the velocity of
[`ZeroVelocity`][revtree.codecs.ZeroVelocity] at block 0), and a rounding error in it
matters as much as one of that size in its partner.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from ._errors import RevtreeError, RevtreeWarning

SAMPLE = 64


def sample(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """At most ``SAMPLE`` evenly strided entries of each leaf, copied."""
    out = []
    for t in leaves:
        flat = t.detach().reshape(-1)
        stride = max(1, flat.numel() // SAMPLE)
        out.append(flat[::stride][:SAMPLE].clone())
    return out


def relative_errors(rebuilt: Sequence[torch.Tensor], exact: Sequence[torch.Tensor]) -> list[float]:
    """For each stream leaf, ``max|rebuilt - exact|`` over the size of its input leaf.

    Entries where ``exact`` is not finite are left out (a forward that made a NaN or an
    infinity is not a reconstruction error); a NaN rebuilt from a finite value is.

    Both lists hold the two streams' leaves, ``[*x1, *x2]``. The size of input leaf ``i``
    is the largest ``|exact|`` in either of its streams, ``exact[i]`` and ``exact[i + n]``;
    a leaf that is zero in both is measured by its absolute error.

    Examples:
        >>> import torch
        >>> x1, x2 = torch.tensor([2.0, -4.0]), torch.zeros(2)  # a position, a velocity
        >>> relative_errors([x1, x2 + 0.5], [x1, x2])
        [0.0, 0.125]
    """
    n = len(exact) // 2
    diffs, sizes = [], []
    for a, b in zip(rebuilt, exact):
        a, b = a.detach(), b.detach()
        finite = torch.isfinite(b)
        if not bool(finite.all()):  # where the forward was not finite there is nothing to rebuild
            a, b = a[finite], b[finite]
        diffs.append(_largest(a - b))
        sizes.append(_largest(b))
    errors = []
    for i, diff in enumerate(diffs):
        scale = max(sizes[i % n], sizes[i % n + n])
        errors.append(diff / scale if scale > 0 else diff)
    return errors


def _largest(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def check(
    index: int,
    names: tuple[str, ...],
    rebuilt: list[torch.Tensor],
    samples: list[torch.Tensor],
    threshold: float,
    strict: bool = False,
) -> bool:
    """Warn if any rebuilt leaf differs from its forward sample by more than ``threshold``.

    Returns whether it warned: the blocks below inherit the error, so backward checks no
    further and the warning names the block where the drift starts. With ``strict``, raise
    a [`RevtreeError`][revtree.RevtreeError] instead.
    """
    n = len(names)
    # a NaN or an infinity rebuilt from a finite forward value is the worst drift there is;
    # NaN compares false with everything, so it is made infinite to rank first
    errors = [
        e if math.isfinite(e) else math.inf for e in relative_errors(sample(rebuilt), samples)
    ]
    worst = max(range(len(errors)), key=errors.__getitem__, default=None)
    if worst is not None and errors[worst] > threshold:
        stream = 1 if worst < n else 2
        error = (
            f"relative error {errors[worst]:.2e}"
            if math.isfinite(errors[worst])
            else "a NaN or infinite error"
        )
        message = (
            f"block {index}: its input x{stream} at {names[worst % n]} was rebuilt in backward "
            f"with {error} (check_drift={threshold:g}), so its "
            "gradients are off by as much. Hint: find the ill-conditioned block with "
            "revtree.testing.reconstruction_errors; store it with reversible=[..., False, "
            "...], train in higher precision, or tame its outputs."
        )
        if strict:
            raise RevtreeError(message)
        warnings.warn(message, RevtreeWarning, stacklevel=2)
        return True
    return False
