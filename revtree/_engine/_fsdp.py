"""FSDP units inside a sequence: a ``Block``, or modules inside ``f`` and ``g``, sharded apart.

``fully_shard`` (FSDP2) gathers a unit's parameters in a forward pre-hook and frees them in
a forward post-hook; in backward it gathers them again before the unit's gradients are
computed and reduce-scatters those gradients when they reach the unit's inputs. The engine
lets those hooks do their work: it calls a ``Block`` that is a unit through its own
``__call__`` (forward, and again around its reverse step), never puts aliases into the
slots of a unit's parameters (the unit puts its gathered parameters there itself), and
back-propagates a recomputation into whatever leaves it reaches, so that the gathered
parameters accumulate their gradients where FSDP reduce-scatters them from. A block's
parameters are gathered for its forward, again for its reverse step, and freed after it,
block after block.

FSDP1 (``FullyShardedDataParallel``) units inside a block are not supported: its flat
parameters live outside the modules' slots. Wrapping the whole sequence (or a model around
it) is fine with either.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from .._errors import RevtreeError


@cache
def _kinds() -> tuple[type, ...]:
    """The FSDP2 unit type (``FSDPModule``) and FSDP1's wrapper, where this torch has them."""
    kinds: list[type] = []
    try:
        from torch.distributed.fsdp import FSDPModule

        kinds.append(FSDPModule)
    except ImportError:  # torch < 2.6
        try:
            from torch.distributed._composable.fsdp import FSDPModule

            kinds.append(FSDPModule)
        except ImportError:
            kinds.append(_Never)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        kinds.append(FullyShardedDataParallel)
    except ImportError:
        kinds.append(_Never)
    return tuple(kinds)


class _Never:
    """A type nothing is an instance of (FSDP missing from this torch)."""


def is_unit(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP2 unit (its own ``fully_shard``). FSDP1 wrappers raise."""
    unit, legacy = _kinds()
    if isinstance(module, legacy):
        raise RevtreeError(
            f"{type(module).__name__} (FSDP1) wraps a module inside a reversible block: its "
            "flat parameters live outside the modules, where the recomputation cannot find "
            "them. Hint: shard the blocks with torch.distributed.fsdp.fully_shard (FSDP2), "
            "or wrap the whole ReversibleSequence (or the model around it) instead."
        )
    return isinstance(module, unit) and bool(module._forward_pre_hooks)


def anchor(device: torch.device) -> torch.Tensor:
    """A tensor that needs a gradient, passed through a unit's call to carry its post-backward.

    A unit reduce-scatters its gradients when back-propagation reaches its inputs; a
    block's reverse step gives it none, so the engine hands it this one and, once the step
    is done, back-propagates into it (``release``).
    """
    return torch.zeros((), device=device, requires_grad=True)


def release(carried: torch.Tensor, source: torch.Tensor) -> None:
    """Back-propagate from the unit's copy of the anchor to the anchor: its gradients go out."""
    if carried is not source and carried.grad_fn is not None:
        torch.autograd.backward([carried], [torch.zeros_like(carried)], inputs=[source])
