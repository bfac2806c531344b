"""Attention patterns: every architecture's against HF's own (eager attention, ``output_attentions``), the fused
core's weights against ``scaled_dot_product_attention`` itself, and head names against the heads' writes."""
import pytest
import torch
import torch.nn.functional as F

import fxcircuits
from fxcircuits.rewrite import sdpa_pattern
from zoo import CONFIGS, NO_ATTENTION, make

TOLERANCE = 1e-5


def _hf_patterns(name: str, input_ids, mask) -> list[torch.Tensor]:
    """HF's attention weights per attention layer, from the same weights run with eager attention."""
    model = make(name, attn_implementation="eager")
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, output_attentions=True, use_cache=False)
    return [a for a in out.attentions if a is not None]


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - NO_ATTENTION))  # test_graph: none there
def test_patterns_are_hfs_attention_weights(traced, prompts, name):
    _, cm = traced(name)
    clean, _, mask = prompts
    ours, reference = cm.patterns(clean, mask), _hf_patterns(name, clean, mask)
    assert len(ours) == len(reference) == cm.graph.n_layers
    valid = mask.bool()  # a padding query's row is the implementation's choice
    for layer, (mine, theirs) in enumerate(zip(ours, reference)):
        assert mine.shape == theirs.shape and mine.shape[1] == sum(
            n.startswith(f"a{layer}.") for n in cm.graph.upstream)
        difference = (mine - theirs).abs().amax(-1).amax(1)[valid].max().item()
        assert difference <= TOLERANCE, f"a{layer}: {difference:.2e}"
        assert torch.allclose(mine.sum(-1).transpose(1, 2)[valid], torch.ones(1), atol=1e-5)


@pytest.mark.parametrize("options", [dict(is_causal=True), dict(mask="bool"), dict(mask="float"),
                                     dict(is_causal=True, enable_gqa=True, scale=0.3), dict(mask="bool", rows=0)])
def test_sdpa_pattern_times_values_is_sdpa(options):
    """The weights ``sdpa_pattern`` finds, times the values, are what ``scaled_dot_product_attention`` returns for
    the same arguments — causal, with a boolean or additive mask, grouped-query, scaled — and a query that may
    attend to no key gets zeros."""
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads = (4, 2) if options.get("enable_gqa") else (4, 4)
    q = torch.randn(2, heads, 5, 8, generator=generator)
    k, v = (torch.randn(2, kv_heads, 5, 8, generator=generator) for _ in range(2))
    kwargs = {key: value for key, value in options.items() if key in ("is_causal", "enable_gqa", "scale")}
    if "mask" in options:
        allowed = torch.rand(2, 1, 5, 5, generator=generator) < 0.7
        allowed[..., 0] = True
        if "rows" in options:
            allowed[0, :, options["rows"]] = False
        kwargs["attn_mask"] = allowed if options["mask"] == "bool" else torch.where(allowed, 0.0, -1e4)
    weights = sdpa_pattern(q, k, v, **kwargs)
    if "rows" in options:
        assert weights[0, :, options["rows"]].abs().max() == 0
        return
    assert torch.allclose(weights @ v.repeat_interleave(heads // kv_heads, 1), F.scaled_dot_product_attention(
        q, k, v, **kwargs), atol=1e-6)


def test_a_float64_models_patterns_keep_float64s_digits():
    """The weights of an SDPA core are computed in the model's dtype where it is wider than float32: a float64
    GPT-2's, against HF's eager ones, to float64's rounding (its scores made float32 were 1e-9 off, and its heads'
    writes by key position then added up to their direct logits only to 6e-10)."""
    model = make("gpt2", dtype=torch.float64)
    cm = fxcircuits.trace(model)  # its SDPA cores, whose weights the trace spells out
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = make("gpt2", dtype=torch.float64, attn_implementation="eager")(
            ids, output_attentions=True).attentions
    assert max((mine - theirs).abs().max().item() for mine, theirs in zip(cm.patterns(ids), reference)) < 1e-14
    sources = fxcircuits.source_logits(cm, ids, heads=["a0.h0", "a1.h3"], positions="all")
    direct = fxcircuits.direct_logits(cm, ids, nodes=["a0.h0", "a1.h3"], positions="all")
    assert (sources.logits.sum(3) - direct.logits).abs().max() < 1e-13 * direct.logits.abs().max()


