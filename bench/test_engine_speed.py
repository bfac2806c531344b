"""Engine cost against the bare HF model, measured side by side in one run (ratios, not seconds).

Targets (issue 2): a clean run ≤ 1.2× the HF forward; a patched run (corrupted pass included) ≤ 2.5×."""
import pytest
import torch
from operations import count
from torch.utils.benchmark import Timer

import fxcircuits


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


def _mask(kind: str, cm, batch: dict) -> torch.Tensor:
    n_edges, generator = len(cm.graph.edges), torch.Generator().manual_seed(0)
    if kind == "dense":      # every edge interpolated: the full product in every step
        return torch.rand(n_edges, generator=generator)
    if kind == "circuit":    # a random 5% of the edges kept, everything else patched: the worst circuit
        return (torch.rand(n_edges, generator=generator) < 0.05).float()
    if kind.startswith("found_circuit"):  # the top 5% (1%) of EAP's scores on these prompts, everything else patched
        scores = fxcircuits.attribute(cm, [batch], "logit_diff", "eap", progress=False)
        return scores.topn(0.01 if kind.endswith("1pct") else 0.05).edge_mask(cm.graph)
    return torch.ones(n_edges).index_fill(0, torch.tensor([n_edges // 2]), 0.0)  # one edge patched


@pytest.mark.parametrize("kind", ["dense", "circuit", "found_circuit", "found_circuit_1pct", "one_edge"])
def test_patched_run(benchmark, smollm2, batch, kind):
    model, cm, clean, corrupted = smollm2
    mask = _mask(kind, cm, batch)
    patched = lambda: cm(clean, corrupted_input_ids=corrupted, edge_mask=mask)  # noqa: E731
    with torch.no_grad():
        hf = _median(lambda: model(input_ids=clean).logits)
        ours = _median(patched)
        benchmark(patched)
    _report(benchmark, f"patched_{kind}", ours, hf)


def test_node_patched_run(benchmark, smollm2):
    """Activation patching: one MLP's output swapped for the corrupted run's on all of its edges."""
    model, cm, clean, corrupted = smollm2
    patched = lambda: cm(clean, corrupted_input_ids=corrupted, node_mask={"m5": 0.0})  # noqa: E731
    with torch.no_grad():
        hf = _median(lambda: model(input_ids=clean).logits)
        ours = _median(patched)
        benchmark(patched)
    _report(benchmark, "patched_node", ours, hf)


def test_exact_patching_throughput(benchmark, smollm2):
    """Single-edge patches, 16 per batched call over the 8 prompts, corrupted activations computed once."""
    _, cm, clean, corrupted = smollm2
    n_edges, per_call = len(cm.graph.edges), 16
    with torch.no_grad():
        other = cm.activations(corrupted)
        masks = torch.ones(per_call, n_edges)
        masks[torch.arange(per_call), torch.arange(per_call) * (n_edges // per_call)] = 0.0
        seconds = _median(lambda: cm(clean, corrupted_activations=other, edge_mask=masks))
        benchmark(cm, clean, corrupted_activations=other, edge_mask=masks)
    benchmark.extra_info["edges_per_second"] = per_call / seconds
    print(f"\nexact patching: {per_call / seconds:.1f} edges/s ({n_edges / (per_call / seconds) / 3600:.1f} h for all "
          f"{n_edges} edges of SmolLM2 on 8 prompts)")


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


@pytest.mark.parametrize("kind", ["dense", "circuit", "one_edge"])
def test_operations_per_run(benchmark, smollm2, batch, kind):
    """Operations per patched run against the HF forward: where a small model on a GPU is bound by launches
    (SmolLM2 on 8 prompts is), this ratio, not arithmetic, sets the patched run's cost.  On CPU the sparse
    routes add a few CPU-only decisions per reader group (counted here too)."""
    model, cm, clean, corrupted = smollm2
    mask = _mask(kind, cm, batch)
    with torch.no_grad():
        counted = {name: count(run) for name, run in (
            ("hf", lambda: model(input_ids=clean).logits), ("recording", lambda: cm.groups(corrupted)),
            ("patched", lambda: cm(clean, corrupted_input_ids=corrupted, edge_mask=mask)))}
        benchmark.pedantic(cm, (clean,), {"corrupted_input_ids": corrupted, "edge_mask": mask}, rounds=1)
    hf, patched, waits = counted["hf"].launches(), counted["patched"].launches(), counted["patched"].waits()
    benchmark.extra_info.update({"hf_operations": hf, "patched_operations": patched, "scalar_reads": waits})
    print(f"\n{kind}: {patched} operations per patched run (the recording's {counted['recording'].launches()} "
          f"included), {patched / hf:.2f}x the HF forward's {hf}; {waits} scalar reads (.item(): on a GPU the host "
          "waits for the device)")
