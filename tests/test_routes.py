"""Information flow routes (``fxcircuits.routes``) against EAP-IG's formula computed on the untouched HF model, whose
streams and node outputs forward hooks read.  The reference's ``input`` is ours, the stream entering the first layer;
EAP-IG's own code, run on TransformerLens with the same weights, takes the token embedding alone, and agrees on a
rotary model (1.8e-7 in float32) but not on GPT-2, whose position embedding it leaves unattributed (the module's
docstring)."""
import pytest
import torch

import fxcircuits
from fxcircuits.data import position_classes
from zoo import make


def _recorded(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[dict, dict]:
    """A GPT-2 or Llama run's node outputs (``input``, each head's write without the output bias, each MLP's) and
    the streams its readers read (``resid_pre`` l, ``resid_mid`` l, the final one), by forward hooks."""
    gpt2 = model.config.model_type == "gpt2"
    layers = model.transformer.h if gpt2 else model.model.layers
    heads, outputs, streams, hooks = model.config.num_attention_heads, {}, {}, []

    def keep(store, key, value):
        store[key] = value.detach().double()

    def head_writes(layer, z):  # z [B, S, heads · head_dim], the merged heads entering the output projection
        attention = layers[layer].attn if gpt2 else layers[layer].self_attn
        weight = attention.c_proj.weight if gpt2 else attention.o_proj.weight.T  # [in, out]
        for h, part in enumerate(z.chunk(heads, -1)):
            keep(outputs, f"a{layer}.h{h}", part @ weight.chunk(heads, 0)[h])

    for layer, block in enumerate(layers):
        attention = block.attn.c_proj if gpt2 else block.self_attn.o_proj
        middle = block.ln_2 if gpt2 else block.post_attention_layernorm
        hooks += [block.register_forward_pre_hook(
                      lambda m, a, k, layer=layer: keep(streams, f"pre{layer}", (a or (k["hidden_states"],))[0]),
                      with_kwargs=True),
                  attention.register_forward_pre_hook(lambda m, a, layer=layer: head_writes(layer, a[0])),
                  middle.register_forward_pre_hook(lambda m, a, layer=layer: keep(streams, f"mid{layer}", a[0])),
                  block.mlp.register_forward_hook(lambda m, a, out, layer=layer: keep(outputs, f"m{layer}", out))]
    final = model.transformer.ln_f if gpt2 else model.model.norm
    hooks.append(final.register_forward_pre_hook(lambda m, a: keep(streams, "final", a[0])))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    outputs["input"] = streams["pre0"]
    return outputs, streams


def _reference(model, ids: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
    """Every edge's score as EAP-IG's ``get_scores_information_flow_routes`` computes it: proximity
    clamp(‖x‖₁ − ‖c_u − x‖₁, 0) over each reader's sources, normalised over them, averaged over the tokens of
    ``weights`` [B, S] in each prompt, summed over prompts, over the number of prompts."""
    outputs, streams = _recorded(model, ids, mask)
    n_layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    scores, sources = {}, ["input"]
    for layer in range(n_layers):
        attention = [f"a{layer}.h{h}" for h in range(heads)]
        readers = [(f"{head}<{role}>", f"pre{layer}") for role in "qkv" for head in attention]
        for port, stream in readers + [(f"m{layer}", f"mid{layer}")]:
            if port == f"m{layer}":
                sources = sources + attention
            x = streams[stream]
            proximity = torch.stack([(x.abs().sum(-1) - (outputs[u] - x).abs().sum(-1)).clamp(min=0)
                                     for u in sources])
            per_prompt = _averaged(proximity / proximity.sum(0), weights)
            scores.update({f"{u}->{port}": float(v) for u, v in zip(sources, per_prompt.sum(-1) / len(ids))})
        sources = sources + [f"m{layer}"]
    x = streams["final"]
    proximity = torch.stack([(x.abs().sum(-1) - (outputs[u] - x).abs().sum(-1)).clamp(min=0) for u in sources])
    per_prompt = _averaged(proximity / proximity.sum(0), weights)
    scores.update({f"{u}->logits": float(v) for u, v in zip(sources, per_prompt.sum(-1) / len(ids))})
    return scores


def _averaged(share: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``share`` [sources, B, S] averaged over the tokens of ``weights`` [B, S] in each prompt: EAP-IG multiplies by
    its mask, which keeps a padded token's NaN (HF's stream holds them where a padded query attends to nothing)."""
    return share.where(weights > 0, 0).mul(weights).sum(-1) / weights.sum(-1)


def _prompts(padding: str = "left") -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (3, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, slice(0, 2) if padding == "left" else slice(-2, None)] = 0
    spans = {"S": torch.tensor([[3, 5], [1, 2], [4, 7]]), "END": torch.tensor([[6, 7], [6, 7], [1, 3]])}
    return {"clean": ids, "attention_mask": mask, "spans": spans}


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_routes_equal_eap_igs_formula_on_the_hf_models_own_streams(name, padding):
    """Every edge, q, k and v apart, float64, padded prompts: as EAP-IG computes it on the model's streams, whose
    attention output biases (GPT-2's) no node writes; each reader's scores add up to 1."""
    model = make(name).double()
    batch = _prompts(padding)
    scores = fxcircuits.attribute(fxcircuits.trace(model), batch, method="information-flow-routes", progress=False)
    reference = _reference(model, batch["clean"], batch["attention_mask"], batch["attention_mask"].double())
    assert set(reference) == set(scores.graph.edges)
    ours = torch.tensor([scores[e] for e in reference], dtype=torch.float64)
    torch.testing.assert_close(ours, torch.tensor(list(reference.values()), dtype=torch.float64), rtol=0, atol=1e-12)
    assert scores.method == "information-flow-routes" and scores.info == {"examples": 3}


def test_routes_are_the_same_taken_a_few_tokens_at_a_time(monkeypatch):
    """``routes.BLOCK`` bounds the nodes' outputs laid out at once; blocks of two tokens give the same scores."""
    from fxcircuits import routes
    cm, batch = fxcircuits.trace(make("llama").double()), _prompts()
    whole = fxcircuits.attribute(cm, batch, method="information-flow-routes", progress=False).tensor
    monkeypatch.setattr(routes, "BLOCK", 2 * len(cm.graph.upstream) * cm.graph.d_model)
    torch.testing.assert_close(fxcircuits.attribute(cm, batch, method="information-flow-routes",
                                                    progress=False).tensor, whole, rtol=0, atol=1e-14)


def test_routes_by_span_average_over_each_spans_real_tokens():
    """``attribute_by_span``: each class's scores are the formula averaged over that class's real tokens alone (the
    rest excludes the padding)."""
    model = make("llama").double()
    batch = _prompts()
    scores = fxcircuits.attribute_by_span(fxcircuits.trace(model), batch, method="information-flow-routes",
                                          progress=False)
    names, classes = position_classes(batch)
    assert scores.spans == names == ["S", "END", "rest"]
    real = batch["attention_mask"].double()
    for c, name in enumerate(names):
        reference = _reference(model, batch["clean"], batch["attention_mask"], classes[c].double() * real)
        ours = scores.tensor[c, [scores.graph.edge_index[e] for e in reference]]
        expected = torch.tensor(list(reference.values()), dtype=torch.float64)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12,
                                   msg=lambda message, name=name: f"{name}: {message}")


def test_routes_by_span_average_over_the_prompts_that_hold_each_span():
    """A span empty in one prompt is averaged over the others: each reader's scores at it still add up to 1."""
    batch = _prompts()
    batch["spans"]["END"][2] = torch.tensor([3, 3])  # no token of the third prompt
    scores = fxcircuits.attribute_by_span(fxcircuits.trace(make("llama")), batch, method="information-flow-routes",
                                          progress=False)
    graph = scores.graph
    sums = torch.zeros(3, len(graph.downstream), dtype=scores.tensor.dtype).index_add_(1, graph.dst, scores.tensor)
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)


def test_routes_by_span_line_up_each_batchs_spans_with_the_firsts():
    """A second batch naming its spans in another order is read in the first's; one lacking a span is refused by name,
    as every method by span refuses it."""
    cm, first = fxcircuits.trace(make("llama")), _prompts()
    second = {**first, "spans": {"END": first["spans"]["END"], "S": first["spans"]["S"]}}
    twice = fxcircuits.attribute_by_span(cm, [first, first], method="information-flow-routes", progress=False)
    swapped = fxcircuits.attribute_by_span(cm, [first, second], method="information-flow-routes", progress=False)
    assert swapped.spans == ["S", "END", "rest"] and torch.equal(swapped.tensor, twice.tensor)
    with pytest.raises(KeyError, match="no span 'END' in the batch"):
        fxcircuits.attribute_by_span(cm, [first, {**first, "spans": {"S": first["spans"]["S"]}}],
                                     method="information-flow-routes", progress=False)


def test_prompts_that_are_no_batch_are_refused_by_name():
    cm = fxcircuits.trace(make("gpt2"))
    with pytest.raises(TypeError, match=r"a batch is a dict of tensors, .* not a Tensor: pass \{'clean': ids\}"):
        fxcircuits.attribute(cm, _prompts()["clean"], method="information-flow-routes")
    with pytest.raises(TypeError, match="^reference=…: method 'information-flow-routes' scores"):  # one line
        fxcircuits.attribute(cm, _prompts(), method="information-flow-routes", reference=[_prompts()])


def test_prompts_without_a_real_token_are_refused():
    """As every other method refuses them: such a prompt would count as an example and scale every score down."""
    batch = _prompts()
    batch["attention_mask"][1] = 0
    with pytest.raises(ValueError, match="has a row with no real token"):
        fxcircuits.attribute(fxcircuits.trace(make("gpt2")), batch, method="information-flow-routes")


@pytest.mark.parametrize("name", ["gpt_neox", "gemma2", "gemma4", "scaled_residual", "mixtral", "qwen3_5"])
def test_each_readers_routes_add_up_to_one(name):
    """Parallel attention and MLP, sandwich norms, a stream rescaled between layers or carried scaled, an MoE block, a
    hybrid's linear attention: every reader's scores are shares of its input, adding up to 1, none negative."""
    cm = fxcircuits.trace(make(name))
    scores = fxcircuits.attribute(cm, _prompts(), method="information-flow-routes", progress=False).tensor
    graph = cm.graph
    sums = torch.zeros(len(graph.downstream), dtype=scores.dtype).index_add_(0, graph.dst, scores)
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)
    assert (scores >= 0).all()


