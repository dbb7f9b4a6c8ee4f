"""revtree.adapters.transformers against plain autograd over the package's own Reformer layers.

The reference is written here, independently of revtree: the package's layers called in a
plain loop on its two streams (``x1 = x1 + attention(x2)``, ``x2 = x2 + feed_forward(x1)``),
with the same weights, the same random stream and no reseeding. The package's own reversible
path is not the reference: with dropout and LSH attention its gradients are wrong.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from helpers import assert_trees_close

pytest.importorskip("transformers")

import transformers  # noqa: E402
from transformers import ReformerConfig  # noqa: E402
from transformers.models.reformer import modeling_reformer as hf  # noqa: E402

from revtree import RevtreeError  # noqa: E402
from revtree._saved import held_after_forward  # noqa: E402
from revtree.adapters import transformers as adapter  # noqa: E402

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

D = torch.float64
LENGTH = 32


def config(layers=("lsh", "local"), dropout=0.2, decoder=True, **changes) -> ReformerConfig:
    settings = dict(
        vocab_size=32,
        hidden_size=16,
        num_attention_heads=2,
        attention_head_size=8,
        feed_forward_size=32,
        attn_layers=list(layers),
        axial_pos_embds=False,
        max_position_embeddings=64,
        lsh_attn_chunk_length=8,
        local_attn_chunk_length=8,
        num_buckets=4,
        num_hashes=2,
        is_decoder=decoder,
        hidden_dropout_prob=dropout,
        lsh_attention_probs_dropout_prob=dropout,
        local_attention_probs_dropout_prob=dropout,
        hash_seed=None,
        num_labels=2,
        pad_token_id=0,
    )
    settings.update(changes)
    return ReformerConfig(**settings)


def plain_encoder_forward(
    self,
    hidden_states,
    attention_mask=None,
    num_hashes=None,
    past_buckets_states=None,
    use_cache=False,
    orig_sequence_length=None,
    output_hidden_states=False,
    output_attentions=False,
):
    """The package's encoder as plain autograd: its layers in a loop on its two streams."""
    x1 = x2 = hidden_states
    all_hidden, all_attentions = [], []
    for layer in self.layers:
        if output_hidden_states:
            all_hidden.append(x2)
        out = layer.attention(
            hidden_states=x2,
            attention_mask=attention_mask,
            num_hashes=num_hashes,
            output_attentions=output_attentions,
        )
        x1 = x1 + out.hidden_states
        if output_attentions:
            all_attentions.append(out.attention_probs)
        x2 = x2 + layer.feed_forward(x1)
    if output_hidden_states:
        all_hidden.append(x2)
    out = self.layer_norm(torch.cat([x1, x2], dim=-1))
    out = torch.nn.functional.dropout(out, p=self.dropout, training=self.training)
    return hf.ReformerEncoderOutput(out, all_hidden, all_attentions, None)


def pair(cls=hf.ReformerModelWithLMHead, **changes):
    """The package's model run as plain autograd, and the same model converted."""
    torch.manual_seed(0)
    plain = cls(config(**changes)).to(D)
    ours = adapter.convert(copy.deepcopy(plain))
    encoder = next(m for m in plain.modules() if isinstance(m, hf.ReformerEncoder))
    encoder.forward = types.MethodType(plain_encoder_forward, encoder)
    return plain, ours


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 32, (batch, LENGTH), generator=g)
    mask = torch.ones(batch, LENGTH, dtype=torch.long)
    mask[0, -5:] = 0  # padding in the first sequence
    return ids, mask


def loss_of(out) -> torch.Tensor:
    """A float64 loss on the first output (the package's own losses compute in float32)."""
    first = out[0] if isinstance(out, tuple) else next(iter(out.values()))
    weights = torch.linspace(-1, 1, first.shape[-1], dtype=D)
    return (first * weights).sum() + first.square().mean()


def step(model, ids, mask, seed, **kwargs):
    torch.manual_seed(seed)
    out = model(ids, attention_mask=mask, **kwargs)
    loss = loss_of(out)
    grads = torch.autograd.grad(
        loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True
    )
    return out, loss, grads, torch.get_rng_state()


HEADS = [
    hf.ReformerModel,
    hf.ReformerModelWithLMHead,
    hf.ReformerForMaskedLM,
    hf.ReformerForSequenceClassification,
    hf.ReformerForQuestionAnswering,
]
LAYERS = {"lsh": ("lsh", "lsh"), "local": ("local", "local"), "mixed": ("lsh", "local", "lsh")}


