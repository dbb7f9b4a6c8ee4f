"""Train a deep reversible MLP on scikit-learn's digits; compare what it stores with plain autograd.

Prints the activation memory each kept for backward (bytes of the tensors autograd saved,
parameters not counted) and the test accuracy, and saves the loss curve to digits_loss.png
(or to the path given as argument).

Run: python examples/digits.py [loss.png]   (needs scikit-learn and matplotlib)
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import revtree  # noqa: E402
from revtree.testing import saved_bytes  # noqa: E402

WIDTH, DEPTH = 128, 16
PNG = Path(sys.argv[1] if len(sys.argv) > 1 else "digits_loss.png")


def mlp() -> nn.Module:
    half = WIDTH // 2
    return nn.Sequential(
        nn.LayerNorm(half),
        nn.Linear(half, 2 * half),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(2 * half, half),
    )


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(64, WIDTH)
        self.body = revtree.ReversibleSequence([(mlp(), mlp()) for _ in range(DEPTH)])
        self.head = nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 10))

    def forward(self, pixels):
        return self.head(self.body(self.embed(pixels)))


digits = load_digits()
pixels = torch.tensor(digits.data, dtype=torch.float32) / 16
labels = torch.tensor(digits.target)
torch.manual_seed(0)
order = torch.randperm(len(labels))
train, test = order[:1500], order[1500:]

model = Classifier()
batch = pixels[train[:256]]
model.body.reversible = False
plain = saved_bytes(model, batch) / 1024  # KiB autograd keeps for backward
model.body.reversible = True
reversible = saved_bytes(model, batch) / 1024
print(
    f"activations kept for backward, batch of 256, depth {DEPTH}: "
    f"plain autograd {plain:.0f} KiB, revtree {reversible:.0f} KiB "
    f"({reversible / plain:.2f}x)"
)
if reversible > plain / 4:
    raise SystemExit("revtree should keep a small fraction of plain autograd's activations")

opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
losses = []
for _ in range(6):
    for chunk in train[torch.randperm(len(train))].split(128):
        loss = nn.functional.cross_entropy(model(pixels[chunk]), labels[chunk])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
model.eval()
with torch.no_grad():
    accuracy = (model(pixels[test]).argmax(1) == labels[test]).float().mean().item()
print(f"final training loss {losses[-1]:.3f}, test accuracy {accuracy:.1%}")
if accuracy < 0.9:
    raise SystemExit(f"test accuracy {accuracy:.1%}: the reversible MLP did not learn")

plt.figure(figsize=(5, 3))
plt.plot(losses)
plt.xlabel("step")
plt.ylabel("cross-entropy")
plt.title(f"reversible MLP, depth {DEPTH}, on digits")
plt.tight_layout()
plt.savefig(PNG, dpi=100)
if not PNG.is_file():
    raise SystemExit(f"{PNG} was not written")
print(f"saved {PNG}")
