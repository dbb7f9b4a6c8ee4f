"""revtree.adapters.momentumnet against the real momentumnet package (0.10).

The reference is the package's ``use_backprop=True`` network: its forward loop under plain
autograd, code that shares nothing with revtree.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

momentumnet = pytest.importorskip("momentumnet")

from revtree import RevtreeError  # noqa: E402
from revtree.adapters import momentumnet as adapter  # noqa: E402
from revtree.testing import saved_bytes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from _resnet import resnet18  # noqa: E402

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

D = 6
TOL = 1e-9


class Shifted(nn.Module):
    """A step function that takes an extra argument, as momentumnet passes ``*args``."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, shift=None):
        h = self.lin(x) if shift is None else self.lin(x) + shift
        return self.drop(torch.tanh(h))


def pair(n, *, init_speed=False, is_residual=True, use_backprop=False, dropout=0.0, shared=False):
    """The package's reference network and the adapter's, with the same weights."""
    torch.manual_seed(n)
    fns = [Shifted(dropout)] * n if shared else [Shifted(dropout) for _ in range(n)]
    init = nn.Sequential(nn.Linear(D, D), nn.Tanh()) if init_speed else None
    ref = momentumnet.MomentumNet(
        fns, 0.9, init_speed=init_speed, init_function=init, is_residual=is_residual
    ).double()
    ours = adapter.MomentumNet(
        copy.deepcopy(fns) if not shared else [copy.deepcopy(fns[0])] * n,
        0.9,
        init_speed=init_speed,
        init_function=copy.deepcopy(init),
        use_backprop=use_backprop,
        is_residual=is_residual,
    ).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def run(model, x, shift, seed=0):
    """Output and every gradient (input, extra argument, parameters) of one step."""
    torch.manual_seed(seed)
    args = () if shift is None else (shift,)
    y = model(x, *args)
    (y * torch.linspace(-1, 1, D, dtype=y.dtype)).sum().backward()
    sources = [x] + ([] if shift is None else [shift]) + list(model.parameters())
    out = [y.detach()] + [s.grad.clone() for s in sources]
    for s in sources:
        s.grad = None
    return out


def worst(a, b):
    """Largest difference, relative to the largest value compared (a gradient that is zero
    in exact arithmetic, such as a bias before BatchNorm, is rounding noise in both)."""
    scale = max(u.abs().max() for u in a)
    return max(((u - v).abs().max() / scale).item() for u, v in zip(a, b))


def inputs(with_shift):
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(D, dtype=torch.float64, requires_grad=True) if with_shift else None
    return x, shift


def test_state_dicts_load_both_ways():
    ref, ours = pair(5, init_speed=True)
    assert list(ref.state_dict()) == list(ours.state_dict())
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]


@pytest.mark.parametrize("use_backprop", [False, True], ids=["reversible", "backprop"])
@pytest.mark.parametrize("n", [1, 4, 5])
@pytest.mark.parametrize("init_speed", [False, True], ids=["rest", "init_speed"])
@pytest.mark.parametrize("is_residual", [True, False], ids=["residual", "full"])
@pytest.mark.parametrize("with_shift", [False, True], ids=["x", "x+arg"])
def test_outputs_and_gradients_equal_the_package(
    use_backprop, n, init_speed, is_residual, with_shift
):
    ref, ours = pair(n, init_speed=init_speed, is_residual=is_residual, use_backprop=use_backprop)
    x, shift = inputs(with_shift)
    assert worst(run(ref, x, shift), run(ours, x, shift)) < TOL


def test_shared_function():
    """``MomentumNet([f] * n)``, as the package's own example writes it: weights shared."""
    ref, ours = pair(4, shared=True)
    x, shift = inputs(True)
    assert worst(run(ref, x, shift), run(ours, x, shift)) < TOL


def test_dropout_is_replayed():
    ref, ours = pair(5, dropout=0.3)
    ref.train(), ours.train()
    x, shift = inputs(True)
    a, b = run(ref, x, shift, seed=7), run(ours, x, shift, seed=7)
    assert worst(a, b) < TOL
    ours.eval()
    assert worst(a, run(ours, x, shift)) > 0.1  # the masks mattered


def test_autograd_grad_equals_plain_autograd_and_writes_no_grad():
    ref, ours = pair(5, init_speed=True)
    x, shift = inputs(True)
    grads = []
    for model in (ref, ours):
        params = list(model.parameters())
        y = model(x, shift)
        grads.append(torch.autograd.grad(y.square().sum(), [x, shift, *params]))
        assert all(p.grad is None for p in params)
    assert x.grad is None and shift.grad is None
    assert worst(*grads) < TOL


