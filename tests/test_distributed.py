"""DDP and FSDP2 as people run them, on 2 processes (gloo, CPU), against plain autograd.

The one harness for distributed training: a reversible stack whose keyword context is
computed from the model's own parameters (routed to ``f`` and ``g``), and a head.

Every case trains 2 processes for a few steps on their halves of a batch and compares the
parameters with one process of plain autograd (``reversible=False``) on the whole batch,
in float64 to 1e-9: DDP and FSDP average the ranks' gradients of per-rank means, which is
the gradient of the whole batch's mean.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from helpers import assert_trees_close, finish, spawn
from torch import nn
from torch.utils.checkpoint import checkpoint

import revtree

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

D = torch.float64
WORLD = 2
DEPTH = 3


class RowMixer(nn.Module):
    """A block function that treats each sample on its own (data parallelism is exact)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(4, 4, dtype=D)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(4, 4, generator=g, dtype=D) / 2)
        self.scale = nn.Parameter(torch.randn(4, generator=g, dtype=D))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        _watch()
        return torch.tanh(self.lin(x) * self.scale + ctx.sum())


class Model(nn.Module):
    """A reversible stack whose keyword context is computed from the model's own parameters."""

    def __init__(self, reversible: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)  # the head's initial weights: the same in every process
        self.context = nn.Parameter(torch.randn(3, dtype=D) / 4)
        self.seq = revtree.ReversibleSequence(
            [(RowMixer(2 * i), RowMixer(2 * i + 1)) for i in range(DEPTH)],
            reversible=reversible,
            route="both",
        )
        self.head = nn.Linear(8, 1, dtype=D)

    def forward(self, x: torch.Tensor, blocks: list[int] | None = None) -> torch.Tensor:
        out = self.seq.run(x, {"ctx": self.context.sin() * 2}, blocks=blocks)
        return self.head(out).pow(2).mean()


def _batch(step: int, micro: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + micro)
    return torch.randn(8, 8, generator=g, dtype=D)


def _schedule(case: str, step: int) -> list[int] | None:
    """The blocks each step runs: all, except where a block sits some steps out."""
    if case == "ddp unused block" and step % 2:
        return [0, 2]
    return None


