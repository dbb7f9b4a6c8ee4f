"""Behaviour of ReversibleSequence beyond the gradient property: storage, RNG, autocast, trees."""

from __future__ import annotations

import gc
from collections import OrderedDict

import optree
import pytest
import torch
from helpers import (
    Point,
    TreeMixer,
    assert_trees_close,
    codec_for,
    half_widths,
    make_blocks,
    reference,
    t,
    tree_catalogue,
)
from torch import nn

import revtree
from revtree._replay import _rng
from revtree._saved import held_after_forward
from revtree.codecs import Duplicate, Split


def _seq_for(x, depth=2, dropout=0.0, **kwargs):
    codecs = [codec_for(leaf, 0) for leaf in optree.tree_leaves(x)]
    blocks = make_blocks(half_widths(x, codecs), depth, dropout)
    return revtree.ReversibleSequence(blocks, **kwargs), blocks, codecs


@pytest.mark.parametrize("x", tree_catalogue(), ids=lambda x: type(x).__name__)
def test_catalogue_trees(x):
    seq, blocks, codecs = _seq_for(x)
    y = seq(x)
    assert optree.tree_structure(y) == optree.tree_structure(x)
    assert_trees_close(y, reference(x, blocks, codecs))
    leaves = optree.tree_leaves(x)
    grads = torch.autograd.grad(sum(leaf.sum() for leaf in optree.tree_leaves(y)), leaves)
    expected = torch.autograd.grad(
        sum(leaf.sum() for leaf in optree.tree_leaves(reference(x, blocks, codecs))), leaves
    )
    assert_trees_close(list(grads), list(expected))


def test_prefix_codec_tree():
    x = {"tokens": t(2, 3, 4), "extra": {"cls": t(2, 4), "pos": [t(2, 6)]}}
    codec = {"tokens": Split(-1), "extra": Duplicate()}
    codecs = [Duplicate(), Duplicate(), Split(-1)]  # flattening order: extra.cls, extra.pos, tokens
    blocks = make_blocks(half_widths(x, codecs), 2)
    seq = revtree.ReversibleSequence(blocks, codec=codec)
    assert_trees_close(seq(x), reference(x, blocks, codecs))


def test_custom_pytree_node_in_a_namespace():
    class Pair:
        def __init__(self, left, right):
            self.left, self.right = left, right

    optree.register_pytree_node(
        Pair,
        lambda p: ((p.left, p.right), None, ("left", "right")),
        lambda _, children: Pair(*children),
        namespace="revtree-tests",
    )
    x = Pair(t(2, 4), t(3, 2))

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = (
                nn.Linear(2, 2, dtype=torch.float64),
                nn.Linear(1, 1, dtype=torch.float64),
            )

        def forward(self, p):
            return Pair(self.a(p.left).tanh(), self.b(p.right).tanh())

    seq = revtree.ReversibleSequence([(F(), F())], namespace="revtree-tests")
    y = seq(x)
    assert isinstance(y, Pair) and y.left.shape == (2, 4) and y.right.shape == (3, 2)
    y.left.sum().backward()
    assert x.left.grad is not None


def test_inputs_without_grad_still_give_parameter_gradients():
    x = {"a": t(2, 4, requires_grad=False)}
    seq, blocks, codecs = _seq_for(x, depth=3)
    loss = seq(x)["a"].pow(2).sum()
    grads = torch.autograd.grad(loss, list(seq.parameters()))
    expected = torch.autograd.grad(
        reference(x, blocks, codecs)["a"].pow(2).sum(), list(seq.parameters())
    )
    assert_trees_close(list(grads), list(expected))
    assert all(g.abs().sum() > 0 for g in grads)


def test_frozen_parameters_are_left_alone():
    x = t(2, 4)
    seq, blocks, codecs = _seq_for(x, depth=2)
    frozen = blocks[0][0].linears[0].weight
    frozen.requires_grad_(False)
    seq(x).sum().backward()
    assert frozen.grad is None
    assert blocks[1][1].linears[0].weight.grad is not None


