"""revtree.adapters.freia.SequenceINN against FrEIA's own SequenceINN (plain autograd)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_trees_close
from torch import nn

pytest.importorskip("FrEIA")

import FrEIA.framework as Ff  # noqa: E402
import FrEIA.modules as Fm  # noqa: E402

from revtree._saved import held_after_forward  # noqa: E402
from revtree.adapters import freia as adapter  # noqa: E402

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

D = torch.float64


def subnet(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, c_out))


def build(cls, depth: int = 3, conditional: bool = True, dropout: bool = True):
    torch.manual_seed(0)
    np.random.seed(0)  # FrEIA draws its permutations from numpy's generator
    net = subnet if dropout else (lambda a, b: nn.Sequential(nn.Linear(a, 16), nn.Linear(16, b)))
    flow = cls(6)
    for i in range(depth):
        flow.append(Fm.AllInOneBlock, subnet_constructor=net, affine_clamping=2.0)
        flow.append(Fm.ActNorm)
        flow.append(Fm.GLOWCouplingBlock, subnet_constructor=net, clamp=2.0)
        flow.append(Fm.PermuteRandom, seed=i)
        if conditional:
            flow.append(Fm.RNVPCouplingBlock, subnet_constructor=net, cond=0, cond_shape=(3,))
        else:
            flow.append(Fm.RNVPCouplingBlock, subnet_constructor=net)
    return flow.to(D)


def trained(flow) -> list[torch.Tensor]:
    return [p for p in flow.parameters() if p.requires_grad]


def nll(z, log_jac_det):
    return (0.5 * z.square().sum(-1) - log_jac_det).mean()


@pytest.mark.parametrize("conditional", [False, True])
def test_z_log_det_and_gradients_equal_freias_own(conditional):
    ref, ours = (
        build(Ff.SequenceINN, conditional=conditional),
        build(adapter.SequenceINN, conditional=conditional),
    )
    c = torch.randn(16, 3, dtype=D, requires_grad=True)
    kwargs = {"c": [c]} if conditional else {}
    for step in range(3):  # the first batch initialises the ActNorms
        x = torch.randn(16, 6, dtype=D, requires_grad=True)
        out = {}
        for name, flow in (("ref", ref), ("ours", ours)):
            torch.manual_seed(step)
            z, log_jac_det = flow(x, **kwargs)
            sources = [x, *([c] if conditional else []), *trained(flow)]
            out[name] = [z, log_jac_det, *torch.autograd.grad(nll(z, log_jac_det), sources)]
        assert_trees_close(out["ours"], out["ref"], tol=1e-9)


def test_the_sampling_direction_and_the_flows_api():
    ref, ours = build(Ff.SequenceINN, dropout=False), build(adapter.SequenceINN, dropout=False)
    x, c = torch.randn(8, 6, dtype=D), torch.randn(8, 3, dtype=D)
    z, j = ours(x, c=[c])
    x_back, j_back = ours(z, c=[c], rev=True)
    assert torch.allclose(x_back, x, atol=1e-9) and torch.allclose(j_back, -j, atol=1e-9)
    assert len(ours) == len(ref) and type(ours[1]) is Fm.ActNorm
    assert [type(m) for m in ours] == [type(m) for m in ref]
    assert ours.shapes == ref.shapes and ours.conditions == ref.conditions
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    tuple_flow = adapter.SequenceINN(6, force_tuple_output=True)
    tuple_flow.append(Fm.AllInOneBlock, subnet_constructor=subnet)
    (z,), _ = tuple_flow(torch.randn(2, 6))
    assert tuple_flow.output_dims([(6,)]) == [(6,)]


def test_memory_kept_for_backward_is_flat_in_depth():
    x = torch.randn(32, 6, dtype=D, requires_grad=True)
    c = torch.randn(32, 3, dtype=D)
    held = {}
    for depth in (2, 8):
        flow = build(adapter.SequenceINN, depth=depth, dropout=False)
        flow(x, c=[c])  # the first batch initialises the ActNorms
        held[depth], (z, j) = held_after_forward(lambda flow=flow: flow(x, c=[c]))
        nll(z, j).backward()
    assert held[2] == held[8]
    plain = build(Ff.SequenceINN, depth=8, dropout=False)
    plain(x, c=[c])
    stored, _ = held_after_forward(lambda: plain(x, c=[c]))
    assert stored > 10 * held[8]


def test_patch_builds_ours():
    from FrEIA.framework import SequenceINN

    with adapter.patch():
        flow = SequenceINN(4)
        module_flow = Ff.SequenceINN(4)
    assert isinstance(flow, adapter.SequenceINN) and isinstance(module_flow, adapter.SequenceINN)
    assert type(SequenceINN(4)) is not adapter.SequenceINN


def test_the_sequence_is_built_once_and_again_when_a_block_is_appended():
    """What the engine learns about the blocks is kept from one step to the next."""
    flow = build(adapter.SequenceINN, depth=1)
    x, c = torch.randn(8, 6, dtype=D), torch.randn(8, 3, dtype=D)
    flow(x, c=[c])
    first = flow.sequence
    flow(x, c=[c])
    assert flow.sequence is first
    flow.append(Fm.ActNorm)
    assert flow.sequence is not first and len(flow.sequence.blocks) == len(first.blocks) + 1
