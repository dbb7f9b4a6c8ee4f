"""The systems and blocks every benchmark script builds: one registry, no script importing another.

- the peers (``SYSTEMS``, ``peer``, ``available``) and ``build(workload, system, pairs)``,
  the one place that knows how to drive each reversible library on the same ``(f, g)`` pairs;
- the blocks: ``mlp``, ``DegreeMLP``, ``LeafScale``, the transformer blocks of the GPU
  scripts (``Attention``, ``MLP``, ``transformer_pairs``, ``mlp_pairs``);
- plain autograd and checkpointing over the same pairs (``TensorChain``, ``DictChain``,
  ``TreeChain``, ``Plain`` with a codec of its own), and the GPU scripts' ``build_named``;
- the steps the scripts time (``tree_step``, ``device_step``) and ``times``, ``sync``.
"""

from __future__ import annotations

import copy
import importlib
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import revtree

# ---------------------------------------------------------------- the peers

# system -> (display name, module to import or None for built-in, pip distribution)
SYSTEMS: dict[str, tuple[str, str | None, str | None]] = {
    "plain": ("plain", None, None),
    "revtree-plain": ("revtree rev=False", None, None),
    "checkpoint": ("checkpoint", None, None),
    "revtree": ("revtree", None, None),
    "revtorch": ("RevTorch", "revtorch", "revtorch"),
    "revlib": ("RevLib", "revlib", "revlib"),
    "memcnn": ("MemCNN", "memcnn", "memcnn"),
    "reformer": ("reformer-pytorch", "reformer_pytorch.reversible", "reformer-pytorch"),
    "equiformer": ("equiformer-pytorch", "equiformer_pytorch.reversible", "equiformer-pytorch"),
    "plain-nested": ("plain, nested", None, None),
    "revtree-nested": ("revtree, nested", None, None),
}

_modules: dict[str, Any] = {}


def peer(system: str) -> Any:
    """The imported module of a peer system (``None`` if it is not installed)."""
    if system not in _modules:
        name = SYSTEMS[system][1]
        try:
            with warnings.catch_warnings():  # MemCNN warns about torch.cuda.amp on import
                warnings.simplefilter("ignore")
                _modules[system] = importlib.import_module(name) if name else True
        except ImportError:
            _modules[system] = None
    return _modules[system]


def available(systems: Iterable[str]) -> list[str]:
    return [s for s in systems if peer(s) is not None]


# ---------------------------------------------------------------- the blocks


