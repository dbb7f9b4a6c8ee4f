"""revtree on a GPU: gradients, memory against depth, step time against plain and the peers.

Everything on one CUDA device, in one process, in about four minutes:

1. Gradients: revtree against plain autograd written by hand, on small transformer blocks
   (attention + MLP): float64 with dropout (the CUDA random stream replayed, and left where
   plain autograd leaves it), and float32 weights under bfloat16 and float16 autocast
   against plain autograd under the same autocast; ``torch.utils.checkpoint`` beside it.
2. Memory and time of a training step on bfloat16 transformer blocks (attention + MLP, d 1024,
   16 heads, 8 x 1024 tokens): plain autograd, ``torch.utils.checkpoint`` per block,
   revtree (eager and ``compile=True``) and the peers that are installed, at several
   depths. Memory is ``torch.cuda.memory_allocated`` after the forward (held, less what
   was allocated before it) and ``max_memory_allocated`` over the step (peak); times are
   medians of steps synchronised with the device, the systems interleaved.
3. Small blocks (MLP, d 256, 4 x 64 tokens, float32, depth 48), where the host's work per
   block decides the step time: plain autograd eager and compiled, revtree eager and
   compiled, checkpoint, the peers.

Usage:
    python benchmarks/gpu.py                 # the whole story, ~4 minutes on an H200
    python benchmarks/gpu.py --quick         # small sizes, a smoke test
    python benchmarks/gpu.py --json out.json # also write every figure as JSON
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import torch
from _systems import PEERS, TensorChain, mlp_pairs, sync, times, transformer_pairs
from _systems import build_named as build
from _systems import device_step as step
from torch import nn

import revtree

MB = 2**20
DEVICE = torch.device("cuda")  # --device cpu: a smoke test of this script, memory not measured
STARTED = time.perf_counter()


# ------------------------------------------------------------------------------ measuring


def memory(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Held (after the forward) and peak (over the step) device memory, MB, beyond the start."""
    step(model, x)  # warm-up: allocator pools, lazy state, compilation
    sync()
    if DEVICE.type != "cuda":
        step(model, x)
        return float("nan"), float("nan")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = model(x)
    sync()
    held = torch.cuda.memory_allocated() - before
    y.float().square().mean().backward()
    sync()
    peak = torch.cuda.max_memory_allocated() - before
    del y
    model.zero_grad(set_to_none=True)
    return held / MB, peak / MB


def relative(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> float:
    """The largest ``max|a - b| / max|b|`` over the tensors (inf where one is None)."""
    worst = 0.0
    for p, q in zip(a, b):
        if p is None or q is None:
            worst = max(worst, 0.0 if p is None and q is None else float("inf"))
            continue
        p, q = p.double(), q.double()
        worst = max(worst, ((p - q).abs().max() / q.abs().max().clamp_min(1e-30)).item())
    return worst


# ------------------------------------------------------------------------------- sections


def gradients(quick: bool) -> dict[str, Any]:
    print("1. Gradients against plain autograd written by hand (small transformer blocks)")
    device = DEVICE
    results: dict[str, Any] = {}
    d, heads, depth = 64, 4, 4
    cases = (
        ("float64, dropout 0.1", torch.float64, None, 0.1),
        ("float32, compile=True", torch.float32, None, 0.0),
        ("bfloat16 autocast", torch.float32, torch.bfloat16, 0.0),
        ("float16 autocast", torch.float32, torch.float16, 0.0),
    )
    for name, dtype, autocast, dropout in cases:
        if autocast is torch.float16 and device.type == "cpu":
            continue
        torch.manual_seed(0)
        with device:
            pairs = [
                (f.to(dtype), g.to(dtype)) for f, g in transformer_pairs(depth, d, heads, dropout)
            ]
            x = torch.randn(2, 64, 2 * d, dtype=dtype, requires_grad=True)
        compiled = "compile" in name
        systems: dict[str, Any] = {
            "plain": TensorChain(pairs, False),
            "checkpoint": TensorChain(pairs, True),
            "revtree": revtree.ReversibleSequence(pairs, compile=compiled),
        }
        if compiled:  # inductor's fused kernels round differently: the like-for-like reference
            systems["plain compiled"] = torch.compile(TensorChain(pairs, False))
        grads, rng = {}, {}
        for _ in range(3 if compiled else 1):  # compiled: the third step runs compiled
            for sys_name, model in systems.items():
                torch.manual_seed(1)
                on = autocast is not None
                with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=on):
                    y = model(x)
                w = torch.linspace(-1, 1, y.numel(), device=device).view_as(y)
                grads[sys_name] = torch.autograd.grad(
                    (y.float() * w).sum(), [x, *model.parameters()]
                )
                rng[sys_name] = (
                    torch.cuda.get_rng_state() if device.type == "cuda" else torch.get_rng_state()
                )
        row = {s: relative(list(grads[s]), list(grads["plain"])) for s in ("revtree", "checkpoint")}
        row["rng_equal"] = bool(torch.equal(rng["revtree"], rng["plain"]))
        extra = ""
        if compiled:
            row["vs plain compiled"] = relative(
                list(grads["revtree"]), list(grads["plain compiled"])
            )
            row["plain compiled"] = relative(list(grads["plain compiled"]), list(grads["plain"]))
            extra = (
                f"  (revtree vs plain compiled {row['vs plain compiled']:.2e}; plain compiled "
                f"vs plain {row['plain compiled']:.2e})"
            )
        results[name] = row
        print(
            f"   {name:22s} revtree {row['revtree']:.2e}  checkpoint {row['checkpoint']:.2e}"
            f"  random stream after the step as plain's: {row['rng_equal']}{extra}"
        )
    return results


