"""Capture and replay of the random number generators a block draws from.

Dropout in a recomputed block must draw the masks it drew in the forward pass.
As in ``torch.utils.checkpoint``, the state of the CPU generator and of every CUDA
device in use is captured before each call and set again for its recomputation;
the generators are restored afterwards, so that the global stream continues where
plain autograd leaves it. Nothing is ever reseeded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

RngState = tuple[torch.Tensor, tuple[torch.Tensor, ...]]


def cuda_devices(tensors: Iterable[torch.Tensor]) -> tuple[int, ...]:
    """The indices of the CUDA devices that hold any of ``tensors``."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return ()
    return tuple(sorted({t.get_device() for t in tensors if t.is_cuda}))


def capture(devices: tuple[int, ...]) -> RngState:
    """The current state of the CPU generator and of the given CUDA devices' generators."""
    return torch.get_rng_state(), tuple(torch.cuda.get_rng_state(d) for d in devices)


def _set(state: RngState, devices: tuple[int, ...]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, device_state in zip(devices, cuda):
        torch.cuda.set_rng_state(device_state, device)


@contextmanager
def preserved(devices: tuple[int, ...]) -> Iterator[None]:
    """Restore the generators on exit to the state they had on entry."""
    state = capture(devices)
    try:
        yield
    finally:
        _set(state, devices)


@contextmanager
def replayed(state: RngState | None, devices: tuple[int, ...]) -> Iterator[None]:
    """Set the generators to ``state`` (a no-op for ``None``) for the duration of the context.

    Must run inside [`preserved`][revtree._rng.preserved], which puts the
    caller's generator state back at the end.
    """
    if state is not None:
        _set(state, devices)
    yield


def replay_now(state: RngState | None, devices: tuple[int, ...]) -> None:
    """Set the generators to ``state`` (a no-op for ``None``); the caller restores them later."""
    if state is not None:
        _set(state, devices)
