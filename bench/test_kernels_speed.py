"""The Triton kernels against the torch products they replace, on CUDA, side by side in one run (ratios).

Shapes of SmolLM2-135M's last layer: 300 upstream nodes read by one layer's 27 q/k/v inputs (9 heads), or by
one MLP; x = 8 prompts × 14 tokens × 576 (the IOI benchmark) and 32 × 64 × 576.  The mask is dense and random:
the kernels' worst case (they skip the rows of tiles of clean edges).  Each case first checks the kernel's result."""
import pytest
import torch

from fxcircuits.patching import TorchProducts
from gpu_engine import map_kernels_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels run on CUDA")

SHAPES = {"27_readers_8x14": (300, 27, 8 * 14 * 576), "mlp_8x14": (300, 1, 8 * 14 * 576),
          "27_readers_32x64": (300, 27, 32 * 64 * 576)}
OPS = {"accumulate": lambda p, t: p.accumulate(t["stream"], t["keep"], t["rows"]),
       "grad_keep": lambda p, t: p.grad_keep(t["rows"], t["grad"]),
       "grad_rows": lambda p, t: p.grad_rows(t["keep"], t["grad"])}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # of the largest value


def _tensors(shape, dtype) -> dict[str, torch.Tensor]:
    n_up, n_readers, size_x = shape
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=generator, device="cuda").to(dtype)
    return {"stream": randn(1, size_x), "rows": randn(n_up, 1, size_x), "grad": randn(n_readers, 1, size_x),
            "keep": torch.rand(1, n_up, n_readers, generator=generator, device="cuda")}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_kernel_speed(benchmark, op, shape, dtype):
    from triton.testing import do_bench
    map_kernels_folder()
    from fxcircuits.kernels import accumulate as kernels
    dtype = getattr(torch, dtype)
    tensors, run = _tensors(SHAPES[shape], dtype), OPS[op]
    ours, reference = run(kernels, tensors).float(), run(TorchProducts(), tensors).float()
    torch.testing.assert_close(ours, reference, rtol=0, atol=TOLERANCE[dtype] * reference.abs().max().item())
    ours_ms, torch_ms = do_bench(lambda: run(kernels, tensors)), do_bench(lambda: run(TorchProducts(), tensors))
    benchmark.pedantic(lambda: (run(kernels, tensors), torch.cuda.synchronize()), rounds=20, warmup_rounds=2)
    benchmark.extra_info.update(kernel_ms=ours_ms, torch_ms=torch_ms, speedup=torch_ms / ours_ms)
    print(f"\n{op} {shape} {dtype}: kernel {ours_ms:.3f} ms, torch {torch_ms:.3f} ms, {torch_ms / ours_ms:.2f}x")
