"""Low-level circuit finding, the talk's second walkthrough: node patching, edge patching by the linearity of
the residual stream, path patching to the logits (and direct logit attribution, which estimates its direct path),
the logit lens on what was found, where the found heads look and what they write from there, and at which tokens
the found nodes act.

On the real SmolLM2-135M (offline, CPU), on indirect object identification ("When Mary and John went to the
store, John gave a drink to" → " Mary"; corrupted: the subject's second mention replaced by a third name).

    python examples/low_level_circuit_finding.py [--size 16] [--per-call 32]
"""
from __future__ import annotations

import argparse

import torch

import fxcircuits
from fxcircuits.metrics import logit_diff


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16, help="number of IOI examples (one batch)")
    parser.add_argument("--per-call", type=int, default=32, help="node patches evaluated per batched call")
    args = parser.parse_args()

    model, tokenizer = fxcircuits.load_model("smollm2-135m")
    cm = fxcircuits.trace(model)
    task = fxcircuits.tasks.load("ioi", tokenizer, size=args.size, batch_size=args.size)
    batch = task.batches[0]
    clean, corrupted, mask = batch["clean"], batch["corrupted"], batch["attention_mask"]
    base = logit_diff(cm(clean, mask), batch).mean()
    other = cm.activations(corrupted, mask)   # every node's output on the corrupted prompts, once
    print(f"{task.examples[0].clean!r} → {task.examples[0].correct[0]!r}; logit difference {base:.2f} clean, "
          f"{logit_diff(cm(corrupted, mask), batch).mean():.2f} corrupted")

    # 1. Node patching: each head's and MLP's output replaced by its corrupted output, many nodes per call.
    nodes = cm.graph.upstream[1:]
    effects = []
    for first in range(0, len(nodes), args.per_call):
        chunk = nodes[first:first + args.per_call]
        masks = torch.ones(len(chunk), len(cm.graph.upstream))
        masks[torch.arange(len(chunk)), [cm.graph.node_index[n] for n in chunk]] = 0.0
        patched = cm(clean, mask, corrupted_activations=other, node_mask=masks)
        effects += (base - logit_diff(patched, batch).mean(-1)).tolist()
    ranked = sorted(zip(nodes, effects), key=lambda item: -abs(item[1]))[:6]
    print("\n1. node patching, largest drops in logit difference: "
          + ", ".join(f"{name} {value:+.2f}" for name, value in ranked))
    top = ranked[0][0]

    # 2. Edge patching by linearity: the logits read the residual stream, a sum of every node's output, so
    #    patching the edge top -> logits means: take the last stream, subtract top's clean output, add its
    #    corrupted output.
    acts, stream = cm.activations(clean, mask), cm.streams(clean, mask)[-1]
    u = cm.graph.node_index[top]
    by_hand = cm.readout(stream - acts[u] + other[u])
    engine = cm(clean, mask, corrupted_activations=other, edge_mask={f"{top}->logits": 0.0})
    gap = (by_hand - engine).abs().max() / engine.abs().max()
    print(f"\n2. edge {top}->logits patched by hand (stream − clean + corrupted output) and by the engine: "
          f"relative difference {gap:.1e}")

    # 3. Path patching to the logits: the direct path (top -> logits) against all of top's other paths.
    outgoing = [e for e in cm.graph.edges if e.startswith(f"{top}->")]
    direct = base - logit_diff(engine, batch).mean()
    indirect = base - logit_diff(cm(clean, mask, corrupted_activations=other,
                                    edge_mask={e: 0.0 for e in outgoing if e != f"{top}->logits"}), batch).mean()
    total = dict(ranked)[top]
    print(f"3. paths of {top}: total effect {total:+.2f}, direct to the logits {direct:+.2f}, "
          f"through later nodes {indirect:+.2f}")
    #    Direct logit attribution estimates each found node's direct path without a patched run: what it writes
    #    straight into the logit difference (through the final norm at the whole stream's scale), clean less
    #    corrupted.  A node whose total effect is large and direct share small acts through later nodes.
    names, answers = [name for name, _ in ranked], (batch["correct"], batch["incorrect"])
    share = [fxcircuits.direct_logits(cm, ids, mask, nodes=names, tokens=torch.cat(answers, 1))  # only these logits
             .logit_diff(*answers).mean((1, 2)) for ids in (clean, corrupted)]
    print("   direct logit attribution, clean less corrupted: "
          + ", ".join(f"{name} {value:+.2f}" for name, value in zip(names, share[0] - share[1])))

    # 4. The logit lens: what the stream predicts after each layer, and what the found nodes write.
    lens = fxcircuits.logit_lens(cm, clean, mask)
    answer = lens.answer_probs(batch["correct"])[:, :, 0].mean(1)
    rows = [i for i, label in enumerate(lens.labels) if label.startswith("m")][::5] + [len(lens.labels) - 1]
    print("\n4. logit lens, p(correct name) after layer: "
          + ", ".join(f"{lens.labels[i]} {answer[i]:.2f}" for i in rows))
    found = fxcircuits.logit_lens(cm, clean, mask, nodes=[name for name, _ in ranked[:3]])
    print("   what the found nodes write (example 0, top tokens):")
    print("   " + found.table(tokenizer, k=4).replace("\n", "\n   "))

    # 5. Attention patterns: which tokens the found heads read from the last token (the name movers of IOI read
    #    the indirect object there).
    heads = [name for name, _ in ranked if name.startswith("a")] or ["a24.h4"]
    patterns = fxcircuits.attention_patterns(cm, clean, mask, heads=heads)
    print("\n5. attention from the last token (example 0, top tokens):")
    print("   " + patterns.table(tokenizer, k=3).replace("\n", "\n   "))
    on_roles = patterns.by_span(batch["spans"]).mean(1)  # [heads, spans]: the batch's templates lined up by role
    print("   mean weight on each role over the batch:")
    for head, row in zip(heads, on_roles.tolist()):
        print(f"   {head:>6}  " + "  ".join(f"{name} {w:.2f}" for name, w in zip(batch["spans"], row)))
    #    What they write from there: each head's direct logit difference split by the token it reads (its weight
    #    there times its value) — a name mover writes for the IO from the IO, a negative one against it.
    sources = fxcircuits.source_logits(cm, clean, mask, heads=heads, tokens=torch.cat(answers, 1))
    print("   direct share of the logit difference by the token read (example 0, largest first):")
    print("   " + sources.table(tokenizer, *answers, k=3).replace("\n", "\n   "))

    # 6. Where in the prompt: each found node's output patched at one token at a time (example 0 alone), as a
    #    fraction of the logit difference's drop with every node patched.  The late heads of step 5 act at the last
    #    token, whose query reads the names; an earlier node may act where the prompts differ, at the second S.
    where = fxcircuits.patch_by_position(cm, fxcircuits.data.example(batch, 0), task.metric, nodes=names)
    print("\n6. patched at one token, largest effect first (example 0, fraction of the whole):")
    print("   " + where.table(tokenizer, k=3, normalized=True).replace("\n", "\n   "))
    #    The same over the whole batch: its prompts follow different templates, so each node is patched at each
    #    named role (IO, S1, S2, END: the task's spans), wherever each prompt has it, and the effects averaged.
    roles = fxcircuits.patch_by_position(cm, batch, task.metric, nodes=names, spans=True)
    print("   by role, over the batch (mean fraction of the whole):")
    print("   " + roles.table(k=2, example=None, normalized=True).replace("\n", "\n   "))


if __name__ == "__main__":
    main()
