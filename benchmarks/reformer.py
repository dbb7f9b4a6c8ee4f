"""revtree's reformer adapter against reformer-pytorch's own reversible sequence: step time.

A small ReformerLM (LSH attention, two hashes, dropout) built three ways with the same
weights: the package's plain-autograd trunk (``reverse_thres`` above the sequence length),
its reversible trunk, and revtree's adapter. Training steps are timed interleaved in one
process (medians), so machine noise hits all three alike.

Usage:
    python benchmarks/reformer.py            # depth 6, 512 tokens, about a minute
    python benchmarks/reformer.py --quick    # depth 2, 128 tokens, seconds
"""

from __future__ import annotations

import argparse

import torch
from _measure import add_device_arguments, interleaved_medians, on_device, progress, use_device

try:
    from reformer_pytorch import ReformerLM
except ImportError:  # the bench extra is optional
    ReformerLM = None

from revtree.adapters import reformer as adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None)
    add_device_arguments(parser)
    args = parser.parse_args()
    if ReformerLM is None:
        print("reformer-pytorch is not installed: pip install reformer-pytorch==1.4.4")
        return
    torch.set_num_threads(args.threads)
    use_device(args)
    depth, seq = (2, 128) if args.quick else (6, 512)
    repeats = args.repeats or (3 if args.quick else 7)
    config = dict(
        num_tokens=256,
        dim=128,
        depth=depth,
        heads=4,
        max_seq_len=seq,
        bucket_size=32,
        n_hashes=2,
        causal=True,
        lsh_dropout=0.1,
        ff_dropout=0.1,
    )

    torch.manual_seed(0)
    models = {"package-rev": ReformerLM(**config)}
    models["plain"] = ReformerLM(**config, reverse_thres=seq + 1)
    with adapter.patch():
        models["revtree"] = ReformerLM(**config)
    for model in models.values():
        model.load_state_dict(models["package-rev"].state_dict(), strict=True)
    tokens = on_device(
        torch.randint(
            0, 256, (2, seq + 1), generator=torch.Generator("cpu").manual_seed(1), device="cpu"
        )
    )

    def step(model: torch.nn.Module) -> None:
        logits = model(tokens[:, :-1].contiguous())
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)

    progress(f"timing {len(models)} systems, {repeats} interleaved rounds")
    order = ["plain", "package-rev", "revtree"]
    medians = interleaved_medians(
        {k: (lambda m=models[k]: step(m)) for k in order}, repeats, warmup=order
    )
    progress("")
    print(
        f"ReformerLM: depth {depth}, {seq} tokens, batch 2, dim 128, 4 heads, LSH with 2 "
        f"hashes, dropout 0.1, {args.dtype}, {args.threads} thread(s), device {args.device}"
    )
    print(f"training step, median of {repeats}, the three systems interleaved in one process\n")
    print(f"{'system':<12} {'step ms':>9} {'x package':>10} {'x plain':>8}")
    for k in order:
        print(
            f"{k:<12} {medians[k] * 1e3:>9.1f} {medians[k] / medians['package-rev']:>10.2f} "
            f"{medians[k] / medians['plain']:>8.2f}"
        )


if __name__ == "__main__":
    main()
