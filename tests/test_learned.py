"""Learned masks (``fxcircuits.learned``): Edge Pruning and uniform gradient sampling, against the public patched
call, random circuits and the estimators' own expectations."""
import pytest
import torch

import fxcircuits
from fxcircuits.circuit import Circuit, undangled
from fxcircuits.learned import _circuit_gates, _window_samples
from fxcircuits.metrics import logit_diff
from test_attribution import _batch, steps_of
from zoo import make


@pytest.fixture(scope="module")
def llama64():
    return fxcircuits.trace(make("llama", dtype=torch.float64))


@pytest.fixture(scope="module")
def gpt2_64():
    return fxcircuits.trace(make("gpt2", dtype=torch.float64))


def _distance(cm, batch, edge_mask: torch.Tensor) -> float:
    """Mean |logit_diff(patched) − logit_diff(model)| over the examples, through the public call."""
    with torch.no_grad():
        model = logit_diff(cm(batch["clean"], batch["attention_mask"]), batch)
        patched = logit_diff(cm(batch["clean"], batch["attention_mask"], corrupted_input_ids=batch["corrupted"],
                                edge_mask=edge_mask), batch)
    return float((patched - model).abs().mean())


@pytest.mark.parametrize("warm_start", ["eap-ig-inputs", None])
def test_a_learned_mask_keeps_the_model_at_its_density(llama64, warm_start):
    """The gates' probabilities of being open average to the density, about that many are open for sure, and the
    circuit of those most surely open keeps the model's metric better than any of eight random circuits of as
    many edges keep it (a mask that maximised the metric, or ranked the closed gates first, would not), whether
    the gates start ranked by EAP-IG or alike."""
    batch, edges = _batch(), len(llama64.graph.edges)
    runs = [fxcircuits.attribute(llama64, [batch], "logit_diff", "mask", mask_steps=100, density=0.2, seed=3,
                                 warm_start=warm_start, progress=False) for _ in range(2)]
    torch.testing.assert_close(runs[0].tensor, runs[1].tensor)
    gates, count = runs[0].tensor, int(0.2 * edges)
    assert abs(float(gates.mean()) - 0.2) < 1e-6 and abs(int((gates > 0.5).sum()) - count) <= count // 4
    learned = torch.zeros(edges, dtype=torch.float64)
    learned[gates.argsort(descending=True)[:count]] = 1.0
    generator = torch.Generator().manual_seed(0)
    chance = [_distance(llama64, batch, (torch.randperm(edges, generator=generator) < count).double())
              for _ in range(8)]
    assert _distance(llama64, batch, learned) < min(chance) / 2, (_distance(llama64, batch, learned), chance)


def test_a_learned_mask_starts_from_its_warm_starts_ranking(llama64):
    """With the gates kept still (lr 0), the projection alone closes them, all alike, so they end in the order of
    the warm start's |scores|: the ranking is where training starts, and nothing else moves it."""
    batch = _batch()
    for method in ("eap", "eap-ig-inputs"):
        prior = fxcircuits.attribute(llama64, [batch], "logit_diff", method, progress=False,
                                     **steps_of(method, 3)).tensor
        gates = fxcircuits.attribute(llama64, [batch], "logit_diff", "mask", mask_steps=4, density=0.1, lr=0.0,
                                     warm_start=method, steps=3, progress=False)
        assert torch.equal(gates.tensor.argsort(stable=True), prior.abs().argsort(stable=True))
        assert gates.info["warm_start"] == method and gates.info.get("warm_start_steps") == (
            3 if method == "eap-ig-inputs" else None)
    with pytest.raises(ValueError, match="a learned mask's warm_start is a gradient method .* got 'exact'"):
        fxcircuits.attribute(llama64, [batch], "logit_diff", "mask", warm_start="exact", progress=False)


def test_a_held_learned_mask_keeps_the_best_circuit_it_ran(llama64):
    """Held at the density, the steps run the circuit that will be kept, and the gates returned are those of the
    best circuit run: its distance, as ``info`` records it, is the public call's distance of the top fifth of
    the scores, and it is no worse than the circuit the closing steps left, which the same closing without a
    held phase returns (here the held steps improve it).  A held phase of sampled gates, or one that kept its
    last circuit, would record another distance."""
    batch, edges = _batch(), len(llama64.graph.edges)
    closed, held = (fxcircuits.attribute(llama64, [batch], "logit_diff", "mask", mask_steps=steps, density=0.2,
                                         warmup=warmup, seed=3, progress=False)
                    for steps, warmup in ((60, 1.0), (120, 0.5)))  # the same 60 closing steps
    assert "circuit_distance" not in closed.info

    def distance(scores) -> float:
        kept = torch.zeros(edges, dtype=torch.float64)
        kept[scores.tensor.argsort(descending=True, stable=True)[:int(0.2 * edges)]] = 1.0
        return _distance(llama64, batch, kept)

    assert held.info["circuit_distance"] == pytest.approx(distance(held), rel=1e-6)
    assert distance(held) < 0.9 * distance(closed), (distance(held), distance(closed))


