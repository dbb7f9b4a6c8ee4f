"""The autograd Function behind a run of reversible blocks.

It stores only the final output streams (and the keyword tensors, which the caller holds
anyway), and in backward walks the blocks in reverse, reconstructing each block's inputs
from its outputs. Every gradient, for the input streams, the keyword tensors and the
block parameters, is returned through the Function, computed with ``torch.autograd.grad``
and never written to ``.grad`` from inside: so ``loss.backward()`` and
``torch.autograd.grad`` both see exactly what plain autograd gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import nn

from . import _drift, _rng
from ._autocast import AutocastState
from ._block import Block
from ._context import Context
from ._errors import RevtreeError
from ._layout import Layout
from ._steps import StepInputs, forward_step, reverse_step
from .couplings import Coupling, Elementwise


def _walk(
    module: nn.Module, index: dict[int, int], params: list[nn.Parameter], buffered: list[nn.Module]
) -> list[int]:
    """Indices into ``params`` (extended as needed) of ``module``'s trainable parameters.

    Also appends to ``buffered`` the submodules that hold buffers (running statistics that
    the recomputation must leave as the forward left them). Walks ``_modules``,
    ``_parameters`` and ``_buffers`` directly: read afresh on every call (so a replaced,
    swapped or frozen parameter is never missed) at a fraction of the cost of
    ``module.parameters()``, which matters on the per-call path.
    """
    out: list[int] = []
    stack = [module]
    while stack:
        mod = stack.pop()
        if mod is None:
            continue
        if mod._parameters:
            for p in mod._parameters.values():
                if p is not None and p.requires_grad:
                    j = index.get(id(p))
                    if j is None:
                        j = index[id(p)] = len(params)
                        params.append(p)
                    out.append(j)
        if mod._buffers:
            buffered.append(mod)
        if mod._modules:
            stack.extend(mod._modules.values())
    return list(dict.fromkeys(out))  # a parameter shared inside the module: one slot


@dataclass
class Stack:
    """A run of consecutive reversible blocks and everything their backward needs."""

    blocks: list[Block]
    indices: list[int]
    layout: Layout
    namespace: str
    coupling: Coupling
    context: Context
    preserve_rng: bool
    check_drift: float | None
    params: list[nn.Parameter]
    f_params: list[list[int]]
    g_params: list[list[int]]
    buffered: list[list[nn.Module]]

    @classmethod
    def build(
        cls,
        blocks: list[Block],
        indices: list[int],
        layout: Layout,
        namespace: str,
        coupling: Coupling,
        context: Context,
        preserve_rng: bool,
        check_drift: float | None = None,
    ) -> Stack:
        """Collect the blocks' trainable parameters once, shared ones once only."""
        index: dict[int, int] = {}
        params: list[nn.Parameter] = []
        buffered: list[list[nn.Module]] = [[] for _ in blocks]
        f_params = [_walk(b.f, index, params, buffered[i]) for i, b in enumerate(blocks)]
        g_params = [_walk(b.g, index, params, buffered[i]) for i, b in enumerate(blocks)]
        return cls(
            blocks,
            indices,
            layout,
            namespace,
            coupling,
            context,
            preserve_rng,
            check_drift,
            params,
            f_params,
            g_params,
            buffered,
        )

    def needs_grad(self, x1: list[torch.Tensor], x2: list[torch.Tensor]) -> bool:
        """Whether anything the blocks see requires a gradient (else they run storing nothing)."""
        return bool(self.params) or any(
            t.requires_grad for t in chain(x1, x2, self.context.tensors)
        )

    def run(self, x1: list[torch.Tensor], x2: list[torch.Tensor]) -> tuple[list, list]:
        """Run the blocks through the reversible Function; return the output streams."""
        n = len(x1)
        out = ReversibleFunction.apply(self, *x1, *x2, *self.context.tensors, *self.params)
        return list(out[:n]), list(out[n:])


