# Copied from lucidrains/se3-transformer-pytorch, tests/test_equivariance.py at commit
# e1669ee69345c271b7aa0a3aeeda452d32e26736 (its Python sources are those of the
# se3-transformer-pytorch 0.9.0 wheel, byte for byte):
# https://github.com/lucidrains/se3-transformer-pytorch
#
# MIT License, Copyright (c) 2021 Phil Wang. The license's permission notice:
#   Permission is hereby granted, free of charge, to any person obtaining a copy of this
#   software and associated documentation files (the "Software"), to deal in the Software
#   without restriction, including without limitation the rights to use, copy, modify, merge,
#   publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons
#   to whom the Software is furnished to do so, subject to the following conditions:
#   The above copyright notice and this permission notice shall be included in all copies or
#   substantial portions of the Software.
#   THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
#   INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR
#   PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE
#   FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
#   OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
#   DEALINGS IN THE SOFTWARE.
#
# The whole file, its tests unchanged, except that every SE3Transformer here is built under
# revtree.adapters.se3_transformer.patch() (the autouse fixture below), so both of the
# package's trunks (reversible=True and the sequential one) are revtree's, and each test
# starts from a fixed seed. Added at the end: test_trunks_are_revtrees. Layout only: the
# imports grouped, the code put through ruff format, two unused results marked noqa. The
# package's basis cache stays in memory (tests/conftest.py sets CLEAR_CACHE).

import pytest
import torch

pytest.importorskip("se3_transformer_pytorch")

import se3_transformer_pytorch.se3_transformer_pytorch as package  # noqa: E402
from se3_transformer_pytorch.irr_repr import rot  # noqa: E402
from se3_transformer_pytorch.se3_transformer_pytorch import SE3Transformer  # noqa: E402
from se3_transformer_pytorch.utils import fourier_encode, torch_default_dtype  # noqa: E402

from revtree.adapters import se3_transformer as adapter  # noqa: E402


@pytest.fixture(autouse=True)
def _revtree_trunk():
    torch.manual_seed(0)
    with adapter.patch():
        yield


def test_transformer():
    model = SE3Transformer(dim=64, depth=1, num_degrees=2, num_neighbors=4, valid_radius=10)

    feats = torch.randn(1, 32, 64)
    coors = torch.randn(1, 32, 3)
    mask = torch.ones(1, 32).bool()

    out = model(feats, coors, mask, return_type=0)
    assert out.shape == (1, 32, 64), "output must be of the right shape"


def test_causal_se3_transformer():
    model = SE3Transformer(
        dim=64, depth=1, num_degrees=2, num_neighbors=4, valid_radius=10, causal=True
    )

    feats = torch.randn(1, 32, 64)
    coors = torch.randn(1, 32, 3)
    mask = torch.ones(1, 32).bool()

    out = model(feats, coors, mask, return_type=0)
    assert out.shape == (1, 32, 64), "output must be of the right shape"


def test_se3_transformer_with_global_nodes():
    model = SE3Transformer(
        dim=64, depth=1, num_degrees=2, num_neighbors=4, valid_radius=10, global_feats_dim=16
    )

    feats = torch.randn(1, 32, 64)
    coors = torch.randn(1, 32, 3)
    mask = torch.ones(1, 32).bool()

    global_feats = torch.randn(1, 2, 16)

    out = model(feats, coors, mask, return_type=0, global_feats=global_feats)
    assert out.shape == (1, 32, 64), "output must be of the right shape"


def test_one_headed_key_values_se3_transformer_with_global_nodes():
    model = SE3Transformer(
        dim=64,
        depth=1,
        num_degrees=2,
        num_neighbors=4,
        valid_radius=10,
        global_feats_dim=16,
        one_headed_key_values=True,
    )

    feats = torch.randn(1, 32, 64)
    coors = torch.randn(1, 32, 3)
    mask = torch.ones(1, 32).bool()

    global_feats = torch.randn(1, 2, 16)

    out = model(feats, coors, mask, return_type=0, global_feats=global_feats)
    assert out.shape == (1, 32, 64), "output must be of the right shape"


def test_transformer_with_edges():
    model = SE3Transformer(
        dim=64, depth=1, num_degrees=2, num_neighbors=4, edge_dim=4, num_edge_tokens=4
    )

    feats = torch.randn(1, 32, 64)
    edges = torch.randint(0, 4, (1, 32))
    coors = torch.randn(1, 32, 3)
    mask = torch.ones(1, 32).bool()

    out = model(feats, coors, mask, edges=edges, return_type=0)
    assert out.shape == (1, 32, 64), "output must be of the right shape"


def test_transformer_with_continuous_edges():
    model = SE3Transformer(
        dim=64, depth=1, attend_self=True, num_degrees=2, output_degrees=2, edge_dim=34
    )

    feats = torch.randn(1, 32, 64)
    coors = torch.randn(1, 32, 3)
    mask = torch.ones(1, 32).bool()

    pairwise_continuous_values = torch.randint(0, 4, (1, 32, 32, 2))

    edges = fourier_encode(pairwise_continuous_values, num_encodings=8, include_self=True)

    out = model(feats, coors, mask, edges=edges, return_type=1)  # noqa: F841
    assert True


def test_different_input_dimensions_for_types():
    model = SE3Transformer(
        dim_in=(4, 2),
        dim=4,
        depth=1,
        input_degrees=2,
        num_degrees=2,
        output_degrees=2,
        reduce_dim_out=True,
    )

    atom_feats = torch.randn(2, 32, 4, 1)
    coors_feats = torch.randn(2, 32, 2, 3)

    features = {"0": atom_feats, "1": coors_feats}
    coors = torch.randn(2, 32, 3)
    mask = torch.ones(2, 32).bool()

    refined_coors = coors + model(features, coors, mask, return_type=1)  # noqa: F841
    assert True


