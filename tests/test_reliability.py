"""The training stack: torch.compile, the drift guard, long runs (distributed: test_distributed)."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from helpers import TreeMixer, assert_trees_close, t
from torch import nn

import revtree

# ---------------------------------------------------------------------------- compile


class ContextMixer(nn.Module):
    """A block function over a dict, reading a keyword context."""

    def __init__(self, widths, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.linears = nn.ModuleList(nn.Linear(w, w, dtype=torch.float64) for w in widths)
        self.mix = nn.Parameter(torch.randn(len(widths), generator=g, dtype=torch.float64))

    def forward(self, tree, ctx):
        mixed = sum(m * leaf.mean(-1, keepdim=True) for m, leaf in zip(self.mix, tree.values()))
        return {
            k: torch.tanh(lin(leaf) + mixed + ctx.sum())
            for (k, leaf), lin in zip(tree.items(), self.linears)
        }


class Model(nn.Module):
    """A reversible stack whose keyword context is computed from the model's own parameters."""

    def __init__(self, reversible: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.context = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.seq = revtree.ReversibleSequence(
            [
                (ContextMixer([2, 3], seed=2 * i), ContextMixer([2, 3], seed=2 * i + 1))
                for i in range(3)
            ],
            reversible=reversible,
            route="both",
        )

    def forward(self, x):
        y = self.seq(x, ctx=self.context.sin() * 2)
        return y["a"].pow(2).mean() + y["b"].mean()


def _batch():
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(8, w, generator=g, dtype=torch.float64) for k, w in (("a", 4), ("b", 6))}


# warnings dynamo raises from its own tracing machinery (its optree polyfill reads `.grad`
# of the non-leaf context; it instantiates the autograd Function class): harmless
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be")
@pytest.mark.parametrize("what", ["sequence", "blocks"])
def test_torch_compile_gives_plain_gradients(what):
    torch.compiler.reset()
    plain, model = Model(reversible=False), Model(reversible=True)
    expected = torch.autograd.grad(plain(_batch()), list(plain.parameters()))
    if what == "sequence":
        model.seq = torch.compile(model.seq, backend="aot_eager")
    else:
        for block in model.seq.blocks:
            block.f = torch.compile(block.f, backend="aot_eager")
            block.g = torch.compile(block.g, backend="aot_eager")
    grads = torch.autograd.grad(model(_batch()), list(model.parameters()))
    assert_trees_close(list(grads), list(expected))


# ------------------------------------------------------------------------- drift guard


class Scaled(nn.Module):
    def __init__(self, net, factor):
        super().__init__()
        self.net, self.factor = net, factor

    def forward(self, tree):
        return [leaf * self.factor for leaf in self.net(tree)]


def _drift_stack(factor):
    blocks = [(TreeMixer([8], seed=i), TreeMixer([8], seed=50 + i)) for i in range(5)]
    seq = revtree.ReversibleSequence(blocks, check_drift=1e-4).float()
    seq.blocks[2].g = Scaled(seq.blocks[2].g, factor)
    return seq


def test_drift_guard_warns_naming_the_block():
    seq = _drift_stack(1e6)
    # a fixed input: which half-stream's relative error is the larger (x2, where g's error
    # enters, or x1, rebuilt from it) depends on the values
    x = [t(16, 16, dtype=torch.float32)]
    with pytest.warns(revtree.RevtreeWarning, match=r"block 2: its input x2 at x\[0\]") as seen:
        seq(x)[0].sum().backward()
    # the blocks below inherit the error; the guard names the first block it appears in
    assert "block 2:" in str(seen[0].message)


def test_drift_guard_reports_a_nan_reconstruction():
    # g adds inf: y2 = x2 + inf, and x2 is rebuilt as inf - inf = NaN from finite values
    blocks = [(TreeMixer([8], seed=1), Scaled(TreeMixer([8], seed=2), float("inf")))]
    seq = revtree.ReversibleSequence(blocks, check_drift=1e-4).float()
    x = [torch.randn(16, 16, requires_grad=True)]
    match = r"block 0: its input x[12] at x\[0\] .* a NaN or infinite error"
    with pytest.warns(revtree.RevtreeWarning, match=match) as seen:
        seq(x)[0].sum().backward()
    assert len(seen) == 1


def test_drift_guard_is_quiet_on_a_well_conditioned_stack():
    seq = _drift_stack(1.0)
    x = [torch.randn(16, 16, requires_grad=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seq(x)[0].sum().backward()


# --------------------------------------------------------------------------- long runs


def _live_tensors():
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some of torch's module objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.slow
def test_500_steps_hold_no_more_memory_and_warn_nothing():
    torch.manual_seed(0)
    blocks = [
        (TreeMixer([4, 4], 0.1, seed=i), TreeMixer([4, 4], 0.1, seed=9 + i)) for i in range(4)
    ]
    seq = revtree.ReversibleSequence(blocks, check_drift=1e-6)
    opt = torch.optim.Adam(seq.parameters(), lr=1e-3)
    x = {"a": t(8, 8), "b": t(8, 8, seed=1)}
    counts = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(500):
            opt.zero_grad()
            y = seq(x, ctx=torch.ones(2, dtype=torch.float64))
            (y["a"].pow(2).mean() + y["b"].mean()).backward()
            opt.step()
            if step in (50, 499):
                counts.append(_live_tensors())
    assert counts[1] <= counts[0], counts
