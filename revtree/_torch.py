"""Every private torch API revtree uses, behind one named function each.

A torch upgrade is this file to read. Where torch has a public way, it is the fallback;
where a private attribute is missing in some release, the function says what it assumes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from itertools import chain, repeat
from operator import attrgetter
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

# ----------------------------------------------------------------------------- tensors


_VERSION = attrgetter("_version")


def version(t: torch.Tensor) -> int:
    """The version counter of ``t`` (``-1`` for an inference tensor, which has none)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def versions(tensors: Sequence[torch.Tensor]) -> list[int]:
    """The version counters of ``tensors`` (``-1`` for inference tensors)."""
    try:
        return list(map(_VERSION, tensors))
    except RuntimeError:
        return [version(t) for t in tensors]


def contents(t: torch.Tensor) -> bytes:
    """The bytes of a small contiguous CPU tensor (a generator's state), copied in one go.

    ``torch.equal`` costs several microseconds of dispatch; comparing these is a memcmp.
    """
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


TENSOR_HOOKS = attrgetter("_backward_hooks")
"""A tensor's own hooks (``register_hook``), or ``None``."""


def has_tensor_hooks(t: torch.Tensor) -> bool:
    """Whether ``t`` carries hooks of its own (``register_hook``)."""
    return bool(t._backward_hooks)