def test_head_names_are_the_heads_whose_writes_the_weights_make(traced, prompts):
    """Node ``a0.h{h}``'s output is head h's weights times its values, through its columns of the output
    projection — values and projection taken from the HF model's own modules."""
    model, cm = traced("llama")
    clean, _, mask = prompts
    layer = model.model.layers[0].self_attn
    n_heads, head_dim = model.config.num_attention_heads, layer.head_dim
    with torch.no_grad():
        hidden = model(input_ids=clean, attention_mask=mask, output_hidden_states=True).hidden_states[0]
        values = layer.v_proj(model.model.layers[0].input_layernorm(hidden)).unflatten(-1, (-1, head_dim))
        weights = cm.patterns(clean, mask)[0]
        outputs = cm.activations(clean, mask)
    groups = n_heads // values.shape[2]
    for h in range(n_heads):
        z = weights[:, h] @ values[:, :, h // groups]
        write = z @ layer.o_proj.weight[:, h * head_dim:(h + 1) * head_dim].T
        assert torch.allclose(outputs[cm.graph.node_index[f"a0.h{h}"]][mask.bool()], write[mask.bool()], atol=1e-5)


class _Tokens:
    def decode(self, ids):
        return f"<{ids[0]}>"


def test_attention_patterns_by_head_name(traced, prompts):
    _, cm = traced("llama")
    clean, _, mask = prompts
    patterns = fxcircuits.attention_patterns(cm, clean, mask, heads=["a1.h2", "a0.h0"])
    every = cm.patterns(clean, mask)
    assert torch.equal(patterns["a1.h2"], every[1][:, 2]) and torch.equal(patterns["a0.h0"], every[0][:, 0])
    weights, keys = patterns.query(example=0)  # left-padded by two: the real tokens are positions 2…6
    assert keys.tolist() == [2, 3, 4, 5, 6] and torch.equal(weights[0], every[1][0, 2, -1, 2:])
    top = patterns.top(_Tokens(), k=2, example=0)
    assert [head for head, _ in top] == ["a1.h2", "a0.h0"]
    best = weights[0].argmax().item()
    assert top[0][1][0] == (f"<{clean[0, keys[best]].item()}>", pytest.approx(weights[0, best].item()))
    figure = patterns.plot(_Tokens(), example=0)
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["a1.h2", "a0.h0"]
    with pytest.raises(ValueError, match="padding"):
        patterns.query(example=0, position=1)
    with pytest.raises(IndexError, match=f"position={clean.shape[1]}: 7 positions were read, position 0 to 6"):
        patterns.query(example=0, position=clean.shape[1])
    with pytest.raises(KeyError, match="a{layer}.h{head}"):
        fxcircuits.attention_patterns(cm, clean, mask, heads=["a7.h0"])
    with pytest.raises(KeyError, match="not among"):
        patterns["a1.h0"]
    assert len(fxcircuits.attention_patterns(cm, clean, mask).heads) == sum(w.shape[1] for w in every)


def test_patterns_refuse_examples_positions_and_counts_by_name(traced, prompts):
    """An example past the batch, a query position that is no index or ``"last"``, and a count below 1 are refused
    naming which, by every reader — not an IndexError or a TypeError from torch that names nothing."""
    _, cm = traced("llama")
    clean, _, mask = prompts
    patterns = fxcircuits.attention_patterns(cm, clean, mask, heads=["a1.h2"])
    for read in (lambda: patterns.table(_Tokens(), example=5), lambda: patterns.top(_Tokens(), example=-4),
                 lambda: patterns.plot(_Tokens(), example=5, position=3), lambda: patterns.query(5)):
        with pytest.raises(IndexError, match="example=(5|-4): 3 examples were read, example 0 to 2"):
            read()
    for position in (2.0, "first", True):
        with pytest.raises(IndexError, match=f"position={position!r}: 7 positions were read, .* 'last' for the last"):
            patterns.query(0, position)
    for k in (0, -1, 1.5):
        with pytest.raises(ValueError, match=f"k is a count, an int of at least 1; got {k}"):
            patterns.top(_Tokens(), k=k)


def test_attention_by_span_sums_each_prompts_own_tokens(traced, prompts):
    """The weight on a span, from the last token, a span's last token or an index, is the sum of the weights on
    that prompt's tokens of the span, read off cm.patterns."""
    _, cm = traced("llama")
    clean, _, mask = prompts
    spans = {"A": torch.tensor([[2, 4], [0, 1], [3, 6]]), "B": torch.tensor([[5, 6], [4, 6], [1, 2]])}
    patterns = fxcircuits.attention_patterns(cm, clean, mask, heads=["a1.h2", "a0.h0"])
    every = cm.patterns(clean, mask)
    for query, rows in [("last", [6, 6, 6]), ("B", [5, 5, 1]), (-2, [5, 5, 5]), (4, [4, 4, 4])]:
        shares = patterns.by_span(spans, query=query)
        assert shares.shape == (2, 3, 2)
        for b, row in enumerate(rows):
            for n, (start, stop) in enumerate(r[b].tolist() for r in spans.values()):
                expected = every[1][b, 2, row, start:stop].sum()
                torch.testing.assert_close(shares[0, b, n], expected)
    with pytest.raises(KeyError, match="no span named 'C'"):
        patterns.by_span(spans, query="C")
    with pytest.raises(ValueError, match="padding"):
        patterns.by_span(spans, query=0)  # example 0 is left-padded by two
    with pytest.raises(IndexError, match="query position=7: 7 query positions were read, query position 0 to 6"):
        patterns.by_span(spans, query=7)
    with pytest.raises(ValueError, match="no spans given"):
        patterns.by_span({})
    for bad, says in [({"A": torch.tensor([[2, 9], [0, 1], [3, 6]])}, r"ranges 0 <= start < stop <= 7"),
                      ({"A": spans["A"][:2]}, r"LongTensor \[B=3, 2\]")]:  # past the prompts; of another batch
        with pytest.raises(ValueError, match=says):
            patterns.by_span(bad)


def test_patterns_of_chosen_layers_only(traced, prompts):
    _, cm = traced("gpt2")
    clean, _, mask = prompts
    every, chosen = cm.patterns(clean, mask), cm.patterns(clean, mask, layers=[1])
    assert chosen[0] is None and torch.equal(chosen[1], every[1])
    with pytest.raises(ValueError, match="no attention layer 2"):
        cm.patterns(clean, mask, layers=[2])


def test_heads_given_as_a_circuit_are_its_heads_in_graph_order(traced, prompts):
    """``heads=circuit``, as the lens takes ``nodes=circuit``: the heads its edges leave or enter (also through a q, k
    or v input), in graph order, for patterns and source logits alike; a circuit without heads is refused, saying
    what to give."""
    _, cm = traced("llama")
    clean, _, mask = prompts
    circuit = fxcircuits.Circuit(cm.graph, ["a1.h2->m1", "m1->logits", "input->a0.h3<k>", "m0->a1.h0<v>"])
    patterns = fxcircuits.attention_patterns(cm, clean, mask, heads=circuit)
    assert patterns.heads == ["a0.h3", "a1.h0", "a1.h2"]
    named = fxcircuits.attention_patterns(cm, clean, mask, heads=patterns.heads)
    torch.testing.assert_close(patterns.weights, named.weights, atol=0, rtol=0)
    sources = fxcircuits.source_logits(cm, clean, mask, heads=circuit)
    assert sources.heads == patterns.heads
    torch.testing.assert_close(sources.logits, fxcircuits.source_logits(cm, clean, mask, heads=patterns.heads).logits,
                               atol=0, rtol=0)
    with pytest.raises(ValueError, match="the circuit has no heads.*give head names"):
        fxcircuits.attention_patterns(cm, clean, mask, heads=fxcircuits.Circuit(cm.graph, ["m0->m1"]))


def test_a_query_position_given_as_a_tensor_is_refused_asking_for_an_int(traced, prompts):
    """A position in range but given as a tensor is refused saying to give an int — not as if out of range."""
    _, cm = traced("llama")
    clean, _, mask = prompts
    patterns = fxcircuits.attention_patterns(cm, clean, mask, heads=["a1.h2"])
    with pytest.raises(IndexError, match=r"position=tensor\(5\): .*; give an int \(Tensor given\)"):
        patterns.query(0, torch.tensor(5))
