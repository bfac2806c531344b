"""Masks with one class per part of the prompt (``mask_positions``): an edge kept at some tokens and patched at
others, as a positional circuit is.  Checked against hooks on the untouched HF model, against the plain mask and
``patch_positions`` where the classes reduce to them, and by finite differences."""
import pytest
import torch

import fxcircuits
from fxcircuits.data import position_classes
from fxcircuits.patching import Partition, _dense_rows, _unweighted, at_where, weighted_rows
from test_edges import _reference
from test_patching import _close
from zoo import make

NAMES = ["llama", "gpt2", "gemma2", "falcon_new_arch", "gpt_neox", "mixtral", "gemma4_per_layer", "deepseek_v3"]


@pytest.fixture(scope="module")
def mha():
    model = make("llama", num_key_value_heads=4)
    return model, fxcircuits.trace(model)


def _halves(clean: torch.Tensor, seed: int = 5) -> torch.Tensor:
    """Two classes that cut each prompt at random, [2, batch, seq]."""
    first = (torch.rand(clean.shape, generator=torch.Generator().manual_seed(seed)) > 0.5).float()
    return torch.stack([first, 1 - first])


@pytest.mark.parametrize("on_a_gpu", [False, True])
def test_edges_kept_at_some_positions_match_hooks(mha, on_a_gpu, as_on_a_gpu):
    """Each class patches its own edges, some in part, at its own tokens of each prompt; the reference shifts each
    reader of the HF model by the differences of its patched edges, weighted by those tokens.  As on a GPU, the
    corrupted run rides in the patched pass."""
    if on_a_gpu:
        as_on_a_gpu()
    model, cm = mha
    generator = torch.Generator().manual_seed(3)
    clean, corrupted = (torch.randint(0, 128, (2, 6), generator=generator) for _ in range(2))
    at, elsewhere = _halves(clean)
    masks = [{"a0.h1->a1.h2<k>": 0.0, "m0->logits": 0.0, "input->a1.h2<q>": 0.25},
             {"input->a1.h2<k>": 0.0, "a0.h1->m1": 0.3, "input->a1.h2<q>": 0.5}]
    reference = _reference(model, clean, corrupted, {
        "a0.h1->a1.h2<k>": at, "m0->logits": at, "input->a1.h2<k>": elsewhere, "a0.h1->m1": 0.7 * elsewhere,
        "input->a1.h2<q>": 0.75 * at + 0.5 * elsewhere})
    with torch.no_grad():
        ours = cm(clean, corrupted_input_ids=corrupted, edge_mask=masks, mask_positions=torch.stack([at, elsewhere]))
        either = [cm(clean, corrupted_input_ids=corrupted, edge_mask=m) for m in masks]
    assert all((reference - e).abs().max() > 1e-3 for e in either), "the classes should matter"
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_classes_alike_are_the_plain_mask_and_one_class_is_patch_positions(traced, prompts, name, as_on_a_gpu):
    """Soft masks and soft weights: the same mask in classes whose weights sum to 1 is that mask everywhere, and a
    single class is the mask patched at its positions; so too with the corrupted run riding in the pass."""
    _, cm = traced(name)
    clean, corrupted, mask = prompts
    generator = torch.Generator().manual_seed(6)
    edges = torch.rand(len(cm.graph.edges), generator=generator)
    first = torch.rand(clean.shape, generator=generator)
    split = torch.stack([first, 1 - first])
    patch = lambda **kw: cm(clean, mask, corrupted_input_ids=corrupted, **kw)  # noqa: E731
    with torch.no_grad():
        for on_a_gpu in (False, True):
            if on_a_gpu:
                as_on_a_gpu()
            _close(patch(edge_mask=edges.expand(2, -1), mask_positions=split), patch(edge_mask=edges), mask)
            _close(patch(edge_mask=edges[None], mask_positions=first[None]),
                   patch(edge_mask=edges, patch_positions=first), mask)


@pytest.mark.parametrize("name", ["llama", "gemma4_per_layer"])
def test_node_masks_by_class_are_their_edges_masks(traced, prompts, name):
    """A node mask per class moves the node's every edge in that class, and combines with edge masks as the plain
    masks do; the input node's edges include its side inputs (Gemma 4's per-layer inputs)."""
    _, cm = traced(name)
    clean, corrupted, mask = prompts
    split = _halves(clean)
    nodes = [{"input": 0.0, "a0.h1": 0.5}, {"m0": 0.0}]
    as_edges = [{e: v for e in cm.graph.edges for n, v in m.items() if e.startswith(n + "->")} for m in nodes]
    patch = lambda **kw: cm(clean, mask, corrupted_input_ids=corrupted, mask_positions=split, **kw)  # noqa: E731
    with torch.no_grad():
        _close(patch(node_mask=nodes), patch(edge_mask=as_edges), mask)
        _close(patch(node_mask=nodes, edge_mask=[{}, {"input->logits": 0.0}]),
               patch(edge_mask=[as_edges[0], {**as_edges[1], "input->logits": 0.0}]), mask)


