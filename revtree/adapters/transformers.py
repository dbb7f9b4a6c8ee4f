"""Hugging Face transformers' Reformer, trained through the revtree engine.

transformers (5.x) runs the Reformer's layers through its own ``_ReversibleFunction``: two
streams from ``torch.cat([h, h], -1)``, ``y1 = x1 + attention(x2)``,
``y2 = x2 + feed_forward(y1)``, the output ``cat([y1, y2])``. Here the same layers, weights
and state-dict names run on the engine, ``codec=Split(-1)``, the attention as ``f`` (it gets
the mask and the other keyword arguments), the chunked feed-forward as ``g``. What changes
against the package:

- **gradients right with dropout and LSH attention**: the package reuses the hash buckets of
  the forward pass in its recomputation, so the random rotations' ``torch.randn`` is not drawn
  again and every later dropout mask of the layer shifts (0.5-0.6 relative off in float64
  with the default ``hidden_dropout_prob=0.05``). Here the buckets are kept with
  [`revtree.memo`][revtree.memo], which leaves the random stream where the hashing left it;
  the gradients equal plain autograd's over the same layers;
- **no reseeding**: the package calls ``torch.seed()`` twice per layer in every training
  forward, so ``torch.manual_seed`` no longer makes a run repeatable; here the global stream
  moves exactly as in plain autograd;
- **backward in eval mode** works (the package asserts ``model.train()``);
- ``output_hidden_states`` and ``output_attentions`` return what the package returns, and
  carry gradients, as plain autograd's would; ``torch.autograd.grad`` writes no ``.grad``.

[`patch`][revtree.adapters.transformers.patch] makes every Reformer built inside it (by its
constructor or ``from_pretrained``) train this way;
[`convert`][revtree.adapters.transformers.convert] converts a model already built, in place.
Incremental decoding with a cache given by the caller (``generate``) runs the layers with
plain autograd, as the package computes it.

Examples:
    >>> import torch
    >>> from transformers import ReformerConfig, ReformerModelWithLMHead
    >>> from revtree.adapters import transformers as adapter
    >>> config = ReformerConfig(vocab_size=32, hidden_size=16, num_attention_heads=2,
    ...     attention_head_size=8, feed_forward_size=32, attn_layers=["lsh", "local"],
    ...     axial_pos_embds=False, max_position_embeddings=64, lsh_attn_chunk_length=8,
    ...     local_attn_chunk_length=8, num_buckets=4, is_decoder=True)
    >>> with adapter.patch():
    ...     model = ReformerModelWithLMHead(config)
    >>> ids = torch.randint(0, 32, (2, 32))
    >>> model(ids, labels=ids).loss.backward()
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn

from .._block import Block
from .._errors import RevtreeError
from .._replay._memo import memo
from .._sequence import ReversibleSequence
from .._state import is_recomputing
from ..codecs import Split
from ._built import built
from ._patching import constructed_as, swapped
from ._versions import require

TESTED = "5.25.0"

require("transformers", TESTED, "transformers")

from transformers.models.reformer import modeling_reformer as _hf  # noqa: E402

_CLASSES = (
    "ReformerModel, ReformerModelWithLMHead, ReformerForMaskedLM, "
    "ReformerForSequenceClassification, ReformerForQuestionAnswering"
)

for _name in ("ReformerEncoder", "ReformerLayer", "LSHSelfAttention", "ReformerEncoderOutput"):
    if not hasattr(_hf, _name):
        raise RevtreeError(
            f"revtree.adapters.transformers drives the Reformer of transformers {TESTED} "
            f"(5.x), whose modeling_reformer defines {_name}; the installed version does not. "
            f"Hint: pip install 'transformers=={TESTED}'."
        )


class LSHSelfAttention(_hf.LSHSelfAttention):
    """The package's LSH attention, its hash buckets kept with [`revtree.memo`][revtree.memo].

    In a reversible block's recomputation the buckets of the forward pass come back without
    hashing again, and the random stream is left where the hashing left it, so that the
    dropout masks after it are the forward's; outside one it hashes as the package does.
    """

    def _hash_vectors(self, *args: Any, **kwargs: Any) -> Any:
        hash_vectors = super()._hash_vectors
        return memo(lambda: hash_vectors(*args, **kwargs))


class _Detaching:
    """The caller's cache, filled with tensors that carry no graph, as the package fills it."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)

    def update(self, buckets: Any, states: torch.Tensor, layer_idx: int) -> Any:
        if buckets is not None:
            buckets = buckets.detach()
        return self.cache.update(buckets, states.detach(), layer_idx)


