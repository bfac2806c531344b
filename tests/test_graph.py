"""Components found by structure: node/edge names, order and counts as the field writes them."""
import networkx as nx
import pytest

from zoo import CONFIGS

PARALLEL = {"gptj", "gpt_neox", "falcon_multi_query", "falcon_new_arch", "phi"}
HYBRID = {"qwen3_5", "granite_hybrid"}  # a layer without attention: the formula's layers are attention layers


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - HYBRID))
def test_counts_follow_the_formula(traced, name):
    _, cm = traced(name)
    g, n_layers, n_heads = cm.graph, 2, 4
    assert g.n_layers == n_layers and g.n_heads == n_heads
    assert len(g.upstream) == 1 + n_layers * (n_heads + 1)
    assert len(g.downstream) == n_layers * (3 * n_heads + 1) + 1
    assert g.parallel_attn_mlp == (name in PARALLEL)
    # every upstream node feeds every later reader; an MLP reads its own layer's heads unless parallel
    own_layer = 0 if name in PARALLEL else n_heads
    per_layer = [3 * n_heads * (1 + l * (n_heads + 1)) + (1 + l * (n_heads + 1) + own_layer) for l in range(n_layers)]
    assert len(g.edges) == sum(per_layer) + len(g.upstream)
    assert len(set(g.edges)) == len(g.edges)


@pytest.mark.parametrize("name", sorted(HYBRID))
def test_a_writer_other_than_attention_is_an_mlp_node(traced, name):
    """Qwen3.5's linear-attention layer and Granite 4.0's Mamba-2 layer (no softmax core) write the stream as an MLP
    does: one node, m0, read and written whole; attention layers and other writers are numbered apart."""
    _, cm = traced(name)
    g = cm.graph
    assert g.nodes == ["input", "m0", "m1", *[f"a0.h{h}" for h in range(4)], "m2", "logits"]
    assert g.downstream[-3:] == ["a0.h3<v>", "m2", "logits"] and g.downstream[:2] == ["m0", "m1"]
    assert "m0->m1" in g.edge_index and "m1->a0.h2<k>" in g.edge_index and "a0.h1->m2" in g.edge_index
    assert len(g.edges) == 1 + 2 + 12 * 3 + 7 + 8


def test_names_and_order(traced):
    _, cm = traced("llama")
    g = cm.graph
    assert g.nodes[:2] == ["input", "a0.h0"] and g.nodes[-2:] == ["m1", "logits"]
    assert g.downstream[:5] == ["a0.h0<q>", "a0.h1<q>", "a0.h2<q>", "a0.h3<q>", "a0.h0<k>"]
    assert g.edges[0] == "input->a0.h0<q>"
    assert "a0.h3->a1.h1<k>" in g.edge_index and "m1->logits" in g.edge_index
    assert "a1.h0->a0.h0<q>" not in g.edge_index  # no edge backwards in depth
    assert "a0.h0->m0" in g.edge_index  # sequential: the MLP reads its own layer's heads


def test_networkx_keeps_every_edge(traced):
    _, cm = traced("gpt2")
    g = cm.graph.to_networkx()
    assert isinstance(g, nx.DiGraph)
    named = {d["name"] for _, _, d in g.edges(data=True) if d["name"]}
    assert named == set(cm.graph.edges)
    assert g.has_edge("a0.h3", "a1.h1<k>") and g.has_edge("a1.h1<k>", "a1.h1")
    assert nx.is_directed_acyclic_graph(g)
    assert set(nx.descendants(g, "input")) >= {"logits", "m1", "a1.h3"}
