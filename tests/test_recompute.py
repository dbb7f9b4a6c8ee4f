"""The recompute replays what the forward used: each case against plain autograd, by hand.

Every reference here is the plain coupling ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)`` written
out with ordinary autograd on a deep copy of the blocks, in float64 unless autocast needs
float32. Each case once gave a wrong gradient or a crash.
"""

from __future__ import annotations

import copy
import warnings

import optree
import pytest
import torch
from helpers import assert_trees_close, grads, plain
from helpers import t as x_
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import revtree
from revtree._saved import held_after_forward
from revtree.codecs import Duplicate
from revtree.couplings import Coupling, Momentum

D = torch.float64


def params(blocks):
    return [p for f, g in blocks for p in (*f.parameters(), *g.parameters())]


def buffers(blocks):
    return [b for f, g in blocks for b in (*f.buffers(), *g.buffers())]


def mlp(width=3, dtype=D):
    return nn.Sequential(nn.Linear(width, width, dtype=dtype), nn.Tanh())


MODES = ["backward", "grad"]


# ------------------------------------------------------------------- parameter hooks


@pytest.mark.parametrize("mode", MODES)
def test_a_parameter_hook_fires_once_on_the_total(mode):
    torch.manual_seed(0)
    blocks = [(mlp(), mlp()) for _ in range(3)]
    ref = copy.deepcopy(blocks)
    shared = mlp()  # one module in two blocks: its hook sees the sum of both
    blocks[0] = (blocks[0][0], shared)
    blocks[2] = (shared, blocks[2][1])
    ref_shared = copy.deepcopy(shared)
    ref[0] = (ref[0][0], ref_shared)
    ref[2] = (ref_shared, ref[2][1])
    calls = {"revtree": 0, "plain": 0}

    def hook(who):
        def scale(grad):
            calls[who] += 1
            return grad * 2  # gradient scaling: applied twice would be 4x

        return scale

    for who, bs in (("revtree", blocks), ("plain", ref)):
        bs[0][0][0].weight.register_hook(hook(who))
        bs[0][1][0].weight.register_hook(hook(who))  # the shared module's weight
    x = x_(4, 6)
    seq = revtree.ReversibleSequence(blocks)
    got = grads(seq(x).square().sum(), [x, *params(blocks)], mode)
    expected = grads(plain(ref, x).square().sum(), [x, *params(ref)], mode)
    assert calls["revtree"] == calls["plain"] == 2
    assert_trees_close(got, expected)


# -------------------------------------------------------------- buffers read and updated


