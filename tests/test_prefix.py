"""Masks evaluated in one call run the layers before the first reader they patch once for all (``prefix``)."""
import bisect

import pytest
import torch

import fxcircuits
from fxcircuits import prefix
from fxcircuits.patching import DeltaStore, dense_keep
from test_patching import _close
from zoo import CONFIGS, NO_ATTENTION, make


def _last_layer(cm) -> int:
    """Where the last attention layer's readers begin in ``graph.downstream``: its first q input."""
    return cm.graph.downstream.index(f"a{cm.graph.n_layers - 1}.h0<q>")


def _into_last_layer(cm, generator) -> torch.Tensor:
    """Four masks that move edges into the last layer's readers and the logits only: one edge into the last MLP,
    one into a head's k input (its q input where the layer reuses an earlier layer's keys, read there), one into
    the logits, and a soft mix of every edge into the last layer."""
    g = cm.graph
    into = [g.downstream[d] for d in g.dst.tolist()]
    late = g.dst >= _last_layer(cm)
    head = next(port for port in (f"a{g.n_layers - 1}.h1<{role}>" for role in "kq")
                if g.downstream.index(port) >= _last_layer(cm))
    masks = torch.ones(4, len(into))
    for i, wanted in enumerate((g.downstream[-2], head, "logits")):
        masks[i, into.index(wanted)] = 0.0
    masks[3] = torch.where(late, torch.rand(len(into), generator=generator), 1.0)
    return masks


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - NO_ATTENTION))  # the next test has their readers
def test_masks_share_the_layers_before_the_first_reader_they_patch(traced, prompts, name, monkeypatch):
    """Masks that patch the last layer alone: the layers before it run on one copy of the batch — what the later
    layers read of them is widened once, from one copy to one per mask — and the logits equal each mask's on its
    own, the same masks run without sharing, and the same with the corrupted run in the pass (as on a GPU)."""
    _, cm = traced(name)
    assert cm.shares_prefix
    clean, corrupted, mask = prompts
    masks = _into_last_layer(cm, torch.Generator().manual_seed(7))
    widened, widen = [], prefix._widened
    monkeypatch.setattr(prefix, "_widened", lambda v, axis, lead, n: widened.append((v, axis, lead, n)) or
                        widen(v, axis, lead, n))
    stores, first_moved = [], DeltaStore._first_moved_group
    monkeypatch.setattr(DeltaStore, "_first_moved_group", lambda self: stores.append(self) or first_moved(self))
    with torch.no_grad():
        together = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=masks)
        # the widening comes at the last layer's first reader group, once, from one copy of the batch to four
        first = _last_layer(cm)
        assert stores[-1].widen_at == bisect.bisect_right(stores[-1].ends, first) > 0
        assert widened and all(n == len(masks) and lead == 0 for _, _, lead, n in widened)
        rows = [v.shape[axis] for v, axis, _, _ in widened if axis != prefix.COUNT]
        assert len(clean) in rows and all(r % len(clean) == 0 for r in rows)  # one copy of the batch, or its tokens
        alongside = cm.patched_alongside(clean, mask, corrupted, dense_keep(cm.graph, masks))
        assert widened[-1][2] == 1  # the corrupted rows lead, and stay single
        alone = torch.stack([cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=m) for m in masks])
        monkeypatch.setattr(cm, "shares_prefix", False)
        unshared = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=masks)
    valid = mask.expand(len(masks), -1, -1)
    for other in (alone, unshared, alongside):
        _close(together, other, valid)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_widening_at_any_reader_gives_each_mask_its_own_logits(traced, prompts, name):
    """The widening comes at the group of the first reader a mask moves an edge into: here each layer's, each MLP's
    (a delayed write's, read with another layer's) and the logits'.  An MoE block builds an index over its tokens from
    the batch's size; built from one copy of the batch and repeated for every mask, it would point into the first
    copy alone: the block computes it again where it runs (``rewrite.from_sizes``).  Beside a mask that moves an edge
    into the reader, an all-ones mask gives the clean logits, and the mask its own."""
    model, cm = traced(name)
    clean, corrupted, mask = prompts
    g = cm.graph
    readers = [p for p in g.downstream if p.startswith("m") or p.endswith((".h0<q>", ".h0<k>")) or p == "logits"]
    with torch.no_grad():
        hf = model(input_ids=clean, attention_mask=mask).logits
        for port in readers:
            masks = torch.ones(2, len(g.edges))
            masks[0, g.edge_index[f"input->{port}"]] = 0.0
            together = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=masks)
            _close(together[1], hf, mask)
            _close(together[0], cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=masks[0]), mask)
    assert cm.shares_prefix


