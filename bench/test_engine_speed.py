"""Engine cost against the bare HF model, measured side by side in one run (ratios, not seconds).

Targets (issue 2): a clean run ≤ 1.2× the HF forward; a patched run (corrupted pass included) ≤ 2.5×."""
import torch
from torch.utils.benchmark import Timer


def _median(fn) -> float:
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=2.0).median


def _report(benchmark, name, seconds, hf):
    benchmark.extra_info.update({f"{name}_s": seconds, f"{name}_vs_hf": seconds / hf, "hf_s": hf})
    print(f"\n{name}: {seconds * 1e3:.0f} ms = {seconds / hf:.2f}x the HF forward ({hf * 1e3:.0f} ms)")


def test_clean_run(benchmark, smollm2):
    model, cm, clean, _ = smollm2
    with torch.no_grad():
        hf = _median(lambda: model(input_ids=clean).logits)
        ours = _median(lambda: cm(clean))
        benchmark(cm, clean)
    _report(benchmark, "clean", ours, hf)


def test_patched_run(benchmark, smollm2):
    model, cm, clean, corrupted = smollm2
    mask = torch.rand(len(cm.graph.edges), generator=torch.Generator().manual_seed(0))
    patched = lambda: cm(clean, corrupted_input_ids=corrupted, edge_mask=mask)  # noqa: E731
    with torch.no_grad():
        hf = _median(lambda: model(input_ids=clean).logits)
        ours = _median(patched)
        benchmark(patched)
    _report(benchmark, "patched", ours, hf)


def test_mask_gradient(benchmark, smollm2):
    """Forward + backward to an all-ones edge mask (what attribution patching needs), against HF's own
    forward + backward to its input embeddings."""
    model, cm, clean, corrupted = smollm2
    other = cm.activations(corrupted).detach()

    def ours():
        mask = torch.ones(len(cm.graph.edges), requires_grad=True)
        cm(clean, corrupted_activations=other, edge_mask=mask)[:, -1].logsumexp(-1).sum().backward()

    def hf():
        embeds = model.get_input_embeddings()(clean).detach().requires_grad_(True)
        model(inputs_embeds=embeds).logits[:, -1].logsumexp(-1).sum().backward()

    hf_s, ours_s = _median(hf), _median(ours)
    benchmark(ours)
    _report(benchmark, "mask_gradient", ours_s, hf_s)
