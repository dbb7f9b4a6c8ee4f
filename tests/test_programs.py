"""Programs beyond two streams: sweeps over K parts, invertible steps, side outputs, chaining.

Every reference is the same arithmetic written out with ordinary autograd by hand, float64.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_trees_close, grads
from helpers import t as x_
from torch import nn

import revtree
from revtree._saved import held_after_forward
from revtree.codecs import Duplicate, Split, Whole

D = torch.float64
MODES = ["backward", "grad"]


def weights(y):
    return (y * torch.linspace(-1, 1, y.shape[-1], dtype=D)).sum()


class Conv(nn.Module):
    """A group's update: a map of the features it reads, with dropout and a keyword mask."""

    def __init__(self, width, seed, dropout=0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(width, width, dtype=D)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask=None):
        h = self.dropout(torch.tanh(self.lin(x)))
        return h if mask is None else h * mask


class Group(nn.Module):
    """Update ``i`` of RevGNN's sweep: the sum of the parts it reads, through a conv."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, *parts, mask=None):
        return self.conv(sum(parts), mask=mask)


def sweep(convs):
    c = len(convs)
    steps = [revtree.Update(Group(convs[0]), writes=0, reads=tuple(range(1, c)))]
    steps += [revtree.Update(Group(convs[i]), writes=i, reads=i - 1) for i in range(1, c)]
    return revtree.Block(*steps)


def plain_sweeps(layers, x, mask=None):
    """RevGNN's arithmetic: y_0 = x_0 + f_0(x_1 + ... + x_{C-1}), y_i = x_i + f_i(y_{i-1})."""
    for convs in layers:
        xs = list(x.chunk(len(convs), -1))
        y_in = sum(xs[1:])
        ys = []
        for i, conv in enumerate(convs):
            y_in = xs[i] + conv(y_in, mask=mask)
            ys.append(y_in)
        x = torch.cat(ys, -1)
    return x


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("parts", [2, 3, 4])
def test_a_sweep_over_k_parts_equals_plain_autograd(parts, mode):
    width = 3
    layers = [[Conv(width, 10 * k + i, dropout=0.3) for i in range(parts)] for k in range(3)]
    seq = revtree.ReversibleSequence(
        [sweep(convs) for convs in layers], codec=Split(-1, parts=parts)
    )
    x = x_(5, width * parts)
    mask = x_(5, width, seed=1)
    params = list(seq.parameters())
    for step in range(2):
        torch.manual_seed(step)
        got = grads(weights(seq(x, mask=mask)), [x, mask, *params], mode)
        torch.manual_seed(step)
        expected = grads(weights(plain_sweeps(layers, x, mask)), [x, mask, *params], mode)
        assert_trees_close(got, expected)


def test_a_sweep_inverts():
    layers = [[Conv(2, 10 * k + i) for i in range(4)] for k in range(3)]
    seq = revtree.ReversibleSequence([sweep(c) for c in layers], codec=Split(-1, parts=4))
    x = x_(3, 8)
    assert torch.allclose(seq.inverse(seq(x)), x, atol=1e-12)


def test_keywords_routed_per_step_and_per_key():
    """The mask to every f, the context to g only."""

    class Takes(nn.Module):
        def __init__(self, seed, name):
            super().__init__()
            torch.manual_seed(seed)
            self.lin, self.name = nn.Linear(2, 2, dtype=D), name

        def forward(self, x, **kwargs):
            assert set(kwargs) == {self.name}, kwargs
            return torch.tanh(self.lin(x)) * kwargs[self.name]

    blocks = [(Takes(2 * i, "mask"), Takes(2 * i + 1, "context")) for i in range(2)]
    seq = revtree.ReversibleSequence(blocks, route=(("mask",), ("context",)))
    x, mask, context = x_(3, 4), x_(3, 1, seed=1), x_(3, 1, seed=2)
    got = torch.autograd.grad(weights(seq(x, mask=mask, context=context)), [x, mask, context])
    x1, x2 = x.chunk(2, -1)
    for f, g in blocks:
        x1 = x1 + f(x2, mask=mask)
        x2 = x2 + g(x1, context=context)
    expected = torch.autograd.grad(weights(torch.cat((x1, x2), -1)), [x, mask, context])
    assert_trees_close(list(got), list(expected))


# ------------------------------------------------------------------------ subtree parts


def test_parts_made_of_whole_subtrees():
    """The video updated from the text, the text from the video."""

    class Cross(nn.Module):
        def __init__(self, seed, out):
            super().__init__()
            torch.manual_seed(seed)
            self.lin = nn.Linear(3, out, dtype=D)

        def forward(self, tree):
            (source,) = [t for t in tree.values() if t is not None]
            target = "text" if "video" in [k for k, v in tree.items() if v is not None] else "video"
            update = torch.tanh(self.lin(source.mean(-2, keepdim=True)))
            return {target: update, ("video" if target == "text" else "text"): None}

    blocks = [(Cross(2 * i, 3), Cross(2 * i + 1, 3)) for i in range(2)]
    seq = revtree.ReversibleSequence(blocks, codec={"video": Whole(0), "text": Whole(1)})
    x = {"video": x_(2, 5, 3), "text": x_(2, 4, 3, seed=1)}
    y = seq(x)
    loss = weights(y["video"]) + weights(y["text"])
    got = torch.autograd.grad(loss, [x["video"], x["text"], *seq.parameters()])
    v, t = x["video"], x["text"]
    for f, g in blocks:
        v = v + f({"text": t, "video": None})["video"]
        t = t + g({"video": v, "text": None})["text"]
    expected = torch.autograd.grad(
        weights(v) + weights(t), [x["video"], x["text"], *seq.parameters()]
    )
    assert_trees_close(list(got), list(expected))


