"""A deep graph network of PyG's grouped reversible layers, on revtree: memory flat in depth.

RevGNN ("Graph Neural Networks with 1000 Layers") as in PyG's example, built from
``torch_geometric.nn.GroupAddRev`` under ``revtree.adapters.pyg.patch()``: each layer's
groups are one block of ``Update`` steps. The layers are called one after another; the
engine takes over each output as the next layer's input, so the stack holds one output in
all, and the caller's tensors are never freed under it.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GroupAddRev, SAGEConv

from revtree.adapters import pyg
from revtree.testing import held_bytes


class GNNBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.conv = SAGEConv(channels, channels)

    def forward(self, x, edge_index, mask=None):
        x = self.norm(x).relu()
        if self.training and mask is not None:
            x = x * mask
        return self.conv(x, edge_index)


class RevGNN(nn.Module):
    def __init__(self, channels, depth, groups=2):
        super().__init__()
        self.lin = nn.Linear(16, channels)
        self.layers = nn.ModuleList(
            GroupAddRev(GNNBlock(channels // groups), num_groups=groups) for _ in range(depth)
        )
        self.out = nn.Linear(channels, 4)

    def forward(self, x, edge_index):
        h = self.lin(x)
        mask = torch.zeros_like(h).bernoulli_(0.8) / 0.8  # shared by every layer, as PyG's
        for layer in self.layers:
            h = layer(h, edge_index, mask)
        return self.out(F.relu(h))


torch.manual_seed(0)
nodes = 500
x = torch.randn(nodes, 16)
edge_index = torch.randint(0, nodes, (2, 5 * nodes))
labels = torch.randint(0, 4, (nodes,))

kept_at = {}
for depth in (8, 64):
    with pyg.patch():
        model = RevGNN(channels=32, depth=depth)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = F.cross_entropy(model(x, edge_index), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    kept = held_bytes(lambda m=model: m(x, edge_index), exclude=[x])
    kept_at[depth] = kept
    print(f"depth {depth:>3}: loss {loss.item():.3f}, {kept / 2**10:.0f} KiB kept for backward")
    if not torch.isfinite(loss):
        raise SystemExit(f"depth {depth}: the loss is {loss.item()}")

# the activations kept do not grow with depth: one layer's output, whatever the depth
if kept_at[64] > 1.05 * kept_at[8]:
    raise SystemExit(f"memory grew with depth: {kept_at}")
