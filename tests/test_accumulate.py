"""The accumulation behind every patched run: each route equals the dense product, gradients included."""
import itertools

import pytest
import torch

from fxcircuits import patching
from fxcircuits.patching import DeltaStore, accumulate, weighted_rows


def _weights(kind: str, generator) -> torch.Tensor:
    shape = (2, 30, 7)
    dense = torch.rand(shape, generator=generator, dtype=torch.float64)
    few = (torch.rand(shape, generator=generator) < 0.03).double()
    one_reader = torch.zeros(shape, dtype=torch.float64).index_copy_(2, torch.tensor([4]), dense[..., 4:5])
    return {"dense": dense, "few moved": few * dense, "few kept": 1 - few * dense, "none": torch.zeros(shape),
            "all": torch.ones(shape), "one reader's many": one_reader}[kind].double()


@pytest.mark.parametrize("kind", ["dense", "few moved", "few kept", "none", "all", "one reader's many"])
def test_every_route_equals_the_dense_product(kind):
    """"few moved" takes the CSR product, "one reader's many" (30 entries in one output row) the COO one."""
    generator = torch.Generator().manual_seed(0)
    weights = _weights(kind, generator)
    rows = torch.randn(30, 2, 11, generator=generator, dtype=torch.float64)
    base = torch.randn(2, 11, generator=generator, dtype=torch.float64)
    product = torch.einsum("nud,unx->dnx", weights, rows)
    torch.testing.assert_close(weighted_rows(weights, rows), product)
    torch.testing.assert_close(weighted_rows(weights, rows, base), product + base)
    torch.testing.assert_close(weighted_rows(weights.float(), rows.float(), base.float()), (product + base).float())


def test_the_store_keeps_the_rows_of_groups_with_a_moved_edge():
    """Groups 0 and 2 have an edge the mask moves, group 1 none: its rows are left out, and so is it from the sum."""
    generator = torch.Generator().manual_seed(2)
    keep = torch.ones(1, 30, 7)
    keep[0, 0, 3] = 0.5
    keep[0, 20, 6] = 0.0
    store, writes, others = DeltaStore(keep, [1, 12, 17], [7], [30]), [], []
    for n in (1, 12, 17):
        writes.append(torch.randn(n, 2, 3, generator=generator, dtype=torch.float64))
        others.append(torch.randn(n, 1, 3, generator=generator, dtype=torch.float64))
        rows = store.extend(writes, others, 2 * 3)  # one mask's rows of one node: [2, 3]
        stored = [o - w for o, w, kept in zip(others, writes, (True, False, True)) if kept]
        torch.testing.assert_close(rows, torch.cat(stored))
        torch.testing.assert_close(store.rows_sum(), torch.cat(stored).sum(0))
    assert store.stored == [True, False, True] and store.n_stored == 18
    assert [store.moves(d, d + 1) for d in range(7)] == [False, False, False, True, False, False, True]


def _formula(stream, keep, writes, others):
    """x_d = stream + Σ_u (1 − keep[u, d]) · (other_u − write_u), for 30 nodes, 7 readers, 2 masks of [3, 4]."""
    rows = torch.cat([o - w for w, o in zip(writes, others)]).reshape(30, 2, -1)
    return stream + torch.einsum("nud,unx->dnx", 1 - keep, rows).reshape(7, 2, 3, 4)


@pytest.mark.parametrize("kind", ["dense", "few moved", "few kept", "none", "all"])
def test_gradients_of_accumulate(kind):
    """Against the formula, gradients included: for the stream, the mask, this run's writes and the other run's
    (broadcast over the batch, as zero and mean ablations are)."""
    generator = torch.Generator().manual_seed(1)
    keep = (1 - _weights(kind, generator)).requires_grad_(True)
    sizes = (1, 12, 17)
    writes = [torch.randn(n, 2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True) for n in sizes]
    others = [torch.randn(n, 1 if n == 12 else 2, 3, 4, generator=generator, dtype=torch.float64,
                          requires_grad=True) for n in sizes]
    stream = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)

    def ours(stream, keep, *groups):
        store = DeltaStore(keep, list(sizes), [7], [sum(sizes)])
        return accumulate(store, stream, list(groups[:3]), list(groups[3:]), 0, 7)

    torch.testing.assert_close(ours(stream, keep, *writes, *others), _formula(stream, keep, writes, others))
    torch.autograd.gradcheck(ours, (stream, keep, *writes, *others))