@pytest.mark.parametrize("layers", list(LAYERS), ids=list(LAYERS))
@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_gradients_equal_plain_autograd_over_two_steps(cls, layers):
    decoder = cls is hf.ReformerModelWithLMHead
    plain, ours = pair(cls, layers=LAYERS[layers], decoder=decoder)
    ids, mask = inputs()
    for seed in (3, 4):  # two steps, the weights updated between them
        expected = step(plain, ids, mask, seed)
        got = step(ours, ids, mask, seed)
        assert_trees_close(got[1], expected[1], tol=1e-9)
        assert_trees_close(list(got[2]), list(expected[2]), tol=1e-9)
        # the global random stream is where plain autograd leaves it: nothing reseeded
        assert torch.equal(got[3], expected[3])
        with torch.no_grad():
            for model, grads in ((plain, expected[2]), (ours, got[2])):
                trained = [p for p in model.parameters() if p.requires_grad]
                for p, g in zip(trained, grads):
                    if g is not None:
                        p -= 0.1 * g
    assert all(p.grad is None for p in ours.parameters())  # autograd.grad writes no .grad


def test_the_packages_own_path_is_what_is_wrong():
    """The package's reversible function, with dropout and LSH, is off; ours is not."""
    plain, ours = pair(layers=("lsh", "lsh"))
    package = copy.deepcopy(plain)
    del package.reformer.encoder.forward  # the package's own reversible function again
    ids, mask = inputs()
    grads = []
    for model in (plain, package, ours):  # loss.backward(): the package writes .grad inside
        torch.manual_seed(5)
        loss_of(model(ids, attention_mask=mask)).backward()
        grads.append([p.grad for p in model.parameters()])
    expected, theirs, got = grads
    worst = max(
        ((a - b).norm() / b.norm()).item()
        for a, b in zip(theirs, expected)
        if b is not None and b.norm() > 0
    )
    assert worst > 1e-2  # its seeds and cached buckets shift the dropout masks
    assert_trees_close(got, expected, tol=1e-9)


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no mask"])
def test_hidden_states_and_attentions_as_the_package_returns_them_with_gradients(masked):
    """Without a mask every keyword of the encoder's call is a plain value: they reach the
    recomputation too (once they did not, and the attentions lost their gradients)."""
    plain, ours = pair(hf.ReformerModel, layers=("lsh", "local", "lsh"))
    ids, mask = inputs()
    flags = dict(output_hidden_states=True, output_attentions=True)
    if masked:
        flags["attention_mask"] = mask
    results = []
    for model in (plain, ours):
        torch.manual_seed(7)
        out = model(ids, **flags)
        loss = loss_of(out) + out.hidden_states[1].sum() + out.attentions[2].square().sum()
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        results.append((out, grads))
    (expected, expected_grads), (got, got_grads) = results
    assert len(got.hidden_states) == 4 and len(got.attentions) == 3
    assert_trees_close(list(got.hidden_states), list(expected.hidden_states), tol=1e-12)
    assert_trees_close(list(got.attentions), list(expected.attentions), tol=1e-12)
    assert_trees_close(list(got_grads), list(expected_grads), tol=1e-9)


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no mask"])
def test_num_hashes_given_at_the_call(masked):
    """``num_hashes`` at the call, not the config's: the recomputation hashes as the forward."""
    plain, ours = pair(layers=("lsh", "lsh"), num_hashes=1)
    ids, mask = inputs()
    kwargs = {"attention_mask": mask} if masked else {}
    results = []
    for model in (plain, ours):
        torch.manual_seed(9)
        loss = loss_of(model(ids, num_hashes=3, **kwargs))
        results.append(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
    assert_trees_close(list(results[1]), list(results[0]), tol=1e-9)


def test_backward_in_eval_mode():
    plain, ours = pair(layers=("lsh", "local"))
    plain.eval()
    ours.eval()
    ids, mask = inputs()
    expected, got = step(plain, ids, mask, 2), step(ours, ids, mask, 2)
    assert_trees_close(list(got[2]), list(expected[2]), tol=1e-9)


def test_loss_backward_with_the_packages_labels():
    plain, ours = pair(layers=("lsh", "local"))
    ids, mask = inputs()
    for model in (plain, ours):
        torch.manual_seed(9)
        model(ids, attention_mask=mask, labels=ids).loss.backward()
    assert_trees_close(
        [p.grad for p in ours.parameters()], [p.grad for p in plain.parameters()], tol=1e-6
    )  # the package's loss runs in float32 (its ForCausalLMLoss casts the logits)


def test_memory_kept_for_backward_is_flat_in_depth():
    """Each layer adds its bookkeeping (buckets, a random state), not its activations."""
    ids = torch.randint(1, 32, (2, 64))
    wide = dict(hidden_size=64, attention_head_size=32, feed_forward_size=128)
    held = {}
    for depth in (2, 8):
        _, ours = pair(hf.ReformerModel, layers=("lsh", "local") * (depth // 2), **wide)
        embeddings = ours.embeddings(ids).detach().requires_grad_()
        held[depth], out = held_after_forward(
            lambda e=ours.encoder, x=embeddings: e(x).hidden_states, [embeddings]
        )
        out.sum().backward()
    one_stream = embeddings.nelement() * embeddings.element_size()
    assert held[2] >= 2 * one_stream  # the output
    assert held[8] - held[2] < 6 * one_stream / 4  # 6 layers more: under a quarter each


def test_a_cache_filled_as_the_package_fills_it():
    torch.manual_seed(0)
    package = hf.ReformerModelWithLMHead(config(dropout=0.0, hash_seed=5)).to(D)
    ours = adapter.convert(copy.deepcopy(package))
    ids, mask = inputs()
    caches = []
    for model in (package.eval(), ours.eval()):  # the package reseeds in training
        out = model(ids, attention_mask=mask, use_cache=True)
        caches.append(out.past_buckets_states)
    loss_of(out).backward()  # ours trains with the cache filled
    theirs, mine = caches
    assert len(mine) == len(theirs) == 2
    assert not any(t.requires_grad for t in mine.states_cache)
    assert_trees_close(list(mine.states_cache), list(theirs.states_cache), tol=1e-12)
    assert_trees_close(list(mine.buckets_cache), list(theirs.buckets_cache), tol=0)


def test_generation_with_the_cache_runs_the_package_math():
    plain, ours = pair(layers=("lsh", "local"), dropout=0.0)
    plain.eval()
    ours.eval()
    ids = inputs()[0][:, :8]
    torch.manual_seed(0)
    expected = plain.generate(ids, max_new_tokens=6, do_sample=False, num_hashes=1)
    torch.manual_seed(0)
    got = ours.generate(ids, max_new_tokens=6, do_sample=False, num_hashes=1)
    assert torch.equal(got, expected)


def test_patch_builds_revtrees_encoder_and_memo_attention():
    with adapter.patch():
        model = hf.ReformerModelWithLMHead(config(layers=("lsh", "local")))
    assert type(model.reformer.encoder) is adapter.ReformerEncoder
    assert type(model.reformer.encoder.layers[0].attention.self_attention) is (
        adapter.LSHSelfAttention
    )
    assert type(hf.ReformerModel(config()).encoder) is hf.ReformerEncoder  # put back on exit


def test_patch_builds_from_pretrained(tmp_path):
    torch.manual_seed(0)
    saved = hf.ReformerForMaskedLM(config(decoder=False))
    saved.save_pretrained(tmp_path)
    with adapter.patch():
        loaded = transformers.ReformerForMaskedLM.from_pretrained(tmp_path)
    assert type(loaded.reformer.encoder) is adapter.ReformerEncoder
    assert list(loaded.state_dict()) == list(saved.state_dict())
    for a, b in zip(loaded.state_dict().values(), saved.state_dict().values()):
        assert torch.equal(a, b)


def test_a_model_without_reversible_layers_is_refused():
    with pytest.raises(RevtreeError, match="ReformerForMaskedLM") as info:
        adapter.convert(torch.nn.Linear(2, 2))
    assert "holds no reversible layers" in str(info.value)


def _buckets_seen(memo: bool) -> tuple[int, int]:
    """Bucket disagreements between the forward and the recomputation, and buckets compared."""
    import revtree

    torch.manual_seed(0)
    wide = dict(hidden_size=64, attention_head_size=32, feed_forward_size=128, num_buckets=8)
    model = hf.ReformerModel(
        config(
            layers=("lsh",) * 12,
            dropout=0.0,
            lsh_attn_chunk_length=16,
            max_position_embeddings=128,
            **wide,
        )
    ).to(torch.bfloat16)
    model.encoder.__class__ = adapter.ReformerEncoder  # the engine, and the memo or not
    seen: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    for module in model.modules():
        if isinstance(module, hf.LSHSelfAttention):
            if memo:
                module.__class__ = adapter.LSHSelfAttention
            sort = module._get_sorted_bucket_idx_and_undo_sorted_bucket_idx

            def spy(length, buckets, hashes, sort=sort):
                seen[revtree.is_recomputing()].append(buckets.clone())
                return sort(length, buckets, hashes)

            module._get_sorted_bucket_idx_and_undo_sorted_bucket_idx = spy
    ids = torch.randint(1, 32, (2, 128), generator=torch.Generator().manual_seed(0))
    model(ids).last_hidden_state.float().square().sum().backward()
    forward, again = seen[False], seen[True][::-1]  # recomputed last layer first
    assert len(forward) == len(again) == 12
    return sum(int((a != b).sum()) for a, b in zip(forward, again)), sum(a.numel() for a in forward)


def test_the_memo_keeps_the_buckets_that_bfloat16_reconstruction_would_flip():
    flipped, total = _buckets_seen(memo=False)
    assert flipped > 0  # hashed again from the rebuilt input, some buckets change
    assert _buckets_seen(memo=True) == (0, total)


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, 32, (LENGTH,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def test_the_packages_trainer_runs_steps_as_plain_autograd(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    plain, ours = pair(layers=("lsh", "local"))
    losses = []
    for model in (plain.float(), ours.float()):
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=4,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=_Tokens())
        trainer.train()
        losses.append([e["loss"] for e in trainer.state.log_history if "loss" in e])
    assert len(losses[1]) == 4
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