def test_shared_modules_accumulate_gradients():
    x = t(2, 4)
    f, g = TreeMixer([2]), TreeMixer([2], seed=1)
    blocks = [(f, g), (f, g), (g, f)]
    seq = revtree.ReversibleSequence(blocks)
    params = list(f.parameters()) + list(g.parameters())
    grads = torch.autograd.grad(seq(x).pow(2).sum(), params)
    expected = torch.autograd.grad(reference(x, blocks, [Split(-1)]).pow(2).sum(), params)
    assert_trees_close(list(grads), list(expected))


def test_context_that_is_a_block_parameter():
    x = t(2, 4)
    seq, blocks, codecs = _seq_for(x, depth=2)
    p = blocks[0][0].mix  # a parameter of f, also passed as keyword context
    grads = torch.autograd.grad(seq(x, ctx=p).pow(2).sum(), [p])
    expected = torch.autograd.grad(reference(x, blocks, codecs, {"ctx": p}).pow(2).sum(), [p])
    assert_trees_close(list(grads), list(expected))


def test_same_tensor_twice_in_the_input():
    a = t(2, 4)
    x = (a, a)
    codecs = [Duplicate(), Duplicate()]
    blocks = make_blocks(half_widths(x, codecs), 2)
    seq = revtree.ReversibleSequence(blocks, codec=Duplicate())
    (grad,) = torch.autograd.grad(sum(y.pow(2).sum() for y in seq(x)), [a])
    (expected,) = torch.autograd.grad(
        sum(y.pow(2).sum() for y in reference(x, blocks, codecs)), [a]
    )
    assert_trees_close(grad, expected)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_stores_nothing_and_captures_no_rng(mode, monkeypatch):
    calls = []
    monkeypatch.setattr(_rng.Generators, "capture", lambda *a: calls.append(a) or None)
    x = {"a": t(2, 4)}
    seq, blocks, codecs = _seq_for(x, depth=3, dropout=0.5)
    with mode():
        torch.manual_seed(0)
        y = seq(x)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = reference(x, blocks, codecs)
    assert not y["a"].requires_grad and y["a"].grad_fn is None
    assert calls == []
    assert_trees_close(y, expected)


def test_reversible_stack_stores_only_its_output():
    """What the graph holds: the output, once, and one random state per call that draws."""
    x = t(4, 8)
    packed = []

    def pack(tensor):
        packed.append(tensor)
        return tensor

    for depth in (2, 8):
        seq, _, _ = _seq_for(x, depth=depth)
        seq(x)  # its first call looks for what f and g read
        packed.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda p: p):
            held, y = held_after_forward(lambda seq=seq: seq(x))
        assert not packed  # nothing saved by autograd: the node keeps its output itself
        assert held == x.numel() * x.element_size()
        y.sum().backward()
        dropout, _, _ = _seq_for(x, depth=depth, dropout=0.1)
        held, y = held_after_forward(lambda seq=dropout: seq(x))
        state = torch.default_generator.get_state().nbytes
        assert held == x.numel() * x.element_size() + 2 * depth * state  # each call draws
        y.sum().backward()


def test_callers_tensors_are_not_mutated():
    x = {"a": t(2, 4), "b": t(3, 2, seed=1)}
    ctx = t(3, seed=2)
    before = {k: (v.clone(), v._version) for k, v in x.items()}
    ctx_before = (ctx.clone(), ctx._version)
    seq, _, _ = _seq_for(x, depth=3, dropout=0.2)
    seq(x, ctx=ctx)["a"].sum().backward()
    for k, v in x.items():
        assert torch.equal(v, before[k][0]) and v._version == before[k][1]
    assert torch.equal(ctx, ctx_before[0]) and ctx._version == ctx_before[1]