def test_gradients_where_the_store_leaves_a_group_out():
    """A fixed mask (no gradient) that moves no edge of group 1: the rows it stores, and the gradients of every
    write and other-run output, still match the formula."""
    generator = torch.Generator().manual_seed(3)
    keep = torch.ones(2, 30, 7, dtype=torch.float64)
    keep[:, 0, 2] = 0.25
    keep[1, 14:20, 4:] = torch.rand(6, 3, generator=generator, dtype=torch.float64)
    sizes = (1, 12, 17)
    writes = [torch.randn(n, 2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True) for n in sizes]
    others = [torch.randn(n, 2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True) for n in sizes]
    stream = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)

    def ours(stream, *groups):
        store = DeltaStore(keep, list(sizes), [7], [sum(sizes)])
        return accumulate(store, stream, list(groups[:3]), list(groups[3:]), 0, 7)

    assert DeltaStore(keep, list(sizes), [7], [sum(sizes)]).stored == [True, False, True]
    torch.testing.assert_close(ours(stream, *writes, *others), _formula(stream, keep, writes, others))
    torch.autograd.gradcheck(ours, (stream, *writes, *others))


def test_writes_of_one_batch_serve_every_mask():
    """Writes made in a prefix the masks share (``fxcircuits.prefix``) come as one batch for all masks, beside
    writes made per mask: the value, and the gradients (summed over the masks for the shared ones), equal the
    formula's with every write given per mask."""
    generator = torch.Generator().manual_seed(4)
    keep = _weights("dense", generator)
    sizes = (1, 12, 17)
    writes = [torch.randn(n, 1 if n < 17 else 2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
              for n in sizes]
    others = [torch.randn(n, 1, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True) for n in sizes]
    stream = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)

    def ours(stream, *groups):
        store = DeltaStore(keep, list(sizes), [7], [sum(sizes)])
        return accumulate(store, stream, list(groups[:3]), list(groups[3:]), 0, 7)

    def formula(stream, *groups):
        return _formula(stream, keep, [w.expand(-1, 2, -1, -1) for w in groups[:3]], groups[3:])

    torch.testing.assert_close(ours(stream, *writes, *others), formula(stream, *writes, *others))
    torch.autograd.gradcheck(ours, (stream, *writes, *others))
    grads = torch.autograd.grad(ours(stream, *writes, *others).sum(), writes)
    for ours_grad, reference in zip(grads, torch.autograd.grad(formula(stream, *writes, *others).sum(), writes)):
        torch.testing.assert_close(ours_grad, reference)


def _layered(keep: torch.Tensor, generator, readers=(3, 1, 3, 1, 1), writers=(1, 4, 1, 4, 1)):
    """Reader groups and writer groups taking turns as in a model (a layer's heads, its MLP, the logits): each
    group reads every row written before it.  Returns every reader's value, in order, and the formula's."""
    store = DeltaStore(keep, list(writers), list(readers), list(itertools.accumulate(writers))[:len(readers)])
    writes, others, outs, expected, first = [], [], [], [], 0
    for n_readers, n_writers in zip(readers, (*writers[1:], 0)):
        if not writes:
            writes.append(torch.randn(writers[0], 2, 5, generator=generator, dtype=torch.float64))
            others.append(torch.randn(writers[0], 2, 5, generator=generator, dtype=torch.float64))
        stream = torch.randn(2, 5, generator=generator, dtype=torch.float64)
        outs.append(accumulate(store, stream, list(writes), list(others), first, first + n_readers))
        rows = torch.cat([o - w for w, o in zip(writes, others)])
        block = 1 - keep[:, :len(rows), first:first + n_readers]
        expected.append(stream + torch.einsum("nud,unx->dnx", block, rows))
        first += n_readers
        if n_writers:
            writes.append(torch.randn(n_writers, 2, 5, generator=generator, dtype=torch.float64))
            others.append(torch.randn(n_writers, 2, 5, generator=generator, dtype=torch.float64))
    return outs, expected


