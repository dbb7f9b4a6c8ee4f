"""Reversible gradients equal plain autograd, leaf by leaf, in float64, over random pytrees."""

from __future__ import annotations

import optree
import pytest
import torch
from helpers import (
    INTERLEAVE,
    TOL,
    Point,
    assert_trees_close,
    codec_for,
    codec_prefixes,
    half_widths,
    make_blocks,
    materialize,
    reference,
    t,
    trees,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import revtree
from revtree.codecs import Duplicate, Rearrange, Split


def _loss(y) -> torch.Tensor:
    total = 0
    for i, leaf in enumerate(optree.tree_leaves(y)):
        w = torch.linspace(-1, 1, leaf.numel(), dtype=leaf.dtype).reshape(leaf.shape)
        total = total + (w * leaf).sum() + (i + 1) * (leaf**2).mean()
    return total


def _step(forward, sources, mode, seed):
    """One training step from ``seed``: the output, the gradients, and the RNG state after."""
    torch.manual_seed(seed)
    y = forward()
    loss = _loss(y)
    if mode == "grad":
        grads = torch.autograd.grad(loss, sources, allow_unused=True)
    else:
        for s in sources:
            s.grad = None
        loss.backward()
        grads = [s.grad for s in sources]
        for s in sources:
            s.grad = None
    return y, list(grads), torch.get_rng_state()


def _is_shape(s) -> bool:
    return isinstance(s, tuple) and all(isinstance(i, int) for i in s)


@st.composite
def cases(draw, prefix: bool = False, dropouts=(0.0, 0.3)):
    """A random input tree, codecs (per leaf, or a genuine prefix tree), blocks and a mode."""
    structure = draw(trees())
    seed = draw(st.integers(0, 1000))
    n = len(optree.tree_leaves(structure, is_leaf=_is_shape))
    flags = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    x = materialize(structure, seed, flags)
    if prefix:
        codec_tree, codecs = draw(codec_prefixes(x))
    else:
        leaves, spec = optree.tree_flatten(x)
        codecs = [codec_for(leaf, draw(st.integers(0, 3))) for leaf in leaves]
        codec_tree = spec.unflatten(codecs)
    depth = draw(st.integers(1, 3))
    return dict(
        x=x,
        codecs=codecs,
        codec_tree=codec_tree,
        depth=depth,
        dropout=draw(st.sampled_from(dropouts)),
        route=draw(st.sampled_from(["f", "g", "both"])),
        mode=draw(st.sampled_from(["backward", "grad"])),
        with_ctx=draw(st.booleans()),
        reversible=draw(
            st.one_of(st.just(True), st.lists(st.booleans(), min_size=depth, max_size=depth))
        ),
        # the activations the stack may store, as a fraction of all its blocks': none, some
        # blocks, every block
        budget=draw(st.one_of(st.just(0.0), st.floats(0.2, 0.9), st.just(float("inf")))),
        seed=seed,
    )


def _check_against_reference(case) -> list:
    """Outputs, gradients of every source and the RNG stream after a step, against plain
    autograd written independently of revtree (``helpers.reference``, per-leaf codecs)."""
    x, codecs = case["x"], case["codecs"]
    blocks = make_blocks(half_widths(x, codecs), case["depth"], case["dropout"], case["seed"])
    upstream = nn.Parameter(torch.linspace(-1, 1, 3, dtype=torch.float64))
    ctx_leaf = torch.linspace(0.5, -0.5, 4, dtype=torch.float64, requires_grad=True)
    route = case["route"]

    def kwargs():
        if not case["with_ctx"]:
            return {}
        # a leaf tensor and non-leaf tensors that need gradients, in a nested tree, beside
        # non-tensor leaves
        ctx = {"c": (upstream * 2).sin(), "k": [upstream.exp(), torch.arange(3)], "leaf": ctx_leaf}
        return {"ctx": ctx, "scale": 0.5}

    seq = revtree.ReversibleSequence(
        blocks,
        codec=case["codec_tree"],
        reversible=case["reversible"],
        route=route,
    )
    budget = case.get("budget", 0.0)
    if 0 < budget < float("inf"):
        seq.memory_budget = float("inf")  # plan every block as stored, to learn their sizes
        budget *= sum(seq.plan(x, **kwargs()).activation_bytes)
    seq.memory_budget = budget
    plain = revtree.ReversibleSequence(
        blocks, codec=case["codec_tree"], reversible=False, route=route
    )
    inputs = [leaf for leaf in optree.tree_leaves(x) if leaf.requires_grad]
    params = list(seq.parameters())
    sources = [*inputs, *params, upstream, ctx_leaf]

    def ref():
        kw = kwargs()
        f_kw = kw if route in ("f", "both") else {}
        g_kw = kw if route in ("g", "both") else {}
        return reference(x, blocks, codecs, f_kw, g_kw)

    mode, seed = case["mode"], case["seed"]
    y_ref, g_ref, rng_ref = _step(ref, sources, mode, seed)
    y_plain, g_plain, rng_plain = _step(lambda: plain(x, **kwargs()), sources, mode, seed)
    y_rev, g_rev, rng_rev = _step(lambda: seq(x, **kwargs()), sources, mode, seed)

    # not vacuous: the reference reaches every input, parameter and (when given) keyword tensor
    used = len(sources) if case["with_ctx"] else len(inputs) + len(params)
    assert all(g is not None for g in g_ref[:used])
    assert_trees_close(y_plain, y_ref, what="reversible=False output")
    assert_trees_close(y_rev, y_ref, what="reversible output")
    assert_trees_close(g_plain, g_ref, what="reversible=False gradient")
    assert_trees_close(g_rev, g_ref, what="reversible gradient")
    assert torch.equal(rng_rev, rng_ref), "the RNG stream after a step differs from plain autograd"
    assert torch.equal(rng_plain, rng_ref)
    if mode == "grad":
        assert all(s.grad is None for s in sources), "autograd.grad wrote .grad"
    return g_rev


@given(cases())
def test_gradients_equal_plain_autograd(case):
    _check_against_reference(case)


@pytest.mark.parametrize("mode", ["backward", "grad"])
@given(case=cases(prefix=True, dropouts=(0.2, 0.5)))
def test_prefix_codec_tree_gradients_equal_plain_autograd(mode, case):
    """The codec is a prefix tree: some subtrees (sometimes the whole input) share one codec.

    Every gradient (inputs, parameters, keyword tensors and the parameter upstream of them)
    equals plain autograd's, with dropout in f and g, under ``backward()`` and
    ``autograd.grad``.
    """
    _check_against_reference({**case, "mode": mode, "with_ctx": True})


PREFIXES = {
    # flattening order: a, b.cls, b.pos[0], b.pos[1].pos, b.pos[1].vel
    "subtree shares one": (
        {"a": Split(-1), "b": Duplicate()},
        [Split(-1), Duplicate(), Duplicate(), Duplicate(), Duplicate()],
    ),
    "one for everything": (Duplicate(), [Duplicate()] * 5),
    "nested": (
        {"a": Rearrange(INTERLEAVE, two=2), "b": {"cls": Split(0), "pos": Split(-1)}},
        [Rearrange(INTERLEAVE, two=2), Split(0), Split(-1), Split(-1), Split(-1)],
    ),
}


@pytest.mark.parametrize("mode", ["backward", "grad"])
@pytest.mark.parametrize("name", PREFIXES)
def test_prefix_codec_tree_gradients_nonzero(name, mode):
    """Fixed prefix trees (the shared codec covering a nested subtree): nonzero and equal."""
    x = {
        "a": t(2, 3, 4),
        "b": {
            "cls": t(2, 4, seed=1),
            "pos": [t(2, 6, seed=2), Point(t(3, 2, seed=3), t(3, 4, seed=4))],
        },
    }
    codec_tree, codecs = PREFIXES[name]
    case = dict(
        x=x,
        codecs=codecs,
        codec_tree=codec_tree,
        depth=3,
        dropout=0.2,  # small enough that no leaf's update is dropped entirely at this seed
        route="both",
        mode=mode,
        with_ctx=True,
        reversible=True,
        seed=0,
    )
    grads = _check_against_reference(case)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("mode", ["backward", "grad"])
def test_gradients_nonzero_and_complete(mode):
    """A guard against a vacuous comparison: every source gets a nonzero gradient."""
    x = {"a": t(2, 4), "b": [t(3, 2, seed=1)]}
    codecs = [codec_for(leaf, 0) for leaf in optree.tree_leaves(x)]
    blocks = make_blocks(half_widths(x, codecs), 3, dropout=0.2)
    upstream = nn.Parameter(torch.ones(3, dtype=torch.float64))
    seq = revtree.ReversibleSequence(blocks)
    sources = [*optree.tree_leaves(x), upstream, *seq.parameters()]
    _, grads, _ = _step(lambda: seq(x, ctx=upstream * 3), sources, mode, 0)
    _, expected, _ = _step(
        lambda: reference(x, blocks, codecs, {"ctx": upstream * 3}), sources, mode, 0
    )
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert_trees_close(grads, expected)


def test_gradcheck_nested_tree():
    x = {"a": t(2, 4), "b": (t(2, 2, seed=1),)}
    codecs = [codec_for(leaf, c) for leaf, c in zip(optree.tree_leaves(x), [0, 1])]
    spec = optree.tree_structure(x)
    blocks = make_blocks(half_widths(x, codecs), 2)
    seq = revtree.ReversibleSequence(blocks, codec=spec.unflatten(codecs))
    ctx = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def fn(a, b, c):
        y = seq({"a": a, "b": (b,)}, ctx=c)
        return y["a"], y["b"][0]

    assert torch.autograd.gradcheck(fn, (x["a"], x["b"][0], ctx), atol=TOL * 100)
