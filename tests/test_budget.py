"""The memory budget: what it stores stays within it, the gradients stay exact."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_trees_close, make_blocks, t
from torch import nn

import revtree
from revtree._budget import choose
from revtree.testing import held_bytes, saved_bytes

INF = float("inf")


def _held(seq, x, **kwargs) -> int:
    """The bytes a forward call leaves alive (the output included), each storage once."""
    return held_bytes(seq, x, exclude=[x, *kwargs.values()], **kwargs)


def _saved(seq, x, **kwargs) -> int:
    """As ``_held``, less the output."""
    return saved_bytes(seq, x, exclude=[x, *kwargs.values()], **kwargs)


def _mlp_blocks(depth: int, width: int = 16) -> list[tuple[nn.Module, nn.Module]]:
    torch.manual_seed(0)

    def mlp():
        return nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        ).double()

    return [(mlp(), mlp()) for _ in range(depth)]


def test_zero_and_unlimited_budgets():
    blocks = _mlp_blocks(6)
    x = t(32, 32)
    assert revtree.ReversibleSequence(blocks, memory_budget=INF).plan(x).stored == (True,) * 6
    assert revtree.ReversibleSequence(blocks).plan(x).stored == (False,) * 6
    plain = _saved(revtree.ReversibleSequence(blocks, reversible=False), x)
    held_plain = _held(revtree.ReversibleSequence(blocks, reversible=False), x)
    assert _held(revtree.ReversibleSequence(blocks, memory_budget=INF), x) == held_plain
    reversible = _held(revtree.ReversibleSequence(blocks), x)
    plan = revtree.ReversibleSequence(blocks).plan(x)
    assert reversible == plan.stream_bytes  # the output, held once: nothing else
    # the measured activations are what plain autograd stores (blocks overlap where one
    # block's saved output is the next one's saved input: the sum counts those twice)
    assert plain <= sum(plan.activation_bytes) <= 2 * plain


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_held_memory_stays_within_the_budget(fraction):
    blocks = _mlp_blocks(8)
    x = t(32, 32)
    plain = _saved(revtree.ReversibleSequence(blocks, reversible=False), x)
    budget = fraction * plain
    seq = revtree.ReversibleSequence(blocks, memory_budget=budget)
    plan = seq.plan(x)
    assert 0 < sum(plan.stored) < 8 and plan.used_bytes <= budget
    assert _saved(seq, x) <= budget + plan.stream_bytes


def test_choice_prefers_recomputation_per_byte_and_the_end():
    # block 1 is cheap to store for its cost (10 bytes, and 5 for the run it splits off)
    sizes, seconds = [100, 10, 100, 100], [1.0, 1.0, 1.0, 1.0]
    assert choose(sizes, seconds, 5, 15, [False] * 4) == (False, True, False, False)
    assert choose(sizes, seconds, 5, 14, [False] * 4) == (False,) * 4
    # ties go to the later blocks
    assert choose([100] * 4, [1.0] * 4, 5, 200, [False] * 4) == (False, False, True, True)
    # a stored block in the middle splits the reversible run: one more set of streams
    assert choose([100] * 3, [1.0, 5.0, 1.0], 50, 120, [False] * 3) == (False, False, True)
    # blocks built with reversible=False store whatever the budget
    assert choose([100] * 3, [1.0] * 3, 5, 0, [True, False, False]) == (True, False, False)


@pytest.mark.parametrize("mode", ["backward", "grad"])
@pytest.mark.parametrize("fraction", [0, 0.3, 0.6, INF])
def test_gradients_equal_plain_autograd_whatever_the_budget(fraction, mode):
    blocks = make_blocks([3, 2], 5, dropout=0.3, seed=1)
    x = {"a": t(4, 6), "b": t(4, 4, seed=1)}
    upstream = nn.Parameter(torch.linspace(-1, 1, 3, dtype=torch.float64))

    def step(seq):
        torch.manual_seed(7)
        y = seq(x, ctx={"c": (upstream * 2).sin()})
        loss = sum((leaf * leaf).sum() for leaf in y.values())
        sources = [*x.values(), *seq.parameters(), upstream]
        if mode == "grad":
            return list(torch.autograd.grad(loss, sources)), torch.get_rng_state()
        loss.backward()
        grads = [s.grad for s in sources]
        for s in sources:
            s.grad = None
        return grads, torch.get_rng_state()

    seq = revtree.ReversibleSequence(blocks, memory_budget=INF, route="both")
    plain = revtree.ReversibleSequence(blocks, reversible=False, route="both")
    seq.memory_budget = fraction * sum(seq.plan(x, ctx={"c": upstream.sin()}).activation_bytes)
    stored = seq.plan(x, ctx={"c": upstream.sin()}).stored
    assert sum(stored) == {0: 0, INF: 5}.get(fraction, sum(stored))
    assert 0 < sum(stored) < 5 or fraction in (0, INF)
    grads, rng = step(seq)
    expected, rng_plain = step(plain)
    assert_trees_close(grads, expected)
    assert torch.equal(rng, rng_plain)


class Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(4, dtype=torch.float64)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.norm(x))


def test_planning_leaves_random_state_and_buffers_alone():
    seq = revtree.ReversibleSequence([(Stateful(), Stateful()) for _ in range(3)], memory_budget=1)
    before = {k: v.clone() for k, v in seq.state_dict().items()}
    rng = torch.get_rng_state()
    seq.plan(t(8, 8))
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in seq.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_plan_per_input_signature():
    seq = revtree.ReversibleSequence(_mlp_blocks(4), memory_budget=100_000)
    small, large = seq.plan(t(8, 32)), seq.plan(t(64, 32))
    assert sum(small.stored) > sum(large.stored)
    assert seq.plan(t(8, 32, seed=3)) is small
    seq.memory_budget = 0
    assert not any(seq.plan(t(8, 32)).stored)


def test_plan_reads_well():
    text = str(revtree.ReversibleSequence(_mlp_blocks(3), memory_budget=INF).plan(t(8, 32)))
    assert "store" in text and "used" in text and "budget of unlimited" in text


def test_negative_budget_is_an_error():
    with pytest.raises(revtree.RevtreeError, match="memory_budget=-1"):
        revtree.ReversibleSequence(_mlp_blocks(1), memory_budget=-1)
