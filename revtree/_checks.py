"""Every check on what ``f``, ``g`` and a coupling do, each in one wording.

The functions here state the fact; the location comes from one place, ``where``, as
``"block 3: f"``. Checks run on every call except the structure reads, which are fast when
the structure is the expected one (``_trees.leaves_as``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

import torch
from optree import PyTreeSpec

from . import _trees
from ._errors import RevtreeError, RevtreeWarning
from ._torch import versions

Leaves = list[torch.Tensor]


def where(index: int, who: str) -> str:
    """The location of a problem, as every message starts: ``"block 3: f"``."""
    return f"block {index}: {who}"


def fail(index: int, who: str, message: str) -> NoReturn:
    """Raise the ``RevtreeError`` for ``message``, located at ``who`` of block ``index``."""
    raise RevtreeError(f"{where(index, who)} {message}") from None


# ------------------------------------------------------------------------- in place


def modified(tensors: Sequence[torch.Tensor], before: list[int]) -> int | None:
    """The position of the first tensor modified in place since ``before``, if any."""
    now = versions(tensors)
    if now == before:
        return None
    return next((k for k, (v, w) in enumerate(zip(now, before)) if w >= 0 and v != w), None)


def input_modified(index: int, which: str, name: str, leaf: torch.Tensor) -> NoReturn:
    """``f`` or ``g`` modified a leaf of its half-stream in place."""
    fail(
        index,
        which,
        f"modified its input leaf {name} ({_trees.describe(leaf)}) in place, so the block's "
        f"inputs cannot be reconstructed from its outputs. Hint: use out-of-place operations "
        f"on the input in {which} (e.g. x = x * 2, not x *= 2).",
    )


def keyword_modified(index: int, which: str, name: str, tensor: torch.Tensor) -> NoReturn:
    """``f`` or ``g`` modified a tensor of its keyword arguments in place."""
    fail(
        index,
        which,
        f"modified the keyword tensor {name} ({_trees.describe(tensor)}) in place; a reversible "
        f"block runs {which} again during backward, which would see and leave other values. "
        f"Hint: compute a new tensor in {which} (e.g. c = c * 2, not c *= 2).",
    )


def stream_modified(index: int, coupling: Any, name: str, leaf: torch.Tensor) -> NoReturn:
    """A coupling modified one of its input streams in place."""
    fail(
        index,
        repr(coupling),
        f"modified its input stream at {name} ({_trees.describe(leaf)}) in place, so the "
        "block cannot be recomputed from its outputs. Hint: build the coupling's outputs "
        "out of place (optree.tree_map(torch.add, x1, u), not x1.add_(u)).",
    )


def buffer_modified(index: int, which: str, name: str) -> NoReturn:
    """A buffer recorded without a copy was changed in place after the call read it."""
    fail(
        index,
        which,
        f"changed its buffer {name!r} in place, which its first call had left as it was, so "
        "its recomputation would read other values; from now on its buffers are copied before "
        "each call. Hint: run the step again (a module that sometimes updates a buffer in "
        "place is best updated on the first call too).",
    )


def parameter_modified(indices: Sequence[int], shape: tuple[int, ...]) -> NoReturn:
    """A parameter changed between the forward and the backward pass."""
    raise RevtreeError(
        f"a parameter of shape {shape} in blocks {indices[0]}..{indices[-1]} was modified in "
        "place between the forward and the backward pass, so the blocks cannot be "
        "recomputed. Hint: call optimizer.step() after backward, not before."
    )


# ------------------------------------------------------------------- what f returns


def update_leaves(
    out: Any, expected: PyTreeSpec, layout_spec: PyTreeSpec, namespace: str, index: int, which: str
) -> Leaves:
    """The leaves of what ``f`` or ``g`` returned, which must have the structure ``expected``.

    ``expected`` is the half-stream's own structure, or a tuple of them for a coupling that
    takes several updates (the affine coupling's log-scale and shift).
    """
    leaves, spec = _trees.leaves_as(out, expected, namespace)
    if _trees.differ(spec, expected):
        wanted = (
            "a pytree with the structure of its input (same keys, same nesting, one tensor per "
            "leaf)"
            if expected == layout_spec
            else f"{expected}, built from the structure of its input"
        )
        fail(
            index,
            which,
            f"returned a pytree of structure {spec}, but its input half-stream has structure "
            f"{layout_spec}. Hint: {which} must return {wanted}.",
        )
    return leaves


def like_input(
    out: Any,
    leaves: Leaves,
    spec: PyTreeSpec,
    names: Sequence[str],
    namespace: str,
    index: int,
    which: str,
    shapes: bool = True,
) -> None:
    """``out`` must have the structure ``spec``, a tensor at every leaf (of the input's shape)."""
    out_leaves, out_spec = _trees.leaves_as(out, spec, namespace)
    if _trees.differ(out_spec, spec):
        fail(
            index,
            which,
            f"returned a pytree of structure {out_spec}, where {spec} is expected. Hint: "
            f"{which} must return a pytree with the structure of its input (same keys, same "
            "nesting, one tensor per leaf), or for a coupling taking several updates, a tuple "
            "of them.",
        )
    for name, y, x in zip(names, out_leaves, leaves):
        if not isinstance(y, torch.Tensor) or (
            shapes and (y.shape != x.shape or y.device != x.device)
        ):
            fail(
                index,
                which,
                f"returned {_trees.describe(y)} at {name} for an input leaf of "
                f"{_trees.describe(x)} on {x.device}. Hint: {which} must return, for every "
                "leaf, a tensor of its input's shape on its device.",
            )


def combined(
    out: Leaves | None,
    x: Leaves,
    update: Leaves,
    combine: Any,
    names: Sequence[str],
    index: int,
    which: str,
    recomputing: bool = False,
) -> Leaves:
    """``out``, the stream ``x`` combined with ``update``, if every leaf kept its shape and dtype.

    Else the error for the first leaf that cannot be combined without changing (a wrong
    shape, dtype or device, or no tensor at all); ``combine`` is the leafwise combination.
    The device can only change for a 0-dim leaf (a CPU scalar tensor combines with a CUDA
    one), so it is compared there only.
    """
    if out is not None and all(
        y.shape == a.shape and y.dtype is a.dtype and (a.shape or y.device == a.device)
        for y, a in zip(out, x)
    ):
        return out
    n = len(x)
    when = " in its recomputation" if recomputing else ""
    for i, (name, a) in enumerate(zip(names, x)):
        parts = update[i::n]  # leaf i of each of the coupling's update trees
        for b in parts:
            if not isinstance(b, torch.Tensor):
                fail(
                    index,
                    which,
                    f"returned {_trees.describe(b)} at {name}{when}, where the half-stream "
                    f"holds a tensor of shape {tuple(a.shape)}. Hint: {which} must return a "
                    "tensor for every leaf.",
                )
        try:
            y, error = combine(a, *parts), None
        except RuntimeError as e:
            y, error = None, e
        if y is None or y.shape != a.shape or y.dtype != a.dtype or y.device != a.device:
            got = ", ".join(f"{_trees.describe(b)} on {b.device}" for b in parts)
            fail(
                index,
                which,
                f"returned {got} at {name}{when}, which cannot be combined with the "
                f"half-stream leaf of {_trees.describe(a)} on {a.device} without changing it"
                + (f" ({error})" if y is None else "")
                + f". Hint: {which} must return, for every leaf, a tensor of its input's shape, "
                "dtype and device (under autocast a lower-precision result is fine).",
            )
    fail(
        index,
        "combine_leaves",
        "returned leaves that differ from what combine gives leaf by leaf. Hint: "
        "combine_leaves must return, for every leaf, combine(x, *update) of that leaf.",
    )


def recompute_differs(index: int, which: str, expected: list[Any], got: list[Any]) -> NoReturn:
    """A recomputed call returned other shapes than its forward call."""
    k = next(
        (i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(map(len, (expected, got)))
    )

    def shape(signature: list[Any]) -> str:
        return "nothing" if k >= len(signature) else f"shape {tuple(signature[k])}"

    fail(
        index,
        which,
        f"returned {shape(got)} for leaf {k} of its output in the recomputation, where its "
        f"forward call returned {shape(expected)}, so the block's inputs cannot be rebuilt. "
        f"Hint: {which} must compute the same function when recomputed "
        "(revtree.is_recomputing() is for caches, not for changing what it returns).",
    )


# ----------------------------------------------------------------- what a coupling returns


def stream_leaves(
    tree: Any, like: Leaves, layout: Any, namespace: str, coupling: Any, index: int
) -> Leaves:
    """The leaves of a coupling's output stream, which must match its input stream ``like``."""
    spec, names = layout.spec, layout.names
    leaves, out_spec = _trees.leaves_as(tree, spec, namespace)
    if _trees.differ(out_spec, spec):
        fail(
            index,
            repr(coupling),
            f"returned a stream of structure {out_spec}, but its input stream has structure "
            f"{spec}. Hint: a coupling's forward and inverse return two pytrees with the "
            "structure of their inputs.",
        )
    for name, y, x in zip(names, leaves, like):
        if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
            fail(
                index,
                repr(coupling),
                f"returned {_trees.describe(y)} at {name} for a stream leaf of "
                f"{_trees.describe(x)}. Hint: each output leaf must keep its input's shape and "
                "dtype.",
            )
    return leaves


def coupling_raised(index: int, coupling: Any, method: str, error: Exception) -> NoReturn:
    """A coupling's own method raised (not ``f`` or ``g`` inside it)."""
    reason = str(error).split("\n", 1)[0]
    reason = reason if len(reason) <= 300 else reason[:300] + "..."
    raise RevtreeError(
        f"{where(index, repr(coupling))}.{method} raised {type(error).__name__}: {reason}. Hint: "
        "f and g must return what the coupling expects of them (for the couplings of "
        "revtree.couplings, a pytree with the structure and shapes of their input)."
    ) from error


# --------------------------------------------------------------- what f reads beyond


def foreign_found(index: int, which: str) -> NoReturn:
    """``f`` or ``g`` reads a tensor computed before it ran, by a way the engine cannot see."""
    fail(
        index,
        which,
        "depends on a tensor computed before it ran, that requires grad, and that is neither "
        "its input, a parameter or buffer of its modules, nor a keyword argument of the call "
        "(a closure, a global, or a tensor kept as a plain attribute?); the recomputation "
        "could not pass its gradient on upstream. Hint: pass it as a keyword argument "
        "(seq(x, name=tensor)), so that its gradient flows upstream through the sequence.",
    )


def escaped(index: int, which: str) -> None:
    """``f`` kept, somewhere, a tensor computed from its input that carries a gradient."""
    warnings.warn(
        f"{where(index, which)} keeps a tensor computed from its input that carries a "
        "gradient (on a module attribute, in a hook's capture, in a list): inside a "
        "reversible stack it is computed without autograd, so a loss made from it would pass "
        "no gradient back through it. Hint: return it as a side output (side=True on the "
        "block or step, and the sequence returns it beside its output), or detach it where "
        "it is kept if it is only read (logging, inspection).",
        RevtreeWarning,
        stacklevel=caller_level(),
    )


def reentrant_checkpoint(index: int, which: str) -> NoReturn:
    """A reentrant ``torch.utils.checkpoint`` inside ``f`` cannot run in a recomputation."""
    fail(
        index,
        which,
        "calls torch.utils.checkpoint(..., use_reentrant=True), which cannot run inside a "
        "recomputation (it is not compatible with torch.autograd.grad, which the reversible "
        "backward uses). Hint: checkpoint with use_reentrant=False inside f and g (the "
        "default torch recommends), or leave the checkpoint out: the block is recomputed "
        "anyway.",
    )


# ------------------------------------------------------------- between forward and backward


def output_modified(indices: Sequence[int], name: str, tensor: torch.Tensor) -> NoReturn:
    """The caller changed a reversible stack's output in place before backward."""
    raise RevtreeError(
        f"the output {name} ({_trees.describe(tensor)}) of reversible blocks "
        f"{indices[0]}..{indices[-1]} was changed in place after the forward pass; backward "
        "rebuilds the blocks' inputs from it, so it must keep the values the forward gave. "
        "Hint: change a copy (y = y.clone(); y.add_(...)) or compute out of place (y = y + ...)."
    )


def function_changed(index: int, which: str, what: str) -> NoReturn:
    """A block's function changed between the forward and the backward pass."""
    fail(
        index,
        which,
        f"changed between the forward and the backward pass ({what}); backward recomputes "
        "it, and would compute another function than the forward did. Hint: change the "
        "model after backward (or before the forward), not in between.",
    )


def parameter_converted(indices: Sequence[int], shape: tuple[int, ...], was: str) -> NoReturn:
    """A parameter changed dtype or device between the forward and the backward pass."""
    raise RevtreeError(
        f"a parameter of shape {shape} in blocks {indices[0]}..{indices[-1]} was {was} between "
        "the forward and the backward pass (model.float(), .to(...)), so the blocks cannot be "
        "recomputed as they ran. Hint: convert the model before the forward or after the step."
    )


def keyword_changed(indices: Sequence[int], name: str, tensor: torch.Tensor) -> NoReturn:
    """The caller changed a keyword tensor in place between forward and backward."""
    raise RevtreeError(
        f"the keyword tensor {name} ({_trees.describe(tensor)}) of reversible blocks "
        f"{indices[0]}..{indices[-1]} was changed in place after the forward pass; backward "
        "recomputes the blocks with it, so it must keep the values the forward read. Hint: "
        "change it after backward, or pass a copy (seq(x, name=tensor.clone()))."
    )


# ----------------------------------------------------------------- errors inside f or g


def note(error: BaseException, index: int, which: str, shapes: str, hint: str | None) -> None:
    """Say, on an exception raised inside ``f`` or ``g``, where it was raised and on what."""
    text = f"revtree: raised in {where(index, which)}, called on half-stream leaves {shapes}"
    if hint:
        text += f". {hint}"
    if hasattr(error, "add_note"):
        error.add_note(text)
    else:  # Python 3.10: kept where 3.11's traceback would print it
        error.__notes__ = [*getattr(error, "__notes__", []), text]  # type: ignore[attr-defined]


def default_codec_on_images(names: Sequence[str], leaves: Sequence[Any]) -> None:
    """Warn where the default ``Split(-1)`` halves the width of an image-like leaf."""
    for name, leaf in zip(names, leaves):
        if isinstance(leaf, torch.Tensor) and leaf.dim() in (4, 5):
            warnings.warn(
                f"the default codec Split(-1) cuts the last dimension of {name} (shape "
                f"{tuple(leaf.shape)}): for an image (N, C, H, W) or a volume (N, C, D, H, W) "
                "that gives f and g the left and right halves of it, not half the channels "
                "each. Hint: codec=Split(1) splits the channels (examples/revnet_conv.py); "
                "pass codec=Split(-1) to keep the last dimension and silence this warning.",
                RevtreeWarning,
                stacklevel=caller_level(),
            )
            return


def caller_level() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside revtree and torch."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if "/revtree/" not in name and "/torch/" not in name:
            return level
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return 1
