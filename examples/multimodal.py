"""A nested-dict multi-modal model: image patches, a global image vector and text tokens.

The codec is a prefix tree: everything under "image" is split on the feature axis, the text
is duplicated into both streams.

Run: python examples/multimodal.py
"""

import optree
import torch
from torch import nn

import revtree
from revtree.codecs import Duplicate, Split
from revtree.testing import compare_gradients


class CrossModal(nn.Module):
    """Each modality gets an MLP of itself plus a summary of the others."""

    def __init__(self, widths: dict) -> None:
        super().__init__()
        self.patch = nn.Linear(widths["patches"], widths["patches"])
        self.glob = nn.Linear(widths["global"], widths["global"])
        self.text = nn.Linear(widths["text"], widths["text"])
        self.to_text = nn.Linear(widths["global"], widths["text"])
        self.to_image = nn.Linear(widths["text"], widths["patches"])

    def forward(self, x):
        image, text = x["image"], x["text"]
        text_summary = text.mean(1)
        return {
            "image": {
                "patches": torch.tanh(
                    self.patch(image["patches"]) + self.to_image(text_summary)[:, None]
                ),
                "global": torch.tanh(self.glob(image["global"])),
            },
            "text": torch.tanh(self.text(text) + self.to_text(image["global"])[:, None]),
        }


widths = {"patches": 24, "global": 16, "text": 20}  # half-stream widths
model = revtree.ReversibleSequence(
    [(CrossModal(widths), CrossModal(widths)) for _ in range(6)],
    codec={"image": Split(-1), "text": Duplicate()},
).double()
x = {
    "image": {
        "patches": torch.randn(2, 49, 48, dtype=torch.float64),
        "global": torch.randn(2, 32, dtype=torch.float64),
    },
    "text": torch.randn(2, 7, 20, dtype=torch.float64, requires_grad=True),
}
y = model(x)
shapes = optree.tree_map(lambda t: tuple(t.shape), y)
print("output shapes:", shapes)
if shapes != optree.tree_map(lambda t: tuple(t.shape), x):
    raise SystemExit("the output tree is not shaped like the input tree")

report = compare_gradients(model, x)  # reversible vs plain autograd, leaf by leaf
print("gradients vs plain autograd:", report)
if report.worst > 1e-10:  # float64: the two agree to rounding error
    raise SystemExit(f"reversible gradients differ from plain autograd: {report}")
