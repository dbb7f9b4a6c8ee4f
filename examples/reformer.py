"""Swap revtree into reformer-pytorch's ReformerLM and train it a few steps.

Run: python examples/reformer.py   (needs `pip install reformer-pytorch==1.4.4`)
"""

import time

import torch
from reformer_pytorch import ReformerLM

from revtree.adapters import reformer as adapter

config = dict(
    num_tokens=64,
    dim=64,
    depth=6,
    heads=4,
    max_seq_len=128,
    bucket_size=16,
    n_hashes=2,
    causal=True,
    lsh_dropout=0.1,
    ff_dropout=0.1,
)

torch.manual_seed(0)
package = ReformerLM(**config)  # reformer-pytorch's own reversible trunk
with adapter.patch():  # a ReformerLM built here runs its trunk on revtree
    model = ReformerLM(**config)
model.load_state_dict(package.state_dict(), strict=True)  # same parameter names

tokens = torch.randint(0, 64, (4, 129))  # inputs and next-token targets of 128
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
losses = []
for step in range(8):
    start = time.perf_counter()
    logits = model(tokens[:, :-1].contiguous())
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:])
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    print(f"step {step}: loss {losses[-1]:.3f} ({time.perf_counter() - start:.2f} s)")
if losses[-1] > 0.9 * losses[0]:
    raise SystemExit(f"the loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}")
