"""The random generators a block draws from: captured before each call, replayed in its recompute.

Dropout in a recomputed block must draw the masks it drew in the forward pass. As in
``torch.utils.checkpoint``, the default generator of the CPU and of every accelerator device
that holds one of the call's tensors is captured before each call of ``f`` and ``g``, and
set again for its recomputation. A call that drew nothing keeps no state at all (its
recomputation draws nothing either): a stack without dropout holds none. Device types are
found from the tensors and their generators asked of ``torch.get_device_module``: CUDA,
XPU, MPS or any other accelerator alike.

A recomputation holds the process-wide generators only for its own duration: they are set
to the forward call's state before it and put back right after, so backward leaves the
random stream where plain autograd leaves it. Nothing is ever reseeded. Threads share the
generators: every recorded call (its capture and its draws) and every recomputation that
sets them hold one process-wide lock, ``LOCK``, so that two threads training reversible
models never draw from each other's replayed state (a thread drawing outside revtree is
not held back by it, as it is not by ``torch.utils.checkpoint``).

A generator that ``f`` creates or holds itself (``torch.Generator()`` passed to
``torch.rand``) is not among these and is not replayed; nor is Python's ``random``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import torch

from .._torch import contents

State = tuple[torch.Tensor, ...]

LOCK = threading.RLock()  # held around recorded calls and recomputations that set the state


class _ModuleGenerator:
    """A device's default generator, through its module, where the module lists none."""

    __slots__ = ("device", "module")

    def __init__(self, module: Any, device: torch.device) -> None:
        self.module, self.device = module, device

    def get_state(self) -> torch.Tensor:
        return self.module.get_rng_state(self.device)

    def set_state(self, state: torch.Tensor) -> None:
        self.module.set_rng_state(state, self.device)

    def manual_seed(self, seed: int) -> None:
        with self.module.device(self.device):
            self.module.manual_seed(seed)


def _default_generator(device: torch.device) -> Any:
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    defaults = getattr(module, "default_generators", None)
    if defaults:
        return defaults[index]
    return _ModuleGenerator(module, torch.device(device.type, index))


class Generators:
    """The default generators of the CPU and of some accelerator devices, captured and set as one.

    Examples:
        >>> import torch
        >>> from revtree._replay._rng import Generators
        >>> generators = Generators(())
        >>> state = generators.capture()
        >>> a = torch.rand(2)
        >>> generators.set(state)
        >>> torch.equal(torch.rand(2), a)
        True
    """

    __slots__ = ("devices", "generators")

    def __init__(self, devices: tuple[torch.device, ...]) -> None:
        self.devices = devices
        self.generators = [torch.default_generator, *map(_default_generator, devices)]

    def capture(self) -> State:
        """The state of every generator."""
        generators = self.generators
        if len(generators) == 1:
            return (generators[0].get_state(),)
        return tuple([g.get_state() for g in generators])

    def set(self, state: State) -> None:
        """Set every generator to ``state``."""
        for generator, s in zip(self.generators, state):
            generator.set_state(s)

    def seed(self, seed: int) -> None:
        """Seed every generator (not ``torch.manual_seed``, which queues CUDA's reseeding)."""
        for generator in self.generators:
            generator.manual_seed(seed)


def same(a: State, b: State) -> bool:
    """Whether two captured states are equal."""
    return a is b or list(map(contents, a)) == list(map(contents, b))


class Tracker:
    """The forward pass's view of the generators: a state per call that draws, none otherwise.

    ``before(record)`` captures the state a call starts from and, since nothing else draws
    between two calls of one pass, settles the previous call: if the generators did not
    move during it, it drew nothing, and its record keeps no state. ``flush`` settles the
    last call.
    """

    __slots__ = ("generators", "last", "last_contents", "pending")

    def __init__(self, generators: Generators) -> None:
        self.generators = generators
        self.last: State | None = None
        self.last_contents: list[bytes] = []
        self.pending: Any = None  # the record of the last call, not settled yet

    def before(self, record: Any) -> None:
        state = self.generators.capture()
        now = list(map(contents, state))
        if now == self.last_contents:
            assert self.last is not None
            state = self.last  # nothing drew since: one state, held once
            if self.pending is not None:
                self.pending.rng = None  # the last call drew nothing: nothing to replay
        self.last, self.last_contents = state, now
        record.rng = state
        self.pending = record

    def flush(self) -> None:
        pending = self.pending
        if pending is not None:
            if list(map(contents, self.generators.capture())) == self.last_contents:
                pending.rng = None
            self.pending = None


