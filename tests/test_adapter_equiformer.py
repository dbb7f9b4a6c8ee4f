"""The equiformer adapter against the real equiformer-pytorch 0.5.4, in float64."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from degree_adapters import Coordinates, check_degree_codec_error, perturb, rotation
from helpers import PlainCoupling, graph_training_losses
from torch import nn

from revtree.adapters import equiformer as adapter

equiformer_pytorch = pytest.importorskip("equiformer_pytorch")
from equiformer_pytorch import Equiformer  # noqa: E402
from equiformer_pytorch.reversible import ReversibleSequence as PackageReversible  # noqa: E402

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

TOL = 1e-10

CONFIGS = {
    "mlp-attention": dict(l2_dist_attention=False),
    "l2-attention": dict(l2_dist_attention=True),
    "edge-tokens": dict(num_edge_tokens=4, edge_dim=3),
    "k-nearest": dict(num_neighbors=3),
}

MODEL = dict(
    num_tokens=10,
    dim=(6, 4),
    dim_head=(4, 4),
    heads=(2, 1),
    num_degrees=2,
    reversible=True,
    reduce_dim_out=True,
    attend_self=True,
)


def _models(config: dict, depth: int = 2) -> tuple[nn.Module, nn.Module]:
    """The package's reversible Equiformer, and one with the adapter, sharing weights."""
    kwargs = dict(MODEL, depth=depth)
    kwargs.update(config)
    torch.manual_seed(0)
    package = Equiformer(**kwargs).double()
    _perturb(package)
    with adapter.patch():
        ours = Equiformer(**kwargs).double()
    assert isinstance(package.layers, PackageReversible)
    assert isinstance(ours.layers, adapter.ReversibleSequence)
    ours.load_state_dict(package.state_dict(), strict=True)
    return package, ours


def _perturb(model: nn.Module) -> None:
    perturb(model, 0.3)


def _inputs(config: dict, n: int = 6):
    g = torch.Generator().manual_seed(1)
    feats = torch.randint(0, 10, (1, n), generator=g)
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, -1] = False
    edges = torch.randint(0, 4, (1, n, n), generator=g) if "num_edge_tokens" in config else None
    return feats, mask, edges


def _run(model, coords, config, n=6):
    feats, mask, edges = _inputs(config, n)
    out = model(feats, coords, mask, edges=edges)
    w0 = torch.linspace(-1, 1, out.type0.numel(), dtype=torch.float64).reshape(out.type0.shape)
    loss = (w0 * out.type0).sum() + out.type1.pow(2).sum()
    return out, loss


def _sources(model, coords_layer):
    return [*model.parameters(), *coords_layer.parameters()]


def test_parameter_names_match_the_package():
    package, ours = _models(CONFIGS["mlp-attention"])
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in package.named_parameters()]
    assert any(n.startswith("layers.blocks.1.f.net.") for n, _ in ours.named_parameters())
    assert any(n.startswith("layers.blocks.1.g.net.") for n, _ in ours.named_parameters())


@pytest.mark.parametrize("name", CONFIGS)
def test_outputs_and_gradients_equal_the_package_under_backward(name):
    config = CONFIGS[name]
    package, ours = _models(config)
    coords = Coordinates(6)
    results = []
    for model in (package, ours):
        out, loss = _run(model, coords(), config)
        sources = _sources(model, coords)
        for s in sources:
            s.grad = None
        loss.backward()
        results.append((out, [s.grad for s in sources]))
    (out_p, grads_p), (out_o, grads_o) = results
    torch.testing.assert_close(out_o.type0, out_p.type0, rtol=0, atol=TOL)
    torch.testing.assert_close(out_o.type1, out_p.type1, rtol=0, atol=TOL)
    names = [n for n, _ in package.named_parameters()]
    names += ["coords.base", "coords.lin.weight", "coords.lin.bias"]
    reached = 0
    for label, gp, go in zip(names, grads_p, grads_o):
        assert (gp is None) == (go is None), label
        if gp is not None:
            torch.testing.assert_close(go, gp, rtol=0, atol=TOL, msg=label)
            reached += int(gp.abs().sum() > 0)
    assert coords.base.grad is not None and coords.base.grad.abs().sum() > 0
    if "num_edge_tokens" in config:
        assert ours.edge_emb.weight.grad.abs().sum() > 0
    assert reached > 0.9 * len(names), f"only {reached} of {len(names)} gradients are nonzero"


