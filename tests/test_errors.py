"""Bad input: one RevtreeError naming the block, the key path and the shapes, with a hint."""

from __future__ import annotations

import optree
import pytest
import torch
from helpers import TreeMixer, make_blocks, plain, t
from torch import nn

import revtree
from revtree.codecs import Duplicate, Split
from revtree.couplings import Additive, Coupling, Momentum


class Returns(nn.Module):
    """A block function returning what ``fn`` makes of its input."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, **kwargs):
        return self.fn(x, self.w, **kwargs)


def _ok():
    return Returns(lambda x, w, **kwargs: {k: v * w for k, v in x.items()})


def _raises(match, seq, x, **kwargs):
    tensors = [v for v in optree.tree_leaves((x, kwargs)) if isinstance(v, torch.Tensor)]
    before = [(v.clone(), v._version) for v in tensors]
    rng = torch.get_rng_state()
    with pytest.raises(revtree.RevtreeError, match=match):
        seq(x, **kwargs)
    for v, (value, version) in zip(tensors, before):  # nothing of the caller's is changed
        assert torch.equal(v, value) and v._version == version and v.grad is None
    assert torch.equal(torch.get_rng_state(), rng)


def test_f_returns_another_structure():
    bad = Returns(lambda x, w: {"other": x["a"] * w})
    seq = revtree.ReversibleSequence([(_ok(), _ok()), (bad, _ok())])
    _raises(r"block 1: f returned a pytree of structure .*'other'.* Hint", seq, {"a": t(2, 4)})


def test_f_returns_a_subtree_where_a_leaf_belongs():
    bad = Returns(lambda x, w: {"a": (x["a"] * w, x["a"])})
    seq = revtree.ReversibleSequence([(bad, _ok())])
    _raises(r"block 0: f returned a pytree of structure .*\(\*, \*\).* Hint", seq, {"a": t(2, 4)})


def test_g_returns_a_non_tensor_leaf():
    bad = Returns(lambda x, w: {"a": 1.0})
    seq = revtree.ReversibleSequence([(_ok(), bad)])
    _raises(r"block 0: g returned a float at x\['a'\].*shape \(2, 2\)", seq, {"a": t(2, 4)})


def test_f_changes_the_shape():
    bad = Returns(lambda x, w: {"a": x["a"].sum(-1) * w})
    seq = revtree.ReversibleSequence([(bad, _ok())])
    _raises(r"block 0: f returned shape \(3,\).*at x\['a'\].*shape \(3, 2\)", seq, {"a": t(3, 4)})


def test_f_changes_the_dtype():
    bad = Returns(lambda x, w: {"a": (x["a"] * w).double()})
    seq = revtree.ReversibleSequence([(_ok(), _ok()), (bad, _ok())]).float()
    x = {"a": t(3, 4).float().detach().requires_grad_()}
    _raises(r"block 1: f returned shape \(3, 2\) torch.float64.*torch.float32", seq, x)


def test_odd_split_names_the_key_path_and_shape():
    seq = revtree.ReversibleSequence([(_ok(), _ok())])
    _raises(
        r"input leaf x\['b'\] \(shape \(2, 3\) torch.float64\).*odd size 3.*Hint",
        seq,
        {"a": t(2, 4), "b": t(2, 3)},
    )


def test_codec_tree_not_a_prefix():
    seq = revtree.ReversibleSequence([(_ok(), _ok())], codec={"a": Split(-1), "z": Duplicate()})
    _raises(r"(?s)codec tree is not a prefix.*missing key.*'z'.*Hint", seq, {"a": t(2, 4)})


def test_codec_tree_with_a_non_codec():
    seq = revtree.ReversibleSequence([(_ok(), _ok())], codec={"a": "split"})
    _raises(r"codec for input leaf x\['a'\] is 'split'", seq, {"a": t(2, 4)})


def test_non_tensor_leaf_in_the_input():
    seq = revtree.ReversibleSequence([(_ok(), _ok())])
    _raises(r"input leaf x\['n'\] is a int.*keyword", seq, {"a": t(2, 4), "n": 3})
    _raises(r"input leaf x\['n'\] is a str", seq, {"a": t(2, 4), "n": "3"})


def test_integer_leaf_in_the_input():
    seq = revtree.ReversibleSequence([(_ok(), _ok())])
    x = {"a": t(2, 4), "i": torch.zeros(2, 4, dtype=torch.long)}
    _raises(r"x\['i'\] is shape \(2, 4\) torch.int64", seq, x)


def test_block_that_is_not_a_pair():
    with pytest.raises(revtree.RevtreeError, match="block 1 is Linear, not a pair"):
        revtree.ReversibleSequence([(_ok(), _ok()), nn.Linear(2, 2)])
    with pytest.raises(revtree.RevtreeError, match=r"block 0 is a tuple of 2 \(Returns, int\)"):
        revtree.ReversibleSequence([(_ok(), 3)])


def test_bad_route_and_flags():
    with pytest.raises(revtree.RevtreeError, match="route='h'"):
        revtree.ReversibleSequence([(_ok(), _ok())], route="h")({"a": t(2, 4)})
    with pytest.raises(revtree.RevtreeError, match="one bool per block"):
        revtree.ReversibleSequence([(_ok(), _ok())], reversible=[True, False])


def test_parameter_changed_between_forward_and_backward():
    blocks = make_blocks([2], 2)
    seq = revtree.ReversibleSequence(blocks)
    y = seq(t(3, 4))
    with torch.no_grad():
        blocks[0][0].linears[0].weight.mul_(2)
    with pytest.raises(revtree.RevtreeError, match="modified in place between the forward"):
        y.sum().backward()


def test_output_modified_in_place_before_backward():
    seq = revtree.ReversibleSequence([(TreeMixer([2]), TreeMixer([2]))], codec=Duplicate())
    y = seq(t(3, 2))
    y.mul_(2)  # Duplicate's mean is a new tensor: the streams are held apart, intact
    y.sum().backward()
    seq2 = revtree.ReversibleSequence([(TreeMixer([2]), TreeMixer([2]))])
    z = seq2({"tokens": t(3, 4)})
    z["tokens"].add_(1)  # Split's output is held once, for backward: as autograd refuses
    with pytest.raises(
        revtree.RevtreeError, match=r"the output y\['tokens'\] \(shape \(3, 4\).*changed in place"
    ):
        z["tokens"].sum().backward()


def test_block_called_directly():
    with pytest.raises(revtree.RevtreeError, match="run by its ReversibleSequence"):
        revtree.Block(_ok(), _ok())(t(2))


def test_f_modifies_its_input_in_place():
    def inplace(x, w):
        x["a"].mul_(2)
        return {"a": x["a"] * w}

    seq = revtree.ReversibleSequence([(_ok(), _ok()), (_ok(), Returns(inplace))])
    x = {"a": t(2, 4)}
    with pytest.raises(revtree.RevtreeError, match=r"block 1: g modified its input leaf x\['a'\]"):
        seq(x)


def test_first_f_modifying_the_callers_input_in_place_leaves_it_intact():
    def inplace(x, w):
        x["a"].mul_(2)
        return {"a": x["a"] * w}

    seq = revtree.ReversibleSequence([(Returns(inplace), _ok())])
    _raises(r"block 0: f modified its input leaf x\['a'\]", seq, {"a": t(2, 4)})
    with torch.no_grad():
        _raises(r"block 0: f modified its input", seq, {"a": t(2, 4)})


def test_f_returning_another_device():
    def meta(x, w):
        return {"a": torch.zeros(x["a"].shape, device="meta", dtype=x["a"].dtype)}

    seq = revtree.ReversibleSequence([(Returns(meta), _ok())])
    _raises(r"block 0: f returned shape \(2, 2\) torch.float64 on meta", seq, {"a": t(2, 4)})


@pytest.mark.parametrize("coupling", [Additive(), Momentum()], ids=repr)
@pytest.mark.parametrize("needs_grad", [False, True])
def test_f_modifies_a_keyword_tensor_in_place(coupling, needs_grad):
    def inplace(x, w, ctx):
        ctx.mul_(1.5)
        return {"a": x["a"] * w + ctx.sum()}

    seq = revtree.ReversibleSequence([(_ok(), _ok()), (Returns(inplace), _ok())], coupling=coupling)
    ctx = t(3) * 1.0 if needs_grad else torch.ones(3, dtype=torch.float64)
    with pytest.raises(
        revtree.RevtreeError,
        match=r"block 1: f modified the keyword tensor "
        r"kwargs\['ctx'\] \(shape \(3,\) torch.float64\) in place.*Hint",
    ):
        seq({"a": t(2, 4)}, ctx=ctx)


# Momentum stands for every coupling written as a forward and an inverse over pytrees
# (the generic path): the same catalogue of errors holds there.


def test_generic_coupling_f_returns_another_structure():
    bad = Returns(lambda x, w: {"other": x["a"] * w})
    seq = revtree.ReversibleSequence([(_ok(), _ok()), (bad, _ok())], coupling=Momentum())
    _raises(r"block 1: f returned a pytree of structure .*'other'.*Hint", seq, {"a": t(2, 4)})


def test_generic_coupling_g_returns_a_wrong_shape():
    bad = Returns(lambda x, w: {"a": x["a"].sum(-1) * w})
    seq = revtree.ReversibleSequence([(_ok(), bad)], coupling=Momentum())
    _raises(
        r"block 0: g returned shape \(3,\).*at x\['a'\].*shape \(3, 2\).*Hint", seq, {"a": t(3, 4)}
    )


def test_generic_coupling_f_returns_a_float():
    bad = Returns(lambda x, w: {"a": 1.0})
    seq = revtree.ReversibleSequence([(bad, _ok())], coupling=Momentum())
    _raises(r"block 0: f returned a float at x\['a'\]", seq, {"a": t(2, 4)})


def test_generic_coupling_f_modifies_its_input_in_place():
    def inplace(x, w):
        x["a"].mul_(2)
        return {"a": x["a"] * w}

    seq = revtree.ReversibleSequence(
        [(_ok(), _ok()), (Returns(inplace), _ok())], coupling=Momentum()
    )
    _raises(r"block 1: f modified its input leaf x\['a'\]", seq, {"a": t(2, 4)})


def _raises_in_inverse(match, seq, y):
    before = [(v.clone(), v._version) for v in optree.tree_leaves(y)]
    with pytest.raises(revtree.RevtreeError, match=match):
        seq.inverse(y)
    for v, (value, version) in zip(optree.tree_leaves(y), before):
        assert torch.equal(v, value) and v._version == version


@pytest.mark.parametrize("coupling", [Additive(), Momentum()], ids=repr)
def test_inverse_names_the_block_whose_f_returns_another_structure(coupling):
    seq = revtree.ReversibleSequence([(_ok(), _ok()), (_ok(), _ok())], coupling=coupling)
    y = seq({"a": t(2, 4)})
    seq.blocks[1].f = Returns(lambda x, w: {"other": x["a"] * w})
    _raises_in_inverse(r"block 1: f returned a pytree of structure .*'other'.*Hint", seq, y)


@pytest.mark.parametrize("coupling", [Additive(), Momentum()], ids=repr)
def test_inverse_names_the_block_whose_g_modifies_its_input_in_place(coupling):
    def inplace(x, w):
        x["a"].mul_(2)
        return {"a": x["a"] * w}

    seq = revtree.ReversibleSequence([(_ok(), _ok()), (_ok(), _ok())], coupling=coupling)
    y = seq({"a": t(2, 4)})
    seq.blocks[0].g = Returns(inplace)
    _raises_in_inverse(r"block 0: g modified its input leaf x\['a'\]", seq, y)


@pytest.mark.parametrize("coupling", [Additive(), Momentum()], ids=repr)
def test_inverse_passes_an_error_raised_inside_f_as_it_is(coupling):
    def fails(x, w):
        raise RuntimeError("f's own failure")

    seq = revtree.ReversibleSequence([(_ok(), _ok())], coupling=coupling)
    y = seq({"a": t(2, 4)})
    seq.blocks[0].f = Returns(fails)
    with pytest.raises(RuntimeError, match=r"^f's own failure(\n|$)") as caught:
        seq.inverse(y)
    assert not isinstance(caught.value, revtree.RevtreeError)


class Broken(Coupling):
    """A user's coupling whose forward fails on what f returns."""

    def forward(self, f, g, x1, x2):
        return optree.tree_map(torch.add, x1, f(x2)), x2

    def inverse(self, f, g, y1, y2):
        return optree.tree_map(torch.sub, y1, f(y2)), y2


