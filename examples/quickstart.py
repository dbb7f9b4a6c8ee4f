"""A first reversible model: a dict of two leaves, one split between the streams, one duplicated.

Run: python examples/quickstart.py
"""

import torch
from torch import nn

import revtree
from revtree.codecs import Duplicate, Split


class PerLeafMLP(nn.Module):
    """f or g: an MLP for each leaf of the half-stream dict."""

    def __init__(self, widths: dict[str, int]) -> None:
        super().__init__()
        self.mlps = nn.ModuleDict(
            {
                k: nn.Sequential(
                    nn.LayerNorm(w),
                    nn.Linear(w, 4 * w),
                    nn.GELU(),
                    nn.Dropout(0.1),
                    nn.Linear(4 * w, w),
                )
                for k, w in widths.items()
            }
        )

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: mlp(x[k]) for k, mlp in self.mlps.items()}


torch.manual_seed(0)
widths = {"tokens": 32, "cls": 64}  # tokens (64 wide) is split in two, cls (64 wide) is duplicated
model = revtree.ReversibleSequence(
    [(PerLeafMLP(widths), PerLeafMLP(widths)) for _ in range(12)],
    codec={"tokens": Split(-1), "cls": Duplicate()},
)
x = {"tokens": torch.randn(8, 16, 64, requires_grad=True), "cls": torch.randn(8, 64)}

torch.manual_seed(1)  # dropout draws from here; the recomputation replays the same masks
y = model(x)  # activations of the 12 blocks are not stored
loss = y["tokens"].pow(2).mean() + y["cls"].pow(2).mean()
loss.backward()  # each block's inputs are reconstructed from its outputs

# the same function with plain autograd, for an A/B check of the gradients
grads = [p.grad.clone() for p in model.parameters()]
model.zero_grad()
model.reversible = False
torch.manual_seed(1)
y = model(x)
(y["tokens"].pow(2).mean() + y["cls"].pow(2).mean()).backward()
worst = max(((g - p.grad).norm() / p.grad.norm()).item() for g, p in zip(grads, model.parameters()))
print(f"loss {loss.item():.4f}; worst relative gradient difference to plain autograd: {worst:.1e}")
if worst > 1e-4:  # float32 rounding gives ~1e-6; run in float64 for ~1e-15
    raise SystemExit("the reversible gradients differ from plain autograd")