def _reference_model(package: nn.Module, config: dict, depth: int = 2) -> nn.Module:
    """An Equiformer with the ``PlainCoupling`` trunk and the package model's weights."""
    import equiformer_pytorch.equiformer_pytorch as module

    with mock.patch.object(module, "ReversibleSequence", PlainCoupling):
        reference = Equiformer(**MODEL, depth=depth, **config).double()
    assert isinstance(reference.layers, PlainCoupling)
    reference.load_state_dict(package.state_dict(), strict=True)
    return reference


def _autograd_grad(model, coords_layer, config):
    """Gradients by ``torch.autograd.grad`` for the model's and the upstream layer's
    parameters and the coordinates tensor between them."""
    coords = coords_layer()
    out, loss = _run(model, coords, config)
    sources = [*_sources(model, coords_layer), coords]
    return out, torch.autograd.grad(loss, sources, allow_unused=True)


@pytest.mark.parametrize("name", CONFIGS)
def test_autograd_grad_equals_plain_autograd(name):
    """Under torch.autograd.grad the adapter gives plain autograd's gradients and writes no
    .grad; the package's own reversible sequence gives its blocks no gradient at all."""
    config = CONFIGS[name]
    package, ours = _models(config)
    reference = _reference_model(package, config)
    coords_layer = Coordinates(6)
    names = [n for n, _ in package.named_parameters()]
    names += ["coords.base", "coords.lin.weight", "coords.lin.bias", "coordinates"]

    reference_out, expected = _autograd_grad(reference, coords_layer, config)
    # the reference is right: the package's reversible sequence agrees under loss.backward()
    package_coords_layer = copy.deepcopy(coords_layer)
    coords = package_coords_layer()
    coords.retain_grad()
    _, loss = _run(package, coords, config)
    loss.backward()
    by_package = [s.grad for s in _sources(package, package_coords_layer)] + [coords.grad]
    for label, g, e in zip(names, by_package, expected, strict=True):
        assert (g is None) == (e is None), label
        if e is not None:
            torch.testing.assert_close(g, e, rtol=0, atol=TOL, msg=label)

    # revtree, reversible and with its own plain path, under autograd.grad
    plain = copy.deepcopy(ours)
    plain.layers.reversible = False
    for model in (ours, plain):
        sources = _sources(model, coords_layer)
        assert all(s.grad is None for s in sources)
        out, grads = _autograd_grad(model, coords_layer, config)
        assert all(s.grad is None for s in sources), "autograd.grad wrote .grad"
        torch.testing.assert_close(out.type0, reference_out.type0, rtol=0, atol=TOL)
        torch.testing.assert_close(out.type1, reference_out.type1, rtol=0, atol=TOL)
        for label, g, e in zip(names, grads, expected, strict=True):
            assert (g is None) == (e is None), label
            if e is not None:
                torch.testing.assert_close(g, e, rtol=0, atol=TOL, msg=label)
        if model is ours:
            got = dict(zip(names, grads))

    # the gradients reach upstream: coordinates, the layer making them, edge embeddings
    for label in ["coordinates", "coords.base", "coords.lin.weight", "coords.lin.bias"]:
        assert got[label] is not None and got[label].abs().sum() > 0, label
    if "num_edge_tokens" in config:
        assert got["edge_emb.weight"].abs().sum() > 0
    block = [g for n, g in got.items() if n.startswith("layers.blocks.")]
    assert sum(int(g is not None and g.abs().sum() > 0) for g in block) > 0.9 * len(block)

    # the package's own reversible sequence is wrong here: block parameters get no gradient
    _, grads = _autograd_grad(package, coords_layer, config)
    assert all(g is None for n, g in zip(names, grads) if n.startswith("layers.blocks."))


