"""The logit lens and direct logit attribution against the HF model's own hidden states, final norm and
unembedding."""
import pytest
import torch

import fxcircuits
from fxcircuits.circuit import Circuit
from fxcircuits.components import DecompositionError
from fxcircuits.lens import direct_logits, logit_lens, source_logits
from fxcircuits.rewrite import SourceWrites
from zoo import CONFIGS, NO_ATTENTION, make, modules


def _ids():
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


FINAL_NORMS = {"llama": "model.norm", "gemma2": "model.norm", "gpt2": "transformer.ln_f",  # test references only
               "gpt_neox": "gpt_neox.final_layer_norm"}


def _unembed(model, stream, name="llama"):
    return model.get_output_embeddings()(model.get_submodule(FINAL_NORMS[name])(stream))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_readout_of_the_stream_is_the_logits(traced, name):
    """The readout cut out of every architecture's graph turns the last stream into the model's logits.  What each
    writer adds to the stream is its nodes' outputs plus what none of them writes (an output projection's bias),
    which is the same for every input and position: patching a node leaves it alone.  Where the model scales its
    whole stream between layers (Gemma 4), node outputs are in the first layer's scale."""
    model, cm = traced(name)
    ids, mask = _ids()

    def unwritten(ids, mask):
        """Per writer: the stream's change across it less its nodes' outputs, [writers, B, S, d]."""
        streams, groups = cm.streams(ids, mask), cm.groups(ids, mask)
        unscaled = streams / cm.stream_scales(ids, mask)[:, None, None]
        return unscaled.diff(dim=0) - torch.stack([g.sum(0) for g in groups[1:]]), streams

    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        added, streams = unwritten(ids, mask)
        other, _ = unwritten(ids.flip(0), mask.flip(0))
        torch.testing.assert_close(streams[0], cm.groups(ids, mask)[0][0])  # the stream starts as the input node
    scale = logits.abs().max()
    torch.testing.assert_close(cm.readout(streams[-1])[mask.bool()], logits[mask.bool()], atol=1e-4 * scale,
                               rtol=1e-4)
    valid = mask.bool() & mask.flip(0).bool()
    atol = 1e-5 * streams.abs().max()
    added, other = added[:, valid], other[:, valid]
    torch.testing.assert_close(added, other, atol=atol, rtol=0)
    torch.testing.assert_close(added, added[:, :1].expand_as(added), atol=atol, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_stream_lens_matches_hf_hidden_states(traced, name):
    """The stream after each layer as HF reports it, through HF's own final norm and unembedding — GPT-2's heads
    write no part of its output projection's bias, which the stream carries; GPT-NeoX writes attention and MLP
    in one step."""
    model, cm = traced(name)
    ids, mask = _ids()
    lens = logit_lens(cm, ids, mask, positions="all")
    assert lens.labels[:3] == ["input", "a0", "m0"] and len(lens.labels) == 1 + 2 * model.config.num_hidden_layers
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    # hidden_states[l + 1] is the stream after layer l; HF's last one already went through the final norm
    for layer in range(model.config.num_hidden_layers - 1):
        expected = _unembed(model, out.hidden_states[layer + 1], name)
        if name == "gemma2":  # soft-capping is part of the readout
            cap = model.config.final_logit_softcapping
            expected = torch.tanh(expected / cap) * cap
        got = lens.logits[lens.labels.index(f"m{layer}")]
        torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lens.logits[-1][mask.bool()], out.logits[mask.bool()], atol=1e-4, rtol=1e-4)


def test_stream_scales_are_the_models_layer_scalars(traced):
    """Gemma 4 multiplies the whole stream by a constant after each layer: the stream after layer l's MLP, times
    that layer's scalar, is HF's hidden state after layer l, and the scales are the products of the scalars."""
    model, cm = traced("gemma4")
    ids, mask = _ids()
    scalars = [model.get_submodule(f"model.layers.{layer}").layer_scalar for layer in range(2)]  # test reference
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        streams, scales = cm.streams(ids, mask), cm.stream_scales(ids, mask)
    d = model.config.hidden_size
    assert scales.shape == (5, d) and not torch.allclose(scales, torch.ones(5, d))
    expected = torch.cat([torch.ones(3), scalars[0].expand(2)])  # input, a0, m0 | a1, m1
    torch.testing.assert_close(scales, expected[:, None].expand(5, d))
    torch.testing.assert_close(streams[2] * scalars[0], out.hidden_states[1])