class Counter(nn.Module):
    """Reads the count it updates: in place (``+=``) or by assignment."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=D)
        self.in_place = in_place
        self.register_buffer("count", torch.zeros((), dtype=D))

    def forward(self, x):
        if self.in_place:
            self.count += 1
        else:
            self.count = self.count + 1
        return torch.tanh(self.lin(x)) * self.count


def _spectral_old():
    return nn.utils.spectral_norm(nn.Linear(3, 3, dtype=D))


def _spectral_new():
    return nn.utils.parametrizations.spectral_norm(nn.Linear(3, 3, dtype=D))


def _batch_norm():
    return nn.Sequential(nn.Linear(3, 3, dtype=D), nn.BatchNorm1d(3, dtype=D), nn.Tanh())


BUFFERED = {
    "spectral_norm": _spectral_old,
    "parametrizations.spectral_norm": _spectral_new,
    "counter in place": lambda: Counter(in_place=True),
    "counter by assignment": lambda: Counter(in_place=False),
    "batch norm": _batch_norm,
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", BUFFERED)
def test_buffers_read_and_updated_recompute_what_the_forward_read(name, mode):
    torch.manual_seed(1)
    blocks = [(BUFFERED[name](), BUFFERED[name]()) for _ in range(3)]
    ref = copy.deepcopy(blocks)
    seq = revtree.ReversibleSequence(blocks)
    for step in range(3):  # the first call teaches the engine which modules update buffers
        x = x_(4, 6, seed=step)
        got = grads(seq(x).square().sum(), [x, *params(blocks)], mode)
        expected = grads(plain(ref, x).square().sum(), [x, *params(ref)], mode)
        assert_trees_close(got, expected, what=f"step {step}")
        # updated once per step, exactly as plain autograd updates them
        assert_trees_close(buffers(blocks), buffers(ref), tol=0, what=f"buffers, step {step}")


def test_a_buffer_first_changed_in_place_on_a_later_call_is_reported():
    class Late(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3, dtype=D)
            self.register_buffer("scale", torch.ones((), dtype=D))
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 3 and not revtree.is_recomputing():
                self.scale.mul_(2)  # first changed on the second step
            return self.lin(x) * self.scale

    late = Late()
    seq = revtree.ReversibleSequence([(late, mlp())])
    seq(x_(4, 6)).sum().backward()  # calls 1 and 2 (forward, recompute)
    with pytest.raises(revtree.RevtreeError, match=r"block 0: f changed its buffer 'scale'"):
        seq(x_(4, 6))
    # from then on the buffer is copied before each call, and the gradients are exact
    ref = copy.deepcopy(late)
    x = x_(4, 6, seed=3)
    got = grads(seq(x).square().sum(), [x, *late.parameters()], "grad")
    expected = grads(
        plain([(ref, seq.blocks[0].g)], x).square().sum(), [x, *ref.parameters()], "grad"
    )
    assert_trees_close(got, expected)


# ------------------------------------------------------------------- functional_call


@pytest.mark.parametrize("mode", MODES)
def test_functional_call_with_computed_parameters(mode):
    """A hypernetwork, or a MAML inner step: the parameters are computed upstream."""
    torch.manual_seed(2)
    blocks = [(mlp(), mlp()) for _ in range(2)]
    seq = revtree.ReversibleSequence(blocks)
    names = [n for n, _ in seq.named_parameters()]
    scale = torch.tensor(1.5, dtype=D, requires_grad=True)
    x = x_(4, 6)

    def computed():
        return [p.detach() * scale + 0.1 for p in params(blocks)]

    swapped = dict(zip(names, computed()))
    got = grads(torch.func.functional_call(seq, swapped, (x,)).square().sum(), [x, scale], mode)
    # by hand: the same modules, each parameter replaced in its module for the call
    ref = copy.deepcopy(blocks)
    slots = [
        (m, n) for f, g in ref for part in (f, g) for m in part.modules() for n in m._parameters
    ]
    originals = [m._parameters[n] for m, n in slots]
    for (m, n), t in zip(slots, computed()):
        m._parameters[n] = t
    try:
        expected = grads(plain(ref, x).square().sum(), [x, scale], mode)
    finally:
        for (m, n), t in zip(slots, originals):
            m._parameters[n] = t
    assert got[1] is not None and got[1].abs() > 0
    assert_trees_close(got, expected)
    assert all(p.grad is None for p in seq.parameters())  # the module's own are not used


# --------------------------------------------------------------------- autocast islands


class Island(nn.Module):
    """Under bfloat16 autocast, a float32 island: ``b`` runs with autocast disabled."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        with torch.autocast("cpu", enabled=False):
            return torch.tanh(self.b(h.float()))


