"""A reversible transformer over a tuple (tokens, cls), with a codec per leaf.

The tokens are split between the two streams on the feature axis (RevNet style); the class
token is duplicated into both (Reformer style). f attends, g is a feedforward.

Run: python examples/transformer_tuple.py
"""

import torch
from torch import nn

import revtree
from revtree.codecs import Duplicate, Split

D = 32  # half-stream width of the tokens; the cls token is 2 * D wide in each stream


class Attention(nn.Module):
    """f: tokens attend to each other and to the cls token; the cls token attends to the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_in = nn.Linear(2 * D, D)
        self.norm = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, num_heads=4, dropout=0.1, batch_first=True)
        self.cls_out = nn.Linear(D, 2 * D)

    def forward(self, x, padding_mask=None):
        tokens, cls = x
        seq = self.norm(torch.cat([self.cls_in(cls)[:, None], tokens], dim=1))
        mask = None if padding_mask is None else nn.functional.pad(padding_mask, (1, 0))
        out, _ = self.attn(seq, seq, seq, key_padding_mask=mask, need_weights=False)
        return out[:, 1:], self.cls_out(out[:, 0])


class FeedForward(nn.Module):
    """g: one MLP per leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Sequential(
            nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * D, D)
        )
        self.cls = nn.Sequential(nn.LayerNorm(2 * D), nn.Linear(2 * D, 2 * D), nn.GELU())

    def forward(self, x):
        tokens, cls = x
        return self.tokens(tokens), self.cls(cls)


model = revtree.ReversibleSequence(
    [(Attention(), FeedForward()) for _ in range(8)],
    codec=(Split(-1), Duplicate()),  # a prefix tree of codecs: one per leaf of the tuple
)
tokens = torch.randn(4, 10, 2 * D, requires_grad=True)
cls = torch.zeros(4, 2 * D, requires_grad=True)
padding_mask = torch.zeros(4, 10, dtype=torch.bool)
padding_mask[:, 8:] = True  # keyword context reaches f

out_tokens, out_cls = model((tokens, cls), padding_mask=padding_mask)
loss = out_cls.pow(2).mean() + out_tokens.pow(2).mean()
loss.backward()
print(f"tokens {tuple(out_tokens.shape)}, cls {tuple(out_cls.shape)}, loss {loss.item():.4f}")
reached = cls.grad.abs().sum().item() > 0
print(f"gradient reaches the cls input: {reached}")
if not reached:
    raise SystemExit("no gradient reached the duplicated cls token")
