"""What the engine learns about a block is kept by identity: changes between steps take effect.

Each case once gave a wrong gradient without a word: the engine kept what it had learned
by block position. Every reference is the plain coupling written out with ordinary
autograd on the same modules, in float64.
"""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from helpers import assert_trees_close, grads, plain
from helpers import t as x_
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, weight_norm

import revtree

D = torch.float64
MODES = ["backward", "grad"]


def lin(width=3, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(width, width, dtype=D)


def weights(y):
    return (y * torch.linspace(-1, 1, y.shape[-1], dtype=D)).sum()


class Reads(nn.Module):
    """Reads another module's weight through a plain attribute (tied by reference)."""

    def __init__(self, other: nn.Linear) -> None:
        super().__init__()
        self.own = lin(seed=5)
        self.__dict__["other"] = other  # not registered: not a submodule of this one

    def forward(self, x):
        return torch.tanh(self.own(x) + x @ self.other.weight.T)


def _tied(kind: str, reader_first: bool):
    """Blocks where one block's function reads another block's parameter by reference."""
    owner = lin(seed=1)
    if kind == "attribute":
        reader: nn.Module = Reads(owner)
    else:
        weight = owner.weight

        def reader(x):
            return torch.tanh(x @ weight.T)

    pairs = [(owner, lin(seed=2)), (reader, lin(seed=3))]
    return pairs[::-1] if reader_first else pairs, owner


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reader_first", [False, True])
@pytest.mark.parametrize("kind", ["attribute", "closure"])
def test_a_parameter_read_by_another_block_by_reference_gets_both_shares(kind, reader_first, mode):
    blocks, owner = _tied(kind, reader_first)
    seq = revtree.ReversibleSequence(blocks)
    x = x_(4, 6)
    sources = [x, owner.weight, *seq.parameters()]
    got = grads(weights(seq(x)), sources, mode)
    ref_blocks, ref_owner = _tied(kind, reader_first)  # the same modules, built again
    ref_seq = revtree.ReversibleSequence(ref_blocks)
    expected = grads(
        weights(plain(ref_blocks, x)), [x, ref_owner.weight, *ref_seq.parameters()], mode
    )
    assert_trees_close(got, expected)
    got = grads(weights(seq(x)), sources, mode)  # the second step: the same
    assert_trees_close(got, expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", [orthogonal, weight_norm], ids=["orthogonal", "weight_norm"])
def test_a_parametrized_module_under_parametrize_cached(make, mode):
    """One parametrized module shared by all blocks, forward and backward in cached()."""
    shared = make(lin(seed=1))
    blocks = [(shared, lin(seed=2 + i)) for i in range(3)]
    seq = revtree.ReversibleSequence(blocks)
    x = x_(4, 6)
    originals = [p for name, p in shared.named_parameters() if "original" in name]
    sources = [x, *originals, *seq.parameters()]
    with parametrize.cached():
        got = grads(weights(seq(x)), sources, mode)
    with parametrize.cached():
        expected = grads(weights(plain(blocks, x)), sources, mode)
    assert all(g is not None for g in got[1 : 1 + len(originals)])
    assert_trees_close(got, expected)


@pytest.mark.parametrize("mode", MODES)
def test_a_function_replaced_by_one_closing_over_a_tensor_that_needs_a_gradient(mode):
    blocks = [(lin(seed=1), lin(seed=2)), (lin(seed=3), lin(seed=4))]
    seq = revtree.ReversibleSequence(blocks)
    x = x_(4, 6)
    weights(seq(x)).backward()  # learned: block 0's f reads its parameters only
    scale = torch.full((3,), 0.5, dtype=D, requires_grad=True)
    seq.blocks[0].f = revtree.Fn(lambda t: torch.tanh(t * scale))
    got = grads(weights(seq(x)), [x, scale], mode)
    ref = [(lambda t: torch.tanh(t * scale), blocks[0][1]), blocks[1]]
    expected = grads(weights(plain(ref, x)), [x, scale], mode)
    assert got[1] is not None
    assert_trees_close(got, expected)


@pytest.mark.parametrize("mode", MODES)
def test_a_submodule_added_between_steps_is_walked_again(mode):
    f = nn.Sequential(lin(seed=1), nn.Tanh())
    blocks = [(f, lin(seed=2))]
    seq = revtree.ReversibleSequence(blocks)
    x = x_(4, 6)
    weights(seq(x)).backward()
    f.append(lin(seed=3))  # a new parameter the old walk does not know
    extra = list(f[2].parameters())
    got = grads(weights(seq(x)), [x, *extra], mode)
    expected = grads(weights(plain(blocks, x)), [x, *extra], mode)
    assert all(g is not None for g in got)
    assert_trees_close(got, expected)


@pytest.mark.parametrize("mode", MODES)
def test_a_parametrization_registered_between_steps(mode):
    f = lin(seed=1)
    blocks = [(f, lin(seed=2))]
    seq = revtree.ReversibleSequence(blocks)
    x = x_(4, 6)
    weights(seq(x)).backward()
    orthogonal(f)  # weight becomes parametrizations.weight.original
    original = f.parametrizations.weight.original
    got = grads(weights(seq(x)), [x, original], mode)
    expected = grads(weights(plain(blocks, x)), [x, original], mode)
    assert got[1] is not None
    assert_trees_close(got, expected)


@pytest.mark.parametrize("mode", MODES)
def test_a_tensor_created_inside_f_with_requires_grad_is_accepted(mode):
    """An auxiliary loss started as a fresh leaf (routing-transformer) is plain autograd's."""

    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin(seed=1)

        def forward(self, x):
            total = torch.tensor(0.0, dtype=D, requires_grad=True)  # a fresh leaf
            total = total + self.lin(x).square().mean()
            return torch.tanh(self.lin(x)) * (1 + 0.0 * total)

    blocks = [(Aux(), lin(seed=2)), (Aux(), lin(seed=3))]
    seq = revtree.ReversibleSequence(blocks)
    x = x_(4, 6)
    params = list(seq.parameters())
    for _ in range(2):
        got = grads(weights(seq(x)), [x, *params], mode)
        assert_trees_close(got, grads(weights(plain(blocks, x)), [x, *params], mode))


def test_a_keyword_tensor_copy_lives_no_longer_than_the_forward():
    from revtree._saved import held_after_forward

    class UsesMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin(seed=1)

        def forward(self, x, mask):
            return torch.tanh(self.lin(x)) * mask[: x.shape[0], :1]

    mask = torch.ones(1024, 1024, dtype=torch.float32)  # 4 MB, needs no gradient
    seq = revtree.ReversibleSequence([(UsesMask(), lin(seed=2)) for _ in range(3)])
    x = x_(4, 6)
    seq(x, mask=mask)
    held, y = held_after_forward(lambda: seq(x, mask=mask))
    assert held == x.numel() * x.element_size()  # the output, not the mask's copy
    y.sum().backward()


# ------------------------------------------------------------------- compiled engine


def _dropout_mlp(p, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 3, dtype=D), nn.Tanh(), nn.Dropout(p))


def _compiled_step(seq, blocks, x, seed):
    torch.manual_seed(seed)
    got = torch.autograd.grad(weights(seq(x)), [x, *seq.parameters()])
    torch.manual_seed(seed)
    expected = torch.autograd.grad(weights(plain(blocks, x)), [x, *seq.parameters()])
    assert_trees_close(list(got), list(expected))


@pytest.mark.parametrize("compile", [True, 2])
def test_compiled_dropout_switched_on_after_the_block_was_trusted(compile):
    """``compile=2``: the two blocks run as one graph until block 0 draws."""
    blocks = [(_dropout_mlp(0.0, i), _dropout_mlp(0.0, 10 + i)) for i in range(2)]
    seq = revtree.ReversibleSequence(blocks, compile=compile)
    x = x_(4, 6)
    for step in range(3):  # eager, then compiled and trusted
        _compiled_step(seq, blocks, x, step)
    assert seq._compiled_engine.ran == {0, 1}
    blocks[0][0][2].p = 0.3  # dropout on, in block 0's f
    with pytest.warns(revtree.RevtreeWarning, match="block 0 runs on the eager engine.*draws"):
        _compiled_step(seq, blocks, x, 7)
    _compiled_step(seq, blocks, x, 8)
    assert seq._compiled_engine.ran == {1}


def test_compiled_function_replaced_after_the_block_was_compiled():
    blocks = [(_dropout_mlp(0.0, i), _dropout_mlp(0.0, 10 + i)) for i in range(2)]
    seq = revtree.ReversibleSequence(blocks, compile=True)
    x = x_(4, 6)
    for step in range(3):
        _compiled_step(seq, blocks, x, step)
    new = _dropout_mlp(0.3, 20)  # dropout injected later
    seq.blocks[0].f = new
    blocks[0] = (new, blocks[0][1])
    with pytest.warns(revtree.RevtreeWarning, match="block 0 runs on the eager engine.*draws"):
        for step in range(3):
            _compiled_step(seq, blocks, x, 30 + step)
    assert seq._compiled_engine.ran == {1}


# ---------------------------------------------------------------------------- threads


def test_two_threads_each_training_a_sequence_with_dropout_replay_their_own_masks():
    """Each thread's recomputation draws the masks its forward drew (the drift check says)."""
    errors: list[BaseException] = []
    models = {}
    for seed in (1, 2):  # built first: building draws from the generator too
        blocks = [(_dropout_mlp(0.5, seed + i), _dropout_mlp(0.5, seed + 9 + i)) for i in range(4)]
        models[seed] = revtree.ReversibleSequence(blocks, check_drift=1e-9, on_drift="raise")

    def train(seed):
        try:
            seq = models[seed]
            x = x_(64, 6, seed=seed)
            for _ in range(40):
                weights(seq(x)).backward()
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=train, args=(seed,)) for seed in (1, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors


def test_a_model_copy_learns_again():
    blocks = [(lin(seed=1), lin(seed=2))]
    seq = revtree.ReversibleSequence(blocks)
    x = x_(4, 6)
    weights(seq(x)).backward()
    twin = copy.deepcopy(seq)
    assert not twin._learned.walks  # copied empty
    got = torch.autograd.grad(weights(twin(x)), [x, *twin.parameters()])
    twin_blocks = [(b.f, b.g) for b in twin.blocks]
    expected = torch.autograd.grad(weights(plain(twin_blocks, x)), [x, *twin.parameters()])
    assert_trees_close(list(got), list(expected))


# --------------------------------------------------------- between forward and backward


def test_an_auxiliary_loss_kept_on_a_module_is_named_and_side_outputs_carry_it():
    """A load-balancing loss stored as ``self.aux_loss`` would get no gradient: warned, with
    the fix (a side output), which is exact."""

    class MoE(nn.Module):
        def __init__(self, keep):
            super().__init__()
            self.router, self.expert, self.keep = lin(seed=1), lin(seed=2), keep

        def forward(self, x):
            probs = self.router(x).softmax(-1)
            aux = (probs.mean(0) ** 2).sum()
            out = torch.tanh(self.expert(x)) * probs
            if self.keep:
                self.aux_loss = aux
                return out
            return out, aux

    seq = revtree.ReversibleSequence([(MoE(keep=True), lin(seed=3))])
    with pytest.warns(revtree.RevtreeWarning, match=r"block 0: f keeps a tensor .* side output"):
        seq(x_(4, 6))
    blocks = [revtree.Block(MoE(keep=False), lin(seed=3), side=(True, False)) for _ in range(2)]
    seq = revtree.ReversibleSequence(blocks)
    x = x_(4, 6)
    y, aux = seq(x)
    params = list(seq.parameters())
    got = torch.autograd.grad(weights(y) + 10 * aux, [x, *params])
    x1, x2 = x.chunk(2, -1)
    total = 0
    for block in blocks:
        u, a = block.f(x2)
        x1 = x1 + u
        x2 = x2 + block.g(x1)
        total = total + a
    expected = torch.autograd.grad(weights(torch.cat((x1, x2), -1)) + 10 * total, [x, *params])
    assert_trees_close(list(got), list(expected))


def test_a_forward_hook_capturing_activations_is_named():
    f = nn.Sequential(lin(seed=1), nn.Tanh())
    kept = []
    f[0].register_forward_hook(lambda m, args, out: kept.append(out))
    seq = revtree.ReversibleSequence([(f, lin(seed=2))])
    with pytest.warns(revtree.RevtreeWarning, match="in a hook's capture"):
        seq(x_(4, 6))


@pytest.mark.parametrize("mode", MODES)
def test_a_transformer_encoder_in_eval_with_a_padding_mask(mode):
    """torch's attention fast path (eval, no autograd) is not taken by the forward either."""

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True).double()

        def forward(self, x, pad=None):
            return self.enc(x, src_key_padding_mask=pad)

    torch.manual_seed(0)
    blocks = [(Encoder(), Encoder()) for _ in range(2)]
    seq = revtree.ReversibleSequence(blocks, route="both").eval()
    pad = torch.tensor([[False, False, True, True], [False, False, False, True]])
    x = x_(2, 4, 16)
    params = list(seq.parameters())
    for _ in range(2):
        got = grads(weights(seq(x, pad=pad)), [x, *params], mode)
        x1, x2 = x.chunk(2, -1)
        for f, g in blocks:
            x1 = x1 + f(x2, pad=pad)
            x2 = x2 + g(x1, pad=pad)
        expected = grads(weights(torch.cat((x1, x2), -1)), [x, *params], mode)
        assert_trees_close(got, expected)


