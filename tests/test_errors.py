"""Bad input gets a clear error that names the problem, never a wrong answer."""
import copy
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

import fxcircuits
from fxcircuits.patching import dense_keep
from zoo import make


@pytest.fixture
def llama(traced):
    return traced("llama")[1]


@pytest.mark.parametrize("alongside", [False, True])  # the corrupted run recorded first, or run in the same pass
def test_clean_and_corrupted_of_different_lengths(llama, alongside, monkeypatch):
    monkeypatch.setattr(fxcircuits.CircuitModel, "runs_alongside", lambda self: alongside)
    with torch.no_grad(), pytest.raises(ValueError, match="same token length"):
        llama(torch.zeros(2, 6, dtype=torch.long), corrupted_input_ids=torch.zeros(2, 7, dtype=torch.long),
              edge_mask=torch.ones(len(llama.graph.edges)))


def test_token_ids_and_masks_as_hf_takes_them_and_anything_else_refused(traced):
    """int32 ids (some tokenizers hand them) and a mask of any dtype (HF reads non-zero as attended) give HF's
    logits; ids that are not a tensor of integers, or a mask of another shape, are refused naming what is
    expected."""
    model, cm = traced("llama")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        for given in (mask.bool(), mask.float(), mask.int()):
            assert torch.allclose(cm(ids.int(), given)[mask.bool()], expected, atol=1e-5)
        patched = cm(ids, mask, corrupted_input_ids=ids.flip(0), edge_mask=torch.zeros(len(cm.graph.edges)))
        assert torch.equal(patched, cm(ids, mask.bool(), corrupted_input_ids=ids.flip(0).int(),
                                       edge_mask=torch.zeros(len(cm.graph.edges))))
    batch = {"clean": ids, "corrupted": ids.flip(0), "attention_mask": mask, "correct": torch.tensor([[3], [4]]),
             "incorrect": torch.tensor([[5], [6]])}
    scores = [fxcircuits.attribute(cm, [{**batch, "attention_mask": given}], "logit_diff", "eap", progress=False)
              for given in (mask, mask.bool())]
    assert torch.equal(scores[0].tensor, scores[1].tensor) and scores[0].tensor.abs().sum() > 0
    for bad in (ids.tolist(), ids.float()):
        with pytest.raises(TypeError, match="input_ids must be a tensor of token ids"):
            cm(bad)
    with pytest.raises(TypeError, match="corrupted_input_ids must be a tensor of token ids"):
        cm(ids, corrupted_input_ids=ids.float(), edge_mask=torch.zeros(len(cm.graph.edges)))
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor of input_ids' shape \(2, 7\)"):
        cm(ids, mask[:, 1:])
    for empty in (ids[:0], ids[:, :0]):
        expected = f"input_ids must be [batch, seq] with at least one prompt of one token, got shape {tuple(empty.shape)}"
        with pytest.raises(ValueError, match=re.escape(expected)):
            cm(empty)


def test_trace_under_no_grad_and_in_inference_mode():
    """trace() tells which heads a projection reads by gradients: it takes them under the caller's no_grad, and
    refuses inference mode by name, where autograd's own error would not say who asked for a gradient."""
    model = make("llama")
    edges = fxcircuits.trace(model).graph.edges
    with torch.no_grad():
        assert fxcircuits.trace(model).graph.edges == edges
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"trace\(\) takes gradients, which "
                                                                   r"torch.inference_mode\(\) rules out"):
        fxcircuits.trace(model)


def test_the_corrupted_run_alongside_takes_no_gradient(llama):
    ids = torch.zeros(1, 4, dtype=torch.long)
    keep = dense_keep(llama.graph, torch.ones(len(llama.graph.edges)))
    with pytest.raises(RuntimeError, match="takes no gradient: run it under torch.no_grad"):
        llama.patched_alongside(ids, torch.ones_like(ids), ids, keep)


def test_mask_of_the_wrong_length(llama):
    with pytest.raises(ValueError, match=rf"expected \[{len(llama.graph.edges)}\]"):
        llama(torch.zeros(1, 4, dtype=torch.long), corrupted_input_ids=torch.zeros(1, 4, dtype=torch.long),
              edge_mask=torch.ones(len(llama.graph.edges) - 1))


def test_unknown_edge_and_node_names(llama):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(KeyError, match=r"unknown edge name in edge_mask \(1 of 2\): 'a0.h9->logits': 'a0.h9' is "
                                       "not an upstream node"):
        llama(ids, corrupted_input_ids=ids, edge_mask={"a0.h9->logits": 0.0, "m0->logits": 0.0})
    with pytest.raises(KeyError, match=r"unknown node name in node_mask \(1 of 1\): 'm7' is not an upstream node"):
        llama(ids, corrupted_input_ids=ids, node_mask={"m7": 0.0})
    with pytest.raises(KeyError, match="not in this model's graph.*m1 writes to the stream after m0 reads it"):
        fxcircuits.Circuit(llama.graph, ["m1->m0"])
    bigger = fxcircuits.CircuitGraph.from_config({"n_layers": 5, "n_heads": 4, "parallel_attn_mlp": False})
    with pytest.raises(ValueError, match=r"this circuit is of another graph than the model's \(761 and 110 edges"):
        llama(ids, corrupted_input_ids=ids, edge_mask=fxcircuits.Circuit(bigger, ["m4->logits"]))



def test_one_name_where_a_list_of_names_is_asked_for(llama):
    """A string is iterable, and read as a list of names it would be its characters, each reported unknown."""
    ids = torch.zeros(1, 4, dtype=torch.long)
    for call, what in [(lambda: fxcircuits.logit_lens(llama, ids, nodes="m0"), "node"),
                       (lambda: fxcircuits.attention_patterns(llama, ids, heads="a0.h1"), "head"),
                       (lambda: fxcircuits.source_logits(llama, ids, heads="a0.h1"), "head"),
                       (lambda: fxcircuits.Circuit(llama.graph, "input->m0"), "edge")]:
        with pytest.raises(TypeError, match=f"{what}s are a list of names, not one string: \\[.*\\] for one {what}"):
            call()
    with pytest.raises(TypeError, match="node_mask must be a tensor or a dict of node names, not str"):
        llama(ids, corrupted_input_ids=ids, node_mask="m0")
    with pytest.raises(TypeError, match="edge_mask must be a tensor or a dict of edge names or a Circuit, not list"):
        llama(ids, corrupted_input_ids=ids, edge_mask=[1.0] * len(llama.graph.edges))