def test_buffers_update_once_per_step():
    torch.manual_seed(0)
    fns = [nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D), nn.Tanh()) for _ in range(3)]
    ref = momentumnet.MomentumNet(copy.deepcopy(fns), 0.9).double()
    ours = adapter.MomentumNet(fns, 0.9, use_backprop=False).double()
    ours.load_state_dict(ref.state_dict())
    x, _ = inputs(False)
    assert worst(run(ref, x, None), run(ours, x, None)) < TOL
    for (name, a), (_, b) in zip(ref.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name  # running statistics, num_batches_tracked == 1


def test_memory_flat_in_depth():
    held = {}
    for n in (4, 16):
        ref, ours = pair(n)
        x = torch.randn(64, D, dtype=torch.float64, requires_grad=True)
        held[n] = saved_bytes(ref, x), saved_bytes(ours, x)
    assert held[16][1] == held[4][1]  # the two output streams, whatever the depth
    assert held[16][0] > 3 * held[4][0] > 3 * held[4][1]


def test_resnet18_conversion_matches_the_package():
    torch.manual_seed(0)
    model = resnet18(num_classes=10).double()
    ref = momentumnet.transform_to_momentumnet(model, gamma=0.9, use_backprop=True)
    ours = adapter.transform_to_momentumnet(model, gamma=0.9)
    assert list(ref.state_dict()) == list(ours.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert isinstance(ours.layer2[1][0], adapter.MomentumNet)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    outs = []
    for m in (ref, ours):
        m.train()
        torch.manual_seed(1)
        y = m(x)
        y.square().sum().backward()
        outs.append([y.detach(), x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
        x.grad = None
    assert worst(*outs) < TOL
    for (name, a), (_, b) in zip(ref.state_dict().items(), ours.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-12, atol=0), name
    saved = {n: saved_bytes(m, x) for n, m in (("package", ref), ("revtree", ours))}
    assert saved["revtree"] < saved["package"]


@pytest.mark.parametrize("keep_first_layer", [True, False])
def test_conversion_of_any_named_stage(keep_first_layer):
    torch.manual_seed(0)
    stage = nn.Sequential(*(nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(3)))
    model = nn.Sequential(nn.Linear(D, D), nn.Sequential(nn.Identity(), stage)).double()
    kwargs = dict(sub_layers=["1.1"], keep_first_layer=keep_first_layer, is_residual=True)
    ref = momentumnet.transform_to_momentumnet(model, use_backprop=True, **kwargs)
    ours = adapter.transform_to_momentumnet(model, **kwargs)
    assert list(ref.state_dict()) == list(ours.state_dict())
    x, _ = inputs(False)
    assert worst(run(ref, x, None), run(ours, x, None)) < TOL


def test_patch_swaps_and_restores():
    original = momentumnet.MomentumNet
    with adapter.patch():
        net = momentumnet.MomentumNet([Shifted()], 0.9)
        converted = momentumnet.transform_to_momentumnet(resnet18(num_classes=10))
    assert isinstance(net, adapter.MomentumNet)
    assert isinstance(converted.layer1[1][0], adapter.MomentumNet)
    assert momentumnet.MomentumNet is original
    assert momentumnet.resnet_to_momentumnet.MomentumNet is original


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: adapter.MomentumNet([Shifted()], 0.0),
            r"gamma=0\.0\): gamma must lie in \(0, 1\]",
        ),
        (lambda: adapter.MomentumNet([Shifted()], 1.5), r"gamma must lie in \(0, 1\]"),
        (
            lambda: adapter.MomentumNet([Shifted()], torch.tensor(0.9, requires_grad=True)),
            "would get no gradient",
        ),
        (lambda: adapter.MomentumNet([Shifted()], 0.9, init_speed=True), "needs init_function"),
        (
            lambda: adapter.transform_to_momentumnet(resnet18(), ["layer5"]),
            "no submodule 'layer5'",
        ),
    ],
)
def test_errors(make, match):
    with pytest.raises(RevtreeError, match=match):
        make()


@pytest.mark.parametrize("use_backprop", [False, True])
def test_what_is_changed_after_construction_is_what_runs(use_backprop):
    """A function replaced (as convert_sync_batchnorm or a DataParallel replica does) or a
    new gamma takes effect at the next call, as in the package, which reads them per call."""
    ref, ours = pair(4, use_backprop=use_backprop)
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    ours(x)  # built from the first functions
    torch.manual_seed(9)
    new = Shifted().double()
    for model in (ref, ours):
        model.network.add_module("1", copy.deepcopy(new))
        model.network.gamma = 0.7
    assert worst(run(ref, x, None), run(ours, x, None)) < TOL
    assert ours.network.functions[1].lin.weight.grad is None  # run() let the gradients go
    ours(x).sum().backward()
    assert ours.network.functions[1].lin.weight.grad is not None


def test_gamma_as_numpy_or_tensor_number_as_the_package_takes_it():
    np = pytest.importorskip("numpy")
    for gamma in (np.float32(0.8), torch.tensor(0.8, dtype=torch.float64)):
        torch.manual_seed(0)
        fns = [Shifted() for _ in range(3)]
        ref = momentumnet.MomentumNet(fns, gamma).double()
        ours = adapter.MomentumNet(copy.deepcopy(fns), gamma, use_backprop=False).double()
        x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
        assert worst(run(ref, x, None), run(ours, x, None)) < TOL


def test_an_initial_velocity_that_broadcasts():
    class Learned(nn.Module):  # a learned initial velocity, one per feature
        def __init__(self):
            super().__init__()
            self.v = nn.Parameter(torch.randn(D))

        def forward(self, x):
            return self.v

    torch.manual_seed(1)
    fns = [Shifted() for _ in range(3)]
    init = Learned()
    ref = momentumnet.MomentumNet(fns, 0.9, init_speed=True, init_function=init).double()
    ours = adapter.MomentumNet(
        copy.deepcopy(fns), 0.9, True, copy.deepcopy(init), use_backprop=False
    ).double()
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    assert worst(run(ref, x, None), run(ours, x, None)) < TOL


def test_torch_save_of_the_whole_model(tmp_path):
    ref, ours = pair(3)
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    ours(x).sum().backward()  # a step first, as a saved model has had
    ours.zero_grad(set_to_none=False)
    x.grad = None
    torch.save(ours, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert worst(run(ours, x, None), run(loaded, x, None)) == 0