def test_an_index_over_the_batchs_tokens_built_before_the_widening_turns_sharing_off(prompts, monkeypatch):
    """Were an MoE block's index over its tokens (``arange(batch · seq · k)``) built in the shared prefix, widening
    would repeat one copy's index for every mask.  Such a value is no copy per prompt: sharing is off for the
    capture (``prefix._copies``), and every mask gets its own logits."""
    from fxcircuits import rewrite
    monkeypatch.setattr(rewrite, "from_sizes", lambda block: set())  # the block reads the index built before
    model = make("mixtral")
    cm = fxcircuits.trace(model)
    assert not cm.shares_prefix
    clean, corrupted, mask = prompts
    masks = torch.ones(2, len(cm.graph.edges))
    masks[0, cm.graph.edge_index["input->m1"]] = 0.0
    with torch.no_grad():
        together = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=masks)
        _close(together[1], model(input_ids=clean, attention_mask=mask).logits, mask)
    assert not prefix._copies(torch.arange(12).reshape(6, 2), 0, 3) and prefix._copies(torch.ones(6, 2), 0, 3)


def test_gradients_through_a_shared_prefix(prompts):
    """Without a gradient per mask, a batched call may still need one for the other run's outputs or the model's
    weights: through the shared prefix, the writes of its one copy serve every mask, and their gradients are
    summed over the masks.  Both equal those of the same call with every mask running the whole model."""
    model = make("llama")
    cm = fxcircuits.trace(model)
    clean, corrupted, mask = prompts
    generator = torch.Generator().manual_seed(8)
    keep = dense_keep(cm.graph, _into_last_layer(cm, generator))
    weights = torch.randn(len(keep), *clean.shape, 1, generator=generator)
    with torch.no_grad():
        activations = cm.activations(corrupted, mask)
    results = []
    for shared in (True, False):
        cm.shares_prefix = shared
        other = activations.clone().requires_grad_(True)
        model.zero_grad()
        logits = cm.patched(clean, mask, list(other.split(cm.graph.group_sizes)), keep)
        (logits[..., :1] * weights).sum().backward()
        embedding = model.get_input_embeddings().weight.grad.clone()
        results.append((logits.detach(), other.grad, embedding))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
    assert results[0][1].abs().sum() > 0 and results[0][2].abs().sum() > 0


def test_a_value_that_carries_the_batch_otherwise_turns_sharing_off(prompts, monkeypatch):
    """Where some value the later layers read changes with the batch in a way ``widen`` cannot repeat, the patcher
    is left as built, and every mask runs the whole model: the logits are still each mask's own."""
    monkeypatch.setattr(prefix, "_axis", lambda two, three: prefix._UNKNOWN if two != three else None)
    cm = fxcircuits.trace(make("llama"))
    assert not cm.shares_prefix
    assert not any(n.target is prefix.widen for n in cm.patcher.graph.nodes)
    clean, corrupted, mask = prompts
    masks = _into_last_layer(cm, torch.Generator().manual_seed(9))
    with torch.no_grad():
        together = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=masks)
        for i, m in enumerate(masks):
            _close(together[i], cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=m), mask)


def test_how_a_value_carries_the_batch():
    """``_axis`` from a value's signature at 2 and at 3 prompts."""
    tensor = lambda *shape: ("tensor", shape)  # noqa: E731
    assert prefix._axis(tensor(2, 5, 8), tensor(3, 5, 8)) == 0
    assert prefix._axis(tensor(4, 10, 8), tensor(4, 15, 8)) == 1  # e.g. [heads, batch · seq, d]
    assert prefix._axis(tensor(2, 5), tensor(2, 5)) is None
    assert prefix._axis(10, 15) == prefix.COUNT and prefix._axis(7, 7) is None
    assert prefix._axis(None, None) is None and prefix._axis((tensor(1, 5),), (tensor(1, 5),)) is None
    for two, three in ((tensor(2, 2), tensor(3, 3)), (tensor(2), tensor(4)), (2.0, 3.0), (2, 4),
                       ((tensor(2),), (tensor(3),)), (tensor(2, 5), tensor(3, 5, 1))):
        assert prefix._axis(two, three) is prefix._UNKNOWN


@pytest.mark.parametrize("name", ["llama", "mixtral"])
@pytest.mark.parametrize("method", ["eap-ig-activations", "exact", "acdc"])
def test_attribution_scores_the_same_with_a_shared_prefix(method, name):
    """EAP-IG-activations moves one writer at a time, its integration steps side by side as masks, with a tap on
    every reader: the layers before the writer are shared, and the tap, which sums over the masks, reads their one
    copy.  Exact patching and ACDC share the layers before the readers they judge (on Mixtral, an MoE block among
    them: exact patching scored 21 of its 110 edges wrong before ``rewrite.from_sizes``).  Every score equals the one
    found with every mask running the whole model."""
    from test_attribution import _batch, steps_of
    cm = fxcircuits.trace(make(name, dtype=torch.float64))
    scores = []
    for shared in (True, False):
        cm.shares_prefix = shared
        scores.append(fxcircuits.attribute(cm, [_batch()], "logit_diff", method, masks_per_call=7, progress=False,
                                           **steps_of(method, 3)).tensor)
    assert scores[0].abs().max() > 1e-3
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-6, atol=1e-9 * float(scores[1].abs().max()))
