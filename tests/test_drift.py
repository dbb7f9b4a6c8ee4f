"""The drift guard and ``reconstruction_errors``: errors measured against the input leaf."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import revtree
from revtree._drift import check, relative_errors, sample
from revtree._layout import Layout
from revtree.codecs import Split, ZeroVelocity
from revtree.couplings import Momentum
from revtree.testing import reconstruction_errors


class Scaled(nn.Module):
    def __init__(self, net, factor):
        super().__init__()
        self.net, self.factor = net, factor

    def forward(self, x):
        return self.net(x) * self.factor


def _momentum_stack(factor=1.0, check_drift=None):
    """A float32 momentum stack whose velocity starts at exactly zero; block 2's g scaled."""
    g = torch.Generator().manual_seed(0)

    def mlp():
        net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        return net

    blocks = [(mlp(), mlp()) for _ in range(5)]
    seq = revtree.ReversibleSequence(
        blocks, codec=ZeroVelocity(), coupling=Momentum(0.9), check_drift=check_drift
    )
    seq.blocks[2].g = Scaled(seq.blocks[2].g, factor)
    x = torch.randn(8, 16, generator=g, requires_grad=True)
    return seq, x


@pytest.mark.parametrize(
    "exact, rebuilt, expected",
    [
        # a zero stream (the velocity) is measured against its partner (the position)
        ([[2.0, -4.0], [0.0, 0.0]], [[2.0, -4.0], [0.5, 0.0]], [0.0, 0.125]),
        # the larger stream sets the scale of both
        ([[1.0, 1.0], [8.0, 0.0]], [[1.5, 1.0], [8.0, 2.0]], [0.0625, 0.25]),
        # a leaf zero in both streams: its absolute error
        ([[0.0], [0.0]], [[0.0], [0.25]], [0.0, 0.25]),
    ],
)
def test_relative_errors_divide_by_the_input_leaf(exact, rebuilt, expected):
    exact_, rebuilt_ = [torch.tensor(v) for v in exact], [torch.tensor(v) for v in rebuilt]
    assert relative_errors(rebuilt_, exact_) == expected


def test_relative_errors_pair_the_streams_of_each_leaf():
    # two leaves: [a1, b1, a2, b2]; b's velocity is zero, a's position is large
    exact = [torch.tensor([100.0]), torch.tensor([2.0]), torch.tensor([0.0]), torch.zeros(1)]
    rebuilt = [torch.tensor([100.0]), torch.tensor([2.0]), torch.tensor([0.0]), torch.ones(1)]
    assert relative_errors(rebuilt, exact) == [0.0, 0.0, 0.0, 0.5]


def test_relative_errors_of_empty_leaves_are_zero():
    empty = [torch.zeros(0), torch.zeros(0)]
    assert relative_errors(empty, empty) == [0.0, 0.0]


def test_check_names_the_block_the_stream_and_the_leaf():
    x = {"a": torch.ones(8), "b": torch.cat((torch.full((4,), 3.0), torch.zeros(4)))}
    layout = Layout.build(x, Split(-1), "")
    exact = layout.encode([x["a"], x["b"]])  # [[a1, b1], [a2, b2]]
    rebuilt = [list(part) for part in exact]
    rebuilt[1][1] = torch.full((4,), 0.3)  # x2 of the second leaf: 0.3 / 3 = 0.1
    summaries = sample([t for part in exact for t in part])
    assert not check(7, layout, rebuilt, summaries, 0.2)
    match = r"block 7: its input x2 at x\['b'\] .* relative error 1\.00e-01"
    with pytest.warns(revtree.RevtreeWarning, match=match):
        assert check(7, layout, rebuilt, summaries, 0.05)


def test_check_sees_drift_anywhere_in_a_leaf():
    """One entry off, in a row the strided sample skips, is still seen."""
    rows = torch.randn(4096, 8, dtype=torch.float64)
    layout = Layout.build(rows, Split(-1), "")
    exact = layout.encode([rows])
    rebuilt = [[t.clone() for t in part] for part in exact]
    rebuilt[0][0][1, 2] += 1.4e-2 * rows.abs().max()  # row 1: not among the 64 sampled
    summaries = sample([t for part in exact for t in part])
    assert not check(3, layout, exact, summaries, 1e-6)
    with pytest.warns(revtree.RevtreeWarning, match=r"block 3: its input x1 .* 1\.40e-02"):
        assert check(3, layout, rebuilt, summaries, 1e-3)


def test_guard_is_quiet_on_a_healthy_zero_velocity_stack():
    seq, x = _momentum_stack(check_drift=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seq(x).pow(2).sum().backward()


def test_guard_fires_on_an_ill_conditioned_zero_velocity_stack():
    seq, x = _momentum_stack(factor=1e4, check_drift=1e-3)
    with pytest.warns(revtree.RevtreeWarning, match=r"block 2: its input x. at x ") as seen:
        seq(x).pow(2).sum().backward()
    assert len(seen) == 1


def test_reconstruction_errors_are_small_on_a_healthy_zero_velocity_stack():
    seq, x = _momentum_stack()
    drift = reconstruction_errors(seq, x)
    assert max(max(d.local, d.accumulated) for d in drift) < 1e-5, drift


def test_reconstruction_errors_find_the_ill_conditioned_momentum_block():
    seq, x = _momentum_stack(factor=1e4)
    drift = reconstruction_errors(seq, x)
    assert max(drift, key=lambda d: d.local).index == 2
    assert drift[2].local > 1e-3 and drift[0].accumulated > 1e-3
    assert all(d.local < 1e-5 for d in drift if d.index != 2)
    assert drift[3].accumulated < 1e-5


def test_drift_guard_ignores_what_the_forward_made_non_finite():
    nan = float("nan")
    exact = [torch.tensor([1.0, nan, 2.0]), torch.tensor([float("inf"), 1.0, 1.0])]
    # the forward's own NaN and inf, rebuilt as NaN: nothing finite was lost
    same = [torch.tensor([1.0, nan, 2.0]), torch.tensor([nan, 1.0, 1.0])]
    assert relative_errors(same, exact) == [0.0, 0.0]
    lost = [torch.tensor([nan, nan, 2.0]), torch.tensor([nan, 1.0, 1.0])]
    assert math.isnan(relative_errors(lost, exact)[0])