@pytest.mark.parametrize("compile", [True, 2])
def test_compiled_hooks_registered_after_the_block_was_compiled(compile):
    blocks = [(_dropout_mlp(0.0, i), _dropout_mlp(0.0, 10 + i)) for i in range(2)]
    seq = revtree.ReversibleSequence(blocks, compile=compile)
    x = x_(4, 6)
    for step in range(3):
        _compiled_step(seq, blocks, x, step)
    blocks[1][0].register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(revtree.RevtreeWarning, match="block 1 runs on the eager engine.*hooks"):
        _compiled_step(seq, blocks, x, 5)
    assert seq._compiled_engine.ran == {0}


def test_a_submodule_replaced_between_forward_and_backward_is_an_error():
    f = nn.Sequential(lin(seed=1), nn.Tanh(), lin(seed=2))
    seq = revtree.ReversibleSequence([(f, lin(seed=3))])
    y = seq(x_(4, 6))
    f[2] = lin(seed=4)
    with pytest.raises(revtree.RevtreeError, match=r"block 0: f changed between the forward and"):
        y.sum().backward()


def test_a_forward_hook_removed_between_forward_and_backward_is_an_error():
    f = lin(seed=1)
    seq = revtree.ReversibleSequence([(f, lin(seed=2))])
    handle = f.register_forward_hook(lambda m, args, out: out * 2)
    y = seq(x_(4, 6))
    handle.remove()
    with pytest.raises(revtree.RevtreeError, match=r"hooks of its modules were added or removed"):
        y.sum().backward()