def test_nan_in_masks_or_ablation_values(llama):
    ids = torch.zeros(1, 4, dtype=torch.long)
    mask = torch.ones(len(llama.graph.edges))
    for bad in (float("nan"), float("inf"), -float("inf")):
        mask[3] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            llama(ids, corrupted_input_ids=ids, edge_mask=mask)
    with pytest.raises(ValueError, match="NaN or infinite"):
        llama(ids, corrupted_input_ids=ids, node_mask={"m1": float("nan")})
    acts = llama.activations(ids)
    acts[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        llama(ids, corrupted_activations=acts, edge_mask=torch.zeros(len(llama.graph.edges)))


def test_ablation_values_of_another_batch_size_are_refused(llama):
    ids = torch.zeros(2, 4, dtype=torch.long)
    acts = llama.activations(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"corrupted_activations have shape .*2 \(the batch\) or 1"):
        llama(ids, corrupted_activations=acts, edge_mask=torch.zeros(len(llama.graph.edges)))


def test_ablation_values_need_the_side_inputs_where_the_model_reads_them(llama, traced):
    """Gemma 4's E-models read per-layer inputs beside the stream, which the input node's edges carry: ablation
    values for the nodes alone leave them undefined."""
    _, cm = traced("gemma4_per_layer")
    ids = torch.zeros(2, 4, dtype=torch.long)
    zeros, edges = torch.zeros(len(cm.graph.upstream), 1, 1, cm.graph.d_model), torch.zeros(len(cm.graph.edges))
    with pytest.raises(ValueError, match="side input.*pass corrupted_side_inputs"):
        cm(ids, corrupted_activations=zeros, edge_mask=edges)
    with pytest.raises(ValueError, match="holds 1 tensors; .* reads 2 side inputs"):
        cm(ids, corrupted_activations=zeros, corrupted_side_inputs=[torch.zeros(1, 1, 8)], edge_mask=edges)
    with pytest.raises(ValueError, match=r"shape \(3, 4, 8\); expected one broadcastable to \(2, 4, 8\)"):
        cm(ids, corrupted_activations=zeros, corrupted_side_inputs=[torch.zeros(3, 4, 8)] * 2, edge_mask=edges)
    with pytest.raises(ValueError, match="NaN"):
        cm(ids, corrupted_activations=zeros, corrupted_side_inputs=[torch.full((1, 1, 8), float("nan"))] * 2,
           edge_mask=edges)
    with pytest.raises(ValueError, match="go with corrupted_activations"):
        cm(ids, corrupted_input_ids=ids, corrupted_side_inputs=[torch.zeros(1, 1, 8)] * 2, edge_mask=edges)
    with pytest.raises(ValueError, match="reads no side inputs"):
        llama(ids, corrupted_activations=torch.zeros(len(llama.graph.upstream), 1, 1, llama.graph.d_model),
              corrupted_side_inputs=[torch.zeros(1, 1, 8)], edge_mask=torch.zeros(len(llama.graph.edges)))


def test_positions_of_another_shape_are_refused(llama):
    ids = torch.zeros(2, 4, dtype=torch.long)
    other = llama.groups(ids)
    keep = torch.ones(1, len(llama.graph.upstream), len(llama.graph.downstream))
    for bad in (torch.tensor([3]), torch.tensor([3.0, 3.0]), torch.tensor([[3, 3]])):
        with pytest.raises(ValueError, match=r"positions must be a LongTensor \[2\]"):
            llama.patched(ids, torch.ones_like(ids), other, keep, positions=bad)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neo"])
def test_prompts_fill_the_models_context_and_no_more(traced, name):
    """The zoo's models embed 64 positions: a prompt of all 64 runs as HF runs it, a longer one is refused."""
    model, cm = traced(name)
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits
    assert (cm(ids) - logits).abs().max() <= 1e-4 * logits.abs().max()
    with pytest.raises(ValueError, match=f"{type(model).__name__} for prompts of up to 64 tokens, its context"):
        cm(torch.zeros(1, 70, dtype=torch.long))


def test_a_masked_run_needs_exactly_one_other_run(llama):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one of corrupted_input_ids"):
        llama(ids, edge_mask=torch.ones(len(llama.graph.edges)))


def test_a_corrupted_run_without_a_mask_is_refused(llama):
    """It was ignored: the call gave the clean logits, as if the corrupted run had been patched in nowhere."""
    ids = torch.zeros(1, 4, dtype=torch.long)
    for other in (dict(corrupted_input_ids=ids), dict(corrupted_activations=llama.activations(ids))):
        with pytest.raises(ValueError, match="no edge_mask or node_mask says what to patch"):
            llama(ids, **other)


def test_token_ids_outside_the_vocabulary_are_refused(llama):
    """The embedding's own error was an IndexError from inside the captured graph, naming no id."""
    ids = torch.zeros(2, 4, dtype=torch.long)
    for name, bad in (("input_ids", dict(input_ids=ids.index_fill(1, torch.tensor([2]), 128))),
                      ("input_ids", dict(input_ids=ids - 1)),
                      ("corrupted_input_ids", dict(input_ids=ids, corrupted_input_ids=ids + 130,
                                                   edge_mask=torch.zeros(len(llama.graph.edges))))):
        with pytest.raises(ValueError, match=rf"{name} holds token id (128|-1|130), outside LlamaForCausalLM's "
                                             r"vocabulary of 128 ids \(0 to 127\)"):
            llama(**bad)


def test_edge_and_node_masks_of_different_counts_are_refused(llama):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="edge_mask holds 2 masks and node_mask 3"):
        llama(ids, corrupted_input_ids=ids, edge_mask=torch.ones(2, len(llama.graph.edges)),
              node_mask=torch.ones(3, len(llama.graph.upstream)))
    one_node_mask = llama(ids, corrupted_input_ids=ids + 1, edge_mask=torch.ones(2, len(llama.graph.edges)),
                          node_mask=torch.zeros(1, len(llama.graph.upstream)))  # one mask serves both
    assert one_node_mask.shape[0] == 2 and torch.equal(one_node_mask[0], one_node_mask[1])


