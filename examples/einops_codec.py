"""A custom leaf codec written with einops: a checkerboard split of images (RealNVP style).

Each stream gets the pixels of one colour of a 2x2 checkerboard; decode puts them back.

Run: python examples/einops_codec.py
"""

import torch
from einops import rearrange
from torch import nn

import revtree
from revtree.codecs import Codec


class Checkerboard(Codec):
    """Pixels (2i+a, 2j+b) go to stream 1 when a == b, to stream 2 otherwise."""

    def encode(self, leaf, path):
        cells = rearrange(leaf, "b c (h p) (w q) -> b c h w (p q)", p=2, q=2)
        # cell entries are (0,0) (0,1) (1,0) (1,1): the diagonal to x1, the rest to x2
        return cells[..., [0, 3]], cells[..., [1, 2]]

    def decode(self, y1, y2, path):
        cells = torch.stack([y1[..., 0], y2[..., 0], y2[..., 1], y1[..., 1]], dim=-1)
        return rearrange(cells, "b c h w (p q) -> b c (h p) (w q)", p=2, q=2)


class Mixer(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x):  # x: (b, c, h, w, 2): a 3-D conv over (h, w) per checkerboard slot
        return torch.tanh(self.conv(x.movedim(-1, 2))).movedim(2, -1)


codec = Checkerboard()
images = torch.randn(2, 4, 8, 8)
assert torch.equal(codec.decode(*codec.encode(images, ()), ()), images)  # exact round trip

model = revtree.ReversibleSequence([(Mixer(4), Mixer(4)) for _ in range(4)], codec=codec)
with torch.no_grad():
    back = model.inverse(model(images))
print(f"images {tuple(images.shape)} -> streams {tuple(codec.encode(images, ())[0].shape)}")
error = (back - images).abs().max().item()
print(f"inverse(forward(x)) error: {error:.1e}")
if error > 1e-5:  # float32 rounding
    raise SystemExit("the checkerboard model does not invert")