def test_unrelated_grads_untouched():
    x = t(2, 4)
    other = nn.Parameter(torch.ones(2, dtype=torch.float64))
    other.grad = torch.full((2,), 7.0, dtype=torch.float64)
    seq, _, _ = _seq_for(x)
    torch.autograd.grad(seq(x).sum(), [x])
    assert torch.equal(other.grad, torch.full((2,), 7.0, dtype=torch.float64))
    assert all(p.grad is None for p in seq.parameters())


def test_backward_twice_with_retain_graph():
    x = t(2, 4)
    seq, _, _ = _seq_for(x, dropout=0.3)
    y = seq(x).pow(2).sum()
    (first,) = torch.autograd.grad(y, [x], retain_graph=True)
    (second,) = torch.autograd.grad(y, [x])
    assert torch.equal(first, second)


def test_double_backward_is_a_clear_error():
    x = t(2, 4)
    seq, _, _ = _seq_for(x)
    with pytest.raises(revtree.RevtreeError, match="double backward"):
        torch.autograd.grad(seq(x).pow(2).sum(), [x], create_graph=True)


def test_double_backward_works_with_reversible_false():
    x = t(2, 4)
    seq, blocks, codecs = _seq_for(x, reversible=False)
    (g,) = torch.autograd.grad(seq(x).pow(2).sum(), [x], create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), [x])
    (g_ref,) = torch.autograd.grad(
        reference(x, blocks, codecs).pow(2).sum(), [x], create_graph=True
    )
    (gg_ref,) = torch.autograd.grad(g_ref.sum(), [x])
    assert_trees_close(gg, gg_ref)


def test_recomputation_flag_and_block_index():
    seen = []

    class Spy(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.lin = name, nn.Linear(2, 2, dtype=torch.float64)

        def forward(self, x):
            seen.append((self.name, revtree.current_block(), revtree.is_recomputing()))
            return self.lin(x)

    seq = revtree.ReversibleSequence([(Spy("f"), Spy("g")) for _ in range(2)])
    y = seq(t(1, 4))
    assert seen == [("f", 0, False), ("g", 0, False), ("f", 1, False), ("g", 1, False)]
    seen.clear()
    y.sum().backward()
    assert seen == [("g", 1, True), ("f", 1, True), ("g", 0, True), ("f", 0, True)]
    assert revtree.current_block() is None and not revtree.is_recomputing()


def test_autocast_is_replayed_in_the_recomputation():
    states = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            states.append(torch.is_autocast_enabled("cpu"))
            return self.lin(x)

    seq = revtree.ReversibleSequence([(Spy(), Spy()) for _ in range(2)])
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = seq(x)
    assert y.dtype == torch.float32
    states.clear()
    y.sum().backward()  # outside autocast
    assert states == [True] * 4


def test_autocast_gradients_match_plain_under_the_same_autocast():
    torch.manual_seed(0)
    blocks = [
        (
            nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)),
            nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)),
        )
        for _ in range(4)
    ]
    x = torch.randn(8, 32, requires_grad=True)
    grads = {}
    for reversible in (True, False):
        seq = revtree.ReversibleSequence(blocks, reversible=reversible)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = seq(x)
        grads[reversible] = torch.autograd.grad(y.pow(2).sum(), [x, *seq.parameters()])
    for a, b in zip(grads[True], grads[False]):
        assert (a - b).norm() <= 1e-4 * b.norm()


def test_autocast_gradients_at_depth_stay_within_bfloat16s_own_sensitivity():
    """At scale, rebuilding a stream rounds differently in its last float32 bit now and then,
    and a bfloat16 cast downstream can turn that into one bfloat16 step: plain autograd moves
    as much when its input moves by one float32 ulp. The reversible gradients stay within it.
    """
    torch.manual_seed(0)
    width = 128

    def mlp():
        return nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    blocks = [(mlp(), mlp()) for _ in range(16)]
    x = torch.randn(64, 2 * width, requires_grad=True)
    one_ulp = torch.nextafter(x.detach(), torch.full_like(x, float("inf"))) - x.detach()

    def grads(reversible, shift=0.0):
        seq = revtree.ReversibleSequence(blocks, reversible=reversible)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = seq(x + shift)
        return torch.autograd.grad(y.pow(2).sum(), [x, *seq.parameters()])

    def worst(a, b):
        return max(((p - q).norm() / q.norm()).item() for p, q in zip(a, b))

    plain = grads(False)
    sensitivity = worst(grads(False, one_ulp), plain)
    assert sensitivity > 1e-4  # the regime where exact agreement is not to be had
    assert worst(grads(True), plain) <= sensitivity


