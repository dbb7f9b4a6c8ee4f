"""revtree's pytree policy, in one place.

Trees are walked by optree with its defaults: ``None`` is an empty node, not a leaf
(so a ``None`` in the input passes through untouched), dicts are ordered by sorted key,
and custom nodes registered with optree are nodes too, looked up in ``namespace``.
"""

from __future__ import annotations

from typing import Any

import optree
import torch
from optree import PyTreeSpec

from ._errors import RevtreeError

NONE_IS_LEAF = False


def flatten(tree: Any, namespace: str) -> tuple[list[Any], PyTreeSpec]:
    """Flatten ``tree`` into its leaves and structure under revtree's policy."""
    return optree.tree_flatten(tree, none_is_leaf=NONE_IS_LEAF, namespace=namespace)


def leaves_as(tree: Any, spec: PyTreeSpec, namespace: str) -> tuple[list[Any], PyTreeSpec]:
    """The leaves of ``tree`` and its structure, fast when it has the structure ``spec``.

    ``f`` and ``g`` almost always return the structure they were given: reading the leaves
    up to a known structure is several times cheaper than a full flatten, and a tree that
    does not fit (or holds a non-tensor where ``spec`` has a leaf) takes the full flatten.
    ``None`` where ``spec`` has a leaf is read as such: ``f`` leaves that leaf unchanged.
    """
    try:
        leaves = spec.flatten_up_to(tree)
    except (ValueError, TypeError):
        pass
    else:
        if all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            return leaves, spec
        if all(leaf is None or isinstance(leaf, torch.Tensor) for leaf in leaves):
            return leaves, spec  # None where a leaf belongs: "no update" (see _strategies)
    return flatten(tree, namespace)


def flatten_with_paths(
    tree: Any, namespace: str
) -> tuple[list[tuple[Any, ...]], list[Any], PyTreeSpec]:
    """Flatten ``tree``, also returning each leaf's key path."""
    return optree.tree_flatten_with_path(tree, none_is_leaf=NONE_IS_LEAF, namespace=namespace)


def flatten_with_names(
    tree: Any, namespace: str
) -> tuple[list[tuple[Any, ...]], list[str], list[Any], PyTreeSpec]:
    """Flatten ``tree``, also returning each leaf's key path and its printable accessor."""
    paths, leaves, spec = optree.tree_flatten_with_path(
        tree, none_is_leaf=NONE_IS_LEAF, namespace=namespace
    )
    names = [accessor.codify("x") for accessor in spec.accessors()]
    return paths, names, leaves, spec


def broadcast_prefix(prefix: Any, tree: Any, namespace: str, what: str) -> list[Any]:
    """Broadcast ``prefix`` to the leaves of ``tree``, with a revtree error if it is no prefix."""
    try:
        return optree.broadcast_prefix(prefix, tree, none_is_leaf=NONE_IS_LEAF, namespace=namespace)
    except ValueError as e:
        # optree's prefix_errors name the key path and the types, never a tensor's values
        errors = optree.prefix_errors(prefix, tree, none_is_leaf=NONE_IS_LEAF, namespace=namespace)
        reason = str(errors[0](what)) if errors else str(e).rsplit("; ", 1)[0]
        raise RevtreeError(
            f"the {what} tree is not a prefix of the input tree: {reason}\n"
            f"{what} structure: {optree.tree_structure(prefix, namespace=namespace)}\n"
            f"input structure: {optree.tree_structure(tree, namespace=namespace)}\n"
            f"Hint: give one {what} for the whole input, or a tree whose nodes match the "
            f"input's from the root down, with a {what} where a whole subtree shares one."
        ) from None


def differ(spec: PyTreeSpec, expected: PyTreeSpec) -> bool:
    """Whether two structures differ (the same object, as ``leaves_as`` returns, at once)."""
    return spec is not expected and spec != expected


def describe(leaf: Any) -> str:
    """A short description of a leaf for error messages: shape and dtype, or its type."""
    shape = getattr(leaf, "shape", None)
    if shape is not None and hasattr(leaf, "dtype"):
        return f"shape {tuple(shape)} {leaf.dtype}"
    return f"a {type(leaf).__name__}"
