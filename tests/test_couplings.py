"""Every coupling: gradients equal plain autograd, inverse(forward(x)) == x, gradcheck."""

from __future__ import annotations

import optree
import pytest
import torch
from helpers import (
    TreeMixer,
    assert_trees_close,
    codec_for,
    grads,
    materialize,
    t,
    trees,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import revtree
from revtree.codecs import Split, ZeroVelocity
from revtree.couplings import Additive, Affine, Coupling, Momentum
from revtree.testing import compare_gradients, reconstruction_errors


class Shear(Coupling):
    """A coupling written by a user: y1 = x1 + f(x2), y2 = x2 - 0.5 g(y1)."""

    def forward(self, f, g, x1, x2):
        y1 = optree.tree_map(torch.add, x1, f(x2))
        return y1, optree.tree_map(lambda a, b: a - 0.5 * b, x2, g(y1))

    def inverse(self, f, g, y1, y2):
        x2 = optree.tree_map(lambda a, b: a + 0.5 * b, y2, g(y1))
        return optree.tree_map(torch.sub, y1, f(x2)), x2


class PairMixer(nn.Module):
    """For the affine coupling: a (log-scale, shift) pair of trees."""

    def __init__(self, widths, dropout=0.0, seed=0):
        super().__init__()
        self.scale = TreeMixer(widths, dropout, seed)
        self.shift = TreeMixer(widths, dropout, seed + 1000)

    def forward(self, tree, ctx=None):
        return self.scale(tree, ctx), self.shift(tree, ctx)


COUPLINGS = {
    "additive": Additive(),
    "affine": Affine(bound=1.5),
    "momentum": Momentum(gamma=0.8),
    "shear": Shear(),
}


def _blocks(name, widths, depth, dropout, seed):
    kind = PairMixer if name == "affine" else TreeMixer
    return [
        (kind(widths, dropout, seed + 2 * i), kind(widths, dropout, seed + 2 * i + 1))
        for i in range(depth)
    ]


def _plain_reference(coupling, blocks, x, codecs, ctx):
    """Plain autograd straight from the coupling's definition, without the engine."""
    leaves, spec = optree.tree_flatten(x)
    pairs = [c.encode(leaf, ()) for c, leaf in zip(codecs, leaves)]
    x1, x2 = spec.unflatten([p[0] for p in pairs]), spec.unflatten([p[1] for p in pairs])
    for f, g in blocks:
        x1, x2 = coupling.forward(lambda tr, f=f: f(tr, ctx=ctx), g, x1, x2)
    y1, y2 = optree.tree_leaves(x1), optree.tree_leaves(x2)
    return spec.unflatten([c.decode(a, b, ()) for c, a, b in zip(codecs, y1, y2)])


def _loss(y):
    return sum(
        (torch.linspace(-1, 1, leaf.numel(), dtype=leaf.dtype).reshape(leaf.shape) * leaf).sum()
        + leaf.pow(2).mean()
        for leaf in optree.tree_leaves(y)
    )


@st.composite
def cases(draw):
    structure = draw(trees())
    seed = draw(st.integers(0, 1000))
    x = materialize(structure, seed)
    leaves, spec = optree.tree_flatten(x)
    name = draw(st.sampled_from(sorted(COUPLINGS)))
    if name == "momentum":
        codecs = [ZeroVelocity() for _ in leaves]
    else:
        codecs = [codec_for(leaf, draw(st.sampled_from([0, 1, 2, 3]))) for leaf in leaves]
    return dict(
        x=x,
        codecs=codecs,
        codec_tree=spec.unflatten(codecs),
        name=name,
        seed=seed,
        depth=draw(st.integers(1, 3)),
        dropout=draw(st.sampled_from([0.0, 0.3])),
        mode=draw(st.sampled_from(["backward", "grad"])),
    )


@given(cases())
def test_gradients_equal_plain_autograd(case):
    x, codecs, name = case["x"], case["codecs"], case["name"]
    coupling = COUPLINGS[name]
    blocks = _blocks(name, half_widths_for(x, codecs), case["depth"], case["dropout"], case["seed"])
    upstream = nn.Parameter(torch.linspace(-1, 1, 3, dtype=torch.float64))
    seq = revtree.ReversibleSequence(blocks, codec=case["codec_tree"], coupling=coupling)
    sources = [*optree.tree_leaves(x), upstream, *seq.parameters()]

    def step(forward):
        torch.manual_seed(case["seed"])
        return grads(_loss(forward()), sources, case["mode"])

    expected = step(lambda: _plain_reference(coupling, blocks, x, codecs, upstream.sin()))
    actual = step(lambda: seq(x, ctx=upstream.sin()))
    assert_trees_close(list(actual), list(expected), what=f"{name} gradient")


def half_widths_for(x, codecs):
    return [c.encode(leaf, ())[0].shape[-1] for c, leaf in zip(codecs, optree.tree_leaves(x))]


@given(cases())
def test_inverse_of_forward_is_the_identity(case):
    if case["name"] == "momentum":
        case["codecs"] = [Split(-1) for _ in case["codecs"]]
        case["codec_tree"] = Split(-1)
    x, codecs, name = case["x"], case["codecs"], case["name"]
    if not all(c.bijective for c in codecs):
        return
    blocks = _blocks(name, half_widths_for(x, codecs), case["depth"], 0.0, case["seed"])
    seq = revtree.ReversibleSequence(blocks, codec=case["codec_tree"], coupling=COUPLINGS[name])
    with torch.no_grad():
        y = seq(x, ctx=torch.ones(2, dtype=torch.float64))
        back = seq.inverse(y, ctx=torch.ones(2, dtype=torch.float64))
    assert_trees_close(back, optree.tree_map(torch.Tensor.detach, x), tol=1e-10)


@pytest.mark.parametrize("name", sorted(COUPLINGS))
def test_gradcheck_nested_tree(name):
    x = {"a": t(2, 4), "b": (t(2, 2, seed=1),)}
    codecs = [Split(-1), Split(-1)]
    if name == "momentum":
        codecs = [ZeroVelocity(), ZeroVelocity()]
    spec = optree.tree_structure(x)
    blocks = _blocks(name, half_widths_for(x, codecs), 2, 0.0, 0)
    seq = revtree.ReversibleSequence(blocks, codec=spec.unflatten(codecs), coupling=COUPLINGS[name])
    ctx = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def fn(a, b, c):
        y = seq({"a": a, "b": (b,)}, ctx=c)
        return y["a"], y["b"][0]

    assert torch.autograd.gradcheck(fn, (x["a"], x["b"][0], ctx))


@pytest.mark.parametrize("name", sorted(COUPLINGS))
def test_compare_gradients_helper_passes_on_every_coupling(name):
    x = {"a": t(3, 4), "b": t(3, 6, seed=1)}
    codec = ZeroVelocity() if name == "momentum" else Split(-1)
    codecs = [codec, codec]
    blocks = _blocks(name, half_widths_for(x, codecs), 3, 0.2, 0)
    seq = revtree.ReversibleSequence(blocks, codec=codec, coupling=COUPLINGS[name])
    ctx = nn.Parameter(torch.ones(2, dtype=torch.float64))
    rng = torch.get_rng_state()
    report = compare_gradients(seq, x, ctx=ctx * 2)
    assert report.worst < 1e-10, str(report)
    assert "x['a']" in report.differences and "kwargs['ctx']" in report.differences
    assert any(name.startswith("blocks.2.g.") for name in report.differences)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in seq.parameters())