@pytest.mark.parametrize("mode", MODES)
def test_a_float32_island_under_autocast_back_propagates_in_float32(mode):
    torch.manual_seed(0)
    blocks = [(Island(), Island()) for _ in range(3)]
    ref = copy.deepcopy(blocks)
    x = x_(16, 16, dtype=torch.float32)
    seq = revtree.ReversibleSequence(blocks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = seq(x), plain(ref, x)
    # backward outside autocast, as training loops call it
    got = grads(y.square().sum(), [x, *params(blocks)], mode)
    expected = grads(y_ref.square().sum(), [x, *params(ref)], mode)
    # the island's weights: 3e-3 off when its backward ran in bfloat16
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()


# ------------------------------------------------------------------------ unused leaves


class PerLeaf(nn.Module):
    """One linear map per leaf, and a parameter that nothing uses."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2, dtype=D), nn.Linear(2, 2, dtype=D)
        self.unused = nn.Parameter(torch.ones(2, dtype=D))

    def forward(self, t):
        return {"a": torch.tanh(self.a(t["a"])), "b": torch.tanh(self.b(t["b"]))}


def plain_dict(blocks, x):
    x1 = {k: v[..., :2] for k, v in x.items()}
    x2 = {k: v[..., 2:] for k, v in x.items()}
    for f, g in blocks:
        fx = f(x2)
        x1 = {k: x1[k] + fx[k] for k in x1}
        gy = g(x1)
        x2 = {k: x2[k] + gy[k] for k in x2}
    return {k: torch.cat((x1[k], x2[k]), -1) for k in x}


@pytest.mark.parametrize("mode", MODES)
def test_what_does_not_reach_the_loss_gets_none(mode):
    torch.manual_seed(3)
    blocks = [(PerLeaf(), PerLeaf()) for _ in range(2)]
    ref = copy.deepcopy(blocks)
    x = {"a": x_(3, 4), "b": x_(3, 4, seed=1)}
    seq = revtree.ReversibleSequence(blocks)
    got = grads(seq(x)["a"].sum(), [*x.values(), *params(blocks)], mode)
    expected = grads(plain_dict(ref, x)["a"].sum(), [*x.values(), *params(ref)], mode)
    assert [g is None for g in got] == [g is None for g in expected]
    assert sum(g is None for g in got) > len(got) // 2  # x['b'], every b and unused
    assert_trees_close(got, expected)


def test_autograd_grad_of_an_unused_input_raises_as_plain_autograd_does():
    blocks = [(PerLeaf(), PerLeaf())]
    x = {"a": x_(3, 4), "b": x_(3, 4, seed=1)}
    seq = revtree.ReversibleSequence(blocks)
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(plain_dict(blocks, x)["a"].sum(), [x["b"]])
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(seq(x)["a"].sum(), [x["b"]])


def test_adamw_leaves_a_parameter_that_does_not_reach_the_loss_alone():
    blocks = [(PerLeaf(), PerLeaf())]
    seq = revtree.ReversibleSequence(blocks)
    b = blocks[0][0].b.weight  # reaches only y['b'], which the loss leaves out
    before = b.detach().clone()
    opt = torch.optim.AdamW(seq.parameters(), lr=0.1, weight_decay=0.5)
    seq({"a": x_(3, 4), "b": x_(3, 4, seed=1)})["a"].sum().backward()
    opt.step()
    assert b.grad is None and torch.equal(b.detach(), before)


# ------------------------------------------------------------------------ lazy modules


@pytest.mark.parametrize("mode", MODES)
def test_lazy_modules_train_from_the_first_step(mode):
    def lazy():
        return nn.Sequential(nn.LazyLinear(3, dtype=D), nn.Tanh())

    torch.manual_seed(4)
    blocks = [(lazy(), lazy()) for _ in range(2)]
    ref = copy.deepcopy(blocks)  # materialised by the same draws, in the same order
    x = x_(4, 6)
    seq = revtree.ReversibleSequence(blocks)
    torch.manual_seed(5)
    y = seq(x)
    torch.manual_seed(5)
    y_ref = plain(ref, x)
    got = grads(y.square().sum(), [x, *params(blocks)], mode)
    expected = grads(y_ref.square().sum(), [x, *params(ref)], mode)
    assert_trees_close(got, expected, what="first step")
    x = x_(4, 6, seed=1)  # and reversibly from then on
    got = grads(seq(x).square().sum(), [x, *params(blocks)], mode)
    expected = grads(plain(ref, x).square().sum(), [x, *params(ref)], mode)
    assert_trees_close(got, expected, what="second step")


# --------------------------------------------------------------- profilers and counters


def test_flop_counter_around_a_training_step():
    blocks = [(mlp(), mlp()) for _ in range(2)]
    ref = copy.deepcopy(blocks)
    x = x_(4, 6)
    seq = revtree.ReversibleSequence(blocks)
    with FlopCounterMode(display=False) as counted:
        got = grads(seq(x).square().sum(), [x, *params(blocks)], "backward")
    with FlopCounterMode(display=False) as counted_plain:
        expected = grads(plain(ref, x).square().sum(), [x, *params(ref)], "backward")
    assert_trees_close(got, expected)
    # the recomputation counts one more forward: 4/3 of plain autograd's matmul work
    assert counted.get_total_flops() == counted_plain.get_total_flops() * 4 // 3


def test_profiler_around_a_training_step():
    blocks = [(mlp(), mlp()) for _ in range(2)]
    x = x_(4, 6)
    seq = revtree.ReversibleSequence(blocks)
    with torch.profiler.profile() as prof:
        seq(x).square().sum().backward()
    assert any("addmm" in e.name for e in prof.events())
    assert all(p.grad is not None for p in seq.parameters())


# ------------------------------------------------------------------------ what is an error


class InPlace(Coupling):
    """A user's coupling that updates its first stream in place."""

    def forward(self, f, g, x1, x2):
        optree.tree_map(lambda a, u: a.add_(u), x1, f(x2))
        return x1, optree.tree_map(torch.add, x2, g(x1))

    def inverse(self, f, g, y1, y2):
        x2 = optree.tree_map(torch.sub, y2, g(y1))
        return optree.tree_map(torch.sub, y1, f(x2)), x2


def test_a_coupling_updating_its_stream_in_place_names_the_block():
    seq = revtree.ReversibleSequence([(mlp(), mlp()), (mlp(), mlp())], coupling=InPlace())
    x = x_(4, 6)
    before = x.detach().clone()
    with pytest.raises(revtree.RevtreeError, match=r"block 0: InPlace\(\) modified its input"):
        seq(x)
    assert torch.equal(x, before) and x._version == 0


class Sneaky(nn.Module):
    """Returns another shape only when recomputed (one that still broadcasts)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=D)

    def forward(self, x):
        out = self.lin(x)
        return out[:1] if revtree.is_recomputing() else out


@pytest.mark.parametrize("coupling", [revtree.couplings.Additive(), Momentum()], ids=repr)
@pytest.mark.parametrize("which", ["f", "g"])
def test_a_function_returning_another_shape_in_the_recompute_names_the_block(which, coupling):
    pair = (Sneaky(), mlp()) if which == "f" else (mlp(), Sneaky())
    seq = revtree.ReversibleSequence([(mlp(), mlp()), pair], coupling=coupling)
    y = seq(x_(4, 6))
    match = rf"block 1: {which} returned shape \(1, 3\).* in the recomputation, where its forward"
    with pytest.raises(revtree.RevtreeError, match=match):
        y.sum().backward()


@pytest.mark.parametrize("needs_grad", [False, True])
def test_a_keyword_tensor_modified_in_place_is_left_as_it_was(needs_grad):
    class Scales(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3, dtype=D)

        def forward(self, x, c):
            c.mul_(2)
            return self.lin(x) * c.sum()

    seq = revtree.ReversibleSequence([(Scales(), mlp())])
    c = x_(3) * 1.0 if needs_grad else torch.ones(3, dtype=D)
    before = c.detach().clone()
    with pytest.raises(revtree.RevtreeError, match=r"block 0: f modified the keyword tensor"):
        seq(x_(4, 6), c=c)
    assert torch.equal(c, before) and c._version == 0


def test_a_tensor_computed_upstream_and_reached_by_closure_names_the_block():
    context = x_(3) * 2  # computed upstream, needs a gradient, passed by no argument
    seq = revtree.ReversibleSequence([(mlp(), mlp()), (lambda t: t * context, mlp())])
    with pytest.raises(
        revtree.RevtreeError, match=r"block 1: f depends on a tensor computed before it ran"
    ):
        seq(x_(4, 6))


def test_a_private_generator_is_not_replayed_and_the_drift_guard_says_so():
    class Private(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3, dtype=D)
            self.generator = torch.Generator().manual_seed(0)

        def forward(self, x):
            keep = torch.rand(x.shape, generator=self.generator, dtype=D) > 0.5
            return self.lin(x) * keep

    seq = revtree.ReversibleSequence([(Private(), mlp())], check_drift=1e-6)
    with pytest.warns(revtree.RevtreeWarning, match=r"block 0: its input x1 at x was rebuilt"):
        seq(x_(4, 6)).sum().backward()


def test_an_error_inside_f_carries_the_block_and_the_split_hint():
    seq = revtree.ReversibleSequence([(mlp(6), mlp(6))])  # built for the whole width
    with pytest.raises(RuntimeError, match="cannot be multiplied") as caught:
        seq(x_(4, 6))
    (note,) = caught.value.__notes__
    assert "block 0: f, called on half-stream leaves x (4, 3)" in note
    assert "f receives half of each Split leaf" in note
    assert not isinstance(caught.value, revtree.RevtreeError)


def test_an_error_inside_g_in_the_recompute_carries_the_block():
    class FailsAgain(nn.Module):
        def forward(self, x):
            if revtree.is_recomputing():
                raise ValueError("only now")
            return x * 2

    seq = revtree.ReversibleSequence([(mlp(), mlp()), (mlp(), FailsAgain())])
    y = seq(x_(4, 6))
    with pytest.raises(ValueError, match="only now") as caught:
        y.sum().backward()
    assert "block 1: g, called on half-stream leaves x (4, 3)" in caught.value.__notes__[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(memory_budget=None), "memory_budget=None"),
        (dict(memory_budget=-1), "memory_budget=-1"),
        (dict(route=["f"]), r"route=\['f'\]"),
        (dict(route="h"), "route='h'"),
        (dict(check_drift="x"), "check_drift='x'"),
        (dict(check_drift=-1.0), "check_drift=-1.0"),
        (dict(preserve_rng_state=None), "preserve_rng_state=None"),
        (dict(coupling="additive"), "coupling='additive'"),
    ],
)
def test_invalid_arguments_are_reported_at_construction(kwargs, match):
    with pytest.raises(revtree.RevtreeError, match=match):
        revtree.ReversibleSequence([(mlp(), mlp())], **kwargs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: revtree.couplings.Affine(bound=0), r"Affine\(bound=0\)"),
        (lambda: revtree.couplings.Affine(bound="big"), r"Affine\(bound='big'\)"),
        (lambda: Momentum(gamma=1.5), r"Momentum\(gamma=1.5\)"),
        (lambda: Momentum(gamma=0), r"Momentum\(gamma=0\)"),
    ],
)
def test_coupling_arguments_are_revtree_errors(make, match):
    with pytest.raises(revtree.RevtreeError, match=match):
        make()


# ------------------------------------------------------------------- devices by type


class _FakeModule:
    """A device module without ``default_generators`` (as MPS), recording its calls."""

    def __init__(self):
        self.calls = []
        self.state = torch.tensor([7], dtype=torch.uint8)

    def current_device(self):
        return 0

    def get_rng_state(self, device):
        self.calls.append(("get", str(device)))
        return self.state.clone()

    def set_rng_state(self, state, device):
        self.calls.append(("set", str(device)))
        self.state = state


def test_generators_of_any_device_type_are_captured_and_set(monkeypatch):
    from revtree._replay import _rng

    fake = _FakeModule()
    real = torch.get_device_module
    monkeypatch.setattr(
        torch, "get_device_module", lambda t=None: fake if str(t) == "privateuseone" else real(t)
    )
    generators = _rng.Generators((torch.device("privateuseone", 0),))
    state = generators.capture()
    fake.state = torch.tensor([9], dtype=torch.uint8)
    generators.set(state)
    assert fake.calls == [("get", "privateuseone:0"), ("set", "privateuseone:0")]
    assert fake.state.item() == 7


def test_autocast_is_captured_for_every_device_type_that_has_it():
    from revtree._replay._autocast import AutocastState

    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = AutocastState.capture(("cpu", "meta"))
    assert [s[0] for s in state.settings] == ["cpu"]  # meta has no autocast
    assert state.settings[0][1] and state.settings[0][2] == torch.bfloat16


# ------------------------------------------------------------------ Duplicate, in place


def test_buffers_and_hooks_with_a_duplicate_codec_and_keyword_tensors():
    """The cases together, on a dict duplicated into both streams, keywords to both."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4, dtype=D)
            self.norm = nn.BatchNorm1d(4, dtype=D)

        def forward(self, t, scale):
            return {k: torch.tanh(self.norm(self.lin(v))) * scale for k, v in t.items()}

    torch.manual_seed(6)
    blocks = [(Mixed(), Mixed()) for _ in range(2)]
    ref = copy.deepcopy(blocks)
    fired = []
    blocks[1][0].lin.weight.register_hook(lambda grad: fired.append(1))
    x = {"a": x_(5, 4), "b": x_(5, 4, seed=1)}
    scale = x_(1, seed=2)
    seq = revtree.ReversibleSequence(blocks, codec=Duplicate(), route="both")

    def by_hand(x, scale):
        x1, x2 = dict(x), dict(x)
        for f, g in ref:
            fx = f(x2, scale=scale)
            x1 = {k: x1[k] + fx[k] for k in x1}
            gy = g(x1, scale=scale)
            x2 = {k: x2[k] + gy[k] for k in x2}
        return {k: (x1[k] + x2[k]) / 2 for k in x}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(2):
            got = grads(
                sum(v.square().sum() for v in seq(x, scale=scale).values()),
                [*x.values(), scale, *params(blocks)],
                "grad",
            )
            expected = grads(
                sum(v.square().sum() for v in by_hand(x, scale).values()),
                [*x.values(), scale, *params(ref)],
                "grad",
            )
            assert_trees_close(got, expected, what=f"step {step}")
            assert_trees_close(buffers(blocks), buffers(ref), tol=0)
    assert len(fired) == 2


# ------------------------------------------------------------ random state, held once


def test_blocks_that_draw_nothing_hold_no_random_state_whatever_the_depth():
    """Random states are kept only for the calls of f and g that draw (dropout)."""
    x = x_(4, 6)
    held = {}
    for depth in (2, 8):
        seq = revtree.ReversibleSequence([(mlp(), mlp()) for _ in range(depth)])
        held[depth], out = held_after_forward(lambda seq=seq: seq(x))
        del out
    assert held[2] == held[8] == x.numel() * x.element_size()  # the output, nothing else
    drop = revtree.ReversibleSequence(
        [(nn.Sequential(mlp(), nn.Dropout(0.5)), mlp()) for _ in range(8)]
    )
    with_dropout, out = held_after_forward(lambda: drop(x))
    assert with_dropout >= held[8] + 7 * torch.default_generator.get_state().nbytes


@pytest.mark.parametrize("mode", MODES)
def test_dropout_in_some_blocks_only_draws_the_forwards_masks(mode):
    """States shared by blocks that draw nothing, distinct around those that draw."""
    torch.manual_seed(7)
    blocks = [
        (mlp(), mlp()),
        (nn.Sequential(mlp(), nn.Dropout(0.3)), mlp()),
        (mlp(), mlp()),
        (mlp(), nn.Sequential(nn.Dropout(0.5), mlp())),
        (mlp(), mlp()),
    ]
    ref = copy.deepcopy(blocks)
    x, w = x_(6, 6), x_(6, 6, seed=1)
    seq = revtree.ReversibleSequence(blocks)
    torch.manual_seed(11)
    ours = grads((seq(x) * w).sum(), [x, *params(blocks)], mode)
    after_ours = torch.rand(3)
    torch.manual_seed(11)
    theirs = grads((plain(ref, x) * w).sum(), [x, *params(ref)], mode)
    assert torch.equal(after_ours, torch.rand(3))  # the stream continues as plain's does
    for a, b in zip(ours, theirs):
        assert_trees_close(a, b)


# ------------------------------------------------------------ training flags, as the forward ran


@pytest.mark.parametrize("mode", MODES)
def test_eval_between_forward_and_backward_recomputes_what_the_forward_ran(mode):
    """Dropout and batch norm in training mode forward, the model put in eval mode before
    backward: plain autograd's graph keeps what the forward did, and so does the recompute."""
    torch.manual_seed(8)

    def block():
        return nn.Sequential(nn.Linear(3, 3, dtype=D), nn.BatchNorm1d(3, dtype=D), nn.Dropout(0.4))

    blocks = [(block(), mlp()) for _ in range(3)]
    ref = copy.deepcopy(blocks)
    x, w = x_(6, 6), x_(6, 6, seed=1)
    seq = revtree.ReversibleSequence(blocks)
    torch.manual_seed(12)
    loss = (seq(x) * w).sum()
    seq.eval()
    ours = grads(loss, [x, *params(blocks)], mode)
    torch.manual_seed(12)
    ref_loss = (plain(ref, x) * w).sum()
    for f, g in ref:
        f.eval(), g.eval()
    theirs = grads(ref_loss, [x, *params(ref)], mode)
    for a, b in zip(ours, theirs):
        assert_trees_close(a, b)
    assert not any(m.training for m in seq.modules())  # left as the caller set them
    for a, b in zip(buffers(blocks), buffers(ref)):
        assert torch.equal(a, b)


def test_a_function_that_sets_a_training_flag_itself_recomputes_as_it_ran():
    """f puts a shared, frozen sub-network in eval() inside its forward, g runs it after:
    each call recomputes with the flags it found, and the flags end as plain autograd
    leaves them (the recompute neither replays a stale flag nor flips one back)."""
    torch.manual_seed(9)

    class F(nn.Module):
        def __init__(self, frozen):
            super().__init__()
            self.frozen, self.lin = frozen, nn.Linear(3, 3, dtype=D)

        def forward(self, h):
            self.frozen.eval()  # pretrained statistics, whatever the caller's mode
            return self.lin(self.frozen(h)).tanh()

    class G(F):
        def forward(self, h):
            return self.lin(self.frozen(h)).tanh()

    frozen = nn.Sequential(nn.Linear(3, 3, dtype=D), nn.BatchNorm1d(3, dtype=D))
    with torch.no_grad():
        frozen[1].running_mean.copy_(torch.randn(3, dtype=D))
    blocks = [(F(frozen), G(frozen)) for _ in range(2)]
    ref = copy.deepcopy(blocks)
    seq = revtree.ReversibleSequence(blocks)
    x, w = x_(8, 6), x_(8, 6, seed=1)
    for _ in range(2):
        seq.train()
        for f, g in ref:
            f.train(), g.train()
        ours = grads((seq(x) * w).sum(), [x, *params(blocks)], "backward")
        theirs = grads((plain(ref, x) * w).sum(), [x, *params(ref)], "backward")
        for a, b in zip(ours, theirs):
            assert_trees_close(a, b)
        for a, b in zip(buffers(blocks), buffers(ref)):
            assert torch.equal(a, b)
        assert frozen.training is ref[0][0].frozen.training is False


class Scaled(nn.Module):
    """``f`` or ``g`` that reads keyword arguments which are not tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2, dtype=D)

    def forward(self, x, scale=1.0, flip=False, opts=None, tags=(), extra=None):
        h = torch.tanh(self.lin(x)) * scale
        if flip:
            h = -h
        if opts is not None:
            h = h + len(opts)
        return h * (1 + len(tags)) if extra is None else h + extra


NON_TENSOR_KWARGS = [
    {"scale": 3.0},
    {"scale": 2, "flip": True},
    {"opts": {}},  # an empty container: a keyword with no leaves
    {"tags": ("a", "b"), "opts": []},
    {"scale": 0.5, "extra": torch.full((2,), 0.25, dtype=D)},  # beside a tensor
]
ENGINES = {
    "eager": {},
    "compiled": {"compile": True},
    "grouped": {"compile": 2},  # blocks 0 and 1 as one graph
    "budget": {"memory_budget": 100},
    "mixed": {"reversible": [True, False, True]},
}


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("kwargs", NON_TENSOR_KWARGS, ids=str)
def test_keyword_arguments_that_are_not_tensors_reach_the_recomputation(kwargs, engine):
    """Plain values among the keyword arguments reach every call, forward and recomputed."""
    torch.manual_seed(0)
    blocks = [(Scaled(), Scaled()) for _ in range(3)]
    ref_blocks = copy.deepcopy(blocks)
    seq = revtree.ReversibleSequence(blocks, route="both", **ENGINES[engine])
    x = torch.randn(3, 4, dtype=D, requires_grad=True)
    xr = x.detach().clone().requires_grad_()

    def reference(x):
        x1, x2 = x.chunk(2, -1)
        for f, g in ref_blocks:
            x1 = x1 + f(x2, **kwargs)
            x2 = x2 + g(x1, **kwargs)
        return torch.cat((x1, x2), -1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the compiled engine's notes
        for _ in range(3):  # the compiled engine compiles at the second step
            for p in [*params(blocks), *params(ref_blocks)]:
                p.grad = None
            x.grad = xr.grad = None
            y, expected = seq(x, **kwargs), reference(xr)
            (y.square().sum()).backward()
            expected.square().sum().backward()
            assert_trees_close(y, expected, what="output")
            assert_trees_close(x.grad, xr.grad, what="x.grad")
            for p, q in zip(params(blocks), params(ref_blocks)):
                assert_trees_close(p.grad, q.grad, what="parameter")
