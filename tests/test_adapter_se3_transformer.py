"""The se3-transformer adapter against the real se3-transformer-pytorch 0.9.0, in float64.

The package caches its basis on disk under ``~/.cache.equivariant_attention`` unless
``CLEAR_CACHE`` is set when it is imported; ``tests/conftest.py`` sets it.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from degree_adapters import Coordinates, check_degree_codec_error, perturb, rotation
from helpers import PlainCoupling, graph_training_losses
from torch import nn

from revtree.adapters import se3_transformer as adapter

se3_transformer_pytorch = pytest.importorskip("se3_transformer_pytorch")
from se3_transformer_pytorch import SE3Transformer  # noqa: E402
from se3_transformer_pytorch.reversible import ReversibleSequence as PackageReversible  # noqa: E402

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

TOL = 1e-9  # relative to the expected tensor's largest entry, or to FLOOR if that is smaller
FLOOR = 1e-3  # the upstream layer's bias gets ~1e-15: zero by translation invariance, and noise
N = 6

CONFIGS = {
    "default": dict(),
    "k-nearest": dict(num_neighbors=3, valid_radius=2.0),
    "edge-tokens": dict(num_edge_tokens=4, edge_dim=3),
    "adjacency": dict(attend_sparse_neighbors=True, num_adj_degrees=2, adj_dim=2, num_neighbors=2),
    "rotary": dict(rotary_position=True, rotary_rel_dist=True),
    "one-headed-kv": dict(
        one_headed_key_values=True,
        use_null_kv=True,
        norm_gated_scale=True,
        fourier_encode_dist=True,
    ),
    "tied-kv": dict(tie_key_values=True, attend_self=False),
    "linear-keys": dict(linear_proj_keys=True),
}

# With rotary_rel_dist the coordinates reach the attention through a float32 sinusoid
# (``t.float()`` in ``rotary.py``). The package back-propagates through it once per block, plain
# autograd (and revtree) once for the sum of the blocks' gradients: float32 rounding apart,
# ~1e-7 relative in the coordinates' gradients. Everywhere else the package is compared at TOL.
PACKAGE_TOL = dict.fromkeys(CONFIGS, TOL) | {"rotary": 1e-6}

MODEL = dict(
    dim=6,  # the package's reversible trunk needs one width for every degree (see below)
    dim_in=(3, 2),
    input_degrees=2,
    num_degrees=2,
    output_degrees=2,
    dim_head=4,
    heads=2,
    reversible=True,
    reduce_dim_out=True,
    attend_self=True,
)


def _build(config: dict, depth: int = 2, **overrides) -> nn.Module:
    kwargs = {**MODEL, "depth": depth, **config, **overrides}
    return SE3Transformer(**kwargs).double()


def _models(config: dict, depth: int = 2) -> tuple[nn.Module, nn.Module]:
    """The package's reversible SE3Transformer, and one with the adapter, sharing weights."""
    torch.manual_seed(0)
    package = _build(config, depth)
    _perturb(package)
    with adapter.patch():
        ours = _build(config, depth)
    assert isinstance(package.net, PackageReversible)
    assert isinstance(ours.net, adapter.ReversibleSequence)
    ours.load_state_dict(package.state_dict(), strict=True)
    return package, ours


def _perturb(model: nn.Module) -> None:
    perturb(model, 0.05)  # gently: at 0.3 some configurations reach gradients of 1e30


def _inputs(config: dict, n: int = N) -> dict:
    """Features of degrees 0 and 1 (leaves that require grad), a mask, edges or adjacency."""
    g = torch.Generator().manual_seed(1)
    feats = {
        "0": torch.randn(1, n, 3, 1, generator=g, dtype=torch.float64, requires_grad=True),
        "1": torch.randn(1, n, 2, 3, generator=g, dtype=torch.float64, requires_grad=True),
    }
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, -1] = False
    inputs: dict = dict(feats=feats, mask=mask)
    if "num_edge_tokens" in config:
        inputs["edges"] = torch.randint(0, 4, (1, n, n), generator=g)
    if config.get("attend_sparse_neighbors"):
        seq = torch.arange(n)
        inputs["adj_mat"] = (seq[:, None] - seq[None, :]).abs() <= 1
    return inputs


def _loss(out: dict) -> torch.Tensor:
    w0 = torch.linspace(-1, 1, out["0"].numel(), dtype=torch.float64).reshape(out["0"].shape)
    return (w0 * out["0"]).sum() + out["1"].pow(2).sum()


def _run(model: nn.Module, coords: torch.Tensor, inputs: dict) -> tuple[dict, torch.Tensor]:
    inputs = dict(inputs)
    out = model(inputs.pop("feats"), coords, **inputs)
    return out, _loss(out)