class Stateful(nn.Module):
    """Batch norm with running statistics, dropout, and a call counter replaced by assignment."""

    def __init__(self, width, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(width, width, bias=False, dtype=torch.float64)  # BN cancels a bias
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(width, width, generator=g, dtype=torch.float64))
        self.bn = nn.BatchNorm1d(width, dtype=torch.float64)
        self.dropout = nn.Dropout(0.2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls = self.calls + 1
        return self.dropout(torch.tanh(self.bn(self.lin(x))))


def _run_helper(helper, seq, x):
    if helper == "compare_gradients":
        assert compare_gradients(seq, x).worst < 1e-10
    else:
        assert max(d.accumulated for d in reconstruction_errors(seq, x)) < 1e-10


def _never(*args, **kwargs):
    raise AssertionError("a testing helper reseeded a global generator")


@pytest.mark.parametrize("preset_grads", [False, True])
@pytest.mark.parametrize("name", ["additive", "momentum"])
@pytest.mark.parametrize("helper", ["compare_gradients", "reconstruction_errors"])
def test_helpers_leave_the_model_and_the_generators_as_they_were(
    helper, name, preset_grads, monkeypatch
):
    width = 8 if name == "momentum" else 4
    codec = ZeroVelocity() if name == "momentum" else Split(-1)
    blocks = [(Stateful(width, 2 * i), Stateful(width, 2 * i + 1)) for i in range(3)]
    seq = revtree.ReversibleSequence(blocks, codec=codec, coupling=COUPLINGS[name])
    x = t(16, 8)
    seq(x).sum().backward()  # running statistics away from their initial values
    if not preset_grads:
        seq.zero_grad(set_to_none=True)
    grads = {n: p.grad for n, p in seq.named_parameters()}
    grad_values = {n: None if g is None else g.clone() for n, g in grads.items()}
    params = {n: (p, p.detach().clone()) for n, p in seq.named_parameters()}
    buffers = {n: (b, b.clone()) for n, b in seq.named_buffers()}
    rng = torch.get_rng_state()
    for module, fn in [(torch, "manual_seed"), (torch.random, "manual_seed")]:
        monkeypatch.setattr(module, fn, _never)
    for fn in ["manual_seed", "manual_seed_all", "seed", "seed_all"]:
        monkeypatch.setattr(torch.cuda, fn, _never)

    _run_helper(helper, seq, x)

    assert torch.equal(torch.get_rng_state(), rng)
    assert dict(seq.named_buffers()).keys() == buffers.keys()
    for n, b in seq.named_buffers():
        assert b is buffers[n][0] and torch.equal(b, buffers[n][1]), n
    for n, p in seq.named_parameters():
        assert p is params[n][0] and torch.equal(p, params[n][1]), n
        assert p.grad is grads[n], n
        assert p.grad is None or torch.equal(p.grad, grad_values[n]), n


class Leaky(Additive):
    """A deliberately wrong coupling: its inverse is off by a little."""

    def uncombine(self, y, *update):
        return y - 1.001 * update[0]


def test_helpers_catch_a_wrong_backward():
    x = {"a": t(3, 4), "b": t(3, 6, seed=1)}
    blocks = _blocks("additive", [2, 3], 4, 0.0, 0)
    seq = revtree.ReversibleSequence(blocks, coupling=Leaky())
    report = compare_gradients(seq, x)
    assert report.worst > 1e-4 and report.where is not None
    drift = reconstruction_errors(seq, x)
    assert all(d.local > 1e-5 for d in drift)
    assert drift[0].accumulated >= drift[-1].accumulated * 0.5
    good = reconstruction_errors(revtree.ReversibleSequence(blocks), x)
    assert max(d.accumulated for d in good) < 1e-12


def test_reconstruction_errors_find_the_ill_conditioned_block():
    """A block whose g swamps its stream (x2 + 1e6 * g) loses x2 to float32 rounding."""
    blocks = [(TreeMixer([8], seed=i), TreeMixer([8], seed=i + 50)) for i in range(6)]
    seq = revtree.ReversibleSequence(blocks).float()
    seq.blocks[3].g = Scaled(seq.blocks[3].g, 1e6)
    drift = reconstruction_errors(seq, torch.randn(16, 16))
    assert max(drift, key=lambda d: d.local).index == 3
    assert drift[3].local > 1e-3 and drift[0].accumulated > 1e-3
    assert all(d.local < 1e-5 for d in drift if d.index != 3)
    assert drift[4].accumulated < 1e-5  # above the bad block, nothing has drifted yet


class Scaled(nn.Module):
    def __init__(self, net, factor):
        super().__init__()
        self.net, self.factor = net, factor

    def forward(self, tree):
        return optree.tree_map(lambda v: v * self.factor, self.net(tree))


def test_momentum_inverse_refuses_zero_velocity():
    blocks = _blocks("momentum", [4], 2, 0.0, 0)
    seq = revtree.ReversibleSequence(blocks, codec=ZeroVelocity(), coupling=Momentum())
    y = seq(t(2, 4))
    with pytest.raises(revtree.RevtreeError, match="cannot split the output back"):
        seq.inverse(y)


def test_affine_f_must_return_a_pair():
    blocks = _blocks("additive", [2], 1, 0.0, 0)
    seq = revtree.ReversibleSequence(blocks, coupling=Affine())
    with pytest.raises(revtree.RevtreeError, match=r"block 0: f returned .*PyTreeSpec\(\(\*, \*\)"):
        seq(t(2, 4))


def test_bad_coupling_and_parameters():
    with pytest.raises(revtree.RevtreeError, match="not a revtree Coupling"):
        revtree.ReversibleSequence([], coupling="additive")
    with pytest.raises(ValueError, match="gamma"):
        Momentum(gamma=0.0)
    with pytest.raises(ValueError, match="bound"):
        Affine(bound=-1)


def test_momentum_g_returning_none_skips_its_step():
    """An odd number of momentum steps: the last block's g returns None, and nothing moves."""
    torch.manual_seed(0)
    hs = [nn.Sequential(nn.Linear(4, 4), nn.Tanh()).double() for _ in range(3)]
    skip = revtree.Fn(lambda x: None)
    seq = revtree.ReversibleSequence([(hs[0], hs[1]), (hs[2], skip)], coupling=Momentum(0.8))
    x1 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    x = torch.cat([x1, x2], -1)  # Split(-1): position, velocity

    def plain(p, v):  # the momentum steps by hand
        for h in hs:
            v = 0.8 * v + 0.2 * h(p)
            p = p + v
        return torch.cat([p, v], -1)

    w = torch.randn(5, 8, dtype=torch.float64)
    got = torch.autograd.grad((seq(x) * w).sum(), [x1, x2, *seq.parameters()])
    want = torch.autograd.grad((plain(x1, x2) * w).sum(), [x1, x2, *seq.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(seq.inverse(seq(x)), x, rtol=1e-10, atol=1e-12)


def test_none_is_refused_by_couplings_that_do_not_skip():
    seq = revtree.ReversibleSequence(
        [(nn.Linear(2, 2), revtree.Fn(lambda x: None))], coupling=Shear()
    )
    # a coupling that does not skip gets the None, and its error names the block
    with pytest.raises(revtree.RevtreeError, match=r"block 0: Shear\(\)\.forward raised TypeError"):
        seq(torch.randn(3, 4))
