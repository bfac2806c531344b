"""The engine on a GPU against the bare HF model, with the Triton kernels and with the torch path, in one run.

    PYTHONPATH=. python bench/gpu_engine.py --out gpu_engine.json

A randomly initialised Llama of SmolLM2-135M's shape (weights do not change the cost) on 8 prompts of 14 tokens,
the size of the IOI benchmark on CPU, traced once per dtype.  For fp32 and bf16 it measures the HF forward
and forward + backward, a clean run, patched runs (dense random mask, a circuit of 5% of the edges, one edge;
the corrupted pass included) and the mask gradient (forward + backward to an all-ones edge mask: edge
attribution patching), each once through the kernels and once through the torch path, and checks that both
paths give the same logits and edge scores.  It also counts the operations each run launches, and the scalar
reads that make the host wait: at this size a GPU is bound by launches.  Figures are medians of
``torch.utils.benchmark`` blocked runs (which synchronise the GPU), measured side by side so that ratios can be
compared.  Results go to ``--out`` as JSON after each dtype, so a run cut short keeps what it measured; a
measurement that fails is recorded as its error (so is a model that cannot be traced), and the script then
exits with status 1.  ``--device cpu --layers 2`` is a quick dry run (there both paths are the torch one).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import traceback
from pathlib import Path
from unittest import mock

import torch
from operations import count
from torch.utils.benchmark import Timer

import fxcircuits
from fxcircuits import patching

SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0,
                "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}
PATHS = {"kernels": patching.products,
         "torch": lambda rows, rows_sum=None, partition=None: patching.TorchProducts(rows_sum, partition)}


def map_kernels_folder() -> None:
    """Make ``fxcircuits.kernels`` importable from an uninstalled checkout (``PYTHONPATH=.``).

    The folder ``kernels/fxcircuits_kernels/`` becomes ``fxcircuits.kernels`` only through installation
    (pyproject's package-dir); this maps it the same way, once, when no installed copy is found."""
    if importlib.util.find_spec("fxcircuits.kernels") is not None:
        return
    folder = Path(__file__).resolve().parents[1] / "kernels" / "fxcircuits_kernels"
    spec = importlib.util.spec_from_file_location("fxcircuits.kernels", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fxcircuits.kernels = package
    spec.loader.exec_module(package)


def build(dtype: torch.dtype, device: str, layers: int, attention: str):
    """(HF model, CircuitModel) of SmolLM2-135M's shape with random weights, traced on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers}, attn_implementation=attention)
    model = LlamaForCausalLM(config).to(device, dtype).eval()
    return model, fxcircuits.trace(model)


def edge_masks(n_edges: int, device: str) -> dict[str, torch.Tensor]:
    """A dense random mask (the full product everywhere), a circuit of 5% of the edges, and one patched edge."""
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(n_edges, generator=generator)
    one_edge = torch.ones(n_edges).index_fill(0, torch.tensor([n_edges // 2]), 0.0)
    return {name: m.to(device) for name, m in
            {"dense": uniform, "circuit": (uniform < 0.05).float(), "one_edge": one_edge}.items()}


def seconds(fn, min_run_time: float) -> float:
    fn()  # first call outside the timing: lazy initialisation, Triton compilation
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


class Run:
    """One dtype's figures: ``measure`` records seconds, or the error that stopped a measurement."""

    def __init__(self, min_run_time: float):
        self.min_run_time, self.figures, self.failed = min_run_time, {}, False

    def measure(self, name: str, fn) -> None:
        try:
            self.figures[f"{name}_s"] = seconds(fn, self.min_run_time)
        except Exception as error:  # keep the other figures of a run that has only minutes of GPU time
            traceback.print_exc()
            self.figures[f"{name}_s"], self.failed = f"error: {error!r}", True


def hf_gradient(model, ids):
    """HF forward + backward to its input embeddings, with the metric the mask gradient uses."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits[:, -1].float().logsumexp(-1).sum().backward()


def hf_eap_passes(model, batch):
    """What any EAP runs: a corrupted forward, a clean forward, a clean forward + backward (issue 3's baseline)."""
    with torch.no_grad():
        model(input_ids=batch["corrupted"])
        model(input_ids=batch["clean"])
    embeds = model.get_input_embeddings()(batch["clean"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    torch.autograd.grad(fxcircuits.metrics.logit_diff(logits, batch).sum(), embeds)


def edge_scores(cm, clean, other) -> torch.Tensor:
    """d metric / d edge mask at an all-ones mask: edge attribution patching."""
    mask = torch.ones(len(cm.graph.edges), device=clean.device, requires_grad=True)
    cm(clean, corrupted_activations=other, edge_mask=mask)[:, -1].float().logsumexp(-1).sum().backward()
    return mask.grad


def measure_dtype(dtype: torch.dtype, args) -> tuple[dict, bool]:
    """Every figure of one dtype, and whether a measurement failed."""
    model, cm = build(dtype, args.device, args.layers, args.attention)
    generator = torch.Generator().manual_seed(1)
    clean, corrupted = (torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.seq), generator=generator)
                        .to(args.device) for _ in range(2))
    with torch.no_grad():
        other = cm.activations(corrupted)
    masks = edge_masks(len(cm.graph.edges), args.device)
    run, outputs = Run(args.min_run_time), {}
    with torch.no_grad():
        run.measure("hf_forward", lambda: model(input_ids=clean).logits)
        run.measure("clean", lambda: cm(clean))
    run.measure("hf_forward_backward", lambda: hf_gradient(model, clean))
    for path, products in PATHS.items():
        with mock.patch.object(patching, "products", products):
            with torch.no_grad():
                for kind, mask in masks.items():
                    run.measure(f"{path}.patched_{kind}",
                                lambda mask=mask: cm(clean, corrupted_input_ids=corrupted, edge_mask=mask))
                outputs[path] = cm(clean, corrupted_input_ids=corrupted, edge_mask=masks["dense"]).float()
            run.measure(f"{path}.mask_gradient", lambda: edge_scores(cm, clean, other))
            outputs[f"{path}.scores"] = edge_scores(cm, clean, other).float()
    with torch.no_grad():
        runs = {"hf_forward": lambda: model(input_ids=clean).logits, "clean": lambda: cm(clean),
                **{f"patched_{kind}": lambda mask=mask: cm(clean, corrupted_input_ids=corrupted, edge_mask=mask)
                   for kind, mask in masks.items()}}
        for name, fn in runs.items():
            operations = count(fn)
            run.figures[f"operations.{name}"], run.figures[f"scalar_reads.{name}"] = (operations.launches(),
                                                                                      operations.waits())
    batch = {"clean": clean, "corrupted": corrupted, "correct": clean[:, :1], "incorrect": clean[:, 1:2]}
    run.measure("hf_eap_passes", lambda: hf_eap_passes(model, batch))
    run.measure("eap_attribute", lambda: fxcircuits.attribute(cm, [batch], "logit_diff", "eap", progress=False))
    figures = run.figures
    figures["max_logit_difference_kernels_vs_torch"] = (outputs["kernels"] - outputs["torch"]).abs().max().item()
    scores = outputs["torch.scores"]
    figures["max_score_difference_kernels_vs_torch_relative"] = (
        (outputs["kernels.scores"] - scores).abs().max() / scores.abs().max()).item()
    figures.update(ratios(figures))
    return figures, run.failed


def ratios(figures: dict) -> dict:
    """Each engine figure against its HF baseline (the forward, or forward + backward for gradients)."""
    def baseline(name):
        if name.startswith("eap"):
            return figures["hf_eap_passes_s"]
        return figures["hf_forward_backward_s"] if "gradient" in name else figures["hf_forward_s"]
    timed = {name: s for name, s in figures.items() if name.endswith("_s") and not name.startswith("hf_")}
    return {name[:-2] + "_vs_hf": s / baseline(name) for name, s in timed.items()
            if isinstance(s, float) and isinstance(baseline(name), float)}


def environment(device: str) -> dict:
    import transformers
    try:
        import triton
    except ImportError:
        triton = None
    return {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": triton.__version__ if triton else None, "python": platform.python_version()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=14)
    parser.add_argument("--attention", default="sdpa", help="the HF attention implementation (sdpa, eager)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of blocked runs per figure")
    args = parser.parse_args()
    map_kernels_folder()
    results, failed = {"environment": environment(args.device), "args": vars(args)}, False
    for name in args.dtypes:
        try:
            results[name], dtype_failed = measure_dtype(getattr(torch, name), args)
        except Exception as error:  # e.g. a model that cannot be traced: record it, try the next dtype
            traceback.print_exc()
            results[name], dtype_failed = {"error": repr(error)}, True
        failed |= dtype_failed
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"\n{name}:\n" + "\n".join(f"  {key:55} {value}" for key, value in results[name].items()), flush=True)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