def _train(model: nn.Module, case: str, shard: slice, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    micro = 2 if case == "ddp no_sync" else 1
    for step in range(steps):
        opt.zero_grad()
        for m in range(micro):
            x = _batch(step, m)[shard]
            quiet = m < micro - 1 and hasattr(model, "no_sync")
            with model.no_sync() if quiet else _nothing():
                (model(x, _schedule(case, step)) / micro).backward()
        opt.step()


class _nothing:  # noqa: N801 (a context manager)
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ------------------------------------------------------------------- watching FSDP at work

_WATCH: list[int] = []  # how many blocks' parameters are gathered, at each recomputed call
_MODEL: list[nn.Module] = []


def _watch() -> None:
    if not (_MODEL and revtree.is_recomputing()):
        return
    gathered = 0
    for block in _MODEL[0].seq.blocks:
        weights = (block.f.lin.weight, block.g.lin.weight)
        gathered += any(not isinstance(w, _dtensor()) for w in weights)
    _WATCH.append(gathered)


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def _shard(model: Model, case: str) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    blocks = model.seq.blocks
    if case == "fsdp blocks":
        for block in blocks:
            fully_shard(block)
    elif case == "fsdp f and g":
        for block in blocks:
            fully_shard(block.f)
            fully_shard(block.g)
    elif case == "fsdp mixed":  # two blocks as units, one block's f and g, the sequence too
        fully_shard(blocks[0])
        fully_shard(blocks[1])
        fully_shard(blocks[2].f)
        fully_shard(blocks[2].g)
        fully_shard(model.seq)
    elif case == "fsdp sequence":
        fully_shard(model.seq)
    fully_shard(model)
    return model


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def _worker(rank: int, port: int, case: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        result: dict[str, object] = {}
        shard = slice(4 * rank, 4 * rank + 4)
        model = Model()
        if case.startswith("ddp"):
            options = {
                "ddp": {},
                "ddp find_unused": {"find_unused_parameters": True},
                "ddp static_graph": {"static_graph": True},
                "ddp bucket_view": {"gradient_as_bucket_view": True},
                "ddp no_sync": {},
                "ddp unused block": {"find_unused_parameters": True},
            }[case]
            ddp = nn.parallel.DistributedDataParallel(model, **options)
            _train(ddp, case, shard)
        elif case == "dcp":
            result.update(_checkpoint_round_trip(model, shard, out))
        elif case == "fsdp1 inside a block":
            from torch.distributed.fsdp import FullyShardedDataParallel

            cpu = torch.device("cpu")
            model.seq.blocks[1].f = FullyShardedDataParallel(model.seq.blocks[1].f, device_id=cpu)
            try:
                model(_batch(0)[shard])
            except revtree.RevtreeError as e:
                result["error"] = str(e)
        else:
            _shard(model, case)
            reduced: list[str] = []
            names = [
                n for n in ("reduce_scatter_tensor", "reduce_scatter_single") if hasattr(dist, n)
            ]
            originals = {n: getattr(dist, n) for n in names}

            def counting(name: str) -> object:
                def counted(*args: object, **kwargs: object) -> object:
                    reduced.append(name)
                    return originals[name](*args, **kwargs)

                return counted

            for n in names:  # FSDP's reduce-scatter, whichever this torch calls
                setattr(dist, n, counting(n))
            _MODEL.append(model)
            try:
                _train(model, case, shard, steps=1)
                result["reduce_scatters"] = len(reduced)
                _train(model, case, shard, steps=2)
            finally:
                for n, fn in originals.items():
                    setattr(dist, n, fn)
                _MODEL.clear()
            result["gathered"] = max(_WATCH, default=0)
        result["state"] = _full(model)
        if rank == 0:
            torch.save(result, out)
    except BaseException:
        dist.destroy_process_group()
        raise
    finish()


def _checkpoint_round_trip(model: Model, shard: slice, out: str) -> dict[str, object]:
    """Train a block-sharded model a step, save it with its optimizer, load both afresh."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def sharded() -> tuple[Model, torch.optim.Optimizer]:
        m = _shard(Model(), "fsdp blocks")
        return m, torch.optim.Adam(m.parameters(), lr=0.05)

    model, opt = sharded()
    for step in range(2):
        opt.zero_grad()
        model(_batch(step)[shard]).backward()
        opt.step()
    path = out + ".checkpoint"
    state, optim = get_state_dict(model, opt)
    dcp.save({"model": state, "optim": optim}, checkpoint_id=path)
    at_save = _full(model)
    again, again_opt = sharded()
    state, optim = get_state_dict(again, again_opt)
    loaded = {"model": state, "optim": optim}
    dcp.load(loaded, checkpoint_id=path)
    set_state_dict(
        again, again_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
    )
    # one more step from each: the same parameters if the optimizer's moments came back too
    for m, o in ((model, opt), (again, again_opt)):
        o.zero_grad()
        m(_batch(5)[shard]).backward()
        o.step()
    return {"path": path, "at_save": at_save, "saved": _full(model), "reloaded": _full(again)}


def _run(case: str, tmp_path) -> dict:
    out = str(tmp_path / "result.pt")
    spawn(_worker, case, out, nprocs=WORLD)
    return torch.load(out)


def _plain(case: str) -> dict[str, torch.Tensor]:
    model = Model(reversible=False)
    for steps in (1, 2) if case.startswith("fsdp") else (3,):  # as the workers train
        _train(model, case, slice(None), steps=steps)
    return {k: v.detach() for k, v in model.state_dict().items()}


DDP = ["ddp", "ddp find_unused", "ddp static_graph", "ddp bucket_view", "ddp no_sync"]


@pytest.mark.parametrize("case", [*DDP, "ddp unused block"])
def test_ddp_as_people_run_it_equals_plain_autograd(case, tmp_path):
    result = _run(case, tmp_path)
    assert_trees_close(result["state"], _plain(case), tol=1e-9)
    for name in ("head.weight", "context"):  # trained, the context through the keyword
        assert not torch.equal(result["state"][name], Model().state_dict()[name])


FSDP = ["fsdp sequence", "fsdp blocks", "fsdp f and g", "fsdp mixed"]
UNITS = {"fsdp sequence": 2, "fsdp blocks": DEPTH + 1, "fsdp f and g": 2 * DEPTH + 1}


@pytest.mark.parametrize("case", FSDP)
def test_fsdp_per_block_equals_plain_autograd(case, tmp_path):
    """Every block its own unit (or f and g), mixed with the whole-sequence recipe."""
    result = _run(case, tmp_path)
    assert_trees_close(result["state"], _plain(case), tol=1e-9)
    if case in ("fsdp blocks", "fsdp f and g"):
        # each unit's gradients are reduce-scattered once a step; while a block is
        # recomputed at most one other block's parameters are gathered (a prefetch)
        assert result["reduce_scatters"] == UNITS[case]
        assert result["gathered"] <= 2


# DCP says so when it loads on one process, as asked
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")
def test_sharded_checkpoint_round_trips_and_loads_unsharded(tmp_path):
    import torch.distributed.checkpoint as dcp

    result = _run("dcp", tmp_path)
    # saved and loaded afresh (parameters and Adam's moments), a step on: bit for bit
    assert_trees_close(result["reloaded"], result["saved"], tol=0)
    # the sharded checkpoint loads into a model on one process, unsharded
    model = Model()
    state = model.state_dict()
    dcp.load({"model": state}, checkpoint_id=result["path"], no_dist=True)
    model.load_state_dict(state)
    assert_trees_close(dict(model.state_dict()), result["at_save"], tol=0)


def test_fsdp1_inside_a_block_is_a_clear_error(tmp_path):
    result = _run("fsdp1 inside a block", tmp_path)
    assert "FullyShardedDataParallel (FSDP1) wraps a module inside a reversible" in str(
        result["error"]
    )


# ------------------------------------------------------------ recomputation in recomputation


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4, dtype=D), nn.Tanh())


class Checkpointed(nn.Module):
    """``f`` whose inner module is itself checkpointed (non-reentrant)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.net, x, use_reentrant=False)


@pytest.mark.parametrize("where", ["sequence in a checkpoint", "checkpoint in f"])
def test_recomputation_inside_recomputation_equals_plain_autograd(where):
    torch.manual_seed(0)
    if where == "checkpoint in f":
        blocks = [(Checkpointed(), _mlp()) for _ in range(3)]
    else:
        blocks = [(_mlp(), _mlp()) for _ in range(3)]
    seq = revtree.ReversibleSequence(blocks)
    plain = revtree.ReversibleSequence(blocks, reversible=False)
    embed = nn.Linear(8, 8, dtype=D)
    x = torch.randn(5, 8, dtype=D, requires_grad=True)

    def run(model):
        h = embed(x)
        if where == "sequence in a checkpoint":
            y = checkpoint(model, h, use_reentrant=False)
        else:
            y = model(h)
        return torch.autograd.grad(y.pow(2).sum(), [x, *embed.parameters(), *seq.parameters()])

    assert_trees_close(list(run(seq)), list(run(plain)))