def test_stream_scales_are_the_carried_residuals_factors(traced):
    """A residual scaled as it is carried into the sum (x·α + f(x), ``zoo.ScaledResidualLayer``: a learned factor
    per channel before attention, a constant before the MLP): each writer's scale is the product of the factors up
    to its sum, per channel, and the streams are HF's hidden states."""
    model, cm = traced("scaled_residual")
    ids, mask = _ids()
    layers = model.model.layers  # test reference
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        streams, scales = cm.streams(ids, mask), cm.stream_scales(ids, mask)
        expected, frame = [torch.ones(model.config.hidden_size)], torch.tensor(1.0)
        for layer in layers:
            frame = frame * layer.input_residual
            expected.append(frame)
            frame = frame * layer.mlp_alpha
            expected.append(frame)
    torch.testing.assert_close(scales, torch.stack(expected))
    for layer in range(len(layers) - 1):  # HF's last hidden state has been through the final norm
        torch.testing.assert_close(streams[2 * layer + 2][mask.bool()], out.hidden_states[layer + 1][mask.bool()])


def test_stream_scales_are_beams_depth_scaling(traced):
    """Beam adds its i-th residual as x·√((i−1)/i) + f(x)/√i (the embedding being the first): the stream after it
    carries ∏_{j≤i} √((j−1)/j) = 1/√i of what was written before, on every channel."""
    _, cm = traced("beam")
    ids, mask = _ids()
    with torch.no_grad():
        scales = cm.stream_scales(ids, mask)
    expected = torch.arange(1, 6, dtype=torch.float32).rsqrt()  # input, a0, m0, a1, m1
    torch.testing.assert_close(scales, expected[:, None].expand_as(scales))


def test_node_lens_reads_one_node_output(traced):
    model, cm = traced("llama")
    ids, mask = _ids()
    lens = logit_lens(cm, ids, mask, nodes=["a1.h2", "m0"])
    acts = cm.activations(ids, mask)
    last = torch.tensor([5, 5])
    for row, node in enumerate(["a1.h2", "m0"]):
        with torch.no_grad():
            expected = _unembed(model, acts[cm.graph.node_index[node]])[torch.arange(2), last]
        torch.testing.assert_close(lens.logits[row][:, 0], expected, atol=1e-5, rtol=1e-5)


