"""PyG's RevGNN, FrEIA's flows and transformers' Reformer against revtree's adapters.

Memory kept for backward and step time; three workloads, each by depth, each system on the
same weights:

gnn   RevGNN as in PyG's example (``examples/rev_gnn.py``): a random graph like an ogbn
      subgraph (2000 nodes, 20 000 edges), 64 channels in 2 groups, ``GNNBlock``
      (LayerNorm, ReLU, a shared dropout mask, SAGEConv) per group, layers called one after
      the other. Systems: PyG's ``GroupAddRev`` with ``disable=True`` (plain autograd),
      PyG's own memory path (which frees each layer's input storage), revtree's adapter.
      Depths 64, 128, 256.
flow  A normalizing flow of FrEIA's ``AllInOneBlock`` blocks (subnets of 2 x 128 units) on
      256 samples of 32 dimensions, trained on the negative log-likelihood. Systems: FrEIA's
      ``SequenceINN`` (stores every activation), revtree's adapter. Depths 32, 64, 128.
hf    transformers' ``ReformerModelWithLMHead``, layers alternating LSH and local attention
      (hidden 128, 2 heads, feed-forward 256, chunks of 64 tokens), 1024 tokens, the
      package's default dropout (0.05), a float32 step. Systems: the same layers in a plain
      loop (plain autograd), the package's own reversible function, revtree's adapter.
      Depths 4, 8, 16. Also printed: each system's gradient error against the plain loop in
      float64 (depth 2, dropout 0.05).

Memory kept for backward is counted exactly: the bytes of every tensor the forward leaves
alive (``revtree.testing.held_bytes``'s count: saved tensors, what Functions keep on ctx,
the output), parameters and inputs aside (PyG's memory path frees its input's storage;
revtree leaves the caller's tensors alone). Step time is forward + loss + backward, medians
of the systems interleaved in one process. A plot of both goes to ``--out``
(``clients.png``).

Usage:
    python benchmarks/clients.py              # about 12 minutes
    python benchmarks/clients.py --quick      # seconds: tiny sizes, figures mean nothing
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from _measure import (
    add_output_arguments,
    held_after_forward,
    interleaved_medians,
    plot_path,
    progress,
    summary_title,
    tensors_of,
)
from torch import nn

SYSTEMS = {
    "gnn": ("PyG plain", "PyG memory", "revtree"),
    "flow": ("FrEIA", "revtree"),
    "hf": ("HF plain", "HF reversible", "revtree"),
}


# ------------------------------------------------------------------------------- gnn


def gnn_systems(depth: int, nodes: int, channels: int) -> tuple[dict[str, nn.Module], Any]:
    from torch_geometric.nn import GroupAddRev, SAGEConv

    from revtree.adapters import pyg

    class GNNBlock(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(c)
            self.conv = SAGEConv(c, c)

        def forward(self, x: torch.Tensor, edge_index: Any, mask: Any = None) -> torch.Tensor:
            x = self.norm(x).relu()
            if self.training and mask is not None:
                x = x * mask
            return self.conv(x, edge_index)

    torch.manual_seed(0)
    plain = nn.ModuleList(
        GroupAddRev(GNNBlock(channels // 2), num_groups=2, disable=True) for _ in range(depth)
    )
    package = copy.deepcopy(plain)
    for layer in package:
        layer.disable = False
    ours = nn.ModuleList(
        pyg.GroupAddRev(nn.ModuleList(copy.deepcopy(list(layer.convs)))) for layer in plain
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(nodes, channels, generator=g)
    edge_index = torch.randint(0, nodes, (2, 10 * nodes), generator=g)
    mask = torch.zeros(nodes, channels).bernoulli_(0.5, generator=g) / 0.5
    return {"PyG plain": plain, "PyG memory": package, "revtree": ours}, (x, edge_index, mask)


def gnn_forward(layers: nn.Module, data: Any, h: torch.Tensor | None = None) -> torch.Tensor:
    x, edge_index, mask = data
    if h is None:  # the package frees its input's storage: a fresh input each step
        h = x.clone().requires_grad_()
    for layer in layers:
        h = layer(h, edge_index, mask)
    return h


# ------------------------------------------------------------------------------ flow


def flow_systems(depth: int, batch: int, dim: int) -> tuple[dict[str, nn.Module], Any]:
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm
    import numpy as np

    from revtree.adapters import freia

    def subnet(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(nn.Linear(c_in, 128), nn.ReLU(), nn.Linear(128, c_out))

    systems = {}
    for name, cls in (("FrEIA", Ff.SequenceINN), ("revtree", freia.SequenceINN)):
        torch.manual_seed(0)
        np.random.seed(0)
        flow = cls(dim)
        for _ in range(depth):
            flow.append(Fm.AllInOneBlock, subnet_constructor=subnet, affine_clamping=2.0)
        systems[name] = flow
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(1))
    return systems, x


def flow_forward(flow: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return flow(x)


# -------------------------------------------------------------------------------- hf


def _plain_encoder(self: Any, hidden_states: torch.Tensor, **kwargs: Any) -> Any:
    """transformers' Reformer encoder as plain autograd: its layers in a loop, two streams."""
    from transformers.models.reformer import modeling_reformer as hf

    x1 = x2 = hidden_states
    for layer in self.layers:
        x1 = x1 + layer.attention(hidden_states=x2, attention_mask=kwargs.get("attention_mask"))[0]
        x2 = x2 + layer.feed_forward(x1)
    out = self.layer_norm(torch.cat([x1, x2], dim=-1))
    out = nn.functional.dropout(out, p=self.dropout, training=self.training)
    return hf.ReformerEncoderOutput(out, [], [], None)


