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


@pytest.mark.parametrize("kind", ["dense", "few moved", "few kept"])
def test_gradients_of_accumulate(kind):
    generator = torch.Generator().manual_seed(1)
    keep = (1 - _weights(kind, generator)).requires_grad_(True)
    groups = [torch.randn(n, 2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True) for n in (1, 12, 17)]
    stream = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)

    def ours(stream, keep, *groups):
        return accumulate(DeltaStore(30), stream, list(groups), keep)

    def reference(stream, keep, *groups):
        delta = torch.cat(groups).reshape(30, 2, -1)
        return stream + torch.einsum("nud,unx->dnx", 1 - keep, delta).reshape(7, 2, 3, 4)

    torch.testing.assert_close(ours(stream, keep, *groups), reference(stream, keep, *groups))
    torch.autograd.gradcheck(ours, (stream, keep, *groups))
