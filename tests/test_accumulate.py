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
    torch.testing.assert_close(weighted_rows(weights, rows), torch.einsum("nud,unx->dnx", weights, rows))


def test_the_running_sum_equals_the_sum_of_the_rows():
    generator = torch.Generator().manual_seed(2)
    store, writes, others = DeltaStore(30), [], []
    for n in (1, 12, 17):
        writes.append(torch.randn(n, 2, 3, generator=generator, dtype=torch.float64))
        others.append(torch.randn(n, 1, 3, generator=generator, dtype=torch.float64))
        rows = store.extend(writes, others)
        torch.testing.assert_close(store.rows_sum(), (torch.cat(others) - torch.cat(writes)).sum(0))
        torch.testing.assert_close(rows, torch.cat(others) - torch.cat(writes))


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
        return accumulate(DeltaStore(30), stream, list(groups[:3]), list(groups[3:]), keep)

    def reference(stream, keep, *groups):
        rows = torch.cat([o - w for w, o in zip(groups[:3], groups[3:])]).reshape(30, 2, -1)
        return stream + torch.einsum("nud,unx->dnx", 1 - keep, rows).reshape(7, 2, 3, 4)

    torch.testing.assert_close(ours(stream, keep, *writes, *others), reference(stream, keep, *writes, *others))
    torch.autograd.gradcheck(ours, (stream, keep, *writes, *others))