class _Attention(nn.Module):
    """``f`` of a layer: the package's attention on ``x2``, and what it is asked to return."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_hashes: int | None = None,
        cache: Any = None,
        orig_sequence_length: int | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # the cache is filled in the forward pass only, as the package fills it
        fill = cache is not None and not is_recomputing()
        out = self.attention(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            num_hashes=num_hashes,
            past_buckets_states=cache if fill else None,
            use_cache=fill,
            orig_sequence_length=orig_sequence_length,
            output_attentions=output_attentions,
        )
        side = {}
        if output_hidden_states:  # this layer's input stream, as the package lists it
            side["hidden_states"] = hidden_states.clone()
        if output_attentions:
            side["attentions"] = out.attention_probs
        return out.hidden_states, side


class ReformerEncoder(_hf.ReformerEncoder):
    """The package's ``ReformerEncoder``, its layers run by a ``ReversibleSequence``."""

    @property
    def sequence(self) -> ReversibleSequence:
        """The sequence that runs the layers as they are now."""
        layers = list(self.layers)
        key = [m for layer in layers for m in (layer.attention, layer.feed_forward)]
        return built(self, key, lambda: self._build(layers))

    @staticmethod
    def _build(layers: list[nn.Module]) -> ReversibleSequence:
        blocks = [
            Block(
                _Attention(cast(nn.Module, layer.attention)), layer.feed_forward, side=(True, False)
            )
            for layer in layers
        ]
        return ReversibleSequence(blocks, codec=Split(-1), route="f", sides="list")

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_hashes: int | None = None,
        past_buckets_states: Any = None,
        use_cache: bool = False,
        orig_sequence_length: int | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> Any:
        """The package's encoder: the layers, then the layer norm and dropout.

        Args:
            hidden_states: The embeddings, ``(batch, tokens, hidden_size)``.
            attention_mask: The padding mask.
            num_hashes: Hashing rounds for the LSH layers.
            past_buckets_states: A cache of incremental decoding: the layers then run with
                plain autograd, as the package computes them.
            use_cache: Fill a cache (a new one when none is given).
            orig_sequence_length: The length before padding.
            output_hidden_states: Return each layer's input stream and the last.
            output_attentions: Return each layer's attention probabilities.
        """
        given = past_buckets_states is not None
        if use_cache and past_buckets_states is None:
            past_buckets_states = _hf.ReformerDynamicCache()
        cache = past_buckets_states if use_cache or given else None
        sequence = self.sequence
        reversible = not given  # a cache read back is another computation in a recomputation
        if sequence.reversible != (reversible,) * len(self.layers):
            sequence.reversible = reversible
        kwargs = {
            "attention_mask": attention_mask,
            "num_hashes": num_hashes,
            "cache": None if cache is None else (cache if given else _Detaching(cache)),
            "orig_sequence_length": orig_sequence_length,
            "output_attentions": output_attentions,
            "output_hidden_states": output_hidden_states,
        }
        out, sides = sequence(torch.cat([hidden_states, hidden_states], dim=-1), **kwargs)
        all_hidden_states: list[torch.Tensor] = []
        all_attentions: list[torch.Tensor] = []
        if output_hidden_states:
            all_hidden_states = [hidden_states, *(s["hidden_states"] for s in sides[1:])]
            all_hidden_states.append(out.chunk(2, dim=-1)[1])
        if output_attentions:
            all_attentions = [s["attentions"] for s in sides]
        out = self.layer_norm(out)
        out = nn.functional.dropout(out, p=self.dropout, training=self.training)
        return _hf.ReformerEncoderOutput(
            hidden_states=out,
            all_hidden_states=all_hidden_states,
            all_attentions=all_attentions,
            past_buckets_states=past_buckets_states if use_cache else None,
        )


def convert(model: nn.Module) -> nn.Module:
    """Make a Reformer already built train through revtree, in place; returns it.

    Its modules, weights and state-dict names stay as they are: the encoder and the LSH
    attention layers become this module's subclasses of the package's.

    Args:
        model: A ``ReformerModel``, ``ReformerModelWithLMHead``, ``ReformerForMaskedLM``,
            ``ReformerForSequenceClassification`` or ``ReformerForQuestionAnswering`` (or
            any module holding a ``ReformerEncoder``).

    Returns:
        ``model``.

    Raises:
        RevtreeError: ``model`` holds no Reformer encoder.

    Examples:
        >>> from transformers import ReformerConfig, ReformerModel
        >>> from revtree.adapters.transformers import convert
        >>> model = convert(ReformerModel(ReformerConfig(attn_layers=["local"])))
        >>> type(model.encoder).__module__
        'revtree.adapters.transformers'
    """
    found = [m for m in model.modules() if isinstance(m, _hf.ReformerEncoder)]
    if not found:
        raise RevtreeError(
            f"{type(model).__name__} holds no reversible layers (no ReformerEncoder), so "
            f"revtree.adapters.transformers has nothing to convert. Hint: it converts {_CLASSES}."
        )
    for module in model.modules():
        if type(module) is _hf.ReformerEncoder:
            module.__class__ = ReformerEncoder
        elif type(module) is _hf.LSHSelfAttention:
            module.__class__ = LSHSelfAttention
    return model


@contextmanager
def patch() -> Iterator[None]:
    """Make every Reformer built inside the context (constructors, ``from_pretrained``) revtree's.

    Examples:
        >>> from transformers import ReformerConfig, ReformerModel
        >>> with patch():
        ...     model = ReformerModel(ReformerConfig(attn_layers=["lsh"]))
        >>> type(model.encoder).__name__, type(model.encoder).__module__
        ('ReformerEncoder', 'revtree.adapters.transformers')
    """
    with (
        constructed_as(_hf.ReformerEncoder, ReformerEncoder),
        constructed_as(_hf.LSHSelfAttention, LSHSelfAttention),
        swapped([_hf], ReformerEncoder=ReformerEncoder, LSHSelfAttention=LSHSelfAttention),
    ):
        yield