def _sources(model: nn.Module, coords_layer: nn.Module, inputs: dict) -> list[torch.Tensor]:
    return [*model.parameters(), *coords_layer.parameters(), *inputs["feats"].values()]


def _names(model: nn.Module) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    return [*names, "coords.base", "coords.lin.weight", "coords.lin.bias", "feats.0", "feats.1"]


def _assert_close(got: torch.Tensor, expected: torch.Tensor, label: str, tol: float = TOL) -> None:
    scale = expected.abs().max().clamp(min=FLOOR)
    error = ((got - expected).abs().max() / scale).item()
    assert error <= tol, f"{label}: relative error {error:.2e}"


def _assert_all_close(names, got, expected, tol: float = TOL) -> None:
    for label, g, e in zip(names, got, expected, strict=True):
        assert (g is None) == (e is None), label
        if e is not None:
            _assert_close(g, e, label, tol)


def test_parameter_names_match_the_package():
    package, ours = _models(CONFIGS["default"])
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in package.named_parameters()]
    assert any(n.startswith("net.blocks.1.f.net.attn.") for n, _ in ours.named_parameters())
    assert any(n.startswith("net.blocks.1.g.net.feedforward.") for n, _ in ours.named_parameters())


@pytest.mark.parametrize("name", CONFIGS)
def test_outputs_and_gradients_equal_the_package_under_backward(name):
    config = CONFIGS[name]
    package, ours = _models(config)
    coords_layer = Coordinates()
    results = []
    for model in (package, ours):
        inputs = _inputs(config)
        coords = coords_layer()
        coords.retain_grad()
        out, loss = _run(model, coords, inputs)
        sources = _sources(model, coords_layer, inputs)
        for s in sources:
            s.grad = None
        loss.backward()
        results.append((out, [s.grad for s in sources] + [coords.grad]))
    (out_p, grads_p), (out_o, grads_o) = results
    for degree in ("0", "1"):
        _assert_close(out_o[degree], out_p[degree], f"output {degree}")
    names = [*_names(package), "coordinates"]
    _assert_all_close(names, grads_o, grads_p, PACKAGE_TOL[name])
    got = dict(zip(names, grads_o))
    for label in ["coordinates", "coords.base", "coords.lin.weight", "feats.0", "feats.1"]:
        assert got[label].abs().sum() > 0, label
    if "num_edge_tokens" in config:
        assert got["edge_emb.weight"].abs().sum() > 0
    if "adj_dim" in config:
        assert got["adj_emb.weight"].abs().sum() > 0
    reached = sum(int(g is not None and g.abs().sum() > 0) for g in grads_o)
    assert reached > 0.85 * len(names), f"only {reached} of {len(names)} gradients are nonzero"


def _reference_model(package: nn.Module, config: dict, depth: int = 2) -> nn.Module:
    """An SE3Transformer with the ``PlainCoupling`` trunk and the package model's weights."""
    import se3_transformer_pytorch.se3_transformer_pytorch as module

    with mock.patch.object(module, "ReversibleSequence", PlainCoupling):
        reference = _build(config, depth)
    assert isinstance(reference.net, PlainCoupling)
    reference.load_state_dict(package.state_dict(), strict=True)
    return reference


def _autograd_grad(model, coords_layer, config):
    """Gradients by ``torch.autograd.grad`` for the model's and the upstream layer's
    parameters, the input features and the coordinates tensor between them."""
    inputs = _inputs(config)
    coords = coords_layer()
    out, loss = _run(model, coords, inputs)
    sources = [*_sources(model, coords_layer, inputs), coords]
    return out, torch.autograd.grad(loss, sources, allow_unused=True)