def hf_systems(
    depth: int, tokens: int, hidden: int, dtype: torch.dtype = torch.float32, dropout: float = 0.05
) -> tuple[dict[str, nn.Module], Any]:
    import types

    from transformers import ReformerConfig
    from transformers.models.reformer import modeling_reformer as hf

    from revtree.adapters import transformers as adapter

    config = ReformerConfig(
        vocab_size=256,
        hidden_size=hidden,
        num_attention_heads=2,
        attention_head_size=hidden // 2,
        feed_forward_size=2 * hidden,
        attn_layers=["lsh", "local"] * (depth // 2),
        axial_pos_embds=False,
        max_position_embeddings=tokens,
        lsh_attn_chunk_length=min(64, tokens // 2),
        local_attn_chunk_length=min(64, tokens // 2),
        num_buckets=max(2, tokens // min(64, tokens // 2)),
        num_hashes=1,
        is_decoder=True,
        hidden_dropout_prob=dropout,
        local_attention_probs_dropout_prob=dropout,
        lsh_attention_probs_dropout_prob=0.0,  # the package's default
    )
    torch.manual_seed(0)
    plain = hf.ReformerModelWithLMHead(config).to(dtype)
    package = copy.deepcopy(plain)
    ours = adapter.convert(copy.deepcopy(plain))
    encoder = plain.reformer.encoder
    encoder.forward = types.MethodType(_plain_encoder, encoder)
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(1))
    return {"HF plain": plain, "HF reversible": package, "revtree": ours}, ids


def hf_forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=False).logits


def hf_gradient_errors() -> dict[str, float]:
    """Worst relative parameter-gradient error of each system against the plain loop, float64."""
    models, ids = hf_systems(depth=2, tokens=64, hidden=16, dtype=torch.float64)
    grads = {}
    for name, model in models.items():
        torch.manual_seed(3)
        loss_of("hf", hf_forward(model, ids)).backward()
        grads[name] = [p.grad for p in model.parameters()]
    plain = grads["HF plain"]
    return {
        name: max(
            ((g - e).norm() / e.norm()).item()
            for g, e in zip(found, plain)
            if e is not None and g is not None and e.norm() > 0
        )
        for name, found in grads.items()
        if name != "HF plain"
    }


# -------------------------------------------------------------------------- measuring


def loss_of(workload: str, out: Any) -> torch.Tensor:
    if workload == "gnn":
        return out.square().mean()
    if workload == "hf":
        return out.float().log_softmax(-1)[..., 0].mean()
    z, log_jac_det = out
    return (0.5 * z.square().sum(-1) - log_jac_det).mean()


def measure(workload: str, depth: int, quick: bool, repeats: int) -> dict[str, tuple[float, float]]:
    if workload == "gnn":
        nodes, channels = (64, 8) if quick else (2000, 64)
        models, data = gnn_systems(depth, nodes, channels)
        forward: Callable[[nn.Module, Any], Any] = gnn_forward
    elif workload == "hf":
        tokens, hidden = (64, 16) if quick else (1024, 128)
        models, data = hf_systems(depth, tokens, hidden)
        forward = hf_forward
    else:
        batch, dim = (16, 8) if quick else (256, 32)
        models, data = flow_systems(depth, batch, dim)
        forward = flow_forward

    def step(model: nn.Module) -> None:
        loss_of(workload, forward(model, data)).backward()
        model.zero_grad(set_to_none=True)

    held = {}
    for name, model in models.items():
        step(model)  # first calls (the flows' ActNorm-free blocks, the engine's first looks)
        exempt = tensors_of(model, data)
        if workload == "gnn":  # the input is the caller's, not kept for backward
            h = data[0].clone().requires_grad_()
            exempt.append(h)
            held[name], out = held_after_forward(
                lambda m=model, h=h: gnn_forward(m, data, h), exempt
            )
        else:
            held[name], out = held_after_forward(lambda m=model: forward(m, data), exempt)
        loss_of(workload, out).backward()
        model.zero_grad(set_to_none=True)
        del out
    times = interleaved_medians(
        {name: (lambda m=model: step(m)) for name, model in models.items()}, repeats
    )
    return {name: (held[name], times[name]) for name in models}


def plot(results: dict[str, dict[int, dict[str, tuple[float, float]]]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(results)
    fig, axes = plt.subplots(2, columns, figsize=(5 * columns, 7), squeeze=False)
    styles = {
        "revtree": ("C0", "o"),
        "PyG plain": ("C3", "s"),
        "PyG memory": ("C1", "^"),
        "FrEIA": ("C3", "s"),
        "HF plain": ("C3", "s"),
        "HF reversible": ("C1", "^"),
    }
    for column, (workload, by_depth) in enumerate(results.items()):
        depths = sorted(by_depth)
        first = SYSTEMS[workload][0]
        for name in SYSTEMS[workload]:
            color, marker = styles[name]
            held = [by_depth[d][name][0] / 2**20 for d in depths]
            step = [by_depth[d][name][1] / by_depth[d][first][1] for d in depths]
            axes[0][column].plot(depths, held, marker=marker, color=color, label=name)
            axes[1][column].plot(depths, step, marker=marker, color=color, label=name)
        axes[0][column].set_title(
            {
                "gnn": "RevGNN (PyG)",
                "flow": "normalizing flow (FrEIA)",
                "hf": "Reformer LM (transformers)",
            }[workload]
        )
        axes[0][column].set_ylabel("MiB kept for backward")
        axes[0][column].set_yscale("log")
        axes[1][column].set_ylabel(f"step time / {first}")
        axes[1][column].set_xlabel("depth (layers or blocks)")
        for ax in axes[:, column]:
            ax.legend()
            ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--workloads", nargs="+", default=["gnn", "flow", "hf"])
    add_output_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
    repeats = args.repeats or (3 if args.quick else 7)
    depths = {
        "gnn": (4, 8) if args.quick else (64, 128, 256),
        "flow": (4, 8) if args.quick else (32, 64, 128),
        "hf": (2, 4) if args.quick else (4, 8, 16),
    }
    results: dict[str, dict[int, dict[str, tuple[float, float]]]] = {}
    for workload in args.workloads:
        results[workload] = {}
        for depth in depths[workload]:
            progress(f"{workload}, depth {depth}")
            results[workload][depth] = measure(workload, depth, args.quick, repeats)
    progress("")
    print(
        f"{summary_title(args.quick)}: memory kept for backward (MiB, counted exactly) and "
        f"step time (ms, median of {repeats}, interleaved), {args.threads} thread(s)"
    )
    for workload, by_depth in results.items():
        names = SYSTEMS[workload]
        print(f"\n{workload}")
        print(f"{'depth':>6} " + " ".join(f"{n + ' MiB':>14} {n + ' ms':>14}" for n in names))
        for depth, row in by_depth.items():
            cells = " ".join(f"{row[n][0] / 2**20:>14.2f} {row[n][1] * 1e3:>14.1f}" for n in names)
            print(f"{depth:>6} {cells}")
    if "hf" in results:
        print("\nhf gradient error against the plain loop (float64, depth 2, dropout 0.05):")
        for name, error in hf_gradient_errors().items():
            print(f"  {name:<14} {error:.1e}")
    plot(results, plot_path(args, "clients"))


if __name__ == "__main__":
    main()
