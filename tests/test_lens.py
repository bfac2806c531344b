"""The logit lens against the HF model's own hidden states, final norm and unembedding."""
import pytest
import torch

from fxcircuits.circuit import Circuit
from fxcircuits.lens import logit_lens
from zoo import CONFIGS


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
    with pytest.raises(KeyError, match="unknown node.*'m9' is not an upstream node"):
        logit_lens(cm, ids, mask, nodes=["m9"])


def test_positions_outside_the_prompts_are_refused(traced):
    _, cm = traced("llama")
    ids, mask = _ids()
    for positions in ([6], "first", [0.5]):
        with pytest.raises(ValueError, match="give 'last', 'all' or a list of positions from -6 to 5"):
            logit_lens(cm, ids, mask, positions=positions)
    for positions in ([-1, 0], torch.tensor([-1, 0]), (-1, 0)):
        assert logit_lens(cm, ids, mask, positions=positions).positions.tolist() == [[-1, 0], [-1, 0]]
