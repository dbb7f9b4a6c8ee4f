"""The drift guard: how far a block's rebuilt inputs stray from the forward's, cheaply.

With ``check_drift`` set, the forward pass keeps, for every input tensor of every block, a
small summary: at most 64 evenly strided entries, and sums over the whole tensor cut in at
most 4096 chunks (plain and with alternating signs, in float64). Backward compares the
rebuilt inputs with it and warns past the threshold, naming the block and the leaf. The
strided entries give the error exactly where they fall; the chunk sums see a drift anywhere
in the tensor (one entry off by ``d`` moves its chunk's sum by ``d``), at the price of the
rounding of a chunk's entries adding up (a few times the float32 epsilon for chunks of a
few hundred entries). The summary is a few hundred bytes to 64 kB a tensor.

An error is measured against the size of the input leaf the tensor came from, the largest
entry over all its pieces: a piece can be exactly zero (the velocity of
[`ZeroVelocity`][revtree.codecs.ZeroVelocity] at block 0), and a rounding error in it
matters as much as one of that size in its partner.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ._checks import caller_level
from ._errors import RevtreeError, RevtreeWarning

SAMPLE = 64
CHUNKS = 4096


class Summary:
    """What the drift guard keeps of one tensor (see the module's docstring)."""

    __slots__ = ("amax", "chunk", "signed", "strided", "sums")

    def __init__(self, t: torch.Tensor) -> None:
        flat = t.detach().reshape(-1)
        stride = max(1, flat.numel() // SAMPLE)
        self.strided = flat[::stride][:SAMPLE].clone()
        self.chunk = max(1, -(-flat.numel() // CHUNKS))
        self.sums, self.signed = _chunk_sums(flat, self.chunk)
        finite = flat[torch.isfinite(flat)]
        self.amax = finite.abs().max().item() if finite.numel() else 0.0


def _chunk_sums(flat: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=flat.device)
        return empty, empty
    pad = (-n) % chunk
    x = flat.to(torch.float64)
    if pad:
        x = torch.cat((x, x.new_zeros(pad)))
    x = x.view(-1, chunk)
    signs = torch.ones(chunk, dtype=torch.float64, device=flat.device)
    signs[1::2] = -1
    return x.sum(1), (x * signs).sum(1)


def sample(tensors: Sequence[torch.Tensor]) -> list[Summary]:
    """The summary of each tensor."""
    return [Summary(t) for t in tensors]


def _error(rebuilt: torch.Tensor, summary: Summary) -> float:
    """The largest absolute error the summary sees (``inf`` for a NaN rebuilt from a number)."""
    flat = rebuilt.detach().reshape(-1)
    stride = max(1, flat.numel() // SAMPLE)
    a, b = flat[::stride][:SAMPLE], summary.strided
    keep = torch.isfinite(b)
    errors = [(a[keep] - b[keep]).abs()]
    sums, signed = _chunk_sums(flat, summary.chunk)
    for got, exact in ((sums, summary.sums), (signed, summary.signed)):
        keep = torch.isfinite(exact)
        errors.append((got[keep] - exact[keep]).abs())
    worst = 0.0
    for e in errors:
        if e.numel():
            value = e.max().item()
            if math.isnan(value):
                return math.inf
            worst = max(worst, value)
    return worst


def relative_errors(
    rebuilt: Sequence[torch.Tensor],
    exact: Sequence[torch.Tensor],
    owners: Sequence[int] | None = None,
) -> list[float]:
    """For each piece, ``max|rebuilt - exact|`` over the size of the input leaf it comes from.

    Entries where ``exact`` is not finite are left out (a forward that made a NaN or an
    infinity is not a reconstruction error); a NaN rebuilt from a finite value is.

    ``owners[k]`` is the input leaf of piece ``k``; by default the lists hold two streams'
    leaves, ``[*x1, *x2]``, and piece ``k`` comes from leaf ``k % n``. The size of an
    input leaf is the largest ``|exact|`` over all its pieces; a leaf that is zero in all
    is measured by its absolute error.

    Examples:
        >>> import torch
        >>> x1, x2 = torch.tensor([2.0, -4.0]), torch.zeros(2)  # a position, a velocity
        >>> relative_errors([x1, x2 + 0.5], [x1, x2])
        [0.0, 0.125]
    """
    if owners is None:
        n = len(exact) // 2
        owners = [k % n for k in range(len(exact))] if n else []
    diffs, sizes = [], []
    for a, b in zip(rebuilt, exact):
        a, b = a.detach(), b.detach()
        finite = torch.isfinite(b)
        if not bool(finite.all()):  # where the forward was not finite there is nothing to rebuild
            a, b = a[finite], b[finite]
        diffs.append(_largest(a - b))
        sizes.append(_largest(b))
    scale: dict[int, float] = {}
    for owner, size in zip(owners, sizes):
        scale[owner] = max(scale.get(owner, 0.0), size)
    return [diff / scale[owner] if scale[owner] > 0 else diff for owner, diff in zip(owners, diffs)]


def _largest(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def check(
    index: int,
    layout: Any,
    state: list[list[torch.Tensor]],
    samples: list[Summary],
    threshold: float,
    strict: bool = False,
) -> bool:
    """Warn if any rebuilt tensor differs from its forward summary by more than ``threshold``.

    Returns whether it warned: the blocks below inherit the error, so backward checks no
    further and the warning names the block where the drift starts. With ``strict``, raise
    a [`RevtreeError`][revtree.RevtreeError] instead.
    """
    owners = [(k, i) for k, members in enumerate(layout.members) for i in members]
    flat = [t for part in state for t in part]
    scale: dict[int, float] = {}
    for (_, i), summary in zip(owners, samples):
        scale[i] = max(scale.get(i, 0.0), summary.amax)
    worst, where = -1.0, None
    for (k, i), t, summary in zip(owners, flat, samples):
        error = _error(t, summary)
        error = error / scale[i] if scale[i] > 0 and math.isfinite(error) else error
        if math.isnan(error):
            error = math.inf
        if error > worst:
            worst, where = error, (k, i)
    if where is None or worst <= threshold:
        return False
    k, i = where
    what = f"relative error {worst:.2e}" if math.isfinite(worst) else "a NaN or infinite error"
    message = (
        f"block {index}: its input x{k + 1} at {layout.names[i]} was rebuilt in backward "
        f"with {what} (check_drift={threshold:g}), so its "
        "gradients are off by as much. Hint: find the ill-conditioned block with "
        "revtree.testing.reconstruction_errors; store it with reversible=[..., False, "
        "...], train in higher precision, or tame its outputs."
    )
    if strict:
        raise RevtreeError(message)
    warnings.warn(message, RevtreeWarning, stacklevel=caller_level())
    return True