@pytest.mark.parametrize("kind", ["dense", "few moved", "few kept"])
def test_a_dense_product_carried_over_later_groups(kind, monkeypatch):
    """A product that also serves the next groups' readers (over the rows written so far; they add only the rows
    written since) gives every group's readers the formula's values, whatever route each part takes."""
    monkeypatch.setattr(patching, "CARRIED", 4)  # so that groups of 3 and 1 readers carry
    monkeypatch.setattr(patching, "_dense_cost", lambda n, u, d: 0.0 if kind == "dense" else 1e9)
    generator = torch.Generator().manual_seed(4)
    keep = 1 - torch.rand(1, 11, 9, generator=generator, dtype=torch.float64)
    if kind != "dense":
        few = torch.rand(1, 11, 9, generator=generator) < 0.2
        keep = torch.where(few, keep, torch.ones_like(keep)) if kind == "few moved" else torch.where(few, keep, 0 * keep)
    carried = []
    original = DeltaStore.carried
    monkeypatch.setattr(DeltaStore, "carried", lambda self, *a: carried.append(o := original(self, *a)) or o)
    outs, expected = _layered(keep, generator)
    for ours, reference in zip(outs, expected):
        torch.testing.assert_close(ours, reference)
    assert any(c is not None for c in carried) == (kind == "dense")


def test_readers_weighted_alike_share_one_value():
    """A node mask moves a node's edges into every later reader alike: each group's readers get one value, as a
    view (so their heads read through the plain projections), equal to the formula's."""
    generator = torch.Generator().manual_seed(5)
    keep = torch.ones(1, 11, 9, dtype=torch.float64)
    keep[0, 2] = 0.0   # node 2 patched on all of its edges
    keep[0, 7] = 0.5
    outs, expected = _layered(keep, generator)
    for ours, reference in zip(outs, expected):
        torch.testing.assert_close(ours, reference)
        assert ours.shape[0] == 1 or ours.stride(0) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_store_reads_the_mask_as_comparisons_would(dtype):
    """``DeltaStore`` reads the mask with differences and maxima instead of comparisons (``patching._summary``):
    which readers and nodes have a moved edge, which neighbouring readers see the same column, which readers have
    every edge patched fully — the same answers as comparing values, for values near 1 and 0, NaN, and a
    bf16 mask with more nodes than bf16 counts exactly (256)."""
    generator = torch.Generator().manual_seed(6)
    n_up, readers, reads = 300, [4, 1, 4, 2], [1, 130, 260, 300]
    keep = torch.ones(2, n_up, sum(readers))
    keep[:, :, 1] = keep[:, :, 0] = 1 - 2 ** -20             # two alike readers, barely moved
    keep[1, 5, 2] = float("nan")
    keep[:, :130, 4] = 0.0                                  # wholly patched ...
    keep[:, 130:, 4] = 0.5                                  # ... for the rows after its edges are not edges
    keep[:, :259, 6] = 0.0
    keep[0, 259, 6] = 2 ** -30                               # all edges but one at 0
    keep[:, :260, 7] = keep[:, :260, 8] = torch.rand(260, generator=generator) < 0.5
    keep = keep.to(dtype)
    store = DeltaStore(keep, [1] + [1] * (n_up - 1), readers, reads)
    moved = keep != 1
    assert store.moved_into == moved.any(1).any(0).tolist()
    assert store.stored == moved.any(2).any(0).tolist()
    same = (keep[..., 1:] == keep[..., :-1]).all(1).all(0).tolist()  # NaN is unlike itself
    assert [store.alike(d, d + 2) for d in range(len(same))] == same
    edges = torch.arange(n_up)[:, None] < torch.tensor(reads).repeat_interleave(torch.tensor(readers))
    assert store.wholly == ((keep == 0) | ~edges).all(1).all(0).tolist()
    assert store.wholly[4] and not store.wholly[6]