@pytest.mark.parametrize("name", CONFIGS)
def test_autograd_grad_equals_plain_autograd(name):
    """Under torch.autograd.grad the adapter gives plain autograd's gradients and writes no
    .grad; the package's own reversible sequence gives its blocks no gradient at all."""
    config = CONFIGS[name]
    package, ours = _models(config)
    reference = _reference_model(package, config)
    coords_layer = Coordinates()
    names = [*_names(package), "coordinates"]

    reference_out, expected = _autograd_grad(reference, coords_layer, config)
    # the reference is right: the package's reversible sequence agrees under loss.backward()
    package_coords_layer = copy.deepcopy(coords_layer)
    inputs = _inputs(config)
    coords = package_coords_layer()
    coords.retain_grad()
    _, loss = _run(package, coords, inputs)
    loss.backward()
    by_package = [s.grad for s in _sources(package, package_coords_layer, inputs)] + [coords.grad]
    _assert_all_close(names, by_package, expected, PACKAGE_TOL[name])

    # revtree, reversible and with its own plain path, under autograd.grad
    plain = copy.deepcopy(ours)
    plain.net.reversible = False
    for model in (ours, plain):
        sources = _sources(model, coords_layer, {"feats": {}})
        assert all(s.grad is None for s in sources)
        out, grads = _autograd_grad(model, coords_layer, config)
        assert all(s.grad is None for s in sources), "autograd.grad wrote .grad"
        for degree in ("0", "1"):
            _assert_close(out[degree], reference_out[degree], f"output {degree}")
        _assert_all_close(names, grads, expected)

    # the package's own reversible sequence is wrong here: block parameters get no gradient
    # (backward writes it into their .grad instead), the coordinates miss the trunk's share
    package.zero_grad(set_to_none=True)
    _, grads = _autograd_grad(package, coords_layer, config)
    wrong = dict(zip(names, grads))
    blocks = [(n, p) for n, p in package.named_parameters() if n.startswith("net.blocks.")]
    assert all(wrong[n] is None for n, _ in blocks)
    assert all(p.grad is not None for _, p in blocks)
    right = dict(zip(names, expected))
    missing = (wrong["coordinates"] - right["coordinates"]).abs().max()
    assert missing > 1e-3 * right["coordinates"].abs().max()


def test_degrees_of_different_widths():
    """The package's reversible trunk concatenates every degree along the last axis, so it
    needs one width for all of them; the adapter keeps the degrees apart and takes any."""
    config = dict(dim=(6, 4))
    package, ours = _models(config)
    reference = _reference_model(package, config)
    coords_layer = Coordinates()
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        _run(package, coords_layer(), _inputs(config))
    reference_out, expected = _autograd_grad(reference, coords_layer, config)
    out, grads = _autograd_grad(ours, coords_layer, config)
    _assert_close(out["1"], reference_out["1"], "output 1")
    _assert_all_close([*_names(package), "coordinates"], grads, expected)


