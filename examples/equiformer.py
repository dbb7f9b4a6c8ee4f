"""Swap revtree into equiformer-pytorch's reversible trunk, and see what the step stores.

Run: python examples/equiformer.py   (needs `pip install equiformer-pytorch==0.5.4`)
"""

import torch
from equiformer_pytorch import Equiformer

from revtree.adapters import equiformer as adapter
from revtree.testing import saved_bytes

config = dict(
    num_tokens=20, dim=16, dim_head=8, heads=2, num_degrees=3, depth=8, reduce_dim_out=True
)


torch.manual_seed(0)
package = Equiformer(**config, reversible=True)  # equiformer-pytorch's own reversible trunk
with adapter.patch():  # Equiformer built here runs its trunk on revtree
    ours = Equiformer(**config, reversible=True)
ours.load_state_dict(package.state_dict(), strict=True)  # same parameter names
plain = Equiformer(**config, reversible=False)

feats = torch.randint(0, 20, (1, 48))
coords = torch.randn(1, 48, 3)
mask = torch.ones(1, 48, dtype=torch.bool)

same = torch.allclose(
    package(feats, coords, mask).type1, ours(feats, coords, mask).type1, atol=1e-5
)
print(f"revtree's trunk computes the package's function: {same}")
if not same:
    raise SystemExit("revtree's trunk and the package's give different outputs")
# (equiformer-pytorch keeps its trunk's output as a plain attribute, out of these hooks' sight:
# benchmarks/equiformer.py compares the two by process memory instead)
saved = {}
for name, model in [("plain autograd", plain), ("revtree reversible", ours)]:
    saved[name] = saved_bytes(model, feats, coords, mask) / 2**20  # MB kept for backward
    print(f"{name:>18}: {saved[name]:6.1f} MB saved for backward")
if saved["revtree reversible"] > saved["plain autograd"] / 4:
    raise SystemExit("the reversible trunk should keep a small fraction of plain autograd's")