_cache: dict[tuple[torch.device, ...], Generators] = {}


def generators_for(tensors: Iterable[torch.Tensor]) -> Generators:
    """The generators of the CPU and of the accelerator devices holding any of ``tensors``."""
    devices = tuple(sorted({t.device for t in tensors if t.device.type not in _HOSTS}, key=str))
    generators = _cache.get(devices)
    if generators is None:
        generators = _cache[devices] = Generators(devices)
    return generators


_HOSTS = frozenset({"cpu", "meta"})


class preserved:  # noqa: N801 (a context manager, like contextlib's)
    """Put ``generators`` back, on exit, in the state they had on entry."""

    __slots__ = ("generators", "state")

    def __init__(self, generators: Generators) -> None:
        self.generators = generators

    def __enter__(self) -> None:
        self.state = self.generators.capture()

    def __exit__(self, *exc: Any) -> None:
        self.generators.set(self.state)


def every_generator() -> Generators:
    """The generators of the CPU and of every device of the accelerator in use.

    Unlike the engine, which knows the devices its tensors live on, a check cannot tell
    which devices a model draws from, so it takes all. An accelerator not yet initialised
    is left alone (touching it would initialise it).
    """
    accelerator = getattr(torch, "accelerator", None)
    current = accelerator.current_accelerator() if accelerator is not None else None
    if current is None or current.type in _HOSTS:
        return generators_for(())
    module = torch.get_device_module(current.type)
    if hasattr(module, "is_initialized") and not module.is_initialized():
        return generators_for(())
    count = module.device_count()
    devices = tuple(torch.device(current.type, i) for i in range(count))
    generators = _cache.get(devices)
    if generators is None:
        generators = _cache[devices] = Generators(devices)
    return generators


class PerModule:
    """The random state at each submodule call inside one call: recorded, then replayed.

    An invertible module's inverse may call its submodules in another order than its
    forward (a coupling block's two subnets): the state of the whole call does not tell
    which draws each submodule made. So its forward call records, at each submodule call,
    the state it starts from (``(module, k)`` for its ``k``-th call); its inverse and its
    recomputation set it again there. A call that drew nothing keeps nothing.
    """

    __slots__ = ("counts", "generators", "last", "states", "thread")

    def __init__(
        self, generators: Generators, states: dict[tuple[int, int], State] | None = None
    ) -> None:
        self.generators = generators
        self.states: dict[tuple[int, int], State] = {} if states is None else states
        self.counts: dict[int, int] = {}
        self.last: tuple[State, list[bytes]] | None = None
        self.thread = threading.get_ident()

    def record(self, module: Any, args: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        k = self.counts.get(id(module), 0)
        self.counts[id(module)] = k + 1
        state = self.generators.capture()
        now = list(map(contents, state))
        if self.last is not None and self.last[1] == now:
            state = self.last[0]  # nothing drew since: held once
        self.last = (state, now)
        self.states[id(module), k] = state

    def replay(self, module: Any, args: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        k = self.counts.get(id(module), 0)
        self.counts[id(module)] = k + 1
        state = self.states.get((id(module), k))
        if state is not None:
            self.generators.set(state)

    def kept(self) -> dict[tuple[int, int], State] | None:
        """What the recording kept: nothing if every submodule started from one state."""
        if len({id(s) for s in self.states.values()}) <= 1:
            return None
        return self.states


class around_submodules:  # noqa: N801 (a context manager, like contextlib's)
    """Run ``hook`` before every module call made inside the context (this thread's)."""

    __slots__ = ("handle", "hook")

    def __init__(self, hook: Any) -> None:
        self.hook = hook

    def __enter__(self) -> None:
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self.hook)

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()
