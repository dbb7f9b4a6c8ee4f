"""A RevNet-style convolutional network on images: Split over channels, BatchNorm inside.

Run: python examples/revnet_conv.py
"""

import torch
from torch import nn

import revtree
from revtree.codecs import Split


def residual(channels: int) -> nn.Module:
    """f or g: the RevNet residual function on half of the channels."""
    return nn.Sequential(
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
    )


class RevNet(nn.Module):
    def __init__(self, channels: int = 32, depth: int = 6, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.body = revtree.ReversibleSequence(
            [(residual(channels // 2), residual(channels // 2)) for _ in range(depth)],
            codec=Split(dim=1),  # the two streams are the two halves of the channels
        )
        self.head = nn.Linear(channels, classes)

    def forward(self, images):
        return self.head(self.body(self.stem(images)).mean((2, 3)))


torch.manual_seed(0)
model = RevNet()
images, labels = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
losses = []
for step in range(5):
    loss = nn.functional.cross_entropy(model(images), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    print(f"step {step}: loss {losses[-1]:.3f}")
norm = model.body.blocks[0].f[0]
print(f"BatchNorm saw {norm.num_batches_tracked.item()} batches in 5 steps (once per step)")
if norm.num_batches_tracked.item() != 5:  # backward's recomputation must not count again
    raise SystemExit("BatchNorm updated its running statistics during the recomputation")
if losses[-1] >= losses[0]:
    raise SystemExit(f"the loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}")
