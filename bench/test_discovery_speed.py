"""Discovery cost against the bare HF model doing the same passes (issue 3), measured side by side.

EAP needs a corrupted forward, a clean forward and a clean forward + backward; the reference implementation
spends ~13x what the bare model spends on them (EAP-IG on TransformerLens 2.18: EAP 69 s on these prompts, the bare
passes 5.35 s, measured on this project's CPU).  Target: ``eap`` ≤ 1.5x.  32 IOI prompts in
batches of 8, SmolLM2-135M on CPU.  Peak memory is the resident-set growth during the call."""
import threading
import time

import pytest
import torch

import fxcircuits
from fxcircuits import ablations
from fxcircuits.attribution import EXACT_CALL_STREAM, POINTS_CALL_STREAM
from fxcircuits.runs import call_size, metric_values, prepare


@pytest.fixture(scope="module")
def batches(batch):
    return [batch] * 4


class PeakRSS:
    """Resident-set growth of this process while the block runs, sampled every millisecond."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    @property
    def grown_mb(self) -> float:
        return (self.peak - self.start) / 2 ** 20


def _bare_passes(model, batches):
    """What any EAP must run: corrupted forward, clean forward, clean forward + backward (to the embeddings;
    no parameter gradients)."""
    for batch in batches:
        with torch.no_grad():
            model(input_ids=batch["corrupted"])
            model(input_ids=batch["clean"])
        _bare_gradient(model, batch)


def _bare_gradient(model, batch):
    """The clean forward and backward to the embeddings, as a patched run's gradient needs them."""
    x = model.get_input_embeddings()(batch["clean"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=x).logits
    torch.autograd.grad(fxcircuits.metrics.logit_diff(logits, batch).sum(), x)


def _timed(fn) -> tuple[float, float]:
    fn()  # warm-up
    with PeakRSS() as peak:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, peak.grown_mb


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs"])
def test_gradient_method_cost(benchmark, smollm2, batches, method):
    model, cm, _, _ = smollm2
    for p in model.parameters():
        p.requires_grad_(False)
    hf, hf_mb = _timed(lambda: _bare_passes(model, batches))
    ours, ours_mb = _timed(lambda: fxcircuits.attribute(cm, batches, "logit_diff", method, progress=False))
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.extra_info.update({"ours_s": ours, "hf_s": hf, "ratio": ours / hf, "ours_peak_mb": ours_mb,
                                 "hf_peak_mb": hf_mb})
    print(f"\n{method}: {ours:.2f} s vs bare HF passes {hf:.2f} s = {ours / hf:.2f}x; "
          f"peak memory +{ours_mb:.0f} MB vs +{hf_mb:.0f} MB")


def test_information_flow_routes_cost(benchmark, smollm2, batches):
    """Information flow routes against the bare HF model's clean forwards on the same prompts: their one clean run
    (a recording pass and a stepping pass) and the L1 distance of every node's output to every stream it feeds, at
    every token."""
    model, cm, _, _ = smollm2

    def forwards():
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch["clean"])

    hf, hf_mb = _timed(forwards)
    ours, ours_mb = _timed(lambda: fxcircuits.attribute(cm, batches, method="information-flow-routes",
                                                        progress=False))
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.extra_info.update({"ours_s": ours, "hf_s": hf, "ratio": ours / hf, "ours_peak_mb": ours_mb,
                                 "hf_peak_mb": hf_mb})
    print(f"\ninformation-flow-routes: {ours:.2f} s vs bare HF clean forwards {hf:.2f} s = {ours / hf:.2f}x; "
          f"peak memory +{ours_mb:.0f} MB vs +{hf_mb:.0f} MB")


