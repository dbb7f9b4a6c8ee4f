"""The reformer adapter against the real reformer-pytorch 1.4.4, in float64."""

from __future__ import annotations

import pytest
import torch

from revtree.adapters import reformer as adapter

reformer_pytorch = pytest.importorskip("reformer_pytorch")
from reformer_pytorch import ReformerLM  # noqa: E402
from reformer_pytorch.reversible import ReversibleSequence as PackageReversible  # noqa: E402

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

TOL = 1e-9
SEQ = 32


def _config(**overrides):
    config = dict(
        num_tokens=20,
        dim=16,
        depth=3,
        heads=2,
        max_seq_len=SEQ,
        bucket_size=4,
        n_hashes=2,
        causal=True,
        lsh_dropout=0.1,
        ff_dropout=0.1,
        post_attn_dropout=0.1,
        layer_dropout=0.2,
        emb_dim=16,
    )
    config.update(overrides)
    return config


def _models(**overrides):
    torch.manual_seed(0)
    package = ReformerLM(**_config(**overrides)).double()
    with adapter.patch():
        ours = ReformerLM(**_config(**overrides)).double()
    assert isinstance(package.reformer.layers, PackageReversible)
    assert isinstance(ours.reformer.layers, adapter.ReversibleSequence)
    ours.load_state_dict(package.state_dict(), strict=True)
    return package, ours


def _tokens(seed=1):
    return torch.randint(0, 20, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _loss(model, tokens, seed):
    torch.manual_seed(seed)
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens) + logits.pow(2).mean()


def test_parameter_names_match_the_package():
    package, ours = _models()
    assert list(ours.state_dict()) == list(package.state_dict())
    assert any(n.startswith("reformer.layers.blocks.2.f.net.") for n in ours.state_dict())
    assert any(n.startswith("reformer.layers.irrev_blocks.2.g.") for n in ours.state_dict())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outputs_and_gradients_equal_the_package_under_backward(seed):
    package, ours = _models()
    tokens = _tokens(seed)
    results = []
    for model in (package, ours):
        model.train()
        loss = _loss(model, tokens, seed)
        model.zero_grad(set_to_none=True)
        loss.backward()
        results.append(
            (loss.item(), [(n, p.grad) for n, p in model.named_parameters()], torch.get_rng_state())
        )
    (loss_p, grads_p, rng_p), (loss_o, grads_o, rng_o) = results
    assert abs(loss_p - loss_o) < TOL
    nonzero = 0
    for (name, gp), (_, go) in zip(grads_p, grads_o):
        assert (gp is None) == (go is None), name
        if gp is not None:
            torch.testing.assert_close(go, gp, rtol=0, atol=TOL, msg=name)
            nonzero += int(gp.abs().sum() > 0)
    assert nonzero > len(grads_p) // 2
    assert torch.equal(rng_p, rng_o)


def test_autograd_grad_equals_the_plain_path_and_writes_no_grad():
    """Reference: the package's own plain-autograd path (reverse_thres above the length)."""
    package, ours = _models(layer_dropout=0.0)
    plain_package, _ = _models(layer_dropout=0.0, reverse_thres=SEQ + 1)
    plain_package.load_state_dict(package.state_dict())
    tokens = _tokens()
    params = list(plain_package.parameters())
    expected = torch.autograd.grad(_loss(plain_package, tokens, 5), params, allow_unused=True)

    params = list(ours.parameters())
    grads = torch.autograd.grad(_loss(ours, tokens, 5), params, allow_unused=True)
    assert all(p.grad is None for p in params)
    for g, e in zip(grads, expected):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e, rtol=0, atol=TOL)

    # the package's reversible sequence, by contrast, writes .grad and gets them wrong
    params = list(package.parameters())
    wrong = torch.autograd.grad(_loss(package, tokens, 5), params, allow_unused=True)
    assert any(p.grad is not None for p in params)
    assert any(
        (g is None) != (e is None) or (g is not None and not torch.allclose(g, e))
        for g, e in zip(wrong, expected)
    )


def test_below_reverse_thres_runs_plain_autograd():
    _, ours = _models(reverse_thres=SEQ + 1, layer_dropout=0.0)
    ours.eval()
    loss = _loss(ours, _tokens(), 0)
    loss.backward()
    assert ours.reformer.layers.reversible == (False,) * 3


def test_patch_restores_the_package():
    import reformer_pytorch.reformer_pytorch as module

    before = module.ReversibleSequence
    with adapter.patch():
        assert module.ReversibleSequence is adapter.ReversibleSequence
    assert module.ReversibleSequence is before


def test_training_loop_loss_goes_down():
    _, ours = _models(layer_dropout=0.0, lsh_dropout=0.0, ff_dropout=0.0, post_attn_dropout=0.0)
    tokens = _tokens()
    opt = torch.optim.Adam(ours.parameters(), lr=1e-2)
    losses = []
    for step in range(12):
        loss = _loss(ours, tokens, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_lsh_buckets_are_kept_by_the_memo_not_on_the_module(tmp_path):
    """Under patch() the LSH attention hashes once per step and keeps no cache between steps."""
    package, ours = _models(layer_dropout=0.0)
    attentions = [m for m in ours.modules() if type(m).__name__ == "LSHAttention"]
    assert attentions and all(type(m) is adapter.LSHAttention for m in attentions)
    calls = []
    handles = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in attentions]
    hashed = []
    theirs = adapter.LSHAttention.__mro__[1]  # the package's class, whose hashing is counted
    original = theirs.hash_vectors
    theirs.hash_vectors = lambda self, *a, **k: hashed.append(1) or original(self, *a, **k)
    try:
        _loss(ours, _tokens(), seed=3).backward()
    finally:
        theirs.hash_vectors = original
        for handle in handles:
            handle.remove()
    assert len(calls) == 2 * len(attentions)  # run in the forward and in the recomputation
    assert len(hashed) == len(attentions)  # hashed in the forward only
    assert all(not m._cache for m in attentions)  # nothing kept on the module
    path = tmp_path / "model.pt"
    torch.save(ours, path)  # the class pickles by name
    assert type(torch.load(path, weights_only=False).reformer.layers) is adapter.ReversibleSequence
