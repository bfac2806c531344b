"""High-level circuit finding, the talk's first walkthrough: automated discovery, evaluation, a drawing.

On the real SmolLM2-135M (offline, CPU): build a task, score every edge with EAP-IG, keep the best 1%,
check that the circuit is faithful (everything outside it patched), see how faithfulness grows with circuit
size and how many edges keep 85% of it, read what its nodes write with the logit lens (the talk's "upweight
y > YY"), and save the circuit (EAP-IG/MIB JSON) and its picture.

    python examples/high_level_circuit_finding.py [--task greater-than] [--size 32] [--method eap-ig-inputs]
"""
from __future__ import annotations

import argparse
import time

import fxcircuits
from fxcircuits.draw import draw_circuit, plot_faithfulness

FRACTIONS = (0.001, 0.005, 0.01, 0.05, 0.2, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="greater-than", help="greater-than, sva or ioi")
    parser.add_argument("--size", type=int, default=32, help="number of examples")
    parser.add_argument("--method", default="eap-ig-inputs", choices=fxcircuits.METHODS)
    parser.add_argument("--edges", type=float, default=0.01, help="fraction of edges to keep")
    parser.add_argument("--out", default="circuit", help="file stem for circuit.json, .svg and the curve .png")
    args = parser.parse_args()
    start = time.perf_counter()

    model, tokenizer = fxcircuits.load_model("smollm2-135m")
    cm = fxcircuits.trace(model)
    print(cm)
    task = fxcircuits.tasks.load(args.task, tokenizer, size=args.size)
    print(f"task {task.name}: {len(task.examples)} examples, e.g. {task.examples[0].clean!r} → "
          f"{task.examples[0].correct[:3]}…")
    print(f"metric {task.metric.__name__}: clean {task.baseline(cm):.3f}, corrupted "
          f"{task.baseline(cm, corrupted=True):.3f}")

    trained = {"density": args.edges} if args.method == "mask" else {}  # a learned mask keeps as many as asked
    scores = fxcircuits.attribute(cm, task.batches, task.metric, args.method, **trained)
    print("\nstrongest edges:")
    for index in scores.tensor.abs().argsort(descending=True)[:8].tolist():
        print(f"  {cm.graph.edges[index]:28} {scores.tensor[index]:+.4f}")
    nodes = sorted(scores.nodes().items(), key=lambda item: -abs(item[1]))[:6]
    print("strongest nodes: " + ", ".join(f"{name} {value:+.3f}" for name, value in nodes))

    circuit = scores.topn(args.edges, prune=args.method != "mask")  # a learned mask's: the gates it trained
    evaluator = fxcircuits.Evaluator(cm, task.batches, task.metric)
    faithfulness = evaluator.evaluate(circuit).faithfulness
    print(f"\ncircuit: {len(circuit)} edges, {len(circuit.nodes)} nodes; faithfulness {faithfulness:.3f} "
          f"(1 = the whole model's behaviour, 0 = the corrupted run's)")
    print(f"completeness: with the circuit knocked out, faithfulness is {evaluator.completeness(circuit):.3f}")

    curve = evaluator.curve(scores, FRACTIONS)
    print("faithfulness by circuit size: " + ", ".join(f"{n} edges {f:.2f}" for n, f in
                                                      zip(curve.edges, curve.faithfulness)))
    smallest = evaluator.smallest(scores, 0.85)
    print(f"the smallest circuit that keeps 85%: {len(smallest)} edges, faithfulness "
          f"{smallest.info['faithfulness']:.3f}")
    plot_faithfulness(curve.fractions, curve.faithfulness, f"{args.out}_curve.png", label=args.method)
    explain(cm, circuit, task.batches[0], tokenizer)
    circuit.to_json(f"{args.out}.json", model="smollm2-135m", task=task.name, method=args.method)
    draw_circuit(circuit, f"{args.out}.svg", title=f"SmolLM2-135M · {task.name} · {args.method}")
    print(f"\nsaved {args.out}.json (EAP-IG/MIB format), {args.out}.svg and {args.out}_curve.png "
          f"in {time.perf_counter() - start:.0f} s")


def explain(cm, circuit, batch: dict, tokenizer, k: int = 5) -> None:
    """The logit lens on each node of the circuit: how much more probability its output alone, read through the
    final norm and unembedding, puts on the correct answers than on the incorrect ones (for greater-than: years
    after YY against years up to YY), mean over one batch.  The nodes that push hardest are the ones to read."""
    lens = fxcircuits.logit_lens(cm, batch["clean"], batch["attention_mask"], nodes=circuit)
    push = (lens.answer_probs(batch["correct"]) - lens.answer_probs(batch["incorrect"]))[:, :, 0].mean(1)
    top = dict(lens.top(tokenizer, k=3))
    print(f"\nthe logit lens on the circuit's {len(lens.labels)} nodes, p(correct) − p(incorrect) of each alone:")
    for index in push.argsort(descending=True)[:k].tolist():
        label = lens.labels[index]
        tokens = ", ".join(f"{token!r}" for token, _ in top[label])
        print(f"  {label:8} {push[index]:+.3f}   top tokens of example 0: {tokens}")


if __name__ == "__main__":
    main()
