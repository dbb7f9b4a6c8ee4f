"""What a function reads beyond its modules, its input and its keyword arguments.

A function may read a tensor that needs a gradient some other way: a closure, a global, a
plain attribute, another block's parameter held by reference (weights tied by reference,
not as a shared submodule). Plain autograd gives such a tensor its gradient; a
recomputation can only if the tensor is an input of the autograd node, so it must be found
in the forward pass. The first call of each function (see ``_learned``) runs with autograd
on, and the graph it built is walked down to its leaves:

- a leaf that is none of the function's parameters and that outlives the call (something
  holds it: a closure, an attribute) is an *external*: an input of the node, its gradient
  returned through it. A function that has any is *open*: each call looks again.
- a leaf created inside the call (``torch.tensor(0.0, requires_grad=True)`` to start an
  auxiliary loss) dies with the call's graph: nothing outside could see its gradient, and
  it is left alone, as plain autograd's would be unobservable.
- a tensor computed before the call (its graph node is older than the call) that is none
  of the inputs is refused with a hint: pass it as a keyword argument, so that its own
  graph upstream is back-propagated once, by autograd.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from .. import _torch


def walk(
    outputs: Sequence[torch.Tensor],
    known: Sequence[torch.Tensor],
    boundary: int,
) -> tuple[list[weakref.ref[torch.Tensor]], Any]:
    """The leaves the graph of ``outputs`` reaches beyond ``known``, and a node from before.

    Returns weak references to the unknown leaves (so that those created inside the call
    die with its graph) and the first node created before ``boundary`` that the walk
    reached (``None`` if none): a tensor computed before the call, none of ``known``. The
    walk stops at the nodes of ``known`` tensors.
    """
    ids = {id(t) for t in known}
    seen = {id(t.grad_fn) for t in known if t.grad_fn is not None}
    stack: list[Any] = [t.grad_fn for t in outputs if t.grad_fn is not None]
    found: list[weakref.ref[torch.Tensor]] = []
    older: Any = None
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:  # AccumulateGrad: a leaf
            if id(variable) not in ids:
                found.append(weakref.ref(variable))
            continue
        if _torch.sequence_number(node) < boundary:
            older = older or node
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found, older


def alive(found: list[weakref.ref[torch.Tensor]]) -> list[torch.Tensor]:
    """The leaves of ``found`` still alive (the call's graph freed): the externals."""
    out = []
    for ref in found:
        t = ref()
        if t is not None and t.requires_grad:
            out.append(t)
    return out