def test_empty_tree_and_no_blocks():
    seq = revtree.ReversibleSequence([])
    x = t(2, 4)
    y = seq(x)
    assert torch.equal(y, x)
    seq2, _, _ = _seq_for(t(2, 4))
    assert seq2({}) == {} and seq2(None) is None


def test_point_namedtuple_roundtrip_structure():
    x = Point(t(2, 4), t(2, 4))
    seq, _, _ = _seq_for(x)
    y = seq(x)
    assert isinstance(y, Point)


def test_no_reference_cycles_keep_the_graph_alive():
    import weakref

    x = t(4, 8)
    seq, _, _ = _seq_for(x, depth=3)
    gc.disable()
    y = seq(x)
    node = y.grad_fn.next_functions[0][0]  # the reversible node
    ref = weakref.ref(node.tape())
    y.sum().backward()
    del y, node
    gc.disable()
    try:
        assert ref() is None, "the autograd graph is kept alive by a reference cycle"
    finally:
        gc.enable()


def test_extra_repr_and_state_dict_names():
    seq, _, _ = _seq_for(t(2, 4), depth=2)
    names = list(seq.state_dict())
    assert names[0].startswith("blocks.0.f.") and any(n.startswith("blocks.1.g.") for n in names)
    assert "codec=Split(dim=-1)" in repr(seq)


class BatchNormBlock(nn.Module):
    def __init__(self, width, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(width, width, dtype=torch.float64)
        self.norm = nn.BatchNorm1d(width, dtype=torch.float64)

    def forward(self, x):
        return torch.tanh(self.norm(self.lin(x)))


def test_batchnorm_running_statistics_updated_once_per_step():
    stats = {}
    grads = {}
    for reversible in (True, False):
        blocks = [(BatchNormBlock(4, 2 * i), BatchNormBlock(4, 2 * i + 1)) for i in range(3)]
        seq = revtree.ReversibleSequence(blocks, reversible=reversible)
        x = t(16, 8)
        for _ in range(3):
            seq(x).pow(2).sum().backward()
        stats[reversible] = {k: v.clone() for k, v in seq.state_dict().items() if "norm." in k}
        grads[reversible] = [p.grad for p in seq.parameters()]
    for key, value in stats[False].items():
        torch.testing.assert_close(stats[True][key], value, rtol=0, atol=1e-12, msg=key)
    assert stats[True]["blocks.0.f.norm.num_batches_tracked"].item() == 3
    assert_trees_close(grads[True], grads[False])


class Counting(nn.Module):
    """Running state updated by assignment: a call counter and an average of its input."""

    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width, dtype=torch.float64)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(width, dtype=torch.float64))

    def forward(self, x):
        self.calls = self.calls + 1
        self.mean = 0.9 * self.mean + 0.1 * x.detach().mean(0)
        return torch.tanh(self.lin(x))


def test_buffers_updated_by_assignment_are_updated_once_per_step():
    states = {}
    for reversible in (True, False):
        torch.manual_seed(0)
        seq = revtree.ReversibleSequence(
            [(Counting(4), Counting(4)) for _ in range(2)], reversible=reversible
        )
        for _ in range(3):
            seq(t(5, 8)).pow(2).sum().backward()
        states[reversible] = seq.state_dict()
    assert states[True]["blocks.1.g.calls"].item() == 3
    for key, value in states[False].items():
        torch.testing.assert_close(states[True][key], value, rtol=0, atol=1e-12, msg=key)