def test_a_circuit_lens_reads_the_nodes_its_edges_leave_and_enter(traced):
    """``nodes=circuit``: the circuit's nodes that write (``logits`` only reads), in graph order, as their names
    would; a circuit without edges has nothing to read."""
    _, cm = traced("llama")
    ids, mask = _ids()
    circuit = Circuit(cm.graph, ["a0.h1->m1", "m1->logits", "input->a1.h2<k>"])
    lens = logit_lens(cm, ids, mask, nodes=circuit)
    assert lens.labels == ["input", "a0.h1", "a1.h2", "m1"]
    torch.testing.assert_close(lens.logits, logit_lens(cm, ids, mask, nodes=lens.labels).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no nodes to read"):
        logit_lens(cm, ids, mask, nodes=Circuit(cm.graph, []))


def test_answers_and_top_tokens(traced):
    _, cm = traced("llama")
    ids, mask = _ids()
    lens = logit_lens(cm, ids, mask)
    answers = torch.tensor([[3, 4], [5, -1]])
    probs = lens.probs()
    expected = torch.stack([probs[:, 0, 0, 3] + probs[:, 0, 0, 4], probs[:, 1, 0, 5]], 1)
    torch.testing.assert_close(lens.answer_probs(answers)[:, :, 0], expected)

    class Tokenizer:
        def decode(self, ids):
            return f"<{ids[0]}>"

    top = lens.top(Tokenizer(), k=3, example=1)
    assert [label for label, _ in top] == lens.labels
    best = int(probs[-1, 1, 0].argmax())
    assert top[-1][1][0] == (f"<{best}>", pytest.approx(float(probs[-1, 1, 0, best])))
    assert "input" in lens.table(Tokenizer(), k=2)
    with pytest.raises(ValueError, match="k is a count, an int of at least 1; got -1"):
        lens.top(Tokenizer(), k=-1)
    for where, says in (({"example": 2}, "example=2: 2 examples were read, example 0 to 1"),
                        ({"position": 1}, "position=1: 1 positions were read, position 0 to 0")):
        with pytest.raises(IndexError, match=says):
            lens.table(Tokenizer(), **where)
    with pytest.raises(ValueError, match="answer id 128 is past the vocabulary, which has 128 tokens"):
        lens.answer_probs(torch.tensor([[128], [5]]))
    with pytest.raises(KeyError, match="unknown node.*'m9' is not an upstream node"):
        logit_lens(cm, ids, mask, nodes=["m9"])


def test_positions_outside_the_prompts_are_refused(traced):
    _, cm = traced("llama")
    ids, mask = _ids()
    for positions in ([6], "first", [0.5], [], [True], 6):
        with pytest.raises(ValueError, match="give 'last', 'all', a position or a list of positions from -6 to 5"):
            logit_lens(cm, ids, mask, positions=positions)
    for positions in ([-1, 0], torch.tensor([-1, 0]), (-1, 0)):
        assert logit_lens(cm, ids, mask, positions=positions).positions.tolist() == [[-1, 0], [-1, 0]]
    assert logit_lens(cm, ids, mask, positions=3).positions.tolist() == [[3], [3]]
    for positions in (torch.tensor([[1], [6]]), torch.tensor([[1, 2]]), torch.tensor([[1.0], [2.0]]),
                      torch.ones(2, 1, dtype=torch.bool)):
        with pytest.raises(ValueError, match="per-example positions are integers \\[batch=2, positions\\]"):
            logit_lens(cm, ids, mask, positions=positions)


def test_each_example_read_at_its_own_positions(traced):
    """Per-example positions (a span's token in prompts of different templates) read what ``"all"`` reads there."""
    _, cm = traced("llama")
    ids, mask = _ids()
    own = torch.tensor([[3, 5], [4, -1]])
    lens, every = logit_lens(cm, ids, mask, positions=own), logit_lens(cm, ids, mask, positions="all")
    assert lens.positions.tolist() == own.tolist()
    direct, direct_every = (direct_logits(cm, ids, mask, positions=p) for p in (own, "all"))
    for row in range(2):
        torch.testing.assert_close(lens.logits[:, row], every.logits[:, row, own[row]])
        torch.testing.assert_close(direct.logits[:, row], direct_every.logits[:, row, own[row]])


def _hf_run(model, name, ids, mask):
    """The HF model's logits, and its stream at the final norm, after the embeddings and out of MLP 1."""
    seen, layer0 = {}, modules(name)[0].format(0).rsplit(".", 1)[0]
    handles = [model.get_submodule(FINAL_NORMS[name]).register_forward_pre_hook(lambda m, a: seen.update(final=a[0])),
               model.get_submodule(layer0).register_forward_pre_hook(
                   lambda m, a, k: seen.update(input=a[0] if a else k["hidden_states"]), with_kwargs=True),
               model.get_submodule(modules(name)[0].format(1)).register_forward_hook(
                   lambda m, a, out: seen.update(m1=out[0] if isinstance(out, tuple) else out))]
    with torch.no_grad():
        seen["logits"] = model(ids, attention_mask=mask).logits
    for handle in handles:
        handle.remove()
    return seen


def _frozen_readout(model, name, stream, part):
    """Reference direct logits of ``part``: the HF final norm with its statistics computed from ``stream``, the
    unembedding, and, where the logits are soft-capped, the cap's slope at the whole stream."""
    norm = model.get_submodule(FINAL_NORMS[name])
    if isinstance(norm, torch.nn.LayerNorm):
        rstd = torch.rsqrt(stream.var(-1, unbiased=False, keepdim=True) + norm.eps)
        normed = (part - part.mean(-1, keepdim=True)) * rstd * norm.weight
    else:  # an RMSNorm: Llama's weight, Gemma's 1 + weight
        eps = norm.eps if hasattr(norm, "eps") else norm.variance_epsilon
        rstd = torch.rsqrt(stream.pow(2).mean(-1, keepdim=True) + eps)
        normed = part * rstd * (1 + norm.weight if name.startswith("gemma") else norm.weight)
    logits = model.get_output_embeddings()(normed)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = logits * (1 - torch.tanh(model.get_output_embeddings()(norm(stream)) / cap) ** 2)
    return logits


@pytest.mark.parametrize("name", sorted(FINAL_NORMS))
def test_direct_logits_are_a_frozen_final_norm_on_the_hf_model(traced, name):
    """Each node's direct logits equal its output (read off the HF model by hooks) through the HF model's final norm
    with the whole stream's statistics, then the unembedding: RMSNorm and LayerNorm (which still centres the part),
    and Gemma 2's soft-capping to first order.  The nodes and the rest add up to the model's logits."""
    model, cm = traced(name)
    ids, mask = _ids()
    seen, last = _hf_run(model, name, ids, mask), torch.tensor([5, 5])
    direct = direct_logits(cm, ids, mask, nodes=["input", "m1"])
    scale = seen["logits"].abs().max()
    assert direct.labels == ["input", "m1"] and direct.linear == (name != "gemma2")
    rows = torch.arange(2)
    with torch.no_grad():
        for i, node in enumerate(direct.labels):
            expected = _frozen_readout(model, name, seen["final"], seen[node])[rows, last]
            torch.testing.assert_close(direct.logits[i, :, 0], expected, atol=1e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(direct.total[:, 0], seen["logits"][rows, last], atol=1e-4 * scale, rtol=1e-4)
    every = direct_logits(cm, ids, mask)
    assert every.labels == cm.graph.upstream
    torch.testing.assert_close(every.logits[[0, cm.graph.node_index["m1"]]], direct.logits)
    torch.testing.assert_close(every.rest, direct.rest)
    torch.testing.assert_close(every.logits.sum(0) + every.rest, every.total, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("name", ["llama", "olmo", "gemma4", "scaled_residual", "deepseek_v3"])
def test_direct_logits_of_every_node_are_the_logits_where_nothing_else_is_written(traced, name):
    """Where no bias is written into the stream, the nodes' direct logits add up to the model's logits: also where
    the model rescales its stream (Gemma 4's layer scalars, a residual scaled as it is carried), whose later
    factors scale each node's output; and with them the ``logit_diff`` metric, of which each node gets its share."""
    model, cm = traced(name)
    ids, mask = _ids()
    direct = direct_logits(cm, ids, mask, positions="all")
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    scale = logits.abs().max()
    real = mask.bool()
    torch.testing.assert_close(direct.logits.sum(0)[real], logits[real], atol=1e-5 * scale, rtol=0)
    assert float(direct.rest.abs().max()) < 1e-5 * scale
    correct, incorrect = torch.tensor([[3, 4], [5, -1]]), torch.tensor([[7], [8]])
    batch = {"clean": ids, "attention_mask": mask, "correct": correct, "incorrect": incorrect}
    shares = direct.logit_diff(correct, incorrect)[..., -1]
    torch.testing.assert_close(shares.sum(0) + direct.logit_diff(correct, incorrect, of="rest")[:, -1],
                               fxcircuits.metrics.logit_diff(logits, batch), atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(direct.logit_diff(correct, incorrect, of="total")[:, -1],
                               fxcircuits.metrics.logit_diff(logits, batch), atol=1e-5 * scale, rtol=1e-5)


def _gathered(values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Vocab-wide ``values`` [..., batch, positions, vocab] at each example's ``tokens`` [batch, K], padding 0."""
    index = tokens.clamp(min=0)[:, None, :].expand(*values.shape[:-1], -1)
    return values.gather(-1, index) * (tokens >= 0)[:, None, :]


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2", "gemma4"])
def test_direct_logits_of_some_tokens_are_those_of_the_whole_vocabulary(traced, name):
    """``tokens=`` reads each node's logits through the readout pulled back to one direction per token: they, the
    total and the rest (biases, in gpt2) equal the vocab-wide ones at those tokens, also to first order (Gemma 2's
    soft-cap) and in a rescaled stream (Gemma 4); and so do the ``logit_diff`` shares and ``top``'s ranking."""
    _, cm = traced(name)
    ids, mask = _ids()
    whole = direct_logits(cm, ids, mask, positions="all")
    tokens = torch.tensor([[3, 4, 7, 9], [5, 8, 4, -1]])
    some = direct_logits(cm, ids, mask, positions="all", tokens=tokens)
    assert some.logits.shape == (*whole.logits.shape[:3], 4) and some.tokens.tolist() == tokens.tolist()
    scale = whole.total.abs().max()
    for part, vocab_wide in [(some.logits, whole.logits), (some.total, whole.total), (some.rest, whole.rest)]:
        torch.testing.assert_close(part, _gathered(vocab_wide, tokens), atol=1e-6 * scale, rtol=1e-5)
    correct, incorrect = torch.tensor([[3, 4], [5, -1]]), torch.tensor([[7], [8]])
    for of in ["nodes", "rest", "total"]:
        torch.testing.assert_close(some.logit_diff(correct, incorrect, of=of),
                                   whole.logit_diff(correct, incorrect, of=of), atol=1e-6 * scale, rtol=1e-5)

    class Tokenizer:
        def decode(self, ids):
            return f"<{ids[0]}>"

    best = [[f"<{int(tokens[1, j])}>" for j in _gathered(whole.logits, tokens)[i, 1, 2, :3].argsort(descending=True)]
            for i in range(len(whole.labels))]
    assert [[token for token, _ in tops] for _, tops in some.top(Tokenizer(), k=9, example=1, position=2)] == best
    same = direct_logits(cm, ids, mask, tokens=[3, 9])
    assert same.tokens.tolist() == [[3, 9], [3, 9]]
    torch.testing.assert_close(same.logits, _gathered(direct_logits(cm, ids, mask).logits, same.tokens),
                               atol=1e-6 * scale, rtol=1e-5)


def test_direct_logits_of_tokens_refuse_what_they_cannot_read(traced):
    """Token ids outside the vocabulary, a row count other than the batch's, or no ids are refused; so is an
    answer ``logit_diff`` is asked about that was not read, or answers shaped for another batch; one answer per
    example may come as [batch]."""
    _, cm = traced("llama")
    ids, mask = _ids()
    for tokens, message in [([3, 128], "token 128 is not in the vocabulary of 128 tokens"),
                            ([[3], [4], [5]], "tokens has 3 rows for 2 examples"),
                            ([], "tokens of shape"), ([0.5], "give vocabulary ids")]:
        with pytest.raises(ValueError, match=message):
            direct_logits(cm, ids, mask, tokens=tokens)
    direct = direct_logits(cm, ids, mask, tokens=[[3, 7], [5, 8]])
    with pytest.raises(ValueError, match=r"token 4 \(an answer of example 0\) was not read"):
        direct.logit_diff(torch.tensor([[3, 4], [5, -1]]), torch.tensor([[7], [8]]))
    whole = direct_logits(cm, ids, mask)
    for of in ["nodes", "total"]:  # one answer per example as [batch], as a batch's correct[:, 0] gives it
        for read in [direct, whole]:
            torch.testing.assert_close(read.logit_diff(torch.tensor([3, 5]), torch.tensor([7, 8]), of=of),
                                       read.logit_diff(torch.tensor([[3], [5]]), torch.tensor([[7], [8]]), of=of))
        for answers, shape in [([3, 5, 7], r"\[3\]"), ([[[3]], [[5]]], r"\[2, 1, 1\]"), ([3.0, 5.0], r"\[2\]")]:
            with pytest.raises(ValueError, match=f"answer ids of shape {shape}.*the 2 examples' token ids"):
                whole.logit_diff(torch.tensor(answers), torch.tensor([7, 8]), of=of)


def test_direct_logits_of_a_circuit_and_their_top_tokens(traced):
    """``nodes=circuit`` reads the circuit's writing nodes; ``top`` ranks each node's tokens by direct logit and
    ``table`` signs them; unknown nodes and empty circuits are refused as the lens refuses them."""
    _, cm = traced("llama")
    ids, mask = _ids()
    circuit = Circuit(cm.graph, ["a0.h1->m1", "m1->logits", "input->a1.h2<k>"])
    direct = direct_logits(cm, ids, mask, nodes=circuit)
    assert direct.labels == ["input", "a0.h1", "a1.h2", "m1"]

    class Tokenizer:
        def decode(self, ids):
            return f"<{ids[0]}>"

    best = int(direct.logits[3, 1, 0].argmax())
    assert direct.top(Tokenizer(), k=2, example=1)[3][1][0] == (f"<{best}>",
                                                               pytest.approx(float(direct.logits[3, 1, 0, best])))
    assert f"'<{best}>' +" in direct.table(Tokenizer(), k=1, example=1).splitlines()[3]
    with pytest.raises(ValueError, match="of='heads': give one of 'nodes', 'rest', 'total'"):
        direct.logit_diff(torch.tensor([[3], [4]]), torch.tensor([[5], [6]]), of="heads")
    with pytest.raises(KeyError, match="unknown node"):
        direct_logits(cm, ids, mask, nodes=["m9"])
    with pytest.raises(ValueError, match="no nodes to read"):
        direct_logits(cm, ids, mask, nodes=Circuit(cm.graph, []))


def test_direct_logits_of_a_nan_stream_are_refused_naming_the_examples():
    """Gemma 2 in float64 under left padding: HF's own logits are NaN at the padded example, and so would every
    node's direct logits be there, the norm's statistics being NaN."""
    model = make("gemma2", dtype=torch.float64)
    cm = fxcircuits.trace(model)
    ids, mask = _ids()
    with torch.no_grad():
        assert model(ids, attention_mask=mask).logits[1].isnan().any()
    with pytest.raises(ValueError, match=r"NaN or infinite at the positions read in examples \[1\]"):
        direct_logits(cm, ids, mask)
    assert direct_logits(cm, ids[:1], mask[:1]).total.isfinite().all()


def _heads(cm) -> list[str]:
    """The first two heads and the last: two of one layer, another layer's."""
    heads = [n for n in cm.graph.upstream if n.startswith("a")]
    return heads[:2] + heads[-1:]


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - NO_ATTENTION))
def test_source_logits_add_up_to_each_heads_direct_logits(traced, name):
    """Split by key position, a head's direct logits add up to its direct logits (``direct_logits``) at every real
    query position, vocab-wide and at given tokens: in every architecture (grouped and multi-query heads, MLA,
    output gates, a sink's factor on the core's output, Gemma 2's norm after attention, rescaled streams).  A real
    query puts nothing on a padding key."""
    _, cm = traced(name)
    ids, mask = _ids()
    heads = _heads(cm)
    sources = source_logits(cm, ids, mask, heads=heads, positions="all")
    direct = direct_logits(cm, ids, mask, nodes=heads, positions="all")
    scale = direct.total.abs().max()
    assert sources.logits.shape == (3, 2, 6, 6, direct.logits.shape[-1]) and sources.heads == heads
    real = mask.bool()
    torch.testing.assert_close(sources.logits.sum(3)[:, real], direct.logits[:, real], atol=1e-6 * scale, rtol=0)
    assert float(sources.logits[:, 1, 2:, :2].abs().max()) <= 1e-6 * scale
    tokens = torch.tensor([[3, 4], [5, 6]])
    some = source_logits(cm, ids, mask, heads=heads, tokens=tokens)
    torch.testing.assert_close(some.logits, _gathered(sources.logits[:, :, -1:].movedim(3, 0), tokens).movedim(0, 3),
                               atol=1e-6 * scale, rtol=0)


@pytest.mark.parametrize("name", ["llama", "bloom"])
def test_source_logits_in_bfloat16(name):
    """In bfloat16 each key's term is rounded apart from the core's own product: the split is still taken (not
    refused as a core that computes something else) and adds up to the head's direct logits to bfloat16's
    precision — a fused core (SDPA) and a written-out one (BLOOM's bmm)."""
    cm = fxcircuits.trace(make(name, dtype=torch.bfloat16))
    ids, mask = _ids()
    sources = source_logits(cm, ids, mask, heads=["a0.h0", "a1.h1"])
    direct = direct_logits(cm, ids, mask, nodes=["a0.h0", "a1.h1"])
    assert sources.logits.dtype == torch.bfloat16
    scale = direct.total.float().abs().max()
    torch.testing.assert_close(sources.logits.float().sum(3), direct.logits.float(), atol=1e-2 * scale, rtol=0)


def test_source_logits_are_attention_weights_times_values_on_the_hf_model(traced):
    """Against the HF model read by hooks (eager attention): head h's part from key k is its attention weight on k
    times its value at k (grouped: its key-value head's), through its block of the output projection, then through
    the final norm with the whole stream's statistics and the unembedding."""
    model, cm = traced("llama")
    ids, mask = _ids()
    layer, n_heads = 1, model.config.num_attention_heads
    attention = model.model.layers[layer].self_attn
    seen = {}
    handle = attention.v_proj.register_forward_hook(lambda m, a, out: seen.update(values=out))
    model.set_attn_implementation("eager")
    try:
        hf = _hf_run(model, "llama", ids, mask)
        with torch.no_grad():
            weights = model(ids, attention_mask=mask, output_attentions=True).attentions[layer]
    finally:
        model.set_attn_implementation("sdpa")
        handle.remove()
    size = model.config.hidden_size // n_heads
    values = seen["values"].unflatten(-1, (-1, size)).repeat_interleave(n_heads // model.config.num_key_value_heads, 2)
    heads = [f"a{layer}.h0", f"a{layer}.h3"]
    sources = source_logits(cm, ids, mask, heads=heads)
    rows, last = torch.arange(2), torch.tensor([5, 5])
    with torch.no_grad():
        for i, head in enumerate([0, 3]):
            block = attention.o_proj.weight[:, head * size:(head + 1) * size]
            parts = weights[rows, head, last][..., None] * values[:, :, head] @ block.T  # [batch, keys, d_model]
            expected = _frozen_readout(model, "llama", hf["final"][rows, last][:, None], parts)
            torch.testing.assert_close(sources.logits[i, :, 0], expected, atol=1e-5 * hf["logits"].abs().max(),
                                       rtol=1e-4)


def test_source_logits_rank_the_keys_and_refuse_what_they_cannot_split(traced):
    """``top`` ranks each head's keys by their share of its direct logit difference, either sign, real keys only;
    unknown heads and no heads are refused; a core whose output is not its weights times its values is refused,
    naming the node."""
    _, cm = traced("llama")
    ids, mask = _ids()
    correct, incorrect = torch.tensor([[3], [4]]), torch.tensor([[5], [6]])
    sources = source_logits(cm, ids, mask, heads=["a1.h2"], tokens=torch.cat([correct, incorrect], 1))
    shares = sources.logit_diff(correct, incorrect)[0, 1, 0]

    class Tokenizer:
        def decode(self, ids):
            return f"<{ids[0]}>"

    (head, tops), = sources.top(Tokenizer(), correct, incorrect, k=9, example=1)
    order = [2 + int(i) for i in shares[2:].abs().argsort(descending=True)]
    assert head == "a1.h2" and [key for _, key, _ in tops] == order
    assert tops[0] == (f"<{int(ids[1, order[0]])}>", order[0], pytest.approx(float(shares[order[0]])))
    assert f"'<{int(ids[1, order[0]])}>'@{order[0]} " in sources.table(Tokenizer(), correct, incorrect, example=1)
    spans = {"X": torch.tensor([[2, 4], [3, 4]]), "Y": torch.tensor([[4, 6], [2, 3]])}
    by_span = sources.by_span(spans, correct, incorrect)
    every = sources.logit_diff(correct, incorrect)[0, :, 0]  # [batch, keys]
    torch.testing.assert_close(by_span[0], torch.stack([every[0, 2:4].sum(), every[0, 4:6].sum(), every[1, 3:4].sum(),
                                                        every[1, 2:3].sum()]).view(2, 2))
    first = ids[:, :1]  # prompts of one token, which the captures serve at a second position too
    one = source_logits(cm, first, heads=["a1.h2"])
    assert one.logits.shape[3] == 1
    torch.testing.assert_close(one.logits[:, :, :, 0], direct_logits(cm, first, nodes=["a1.h2"]).logits)
    with pytest.raises(ValueError, match="no attention layer 7: LlamaForCausalLM has 2"):
        cm.sources(ids, mask, heads={7: [0]})
    with pytest.raises(KeyError, match="unknown head"):
        source_logits(cm, ids, mask, heads=["a9.h0"])
    with pytest.raises(ValueError, match="no heads given"):
        source_logits(cm, ids, mask, heads=[])
    graph = torch.fx.Graph()
    graph.output(graph.placeholder("x"))
    split = SourceWrites(torch.fx.GraphModule(torch.nn.Module(), graph), 0, 1, "Model", next(iter(graph.nodes)))
    weights, values = torch.rand(1, 1, 3, 3), torch.rand(1, 1, 3, 2)
    assert split({0: [0]}, weights, values, weights @ values, torch.zeros(1, 3, 2)).shape == (1, 3, 1, 3, 2)
    with pytest.raises(DecompositionError, match="not its weights times its values"):
        split({0: [0]}, weights, values, 2 * weights @ values, torch.zeros(1, 3, 2))
    mixing = torch.fx.Graph()  # a path that mixes a row's values (a softmax over them): refused when asked for
    x = mixing.placeholder("x")
    x.meta["val"] = weights @ values
    mixing.output(mixing.call_function(torch.ops.aten._softmax.default, (x, -1, False)))
    split = SourceWrites(torch.fx.GraphModule(torch.nn.Module(), mixing), 0, 1, "Model", x)
    assert split({1: [0]}, weights, values, weights @ values, torch.zeros(1, 3, 2)) is None
    with pytest.raises(DecompositionError, match="the attention output's path to the stream mixes a row's values"):
        split({0: [0]}, weights, values, weights @ values, torch.zeros(1, 3, 2))


def test_source_logits_refuse_a_padding_read_position_as_patterns_do(traced):
    """A read position at an example's padding (a query that attends to nothing) is refused by ``top``, ``table``,
    ``plot`` and ``by_span``, naming the example, as ``Patterns`` refuses it — not printed as if a head wrote it;
    a read position past those read is refused by name."""
    _, cm = traced("llama")
    ids, mask = _ids()
    mask = mask.flip(1)  # example 1 right-padded: positions 4 and 5 are padding
    correct, incorrect = torch.tensor([3, 4]), torch.tensor([5, 6])
    spans = {"X": torch.tensor([[0, 2], [0, 3]])}

    class Tokenizer:
        def decode(self, ids):
            return f"<{ids[0]}>"

    for positions, where in (([5], {}), ("all", {"position": 4}), ("all", {"position": -1})):
        sources = source_logits(cm, ids, mask, heads=["a1.h2"], positions=positions)
        token = 5 if where.get("position", -1) == -1 else 4
        says = f"read position {where.get('position', -1)} \\(token {token}\\) of example 1 is padding"
        for read in (lambda: sources.table(Tokenizer(), correct, incorrect, example=1, **where),
                     lambda: sources.plot(Tokenizer(), correct, incorrect, example=1, **where),
                     lambda: sources.by_span(spans, correct, incorrect, **where)):
            with pytest.raises(ValueError, match=says):
                read()
        assert sources.top(Tokenizer(), correct, incorrect, example=0, **where)  # example 0 is real there
    with pytest.raises(ValueError, match="padding"):
        fxcircuits.attention_patterns(cm, ids, mask, heads=["a1.h2"]).query(example=1, position=5)
    one = source_logits(cm, ids, mask, heads=["a1.h2"])
    with pytest.raises(IndexError, match="position=3: 1 positions were read, position 0 to 0"):
        one.by_span(spans, correct, incorrect, position=3)


def test_prompts_not_batched_are_refused_by_name(traced):
    """One prompt given as [seq] is refused by every reader as every run refuses it, saying the shape to give — not
    an unpacking error from reading the positions before the prompts are checked."""
    _, cm = traced("llama")
    ids, _ = _ids()
    for read in (lambda: logit_lens(cm, ids[0]), lambda: direct_logits(cm, ids[0]),
                 lambda: direct_logits(cm, ids[0], tokens=[3]), lambda: source_logits(cm, ids[0], heads=["a0.h0"])):
        with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
            read()
    with pytest.raises(ValueError, match=r"or each example's own as a tensor \[batch=2, positions\]"):
        logit_lens(cm, ids, positions=[[3], [5]])


def test_lens_probabilities_of_a_float64_model_are_float64():
    """A float64 model's lens ranks and sums probabilities in float64 (``metrics.wide``), not rounded to float32."""
    cm = fxcircuits.trace(make("llama", dtype=torch.float64))
    ids, mask = _ids()
    lens = logit_lens(cm, ids, mask)
    assert lens.logits.dtype == lens.probs().dtype == torch.float64
    torch.testing.assert_close(lens.probs(), lens.logits.softmax(-1), atol=1e-15, rtol=0)
    answers = torch.tensor([[3, 4], [5, -1]])
    expected = torch.stack([lens.logits.softmax(-1)[:, 0, 0, [3, 4]].sum(-1), lens.logits.softmax(-1)[:, 1, 0, 5]], 1)
    torch.testing.assert_close(lens.answer_probs(answers)[:, :, 0], expected, atol=1e-15, rtol=0)
