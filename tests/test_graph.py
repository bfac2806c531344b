"""Components found by structure: node/edge names, order and counts as the field writes them."""
import math
import re

import networkx as nx
import pytest

from fxcircuits.graph import CircuitGraph, Writer
from zoo import CONFIGS, NO_ATTENTION

PARALLEL = {"gptj", "gpt_neox", "falcon_multi_query", "falcon_new_arch", "phi"}
HYBRID = {"qwen3_5", "granite_hybrid"}  # a layer without attention: the formula's layers are attention layers
E_MODELS = {"gemma4_per_layer", "gemma4_kv_shared"}  # two m nodes a layer; keys and values read at another layer


GRIFFIN = {"recurrent_gemma"}  # two recurrent layers before the attention layer
DELAYED = {"longcat_flash"}  # two attention layers a decoder layer, and a delayed write


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - HYBRID - E_MODELS - GRIFFIN - DELAYED - NO_ATTENTION))
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


def test_a_model_without_attention_is_a_chain_of_mlp_nodes(traced, prompts):
    """Mamba has no attention layer: each layer's mixer (the selective scan) is one m node, which every later one
    reads; the formula's attention layers are none, and so are the attention patterns."""
    cm = traced("mamba")[1]
    g = cm.graph
    assert g.nodes == ["input", "m0", "m1", "logits"] and g.downstream == ["m0", "m1", "logits"]
    assert g.edges == ["input->m0", "input->m1", "m0->m1", "input->logits", "m0->logits", "m1->logits"]
    assert g.n_layers == g.n_heads == 0 and cm.patterns(prompts[0], prompts[2]) == []


def test_griffins_recurrent_blocks_are_mlp_nodes(traced):
    """RecurrentGemma (Griffin): each layer's temporal block (two recurrent blocks, then local attention) is
    followed by an MLP; a recurrent block has no softmax core, so it is one m node, as Qwen3.5's linear attention
    is: m0 to m3, then the attention layer's heads, then m4."""
    g = traced("recurrent_gemma")[1].graph
    assert g.nodes == ["input", "m0", "m1", "m2", "m3", *[f"a0.h{h}" for h in range(4)], "m4", "logits"]
    assert g.downstream[:4] == ["m0", "m1", "m2", "m3"] and g.downstream[-2:] == ["m4", "logits"]
    into = lambda port: [e.split("->")[0] for e in g.edges if e.split("->")[1] == port]  # noqa: E731
    assert into("a0.h2<k>") == ["input", "m0", "m1", "m2", "m3"]
    assert into("m4") == ["input", "m0", "m1", "m2", "m3", *[f"a0.h{h}" for h in range(4)]]
    assert len(g.edges) == (1 + 2 + 3 + 4) + 12 * 5 + 9 + 10


def test_gemma4_e_models_per_layer_blocks_and_reused_keys_and_values(traced):
    """Gemma 4's E-models: the block that reads a layer's per-layer input is an m node of its own, after the MLP
    (in layer 0, m0 then m1).  Layers 2 and 3 reuse the keys and values of layers 0 and 1: their k and v inputs read
    the stream where those layers read it, are listed there (after that layer's own inputs), and have edges from
    the nodes written before it alone."""
    _, cm = traced("gemma4_kv_shared")
    g = cm.graph
    heads = lambda layer: [f"a{layer}.h{h}" for h in range(4)]  # noqa: E731
    assert g.upstream == ["input", *heads(0), "m0", "m1", *heads(1), "m2", "m3", *heads(2), "m4", "m5", *heads(3),
                          "m6", "m7"]
    assert g.downstream[12:20] == [f"a2.h{h}<{role}>" for role in "kv" for h in range(4)]
    assert g.downstream[20:22] == ["m0", "m1"]
    into = lambda port: [e.split("->")[0] for e in g.edges if e.split("->")[1] == port]  # noqa: E731
    assert into("a2.h0<k>") == ["input"]
    assert into("a3.h1<v>") == ["input", *heads(0), "m0", "m1"]
    assert into("a2.h3<q>") == g.upstream[:13]
    assert into("m1") == ["input", *heads(0), "m0"]
    # per layer: its q (k, v) inputs, the reused k and v read there, its two m nodes; then the logits
    assert len(g.edges) == (12 + 8 + 5 + 6) + (12 * 7 + 8 * 7 + 11 + 12) + (4 * 13 + 17 + 18) + (4 * 19 + 23 + 24) + 25


def test_a_delayed_write_reads_where_its_block_reads_and_writes_where_its_sum_adds_it(traced):
    """LongCat-Flash: each decoder layer has two attention layers and two MLPs, and a shortcut MoE that reads the
    stream with the first MLP and adds its output at the layer's end, after the second MLP.  The shortcut is an m
    node of its own (m2 in decoder layer 0): listed with the first MLP among the readers, with edges from the nodes
    written before that read alone; listed after the second MLP among the writers, and read by no reader before the
    layer's end."""
    g = traced("longcat_flash")[1].graph
    heads = lambda layer: [f"a{layer}.h{h}" for h in range(4)]  # noqa: E731
    assert g.upstream == ["input", *heads(0), "m0", *heads(1), "m1", "m2", *heads(2), "m3", *heads(3), "m4", "m5"]
    assert g.downstream[12:15] == ["m0", "m2", "a1.h0<q>"] and g.downstream[-3:] == ["a3.h3<v>", "m4", "logits"]
    into = lambda port: [e.split("->")[0] for e in g.edges if e.split("->")[1] == port]  # noqa: E731
    assert into("m2") == into("m0") == ["input", *heads(0)]
    assert into("m1") == ["input", *heads(0), "m0", *heads(1)]
    assert into("a2.h1<k>") == g.upstream[:12] and into("m5") == into("m3") == g.upstream[:16]
    assert "m2->a1.h0<q>" not in g.edge_index and "m2->m1" not in g.edge_index
    readers = [1, 5, 5, 6, 10, 12, 16, 16, 17, 21]  # upstream nodes each reader of a kind reads, in order
    assert len(g.edges) == sum(n * (12 if n in (1, 6, 12, 17) else 1) for n in readers) + 23
    assert g.parallel_attn_mlp and CircuitGraph.from_config(g.cfg).edges == g.edges  # saved circuits load back


