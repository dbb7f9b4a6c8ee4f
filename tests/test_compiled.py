"""The compiled engine (``compile=True``) against plain autograd written by hand.

Each test compiles a few graphs (seconds each); the blocks of one structure share them.
"""

from __future__ import annotations

import copy

import optree
import pytest
import torch
from helpers import assert_trees_close, plain, reference
from helpers import t as x_
from torch import nn

import revtree
from revtree.codecs import Duplicate, Split
from revtree.couplings import Affine

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

D = torch.float64


class Mix(nn.Module):
    """A block function for dict half-streams: a linear map per leaf, mixed, keyword context."""

    def __init__(self, width: int, dtype: torch.dtype = D) -> None:
        super().__init__()
        self.a = nn.Linear(width, width, dtype=dtype)
        self.b = nn.Linear(width, width, dtype=dtype)
        self.norm = nn.LayerNorm(width, dtype=dtype)

    def forward(self, t, ctx=None):
        shift = 0 if ctx is None else ctx.tanh().sum()
        a = torch.tanh(self.a(self.norm(t["a"])) + shift)
        return {"a": a, "b": torch.tanh(self.b(t["b"]) + a.mean())}


def _grads(model, x, kwargs, sources):
    y = model(x, **(kwargs() if callable(kwargs) else kwargs))
    loss = sum((leaf * leaf.detach().sin()).sum() for leaf in optree.tree_leaves(y))
    return list(torch.autograd.grad(loss, sources, allow_unused=True))


def _compiled_blocks(seq):
    return seq._compiled_engine.ran  # the blocks whose last forward ran compiled


@pytest.mark.parametrize(("codec", "compile"), [("split", True), ("duplicate", True), ("split", 3)])
def test_compiled_gradients_equal_plain_autograd(codec, compile):
    """``compile=3``: blocks 0-2 run as one graph, block 3 alone."""
    torch.manual_seed(0)
    width = 4 if codec == "split" else 8
    blocks = [(Mix(width), Mix(width)) for _ in range(4)]
    ref = copy.deepcopy(blocks)
    codecs = {"split": Split(-1), "duplicate": Duplicate()}
    seq = revtree.ReversibleSequence(blocks, codec=codecs[codec], route="both", compile=compile)
    ctx = torch.randn(3, dtype=D, requires_grad=True)
    graphs = []
    for step in range(4):  # the first runs eagerly, checked; the others compiled
        graphs.append(_graphs())
        g = torch.Generator().manual_seed(step)
        x = {k: torch.randn(5, 8, generator=g, dtype=D, requires_grad=True) for k in "ab"}

        def kw():
            return {"ctx": ctx * 2}

        got = _grads(seq, x, kw, [*x.values(), ctx, *seq.parameters()])
        expected = _grads(
            lambda x, **k: reference(x, ref, [codecs[codec]] * 2, k, k),
            x,
            kw,
            [*x.values(), ctx, *(p for pair in ref for fn in pair for p in fn.parameters())],
        )
        assert_trees_close(got, expected, what=f"step {step}")
    assert _compiled_blocks(seq) == {0, 1, 2, 3}
    # a forward and a reverse graph serve every block (two of each where the first
    # block's input streams are views), per group size; nothing compiles after the
    # second step
    sizes = 1 if compile is True else 2
    assert graphs[1] == graphs[0] and graphs[2] - graphs[1] <= 4 * sizes
    assert graphs[3] == graphs[2] and _graphs() == graphs[3]


def _graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_float32_and_affine_coupling():
    torch.manual_seed(1)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale, self.shift = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return torch.tanh(self.scale(x)), self.shift(x)

    blocks = [(Pair(), Pair()) for _ in range(3)]
    eager = revtree.ReversibleSequence(copy.deepcopy(blocks), coupling=Affine())
    seq = revtree.ReversibleSequence(blocks, coupling=Affine(), compile=True)
    for step in range(3):
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(step), requires_grad=True)
        got = _grads(seq, x, {}, [x, *seq.parameters()])
        expected = _grads(eager, x, {}, [x, *eager.parameters()])
        for a, b in zip(got, expected):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert _compiled_blocks(seq) == {0, 1, 2}