class ReversibleFunction(torch.autograd.Function):
    """Forward through a ``Stack`` without storing activations; reverse it in backward."""

    @staticmethod
    def forward(ctx: Any, stack: Stack, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: D102
        n = len(stack.layout.names)
        n_kw = len(stack.context.positions)
        x1, x2 = list(tensors[:n]), list(tensors[n : 2 * n])
        kw = tensors[2 * n : 2 * n + n_kw]
        devices = _rng.cuda_devices(tensors)
        inputs = StepInputs.build(
            stack.layout, stack.namespace, stack.coupling, stack.context, list(kw)
        )
        states = []
        samples = []
        for offset, block in enumerate(stack.blocks):
            if stack.check_drift is not None:
                samples.append(_drift.sample([*x1, *x2]))
            x1, x2, block_states = forward_step(
                block, stack.indices[offset], x1, x2, inputs, stack.preserve_rng, devices
            )
            states.append(block_states)
        ctx.stack = stack
        ctx.states = states
        ctx.samples = samples
        ctx.devices = devices
        ctx.autocast = AutocastState.capture(("cuda",) if devices else ())
        ctx.versions = [p._version for p in stack.params]
        ctx.save_for_backward(*x1, *x2, *kw)
        return (*x1, *x2)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:  # noqa: D102
        if torch.is_grad_enabled():
            raise RevtreeError(
                "double backward (create_graph=True) through a reversible stack is not "
                "supported: its backward recomputes the blocks and is not itself differentiable. "
                "Hint: build the stack with reversible=False for higher-order gradients."
            )
        stack: Stack = ctx.stack
        _check_versions(stack, ctx.versions)
        n = len(stack.layout.names)
        n_kw = len(stack.context.positions)
        saved = ctx.saved_tensors
        y1, y2, kw = list(saved[:n]), list(saved[n : 2 * n]), saved[2 * n :]
        dy1, dy2 = list(grads[:n]), list(grads[n:])

        kw_needs = ctx.needs_input_grad[1 + 2 * n : 1 + 2 * n + n_kw]
        kw_ = [t.detach().requires_grad_() if need else t for t, need in zip(kw, kw_needs)]
        inputs = StepInputs.build(stack.layout, stack.namespace, stack.coupling, stack.context, kw_)
        # gradient slots: the keyword tensors that need one, then the parameters
        sources = [*kw_, *stack.params]
        kw_slots = [k for k, need in enumerate(kw_needs) if need]
        f_kw = kw_slots if stack.context.to_f else []
        g_kw = kw_slots if stack.context.to_g else []
        fused = isinstance(stack.coupling, Elementwise)
        totals: list[Any] = [None] * len(sources)

        warned = False
        with _rng.preserved(ctx.devices), ctx.autocast.replay():
            for offset in reversed(range(len(stack.blocks))):
                f_slots = [*f_kw, *(n_kw + j for j in stack.f_params[offset])]
                g_slots = [*g_kw, *(n_kw + j for j in stack.g_params[offset])]
                if not fused:  # one backward pass through f and g: each source once
                    f_slots, g_slots = list(dict.fromkeys(f_slots + g_slots)), []
                step = reverse_step(
                    stack.blocks[offset],
                    stack.indices[offset],
                    y1,
                    y2,
                    dy1,
                    dy2,
                    inputs,
                    [sources[k] for k in f_slots],
                    [sources[k] for k in g_slots],
                    ctx.states[offset],
                    ctx.devices,
                    stack.buffered[offset],
                )
                y1, y2, dy1, dy2 = step.x1, step.x2, step.dx1, step.dx2
                if ctx.samples and not warned:
                    warned = _drift.check(
                        stack.indices[offset],
                        stack.layout.names,
                        [*y1, *y2],
                        ctx.samples[offset],
                        stack.check_drift,
                    )
                _accumulate(totals, f_slots, step.f_grads)
                _accumulate(totals, g_slots, step.g_grads)

        x_needs = ctx.needs_input_grad[1 : 1 + 2 * n]
        dx = [d if need else None for d, need in zip(chain(dy1, dy2), x_needs)]
        return (None, *dx, *totals)


def _accumulate(total: list[Any], where: list[int], grads: list[Any]) -> None:
    for j, grad in zip(where, grads):
        if grad is not None:
            total[j] = grad if total[j] is None else total[j] + grad


def _check_versions(stack: Stack, versions: list[int]) -> None:
    for p, version in zip(stack.params, versions):
        if p._version != version:
            raise RevtreeError(
                f"a parameter of shape {tuple(p.shape)} in blocks {stack.indices[0]}.."
                f"{stack.indices[-1]} was modified in place between the "
                "forward and the backward pass, so the blocks cannot be recomputed. "
                "Hint: call optimizer.step() after backward, not before."
            )