def _equivariance_errors(model, config) -> tuple[float, float]:
    """Type-0 invariance and type-1 equivariance errors under a rotation and a translation."""
    feats, mask, edges = _inputs(config)
    coords = torch.randn(1, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    rot, shift = rotation(7), torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    out = model(feats, coords, mask, edges=edges)
    moved = model(feats, coords @ rot + shift, mask, edges=edges)
    scale = out.type1.abs().max()
    type0 = ((moved.type0 - out.type0).abs().max() / out.type0.abs().max()).item()
    return type0, ((moved.type1 - out.type1 @ rot).abs().max() / scale).item()


@pytest.mark.parametrize("name", ["mlp-attention", "l2-attention", "edge-tokens"])
def test_equivariance(name):
    """Type 0 is invariant and type 1 rotates, as precisely as the package itself allows.

    equiformer-pytorch builds its basis in float32 (``Q_J.float()`` in ``basis.py``), so even
    in float64 some configurations are equivariant only to ~1e-8; the adapter must add nothing.
    """
    package, ours = _models(CONFIGS[name])
    ours_errors = _equivariance_errors(ours, CONFIGS[name])
    package_errors = _equivariance_errors(package, CONFIGS[name])
    for mine, theirs in zip(ours_errors, package_errors):
        assert mine <= theirs * 1.01 + 1e-13, (ours_errors, package_errors)
        assert mine < 1e-7


def _train(model: nn.Module) -> list[float]:
    return graph_training_losses(
        model, lambda m, feats, coords, mask: m(feats, coords, mask).type0, steps=30, lr=1e-3
    )


def test_training_loop_loss_goes_down():
    """The package's reversible path trained end to end with the adapter: the loss falls,
    step for step as with the package's own reversible sequence."""
    kwargs = dict(
        num_tokens=10, dim=8, dim_head=4, heads=2, num_degrees=2, depth=3, reversible=True
    )
    torch.manual_seed(0)
    package = Equiformer(**kwargs, reduce_dim_out=True).double()
    with adapter.patch():
        ours = Equiformer(**kwargs, reduce_dim_out=True).double()
    ours.load_state_dict(package.state_dict(), strict=True)
    theirs, mine = _train(package), _train(ours)
    assert mine == pytest.approx(theirs, rel=1e-8, abs=1e-12)
    assert mine[-1] < 0.1 * mine[0], mine


def test_sequential_sequence_matches_the_package():
    kwargs = dict(
        num_tokens=10,
        dim=(6, 4),
        dim_head=4,
        heads=2,
        num_degrees=2,
        depth=2,
        reversible=False,
        reduce_dim_out=True,
    )
    torch.manual_seed(0)
    package = Equiformer(**kwargs).double()
    with adapter.patch():
        ours = Equiformer(**kwargs).double()
    assert isinstance(ours.layers, adapter.SequentialSequence)
    ours.load_state_dict(package.state_dict(), strict=True)
    feats, mask, _ = _inputs({})
    coords = torch.randn(1, 6, 3, dtype=torch.float64)
    a, b = package(feats, coords, mask), ours(feats, coords, mask)
    torch.testing.assert_close(b.type1, a.type1, rtol=0, atol=TOL)


def test_patch_restores_the_package():
    import equiformer_pytorch.equiformer_pytorch as module

    before = module.ReversibleSequence
    with adapter.patch():
        assert module.ReversibleSequence is adapter.ReversibleSequence
    assert module.ReversibleSequence is before


@pytest.mark.parametrize(
    "x, match",
    [
        (
            {0: torch.zeros(1, 2, 4, 1), 1: torch.zeros(1, 2, 4, 5)},
            r"x\[1\] \(shape \(1, 2, 4, 5\).*degree 1 shaped \(\.\.\., channels, 3\)",
        ),
        ({"type0": torch.zeros(1, 2, 4, 1)}, r"key 'type0' is not a non-negative int"),
    ],
)
def test_degree_codec_errors(x, match):
    check_degree_codec_error(adapter, x, match)
