"""What a newcomer reaches for: plain functions as f and g, builders, None for no update,
saved_bytes, a drift check that raises; each against plain autograd written by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TreeMixer, assert_trees_close, t
from torch import nn

import revtree
from revtree.couplings import Affine
from revtree.testing import held_bytes, saved_bytes

D = torch.float64


def lin(width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width, dtype=D), nn.Tanh())


def test_plain_functions_as_f_and_g():
    w = torch.randn(2, 2, dtype=D)
    blocks = [(torch.tanh, lambda x: (x @ w).sin()), (lambda x: x * 0.5, torch.cos)]
    seq = revtree.ReversibleSequence(blocks)
    assert isinstance(seq.blocks[0].f, revtree.Fn) and list(seq.parameters()) == []
    x = t(3, 4)

    def by_hand(x):
        x1, x2 = x[..., :2], x[..., 2:]
        for f, g in blocks:
            x1 = x1 + f(x2)
            x2 = x2 + g(x1)
        return torch.cat((x1, x2), -1)

    (got,) = torch.autograd.grad(seq(x).pow(2).sum(), [x])
    (expected,) = torch.autograd.grad(by_hand(x).pow(2).sum(), [x])
    assert_trees_close(got, expected)


@pytest.mark.parametrize("n", [4, 5])
def test_from_layers_pairs_residual_branches(n):
    torch.manual_seed(0)
    layers = nn.Sequential(*(lin(8) for _ in range(n)))
    seq = revtree.ReversibleSequence.from_layers(copy.deepcopy(layers))
    assert len(seq.blocks) == (n + 1) // 2
    x = t(3, 8)

    def by_hand(x):  # Duplicate: both streams start as x; the output is their mean
        x1, x2 = x, x
        for i in range(0, n, 2):
            x1 = x1 + layers[i](x2)
            if i + 1 < n:
                x2 = x2 + layers[i + 1](x1)
        return (x1 + x2) / 2

    sources = [x, *seq.parameters()]
    got = torch.autograd.grad(seq(x).pow(2).sum(), sources)
    expected = torch.autograd.grad(by_hand(x).pow(2).sum(), [x, *layers.parameters()])
    assert_trees_close(list(got), list(expected))


def test_from_factory_makes_fresh_functions():
    seq = revtree.ReversibleSequence.from_factory(lambda: lin(2), 3)
    assert len(seq.blocks) == 3
    assert len({id(m) for b in seq.blocks for m in (b.f, b.g)}) == 6


class Partial(nn.Module):
    """Updates leaf 'a' only: None for 'b', which it leaves as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2, dtype=D)

    def forward(self, tree):
        return {"a": torch.tanh(self.a(tree["a"]) + tree["b"].mean()), "b": None}


@pytest.mark.parametrize("mode", ["backward", "grad"])
def test_none_for_a_leaf_leaves_it_unchanged(mode):
    torch.manual_seed(1)
    blocks = [(Partial(), Partial()) for _ in range(2)]
    seq = revtree.ReversibleSequence(blocks)
    x = {"a": t(3, 4), "b": t(3, 4, seed=1)}

    def by_hand(x):
        x1 = {k: v[..., :2] for k, v in x.items()}
        x2 = {k: v[..., 2:] for k, v in x.items()}
        for f, g in blocks:
            x1 = {"a": x1["a"] + f(x2)["a"], "b": x1["b"]}
            x2 = {"a": x2["a"] + g(x1)["a"], "b": x2["b"]}
        return {k: torch.cat((x1[k], x2[k]), -1) for k in x}

    sources = [*x.values(), *seq.parameters()]

    def grads(y):
        loss = (y["a"].pow(2) + y["b"].sin()).sum()
        if mode == "grad":
            return torch.autograd.grad(loss, sources)
        loss.backward()
        out = [s.grad.clone() for s in sources]
        for s in sources:
            s.grad = None
        return out

    assert_trees_close(list(grads(seq(x))), list(grads(by_hand(x))))
    with torch.no_grad():
        assert_trees_close(seq.inverse(seq(x)), x)


def test_none_for_an_affine_update_is_the_identity():
    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2, dtype=D)

        def forward(self, x):
            return None, self.lin(x)  # no log-scale: scale 1

    f, g = Shift(), Shift()
    seq = revtree.ReversibleSequence([(f, g)], coupling=Affine())
    x = t(3, 4)
    y1 = x[..., :2] + f.lin(x[..., 2:])
    y2 = x[..., 2:] + g.lin(y1)
    assert_trees_close(seq(x), torch.cat((y1, y2), -1))


def test_held_bytes_is_flat_in_depth_for_the_reversible_stack():
    x = t(16, 8)
    held = {}
    for depth in (2, 8):
        blocks = [(lin(), lin()) for _ in range(depth)]
        seq = revtree.ReversibleSequence(blocks)
        held[depth] = held_bytes(seq, x)
        assert saved_bytes(seq, x) == 0  # nothing beyond its output
        plain = saved_bytes(revtree.ReversibleSequence(blocks, reversible=False), x)
        assert plain >= depth * held[depth] / 2  # two inputs saved per block
    assert held[2] == held[8] == 16 * 8 * 8  # the output, once, float64


def test_a_drift_check_that_raises():
    blocks = [(TreeMixer([8], seed=1), TreeMixer([8], seed=2))]

    class Inf(nn.Module):
        def forward(self, tree):
            return [leaf * float("inf") for leaf in tree]

    seq = revtree.ReversibleSequence(
        [blocks[0], (blocks[0][0], Inf())], check_drift=1e-4, on_drift="raise"
    ).float()
    x = [torch.randn(16, 16, requires_grad=True)]
    with pytest.raises(revtree.RevtreeError, match=r"block 1: its input x. at x\[0\]"):
        seq(x)[0].sum().backward()
    with pytest.raises(revtree.RevtreeError, match="on_drift='loud'"):
        revtree.ReversibleSequence(blocks, on_drift="loud")