class ScaleShift(nn.Module):
    """For the affine coupling: a (log-scale, shift) pair (module level: it pickles)."""

    def __init__(self):
        super().__init__()
        self.scale, self.shift = nn.Linear(4, 4, dtype=D), nn.Linear(4, 4, dtype=D)

    def forward(self, x):
        return torch.tanh(self.scale(x)), self.shift(x)


def test_a_copied_or_loaded_sequence_compiles_nothing_again(tmp_path):
    """An EMA copy, a checkpoint loaded: equal couplings share the compiled graphs."""
    torch.manual_seed(3)
    blocks = [(ScaleShift(), ScaleShift()) for _ in range(2)]
    seq = revtree.ReversibleSequence(blocks, coupling=Affine(bound=1.5), compile=True)
    x = torch.randn(3, 8, dtype=D, requires_grad=True)
    for _ in range(3):
        seq(x).sum().backward()
    graphs = _graphs()
    torch.save(seq, tmp_path / "seq.pt")
    for other in (copy.deepcopy(seq), torch.load(tmp_path / "seq.pt", weights_only=False)):
        for _ in range(3):
            other(x).sum().backward()
    assert _graphs() == graphs


def test_blocks_the_compiled_engine_cannot_take_run_eagerly_and_say_why():
    torch.manual_seed(2)

    def mlp(extra=None):
        layers = [nn.Linear(4, 4, dtype=D), nn.Tanh()]
        return nn.Sequential(*layers, *([extra] if extra is not None else []))

    blocks = [
        (mlp(), mlp()),
        (mlp(nn.Dropout(0.3)), mlp()),  # draws random numbers
        (mlp(nn.BatchNorm1d(4, dtype=D)), mlp()),  # changes its buffers
        (mlp(), mlp()),
    ]
    ref = copy.deepcopy(blocks)
    seq = revtree.ReversibleSequence(blocks, compile=True)
    with pytest.warns(revtree.RevtreeWarning) as seen:
        for step in range(3):
            x = torch.randn(6, 8, generator=torch.Generator().manual_seed(step), dtype=D)
            x.requires_grad_()
            torch.manual_seed(10 + step)
            got = _grads(seq, x, {}, [x, *seq.parameters()])
            torch.manual_seed(10 + step)
            expected = _grads(
                lambda x: reference(x, ref, [Split(-1)]),
                x,
                {},
                [x, *(p for pair in ref for fn in pair for p in fn.parameters())],
            )
            assert_trees_close(got, expected, what=f"step {step}")
            assert_trees_close(
                list(seq.buffers()), [b for p in ref for f in p for b in f.buffers()]
            )
    messages = sorted(str(w.message) for w in seen)
    assert len(messages) == 2
    assert messages[0].startswith("block 1 runs on the eager engine") and "random" in messages[0]
    assert messages[1].startswith("block 2 runs on the eager engine") and "buffers" in messages[1]
    assert _compiled_blocks(seq) == {0, 3}


def test_a_gradient_that_is_none_keeps_the_block_eager():
    class PerLeaf(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2, dtype=D), nn.Linear(2, 2, dtype=D)

        def forward(self, t):
            return {"a": torch.tanh(self.a(t["a"])), "b": torch.tanh(self.b(t["b"]))}

    seq = revtree.ReversibleSequence([(PerLeaf(), PerLeaf())], compile=True)
    x = {k: torch.randn(3, 4, dtype=D, requires_grad=True) for k in "ab"}
    params = list(seq.parameters())
    with pytest.warns(revtree.RevtreeWarning, match="block 0 .* a gradient it passes on is None"):
        for _ in range(3):
            grads = torch.autograd.grad(
                seq(x)["a"].sum(), [*x.values(), *params], allow_unused=True
            )
            assert grads[1] is None and grads[0] is not None  # x['b'] reaches nothing
            assert [g is None for g in grads[2:]] == [False, False, True, True] * 2


