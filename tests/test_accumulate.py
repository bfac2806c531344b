"""The accumulation behind every patched run: each route equals the dense product, gradients included."""
import pytest
import torch

from fxcircuits.patching import DeltaStore, accumulate, weighted_rows


def _weights(kind: str, generator) -> torch.Tensor:
    shape = (2, 30, 7)
    dense = torch.rand(shape, generator=generator, dtype=torch.float64)
    few = (torch.rand(shape, generator=generator) < 0.03).double()
    return {"dense": dense, "few moved": few * dense, "few kept": 1 - few * dense, "none": torch.zeros(shape),
            "all": torch.ones(shape)}[kind].double()


@pytest.mark.parametrize("kind", ["dense", "few moved", "few kept", "none", "all"])
def test_every_route_equals_the_dense_product(kind):
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
    store, writes, others = DeltaStore(keep, [1, 12, 17]), [], []
    for n in (1, 12, 17):
        writes.append(torch.randn(n, 2, 3, generator=generator, dtype=torch.float64))
        others.append(torch.randn(n, 1, 3, generator=generator, dtype=torch.float64))
        rows, nodes = store.extend(writes, others)
        stored = [o - w for o, w, kept in zip(others, writes, (True, False, True)) if kept]
        torch.testing.assert_close(rows, torch.cat(stored))
        torch.testing.assert_close(store.rows_sum(), torch.cat(stored).sum(0))
    assert nodes.tolist() == [0, *range(13, 30)]
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
        return accumulate(DeltaStore(keep, list(sizes)), stream, list(groups[:3]), list(groups[3:]), 0, 7)

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
        return accumulate(DeltaStore(keep, list(sizes)), stream, list(groups[:3]), list(groups[3:]), 0, 7)

    assert DeltaStore(keep, list(sizes)).stored == [True, False, True]
    torch.testing.assert_close(ours(stream, *writes, *others), _formula(stream, keep, writes, others))
    torch.autograd.gradcheck(ours, (stream, *writes, *others))
