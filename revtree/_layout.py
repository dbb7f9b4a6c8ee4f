"""The layout of one input structure: each leaf's key path and codec, and the two half-streams."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from optree import PyTreeSpec

from . import _trees
from ._errors import RevtreeError
from .codecs import Codec, KeyPath, Split


@dataclass(frozen=True)
class Layout:
    """How the leaves of one input structure become the half-streams and back.

    Built once per input structure and cached; the engine then works on flat
    lists of leaves, one entry per leaf of the input.
    """

    spec: PyTreeSpec
    paths: tuple[KeyPath, ...]
    names: tuple[str, ...]
    codecs: tuple[Codec, ...]

    @classmethod
    def build(cls, x: Any, codec: Any, namespace: str) -> Layout:
        """Match ``codec`` (one codec or a prefix tree of codecs) against the input ``x``."""
        paths, names, leaves, spec = _trees.flatten_with_names(x, namespace)
        if isinstance(codec, Codec):
            codecs = [codec] * len(leaves)
        else:
            codecs = _trees.broadcast_prefix(codec, x, namespace, "codec")
        for name, leaf_codec in zip(names, codecs):
            if not isinstance(leaf_codec, Codec):
                raise RevtreeError(
                    f"the codec for input leaf {name} is {leaf_codec!r}, not a revtree Codec. "
                    "Hint: use revtree.codecs.Split(dim), Duplicate() or a Codec subclass."
                )
        return cls(spec, tuple(paths), tuple(names), tuple(codecs))

    def encode(self, leaves: list[Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Check the input leaves and split each into its two half-stream tensors."""
        x1, x2 = [], []
        for name, path, codec, leaf in zip(self.names, self.paths, self.codecs, leaves):
            if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
                raise RevtreeError(
                    f"input leaf {name} is {_trees.describe(leaf)}; every leaf of the input "
                    "must be a floating-point tensor. Hint: pass integer tensors, masks and "
                    "other context as keyword arguments; None is an empty subtree."
                )
            try:
                a, b = codec.encode(leaf, path)
            except RevtreeError as e:
                raise RevtreeError(f"input leaf {name} ({_trees.describe(leaf)}): {e}") from None
            x1.append(a)
            x2.append(b)
        return x1, x2

    def decode(self, y1: list[torch.Tensor], y2: list[torch.Tensor]) -> Any:
        """Merge the two output half-streams of every leaf back into a tree shaped like ``x``."""
        return self.spec.unflatten(
            [c.decode(a, b, p) for c, p, a, b in zip(self.codecs, self.paths, y1, y2)]
        )

    def hint(self, halves: list[torch.Tensor], message: str, which: str) -> str | None:
        """A hint for an error raised inside ``f`` or ``g`` on the half-streams ``halves``.

        The commonest first mistake is a function built for a ``Split`` leaf's full width:
        when the error's message names a full width where the half-stream has half, say so.
        """
        if "shape" not in message and "size" not in message:
            return None
        numbers = set(re.findall(r"\d+", message))
        for name, codec, half in zip(self.names, self.codecs, halves):
            if isinstance(codec, Split) and isinstance(half, torch.Tensor) and half.dim():
                size = half.shape[codec.dim]
                if str(2 * size) in numbers:
                    full = list(half.shape)
                    full[codec.dim] = 2 * size
                    return (
                        f"Hint: {which} receives half of each Split leaf: {name} has shape "
                        f"{tuple(half.shape)} in the half-stream, {tuple(full)} in the input; "
                        f"build {which} for the half (or give that leaf Duplicate())."
                    )
        return None