def test_encoder_decoder_models_are_refused():
    config = AutoConfig.for_model("t5", d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64, d_kv=16)
    with pytest.raises(fxcircuits.CaptureError, match="encoder-decoder"):
        fxcircuits.trace(AutoModelForSeq2SeqLM.from_config(config))


def test_what_is_no_loaded_causal_lm_is_refused_saying_what_to_pass():
    """The usual slips: a hub id, load_model's (model, tokenizer) pair, a base model without its head, a model whose
    weights were never loaded."""
    model = make("llama")
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(model.config)
    for given, says in [("smollm2-135m", r"str has no `.config`.*load it first: model, tokenizer = "
                                         r"fxcircuits.load_model\(name\)"),
                        ((model, None), r"tuple has no `.config`.*returns \(model, tokenizer\): pass the model"),
                        (model.model, "LlamaModel returns BaseModelOutputWithPast, without logits: it is a base model"),
                        (empty, "LlamaForCausalLM holds 21 parameters on the meta device, e.g. model.embed_tokens")]:
        with pytest.raises(fxcircuits.CaptureError, match=says):
            fxcircuits.trace(given)


def test_a_model_export_cannot_trace_is_refused():
    """Control flow on a value (here: the sign of the embeddings' sum) cannot be traced at any length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class Branching(LlamaForCausalLM):
        def forward(self, input_ids=None, **kwargs):
            out = super().forward(input_ids=input_ids, **kwargs)
            if self.model.embed_tokens(input_ids).sum() > 0:
                out.logits = out.logits + 1
            return out

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=64)
    with pytest.raises(fxcircuits.CaptureError, match="torch.export could not trace Branching"):
        fxcircuits.trace(Branching(config))


def test_attention_export_cannot_trace_is_refused_with_how_to_switch_it():
    """Flex attention guards on data, which export cannot trace: the error says to switch to SDPA, after which the
    same model object traces and gives its own logits."""
    model = make("llama", attn_implementation="flex_attention")
    with pytest.raises(fxcircuits.CaptureError, match=r"runs its attention with 'flex_attention': switch to 'sdpa' "
                                                      r"\(or 'eager'\) before tracing, model\.set_attn_implementation"):
        fxcircuits.trace(model)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(fxcircuits.trace(model)(ids), model(input_ids=ids).logits, atol=1e-5)


def test_bidirectional_models_are_refused():
    config = AutoConfig.for_model("bert", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, vocab_size=64, is_decoder=False)
    with pytest.raises(fxcircuits.CaptureError, match="not causal"):
        fxcircuits.trace(AutoModelForCausalLM.from_config(config))


def test_attention_scores_computed_from_the_stream_are_refused():
    """A score bias computed from the hidden states reaches every head from the unpatched stream whatever the mask:
    such a model must be refused (it used to trace, and patch wrongly)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaAttention

    class BiasedAttention(LlamaAttention):
        def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
            bias = hidden_states.sum(-1)[:, None, None, :]  # one bias per key position, from the stream
            return super().forward(hidden_states, position_embeddings, attention_mask + bias, **kwargs)

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=128, max_position_embeddings=64, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    layer = model.model.layers[1]
    biased = BiasedAttention(config, 1)
    biased.load_state_dict(layer.self_attn.state_dict())
    layer.self_attn = biased
    with pytest.raises(fxcircuits.DecompositionError, match="reads the residual stream other than through its q, k"):
        fxcircuits.trace(model)


def test_a_sparse_attention_indexer_patches_prompts_it_keeps_whole_and_refuses_longer_ones():
    """DeepSeek V3.2's indexer keeps the top-k keys per query, chosen from the hidden states.  On prompts of at most
    k tokens it keeps every key, whatever the stream, so patching is exact (the zoo's k = 64 runs every
    per-architecture test); on longer ones which keys it keeps would follow the stream, and a patched call says
    so.  A clean run is the model's own at any length."""
    model, wide = make("deepseek_v32", index_topk=5), make("deepseek_v32")
    cm = fxcircuits.trace(model)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        assert (logits - wide(ids, attention_mask=mask).logits)[mask.bool()].abs().max() > 1e-2  # the indexer acts
        torch.testing.assert_close(cm(ids, attention_mask=mask)[mask.bool()], logits[mask.bool()])
        with pytest.raises(ValueError, match="keeps the 5 keys per query that a top-k selection computed from the "
                           "hidden states chooses.*prompts of 8 tokens are longer.*at most 5 tokens"):
            cm(ids, attention_mask=mask, corrupted_input_ids=ids.flip(0), edge_mask=torch.ones(len(cm.graph.edges)))
        short = ids[:, :5]
        patched = cm(short, corrupted_input_ids=short.flip(0), edge_mask=torch.zeros(len(cm.graph.edges)))
        torch.testing.assert_close(patched, model(short.flip(0)).logits)


def test_a_top_k_over_expert_groups_is_no_key_selection():
    """DeepSeek V3's router marks its top groups of experts the way the indexer marks keys (a top-k scattered into a
    mask), but its marks go on to choose experts inside the MLP node, which reads its own per-edge input: with
    fewer groups kept than there are, patched runs are served, not refused."""
    model = make("deepseek_v3", n_group=2, topk_group=1)
    cm = fxcircuits.trace(model)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        patched = cm(ids, corrupted_input_ids=ids.flip(0), edge_mask=torch.zeros(len(cm.graph.edges)))
        torch.testing.assert_close(patched, model(ids.flip(0)).logits)