def test_user_coupling_error_names_the_block_and_coupling():
    bad = Returns(lambda x, w: [x["a"] * w])
    seq = revtree.ReversibleSequence([(_ok(), _ok()), (bad, _ok())], coupling=Broken())
    _raises(r"block 1: .*Broken.*\.forward raised ValueError.*Hint", seq, {"a": t(2, 4)})


@pytest.mark.parametrize("blocks", [[2, 0], [0, 0], [3]])
def test_run_takes_increasing_block_indices(blocks):
    seq = revtree.ReversibleSequence([(_ok(), _ok()) for _ in range(3)])
    with pytest.raises(revtree.RevtreeError, match="must be increasing indices below 3"):
        seq.run({"a": t(2, 4)}, blocks=blocks)


def test_nested_codec_tree_mismatch_names_the_key_path_not_values():
    seq = revtree.ReversibleSequence([], codec={"a": {"b": Split(-1)}})
    x = {"a": torch.full((2, 4), 12345.0, dtype=torch.float64)}
    with pytest.raises(revtree.RevtreeError, match=r"(?s)key path.*codec\['a'\].*Tensor") as info:
        seq(x)
    assert "12345" not in str(info.value)


# ------------------------------------------------------------- transforms and seams


def _mlp_seq(**kwargs):
    torch.manual_seed(0)
    pairs = [
        (nn.Linear(2, 2, dtype=torch.float64), nn.Linear(2, 2, dtype=torch.float64))
        for _ in range(2)
    ]
    return revtree.ReversibleSequence(pairs, **kwargs), pairs


