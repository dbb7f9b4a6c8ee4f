"""revtree sharded three ways on 2 processes (gloo, CPU): memory per rank and step time.

A parameter-heavy reversible stack (24 blocks of MLP pairs, d 512: 100M float32
parameters) trained with SGD on 2 processes, each on its half of a batch:

- DDP: every rank holds every parameter and gradient;
- FSDP, the sequence as one unit (``fully_shard(model.seq)``, then the model): parameters
  sharded at rest, all of them gathered for the sequence's forward and for its backward;
- FSDP, every block its own unit (``fully_shard(block)`` for each block, then the model):
  a block's parameters are gathered for its forward, again for its reverse step, and
  freed after it.

Memory is the process RSS (``MALLOC_MMAP_THRESHOLD_=65536``, so freed buffers go back to
the OS): at rest before a step, and the peak over the step (VmHWM, reset before it), the
larger rank's. Time is the median of the steps, each ending with a barrier.

Usage:
    python benchmarks/distributed.py            # ~1 minute
    python benchmarks/distributed.py --quick    # 6 blocks, d 256
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _measure import MB, WORKER_ENV, peak_rss, reset_peak_rss, rss
from torch import nn

import revtree

SYSTEMS = ("DDP", "FSDP, the sequence one unit", "FSDP, every block a unit")


def mlp(d: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


class Model(nn.Module):
    def __init__(self, depth: int, d: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.seq = revtree.ReversibleSequence([(mlp(d), mlp(d)) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x).pow(2).mean()


def worker(rank: int, port: int, system: str, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=300))
    try:
        model: nn.Module = Model(args.depth, args.dim)
        if system == "DDP":
            model = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            if system == "FSDP, every block a unit":
                for block in model.seq.blocks:
                    fully_shard(block)
            else:
                fully_shard(model.seq)
            fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args.batch, args.tokens, 2 * args.dim, generator=g)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            model(x).backward()
            opt.step()
            dist.barrier()

        step()  # warm-up: allocator, lazy state
        times = []
        for _ in range(args.steps):
            at_rest = rss()
            reset_peak_rss()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            peak = peak_rss() - at_rest
        result = torch.tensor(
            [at_rest / MB, peak / MB, statistics.median(times)], dtype=torch.float64
        )
        gathered = [torch.zeros(3, dtype=torch.float64) for _ in range(2)]
        dist.all_gather(gathered, result)
        if rank == 0:
            torch.save(torch.stack(gathered), out)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # tearing a gloo group down from Python can deadlock inside torch (its destructor holds
    # the GIL a worker thread waits for): a worker that is done leaves at once
    sys.stdout.flush()
    os._exit(0)


def run(system: str, args: argparse.Namespace) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = str(Path(tmp) / "result.pt")
        mp.spawn(worker, args=(port, system, args, out), nprocs=2, join=True)
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 blocks, d 256, 3 steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    args = parser.parse_args()
    args.depth, args.dim = (6, 256) if args.quick else (24, 512)
    args.batch, args.tokens = 4, 128
    args.steps = args.steps or (3 if args.quick else 5)
    os.environ.update(WORKER_ENV)  # the workers return freed buffers to the OS
    params = Model(args.depth, args.dim).seq
    n = sum(p.numel() for p in params.parameters())
    print(
        f"revtree {revtree.__version__}, torch {torch.__version__}; 2 processes, gloo, CPU, "
        f"1 thread each; {args.depth} blocks of MLP pairs, d {args.dim}: {n / 1e6:.0f}M float32 "
        f"parameters ({n * 4 / MB:.0f} MB); per rank a batch of {args.batch} x {args.tokens} "
        f"tokens x {2 * args.dim}; SGD"
    )
    print("memory: process RSS, the larger rank's; at rest before a step, peak over the step")
    print(f"time: median of {args.steps} steps, each ending with a barrier\n")
    print(f"{'system':<30} {'at rest MB':>11} {'step peak MB':>13} {'step ms':>9}")
    for system in SYSTEMS:
        result = run(system, args)
        rest, peak, seconds = result.max(0).values.tolist()
        print(f"{system:<30} {rest:>11.0f} {peak:>13.0f} {seconds * 1e3:>9.0f}")


if __name__ == "__main__":
    main()
