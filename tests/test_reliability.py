"""The training stack: DDP, torch.compile, the drift guard, long runs."""

from __future__ import annotations

import gc
import os
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from helpers import TreeMixer, assert_trees_close, finish, spawn, t
from torch import nn

import revtree

# ---------------------------------------------------------------------------------- DDP


class RowMixer(nn.Module):
    """A block function that treats each sample on its own (so data parallelism is exact)."""

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
            [(RowMixer([2, 3], seed=2 * i), RowMixer([2, 3], seed=2 * i + 1)) for i in range(3)],
            reversible=reversible,
            route="both",
        )

    def forward(self, x):
        y = self.seq(x, ctx=self.context.sin() * 2)
        return y["a"].pow(2).mean() + y["b"].mean()


def _batch():
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(8, w, generator=g, dtype=torch.float64) for k, w in (("a", 4), ("b", 6))}


def _train(model, batches, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        for batch in batches:
            opt.zero_grad()
            model(batch).backward()
            opt.step()
    return model


def _ddp_worker(rank, port, world, find_unused, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        model = nn.parallel.DistributedDataParallel(
            Model(reversible=True), find_unused_parameters=find_unused
        )
        shard = {k: v.chunk(world)[rank] for k, v in _batch().items()}
        _train(model, [shard])
        if rank == 0:
            torch.save(model.module.state_dict(), out)
    except BaseException:
        dist.destroy_process_group()
        raise
    finish()


@pytest.mark.parametrize("find_unused", [False, True])
def test_ddp_equals_single_process_plain_autograd(find_unused, tmp_path):
    out = tmp_path / "ddp.pt"
    spawn(_ddp_worker, 2, find_unused, str(out))
    expected = _train(Model(reversible=False), [_batch()]).state_dict()
    actual = torch.load(out)
    assert_trees_close(dict(actual), dict(expected), tol=1e-9)
    assert not torch.equal(actual["context"], Model(reversible=False).context.detach())


def _fsdp_worker(rank, port, world, out):
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        model = Model(reversible=True)
        fully_shard(model.seq)  # the reversible sequence is one unit, gathered for its backward
        fully_shard(model)
        _train(model, [{k: v.chunk(world)[rank] for k, v in _batch().items()}])
        state = {k: v.full_tensor() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, out)
    except BaseException:
        dist.destroy_process_group()
        raise
    finish()


def test_fsdp2_equals_single_process_plain_autograd(tmp_path):
    out = tmp_path / "fsdp.pt"
    spawn(_fsdp_worker, 2, str(out))
    expected = _train(Model(reversible=False), [_batch()]).state_dict()
    assert_trees_close(dict(torch.load(out)), dict(expected), tol=1e-9)


# ---------------------------------------------------------------------------- compile


# warnings dynamo raises from its own tracing machinery (its optree polyfill reads `.grad`
# of the non-leaf context; it instantiates the autograd Function class): harmless
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be")
@pytest.mark.parametrize("what", ["sequence", "blocks"])
def test_torch_compile_gives_plain_gradients(what):
    torch._dynamo.reset()
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
    x = [torch.randn(16, 16, requires_grad=True)]
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