def test_a_mask_from_the_top_k_scores_themselves_is_refused():
    """A top-k over scores from the stream may mask keys only as a set (``components._key_selection``): a score
    bias built from the chosen scores' values follows the stream at any length, and is refused."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaAttention

    class TopBias(LlamaAttention):
        def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
            scores = hidden_states @ hidden_states.transpose(1, 2)  # [B, S, S]
            top = scores.topk(scores.shape[-1], dim=-1)
            bias = torch.zeros_like(scores).scatter(-1, top.indices, top.values.sigmoid())
            return super().forward(hidden_states, position_embeddings, attention_mask + bias[:, None], **kwargs)

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=128, max_position_embeddings=64, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    model.model.layers[1].self_attn = TopBias(config, 1)
    with pytest.raises(fxcircuits.DecompositionError, match="reads the residual stream other than through its q, k"):
        fxcircuits.trace(model)


def test_an_output_gate_after_the_output_projection_is_refused():
    """An output gate before the output projection (Qwen3-Next, AFMoE: ``o_proj(core · sigmoid(g(x)))``) gates each
    head's own columns, computed from that head's q input.  A gate after it (``o_proj(core) · sigmoid(g(x))``)
    multiplies a sum over every head: no head's gate could follow its own input, so the model is refused."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaAttention

    class GatedAttention(LlamaAttention):
        def __init__(self, config, layer_idx):
            super().__init__(config, layer_idx)
            self.gate = torch.nn.Linear(config.hidden_size, config.hidden_size, bias=False)

        def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
            out, weights = super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)
            return out * torch.sigmoid(self.gate(hidden_states)), weights

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.model.layers[1].self_attn = GatedAttention(config, 1)
    with pytest.raises(fxcircuits.DecompositionError, match=r"graph node 'mul.*the output gate multiplies values "
                                                             "that mix several heads' outputs"):
        fxcircuits.trace(model)


def test_a_value_from_the_stream_added_to_the_heads_outputs_is_refused():
    """A value computed from the hidden states and added to the heads' outputs before the output projection is no
    gate (a product): the per-edge inputs reach no such value, so the model is refused at it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaAttention

    seen = {}

    class Shifted(torch.nn.Module):
        def __init__(self, projection):
            super().__init__()
            self.projection, self.shift = projection, torch.nn.Linear(projection.in_features, projection.in_features)

        def forward(self, z):
            return self.projection(z + self.shift(seen["hidden_states"]))

    class ShiftedAttention(LlamaAttention):
        def __init__(self, config, layer_idx):
            super().__init__(config, layer_idx)
            self.o_proj = Shifted(self.o_proj)

        def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
            seen["hidden_states"] = hidden_states
            return super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.model.layers[1].self_attn = ShiftedAttention(config, 1)
    with pytest.raises(fxcircuits.DecompositionError, match=r"combined with a value computed from the residual "
                                                             "stream apart from the core's output, other than as one "
                                                             "output gate"):
        fxcircuits.trace(model)


def test_a_model_without_attention_is_its_other_writers():
    """Granite 4.0's hybrid with Mamba-2 layers alone: its MoE router's softmax is not attention (it scores no keys),
    so the model has none, and its Mamba layer and its MoE block beside the shared MLP are its nodes."""
    config = AutoConfig.for_model("granitemoehybrid", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, mamba_n_heads=8,
                                  mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16, num_local_experts=4,
                                  num_experts_per_tok=2, layer_types=["linear_attention"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    cm = fxcircuits.trace(model)
    assert cm.graph.nodes == ["input", "m0", "m1", "logits"]
    ids = torch.randint(3, 128, (2, 2, 7), generator=torch.Generator().manual_seed(0))
    found = fxcircuits.verify(cm, model, ids[0], None, ids[1])
    assert found.ok and [c.name for c in found.checks if c.difference is None] == ["heads", "patterns", "sources"], \
        found.table()


def test_keys_and_values_reused_outside_sdpa_are_refused():
    """Gemma 4's E-models reuse an earlier layer's keys and values in their last layers (KV sharing), which the
    engine follows into ``scaled_dot_product_attention``.  Run eagerly, that layer's attention reaches the later
    ones beside the stream through a matmul: refused at its softmax, saying what to do."""
    with pytest.raises(fxcircuits.DecompositionError, match=r"'softmax_1'.*keys and values are reused by another "
                                                             r"layer.*attn_implementation='sdpa'"):
        fxcircuits.trace(make("gemma4_kv_shared", attn_implementation="eager"))


def test_a_state_carried_beside_the_stream_is_refused_where_it_forks():
    """HRM runs a low-level stack several times, adding the token embedding back in before each pass, and only then
    a high-level stack: every layer but the last stack's lies where the values from the tokens take two paths.  The
    stream alone would fold those layers into ``input``; refused instead, naming the first such attention core and
    the stream's nodes around the fork, without pointing at KV sharing."""
    config = AutoConfig.for_model("hrm_text", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=4, head_dim=16, vocab_size=128, H_cycles=2, L_cycles=2,
                                  num_layers_per_stack=1)
    with pytest.raises(fxcircuits.DecompositionError, match=r"HrmTextForCausalLM at graph node "
                       r"'scaled_dot_product_attention' .*more than one path, between graph nodes '\w+' and '\w+' "
                       r"\(a second stream") as refusal:
        fxcircuits.trace(AutoModelForCausalLM.from_config(config))
    assert "attn_implementation" not in str(refusal.value)