@pytest.mark.parametrize("compile", [True, 2])
def test_parameter_hooks_fire_once_on_the_compiled_engine(compile):
    torch.manual_seed(3)
    blocks = [(nn.Linear(4, 4, dtype=D), nn.Linear(4, 4, dtype=D)) for _ in range(2)]
    ref = copy.deepcopy(blocks)
    fired = []
    blocks[0][0].weight.register_hook(lambda grad: fired.append(1) or grad * 2)
    ref[0][0].weight.register_hook(lambda grad: grad * 2)
    seq = revtree.ReversibleSequence(blocks, compile=compile)
    for _ in range(3):
        x = torch.randn(3, 8, dtype=D, requires_grad=True)
        got = _grads(seq, x, {}, [x, *seq.parameters()])
        expected = _grads(
            lambda x: reference(x, ref, [Split(-1)]),
            x,
            {},
            [x, *(p for pair in ref for fn in pair for p in fn.parameters())],
        )
        assert_trees_close(got, expected)
    assert len(fired) == 3
    assert _compiled_blocks(seq) == {0, 1}


# raised by dynamo's own machinery as it hands the sequence's tensors to the graph break
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_torch_compile_of_a_model_that_holds_a_sequence():
    """The sequence is a clean graph break: the model around it compiles, gradients exact."""
    torch.manual_seed(4)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 8, dtype=D)
            self.seq = revtree.ReversibleSequence(
                [(nn.Linear(4, 4, dtype=D), nn.Linear(4, 4, dtype=D)) for _ in range(3)]
            )
            self.head = nn.Linear(8, 1, dtype=D)

        def forward(self, x):
            return self.head(self.seq(self.embed(x).tanh())).sum()

    model = Model()
    plain = copy.deepcopy(model)
    plain.seq.reversible = False
    compiled = torch.compile(model)
    for _ in range(2):
        x = torch.randn(5, 3, dtype=D)
        got = torch.autograd.grad(compiled(x), list(model.parameters()))
        expected = torch.autograd.grad(plain(x), list(plain.parameters()))
        assert_trees_close(list(got), list(expected))


# ------------------------------------------------------------------ blocks as one graph


