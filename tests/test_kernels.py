"""The Triton kernels of ``fxcircuits.kernels`` against the torch products, on CPU through Triton's interpreter.

``@triton.jit`` picks compiled or interpreted once, when the kernel module is imported, from TRITON_INTERPRET.
Setting the variable inside this session is not reliable (another test or a CUDA dispatch may have imported
the kernels already) and would leak into every later import, so each dtype runs in a fresh interpreter started
with the variable set: ``python tests/test_kernels.py <dtype>`` runs every check and fails on the first error."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

# (n_masks, n_upstream, n_readers, x): sizes that are not multiples of any block, several masks, more nodes
# than one tile holds; masks whose weight tiles are all zero (skipped), none zero, or partly zero
SIZES = [(1, 37, 5, 3 * 7 * 11), (2, 20, 67, 200), (1, 131, 3, 70)]
KEEPS = ["dense", "binary", "zeros", "ones", "one edge"]
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
             torch.float16: {"rtol": 1e-3, "atol": 1e-3}}


def _levels(shape, generator) -> torch.Tensor:
    """Mask values k/64: their 1 − keep is exact in bf16, which the interpreter's casts truncate (the GPU's round)."""
    return torch.randint(0, 65, shape, generator=generator) / 64


def _keep(kind: str, shape: tuple[int, int, int], generator) -> torch.Tensor:
    """A slice of a larger mask, as ``accumulate`` hands it (not contiguous)."""
    n, u, d = shape
    full = {"dense": _levels((n, u + 3, d + 2), generator),
            "binary": (torch.rand(n, u + 3, d + 2, generator=generator) < 0.9).float(),
            "zeros": torch.zeros(n, u + 3, d + 2), "ones": torch.ones(n, u + 3, d + 2),
            "one edge": torch.ones(n, u + 3, d + 2).index_put_((torch.tensor(0), torch.tensor(u // 2),
                                                               torch.tensor(1)), torch.tensor(0.0))}[kind]
    return full[:, :u, 1:d + 1]


def _check_products(dtype: torch.dtype) -> None:
    """Each kernel equals ``TorchProducts`` run in float64 on the same (rounded) inputs."""
    from fxcircuits.kernels import accumulate as kernels
    from fxcircuits.patching import TorchProducts
    reference = TorchProducts()
    generator = torch.Generator().manual_seed(0)
    for (n, u, d, x) in SIZES:
        stream = torch.randn(n, x, generator=generator).to(dtype)
        rows = torch.randn(u, n, x, generator=generator).to(dtype)
        grad = torch.randn(d, n, x, generator=generator).to(dtype)
        for kind in KEEPS:
            keep = _keep(kind, (n, u, d), generator)
            exact = {"accumulate": reference.accumulate(stream.double(), keep.double(), rows.double()),
                     "grad_keep": reference.grad_keep(rows.double(), grad.double()),
                     "grad_rows": reference.grad_rows(keep.double(), grad.double())}
            ours = {"accumulate": kernels.accumulate(stream, keep, rows),
                    "grad_keep": kernels.grad_keep(rows, grad),
                    "grad_rows": kernels.grad_rows(keep, grad)}
            for name, value in ours.items():
                expected_dtype = torch.float32 if name == "grad_keep" else dtype
                assert value.dtype == expected_dtype, (name, value.dtype)
                where = f"{name}, sizes {(n, u, d, x)}, {kind} keep"
                torch.testing.assert_close(value.double(), exact[name], **TOLERANCE[dtype],
                                           msg=lambda message, where=where: f"{where}: {message}")


def _check_accumulate(dtype: torch.dtype) -> None:
    """``patching.accumulate`` with the kernels (as on CUDA) equals its torch path, gradients included."""
    from unittest import mock

    from fxcircuits import patching
    from fxcircuits.kernels import accumulate as kernels
    generator = torch.Generator().manual_seed(1)
    keep = _levels((2, 30, 7), generator)
    writes = [torch.randn(k, 2, 3, 4, generator=generator).to(dtype) for k in (1, 12, 17)]
    others = [torch.randn(k, 2, 3, 4, generator=generator).to(dtype) for k in (1, 12, 17)]
    stream = torch.randn(2, 3, 4, generator=generator).to(dtype)

    def run(path):
        inputs = [t.clone().requires_grad_(True) for t in (stream, keep, *writes, *others)]
        with mock.patch.object(patching, "products", lambda rows, rows_sum=None, partition=None: path):
            store = patching.DeltaStore(inputs[1], [1, 12, 17], [7], [30])
            out = patching.accumulate(store, inputs[0], inputs[2:5], inputs[5:], 0, 7)
            out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dtype))
        return [out, *(t.grad for t in inputs)]

    for ours, reference in zip(run(kernels), run(patching.TorchProducts())):
        torch.testing.assert_close(ours, reference, **TOLERANCE[dtype])


def _check_model(dtype: torch.dtype) -> None:
    """Whole patched runs through the kernels (as on CUDA) equal the torch path's, logits and mask gradients (EAP's
    product): tiny Llama (grouped keys and values) and GPT-2 (biases), left padding, three masks in one call —
    soft, a circuit's, one edge — and a positional mask of two classes, each product routed as on CUDA (no sums
    carried from reader to reader: ``DeltaStore.carried``).  ``_check_accumulate`` checks one ``accumulate``; this
    checks every call a patched run makes of it, on the strides and slices the runs hand over."""
    from unittest import mock

    import fxcircuits
    from fxcircuits import patching
    from fxcircuits.kernels import accumulate as kernels
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from zoo import make

    generator = torch.Generator().manual_seed(2)
    ids, corrupted = (torch.randint(0, 100, (2, 6), generator=generator) for _ in range(2))
    attention_mask = torch.ones(2, 6, dtype=torch.long)
    attention_mask[1, :2] = 0
    classes = torch.zeros(2, 6)
    classes[0, 4:], classes[1, :4] = 1, 1  # the last two tokens, and the rest
    for name in ("llama", "gpt2"):
        cm = fxcircuits.trace(make(name).to(dtype))
        n = len(cm.graph.edges)
        masks = torch.stack([_levels((n,), generator), (torch.rand(n, generator=generator) < 0.1).float(),
                             torch.ones(n).index_fill(0, torch.tensor([n // 2]), 0.0)])
        calls = {"three masks": {"edge_mask": masks},
                 "by position": {"edge_mask": masks[:2], "mask_positions": classes}}
        for what, call in calls.items():
            def run(path, call=call):
                mask = call["edge_mask"].clone().requires_grad_(True)
                with mock.patch.object(patching, "products", lambda rows, rows_sum=None, partition=None: path), \
                        mock.patch.object(patching.DeltaStore, "carried", lambda *args: None):  # CUDA's route
                    logits = cm(ids, attention_mask, corrupted_input_ids=corrupted, **{**call, "edge_mask": mask})
                    logits.float().square().mean().backward()
                return logits, mask.grad

            for ours, reference in zip(run(kernels), run(patching.TorchProducts())):  # in units of the largest
                scale = reference.float().abs().max()
                torch.testing.assert_close(ours.float() / scale, reference.float() / scale, **TOLERANCE[dtype],
                                           msg=lambda message, where=f"{name}, {what}": f"{where}: {message}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_kernels_equal_the_torch_products(dtype):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}  # this session's modules
    result = subprocess.run([sys.executable, __file__, dtype], env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


if __name__ == "__main__":
    _check_products(getattr(torch, sys.argv[1]))
    _check_accumulate(getattr(torch, sys.argv[1]))
    _check_model(getattr(torch, sys.argv[1]))
