"""Reversible gradients equal plain autograd, leaf by leaf, in float64, over random pytrees."""

from __future__ import annotations

import copy

import optree
import pytest
import torch
from helpers import (
    INTERLEAVE,
    TOL,
    Point,
    RichMixer,
    assert_trees_close,
    codec_for,
    codec_prefixes,
    grads,
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
        w = torch.linspace(-1, 1, leaf.numel(), dtype=leaf.dtype, device=leaf.device)
        w = w.reshape(leaf.shape)
        total = total + (w * leaf).sum() + (i + 1) * (leaf**2).mean()
    return total


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]
"""The property tests run on every device there is (CI has the CPU only)."""


def _on(x, device):
    """The tree ``x`` on ``device``: leaves again, requiring grad as they did."""
    return optree.tree_map(lambda t: t.detach().to(device).requires_grad_(t.requires_grad), x)


def _rng_states():
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.append(torch.cuda.get_rng_state())
    return states


def _step(forward, sources, mode, seed, loss_of=None):
    """One training step from ``seed``: the output, the gradients, and the RNG states after."""
    torch.manual_seed(seed)
    y = forward()
    loss = _loss(y) if loss_of is None else loss_of(y)
    return y, grads(loss, sources, mode), _rng_states()


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
        # without tensors among the keyword arguments: plain values alone, or none
        values_only=draw(st.booleans()),
        reversible=draw(
            st.one_of(st.just(True), st.lists(st.booleans(), min_size=depth, max_size=depth))
        ),
        # the activations the stack may store, as a fraction of all its blocks': none, some
        # blocks, every block
        budget=draw(st.one_of(st.just(0.0), st.floats(0.2, 0.9), st.just(float("inf")))),
        seed=seed,
    )


def _check_against_reference(case, device="cpu") -> list:
    """Outputs, gradients of every source and the RNG stream after a step, against plain
    autograd written independently of revtree (``helpers.reference``, per-leaf codecs)."""
    x, codecs = _on(case["x"], device), case["codecs"]
    blocks = make_blocks(half_widths(x, codecs), case["depth"], case["dropout"], case["seed"])
    blocks = [(f.to(device), g.to(device)) for f, g in blocks]
    upstream = nn.Parameter(torch.linspace(-1, 1, 3, dtype=torch.float64, device=device))
    ctx_leaf = torch.linspace(0.5, -0.5, 4, dtype=torch.float64, device=device).requires_grad_()
    route = case["route"]

    def kwargs():
        if not case["with_ctx"]:
            return {"scale": 0.5} if case.get("values_only") else {}
        # a leaf tensor and non-leaf tensors that need gradients, in a nested tree, beside
        # non-tensor leaves
        ctx = {
            "c": (upstream * 2).sin(),
            "k": [upstream.exp(), torch.arange(3, device=device)],
            "leaf": ctx_leaf,
        }
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
    assert all(map(torch.equal, rng_rev, rng_ref)), "the RNG stream after a step differs"
    assert all(map(torch.equal, rng_plain, rng_ref))
    if mode == "grad":
        assert all(s.grad is None for s in sources), "autograd.grad wrote .grad"
    return g_rev


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases())
def test_gradients_equal_plain_autograd(device, case):
    _check_against_reference(case, device)


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


# --------------------------------------------------- what real models do beside arithmetic


@st.composite
def rich_cases(draw, float32: bool = False):
    """A random tree and blocks with hooks, buffers, functional_call, unused leaves, islands."""
    structure = draw(trees())
    seed = draw(st.integers(0, 1000))
    x = materialize(structure, seed)
    leaves, spec = optree.tree_flatten(x)
    codecs = [codec_for(leaf, draw(st.integers(0, 3))) for leaf in leaves]
    return dict(
        x=x,
        codecs=codecs,
        codec_tree=spec.unflatten(codecs),
        depth=draw(st.integers(1, 3)),
        dropout=draw(st.sampled_from([0.0, 0.3])),
        counter=draw(st.sampled_from([None, "in place", "assign"])),
        hooks=draw(st.booleans()),
        functional=draw(st.booleans()),
        # which output leaves the loss reads (at least one): the others reach nothing
        used=draw(st.lists(st.booleans(), min_size=len(leaves), max_size=len(leaves)).filter(any)),
        mode=draw(st.sampled_from(["backward", "grad"])),
        island=float32,
        seed=seed,
    )