class Moded(nn.Module):
    """A map whose arithmetic depends on the training flag (no random numbers, no buffers)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(3, 3, dtype=D)

    def forward(self, x):
        return torch.tanh(self.lin(x)) * (2.0 if self.training else 0.5)


def _weights(y):
    return (y * y.detach().cos()).sum()


def _params(blocks):
    return [p for pair in blocks for fn in pair for p in fn.parameters()]


@pytest.mark.parametrize("compile", [True, 3])
def test_modes_switched_between_forward_and_backward_replay_the_forward(compile):
    """``seq.eval()`` after the forward: the recomputation still runs in training mode."""
    blocks = [(Moded(i), Moded(10 + i)) for i in range(3)]
    ref = copy.deepcopy(blocks)
    seq = revtree.ReversibleSequence(blocks, compile=compile)
    for step in range(3):
        seq.train()
        x = x_(4, 6, seed=step)
        y = seq(x)
        seq.eval()
        got = torch.autograd.grad(_weights(y), [x, *_params(blocks)])
        expected = torch.autograd.grad(_weights(plain(ref, x)), [x, *_params(ref)])
        assert_trees_close(list(got), list(expected), what=f"step {step}")
    assert _compiled_blocks(seq) == {0, 1, 2}


def test_a_group_backward_twice_with_retain_graph():
    blocks = [(Moded(i), Moded(10 + i)) for i in range(4)]
    ref = copy.deepcopy(blocks)
    seq = revtree.ReversibleSequence(blocks, compile=4)
    for step in range(3):
        x = x_(2, 6, seed=step)
        loss = _weights(seq(x))
        first = torch.autograd.grad(loss, [x, *_params(blocks)], retain_graph=True)
        second = torch.autograd.grad(loss, [x, *_params(blocks)])
        expected = torch.autograd.grad(_weights(plain(ref, x)), [x, *_params(ref)])
        assert_trees_close(list(first), list(expected))
        assert_trees_close(list(second), list(expected))
    assert _compiled_blocks(seq) == {0, 1, 2, 3}


def test_grouped_blocks_with_an_optimizer_in_backward_get_gradients_block_by_block():
    """Post-accumulate-grad hooks end a node at each block: no group spans two blocks then."""
    depth = 4
    blocks = [(Moded(i), Moded(10 + i)) for i in range(depth)]
    ref = copy.deepcopy(blocks)
    events: list = []
    for i, (f, g) in enumerate(blocks):
        for p in [*f.parameters(), *g.parameters()]:
            p.register_post_accumulate_grad_hook(lambda p, i=i: events.append(i))
    seq = revtree.ReversibleSequence(blocks, compile=3)
    for step in range(3):
        events.clear()
        x = x_(2, 6, seed=step)
        xr = x.detach().clone().requires_grad_()
        for p in _params(blocks):
            p.grad = None
        _weights(seq(x)).backward()
        expected = torch.autograd.grad(_weights(plain(ref, xr)), [xr, *_params(ref)])
        assert_trees_close([x.grad, *(p.grad for p in _params(blocks))], list(expected))
        assert events == sorted(events, reverse=True) and len(events) == depth * 4
    assert _compiled_blocks(seq) == set(range(depth))


@pytest.mark.parametrize("value", [-1, 2.5, "yes"])
def test_compile_is_a_bool_or_a_number_of_blocks(value):
    with pytest.raises(revtree.RevtreeError, match="not a bool or a number of blocks"):
        revtree.ReversibleSequence([(nn.Linear(2, 2), nn.Linear(2, 2))], compile=value)


@pytest.mark.parametrize("failing", [0, 1], ids=["forward", "reverse"])
def test_a_group_whose_graph_fails_runs_block_by_block(monkeypatch, failing):
    """Whatever a group's graph cannot do, its blocks do one by one, exactly."""
    from revtree._engine import _compiled

    build = _compiled._build

    def failing_build(key, size, options):
        functions = list(build(key, size, options))
        if size > 1:

            def fail(*args, **kwargs):
                raise RuntimeError("no graph for this group")

            functions[failing] = fail
        return tuple(functions)

    monkeypatch.setattr(_compiled, "_build", failing_build)
    monkeypatch.setattr(_compiled, "_LOOKUPS", {})  # functions built afresh
    blocks = [(Moded(i), Moded(10 + i)) for i in range(3)]
    ref = copy.deepcopy(blocks)
    seq = revtree.ReversibleSequence(blocks, compile=3)
    # (a block whose single-block graph compiles after it ran in a group is judged again:
    # one more step on the eager engine)
    for step in range(5):
        x = x_(2, 6, seed=step)
        got = torch.autograd.grad(_weights(seq(x)), [x, *_params(blocks)])
        expected = torch.autograd.grad(_weights(plain(ref, x)), [x, *_params(ref)])
        assert_trees_close(list(got), list(expected), what=f"step {step}")
    assert _compiled_blocks(seq) == {0, 1, 2}  # each block's own graph
    assert seq._compiled_engine._broken  # the group's graph is not tried again


def test_cpu_graphs_fall_back_to_inductors_defaults_where_its_cpp_wrapper_fails(monkeypatch):
    """On the CPU the graphs call their kernels through inductor's C++ wrapper; where that
    cannot be built (no Python headers, say), they are built with inductor's defaults: the
    blocks still run compiled, exactly, and no warning sends them to the eager engine."""
    from revtree._engine import _compiled

    options = {"cpp_wrapper": True, "cpp.cxx": ("no-such-compiler",)}
    monkeypatch.setattr(_compiled, "_HOST_OPTIONS", options)
    monkeypatch.setattr(_compiled, "_LOOKUPS", {})  # functions built afresh
    blocks = [(Moded(i), Moded(10 + i)) for i in range(2)]
    ref = copy.deepcopy(blocks)
    seq = revtree.ReversibleSequence(blocks, compile=True)
    for step in range(3):
        x = x_(2, 6, seed=step)
        got = torch.autograd.grad(_weights(seq(x)), [x, *_params(blocks)])
        expected = torch.autograd.grad(_weights(plain(ref, x)), [x, *_params(ref)])
        assert_trees_close(list(got), list(expected), what=f"step {step}")
    assert _compiled_blocks(seq) == {0, 1}
    lookups = list(_compiled._LOOKUPS.values())
    assert lookups and all(lookup.options is None for lookup in lookups)