def test_names_and_order(traced):
    _, cm = traced("llama")
    g = cm.graph
    assert g.nodes[:2] == ["input", "a0.h0"] and g.nodes[-2:] == ["m1", "logits"]
    assert g.downstream[:5] == ["a0.h0<q>", "a0.h1<q>", "a0.h2<q>", "a0.h3<q>", "a0.h0<k>"]
    assert g.edges[0] == "input->a0.h0<q>"
    assert "a0.h3->a1.h1<k>" in g.edge_index and "m1->logits" in g.edge_index
    assert "a1.h0->a0.h0<q>" not in g.edge_index  # no edge backwards in depth
    assert "a0.h0->m0" in g.edge_index  # sequential: the MLP reads its own layer's heads


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_edges_are_the_nodes_written_before_each_input_reads(traced, name):
    """Against a listing of every (upstream node, downstream input) pair: the edges, in order, ``src`` and ``dst``,
    and ``edge_index``, which works an edge's index out from its name (no dict of millions of names) and knows no
    other name — an edge backwards in depth, or anything that is no edge at all."""
    g = traced(name)[1].graph
    writes = [-1] + [w.step for w in g.writers for _ in range(w.n_heads if w.kind == "attention" else 1)]
    reads = {**{port: step for w in g.writers for port, step in w.reads()}, "logits": math.inf}
    pairs = [(u, d) for d, port in enumerate(g.downstream) for u in range(len(g.upstream)) if writes[u] < reads[port]]
    assert g.edges == [f"{g.upstream[u]}->{g.downstream[d]}" for u, d in pairs]
    assert (g.src.tolist(), g.dst.tolist()) == ([u for u, _ in pairs], [d for _, d in pairs])
    assert [g.edge_index[e] for e in g.edges] == list(range(len(g.edges))) and len(g.edge_index) == len(g.edges)
    backwards = [f"{g.upstream[u]}->{port}" for port in g.downstream for u in range(len(g.upstream))
                 if writes[u] >= reads[port]]
    others = ["logits->m0", "input->input", "input->a0.h0", "input-> m0", "input->m0 ", "input->a9.h0<q>", "", 3]
    assert backwards and not any(e in g.edge_index for e in backwards + others)
    with pytest.raises(KeyError):
        g.edge_index[backwards[0]]


@pytest.mark.parametrize("name, why", [
    ("a0.h1 -> a2.h0<K>", "not written as edges are .*the edge is 'a0.h1->a2.h0<k>'"),
    ("a0.h1a2.h0<k>", "no '->'"),
    ("a9.h0->m2", "'a9.h0' is not an upstream node.*'a0.h0'…'a2.h1'.*'m0'…'m2'"),
    ("logits->m1", "'logits' reads the stream and writes nothing"),
    ("a2.h0->a1.h1<q>", "a2.h0 writes to the stream after a1.h1<q> reads it"),
    ("a1.h0->m1", r"a1.h0 writes to the stream after m1 reads it \(or as it reads it\)"),  # parallel: same step
    ("a0.h1->a2.h0", "a2.h0 is a head, read through three inputs: name one, a2.h0<q>"),
    ("a0.h1->m2<q>", "m2 has a single input, named 'm2'"),
    ("a0.h1->x", "'x' is not a downstream input"),
    (3, r"3 \(int\) is no edge name"),
])
def test_a_name_that_is_no_edge_says_why(name, why):
    graph = CircuitGraph.from_config({"n_layers": 3, "n_heads": 2, "parallel_attn_mlp": name == "a1.h0->m1"})
    assert name not in graph.edge_index
    with pytest.raises(KeyError, match=why):
        graph.edge_index[name]


@pytest.mark.parametrize("name, why", [("logits", "writes nothing"), ("a0.h1->m1", "is an edge, not a node"),
                                       ("a1.h0<q>", "one of a1.h0's inputs"), ("m9", "'m0'…'m2'")])
def test_a_name_that_is_no_node_says_why(name, why):
    graph = CircuitGraph.from_config({"n_layers": 3, "n_heads": 2, "parallel_attn_mlp": False})
    assert re.search(why, graph.not_a_node(name))


def test_writers_are_listed_in_the_order_they_write():
    with pytest.raises(ValueError, match="in the order they write"):
        CircuitGraph([Writer("mlp", 1, 0, 3), Writer("mlp", 0, 0, 1)], 4)


def test_networkx_keeps_every_edge(traced):
    _, cm = traced("gpt2")
    g = cm.graph.to_networkx()
    assert isinstance(g, nx.DiGraph)
    named = {d["name"] for _, _, d in g.edges(data=True) if d["name"]}
    assert named == set(cm.graph.edges)
    assert g.has_edge("a0.h3", "a1.h1<k>") and g.has_edge("a1.h1<k>", "a1.h1")
    assert nx.is_directed_acyclic_graph(g)
    assert set(nx.descendants(g, "input")) >= {"logits", "m1", "a1.h3"}