def test_many_positional_masks_in_one_call_equal_calls_one_by_one(traced, prompts):
    """[n_masks, classes, E] with weights per class, or per mask and class, in one call."""
    _, cm = traced("llama")
    clean, corrupted, mask = prompts
    generator = torch.Generator().manual_seed(9)
    masks = torch.rand(3, 2, len(cm.graph.edges), generator=generator)
    weights = torch.stack([_halves(clean, seed) for seed in range(3)])
    patch = lambda m, w: cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=m, mask_positions=w)  # noqa: E731
    with torch.no_grad():
        _close(patch(masks, weights[0]), torch.stack([patch(m, weights[0]) for m in masks]), mask.expand(3, -1, -1))
        _close(patch(masks, weights), torch.stack([patch(m, w) for m, w in zip(masks, weights)]),
               mask.expand(3, -1, -1))
        _close(patch(masks[0], weights), torch.stack([patch(masks[0], w) for w in weights]), mask.expand(3, -1, -1))


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma4_per_layer"])
def test_gradients_by_class_match_finite_differences(name, prompts):
    """The gradient of each class's mask, and their sum over classes covering the prompt is the plain mask's."""
    model = make(name, dtype=torch.float64)
    cm = fxcircuits.trace(model)
    clean, corrupted, mask = prompts
    generator = torch.Generator().manual_seed(4)
    split = _halves(clean).double()
    masks = torch.rand(2, len(cm.graph.edges), generator=generator, dtype=torch.float64)
    target = clean[:, -1]

    def metric(m, **kw):
        logits = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=m, **kw)
        return logits[torch.arange(len(target)), -1, target].sum()

    masks.requires_grad_(True)
    (grad,) = torch.autograd.grad(metric(masks, mask_positions=split), masks)
    plain = masks[0].detach().clone().requires_grad_(True)
    (whole,) = torch.autograd.grad(metric(plain), plain)
    (alike,) = torch.autograd.grad(metric(plain.expand(2, -1), mask_positions=split), plain)
    torch.testing.assert_close(alike, whole)
    # float64 weights, but HF computes some norms in float32: a step of 3e-3 keeps both their rounding and the
    # truncation error well under the slack (1e-4 of the largest gradient, 2e-3 of each)
    eps = 3e-3
    picks = [(c, int(i)) for c in range(2) for i in grad[c].abs().topk(3).indices] + [(0, 0), (1, 5)]
    with torch.no_grad():
        for c, i in picks:
            up, down = masks.detach().clone(), masks.detach().clone()
            up[c, i] += eps
            down[c, i] -= eps
            numeric = (metric(up, mask_positions=split) - metric(down, mask_positions=split)) / (2 * eps)
            assert abs(numeric - grad[c, i]) <= 1e-4 * grad.abs().max() + 2e-3 * abs(grad[c, i]), (c, i)
    assert grad.abs().max() > 0


def test_products_of_classes_apart_equal_the_rows_as_they_lie():
    """Classes whose positions lie apart multiply each class's rows at its own positions alone (``Partition``):
    the same sums, gradients of the mask and gradients of the differences as the products over every class's rows
    at every position, also from a group's start on.  Each class's copy is filled from the rows group by group as
    products first read them, and widened with the rows.  Fresh memory is NaN here (deterministic filling), so a
    position of no class, or a group, left unwritten shows."""
    generator = torch.Generator().manual_seed(0)
    n_masks, classes, batch, seq, features, readers = 2, 3, 2, 5, 4, 3
    of = torch.tensor([[0, 0, 3, 1, 1], [3, 1, 0, 0, 3]])  # class 2 at no position; 3: no class
    where = (of == torch.arange(classes)[:, None, None]).double()
    where = (where * (0.5 + torch.rand(where.shape, generator=generator, dtype=torch.float64))).expand(n_masks, -1,
                                                                                                         -1, -1)
    nodes, stored = [1, 3, 2], [True, False, True]
    sizes = [n * classes for n in nodes]
    width = batch * seq * features
    differences = [torch.randn(n, n_masks, width, generator=generator, dtype=torch.float64)
                   for n, kept in zip(nodes, stored) if kept]
    rows = torch.cat([at_where(d, where[:, c]) for d in differences for c in range(classes)])
    weights = torch.rand(n_masks, len(rows), readers, generator=generator, dtype=torch.float64)
    base, grad = (torch.randn(*shape, generator=generator, dtype=torch.float64)
                  for shape in ((n_masks, width), (readers, n_masks, width)))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        partition = Partition.of(where, sizes, stored)
        first = weights[:, :classes], rows[:classes]  # the first group's rows alone, as a pass has them there
        torch.testing.assert_close(partition.dense(*first, base, None), _dense_rows(*first, base))
        assert partition.filled == [True, False]
        torch.testing.assert_close(partition.dense(weights, rows, base, None), _dense_rows(weights, rows, base))
        torch.testing.assert_close(partition.after(classes).dense(weights[:, classes:], rows[classes:], None, None),
                                   _dense_rows(weights[:, classes:], rows[classes:]))
        torch.testing.assert_close(partition.grad_keep(rows, grad), -torch.einsum("unx,dnx->nud", rows, grad))
        flat = weighted_rows(weights.transpose(1, 2), grad)
        by_node = torch.cat([_unweighted(part, where) for part in flat.split([classes, 2 * classes])])
        torch.testing.assert_close(partition.grad_differences(weights.transpose(1, 2), grad), by_node)
        fresh = Partition.of(where, sizes, stored)  # the first product from a group's start on, after the rest
        torch.testing.assert_close(fresh.after(classes).grad_keep(rows[classes:], grad),
                                   -torch.einsum("unx,dnx->nud", rows[classes:], grad))
        assert fresh.filled == [False, True]
        narrow = Partition.of(where, sizes, stored)  # rows widened after the first group (``DeltaStore.widen``)
        narrow.dense(first[0].float(), first[1].float(), None, None)
        widened = rows.float().double()
        torch.testing.assert_close(narrow.dense(weights, widened, base, None), _dense_rows(weights, widened, base))
    finally:
        torch.use_deterministic_algorithms(previous)
    overlapping = where.clone()
    overlapping[:, 0] += where[:, 1]
    unlike = where.clone()
    unlike[1] = unlike[1].roll(1, -1)
    for other in (overlapping, unlike, where[:, :1]):
        assert Partition.of(other, sizes if other.shape[1] == classes else nodes, stored) is None