@pytest.mark.parametrize("how", ["no_grad", "reversible=False"])
def test_vmap_over_a_sequence_works_without_a_reversible_backward(how):
    seq, pairs = _mlp_seq(reversible=how != "reversible=False")
    xs = t(5, 3, 4)
    if how == "no_grad":
        with torch.no_grad():
            got = torch.vmap(seq)(xs)
    else:
        got = torch.vmap(seq)(xs)
    expected = torch.stack([plain(pairs, x) for x in xs])
    assert torch.allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "vmap"])
def test_torch_func_transforms_of_a_reversible_stack_say_to_use_reversible_false(transform):
    seq, _ = _mlp_seq()
    x = t(3, 4)
    calls = {
        "grad": lambda: torch.func.grad(lambda v: seq(v).sum())(x),
        "vjp": lambda: torch.func.vjp(seq, x),
        "jacrev": lambda: torch.func.jacrev(seq)(x),
        "vmap": lambda: torch.vmap(seq)(t(2, 3, 4)),
    }
    with pytest.raises(revtree.RevtreeError, match=r"torch\.func transform.*reversible=False"):
        calls[transform]()


def test_torch_func_grad_with_reversible_false_equals_plain_autograd():
    seq, pairs = _mlp_seq(reversible=False)
    x = t(3, 4)
    got = torch.func.grad(lambda v: seq(v).square().sum())(x)
    expected = torch.autograd.grad(plain(pairs, x).square().sum(), x)[0]
    assert torch.allclose(got, expected, atol=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_ad_through_a_reversible_stack_is_a_clear_error():
    import torch.autograd.forward_ad as fwad

    seq, pairs = _mlp_seq()
    x, tangent = t(3, 4), t(3, 4, seed=1)
    with fwad.dual_level(), pytest.raises(revtree.RevtreeError, match="reversible=False"):
        seq(fwad.make_dual(x, tangent))
    with fwad.dual_level(), torch.no_grad():  # no backward to run: it simply works
        out = fwad.unpack_dual(seq(fwad.make_dual(x, tangent))).tangent
        expected = fwad.unpack_dual(plain(pairs, fwad.make_dual(x, tangent))).tangent
    assert torch.allclose(out, expected, atol=1e-12)


def test_a_reentrant_checkpoint_inside_f_says_use_reentrant_false():
    from torch.utils.checkpoint import checkpoint

    lin = nn.Linear(2, 2, dtype=torch.float64)
    seq = revtree.ReversibleSequence(
        [(lambda x: checkpoint(lin, x, use_reentrant=True), nn.Linear(2, 2, dtype=torch.float64))]
    )
    y = seq(t(3, 4))
    with pytest.raises(revtree.RevtreeError, match=r"block 0: f calls .*use_reentrant=False"):
        y.sum().backward()


def test_a_keyword_tensor_changed_in_place_after_the_forward_names_the_keyword():
    class Ctx(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2, dtype=torch.float64)

        def forward(self, x, ctx):
            return self.lin(x) * ctx["scale"]

    seq = revtree.ReversibleSequence([(Ctx(), nn.Linear(2, 2, dtype=torch.float64))])
    ctx = {"scale": t(3, 1)}
    y = seq(t(3, 4), ctx=ctx)
    with torch.no_grad():
        ctx["scale"].mul_(2)
    with pytest.raises(
        revtree.RevtreeError, match=r"keyword tensor kwargs\['ctx'\]\['scale'\].*changed in place"
    ):
        y.sum().backward()


def test_register_hook_on_an_intermediate_inside_f_says_why_it_fails():
    class Hooked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2, dtype=torch.float64)

        def forward(self, x):
            h = self.lin(x)
            h.register_hook(lambda g: g)
            return h

    seq = revtree.ReversibleSequence([(Hooked(), nn.Linear(2, 2, dtype=torch.float64))])
    seq(t(3, 4))  # the first call runs with autograd on (it looks for what f reads)
    with pytest.raises(RuntimeError) as raised:
        seq(t(3, 4))
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert "runs under torch.no_grad()" in notes and "if h.requires_grad" in notes
