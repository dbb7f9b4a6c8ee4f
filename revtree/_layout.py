"""The layout of one input structure: each leaf's key path and codec, and the state's parts.

The state of a sequence is ``K`` parts (two half-streams for the classic coupling), each a
flat list of tensors with a tree structure of its own: part ``k`` holds, for every input
leaf that has a piece in it, that piece, in the input's leaf order. Where every leaf has a
piece in every part (``Split``, ``Duplicate``), each part has the input's structure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import optree
import torch
from optree import PyTreeSpec

from . import _trees
from ._errors import RevtreeError
from .codecs import Codec, KeyPath, Split

State = list[list[torch.Tensor]]  # the parts, each a list of tensors


@dataclass(frozen=True)
class Layout:
    """How the leaves of one input structure become the parts of the state and back.

    Built once per input structure and cached; the engine then works on flat lists of
    tensors, one list per part.
    """

    spec: PyTreeSpec
    paths: tuple[KeyPath, ...]
    names: tuple[str, ...]
    codecs: tuple[Codec, ...]
    parts: int
    homes: tuple[tuple[tuple[int, int], ...], ...]  # per leaf, per piece: (part, position)
    specs: tuple[PyTreeSpec, ...]  # per part: its tree's structure
    members: tuple[tuple[int, ...], ...]  # per part: the input leaf of each of its tensors
    cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

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
        parts = max((t + 1 for c in codecs for t in c.targets), default=2)
        members: list[list[int]] = [[] for _ in range(parts)]
        homes = []
        for i, c in enumerate(codecs):
            home = []
            for k in c.targets:
                home.append((k, len(members[k])))
                members[k].append(i)
            homes.append(tuple(home))
        specs = []
        for k in range(parts):
            if len(members[k]) == len(leaves):
                specs.append(spec)
            else:  # the input's structure, None where a leaf has no piece in this part
                kept = set(members[k])
                marks = [0 if i in kept else None for i in range(len(leaves))]
                specs.append(
                    optree.tree_structure(
                        spec.unflatten(marks),
                        none_is_leaf=_trees.NONE_IS_LEAF,
                        namespace=namespace,
                    )
                )
        return cls(
            spec,
            tuple(paths),
            tuple(names),
            tuple(codecs),
            parts,
            tuple(homes),
            tuple(specs),
            tuple(tuple(m) for m in members),
        )

    def encode(self, leaves: list[Any]) -> State:
        """Check the input leaves and cut each into its pieces, part by part."""
        state: State = [[] for _ in range(self.parts)]
        for name, path, codec, home, leaf in zip(
            self.names, self.paths, self.codecs, self.homes, leaves
        ):
            if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
                raise RevtreeError(
                    f"input leaf {name} is {_trees.describe(leaf)}; every leaf of the input "
                    "must be a floating-point tensor. Hint: pass integer tensors, masks and "
                    "other context as keyword arguments; None is an empty subtree."
                )
            try:
                pieces = codec.encode(leaf, path)
            except RevtreeError as e:
                raise RevtreeError(f"input leaf {name} ({_trees.describe(leaf)}): {e}") from None
            if len(pieces) != len(home):
                raise RevtreeError(
                    f"input leaf {name}: the codec {codec!r} returned {len(pieces)} pieces, "
                    f"where its parts say {len(home)}. Hint: a codec's encode returns one "
                    "piece per part (its `parts` attribute)."
                )
            for piece, (k, _) in zip(pieces, home):
                state[k].append(piece)
        return state

    def decode(self, state: State) -> Any:
        """Merge the output pieces of every leaf back into a tree shaped like the input."""
        return self.spec.unflatten([self.leaf(state, i) for i in range(len(self.codecs))])

    def leaf(self, state: State, i: int) -> torch.Tensor:
        """Output leaf ``i``, from its pieces."""
        pieces = [state[k][j] for k, j in self.homes[i]]
        decode: Any = self.codecs[i].decode  # takes as many pieces as the codec makes
        return decode(*pieces, self.paths[i])

    def pieces(self, leaf: torch.Tensor, i: int) -> tuple[torch.Tensor, ...]:
        """The pieces of output leaf ``i`` (of a bijective codec), from the leaf."""
        return tuple(self.codecs[i].encode(leaf, self.paths[i]))

    def tree(self, k: int, tensors: list[Any]) -> Any:
        """Part ``k`` as a tree."""
        return self.specs[k].unflatten(tensors)

    def part_names(self, k: int) -> tuple[str, ...]:
        """The key path of each tensor of part ``k``."""
        return tuple(self.names[i] for i in self.members[k])

    def hint(self, reads: list[tuple[int, list[Any]]], message: str, which: str) -> str | None:
        """A hint for an error raised inside ``f`` or ``g`` on the parts ``reads``.

        ``reads`` pairs each part the function read with its tensors. The commonest first
        mistake is a function built for a ``Split`` leaf's full width: when the error's
        message names a full width where the piece has a part of it, say so, naming the
        leaf whose full width the message shows.
        """
        if "shape" not in message and "size" not in message:
            return None
        numbers = set(re.findall(r"\d+", message))
        for k, tensors in reads:
            for i, piece in zip(self.members[k], tensors):
                codec = self.codecs[i]
                if not isinstance(codec, Split) or not isinstance(piece, torch.Tensor):
                    continue
                if not piece.dim() or not -piece.dim() <= codec.dim < piece.dim():
                    continue
                size = piece.shape[codec.dim]
                if str(codec.parts * size) in numbers and str(size) not in numbers - {
                    str(codec.parts * size)
                }:
                    return self._hint_for(i, piece, codec, which)
        for k, tensors in reads:  # a message naming both widths: the first Split leaf
            for i, piece in zip(self.members[k], tensors):
                codec = self.codecs[i]
                if isinstance(codec, Split) and isinstance(piece, torch.Tensor) and piece.dim():
                    if -piece.dim() <= codec.dim < piece.dim():
                        if str(codec.parts * piece.shape[codec.dim]) in numbers:
                            return self._hint_for(i, piece, codec, which)
        return None

    def _hint_for(self, i: int, piece: torch.Tensor, codec: Split, which: str) -> str:
        full = list(piece.shape)
        full[codec.dim] = codec.parts * piece.shape[codec.dim]
        share = "half" if codec.parts == 2 else f"1/{codec.parts}"
        images = ""
        if piece.dim() in (4, 5) and codec.dim in (-1, piece.dim() - 1):
            images = (
                " For images (N, C, H, W), codec=Split(1) gives each function half the "
                "channels instead of half the width."
            )
        return (
            f"Hint: {which} receives {share} of each Split leaf: {self.names[i]} has shape "
            f"{tuple(piece.shape)} in its part, {tuple(full)} in the input; "
            f"build {which} for the {share} (or give that leaf Duplicate()).{images}"
        )