def big(quick: bool, depths: list[int], rounds: int) -> dict[str, Any]:
    d, heads, batch, tokens = (256, 4, 2, 256) if quick else (1024, 16, 8, 1024)
    print(
        f"\n2. bfloat16 transformer blocks (attention + MLP, d {d}, {heads} heads, "
        f"{batch} x {tokens} tokens): memory and step time"
    )
    names = ["plain", "checkpoint", "revtree", "revtree compiled", *PEERS]
    results: dict[str, Any] = {}
    head = f"   {'system':18s} {'depth':>5} {'held MB':>9} {'peak MB':>9}"
    print(f"{head} {'step ms':>9} {'x plain':>8}")
    for depth in depths:
        torch.manual_seed(0)
        with DEVICE:
            pairs = [(f.bfloat16(), g.bfloat16()) for f, g in transformer_pairs(depth, d, heads)]
            x = torch.randn(batch, tokens, 2 * d, dtype=torch.bfloat16, requires_grad=True)
        models: dict[str, nn.Module] = {}
        mem: dict[str, tuple[float, float]] = {}
        for name in names:
            started = time.perf_counter()
            try:
                model = build(name, pairs)
                if model is None:
                    continue
                mem[name] = memory(model, x)
                if name == "revtree compiled":
                    step(model, x)  # (the first step ran eagerly, checked; the second compiled)
                    results.setdefault("compile seconds", time.perf_counter() - started)
            except Exception as e:  # noqa: BLE001 (a system that fails is reported, not fatal)
                print(f"   {name:18s} {depth:>5} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            models[name] = model
            torch.cuda.empty_cache()
        t = times(models, x, rounds)
        for name in models:
            held, peak = mem[name]
            results[f"{name}@{depth}"] = {
                "held": held,
                "peak": peak,
                "step_ms": t[name],
                "x_plain": t[name] / t["plain"],
            }
            print(
                f"   {name:18s} {depth:>5} {held:>9.0f} {peak:>9.0f} {t[name]:>9.2f}"
                f" {t[name] / t['plain']:>8.2f}"
            )
        del models, pairs, x
        torch.cuda.empty_cache()
    if "compile seconds" in results:
        print(
            f"   compile=True: first compiled step {results['compile seconds']:.0f} s "
            "(the first step runs eagerly, checked; the second compiles)"
        )
    return results


def small(quick: bool, rounds: int, budget: float) -> dict[str, Any]:
    d, batch, tokens, depth = 256, 4, 64, 16 if quick else 48
    print(
        f"\n3. Small blocks (MLP, d {d}, {batch} x {tokens} tokens, float32, depth {depth}): "
        "host work decides the step"
    )
    torch.manual_seed(0)
    with DEVICE:
        pairs = mlp_pairs(depth, d)
        x = torch.randn(batch, tokens, 2 * d, requires_grad=True)
    names = ["plain", "checkpoint", "revtree", "revtree compiled", "revtree compile=8", *PEERS]
    names.append("plain compiled")
    models = {}
    for name in names:
        if name == "plain compiled" and time.perf_counter() - STARTED > budget:
            print(
                "   plain compiled: skipped, past the time budget (its graph unrolls every block)"
            )
            continue
        try:
            model = build(name, pairs)
            if model is not None:
                step(model, x)
                step(model, x)
                models[name] = model
        except Exception as e:  # noqa: BLE001
            print(f"   {name:18s} failed: {type(e).__name__}: {str(e)[:120]}")
    t = times(models, x, rounds)
    print(f"   {'system':18s} {'step ms':>9} {'x plain':>8} {'us/block':>9}")
    for name, ms in t.items():
        print(f"   {name:18s} {ms:>9.2f} {ms / t['plain']:>8.2f} {ms / depth * 1e3:>9.0f}")
    return {name: {"step_ms": ms, "x_plain": ms / t["plain"]} for name, ms in t.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--depths", type=int, nargs="+", default=None, help="section 2")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per system")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script")
    parser.add_argument(
        "--budget", type=float, default=200, help="seconds after which to skip compiling plain"
    )
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu.py needs a CUDA device (benchmarks/README.md lists the CPU ones)")
    warnings.filterwarnings("ignore", category=revtree.RevtreeWarning)
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
    torch.backends.cuda.matmul.allow_tf32 = False
    depths = args.depths or ([4, 8] if args.quick else [8, 24, 48])
    rounds = args.rounds or (3 if args.quick else 7)
    started = time.perf_counter()
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU"
    print(f"revtree {revtree.__version__}, torch {torch.__version__}, {name}")
    figures: dict[str, Any] = {"device": name, "torch": torch.__version__}
    for key, section in (
        ("gradients", lambda: gradients(args.quick)),
        ("transformer", lambda: big(args.quick, depths, rounds)),
        ("small", lambda: small(args.quick, rounds * 3, args.budget)),
    ):
        try:
            figures[key] = section()
        except Exception as e:  # noqa: BLE001 (one section failing leaves the others)
            print(f"   section {key} failed: {type(e).__name__}: {e}")
        if args.json:  # written as it goes: a run stopped early keeps what it measured
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=1)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