@pytest.mark.parametrize("mode", MODES)
def test_a_parameter_frozen_between_forward_and_backward_gets_none(mode):
    blocks = [(lin(seed=1), lin(seed=2)), (lin(seed=3), lin(seed=4))]
    seq = revtree.ReversibleSequence(blocks)
    x = x_(4, 6)
    y = seq(x)
    frozen = blocks[1][0].weight
    frozen.requires_grad_(False)
    others = [p for p in seq.parameters() if p.requires_grad]
    got = grads(weights(y), [x, *others], mode)
    frozen.requires_grad_(True)
    y_ref = plain(blocks, x)
    frozen.requires_grad_(False)
    expected = grads(weights(y_ref), [x, *others], mode)
    assert_trees_close(got, expected)
    assert frozen.grad is None


def test_a_model_converted_between_forward_and_backward_is_an_error():
    seq = revtree.ReversibleSequence([(lin(seed=1), lin(seed=2))])
    y = seq(x_(4, 6))
    seq.float()
    with pytest.raises(revtree.RevtreeError, match=r"converted from torch.float64 on cpu to"):
        y.sum().backward()


def test_blocks_appended_between_steps_run_as_the_others():
    seq = revtree.ReversibleSequence([(lin(seed=1), lin(seed=2))])
    x = x_(4, 6)
    weights(seq(x)).backward()
    seq.blocks.append(revtree.Block(lin(seed=3), lin(seed=4)))
    blocks = [(b.f, b.g) for b in seq.blocks]
    got = torch.autograd.grad(weights(seq(x)), [x, *seq.parameters()])
    expected = torch.autograd.grad(weights(plain(blocks, x)), [x, *seq.parameters()])
    assert_trees_close(list(got), list(expected))
    mixed = revtree.ReversibleSequence([(lin(seed=1), lin(seed=2))], reversible=[False])
    mixed.blocks.append(revtree.Block(lin(seed=3), lin(seed=4)))
    with pytest.raises(revtree.RevtreeError, match=r"reversible has 1 flags for 2 blocks"):
        mixed(x)


def test_forward_hooks_on_a_block_say_where_to_put_them():
    seq = revtree.ReversibleSequence([(lin(seed=1), lin(seed=2))])
    seq.blocks[0].register_forward_hook(lambda m, args, out: None)
    with pytest.raises(revtree.RevtreeError, match=r"block 0 has forward hooks of its own"):
        seq(x_(4, 6))