def test_values_mixed_in_from_an_earlier_layer_beside_the_reused_ones_are_refused():
    """A model found only with some values held fixed (Gemma 4's E-models: per-layer inputs, reused keys and values)
    whose layer 3 also adds layer 0's values to the ones it reuses (value residual learning): those reach layer 3
    beside any stream its edges carry.  Refused at the value read, rather than patched from the clean run."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    seen = {}

    def value_residual(module, q, k, v, mask, **kwargs):
        if module.layer_idx == 0:
            seen["v"] = v
        elif module.layer_idx == 3:
            v = v + seen["v"]
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)

    AttentionInterface.register("fxcircuits_test_value_residual", value_residual)
    model = make("gemma4_kv_shared", attn_implementation="fxcircuits_test_value_residual")
    with pytest.raises(fxcircuits.DecompositionError, match="the attention v input reads this value, computed from "
                                                            "the tokens apart from the stream it reads"):
        fxcircuits.trace(model)


def test_a_residual_scaled_by_the_input_is_refused_at_the_scaling():
    """A residual scaled by a constant (``zoo.ScaledResidualLayer``) is a sum of per-node writes in a rescaled
    frame; one scaled by a factor computed from the stream itself (x·σ(x̄) + f(x)) is not.  The error points at
    the multiplication, and at the module and line of the model's code it was traced from.  Doge's learned
    per-channel residual passes, and Doge is refused later, at its dynamic attention mask, which every head
    computes from all heads' values."""
    from zoo import ScaledResidualLayer

    class InputScaledLayer(ScaledResidualLayer):
        def forward(self, hidden_states, **kwargs):
            attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
            hidden_states = hidden_states * torch.sigmoid(hidden_states.mean(-1, keepdim=True)) + attended
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

    model = make("scaled_residual")
    model.model.layers[1] = InputScaledLayer(model.config, 1)
    with pytest.raises(fxcircuits.DecompositionError, match=r"aten\.mul\.Tensor.*in no residual step.*changes it: "
                       r"fxcircuits needs residual additions x \+ f\(x\), or x·α \+ f\(x\) with α computed from "
                       r"the weights alone.*The node "
                       r"comes from model\.layers\.1 \(InputScaledLayer\), test_errors\.py:\d+: hidden_states = "
                       r"hidden_states \* torch\.sigmoid"):
        fxcircuits.trace(model)
    config = AutoConfig.for_model("doge", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                  max_position_embeddings=64)
    with pytest.raises(fxcircuits.DecompositionError, match=r"reads the residual stream other than through its q, k "
                       r"and v inputs.*model\.layers\.0\.self_attn \(DogeAttention\), modeling_doge\.py:\d+: attn_mask"):
        fxcircuits.trace(AutoModelForCausalLM.from_config(config))