def test_a_new_codec_applies_from_the_next_call():
    blocks = make_blocks([2], 2)
    seq = revtree.ReversibleSequence(blocks, codec=Split(-1))
    x = t(3, 4)
    seq(x)
    seq.codec = Duplicate()
    with pytest.raises(RuntimeError):  # the blocks take 2 channels, Duplicate gives them 4
        seq(x)
    seq.codec = Split(-1)
    assert_trees_close(seq(x), reference(x, blocks, [Split(-1)]))


def test_broadcast_update_is_accepted_as_plain_autograd_accepts_it():
    """f may return an update that broadcasts to its stream (here one value per row)."""

    class RowUpdate(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1, dtype=torch.float64)

        def forward(self, x):
            return torch.tanh(self.lin(x))  # (rows, 1) for a (rows, 2) stream

    torch.manual_seed(0)
    blocks = [(RowUpdate(), RowUpdate()) for _ in range(3)]
    x = t(5, 4)
    grads = {}
    for reversible in (True, False):
        seq = revtree.ReversibleSequence(blocks, reversible=reversible)
        y = seq(x)
        grads[reversible] = torch.autograd.grad(y.pow(2).sum(), [x, *seq.parameters()])
    assert_trees_close(list(grads[True]), list(grads[False]))
    with torch.no_grad():  # and the stack is undone as it was run
        assert_trees_close(seq.inverse(seq(x)), x)


def test_a_mapping_is_matched_by_its_keys():
    """f may return a dict for an OrderedDict half-stream: leaves are matched by key."""

    class DictMixer(nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.net = TreeMixer([2, 2], seed=seed)

        def forward(self, x):
            out = self.net(x)  # an OrderedDict in, a plain dict with the keys reversed out
            return {k: out[k] for k in reversed(list(out))}

    def by_key(x):  # plain autograd, every leaf matched by its key by hand
        x1 = {k: v[..., :2] for k, v in x.items()}
        x2 = {k: v[..., 2:] for k, v in x.items()}
        for f, g in blocks:
            fx = f(OrderedDict((k, x2[k]) for k in x))
            x1 = {k: x1[k] + fx[k] for k in x}
            gy = g(OrderedDict((k, x1[k]) for k in x))
            x2 = {k: x2[k] + gy[k] for k in x}
        return {k: torch.cat((x1[k], x2[k]), -1) for k in x}

    blocks = [(DictMixer(i), DictMixer(10 + i)) for i in range(3)]
    x = OrderedDict(b=t(3, 4), a=t(3, 4, seed=1))
    seq = revtree.ReversibleSequence(blocks)
    grads = {}
    for name, model in (("revtree", seq), ("by key", by_key)):
        y = model(x)
        loss = (y["a"] * 2 + y["b"]).pow(2).sum()
        grads[name] = torch.autograd.grad(loss, [*x.values(), *seq.parameters()])
    assert isinstance(seq(x), OrderedDict) and list(seq(x)) == ["b", "a"]
    assert_trees_close(list(grads["revtree"]), list(grads["by key"]))
    with torch.no_grad():
        assert_trees_close(seq.inverse(seq(x)), x)


@pytest.mark.parametrize(
    "options", [{}, {"memory_budget": 1000}, {"reversible": False}, {"check_drift": 1e-3}]
)
def test_torch_save_of_a_trained_sequence_loads_and_computes_the_same(options, tmp_path):
    """A whole model pickled (``torch.save(model)``) after steps have filled its caches."""
    torch.manual_seed(0)
    blocks = [
        (
            nn.Sequential(
                nn.Linear(4, 4, dtype=torch.float64), nn.BatchNorm1d(4, dtype=torch.float64)
            ),
            nn.Linear(4, 4, dtype=torch.float64),
        )
        for _ in range(3)
    ]
    seq = revtree.ReversibleSequence(blocks, **options)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    for _ in range(2):
        seq(x).sum().backward()
    torch.save(seq, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert_trees_close(loaded(x), seq(x))  # training mode: the batch norms update alike
    loaded(x).sum().backward()
    assert all(p.grad is not None for p in loaded.parameters())
