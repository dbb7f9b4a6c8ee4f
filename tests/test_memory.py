"""What a reversible stack holds between forward and backward, and when its gradients leave.

Held memory is counted exactly (every tensor the forward leaves alive); the peak of a step
with an optimizer in backward is the process's, measured in a fresh subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import revtree
from revtree.codecs import Split
from revtree.testing import held_bytes


@pytest.mark.parametrize("depth", [4, 32])
def test_held_memory_is_exactly_one_output(depth):
    """The output is the streams' concatenation: held once, the streams derived in backward."""
    torch.manual_seed(0)
    x = {"a": torch.randn(8, 16, requires_grad=True), "b": [torch.randn(4, 2, 6)]}
    blocks = [(Pair(), Pair()) for _ in range(depth)]
    seq = revtree.ReversibleSequence(blocks, codec={"a": Split(-1), "b": [Split(1)]})
    held = held_bytes(seq, x, exclude=[x["a"], x["b"][0]])
    assert held == (8 * 16 + 4 * 2 * 6) * 4  # the output, float32, nothing else


class Pair(nn.Module):
    """``f`` or ``g`` of the dict above: one linear map per leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(6, 6)

    def forward(self, x):
        return {"a": self.a(x["a"]).tanh(), "b": [self.b(x["b"][0]).tanh()]}


class Logged(nn.Module):
    """A linear map that notes when it runs in a recomputation."""

    def __init__(self, index: int, events: list) -> None:
        super().__init__()
        self.index, self.events = index, events
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if revtree.is_recomputing():
            self.events.append(("recompute", self.index))
        return self.lin(x).tanh()


def test_gradients_reach_post_accumulate_hooks_block_by_block():
    """Each block's parameters get their gradients before the block below is recomputed."""
    events: list = []
    depth = 6
    blocks = [(Logged(i, events), Logged(i, events)) for i in range(depth)]
    seq = revtree.ReversibleSequence(blocks)
    for i, (f, g) in enumerate(blocks):
        for p in [*f.parameters(), *g.parameters()]:
            p.register_post_accumulate_grad_hook(lambda p, i=i: events.append(("grad", i)))
    x = torch.randn(3, 8, requires_grad=True)
    seq(x).square().sum().backward()
    grads = [e for e in events if e[0] == "grad"]
    assert len(grads) == depth * 4  # each parameter's hook once
    for i in range(1, depth):
        last_grad = max(k for k, e in enumerate(events) if e == ("grad", i))
        first_recompute_below = min(k for k, e in enumerate(events) if e == ("recompute", i - 1))
        assert last_grad < first_recompute_below, events
    assert x.grad is not None


def test_hooks_block_by_block_keep_autograd_grad_and_unused_parameters_right():
    blocks = [(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(3)]
    unused = nn.Linear(4, 4)
    fired: list = []
    for f, g in blocks:
        for p in [*f.parameters(), *g.parameters()]:
            p.register_post_accumulate_grad_hook(lambda p: fired.append(p))
    seq = revtree.ReversibleSequence(blocks)
    x = torch.randn(2, 8, requires_grad=True)
    params = list(seq.parameters())
    grads = torch.autograd.grad(seq(x).sum(), [x, *params, *unused.parameters()], allow_unused=True)
    assert fired == [] and all(p.grad is None for p in params)  # autograd.grad: no hooks
    assert grads[-1] is None and grads[-2] is None  # unused: None, as in plain autograd
    seq(x).sum().backward()
    assert len(fired) == len(params)


PEAK = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import revtree

    torch.manual_seed(0)
    torch.set_num_threads(1)
    width, depth = 1024, 24
    blocks = [(nn.Linear(width, width), nn.Linear(width, width)) for _ in range(depth)]
    params = [p for f, g in blocks for p in (*f.parameters(), *g.parameters())]
    for p in params:  # an optimizer in backward: step, then drop the gradient
        def step(p):
            p.data.add_(p.grad, alpha=-1e-3)
            p.grad = None
        p.register_post_accumulate_grad_hook(step)
    x = torch.randn(2, 2 * width, requires_grad=True)
    if sys.argv[1] == "revtree":
        model = revtree.ReversibleSequence(blocks)
    else:
        def model(x):
            a, b = x.chunk(2, -1)
            for f, g in blocks:
                a = a + f(b)
                b = b + g(a)
            return torch.cat([a, b], -1)
    def status(field):  # kB, of this process's own memory map
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    model(x).sum().backward()  # warm up: allocator pools, first calls
    out = model(x)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to what is resident now
    now = status("VmRSS:")
    out.sum().backward()
    growth = status("VmHWM:") - now
    print(growth * 1024 / sum(p.nbytes for p in params))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_an_optimizer_in_backward_peaks_at_a_block_of_gradients(tmp_path):
    """With the step in post-accumulate hooks, a backward holds about one block's gradients."""
    script = tmp_path / "peak.py"
    script.write_text(PEAK)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    ratios = {}
    for system in ("revtree", "plain"):
        run = subprocess.run(
            [sys.executable, str(script), system],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        ratios[system] = float(run.stdout.split()[-1])
    assert ratios["revtree"] <= 0.25, ratios  # of the parameters' bytes