def _llama_with_layer(forward):
    """A tiny Llama whose second decoder layer runs ``forward(layer, hidden_states, **kwargs)``: a user's own
    architecture."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class Layer(LlamaDecoderLayer):
        def forward(self, hidden_states, **kwargs):
            return forward(self, hidden_states, **kwargs)

    model = make("llama")
    model.model.layers[1] = Layer(model.config, 1).eval()
    return model


def test_a_delayed_attention_write_is_refused():
    """A delayed write (a block that reads the stream and adds its output after later writers have read it, as
    LongCat-Flash's shortcut MoE does) is taken from blocks without attention alone: an attention layer written late
    would need its heads' q, k and v at one step and their writes at another.  Refused at its core."""
    def forward(self, x, **kwargs):
        attended, _ = self.self_attn(hidden_states=self.input_layernorm(x), **kwargs)
        x_mid = x + self.mlp(self.post_attention_layernorm(x))
        return x_mid + self.mlp(self.post_attention_layernorm(x_mid)) + attended

    with pytest.raises(fxcircuits.DecompositionError, match=r"attention layer's output is added to the stream after "
                                                             r"later writers read it \(a delayed write\)"):
        fxcircuits.trace(_llama_with_layer(forward))


def test_a_block_that_reads_the_stream_at_two_points_of_one_sum_is_refused():
    """An MLP that reads the stream after attention and, beside it, the stream before (through the attention's own
    norm): no per-edge input carries both, so it is refused naming the value read from the earlier point."""
    def forward(self, x, **kwargs):
        normed = self.input_layernorm(x)
        attended, _ = self.self_attn(hidden_states=normed, **kwargs)
        x_mid = x + attended
        return x_mid + self.mlp(self.post_attention_layernorm(x_mid) + normed)

    with pytest.raises(fxcircuits.DecompositionError, match=r"reads the residual stream at two points of one residual "
                                                             r"sum \(here through '\w+'"):
        fxcircuits.trace(_llama_with_layer(forward))


def test_a_refusal_names_the_line_of_the_models_code_outside_torch():
    """The line named is the model's own, not torch's: a score bias added in a custom attention class is named at
    the test's line that adds it, and a post-norm model (GPT-1 normalises after each addition) at the line that
    calls the LayerNorm rather than inside ``nn.LayerNorm``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaAttention

    class BiasedAttention(LlamaAttention):
        def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
            return super().forward(hidden_states, position_embeddings,
                                   attention_mask + hidden_states.sum(-1)[:, None, None, :], **kwargs)

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=128, max_position_embeddings=64, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    model.model.layers[1].self_attn = BiasedAttention(config, 1)
    with pytest.raises(fxcircuits.DecompositionError, match=r"comes from model\.layers\.1\.self_attn "
                       r"\(BiasedAttention\), test_errors\.py:\d+: attention_mask \+ hidden_states\.sum"):
        fxcircuits.trace(model)
    gpt1 = AutoConfig.for_model("openai-gpt", n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128)
    with pytest.raises(fxcircuits.DecompositionError, match=r"comes from transformer\.h\.0\.ln_1 \(LayerNorm\), "
                       r"modeling_openai\.py:\d+: n = self\.ln_1\(x \+ a\)"):
        fxcircuits.trace(AutoModelForCausalLM.from_config(gpt1))


def test_zero_ablation_through_activations(llama):
    """Zero ablation of every edge: the stream holds only the constants no node writes."""
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    zeros = torch.zeros(len(llama.graph.upstream), 1, 5, 64)
    with torch.no_grad():
        ablated = llama(ids, corrupted_activations=zeros, edge_mask=torch.zeros(len(llama.graph.edges)))
        again = llama(ids.flip(0), corrupted_activations=zeros, edge_mask=torch.zeros(len(llama.graph.edges)))
    torch.testing.assert_close(ablated, again)  # nothing of the input gets through


def test_moving_a_traced_model_asks_for_a_new_trace(traced):
    model, _ = traced("gpt2")
    cm = fxcircuits.trace(model)
    cm.to("meta")
    with pytest.raises(RuntimeError, match="trace"):
        cm(torch.zeros(1, 4, dtype=torch.long))


def test_weights_edited_in_place_reach_every_run():
    """The captures hold the model's own tensors: an edit in place after the trace is what the next run computes
    with, on the clean run and on both passes of a patched one."""
    model = make("llama")
    cm = fxcircuits.trace(model)
    clean, corrupted = torch.randint(0, 128, (2, 2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for weight in (model.model.layers[0].mlp.down_proj.weight, model.model.layers[1].self_attn.k_proj.weight):
            weight.mul_(-2.0)
        torch.testing.assert_close(cm(clean), model(clean).logits, rtol=0, atol=1e-5)
        zeros = torch.zeros(len(cm.graph.edges))
        torch.testing.assert_close(cm(clean, corrupted_input_ids=corrupted, edge_mask=zeros),
                                   model(corrupted).logits, rtol=0, atol=1e-5)


def _replace(model):
    down = model.model.layers[0].mlp.down_proj
    down.weight = torch.nn.Parameter(down.weight * 2)


def _load_assigned(model):
    model.load_state_dict({k: v * 2 for k, v in model.state_dict().items()}, assign=True)


def _swap_module(model):
    model.model.layers[1].mlp = copy.deepcopy(model.model.layers[1].mlp)


def _assign_buffer(model):
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq * 0.5


@pytest.mark.parametrize("change, says", [
    (_replace, "parameter model.layers.0.mlp.down_proj.weight is no longer the one fxcircuits.trace captured"),
    (_load_assigned, "is no longer the one fxcircuits.trace captured"),
    (_swap_module, "submodule model.layers.1.mlp is no longer the one fxcircuits.trace captured"),
    (_assign_buffer, "buffer model.rotary_emb.inv_freq is no longer the one fxcircuits.trace captured"),
    (lambda model: model.half().float(), "buffer model.rotary_emb.inv_freq is no longer the one"),
    (lambda model: model.double(), "traced with its parameter model.embed_tokens.weight in torch.float32, and it is "
                                   "now torch.float64"),
    (lambda model: model.model.norm.double(), "model.norm.weight in torch.float32, and it is now torch.float64"),
    (lambda model: fxcircuits.trace(model).half(), "converting the traced model, cm.half() or cm.to(dtype), "
                                                   "converts the model too"),
    (lambda model: model.to("meta"), "traced on cpu and has since been moved to meta")])
def test_weights_replaced_or_converted_after_the_trace_ask_for_a_new_trace(change, says):
    """A parameter, buffer or submodule replaced by another would leave the captures computing with the old one (a
    wrong answer, no error: a swapped MLP moved the logits by 1.5, a halved RoPE frequency by 6e-3, a model
    converted to fp16 and back by 1e-6, through its rounded frequencies); a parameter converted or moved would fail
    inside the run: each is named before the run, with what to do."""
    model = make("llama")
    cm = fxcircuits.trace(model)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    change(model)
    with pytest.raises(RuntimeError, match="trace") as raised:
        cm(ids)
    assert says in str(raised.value)


def test_a_buffer_reassigned_to_the_same_values_still_runs():
    """A model's forward may register a buffer it recomputes as a new tensor of the same values: that is no
    change, and the run goes on, equal to HF's."""
    model = make("llama")
    cm = fxcircuits.trace(model)
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq.clone()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(cm(ids), model(ids).logits, rtol=0, atol=1e-5)


def test_lora_adapters_on_attention_are_refused_with_how_to_merge_them():
    """A PEFT model is accepted as it is.  LoRA on the MLPs alone changes only what an MLP node computes; LoRA on
    the attention projections gives each a second, low-rank path, which no per-head split follows: refused,
    saying to merge the adapters, after which the merged model traces and gives the adapted model's logits."""
    from peft import LoraConfig, get_peft_model

    def adapted(targets):
        model = get_peft_model(make("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        with torch.no_grad():  # LoRA starts as the identity (B = 0): make it change the model
            for name, weight in model.named_parameters():
                if "lora_B" in name:
                    weight.normal_(0, 0.1)
        return model.eval()

    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    mlp = adapted(["up_proj", "down_proj"])
    with torch.no_grad():
        assert torch.allclose(fxcircuits.trace(mlp)(ids), mlp(input_ids=ids).logits, atol=1e-5)
    attention = adapted(["q_proj", "v_proj", "o_proj"])
    with pytest.raises(fxcircuits.DecompositionError, match=r"carries adapters: merge them into its weights first, "
                                                             r"model = model\.merge_and_unload\(\)"):
        fxcircuits.trace(attention)
    with torch.no_grad():
        expected = attention(input_ids=ids).logits
        merged = attention.merge_and_unload()
        assert torch.allclose(fxcircuits.trace(merged)(ids), expected, atol=1e-5)


@pytest.fixture(scope="module")
def poisoned():
    """A Llama whose embedding of token 5 is NaN: every later position of a row holding it gives NaN logits, as
    some HF models' own runs do (Granite in float64 under left padding)."""
    model = make("llama")
    cm = fxcircuits.trace(model)
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")
    return cm


def _nan_batch(where: str | None) -> dict:
    """Four examples; token 5 at rows 1 and 3 of the ``where`` prompts ("clean", "corrupted" or neither)."""
    prompts = {"clean": torch.randint(6, 128, (4, 5), generator=torch.Generator().manual_seed(0))}
    prompts["corrupted"] = prompts["clean"].flip(0)
    if where is not None:
        prompts[where][[1, 3], 2] = 5
    return {**prompts, "attention_mask": torch.ones(4, 5, dtype=torch.long), "correct": torch.tensor([[7]] * 4),
            "incorrect": torch.tensor([[8]] * 4)}


@pytest.mark.parametrize("method", ["eap", "exact", "acdc", "mask"])
def test_nan_logits_name_the_examples_and_the_run(poisoned, method):
    """Scores that the model's own NaNs would make NaN are refused, naming which examples and which run; the
    second batch's examples count on from the first's."""
    batches = [_nan_batch("corrupted"), _nan_batch("clean")]
    with pytest.raises(ValueError, match=r"NaN or infinite on the clean run of 2 of 8 examples \(counting from 0 "
                                         r"over the batches: 5, 7\).*float32"):
        fxcircuits.attribute(poisoned, batches, "logit_diff", method, progress=False,
                             **({"mask_steps": 2} if method == "mask" else {}))
    with pytest.raises(ValueError, match=r"the run with every edge patched of 2 of 4 examples .*: 1, 3\)"):
        fxcircuits.Evaluator(poisoned, batches[:1], "logit_diff")


@pytest.mark.parametrize("mask_steps", [1, 3])
def test_a_learned_mask_refuses_nan_logits_before_its_warm_start_ranks_them(poisoned, mask_steps):
    """The warm start's NaN scores would become ranks, and a few steps need not run the poisoned examples with
    every edge patched: the clean and the fully patched run are checked first, as the other methods' are."""
    with pytest.raises(ValueError, match=r"the run with every edge patched of 2 of 4 examples .*: 1, 3\)"):
        fxcircuits.attribute(poisoned, [_nan_batch("corrupted")], "logit_diff", "mask", mask_steps=mask_steps,
                             progress=False)


@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_effects_by_position_that_nan_logits_would_fill_are_refused(poisoned, method):
    with pytest.raises(ValueError, match=r"the run with every edge patched of 2 of 4 examples .*: 1, 3\)"):
        fxcircuits.patch_by_position(poisoned, _nan_batch("corrupted"), "logit_diff", method=method)


def test_scores_by_span_that_nan_logits_would_fill_are_refused(poisoned):
    batch = {**_nan_batch("clean"), "spans": {"A": torch.tensor([[0, 2]] * 4)}}
    with pytest.raises(ValueError, match=r"NaN or infinite on the clean run of 2 of 4 examples .*: 1, 3\)"):
        fxcircuits.attribute_by_span(poisoned, [batch], "logit_diff", "eap", progress=False)


def test_scores_that_overflow_between_the_runs_are_refused(poisoned):
    """A metric finite on the clean and the fully patched run but not at the points between them (here: wherever
    a gradient is taken) leaves some scores NaN: refused, saying where else to look."""
    def fragile(logits, batch):
        value = fxcircuits.metrics.logit_diff(logits, batch)
        return value * float("nan") if torch.is_grad_enabled() else value
    with pytest.raises(ValueError, match="finite on the clean run and with every edge patched: a run between"):
        fxcircuits.attribute(poisoned, [_nan_batch(None)], fragile, "eap", progress=False)


def _batch(rows: int = 4) -> dict:
    """A batch of ``rows`` examples for the tiny models, answers 7 against 8."""
    generator = torch.Generator().manual_seed(2)
    clean, corrupted = (torch.randint(6, 128, (rows, 5), generator=generator) for _ in range(2))
    return {"clean": clean, "corrupted": corrupted, "attention_mask": torch.ones(rows, 5, dtype=torch.long),
            "correct": torch.tensor([[7]] * rows), "incorrect": torch.tensor([[8]] * rows)}


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "exact"])
def test_a_metric_that_averages_the_batch_itself_is_refused(llama, method):
    """A metric giving the batch's mean would scale every gradient score by 1/B (by 1/(B·steps) for EAP-IG) and
    break the patched runs' joins; refused naming the shape it must give."""
    def mean_diff(logits, batch):
        return fxcircuits.metrics.logit_diff(logits, batch).mean()
    with pytest.raises(ValueError, match=r"gave shape \[\] for logits of shape .*one value per example.*not their "
                                         r"mean"):
        fxcircuits.attribute(llama, [_batch()], mean_diff, method, progress=False)
    with pytest.raises(ValueError, match=r"gave a float"):
        fxcircuits.Evaluator(llama, [_batch()], lambda logits, batch: 1.0)


def test_a_metric_without_a_gradient_is_refused_by_the_methods_that_take_one(llama):
    """Accuracy (an argmax compared with the answer) has no gradient: the gradient methods refuse it by name, and the
    methods that only run the metric score with it."""
    def accuracy(logits, batch):
        return (fxcircuits.metrics.logits_at_answer(logits, batch).argmax(-1) == batch["correct"][:, 0]).float()
    for method, options in (("eap", {}), ("eap-ig-inputs", {}), ("clean-corrupted", {}), ("eap-ig-activations", {}),
                            ("mask", {"mask_steps": 2, "warm_start": None}), ("ugs", {"mask_steps": 2})):
        with pytest.raises(ValueError, match=f"{method!r} takes the metric's gradient, and this metric's value "
                                             "carries none .* or score with method='exact' or 'acdc'"):
            fxcircuits.attribute(llama, [_batch()], accuracy, method, progress=False, **options)
    assert fxcircuits.attribute(llama, [_batch()], accuracy, "exact", progress=False).tensor.isfinite().all()
    for method in ("attribution", "attribution-ig"):  # patch_by_position's names, and its method without gradients
        with pytest.raises(ValueError, match=f"{method!r} takes the metric's gradient, and this metric's value "
                                             "carries none .* or score with method='exact', without gradients"):
            fxcircuits.patch_by_position(llama, _batch(), accuracy, method=method, progress=False)
    assert fxcircuits.patch_by_position(llama, _batch(), accuracy, progress=False).effects.isfinite().all()


def test_one_batch_dict_is_one_batch_everywhere(llama):
    """A batch dict given where batches are asked for is the one batch (``list()`` would take its keys)."""
    batch = _batch()
    assert torch.equal(fxcircuits.attribute(llama, batch, "logit_diff", "eap", progress=False).tensor,
                       fxcircuits.attribute(llama, [batch], "logit_diff", "eap", progress=False).tensor)
    circuit = fxcircuits.Circuit(llama.graph, llama.graph.edges[:40])
    assert fxcircuits.evaluate(llama, circuit, batch, "logit_diff").faithfulness == \
        fxcircuits.evaluate(llama, circuit, [batch], "logit_diff").faithfulness
    mean_one = fxcircuits.Evaluator(llama, [batch], "logit_diff", ablation="mean", reference=batch)
    mean_list = fxcircuits.Evaluator(llama, [batch], "logit_diff", ablation="mean", reference=[batch])
    assert torch.equal(mean_one.empty, mean_list.empty)
    with pytest.raises(ValueError, match="reference= is the data mean and optimal ablation are computed over.*"
                                         "ablation='mean'"):
        fxcircuits.Evaluator(llama, [batch], "logit_diff", reference=[batch])


@pytest.mark.parametrize("count, says", [(2.5, r"masks_per_call is a count, an int of at least 1; got 2\.5"),
                                         (0, "masks_per_call is a count"), (True, "got True")])
def test_counts_that_are_no_whole_number_are_refused_by_name(llama, count, says):
    batch = _batch()
    with pytest.raises(ValueError, match=says):
        fxcircuits.Evaluator(llama, [batch], "logit_diff", masks_per_call=count)
    with pytest.raises(ValueError, match=says):
        fxcircuits.attribute(llama, [batch], "logit_diff", "exact", masks_per_call=count, progress=False)
    with pytest.raises(ValueError, match=says):
        fxcircuits.patch_by_position(llama, batch, "logit_diff", masks_per_call=count)
    with pytest.raises(ValueError, match="steps is a count"):
        fxcircuits.attribute(llama, [batch], "logit_diff", "eap-ig-inputs", steps=2.5, progress=False)
    scores = fxcircuits.attribute(llama, [batch], "logit_diff", "eap", progress=False)
    with pytest.raises(ValueError, match="per_round is a count"):
        fxcircuits.Evaluator(llama, [batch], "logit_diff").smallest(scores, per_round=1.5)


def test_patch_by_position_takes_no_call_size_as_its_default(llama):
    batch = _batch(2)
    assert torch.equal(fxcircuits.patch_by_position(llama, batch, "logit_diff", masks_per_call=None).effects,
                       fxcircuits.patch_by_position(llama, batch, "logit_diff", masks_per_call=16).effects)


def test_what_is_no_scores_is_refused_where_circuits_are_cut(llama):
    circuit = fxcircuits.Circuit(llama.graph, llama.graph.edges[:5])
    evaluator = fxcircuits.Evaluator(llama, [_batch()], "logit_diff")
    for run in (evaluator.smallest, evaluator.curve, evaluator.mib):
        with pytest.raises(TypeError, match="cuts circuits from scores, EdgeScores or SpanScores.*not a Circuit; "
                                            "evaluate runs a circuit"):
            run(circuit)


def test_one_span_name_as_a_string_is_refused_saying_to_list_it(llama):
    batch = {**_batch(), "spans": {"S2": torch.tensor([[1, 2]] * 4), "END": torch.tensor([[4, 5]] * 4)}}
    with pytest.raises(TypeError, match=r"spans are a list of names, not one string: \['S2'\]"):
        fxcircuits.patch_by_position(llama, batch, "logit_diff", spans="S2")
    with pytest.raises(TypeError, match=r"\['S2'\] for one span"):
        fxcircuits.attribute_by_span(llama, [batch], "logit_diff", "eap", spans="S2", progress=False)
    scores = fxcircuits.attribute_by_span(llama, [batch], "logit_diff", "eap", spans=["S2"], progress=False)
    with pytest.raises(KeyError, match="no span 'Z': the classes are 'S2', 'rest'"):
        scores[llama.graph.edges[0], "Z"]
    with pytest.raises(KeyError, match="no span 'Z'"):
        scores.topn(10).span("Z")


def test_ablation_values_of_another_length_width_or_type_are_refused(llama):
    ids = torch.zeros(2, 4, dtype=torch.long)
    acts = llama.activations(ids)
    zeros = torch.zeros(len(llama.graph.edges))
    for bad in (acts[:, :, :3], acts[..., :32], acts[:1]):
        with pytest.raises(ValueError, match=r"corrupted_activations have shape .*4 \(the sequence\) or 1, 64\]"):
            llama(ids, corrupted_activations=bad, edge_mask=zeros)
    with pytest.raises(TypeError, match="corrupted_activations is one tensor .* not a list"):
        llama(ids, corrupted_activations=[acts], edge_mask=zeros)
    means = acts.mean((1, 2), keepdim=True)  # [n, 1, 1, d_model]: the same for every example and token
    assert torch.equal(llama(ids, corrupted_activations=means, edge_mask=zeros),
                       llama(ids, corrupted_activations=means.expand_as(acts), edge_mask=zeros))


def test_heads_that_a_layer_lacks_are_refused_where_sources_are_read(llama):
    ids = torch.zeros(2, 4, dtype=torch.long)
    for heads, says in (({1: [9]}, r"no head 9 in a1: its heads are 0 to 3"), ({1: [-1]}, "no head -1 in a1"),
                        ({"1": [0]}, r"no attention layer '1': .* numbered 0 to 1")):
        with pytest.raises(ValueError, match=says):
            llama.sources(ids, heads=heads)


def test_mask_values_given_by_name_as_tensors_keep_their_gradient(llama):
    """A dict of tensor values is as differentiable as a tensor mask: the same gradient reaches each value."""
    ids, corrupted = _batch(2)["clean"], _batch(2)["corrupted"]
    names = llama.graph.edges[3], llama.graph.edges[40]
    values = {name: torch.tensor(v, requires_grad=True) for name, v in zip(names, (0.25, 0.75))}
    llama(ids, corrupted_input_ids=corrupted, edge_mask=values).sum().backward()
    mask = torch.ones(len(llama.graph.edges), dtype=torch.float64)
    mask[[llama.graph.edge_index[n] for n in names]] = torch.tensor([0.25, 0.75], dtype=torch.float64)
    mask.requires_grad_()
    llama(ids, corrupted_input_ids=corrupted, edge_mask=mask).sum().backward()
    for name, value in values.items():
        assert value.grad is not None and value.grad != 0
        assert torch.allclose(value.grad.double(), mask.grad[llama.graph.edge_index[name]], rtol=1e-4)
    with pytest.raises(ValueError, match=r"edge_mask\['.*'\] holds 2 values; give one value a name"):
        llama(ids, corrupted_input_ids=corrupted, edge_mask={names[0]: torch.ones(2)})