def _rich_step(case, device="cpu", steps=2):
    """Two training steps of revtree and of plain autograd (``helpers.reference``)."""
    x, codecs = case["x"], case["codecs"]
    dtype = torch.float32 if case["island"] else torch.float64
    x = optree.tree_map(lambda t: t.detach().to(device, dtype).requires_grad_(), x)
    widths = half_widths(x, codecs)
    blocks = [
        tuple(
            RichMixer(
                widths, case["dropout"], case["seed"] + 2 * i + j, case["counter"], case["island"]
            ).to(device, dtype)
            for j in range(2)
        )
        for i in range(case["depth"])
    ]
    ref = copy.deepcopy(blocks)
    fired = {"revtree": 0, "plain": 0}

    def hook(who):
        def double(grad):
            fired[who] += 1
            return grad * 2

        return double

    if case["hooks"]:
        for who, bs in (("revtree", blocks), ("plain", ref)):
            bs[0][0].mix.register_hook(hook(who))
    seq = revtree.ReversibleSequence(blocks, codec=case["codec_tree"])
    upstream = torch.tensor(1.25, dtype=dtype, device=device, requires_grad=True)
    names = [n for n, _ in seq.named_parameters()]
    ref_slots = [(m, n) for pair in ref for fn in pair for m in fn.modules() for n in m._parameters]

    def computed():  # a hypernetwork's output: the parameters, computed from upstream
        return [p.detach() * upstream for p in seq.parameters()]

    def run_revtree():
        if case["functional"]:
            return torch.func.functional_call(seq, dict(zip(names, computed())), (x,))
        return seq(x)

    def run_plain():
        if not case["functional"]:
            return reference(x, ref, codecs)
        originals = [m._parameters[n] for m, n in ref_slots]
        for (m, n), tensor in zip(ref_slots, computed()):
            m._parameters[n] = tensor
        try:
            return reference(x, ref, codecs)
        finally:
            for (m, n), tensor in zip(ref_slots, originals):
                m._parameters[n] = tensor

    def loss(y):  # the output leaves the loss reads; the others reach nothing
        leaves = optree.tree_leaves(y)
        return _loss([leaf for leaf, used in zip(leaves, case["used"]) if used])

    def forward(run):  # autocast around the forward only, as training loops run it
        if not case["island"]:
            return run()
        with torch.autocast(device, dtype=torch.bfloat16):
            return run()

    inputs = optree.tree_leaves(x)
    own = [list(seq.parameters()), [p for pair in ref for fn in pair for p in fn.parameters()]]
    for step in range(steps):
        seed = case["seed"] + step
        _, got, _ = _step(
            lambda: forward(run_revtree), [*inputs, upstream, *own[0]], case["mode"], seed, loss
        )
        _, expected, _ = _step(
            lambda: forward(run_plain), [*inputs, upstream, *own[1]], case["mode"], seed, loss
        )
        assert [g is None for g in got] == [g is None for g in expected], f"step {step}"
        tol = 1e-5 if case["island"] else TOL
        assert_trees_close(got, expected, tol=tol, what=f"step {step}")
        assert_trees_close(
            list(seq.buffers()), [b for pair in ref for fn in pair for b in fn.buffers()], tol=0
        )
    assert fired["revtree"] == fired["plain"]


@pytest.mark.parametrize("device", DEVICES)
@given(case=rich_cases())
def test_real_model_features_equal_plain_autograd(device, case):
    """Parameter hooks, buffers read and updated, functional_call with computed parameters
    and outputs the loss leaves out: every gradient (None where plain autograd gives None),
    every buffer, the hooks' calls, over two steps, against plain autograd in float64."""
    _rich_step(case, device)


@pytest.mark.parametrize("device", DEVICES)
@given(case=rich_cases(float32=True))
def test_float32_islands_under_autocast_equal_plain_autograd(device, case):
    """The same blocks, their linear maps in float32 islands, run under bfloat16 autocast and
    back-propagated outside it: the gradients of float32 arithmetic, as plain autograd's."""
    _rich_step(case, device)
