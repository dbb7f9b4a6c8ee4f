"""Codecs: exact round trips, the layouts they promise, and their errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import revtree
from revtree.codecs import Codec, Degree, Duplicate, Rearrange, Split

even_shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(
    lambda s: tuple(2 * d for d in s)
)


@given(even_shapes, st.data())
def test_split_round_trip_is_exact(shape, data):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = torch.randn(shape, dtype=torch.float64)
    x1, x2 = Split(dim).encode(x, ())
    assert x1.shape[dim] == x2.shape[dim] == shape[dim] // 2
    assert torch.equal(x1, x.narrow(dim, 0, shape[dim] // 2))
    assert torch.equal(Split(dim).decode(x1, x2, ()), x)


@given(even_shapes)
def test_duplicate_round_trip_is_exact(shape):
    x = torch.randn(shape, dtype=torch.float64)
    x1, x2 = Duplicate().encode(x, ())
    assert x1 is x and x2 is x
    assert torch.equal(Duplicate().decode(x1, x2, ()), x)


@given(even_shapes)
def test_rearrange_round_trip_is_exact(shape):
    x = torch.randn(shape, dtype=torch.float64)
    codec = Rearrange("... (c two) -> two ... c", two=2)
    x1, x2 = codec.encode(x, ())
    assert torch.equal(x1, x[..., 0::2]) and torch.equal(x2, x[..., 1::2])
    assert torch.equal(codec.decode(x1, x2, ()), x)


@given(st.integers(0, 3), st.lists(st.integers(1, 3), min_size=1, max_size=3))
def test_degree_round_trip_is_exact(degree, batch):
    x = torch.randn(*batch, 2 * degree + 1, dtype=torch.float64)
    x1, x2 = Degree().encode(x, ("features", degree))
    assert x1 is x and x2 is x
    assert torch.equal(Degree().decode(x1, x2, (degree,)), x)


def test_rearrange_matches_split_on_channels():
    x = torch.randn(2, 6, 3, 3)
    a = Rearrange("b (two c) h w -> two b c h w", two=2).encode(x, ())
    b = Split(1).encode(x, ())
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_codecs_are_values():
    assert Split(1) == Split(1) and hash(Split(1)) == hash(Split(1)) and Split(1) != Split(0)
    assert Rearrange("a (two c) -> two a c", two=2) == Rearrange("a (two c) -> two a c", two=2)
    assert repr(Split(-1)) == "Split(dim=-1)" and repr(Duplicate()) == "Duplicate()"


def test_codec_reads_the_key_path():
    seen = []

    class Recording(Codec):
        def encode(self, leaf, path):
            seen.append(path)
            return leaf, leaf

        def decode(self, y1, y2, path):
            return (y1 + y2) / 2

    class Id(torch.nn.Module):
        def forward(self, x):
            return {k: torch.zeros_like(v) for k, v in x.items()}

    seq = revtree.ReversibleSequence([(Id(), Id())], codec=Recording())
    seq({1: torch.zeros(2), "b": torch.zeros(3)})
    assert sorted(map(str, seen)) == ["('b',)", "(1,)"]


@pytest.mark.parametrize(
    "codec, shape, match",
    [
        (Split(-1), (2, 3), "odd size 3"),
        (Split(3), (2, 4), "cannot split a tensor with 2 dimension"),
        (Rearrange("a (c two) -> two a c", two=3), (2, 6), "leading axis of length 3"),
        (Rearrange("a b c -> two a", two=2), (2, 4), "does not fit"),
    ],
)
def test_codec_errors(codec, shape, match):
    with pytest.raises(revtree.RevtreeError, match=match):
        codec.encode(torch.zeros(shape), ())


def test_rearrange_needs_an_arrow():
    with pytest.raises(revtree.RevtreeError, match="left -> two right"):
        Rearrange("a b c")