@pytest.mark.parametrize("setting, value", [("metric", "logit_diff"), ("ablation", "zero"), ("masks_per_call", 4),
                                            ("steps", 3), ("threshold", 0.1)])
def test_routes_refuse_what_they_do_not_read(setting, value):
    cm = fxcircuits.trace(make("gpt2"))
    with pytest.raises(TypeError, match=f"{setting}={value!r}"):
        fxcircuits.attribute(cm, _prompts(), method="information-flow-routes", **{setting: value})


def test_a_stream_that_is_not_finite_at_a_real_token_is_refused():
    model = make("gpt2")
    cm = fxcircuits.trace(model)
    with torch.no_grad():  # the graph computes with the model's own weights
        model.get_input_embeddings().weight[5] = float("nan")
    batch = _prompts()
    batch["clean"][1, 3] = 5
    with pytest.raises(ValueError, match="is not finite at a real token: information flow routes need a finite"):
        fxcircuits.attribute(cm, batch, method="information-flow-routes", progress=False)


def test_mibs_curves_cut_routes_greedily_and_other_scores_by_top_n(tiny_folder):
    """As MIB's evaluation does (``apply_greedy`` for information flow routes): ``selection=None`` picks greedy for
    these scores, whose top ones feed the first layers and dangle once the top-n cut is pruned, and topn for EAP's."""
    model, tokenizer = fxcircuits.load_model(str(tiny_folder))
    cm = fxcircuits.trace(model)
    batches = fxcircuits.tasks.load("ioi", tokenizer, size=4, batch_size=4).batches
    evaluator = fxcircuits.Evaluator(cm, batches, "logit_diff")
    fractions = [0.05, 0.2]
    for method, selection in (("information-flow-routes", "greedy"), ("eap", "topn")):
        scores = fxcircuits.attribute(cm, batches, method=method, progress=False,
                                      **({} if method == "information-flow-routes" else {"metric": "logit_diff"}))
        assert evaluator.curve(scores, fractions).edges == evaluator.curve(scores, fractions, selection=selection).edges
    routes = fxcircuits.attribute(cm, batches, method="information-flow-routes", progress=False)
    assert evaluator.curve(routes, fractions, selection="topn").edges != evaluator.curve(routes, fractions).edges
    with pytest.raises(ValueError, match="no selection '' by size"):
        evaluator.curve(routes, fractions, selection="")
    with pytest.raises(ValueError, match="kl is smallest at the clean run, where eap takes its gradient"):
        fxcircuits.attribute(cm, batches, "kl", method="eap")
