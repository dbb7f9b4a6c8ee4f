"""The drift guard: how far a block's rebuilt inputs stray from the forward's, cheaply.

With ``check_drift`` set, the forward pass keeps a strided sample of at most 64 entries of
every input leaf of every block (a few hundred bytes a block), and backward compares the
rebuilt inputs with it, warning past the threshold with the block and the leaf named.
"""

from __future__ import annotations

import warnings

import torch

from ._errors import RevtreeWarning

SAMPLE = 64


def sample(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """At most ``SAMPLE`` evenly strided entries of each leaf, copied."""
    out = []
    for t in leaves:
        flat = t.detach().reshape(-1)
        stride = max(1, flat.numel() // SAMPLE)
        out.append(flat[::stride][:SAMPLE].clone())
    return out


def check(
    index: int,
    names: tuple[str, ...],
    rebuilt: list[torch.Tensor],
    samples: list[torch.Tensor],
    threshold: float,
) -> bool:
    """Warn if any rebuilt leaf differs from its forward sample by more than ``threshold``.

    Returns whether it warned: the blocks below inherit the error, so backward checks no
    further and the warning names the block where the drift starts.
    """
    n = len(names)
    errors = []
    for now, then in zip(sample(rebuilt), samples):
        scale = then.abs().max().item() if then.numel() else 0.0
        diff = (now - then).abs().max().item() if then.numel() else 0.0
        errors.append(diff / max(scale, 1e-30))
    worst = max(range(len(errors)), key=errors.__getitem__, default=None)
    if worst is not None and errors[worst] > threshold:
        stream = 1 if worst < n else 2
        warnings.warn(
            f"block {index}: its input x{stream} at {names[worst % n]} was rebuilt in backward "
            f"with relative error {errors[worst]:.2e} (check_drift={threshold:g}), so its "
            "gradients are off by as much. Hint: find the ill-conditioned block with "
            "revtree.testing.reconstruction_errors; store it with reversible=[..., False, "
            "...], train in higher precision, or tame its outputs.",
            RevtreeWarning,
            stacklevel=2,
        )
        return True
    return False