def mlp(d: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


class DegreeMLP(nn.Module):
    """One MLP over the ``d`` axis of each degree: ``{l: (..., d, 2l + 1)}`` to the same."""

    def __init__(self, d: int, degrees: int) -> None:
        super().__init__()
        self.mlps = nn.ModuleDict({str(degree): mlp(d) for degree in range(degrees)})

    def forward(self, x: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {k: self.mlps[str(k)](v.transpose(-1, -2)).transpose(-1, -2) for k, v in x.items()}


class LeafScale(nn.Module):
    """Next to no work: ``tanh(w * x)`` on each leaf of any pytree, ``w`` a parameter per leaf."""

    def __init__(self, d: int, n_leaves: int) -> None:
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(torch.randn(d, 1) / 2) for _ in range(n_leaves))

    def forward(self, x: Any) -> Any:
        xs, spec = optree.tree_flatten(x)
        return spec.unflatten([torch.tanh(v * w) for v, w in zip(xs, self.w)])


Pairs = list[tuple[nn.Module, nn.Module]]


# ---------------------------------------------------------------- the systems


def tensor_block(
    f: nn.Module, g: nn.Module, x1: torch.Tensor, x2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    y1 = x1 + f(x2)
    return y1, x2 + g(y1)


def dict_block(f: nn.Module, g: nn.Module, x1: dict, x2: dict) -> tuple[dict, dict]:
    fx = f(x2)
    y1 = {k: x1[k] + fx[k] for k in x1}
    gy = g(y1)
    return y1, {k: x2[k] + gy[k] for k in x2}


class TensorChain(nn.Module):
    """Workload a with plain autograd, or one ``checkpoint`` per block."""

    def __init__(self, pairs: Pairs, checkpointed: bool) -> None:
        super().__init__()
        self.pairs = nn.ModuleList(nn.ModuleList(p) for p in pairs)
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, -1)
        for f, g in self.pairs:
            if self.checkpointed:
                x1, x2 = checkpoint(tensor_block, f, g, x1, x2, use_reentrant=False)
            else:
                x1, x2 = tensor_block(f, g, x1, x2)
        return torch.cat((x1, x2), -1)


class DictChain(nn.Module):
    """Workloads b and c: duplicated streams, plain autograd or one checkpoint per block."""

    def __init__(self, pairs: Pairs, checkpointed: bool) -> None:
        super().__init__()
        self.pairs = nn.ModuleList(nn.ModuleList(p) for p in pairs)
        self.checkpointed = checkpointed

    def forward(self, x: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        x1, x2 = x, x
        for f, g in self.pairs:
            if self.checkpointed:
                x1, x2 = checkpoint(dict_block, f, g, x1, x2, use_reentrant=False)
            else:
                x1, x2 = dict_block(f, g, x1, x2)
        return {k: (x1[k] + x2[k]) / 2 for k in x}


def nest(x: dict[int, torch.Tensor]) -> dict[str, Any]:
    """The leaves of a flat dict of degrees as a nested pytree, in the same leaf order."""
    v = [x[k] for k in sorted(x)]
    third = len(v) // 3
    return {
        "atoms": dict(enumerate(v[:third])),
        "edges": tuple(v[third : 2 * third]),
        "globals": list(v[2 * third :]),
    }


class Nested(nn.Module):
    """Workload c on a nested pytree: ``model`` sees ``nest(x)``; the output is flat again."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return dict(zip(sorted(x), optree.tree_leaves(self.model(nest(x)))))


class TreeChain(nn.Module):
    """Plain autograd on duplicated streams of any pytree."""

    def __init__(self, pairs: Pairs) -> None:
        super().__init__()
        self.pairs = nn.ModuleList(nn.ModuleList(p) for p in pairs)

    def forward(self, x: Any) -> Any:
        x1, x2 = x, x
        for f, g in self.pairs:
            x1 = optree.tree_map(torch.add, x1, f(x2))
            x2 = optree.tree_map(torch.add, x2, g(x1))
        return optree.tree_map(lambda a, b: (a + b) / 2, x1, x2)


class MemCNNChain(nn.Module):
    """MemCNN's couplings in an ``nn.Sequential``, fed a non-leaf alias of the input.

    With a leaf input MemCNN returns the input's gradient doubled.
    """

    def __init__(self, pairs: Pairs) -> None:
        super().__init__()
        memcnn = peer("memcnn")
        self.seq = nn.Sequential(
            *(
                memcnn.InvertibleModuleWrapper(
                    memcnn.AdditiveCoupling(f, g, split_dim=-1),
                    keep_input=i == 0,
                    keep_input_inverse=i == 0,
                )
                for i, (f, g) in enumerate(pairs)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x.view_as(x))


def build(workload: str, system: str, pairs: Pairs) -> nn.Module:
    """``system`` running ``pairs`` (the modules themselves, not copies) on ``workload``."""
    if workload == "a":
        if system in ("plain", "checkpoint"):
            return TensorChain(pairs, checkpointed=system == "checkpoint")
        if system == "revtree":
            return revtree.ReversibleSequence(pairs)
        if system == "revtorch":
            rt = peer(system)
            blocks = (rt.ReversibleBlock(f, g, split_along_dim=-1) for f, g in pairs)
            return rt.ReversibleSequence(nn.ModuleList(blocks))
        if system == "revlib":
            return peer(system).ReversibleSequential(*chain(*pairs), split_dim=-1)
        if system == "memcnn":
            return MemCNNChain(pairs)
        if system == "reformer":
            return peer(system).ReversibleSequence(nn.ModuleList(nn.ModuleList(p) for p in pairs))
    else:
        if system in ("plain", "checkpoint"):
            return DictChain(pairs, checkpointed=system == "checkpoint")
        if system in ("revtree", "revtree-plain"):
            codec = revtree.codecs.Degree()
            return revtree.ReversibleSequence(pairs, codec=codec, reversible=system == "revtree")
        if system == "equiformer":
            return peer(system).ReversibleSequence(list(pairs))
        if system == "plain-nested":
            return Nested(TreeChain(pairs))
        if system == "revtree-nested":
            return Nested(revtree.ReversibleSequence(pairs, codec=revtree.codecs.Duplicate()))
    raise ValueError(f"system {system!r} cannot run workload {workload!r}")


# ---------------------------------------------------------------- plain with a codec


def couple(f: nn.Module, g: nn.Module, x1: Any, x2: Any) -> tuple[Any, Any]:
    """One plain-autograd block over any tree."""
    y1 = optree.tree_map(torch.add, x1, f(x2))
    return y1, optree.tree_map(torch.add, x2, g(y1))


class Plain(nn.Module):
    """Plain autograd (or one non-reentrant checkpoint per block) with a codec of our own."""

    def __init__(self, pairs: list, encode: Callable, decode: Callable, ckpt: bool) -> None:
        super().__init__()
        self.pairs = nn.ModuleList(nn.ModuleList(p) for p in pairs)
        self.encode, self.decode, self.ckpt = encode, decode, ckpt

    def forward(self, x: Any) -> Any:
        x1, x2 = self.encode(x)
        for f, g in self.pairs:
            if self.ckpt:
                x1, x2 = checkpoint(couple, f, g, x1, x2, use_reentrant=False)
            else:
                x1, x2 = couple(f, g, x1, x2)
        return self.decode(x1, x2)


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = x.chunk(2, -1)
    return a, b


def cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat((a, b), -1)


def duplicate(x: Any) -> tuple[Any, Any]:
    return x, x


def mean(a: Any, b: Any) -> Any:
    return optree.tree_map(lambda u, v: (u + v) / 2, a, b)


# ---------------------------------------------------------------- the GPU scripts' blocks


class Attention(nn.Module):
    """Pre-norm multi-head self-attention (``scaled_dot_product_attention``), dropout optional."""

    def __init__(self, d: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.heads, self.dropout = heads, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.out(h.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d),
            nn.Linear(d, 4 * d),
            nn.GELU(),
            nn.Linear(4 * d, d),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def transformer_pairs(depth: int, d: int, heads: int, dropout: float = 0.0) -> list:
    return [(Attention(d, heads, dropout), MLP(d, dropout)) for _ in range(depth)]


def mlp_pairs(depth: int, d: int) -> list:
    return [(MLP(d), MLP(d)) for _ in range(depth)]


# ------------------------------------------------------------------------------- systems


# the GPU scripts name systems as they print them
NAMED = {
    "RevTorch": "revtorch",
    "RevLib": "revlib",
    "MemCNN": "memcnn",
    "reformer-pytorch": "reformer",
}


def build_named(system: str, pairs: list) -> nn.Module | None:
    """``system`` (as the GPU scripts name it) on its own copy of ``pairs`` (one tensor,
    split on the last axis), or ``None`` where it is not installed."""
    pairs = copy.deepcopy(pairs)
    if system in ("plain", "checkpoint"):
        return TensorChain(pairs, checkpointed=system == "checkpoint")
    if system == "plain compiled":
        return torch.compile(TensorChain(pairs, checkpointed=False))  # type: ignore[return-value]
    if system == "revtree":
        return revtree.ReversibleSequence(pairs)
    if system == "revtree compiled":
        return revtree.ReversibleSequence(pairs, compile=True)
    if system == "revtree compile=8":
        return revtree.ReversibleSequence(pairs, compile=8)
    if peer(NAMED[system]) is None:
        return None
    return build("a", NAMED[system], pairs)


PEERS = ("RevTorch", "reformer-pytorch", "RevLib", "MemCNN")


# ---------------------------------------------------------------- steps and timing


def tree_step(model: nn.Module, x: Any) -> None:
    """A training step: the sum of squares of every output leaf."""
    y = model(x)
    loss = sum(leaf.square().sum() for leaf in optree.tree_leaves(y))
    loss.backward()
    model.zero_grad(set_to_none=True)


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def device_step(model: nn.Module, x: torch.Tensor) -> None:
    """A training step of ``gpu.py``: the output's mean square, in float32."""
    model(x).float().square().mean().backward()
    model.zero_grad(set_to_none=True)


def times(models: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median step time in ms of each model, the models interleaved, synchronised."""
    out: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for name, model in models.items():
            sync()
            start = time.perf_counter()
            device_step(model, x)
            sync()
            out[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in out.items()}
