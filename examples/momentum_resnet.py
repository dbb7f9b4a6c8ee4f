"""Make a ResNet a Momentum ResNet, then fine-tune it on scikit-learn's digits.

``transform_to_momentumnet`` (momentumnet's function, on the revtree engine) turns the
residual stages of a torchvision-style ResNet into momentum stages that keep the blocks'
weights. The converted network stores no activations for its momentum steps: the script
prints what each network keeps for backward (the bytes of the tensors autograd saved, at
the same batch) and fine-tunes the converted one for a few steps.

The ResNet is built here with random weights (``examples/_resnet.py``: torchvision's
ResNet-18 and ResNet-34, module for module); a pretrained state dict would load into it
with ``strict=True`` before the conversion.

Run: python examples/momentum_resnet.py   (needs scikit-learn)
"""

import torch
import torch.nn.functional as F
from _resnet import resnet18, resnet34
from sklearn.datasets import load_digits

from revtree.adapters.momentumnet import transform_to_momentumnet
from revtree.testing import saved_bytes

BATCH, STEPS = 64, 9

digits = load_digits()  # 8x8 grey digits, shown to the ResNet as 32x32 RGB images
images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
images = F.interpolate(images, size=32, mode="bilinear").expand(-1, 3, -1, -1)
images = (images - images.mean()) / images.std()
labels = torch.tensor(digits.target)

torch.manual_seed(0)
batch = images[:BATCH]
converted_models = {}
for name, make in (("ResNet-18", resnet18), ("ResNet-34", resnet34)):
    original = make(num_classes=10)
    converted = transform_to_momentumnet(original, gamma=0.9)  # reversible momentum steps
    plain, reversible = (saved_bytes(m, batch) / 2**20 for m in (original, converted))
    print(
        f"{name}, batch of {BATCH}: kept for backward {plain:.1f} MiB as a ResNet, "
        f"{reversible:.1f} MiB as a Momentum ResNet ({reversible / plain:.2f}x)"
    )
    if not reversible < plain:
        raise SystemExit(f"{name}: the Momentum ResNet kept no less than the ResNet")
    converted_models[name] = converted

model = converted_models["ResNet-18"]  # fine-tune the converted ResNet-18
optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
order = torch.randperm(len(labels))
losses = []
model.train()
for step in range(STEPS):
    idx = order[step * BATCH : (step + 1) * BATCH]
    loss = F.cross_entropy(model(images[idx]), labels[idx])
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    losses.append(loss.item())
    if step % 3 == 0 or step == STEPS - 1:
        print(f"step {step}: loss {loss.item():.3f}")
first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
print(f"mean loss of the first 3 steps {first:.3f}, of the last 3 {last:.3f}")
if not last < first:
    raise SystemExit("fine-tuning did not lower the loss")