def any_post_accumulate_hooks(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` carries post-accumulate-grad hooks (an optimizer in backward)."""
    return any(map(getattr, tensors, repeat("_post_accumulate_grad_hooks"), repeat(None)))


def sequence_number(node: Any) -> int:
    """The creation order of an autograd node (per thread, increasing)."""
    return node._sequence_nr()


def next_sequence_number() -> int:
    """A sequence number no node created before this call has (the next one to be given)."""
    with torch.enable_grad():
        probe = torch.zeros((), requires_grad=True).view(())
    return sequence_number(probe.grad_fn) + 1


# ----------------------------------------------------------------------------- modules


def parameter_slots(m: nn.Module) -> dict[str, Any]:
    """The dict a module keeps its parameters in (written directly to swap tensors in)."""
    return m._parameters


def buffer_slots(m: nn.Module) -> dict[str, Any]:
    """The dict a module keeps its buffers in."""
    return m._buffers


def children(m: nn.Module) -> dict[str, Any]:
    """The dict a module keeps its submodules in."""
    return m._modules


def non_persistent_buffers(m: nn.Module) -> set[str]:
    """The names of a module's buffers that its state dict leaves out."""
    return m._non_persistent_buffers_set


_HOOK_DICTS = attrgetter(
    "_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"
)


def hooks_count(modules: Iterable[nn.Module]) -> int:
    """How many forward and backward hooks ``modules`` carry, all told."""
    return sum(map(len, chain.from_iterable(map(_HOOK_DICTS, modules))))


def forward_hooks(m: nn.Module) -> bool:
    """Whether ``m`` carries forward hooks or forward pre-hooks."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


def has_module_hooks(m: nn.Module) -> bool:
    """Whether ``m`` itself carries forward or backward hooks."""
    return bool(
        m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks
    )


def modes_active() -> bool:
    """Whether a ``TorchFunctionMode`` or ``TorchDispatchMode`` is in force (a flop counter)."""
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return bool(_get_current_function_mode_stack() or _get_current_dispatch_mode_stack())


def has_global_module_hooks() -> bool:
    """Whether hooks on every module are registered (a profiler's module tracker)."""
    return bool(
        _module._global_forward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_backward_pre_hooks
        or _module._global_backward_hooks
    )


def on_registration(hook: Any, kind: str) -> None:
    """Call ``hook(module, name, value)`` whenever any module registers a ``kind``.

    ``kind`` is ``"module"``, ``"parameter"`` or ``"buffer"`` (public since torch 2.0).
    """
    register = getattr(_module, f"register_module_{kind}_registration_hook")
    register(hook)


class parametrizations_uncached:  # noqa: N801 (a context manager, like contextlib's)
    """Inside, parametrized tensors are computed at each access, even under ``cached()``.

    ``torch.nn.utils.parametrize.cached()`` keeps the first value computed; computed in a
    forward pass under ``no_grad`` it carries no graph, and a recomputation reading it
    would give the originals no gradient. Reusable and reentrant.
    """

    __slots__ = ("entered",)

    def __init__(self) -> None:
        self.entered: list[int] = []

    def __enter__(self) -> None:
        self.entered.append(parametrize._cache_enabled)
        parametrize._cache_enabled = 0

    def __exit__(self, *exc: Any) -> None:
        parametrize._cache_enabled = self.entered.pop()


class forward_as_recomputed:  # noqa: N801 (a context manager, like contextlib's)
    """What a recorded forward call runs inside, so that it computes what its recomputation will.

    The forward call runs without autograd, its recomputation with: code that branches on
    that must take the same branch. torch's own multi-head attention takes a fast path
    without autograd (in eval mode), with another result where a padding mask is given: it
    is switched off inside.
    """

    __slots__ = ("mha",)

    def __init__(self) -> None:
        self.mha: list[bool] = []

    def __enter__(self) -> None:
        mha = torch.backends.mha
        self.mha.append(mha.get_fastpath_enabled())
        mha.set_fastpath_enabled(False)

    def __exit__(self, *exc: Any) -> None:
        torch.backends.mha.set_fastpath_enabled(self.mha.pop())


def parametrizations_cached() -> bool:
    """Whether ``torch.nn.utils.parametrize.cached()`` is in force."""
    return bool(parametrize._cache_enabled)


# ---------------------------------------------------------------------------- autograd


set_grad_enabled = torch._C._set_grad_enabled
"""Set grad mode without a context object (the engine's hot path)."""


def apply_function(cls: type) -> Any:
    """``cls.apply`` of an autograd Function, without its Python wrapper.

    The wrapper unwraps ``torch.func``'s dead wrappers argument by argument in Python; the
    engine runs no node under a ``torch.func`` transform, and a node takes every parameter
    it read as an input.
    """
    return torch._C._FunctionBase.__dict__["apply"].__get__(None, cls)


_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None)


def run_backward(
    outputs: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    accumulate: bool,
) -> Sequence[Any]:
    """Back-propagate ``grads`` from ``outputs`` into ``inputs``; their gradients (or ``()``).

    ``accumulate``: add into ``.grad`` of ``inputs`` (of every leaf reached, with no
    ``inputs``) instead of returning. As ``torch.autograd.grad``/``backward`` run it,
    without their Python wrappers, which re-validate every output and input.
    """
    if _ENGINE is not None:
        # (outputs, grad_outputs, retain_graph, create_graph, inputs, allow_unused, accumulate)
        return _ENGINE.run_backward(
            tuple(outputs), tuple(grads), False, False, tuple(inputs), True, accumulate
        )
    if accumulate:
        torch.autograd.backward(outputs, grads, inputs=list(inputs) or None)
        return ()
    return torch.autograd.grad(outputs, inputs, grads, allow_unused=True)


def saved_tensors_hooks_enabled() -> bool:
    """Whether saved-tensor hooks may be pushed here (some contexts disable them)."""
    check = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    return True if check is None else bool(check())


# -------------------------------------------------------------------------- compiling


_COUNTERS: Any = None


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process (recompilations included)."""
    global _COUNTERS
    if _COUNTERS is None:  # (dynamo imported on first use only)
        from torch._dynamo.utils import counters

        _COUNTERS = counters
    return _COUNTERS["stats"]["unique_graphs"]


# ------------------------------------------------------------------------ transforms


functorch_active = torch._C._are_functorch_transforms_active
"""Whether a ``torch.func`` transform (``vmap``, ``grad``, ``vjp``, ``jacrev``) is running."""


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level (``torch.autograd.forward_ad.dual_level``) is open."""
    from torch.autograd import forward_ad

    return forward_ad._current_level >= 0


def has_tangent(t: torch.Tensor) -> bool:
    """Whether ``t`` is a dual tensor of the open forward-mode AD level."""
    from torch.autograd import forward_ad

    return forward_ad.unpack_dual(t).tangent is not None