def test_a_learned_masks_circuit_is_its_top_gates_unpruned_under_zero_ablation(gpt2_64):
    """Under zero ablation a node whose inputs are all patched still writes what it computes from zeros (GPT-2's
    biases), so the circuit a learned mask trained and measured is its top ``density`` gates unpruned: their
    distance is the one ``info`` records, where pruned they lose edges (on this model) and are another circuit."""
    batches = [_batch(seed=1), _batch(seed=3)]
    scores = fxcircuits.attribute(gpt2_64, batches, "logit_diff", "mask", density=0.1, mask_steps=24,
                                  ablation="zero", warm_start="eap", progress=False)
    evaluator = fxcircuits.Evaluator(gpt2_64, batches, "logit_diff", ablation="zero")

    def distance(circuit) -> float:
        result = evaluator.evaluate(circuit)
        return float((result.circuit - result.full).abs().mean())

    held = scores.topn(0.1, prune=False)
    assert len(held) == int(0.1 * len(gpt2_64.graph.edges))
    assert distance(held) == pytest.approx(scores.info["circuit_distance"], rel=1e-9)
    pruned = scores.topn(0.1)
    assert len(pruned) < len(held) and distance(pruned) != pytest.approx(distance(held), rel=1e-3)


def test_a_held_circuits_gates_are_hard_with_their_probabilitys_gradient():
    """The held circuit: the gates of highest log-odds open (ties in order, as ``topn`` takes them), the rest
    shut, and the gradient of each gate's probability of being open passed straight through."""
    log_odds = torch.tensor([[0.5, 2.0, -1.0, 2.0, 0.0]], requires_grad=True)
    gates = _circuit_gates(log_odds, 2)
    assert torch.equal(gates.detach(), torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]]))
    weights = torch.arange(1.0, 6.0)[None]
    gradient, = torch.autograd.grad((gates * weights).sum(), [log_odds])
    probability = torch.sigmoid(log_odds.detach())
    torch.testing.assert_close(gradient, weights * probability * (1 - probability))
    assert torch.equal(_circuit_gates(torch.zeros(1, 4), 3).detach(), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_a_learned_mask_takes_a_count_of_edges_and_refuses_what_it_cannot_use(llama64):
    scores = fxcircuits.attribute(llama64, [_batch()], "logit_diff", "mask", mask_steps=3, density=11, lr=0.3,
                                  progress=False)
    torch.testing.assert_close(scores.tensor.sum(), torch.tensor(11.0))
    assert {k: scores.info[k] for k in ("steps", "density", "lr")} == {"steps": 3, "density": 11, "lr": 0.3}
    with pytest.raises(ValueError, match="asked for 200 gates of 110"):
        fxcircuits.attribute(llama64, [_batch()], "logit_diff", "mask", mask_steps=3, density=200, progress=False)
    for bad in ({"warmup": 2}, {"mask_steps": 0}):
        with pytest.raises(ValueError, match="a learned mask needs mask_steps of at least 1 and a warmup from 0"):
            fxcircuits.attribute(llama64, [_batch()], "logit_diff", "mask", **{"mask_steps": 3, **bad}, progress=False)
    with pytest.raises(TypeError, match=r"unknown options \['beta'\] of method='mask'; it takes mask_steps, density"):
        fxcircuits.attribute(llama64, [_batch()], "logit_diff", "mask", beta=1.0, progress=False)


# ---------------------------------------------------------------- uniform gradient sampling

def test_window_samples_keep_each_edge_with_its_probability_and_its_bernoulli_gradient():
    """Over evenly spread noise a sample keeps each edge with probability p = σ(θ) (its mean is p), and for a
    loss linear in the masks, Σ a·m averaged over the samples, the gradient in θ is a·p(1 − p): the derivative of
    the loss's mean over Bernoulli(p) masks, exactly, for every edge that some sample's window holds.  An edge
    with p rounded to 1 is always kept, with a finite gradient of 0."""
    logits = torch.tensor([[-3.0, -0.5, 0.0, 1.0, 2.5, 40.0]], requires_grad=True)
    n = 20000
    noise = ((torch.arange(n) + 0.5) / n)[:, None, None].expand(n, *logits.shape)
    masks = _window_samples(logits, noise)
    p = torch.sigmoid(logits.detach())
    torch.testing.assert_close(masks.detach().mean(0), p, atol=1e-4, rtol=0)
    weights = torch.tensor([[0.5, -2.0, 1.0, 3.0, -1.0, 7.0]])
    gradient, = torch.autograd.grad((masks * weights).mean(0).sum(), [logits])
    expected = weights * p * (1 - p)
    expected[0, -1] = 0.0
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=0)
    assert torch.equal(masks.detach()[:, 0, -1], torch.ones(n))


