"""revtree.adapters.pyg.GroupAddRev against torch_geometric's own with disable=True (plain)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_trees_close
from torch import nn

pytest.importorskip("torch_geometric")

import torch.nn.functional as F  # noqa: E402
from torch_geometric.nn import GraphConv, SAGEConv  # noqa: E402
from torch_geometric.nn import GroupAddRev as PygGroupAddRev  # noqa: E402

from revtree._saved import held_after_forward  # noqa: E402
from revtree.adapters import pyg as adapter  # noqa: E402

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

D = torch.float64


class GNNBlock(nn.Module):
    """The block of PyG's RevGNN example, with dropout inside (``F.dropout``)."""

    def __init__(self, channels: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.conv = SAGEConv(channels, channels)
        self.dropout = dropout

    def forward(self, x, edge_index, dropout_mask=None):
        x = self.norm(x).relu()
        if self.training and dropout_mask is not None:
            x = x * dropout_mask
        x = F.dropout(x, self.dropout, self.training)
        return self.conv(x, edge_index)


def _graph(nodes: int = 12, edges: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, nodes, (2, edges), generator=g)
    return edge_index


def _pair(groups: int, depth: int, make=lambda c: GNNBlock(c)):
    """The package's layers (disable=True: plain autograd) and ours, with the same weights."""
    torch.manual_seed(0)
    ref = nn.ModuleList(
        PygGroupAddRev(make(16 // groups), num_groups=groups, disable=True) for _ in range(depth)
    ).to(D)
    ours = nn.ModuleList(
        adapter.GroupAddRev(nn.ModuleList(copy.deepcopy(list(layer.convs)))) for layer in ref
    )
    return ref, ours


def _run(layers, x, edge_index, *args, skip=False, seed=1):
    torch.manual_seed(seed)
    h = x
    for layer in layers:
        out = layer(h, edge_index, *args)
        h = out + h if skip else out
    return (h * torch.linspace(-1, 1, h.shape[-1], dtype=D)).sum()


@pytest.mark.parametrize("skip", [False, True], ids=["chained", "skip connection"])
@pytest.mark.parametrize("groups", [2, 4, 8])
def test_gradients_equal_the_packages_plain_path(groups, skip):
    ref, ours = _pair(groups, depth=4)
    x = torch.randn(12, 16, dtype=D, requires_grad=True)
    edge_index = _graph()
    mask = torch.rand(12, 16, dtype=D).gt(0.2).to(D)  # chunked per group, as the package does
    for step in range(2):
        expected = torch.autograd.grad(
            _run(ref, x, edge_index, mask, skip=skip, seed=step), [x, *ref.parameters()]
        )
        got = torch.autograd.grad(
            _run(ours, x, edge_index, mask, skip=skip, seed=step), [x, *ours.parameters()]
        )
        assert_trees_close(list(got), list(expected), tol=1e-9)
    assert all(p.grad is None for p in ours.parameters())  # autograd.grad writes no .grad


def test_edge_weights_are_shared_by_every_group():
    ref, ours = _pair(4, depth=3, make=lambda c: GraphConv(c, c))
    x = torch.randn(12, 16, dtype=D, requires_grad=True)
    edge_index = _graph()
    weight = torch.rand(40, dtype=D, requires_grad=True)
    expected = torch.autograd.grad(_run(ref, x, edge_index, weight), [x, weight, *ref.parameters()])
    ours.zero_grad()
    loss = _run(ours, x, edge_index, weight)
    loss.backward()
    got = [x.grad, weight.grad, *(p.grad for p in ours.parameters())]
    assert_trees_close(got, list(expected), tol=1e-9)


def test_inverse_and_the_plain_path():
    ref, ours = _pair(4, depth=1)
    layer = ours[0].eval()
    x = torch.randn(12, 16, dtype=D)
    edge_index = _graph()
    y = layer(x, edge_index)
    assert torch.allclose(layer.inverse(y, edge_index), x, atol=1e-12)
    assert torch.allclose(ref[0].eval()(x, edge_index), y, atol=1e-12)
    plain = adapter.GroupAddRev(nn.ModuleList(layer.convs), disable=True)
    assert torch.equal(plain(x, edge_index), y)


def test_state_dicts_load_both_ways():
    ref, ours = _pair(2, depth=2)
    assert list(ours.state_dict()) == list(ref.state_dict())
    twin = nn.ModuleList(adapter.GroupAddRev(GNNBlock(8), num_groups=2) for _ in range(2)).to(D)
    twin.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert repr(twin[0]).startswith("GroupAddRev(GNNBlock(") and "num_groups=2" in repr(twin[0])


def test_the_callers_input_is_never_freed():
    _, ours = _pair(2, depth=1)
    x = torch.randn(12, 16, dtype=D)
    out = ours[0](x, _graph())
    assert x.untyped_storage().size() == x.numel() * x.element_size()
    (out + x).sum().backward()  # a skip connection reads it after the call


def test_a_stack_of_separately_called_layers_holds_one_output():
    """Without dropout: a call that draws keeps its generator's state (5 kB on the CPU)."""
    edge_index = _graph()
    x = torch.randn(12, 16, dtype=D, requires_grad=True)
    held = {}
    for depth in (4, 32):
        _, layers = _pair(2, depth, make=lambda c: GNNBlock(c, dropout=0.0))
        _run(layers, x, edge_index)  # first calls
        held[depth], loss = held_after_forward(lambda layers=layers: _run(layers, x, edge_index))
        loss.backward()
    # the last output, the loss's weights and the loss: nothing per layer
    assert held[4] == held[32] == x.numel() * x.element_size() + 16 * 8 + 8


def test_patch_builds_ours():
    from torch_geometric.nn import GroupAddRev

    with adapter.patch():
        layer = GroupAddRev(GNNBlock(4), num_groups=2)
    assert isinstance(layer, adapter.GroupAddRev)
    assert type(GroupAddRev(GNNBlock(4), num_groups=2)) is PygGroupAddRev


def test_one_conv_needs_a_number_of_groups():
    from revtree import RevtreeError

    with pytest.raises(RevtreeError, match="needs num_groups"):
        adapter.GroupAddRev(GNNBlock(4))


def test_the_sequence_is_built_once_per_setting():
    layer = adapter.GroupAddRev(nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]))
    first = layer.sequence
    assert layer.sequence is first
    layer.disable = True
    assert layer.sequence is not first