def test_cpu_graphs_use_inductors_cpp_wrapper():
    from revtree._engine import _compiled

    seq = revtree.ReversibleSequence([(Moded(0), Moded(1))], compile=True)
    for step in range(2):
        _weights(seq(x_(2, 6, seed=step))).backward()
    (lookup,) = set(seq._learned.functions.values())
    assert lookup.options == _compiled._HOST_OPTIONS == {"cpp_wrapper": True}


class Unused(nn.Module):
    """A map with a parameter its forward never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4, dtype=D)
        self.unused = nn.Parameter(torch.ones(4, dtype=D))

    def forward(self, x):
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("compile", [True, 2])
def test_a_module_shared_by_blocks_is_trusted_only_after_a_reverse_saw_its_gradients(compile):
    """Blocks sharing their modules share their verdict: the first block's forward alone
    must not trust the others (whose compiled gradient would be zero where it is None)."""
    torch.manual_seed(5)
    m = Unused()
    seq = revtree.ReversibleSequence([(m, m)] * 4, compile=compile)
    with pytest.warns(revtree.RevtreeWarning, match="is None"):
        for step in range(3):
            x = x_(3, 8, seed=step)
            grads = torch.autograd.grad(
                seq(x).sum(), [x, m.unused, *m.lin.parameters()], allow_unused=True
            )
            assert grads[1] is None and all(g is not None for g in grads[2:])
    m.unused.grad = None
    seq(x_(3, 8)).sum().backward()
    assert m.unused.grad is None and m.lin.weight.grad is not None


class Ignores(nn.Module):
    """A map taking a keyword argument it ignores."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4, dtype=D)

    def forward(self, x, mask=None):
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("compile", [True, 2])
def test_a_keyword_tensor_received_but_unused_gets_none(compile):
    torch.manual_seed(6)
    seq = revtree.ReversibleSequence([(Ignores(), Ignores()) for _ in range(3)], compile=compile)
    mask = torch.randn(4, dtype=D, requires_grad=True)
    with pytest.warns(revtree.RevtreeWarning, match="is None"):
        for step in range(3):
            x = x_(3, 8, seed=step)
            (got,) = torch.autograd.grad(seq(x, mask=mask).sum(), [mask], allow_unused=True)
            assert got is None


class Switched(nn.Module):
    """A map that reads a second parameter while its flag is on."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4, dtype=D)
        self.extra = nn.Parameter(torch.ones(4, dtype=D))
        self.use_extra = True

    def forward(self, x):
        y = self.lin(x)
        return torch.tanh(y + self.extra if self.use_extra else y)


@pytest.mark.parametrize("compile", [True, 2])
def test_a_flag_switched_on_a_compiled_block_is_judged_again(compile):
    """Its graph is compiled again: the block goes back to the eager engine for a step,
    whose reverse sees the parameter it stopped reading get None, as plain autograd does."""
    torch.manual_seed(7)
    blocks = [(Switched(), Switched()) for _ in range(3)]
    ref = copy.deepcopy(blocks)
    seq = revtree.ReversibleSequence(blocks, compile=compile)
    with pytest.warns(revtree.RevtreeWarning, match="is None"):
        for step in range(5):
            for f, g in [*blocks, *ref]:
                f.use_extra = g.use_extra = step < 2
            x = x_(3, 8, seed=step)
            got = torch.autograd.grad(_weights(seq(x)), [x, *_params(blocks)], allow_unused=True)
            expected = torch.autograd.grad(
                _weights(plain(ref, x)), [x, *_params(ref)], allow_unused=True
            )
            assert [g is None for g in got] == [g is None for g in expected], f"step {step}"
            assert_trees_close(
                [g for g in got if g is not None], [g for g in expected if g is not None]
            )
    assert _compiled_blocks(seq) == set()  # each now passes a None on: eager