def _equivariance_errors(model, config) -> tuple[float, float]:
    """Type-0 invariance and type-1 equivariance errors under a rotation and a translation
    of the coordinates, with the type-1 input features rotated too."""
    inputs = _inputs(config)
    feats = inputs.pop("feats")
    coords = torch.randn(1, N, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    rot, shift = rotation(7), torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        out = model(feats, coords, **inputs)
        turned = {"0": feats["0"], "1": feats["1"] @ rot}
        moved = model(turned, coords @ rot + shift, **inputs)
    type0 = (moved["0"] - out["0"]).abs().max() / out["0"].abs().max()
    type1 = (moved["1"] - out["1"] @ rot).abs().max() / out["1"].abs().max()
    return type0.item(), type1.item()


@pytest.mark.parametrize("name", ["default", "edge-tokens", "adjacency", "rotary"])
def test_equivariance(name):
    """Type 0 is invariant and type 1 rotates, as precisely as the package itself allows.

    se3-transformer-pytorch stores its basis change in float32 (``Q_J.float()`` in
    ``basis.py``), so even in float64 the model is equivariant only to ~1e-9; the adapter
    must add nothing. (``use_null_kv`` is left out: its learned degree-1 null keys and values
    do not rotate, so the package itself is not equivariant once they leave zero.)
    """
    package, ours = _models(CONFIGS[name])
    ours_errors = _equivariance_errors(ours, CONFIGS[name])
    package_errors = _equivariance_errors(package, CONFIGS[name])
    for mine, theirs in zip(ours_errors, package_errors):
        assert mine <= theirs * 1.01 + 1e-13, (ours_errors, package_errors)
        assert mine < 1e-8


def _with_dropout(model: nn.Module, p: float = 0.3) -> nn.Module:
    """Dropout on every attention's and feedforward's output, inside ``f`` and ``g``.

    se3-transformer-pytorch 0.9.0 has no dropout option; forward hooks add one so that the
    recomputation must replay the forward's random masks.
    """

    def drop(module, args, out):
        return {k: F.dropout(v, p, module.training) for k, v in out.items()}

    for block in model.net.blocks:
        block.f.net.attn.register_forward_hook(drop)
        block.g.net.feedforward.register_forward_hook(drop)
    return model


def test_dropout_gradients_equal_the_package_and_plain_autograd():
    """With dropout, the recomputation draws the forward's masks: the gradients are the
    package's (which replays the CPU generator too) and plain autograd's."""
    config = CONFIGS["default"]
    package, ours = _models(config)
    reference = _with_dropout(_reference_model(package, config))
    package, ours = _with_dropout(package), _with_dropout(ours)
    coords_layer = Coordinates()
    names = _names(package)

    outs, by_backward = [], []
    for model in (package, ours):
        inputs = _inputs(config)
        torch.manual_seed(11)
        out, loss = _run(model, coords_layer(), inputs)
        sources = _sources(model, coords_layer, inputs)
        for s in sources:
            s.grad = None
        loss.backward()
        outs.append(out)
        by_backward.append([s.grad for s in sources])
    _assert_close(outs[1]["1"], outs[0]["1"], "output 1")
    _assert_all_close(names, by_backward[1], by_backward[0])

    torch.manual_seed(11)
    reference_out, expected = _autograd_grad(reference, coords_layer, config)
    torch.manual_seed(11)
    out, grads = _autograd_grad(ours, coords_layer, config)
    _assert_close(out["1"], reference_out["1"], "output 1")
    _assert_all_close([*names, "coordinates"], grads, expected)

    # the masks are really drawn: another seed gives another output
    torch.manual_seed(12)
    other, _ = _autograd_grad(ours, coords_layer, config)
    assert (other["1"] - out["1"]).abs().max() > 1e-3


def test_eval_mode_gradients_equal_plain_autograd():
    """In eval mode the adapter's gradients are plain autograd's; the package's reversible
    backward fails there (its blocks record no random state, then restore ``None``)."""
    config = CONFIGS["default"]
    package, ours = _models(config)
    reference = _reference_model(package, config)
    coords_layer = Coordinates()
    for model in (package, ours, reference):
        model.eval()
    _, expected = _autograd_grad(reference, coords_layer, config)
    _, grads = _autograd_grad(ours, coords_layer, config)
    _assert_all_close([*_names(package), "coordinates"], grads, expected)
    _, loss = _run(package, coords_layer(), _inputs(config))
    with pytest.raises(TypeError, match="ByteTensor"):
        loss.backward()


def _train(model: nn.Module) -> list[float]:
    return graph_training_losses(
        model,
        lambda m, feats, coords, mask: m(feats, coords, mask, return_type=0),
        steps=20,
        lr=3e-3,
    )


def test_training_loop_loss_goes_down():
    """The package's reversible path trained end to end with the adapter: the loss falls,
    step for step as with the package's own reversible sequence."""
    kwargs = dict(
        num_tokens=10, dim=8, dim_head=4, heads=2, num_degrees=2, depth=2, reversible=True
    )
    torch.manual_seed(0)
    package = SE3Transformer(**kwargs, reduce_dim_out=True).double()
    with adapter.patch():
        ours = SE3Transformer(**kwargs, reduce_dim_out=True).double()
    ours.load_state_dict(package.state_dict(), strict=True)
    theirs, mine = _train(package), _train(ours)
    assert mine == pytest.approx(theirs, rel=1e-8, abs=1e-12)
    assert mine[-1] < 0.5 * mine[0], mine


def test_sequential_sequence_matches_the_package():
    torch.manual_seed(0)
    package = _build({}, reversible=False)
    _perturb(package)
    with adapter.patch():
        ours = _build({}, reversible=False)
    assert isinstance(ours.net, adapter.SequentialSequence)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in package.named_parameters()]
    ours.load_state_dict(package.state_dict(), strict=True)
    coords = Coordinates()()
    a, _ = _run(package, coords, _inputs({}))
    b, _ = _run(ours, coords, _inputs({}))
    assert torch.equal(a["0"], b["0"]) and torch.equal(a["1"], b["1"])


def test_patch_restores_the_package():
    import se3_transformer_pytorch.se3_transformer_pytorch as module

    before = module.ReversibleSequence, module.SequentialSequence
    with adapter.patch():
        assert module.ReversibleSequence is adapter.ReversibleSequence
        assert module.SequentialSequence is adapter.SequentialSequence
    assert (module.ReversibleSequence, module.SequentialSequence) == before
    with pytest.raises(KeyError), adapter.patch():
        raise KeyError("inside")
    assert (module.ReversibleSequence, module.SequentialSequence) == before


@pytest.mark.parametrize(
    "x, match",
    [
        (
            {"0": torch.zeros(1, 2, 4, 1), "1": torch.zeros(1, 2, 4, 5)},
            r"x\['1'\] \(shape \(1, 2, 4, 5\).*degree 1 shaped \(\.\.\., channels, 3\)",
        ),
        ({"type0": torch.zeros(1, 2, 4, 1)}, r"key 'type0' is not a degree.*\{'0': \.\.\."),
        ({0: torch.zeros(1, 2, 4, 1)}, r"key 0 is not a degree.*as a string"),
    ],
)
def test_degree_codec_errors(x, match):
    check_degree_codec_error(adapter, x, match)