def test_an_edge_no_sample_holds_in_its_window_gets_no_gradient():
    """Noise outside the window: the sample is 0 or 1 and passes no gradient, rather than a weight of 1/0."""
    logits = torch.zeros(1, 2, requires_grad=True)  # p = 0.5, window [0.375, 0.625]
    masks = _window_samples(logits, torch.tensor([[[0.1, 0.5]], [[0.9, 0.4]]]))
    assert torch.equal(masks.detach()[:, 0, 0], torch.tensor([1.0, 0.0]))
    gradient, = torch.autograd.grad(masks.mean(0).sum(), [logits])
    assert gradient[0, 0] == 0.0 and gradient[0, 1] == pytest.approx(0.25)  # both in the window: p(1 − p)


def test_undangled_drops_what_no_path_from_the_input_to_the_logits_crosses(llama64):
    """Each row alone, as reachability says: an edge stays where its source is reached from the input and its
    reader reaches the logits through the row's kept edges (what ``Circuit.pruned`` keeps, one row)."""
    import networkx as nx
    graph = llama64.graph
    generator = torch.Generator().manual_seed(0)
    rows = torch.rand(6, len(graph.edges), generator=generator) < torch.tensor([0.05, 0.1, 0.2, 0.4, 0.7, 1.0])[:, None]
    pruned = undangled(graph, rows)
    reader = graph.reader[graph.dst]
    for row, kept in zip(rows, pruned):
        dag = nx.DiGraph()
        dag.add_nodes_from(range(len(graph.nodes)))
        dag.add_edges_from((int(graph.src[e]), int(reader[e])) for e in row.nonzero().flatten())
        fed = nx.descendants(dag, 0) | {0}
        read = nx.ancestors(dag, len(graph.nodes) - 1) | {len(graph.nodes) - 1}
        expected = torch.tensor([bool(row[e]) and int(graph.src[e]) in fed and int(reader[e]) in read
                                 for e in range(len(graph.edges))])
        assert torch.equal(kept, expected)
        assert torch.equal(Circuit(graph, row).pruned().in_graph, expected)
    assert pruned[-1].all() and not pruned[0].all()


def test_uniform_gradient_sampling_ranks_the_edges_that_keep_the_model_first(llama64):
    """The top fifth of the edges by UGS's probabilities keeps the model's metric better than any of eight random
    circuits of as many edges keeps it, by more than half; deterministic given the seed; a larger penalty keeps
    fewer edges; ``info`` records what it ran with."""
    batch, edges = _batch(), len(llama64.graph.edges)

    def ugs(**options):
        return fxcircuits.attribute(llama64, [batch], "logit_diff", "ugs", mask_steps=100, seed=3, progress=False,
                                    **options)

    runs = [ugs(), ugs()]
    assert torch.equal(runs[0].tensor, runs[1].tensor) and runs[0].tensor.dtype == torch.float64
    assert runs[0].info == {"metric": "logit_diff", "ablation": "corrupted", "examples": 3, "steps": 100,
                            "samples": 2, "penalty": 1e-3, "lr": 0.05}
    count = int(0.2 * edges)
    learned = torch.zeros(edges, dtype=torch.float64)
    learned[runs[0].tensor.argsort(descending=True)[:count]] = 1.0
    generator = torch.Generator().manual_seed(0)
    chance = [_distance(llama64, batch, (torch.randperm(edges, generator=generator) < count).double())
              for _ in range(8)]
    assert _distance(llama64, batch, learned) < min(chance) / 2, (_distance(llama64, batch, learned), chance)
    assert ugs(penalty=3e-2).tensor.mean() < runs[0].tensor.mean() / 2


def test_uniform_gradient_sampling_runs_its_samples_in_calls_of_any_size(llama64):
    """Samples split over calls give the scores that one call gives: a sample's gradient is its own."""
    batch = _batch()
    scores = [fxcircuits.attribute(llama64, [batch], "logit_diff", "ugs", mask_steps=5, samples=4, masks_per_call=n,
                                   progress=False).tensor for n in (1, 3, 4)]
    torch.testing.assert_close(scores[0], scores[2], rtol=1e-12, atol=0)
    torch.testing.assert_close(scores[1], scores[2], rtol=1e-12, atol=0)


def test_uniform_gradient_sampling_refuses_what_it_cannot_use(llama64):
    batch = _batch()
    for bad in ({"samples": 0}, {"mask_steps": 0}, {"penalty": -1.0}, {"lr": 0.0}):
        with pytest.raises(ValueError, match="uniform gradient sampling needs mask_steps and samples of at least 1"):
            fxcircuits.attribute(llama64, [batch], "logit_diff", "ugs", **bad, progress=False)
    with pytest.raises(TypeError, match=r"unknown options \['density'\] of method='ugs'; it takes mask_steps, "
                                        "samples, penalty, lr"):
        fxcircuits.attribute(llama64, [batch], "logit_diff", "ugs", density=0.1, progress=False)
    with pytest.raises(TypeError, match=r"unknown options \['penalty'\] of method='mask'"):
        fxcircuits.attribute(llama64, [batch], "logit_diff", "mask", penalty=0.1, progress=False)
    with pytest.raises(TypeError, match="steps=5 is read by method .*, not by 'ugs'"):
        fxcircuits.attribute(llama64, [batch], "logit_diff", "ugs", steps=5, progress=False)