def test_prompts_of_one_token_take_positional_masks(traced):
    """One-token prompts run at a second position too (``model._one_token_too``), where no class applies."""
    _, cm = traced("llama")
    generator = torch.Generator().manual_seed(2)
    clean, corrupted = (torch.randint(0, 128, (2, 1), generator=generator) for _ in range(2))
    edges = torch.rand(2, len(cm.graph.edges), generator=generator)
    with torch.no_grad():
        ours = cm(clean, corrupted_input_ids=corrupted, edge_mask=edges, mask_positions=torch.tensor([[0.3], [0.7]]))
        mixed = 1 - 0.3 * (1 - edges[0]) - 0.7 * (1 - edges[1])
        _close(ours, cm(clean, corrupted_input_ids=corrupted, edge_mask=mixed))


def test_position_classes_cut_each_prompt_by_its_spans():
    spans = {"A": torch.tensor([[0, 2], [1, 2]]), "B": torch.tensor([[3, 4], [2, 5]])}
    batch = {"clean": torch.zeros(2, 5, dtype=torch.long), "spans": spans}
    names, weights = position_classes(batch)
    assert names == ["A", "B", "rest"]
    assert weights.tolist() == [[[1, 1, 0, 0, 0], [0, 1, 0, 0, 0]],
                                [[0, 0, 0, 1, 0], [0, 0, 1, 1, 1]],
                                [[0, 0, 1, 0, 1], [1, 0, 0, 0, 0]]]
    assert position_classes(batch, ["B"])[1][1].tolist() == [[1, 1, 1, 0, 1], [1, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"spans \['A', 'B'\] overlap at position 1 of example 1"):
        position_classes({**batch, "spans": {**spans, "B": torch.tensor([[3, 4], [1, 5]])}})
    with pytest.raises(KeyError, match="no span 'C'"):
        position_classes(batch, ["C"])
    with pytest.raises(ValueError, match="no spans"):
        position_classes({"clean": batch["clean"]})


def test_bad_positional_masks_are_refused(traced, prompts):
    _, cm = traced("llama")
    clean, corrupted, mask = prompts
    split, edges = _halves(clean), torch.ones(2, len(cm.graph.edges))
    patch = lambda **kw: cm(clean, mask, corrupted_input_ids=corrupted, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="lists 3 masks for mask_positions' 2 classes"):
        patch(edge_mask=[{}, {}, {}], mask_positions=split)
    with pytest.raises(ValueError, match=r"with mask_positions of 2 classes of positions, give \[2, n_edges\]"):
        patch(edge_mask=torch.ones(len(cm.graph.edges)), mask_positions=split)
    with pytest.raises(ValueError, match="not both"):
        patch(edge_mask=edges, mask_positions=split, patch_positions=[2])
    with pytest.raises(ValueError, match=r"mask_positions has shape \(2, 3, 5\); expected weights over the 7"):
        patch(edge_mask=edges, mask_positions=split[..., :5])
    with pytest.raises(ValueError, match="bool or float tensor"):
        patch(edge_mask=edges, mask_positions=[0, 1])
    with pytest.raises(ValueError, match="NaN"):
        patch(edge_mask=edges, mask_positions=split * float("nan"))
    with pytest.raises(ValueError, match="the masks', the classes' and the prompts' counts"):
        patch(edge_mask=edges, mask_positions=torch.stack([split] * 2)[:, :, :2])
    keep = torch.ones(1, 2, len(cm.graph.upstream), len(cm.graph.downstream))
    with pytest.raises(ValueError, match="needs the classes' positions"), torch.no_grad():
        cm.patched(*cm.inputs(clean, mask), cm.recording(corrupted, mask)[0], keep)
