"""A normalizing flow of FrEIA's blocks, trained by inverting them: memory flat in depth.

FrEIA's ``SequenceINN`` (``revtree.adapters.freia``): each block an ``Invertible`` step
whose log-determinant is a side output. Trained on a two-moons-like density by maximum
likelihood, then sampled with ``rev=True``.
"""

import math

import FrEIA.modules as Fm
import numpy as np
import torch
from torch import nn

from revtree.adapters.freia import SequenceINN
from revtree.testing import held_bytes


def subnet(c_in, c_out):
    return nn.Sequential(nn.Linear(c_in, 64), nn.ReLU(), nn.Linear(64, c_out))


def moons(n, generator):
    angle = torch.rand(n, generator=generator) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.stack((angle.cos(), angle.sin()), -1)
    x = torch.where(upper[:, None], x, torch.stack((1 - x[:, 0], 0.5 - x[:, 1]), -1))
    return x + 0.05 * torch.randn(n, 2, generator=generator)


torch.manual_seed(0)
np.random.seed(0)  # AllInOneBlock draws its permutation from numpy
data = torch.Generator().manual_seed(1)
kept_at = {}
for depth in (4, 32):
    flow = SequenceINN(2)
    for _ in range(depth):
        flow.append(Fm.AllInOneBlock, subnet_constructor=subnet, affine_clamping=2.0)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    for _ in range(100 if depth == 4 else 20):
        z, log_jac_det = flow(moons(256, data))
        nll = (0.5 * z.square().sum(-1) - log_jac_det).mean() + math.log(2 * math.pi)
        optimizer.zero_grad()
        nll.backward()
        optimizer.step()
    batch = moons(256, data)
    kept = held_bytes(lambda f=flow, b=batch: f(b), exclude=[batch])
    with torch.no_grad():
        samples, _ = flow(torch.randn(4, 2), rev=True)
    kept_at[depth] = kept
    with torch.no_grad():  # sampling inverts the flow: z back to the batch
        z, _ = flow(batch)
        error = (flow(z, rev=True)[0] - batch).abs().max().item()
    if error > 1e-4:
        raise SystemExit(f"{depth} blocks: the inverse is off by {error:.1e}")
    print(
        f"{depth:>2} blocks: nll {nll.item():.3f}, {kept / 2**10:.1f} KiB kept for backward, "
        f"samples {samples.shape}"
    )

# the activations kept do not grow with depth: the output and the log-determinant
if kept_at[32] > 1.05 * kept_at[4]:
    raise SystemExit(f"memory grew with depth: {kept_at}")
