"""The cases the client packages' own test files check, written here against the adapters.

Each package's tests exercise its public model classes; these run the same cases (the same
constructor options, inputs and claims, written in this repository's own code) with every
model built under the adapter's ``patch()``, so that an option the adapter mishandles shows
as a failure of the package's own kind. Where the package's claim is about its own memory
trick (PyG freeing the caller's input), the claim is inverted: revtree leaves the caller's
tensors alone. The files themselves are not part of this repository.

- se3-transformer-pytorch 0.9.0 (``tests/test_equivariance.py``): output shapes with
  causal attention, global nodes, one-headed keys and values, edge tokens, continuous edges,
  per-degree input widths; equivariance under a rotation with Fourier-encoded distances, the
  EGNN backbone, rotary positions, linear key projections, sparse neighbours only, the
  reversible trunk, degree-1 input.
- torch-geometric 2.8.1 (``test/nn/models/test_rev_gnn.py``): the layer's ``repr``,
  inverse, backward, repeated backward with ``num_bwd_passes``, ``disable=True``, extra
  arguments (edge weights), for 2, 4, 8 and 16 groups.
- FrEIA 0.2 (``tests/test_sequence.py``): ``append`` of a block class keeps the shape.
- transformers 5.25 (``tests/models/reformer/test_modeling_reformer.py``, the cases that run
  on a CPU without downloads): each head's output shapes, a masked-LM backward, padding that
  a shifted mask makes irrelevant, feed-forward and LM-head chunking giving the unchunked
  loss and gradients, ``output_hidden_states`` and ``output_attentions`` counts and shapes,
  sequence classification and question answering, greedy generation with the cache, a
  save and load round trip.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

# ------------------------------------------------------------------ se3-transformer-pytorch


def _se3():
    pytest.importorskip("se3_transformer_pytorch")
    from se3_transformer_pytorch.se3_transformer_pytorch import SE3Transformer

    from revtree.adapters import se3_transformer as adapter

    return SE3Transformer, adapter


SE3_SHAPES = {
    "plain": ({}, {}),
    "causal": ({"causal": True}, {}),
    "global nodes": ({"global_feats_dim": 16}, {"global_feats": (1, 2, 16)}),
    "one-headed keys and values": (
        {"global_feats_dim": 16, "one_headed_key_values": True},
        {"global_feats": (1, 2, 16)},
    ),
    "edge tokens": ({"edge_dim": 4, "num_edge_tokens": 4, "valid_radius": None}, {"edges": 4}),
}


@pytest.mark.parametrize("case", list(SE3_SHAPES))
def test_se3_output_shapes(case):
    SE3Transformer, adapter = _se3()
    options, extra = SE3_SHAPES[case]
    settings = {"dim": 64, "depth": 1, "num_degrees": 2, "num_neighbors": 4, "valid_radius": 10}
    settings.update(options)
    settings = {k: v for k, v in settings.items() if v is not None}
    torch.manual_seed(0)
    with adapter.patch():
        model = SE3Transformer(**settings)
    kwargs = {}
    if "global_feats" in extra:
        kwargs["global_feats"] = torch.randn(*extra["global_feats"])
    if "edges" in extra:
        kwargs["edges"] = torch.randint(0, extra["edges"], (1, 32))
    out = model(torch.randn(1, 32, 64), torch.randn(1, 32, 3), torch.ones(1, 32).bool(), **kwargs)
    assert out.shape == (1, 32, 64)


def test_se3_continuous_edges_and_per_degree_input_widths():
    SE3Transformer, adapter = _se3()
    from se3_transformer_pytorch.utils import fourier_encode

    torch.manual_seed(0)
    with adapter.patch():
        edged = SE3Transformer(
            dim=64, depth=1, attend_self=True, num_degrees=2, output_degrees=2, edge_dim=34
        )
        mixed = SE3Transformer(
            dim_in=(4, 2),
            dim=4,
            depth=1,
            input_degrees=2,
            num_degrees=2,
            output_degrees=2,
            reduce_dim_out=True,
        )
    distances = torch.randint(0, 4, (1, 32, 32, 2))
    edges = fourier_encode(distances, num_encodings=8, include_self=True)
    out = edged(
        torch.randn(1, 32, 64),
        torch.randn(1, 32, 3),
        torch.ones(1, 32).bool(),
        edges=edges,
        return_type=1,
    )
    assert out.shape == (1, 32, 64, 3)
    features = {"0": torch.randn(2, 32, 4, 1), "1": torch.randn(2, 32, 2, 3)}
    out = mixed(features, torch.randn(2, 32, 3), torch.ones(2, 32).bool(), return_type=1)
    assert out.shape == (2, 32, 3)


SE3_EQUIVARIANT = {
    "fourier distances": {"fourier_encode_dist": True},
    "egnn backbone": {"fourier_encode_dist": True, "use_egnn": True},
    "rotary": {"fourier_encode_dist": True, "rotary_position": True, "rotary_rel_dist": True},
    "linear key projections": {"fourier_encode_dist": True, "linear_proj_keys": True},
    "reversible trunk": {"reversible": True},
    "degree-1 input": {"input_degrees": 2},
    "sparse neighbours only": {
        "num_neighbors": 0,
        "attend_sparse_neighbors": True,
        "num_adj_degrees": 2,
        "adj_dim": 4,
    },
}


@pytest.mark.parametrize("case", list(SE3_EQUIVARIANT))
def test_se3_equivariance(case):
    SE3Transformer, adapter = _se3()
    from se3_transformer_pytorch.irr_repr import rot

    settings = {"dim": 64, "depth": 1, "attend_self": True, "num_neighbors": 4}
    settings.update(num_degrees=2, output_degrees=2, **SE3_EQUIVARIANT[case])
    dtype = torch.float64 if case == "sparse neighbours only" else torch.float32
    torch.manual_seed(0)
    with adapter.patch():
        model = SE3Transformer(**settings).to(dtype)
    coors = torch.randn(1, 32, 3, dtype=dtype)
    mask = torch.ones(1, 32).bool()
    kwargs = {"return_type": 1}
    if case == "sparse neighbours only":
        i = torch.arange(32)
        kwargs["adj_mat"] = (i[:, None] - i[None, :]).abs() <= 1
    rotation = rot(15, 0, 45).to(dtype)
    if case == "degree-1 input":
        atoms, vectors = torch.randn(1, 32, 64, 1), torch.randn(1, 32, 64, 3)
        turned = model({"0": atoms, "1": vectors @ rotation}, coors @ rotation, mask, **kwargs)
        then_turned = model({"0": atoms, "1": vectors}, coors, mask, **kwargs) @ rotation
    else:
        feats = torch.randn(1, 32, 64, dtype=dtype)
        turned = model(feats, coors @ rotation, mask, **kwargs)
        then_turned = model(feats, coors, mask, **kwargs) @ rotation
    assert (turned - then_turned).abs().max() < 1e-4


def test_se3_trunks_are_revtrees():
    SE3Transformer, adapter = _se3()
    with adapter.patch():
        reversible = SE3Transformer(dim=8, depth=1, num_degrees=2, reversible=True)
        sequential = SE3Transformer(dim=8, depth=1, num_degrees=2)
    assert isinstance(reversible.net, adapter.ReversibleSequence)
    assert isinstance(sequential.net, adapter.SequentialSequence)


# --------------------------------------------------------------------------- torch-geometric


def _layer(groups, conv="sage", **options):
    pytest.importorskip("torch_geometric")
    from torch_geometric.nn import GraphConv, GroupAddRev, SAGEConv

    from revtree.adapters import pyg as adapter

    width = 32 // groups
    with adapter.patch():
        made = SAGEConv(width, width) if conv == "sage" else GraphConv(width, width)
        layer = GroupAddRev(made, num_groups=groups, **options)
    assert isinstance(layer, adapter.GroupAddRev)
    return layer


def _graph():
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    edge_index = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 1]])
    return torch.nn.Linear(32, 32)(x), edge_index


GROUPS = [2, 4, 8, 16]


@pytest.mark.parametrize("groups", GROUPS)
def test_pyg_repr_inverse_and_the_callers_input(groups):
    layer = _layer(groups)
    width = 32 // groups
    assert repr(layer) == (
        f"GroupAddRev(SAGEConv({width}, {width}, aggr=mean), num_groups={groups})"
    )
    h, edge_index = _graph()
    before = h.detach().clone()
    out = layer(h, edge_index)
    assert h.untyped_storage().size() == h.numel() * h.element_size()  # never freed here
    assert torch.equal(h, before)
    assert torch.allclose(layer.inverse(out, edge_index), before, atol=1e-3)


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("options", [{}, {"disable": True}], ids=["reversible", "disable"])
def test_pyg_backward(groups, options):
    layer = _layer(groups, **options)
    h, edge_index = _graph()
    layer(h, edge_index).mean().backward()
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("groups", GROUPS)
def test_pyg_repeated_backward(groups):
    layer = _layer(groups, num_bwd_passes=4)
    h, edge_index = _graph()
    target = layer(h, edge_index).mean()
    target.backward(retain_graph=True)
    target.backward(retain_graph=True)
    sources = [h, *layer.parameters()]
    first = torch.autograd.grad(target, sources, retain_graph=True)
    second = torch.autograd.grad(target, sources)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("groups", GROUPS)
def test_pyg_edge_weights(groups):
    layer = _layer(groups, conv="graph")
    h, edge_index = _graph()
    weight = torch.rand(4, requires_grad=True)
    layer(h, edge_index, weight).mean().backward()
    assert weight.grad is not None


# ------------------------------------------------------------------------------------ FrEIA


def test_freia_append_a_block_class_keeps_the_shape():
    pytest.importorskip("FrEIA")
    from FrEIA.framework import SequenceINN
    from FrEIA.modules import AllInOneBlock

    from revtree.adapters import freia as adapter

    def subnet(c_in, c_out):
        return torch.nn.Sequential(
            torch.nn.Linear(c_in, 32), torch.nn.ReLU(), torch.nn.Linear(32, c_out)
        )

    with adapter.patch():
        inn = SequenceINN(2)
    inn.append(AllInOneBlock, subnet_constructor=subnet)
    assert isinstance(inn, adapter.SequenceINN) and inn.shapes[-1] == (2,)


# ------------------------------------------------------------------------------ transformers


def _reformer_config(**changes):
    pytest.importorskip("transformers")
    from transformers import ReformerConfig

    settings = dict(
        vocab_size=32,
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=16,
        feed_forward_size=32,
        attn_layers=["local", "lsh", "local", "lsh"],
        local_attn_chunk_length=4,
        local_num_chunks_before=1,
        local_num_chunks_after=0,
        lsh_attn_chunk_length=4,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        num_buckets=4,
        num_hashes=2,
        hidden_dropout_prob=0.1,
        local_attention_probs_dropout_prob=0.1,
        lsh_attention_probs_dropout_prob=0.1,
        max_position_embeddings=32,
        axial_pos_embds=True,
        axial_pos_shape=(4, 8),
        axial_pos_embds_dim=(16, 16),
        is_decoder=True,
        pad_token_id=0,
        eos_token_id=2,
        hash_seed=0,
        num_labels=2,
    )
    settings.update(changes)
    return ReformerConfig(**settings)


def _reformer(name, **changes):
    import transformers

    from revtree.adapters import transformers as adapter

    config = _reformer_config(**changes)
    torch.manual_seed(0)
    with adapter.patch():
        model = getattr(transformers, name)(config)
    assert type(model.reformer.encoder if hasattr(model, "reformer") else model.encoder) is (
        adapter.ReformerEncoder
    )
    return model


def _ids(batch=3, length=32, seed=0):
    return torch.randint(1, 32, (batch, length), generator=torch.Generator().manual_seed(seed))


HEADS = {
    "ReformerModel": ("last_hidden_state", (3, 32, 64)),
    "ReformerModelWithLMHead": ("logits", (3, 32, 32)),
    "ReformerForMaskedLM": ("logits", (3, 32, 32)),
    "ReformerForSequenceClassification": ("logits", (3, 2)),
}


@pytest.mark.parametrize("name", list(HEADS))
def test_reformer_heads_output_shapes(name):
    model = _reformer(name, is_decoder=name == "ReformerModelWithLMHead").eval()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0
    field, shape = HEADS[name]
    assert getattr(model(ids, attention_mask=mask), field).shape == shape
    assert getattr(model(ids), field).shape == shape


def test_reformer_question_answering_and_masked_lm_backward():
    qa = _reformer("ReformerForQuestionAnswering", is_decoder=False).train()
    ids = _ids()
    out = qa(ids, start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([4, 5, 6]))
    assert out.start_logits.shape == out.end_logits.shape == (3, 32)
    out.loss.backward()
    mlm = _reformer("ReformerForMaskedLM", is_decoder=False, lsh_num_chunks_after=1).train()
    mlm(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in mlm.reformer.encoder.parameters())


def test_reformer_padding_masked_out_does_not_matter():
    """Padded then rolled by one chunk: the unpadded outputs agree."""
    model = _reformer("ReformerModel", axial_pos_embds=False, is_decoder=False).eval()
    with torch.no_grad():
        model.embeddings.position_embeddings.embedding.weight.zero_()
    half = _ids(length=16)
    mask = torch.cat([torch.ones_like(half), torch.zeros_like(half)], dim=-1)
    padded = torch.cat([half, _ids(length=16, seed=1)], dim=-1)
    rolled = torch.roll(torch.cat([half, _ids(length=16, seed=2)], dim=-1), 4, dims=-1)
    first = model(padded, attention_mask=mask)[0][:, :16]
    second = model(rolled, attention_mask=torch.roll(mask, 4, dims=-1))[0][:, 4:20]
    assert torch.allclose(first, second, atol=1e-3)


def test_reformer_chunked_feed_forward_and_lm_head_change_nothing():
    results = []
    for chunks in (0, 1):
        model = _reformer(
            "ReformerForMaskedLM",
            is_decoder=False,
            lsh_num_chunks_after=1,
            hidden_dropout_prob=0.0,
            local_attention_probs_dropout_prob=0.0,
            lsh_attention_probs_dropout_prob=0.0,
            chunk_size_lm_head=chunks,
            chunk_size_feed_forward=chunks,
        ).train()
        ids = _ids()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-5)


def test_reformer_hidden_states_and_attentions():
    model = _reformer("ReformerModel").eval()
    out = model(_ids(), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 5 and all(h.shape == (3, 32, 32) for h in out.hidden_states)
    assert len(out.attentions) == 4
    assert out.attentions[0].shape[:2] == (3, 2)  # batch, heads


def test_reformer_greedy_generation_with_the_cache():
    model = _reformer("ReformerModelWithLMHead").eval()
    plain = copy.deepcopy(model)
    from transformers.models.reformer import modeling_reformer as hf

    for module in plain.modules():  # the package's own classes again
        if isinstance(module, hf.ReformerEncoder):
            module.__class__ = hf.ReformerEncoder
        elif isinstance(module, hf.LSHSelfAttention):
            module.__class__ = hf.LSHSelfAttention
    prompt = _ids(batch=1, length=8)
    ours = model.generate(prompt, max_new_tokens=8, do_sample=False)
    theirs = plain.generate(prompt, max_new_tokens=8, do_sample=False)
    assert ours.shape == (1, 16) and torch.equal(ours, theirs)


def test_reformer_save_and_load(tmp_path):
    import transformers

    from revtree.adapters import transformers as adapter

    model = _reformer("ReformerModelWithLMHead")
    model.save_pretrained(tmp_path)
    with adapter.patch():
        loaded = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