def test_duplicate_can_sum_its_parts():
    blocks = [(nn.Linear(2, 2, dtype=D), nn.Linear(2, 2, dtype=D))]
    seq = revtree.ReversibleSequence(blocks, codec=Duplicate(merge="sum"))
    x = x_(3, 2)
    ((f, g),) = blocks
    y1 = x + f(x)
    assert torch.allclose(seq(x), y1 + (x + g(y1)), atol=1e-12)


# ------------------------------------------------------------------------- side outputs


class Aux(nn.Module):
    """An update and an auxiliary loss (routing-transformer's, a load-balancing loss)."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(2, 2, dtype=D)
        self.dropout = nn.Dropout(0.2)

    def forward(self, x):
        h = self.dropout(torch.tanh(self.lin(x)))
        return h, {"balance": h.square().mean(), "norm": self.lin.weight.norm()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["sum", "list"])
def test_side_outputs_carry_their_gradients(how, mode):
    blocks = [(Aux(2 * i), nn.Linear(2, 2, dtype=D)) for i in range(3)]
    seq = revtree.ReversibleSequence(
        [revtree.Block(f, g, side=(True, False)) for f, g in blocks], sides=how
    )
    x = x_(4, 4)
    params = list(seq.parameters())
    torch.manual_seed(0)
    y, sides = seq(x)
    if how == "list":
        assert len(sides) == 3
        sides = {k: sum(s[k] for s in sides) for k in ("balance", "norm")}
    got = grads(weights(y) + 3 * sides["balance"] - sides["norm"], [x, *params], mode)
    torch.manual_seed(0)
    x1, x2 = x.chunk(2, -1)
    balance = norm = 0
    for f, g in blocks:
        u, aux = f(x2)
        x1 = x1 + u
        x2 = x2 + g(x1)
        balance, norm = balance + aux["balance"], norm + aux["norm"]
    loss = weights(torch.cat((x1, x2), -1)) + 3 * balance - norm
    assert_trees_close(got, grads(loss, [x, *params], mode))


def test_a_side_output_that_is_no_tensor_is_named():
    f = revtree.Fn(lambda x: (x.tanh(), "not a tensor"))
    seq = revtree.ReversibleSequence([revtree.Block(f, torch.sin, side=(True, False))])
    with pytest.raises(revtree.RevtreeError, match=r"block 0: f returned a side output holding"):
        y, side = seq(x_(3, 4))
        y.sum().backward()


# --------------------------------------------------------------------- invertible steps


class ActNormLike(nn.Module):
    """Scale and shift per feature, initialised from the first batch (ActNorm), with log-det."""

    def __init__(self, width):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(width, dtype=D))
        self.shift = nn.Parameter(torch.zeros(width, dtype=D))
        self.initialised = False

    def forward(self, x):
        if not self.initialised:
            with torch.no_grad():
                self.shift.copy_(-x.mean(0))
                self.log_scale.copy_(-x.std(0).log())
            self.initialised = True
        y = (x + self.shift) * self.log_scale.exp()
        return y, self.log_scale.sum().expand(x.shape[0])

    def inverse(self, y):
        return y * (-self.log_scale).exp() - self.shift


class Coupling(nn.Module):
    """A RealNVP coupling with dropout in its subnets, two subnets called in turn."""

    def __init__(self, width, seed):
        super().__init__()
        torch.manual_seed(seed)
        half = width // 2
        self.s1, self.s2 = (
            nn.Sequential(
                nn.Linear(half, 8, dtype=D),
                nn.Tanh(),
                nn.Dropout(0.2),
                nn.Linear(8, 2 * half, dtype=D),
            )
            for _ in range(2)
        )

    def _scale_shift(self, net, x):
        s, t = net(x).chunk(2, -1)
        return torch.tanh(s), t

    def forward(self, x):
        a, b = x.chunk(2, -1)
        s, t = self._scale_shift(self.s1, a)
        b = b * s.exp() + t
        s2, t2 = self._scale_shift(self.s2, b)
        a = a * s2.exp() + t2
        return torch.cat((a, b), -1), s.sum(-1) + s2.sum(-1)

    def inverse(self, y):
        a, b = y.chunk(2, -1)
        s2, t2 = self._scale_shift(self.s2, b)
        a = (a - t2) * (-s2).exp()
        s, t = self._scale_shift(self.s1, a)
        b = (b - t) * (-s).exp()
        return torch.cat((a, b), -1)


class Permute(nn.Module):
    def __init__(self, width, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("perm", torch.randperm(width, generator=g))
        self.register_buffer("inv", torch.argsort(self.perm))

    def forward(self, x):
        return x[:, self.perm], torch.zeros(x.shape[0], dtype=x.dtype)

    def inverse(self, y):
        return y[:, self.inv]


def flow_modules(width, depth):
    modules = []
    for i in range(depth):
        modules += [ActNormLike(width), Coupling(width, i), Permute(width, i)]
    return modules


@pytest.mark.parametrize("mode", MODES)
def test_invertible_steps_with_log_determinants_equal_plain_autograd(mode):
    width = 4
    ours, ref = flow_modules(width, 3), flow_modules(width, 3)
    flow = revtree.ReversibleSequence(
        [revtree.Invertible(m, side=True) for m in ours], codec=Whole()
    )
    params = list(flow.parameters())
    ref_params = [p for m in ref for p in m.parameters()]
    for step in range(3):  # the first batch initialises the ActNorms
        x = x_(16, width, seed=step)
        torch.manual_seed(step)
        z, log_det = flow(x)
        got = grads((0.5 * z.square().sum(-1) - log_det).mean(), [x, *params], mode)
        torch.manual_seed(step)
        h, total = x, 0
        for m in ref:
            h, j = m(h)
            total = total + j
        expected = grads((0.5 * h.square().sum(-1) - total).mean(), [x, *ref_params], mode)
        assert_trees_close(got, expected)
        assert_trees_close([z, log_det], [h, total])


def test_an_invertible_step_needs_an_inverse():
    with pytest.raises(revtree.RevtreeError, match=r"has no method 'inverse'"):
        revtree.Invertible(nn.Linear(2, 2))


# ---------------------------------------------------------------------------- errors


def test_an_update_reading_its_own_part_is_refused():
    with pytest.raises(revtree.RevtreeError, match=r"reads the part it writes"):
        revtree.Update(nn.Linear(2, 2), writes=0, reads=(0, 1))


def test_parts_that_no_step_writes_are_named():
    block = revtree.Block(
        revtree.Update(nn.Linear(2, 2, dtype=D), writes=0, reads=1),
        revtree.Update(nn.Linear(2, 2, dtype=D), writes=1, reads=0),
    )
    seq = revtree.ReversibleSequence([block], codec=Split(-1, parts=3))
    with pytest.raises(revtree.RevtreeError, match=r"part\(s\) \[2\] would pass through it"):
        seq(x_(3, 6))


def test_a_two_stream_block_over_k_parts_is_named():
    seq = revtree.ReversibleSequence([(nn.Linear(2, 2), nn.Linear(2, 2))], codec=Split(-1, parts=3))
    with pytest.raises(revtree.RevtreeError, match=r"block 0 is a pair \(f, g\) over two streams"):
        seq(x_(3, 6))


# --------------------------------------------------------------------------- chaining


def _layer(seed):
    torch.manual_seed(seed)
    return revtree.ReversibleSequence([(nn.Linear(8, 8, dtype=D), nn.Linear(8, 8, dtype=D))])


def _chain(layers, x, skip=False):
    h = x
    for layer in layers:
        h = layer(h) + h if skip else layer(h)
    return h


@pytest.mark.parametrize("skip", [False, True])
def test_separately_called_layers_equal_plain_autograd(skip):
    layers = [_layer(i) for i in range(6)]
    x = x_(4, 16)
    params = [p for layer in layers for p in layer.parameters()]
    got = torch.autograd.grad(weights(_chain(layers, x, skip)), [x, *params])
    with torch.no_grad():
        for layer in layers:
            layer.reversible = False
    expected = torch.autograd.grad(weights(_chain(layers, x, skip)), [x, *params])
    assert_trees_close(list(got), list(expected))


def test_separately_called_layers_hold_one_output_in_all():
    x = x_(64, 16)
    held = {}
    for depth in (4, 32):
        layers = [_layer(i) for i in range(depth)]
        _chain(layers, x)  # their first calls
        held[depth], y = held_after_forward(lambda layers=layers: _chain(layers, x))
        y.sum().backward()
    assert held[4] == held[32] == x.numel() * x.element_size()


def test_an_output_taken_over_by_a_call_whose_result_is_unused_is_rebuilt():
    """The later layer's backward never runs: the earlier layer asks it to invert itself."""
    first, second = _layer(1), _layer(2)
    x = x_(4, 16)
    h = first(x)
    second(h)  # taken over, then dropped
    got = torch.autograd.grad(weights(h), [x, *first.parameters()])
    first.reversible = False
    expected = torch.autograd.grad(weights(first(x)), [x, *first.parameters()])
    assert_trees_close(list(got), list(expected))


def test_an_output_changed_in_place_before_the_next_call_is_not_taken_over():
    first, second = _layer(1), _layer(2)
    x = x_(4, 16)
    h = first(x)
    with torch.no_grad():
        h.mul_(2)  # the second layer sees other values than the first made
    y = second(h)
    with pytest.raises(revtree.RevtreeError, match="changed in place after the forward pass"):
        weights(y).backward()