@pytest.mark.parametrize("prompts", [8, 32])
def test_exact_throughput(benchmark, smollm2, batch, prompts):
    """``exact`` as ``attribute`` walks the edges — consecutive edges, as many per call as ``runs.call_size``
    gives on CPU, and 32 a call, the count it used before, side by side — on four calls at 1/8, 3/8, 5/8 and 7/8
    of the edge list (all 123k edges would take hours on CPU).  A call patches edges into one or two readers, and
    the layers before them run once for all its masks, so its cost grows with its readers' depth: the four calls
    stand for the whole walk."""
    _, cm, _, _ = smollm2
    graph, metric = cm.graph, fxcircuits.metrics.logit_diff
    prepared = prepare(cm, [{k: v.repeat(prompts // 8, 1) for k, v in batch.items()}], metric)
    chosen = call_size(prepared, None, cpu_stream=EXACT_CALL_STREAM, most=64, accelerator=32)
    starts = [len(graph.edges) * k // 8 for k in (1, 3, 5, 7)]
    rates = {}
    for per_call in (chosen, 32):
        calls = [torch.ones(per_call, len(graph.edges)).index_put_(
            (torch.arange(per_call), torch.arange(s, s + per_call)), torch.tensor(0.0)) for s in starts]
        metric_values(cm, prepared, metric, calls[0])  # warm-up
        with PeakRSS() as peak:
            start = time.perf_counter()
            for masks in calls:
                metric_values(cm, prepared, metric, masks)
            rates[per_call] = per_call * len(calls) / (time.perf_counter() - start), peak.grown_mb
    benchmark.pedantic(lambda: None, rounds=1)
    (rate, mb), (rate_32, _) = rates[chosen], rates[32]
    benchmark.extra_info.update({"per_call": chosen, "edges_per_second": rate, "edges_per_second_at_32": rate_32,
                                 "peak_mb": mb})
    print(f"\nexact, {prompts} prompts: {chosen} a call {rate:.1f} edges/s, 32 a call {rate_32:.1f} edges/s "
          f"({rate / rate_32:.2f}x; {len(graph.edges) / rate / 3600:.1f} h for all {len(graph.edges)} edges); peak "
          f"memory +{mb:.0f} MB")



@pytest.mark.parametrize("method", ["mask", "ugs"])
def test_learned_mask_step_cost(benchmark, smollm2, batch, method):
    """A learned mask's steps against the bare HF model's forward and backward (to the embeddings, no parameter
    gradients) on the same 8 prompts, once per mask the steps run: Edge Pruning runs one a step (8 steps, no warm
    start), UGS its 2 samples (4 steps).  Each of ours also takes the gradient of every edge's mask, which the bare
    pass has none of: the ratio is what that costs."""
    model, cm, _, _ = smollm2
    for p in model.parameters():
        p.requires_grad_(False)
    options, runs = ({"mask_steps": 8, "warm_start": None}, 8) if method == "mask" else ({"mask_steps": 4}, 8)
    hf, hf_mb = _timed(lambda: [_bare_gradient(model, batch) for _ in range(runs)])
    ours, ours_mb = _timed(lambda: fxcircuits.attribute(cm, [batch], "logit_diff", method, progress=False,
                                                        **options))
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.extra_info.update({"ours_s": ours, "hf_s": hf, "ratio": ours / hf, "per_mask_s": ours / runs,
                                 "ours_peak_mb": ours_mb, "hf_peak_mb": hf_mb})
    print(f"\n{method}: {ours:.2f} s for {runs} masks vs bare HF passes {hf:.2f} s = {ours / hf:.2f}x; "
          f"peak memory +{ours_mb:.0f} MB vs +{hf_mb:.0f} MB")

@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "mask"])
def test_scores_by_span_cost(benchmark, smollm2, tokenizer, method):
    """Edge scores by span (IO, S1, S2, END and the rest; ``attribute_by_span``) against the same method's edge
    scores (``attribute``), on 32 prompts of the built-in IOI task in batches of 8: for the gradient methods, the
    price of keeping each token's score apart until it is summed by span; for a learned mask (8 steps), of a mask
    per span in each step's patched pass and its backward."""
    _, cm, _, _ = smollm2
    task_batches = fxcircuits.tasks.load("ioi", tokenizer, size=32, batch_size=8).batches
    options = {"mask_steps": 8} if method == "mask" else {}
    plain, plain_mb = _timed(lambda: fxcircuits.attribute(cm, task_batches, "logit_diff", method, progress=False,
                                                          **options))
    by_span, span_mb = _timed(lambda: fxcircuits.attribute_by_span(cm, task_batches, "logit_diff", method,
                                                                    progress=False, **options))
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.extra_info.update({"by_span_s": by_span, "plain_s": plain, "ratio": by_span / plain,
                                 "by_span_peak_mb": span_mb, "plain_peak_mb": plain_mb})
    print(f"\n{method} by span: {by_span:.2f} s vs {plain:.2f} s = {by_span / plain:.2f}x; "
          f"peak memory +{span_mb:.0f} MB vs +{plain_mb:.0f} MB")


def test_curve_by_span_cost(benchmark, smollm2, tokenizer):
    """MIB's faithfulness curve of EAP's scores by span (``Evaluator.curve``: ten circuits of (edge, span) pairs,
    from 0.1% of the pairs to all of them, each with every other pair patched at its span's tokens) against the
    curve of the same scores summed over spans, on 8 prompts of the built-in IOI task, the two run in turn.  The
    larger circuits patch a dense mix of pairs, whose product multiplies each span's rows at its tokens alone."""
    _, cm, _, _ = smollm2
    task_batches = fxcircuits.tasks.load("ioi", tokenizer, size=8, batch_size=8).batches
    by_span = fxcircuits.attribute_by_span(cm, task_batches, "logit_diff", "eap", progress=False)
    evaluator = fxcircuits.Evaluator(cm, task_batches, "logit_diff")
    times = {"by_span": [], "plain": []}
    for _ in range(2):
        for name, scores in (("by_span", by_span), ("plain", by_span.total())):
            start = time.perf_counter()
            evaluator.curve(scores)
            times[name].append(time.perf_counter() - start)
    span, plain = min(times["by_span"]), min(times["plain"])
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.extra_info.update({"by_span_s": span, "plain_s": plain, "ratio": span / plain})
    print(f"\ncurve by span: {span:.2f} s vs {plain:.2f} s = {span / plain:.2f}x (the best of two, in turn)")


@pytest.mark.parametrize("prompts", [8, 32])
def test_gradient_points_per_call(benchmark, smollm2, batch, prompts):
    """EAP-IG-inputs (5 steps) on 32 IOI prompts, in batches of ``prompts``, at one point a call and at all five
    (``attribute`` on CPU chooses by ``POINTS_CALL_STREAM``): each twice, alternately, the faster of the two runs
    kept (a process's first run of either is the slower).  A point's backward keeps every reader's input, so a
    call's memory grows with its points: compare that in fresh processes."""
    _, cm, _, _ = smollm2
    batches = [{k: v.repeat(prompts // 8, 1) for k, v in batch.items()}] * (32 // prompts)
    chosen = call_size(prepare(cm, batches[:1], fxcircuits.metrics.logit_diff), None, cpu_stream=POINTS_CALL_STREAM,
                       most=5, accelerator=5)
    seconds, scores = {1: [], 5: []}, {}
    for per_call in (1, 5, 1, 5):
        start = time.perf_counter()
        scores[per_call] = fxcircuits.attribute(cm, batches, "logit_diff", "eap-ig-inputs", masks_per_call=per_call,
                                                progress=False).tensor
        seconds[per_call].append(time.perf_counter() - start)
    benchmark.pedantic(lambda: None, rounds=1)
    torch.testing.assert_close(scores[1], scores[5], atol=1e-6, rtol=1e-4)
    one, five = min(seconds[1]), min(seconds[5])
    benchmark.extra_info.update({"per_call": chosen, "seconds_at_1": one, "seconds_at_5": five})
    print(f"\neap-ig-inputs, batches of {prompts}: one point a call {one:.1f} s, five {five:.1f} s ({five / one:.2f}x); "
          f"attribute chooses {chosen}")


def _replaced(model, node: str, value: torch.Tensor):
    """A hook sending ``value`` in place of a Llama node's output: the embeddings, an MLP's output, or a head's share
    of its output projection."""
    if node == "input":
        return model.get_input_embeddings().register_forward_hook(lambda m, i, out: value.expand_as(out))
    layer = model.model.layers[int(node[1:].split(".")[0])]
    if node.startswith("m"):
        return layer.mlp.register_forward_hook(lambda m, i, out: value.expand_as(out))
    o_proj, width = layer.self_attn.o_proj, layer.self_attn.head_dim
    cols = slice(int(node.split("h")[-1]) * width, (int(node.split("h")[-1]) + 1) * width)
    weight = o_proj.weight[:, cols].T
    return o_proj.register_forward_hook(lambda m, args, out: out - args[0][..., cols] @ weight + value)


def test_optimal_ablation_step_cost(benchmark, smollm2, batch):
    """One step of optimal ablation against what MIB's ``oa.py`` runs for it, one node at a time: the HF model with
    the node's output replaced by a constant (a hook), its next-token cross-entropy, and the gradient of the
    constant.  The nodes of four calls, at 1/8, 3/8, 5/8 and 7/8 of the node list (a whole step, 301 nodes, takes
    minutes on CPU), where ours ablates a call's nodes side by side and shares the layers before them."""
    model, cm, _, _ = smollm2
    prompts = ablations._prompts(cm, [batch])
    targets = [ablations._targets(cm, ids, mask, "cross-entropy") for ids, mask in prompts]
    values, tokens = ablations.mean_ablation(cm, [batch]).values, int(targets[0][1].sum())
    n, per_call = len(cm.graph.upstream), ablations._per_call(cm, prompts, None)
    chunks = tuple(torch.arange(n * k // 8, n * k // 8 + per_call) for k in (1, 3, 5, 7))
    ids = batch["clean"]

    def one_at_a_time():
        for node in (cm.graph.upstream[i] for chunk in chunks for i in chunk):
            group, row = ablations._place(cm, cm.graph.upstream.index(node), node)
            value = values[group][row].reshape(-1).clone().requires_grad_(True)
            handle = _replaced(model, node, value)
            try:
                logits = model(input_ids=ids).logits[:, :-1]
            finally:
                handle.remove()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            torch.autograd.grad(loss, value)

    hf, hf_mb = _timed(one_at_a_time)
    ours, ours_mb = _timed(lambda: ablations._pass(cm, prompts, targets, values, chunks, "cross-entropy", tokens,
                                                   True))
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.extra_info.update({"ours_s": ours, "hf_s": hf, "ratio": ours / hf, "nodes": per_call * 4,
                                 "ours_peak_mb": ours_mb, "hf_peak_mb": hf_mb})
    print(f"\noptimal ablation, {per_call * 4} nodes: {ours:.2f} s vs one at a time on HF {hf:.2f} s = "
          f"{ours / hf:.2f}x; peak memory +{ours_mb:.0f} MB vs +{hf_mb:.0f} MB; a whole step ≈ "
          f"{ours / (per_call * 4) * n:.0f} s")