def test_equivariance():
    model = SE3Transformer(
        dim=64,
        depth=1,
        attend_self=True,
        num_neighbors=4,
        num_degrees=2,
        output_degrees=2,
        fourier_encode_dist=True,
    )

    feats = torch.randn(1, 32, 64)
    coors = torch.randn(1, 32, 3)
    mask = torch.ones(1, 32).bool()

    R = rot(15, 0, 45)
    out1 = model(feats, coors @ R, mask, return_type=1)
    out2 = model(feats, coors, mask, return_type=1) @ R

    diff = (out1 - out2).max()
    assert diff < 1e-4, "is not equivariant"


def test_equivariance_with_egnn_backbone():
    model = SE3Transformer(
        dim=64,
        depth=1,
        attend_self=True,
        num_neighbors=4,
        num_degrees=2,
        output_degrees=2,
        fourier_encode_dist=True,
        use_egnn=True,
    )

    feats = torch.randn(1, 32, 64)
    coors = torch.randn(1, 32, 3)
    mask = torch.ones(1, 32).bool()

    R = rot(15, 0, 45)
    out1 = model(feats, coors @ R, mask, return_type=1)
    out2 = model(feats, coors, mask, return_type=1) @ R

    diff = (out1 - out2).max()
    assert diff < 1e-4, "is not equivariant"


def test_rotary():
    model = SE3Transformer(
        dim=64,
        depth=1,
        attend_self=True,
        num_neighbors=4,
        num_degrees=2,
        output_degrees=2,
        fourier_encode_dist=True,
        rotary_position=True,
        rotary_rel_dist=True,
    )

    feats = torch.randn(1, 32, 64)
    coors = torch.randn(1, 32, 3)
    mask = torch.ones(1, 32).bool()

    R = rot(15, 0, 45)
    out1 = model(feats, coors @ R, mask, return_type=1)
    out2 = model(feats, coors, mask, return_type=1) @ R

    diff = (out1 - out2).max()
    assert diff < 1e-4, "is not equivariant"


def test_equivariance_linear_proj_keys():
    model = SE3Transformer(
        dim=64,
        depth=1,
        attend_self=True,
        num_neighbors=4,
        num_degrees=2,
        output_degrees=2,
        fourier_encode_dist=True,
        linear_proj_keys=True,
    )

    feats = torch.randn(1, 32, 64)
    coors = torch.randn(1, 32, 3)
    mask = torch.ones(1, 32).bool()

    R = rot(15, 0, 45)
    out1 = model(feats, coors @ R, mask, return_type=1)
    out2 = model(feats, coors, mask, return_type=1) @ R

    diff = (out1 - out2).max()
    assert diff < 1e-4, "is not equivariant"


@torch_default_dtype(torch.float64)
def test_equivariance_only_sparse_neighbors():
    model = SE3Transformer(
        dim=64,
        depth=1,
        attend_self=True,
        num_degrees=2,
        output_degrees=2,
        num_neighbors=0,
        attend_sparse_neighbors=True,
        num_adj_degrees=2,
        adj_dim=4,
    )

    feats = torch.randn(1, 32, 64)
    coors = torch.randn(1, 32, 3)
    mask = torch.ones(1, 32).bool()

    seq = torch.arange(32)
    adj_mat = (seq[:, None] >= (seq[None, :] - 1)) & (seq[:, None] <= (seq[None, :] + 1))

    R = rot(15, 0, 45)
    out1 = model(feats, coors @ R, mask, adj_mat=adj_mat, return_type=1)
    out2 = model(feats, coors, mask, adj_mat=adj_mat, return_type=1) @ R

    diff = (out1 - out2).max()
    assert diff < 1e-4, "is not equivariant"


def test_equivariance_with_reversible_network():
    model = SE3Transformer(
        dim=64,
        depth=1,
        attend_self=True,
        num_neighbors=4,
        num_degrees=2,
        output_degrees=2,
        reversible=True,
    )

    feats = torch.randn(1, 32, 64)
    coors = torch.randn(1, 32, 3)
    mask = torch.ones(1, 32).bool()

    R = rot(15, 0, 45)
    out1 = model(feats, coors @ R, mask, return_type=1)
    out2 = model(feats, coors, mask, return_type=1) @ R

    diff = (out1 - out2).max()
    assert diff < 1e-4, "is not equivariant"


def test_equivariance_with_type_one_input():
    model = SE3Transformer(
        dim=64,
        depth=1,
        attend_self=True,
        num_neighbors=4,
        num_degrees=2,
        input_degrees=2,
        output_degrees=2,
    )

    atom_features = torch.randn(1, 32, 64, 1)
    pred_coors = torch.randn(1, 32, 64, 3)

    coors = torch.randn(1, 32, 3)
    mask = torch.ones(1, 32).bool()

    R = rot(15, 0, 45)
    out1 = model({"0": atom_features, "1": pred_coors @ R}, coors @ R, mask, return_type=1)
    out2 = model({"0": atom_features, "1": pred_coors}, coors, mask, return_type=1) @ R

    diff = (out1 - out2).max()
    assert diff < 1e-4, "is not equivariant"


def test_trunks_are_revtrees():
    assert package.ReversibleSequence is adapter.ReversibleSequence
    assert package.SequentialSequence is adapter.SequentialSequence
    model = SE3Transformer(dim=8, depth=1, num_degrees=2, reversible=True)
    assert isinstance(model.net, adapter.ReversibleSequence)
    model = SE3Transformer(dim=8, depth=1, num_degrees=2)
    assert isinstance(model.net, adapter.SequentialSequence)
