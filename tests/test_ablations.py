"""Ablation values (``fxcircuits.ablations``): optimal ablation's losses and gradients against hooks on the HF
model, its values read by every method, and bad input refused by name."""
import pytest
import torch

import fxcircuits
from fxcircuits import ablations, metrics
from fxcircuits.ablations import Ablation, mean_ablation, optimal_ablation, zero_ablation
from test_patching import _run_with
from zoo import make, modules

INPUT_MODULES = {"llama": "model.embed_tokens", "gpt2": "transformer.drop"}  # where `input`'s sum is complete


def _prompts() -> dict:
    generator = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 128, (3, 8), generator=generator)
    mask = torch.ones_like(clean)
    mask[0, :3] = 0  # left padding: its positions are no tokens of the loss
    return {"clean": clean, "attention_mask": mask}


def _site(model, name: str, node: str):
    """Where ``node``'s output is in the HF model: the module whose output it is (the embeddings' sum for ``input``,
    an MLP), with (None, None); or for a head, its output projection, the head's input columns and their weight
    [width, d_model] (the projection's bias is no head's)."""
    mlp_path, out_path, _ = modules(name)
    if node == "input":
        return model.get_submodule(INPUT_MODULES[name]), None, None
    layer = int(node[1:].split(".")[0])
    if node.startswith("m"):
        return model.get_submodule(mlp_path.format(layer)), None, None
    out_proj, head = model.get_submodule(out_path.format(layer)), int(node.split("h")[-1])
    conv = hasattr(out_proj, "nf")  # GPT-2's Conv1D: weight [in, out]
    width = out_proj.weight.shape[0 if conv else 1] // 4
    cols = slice(head * width, (head + 1) * width)
    return out_proj, cols, out_proj.weight[cols] if conv else out_proj.weight[:, cols].T


def _replaced(model, name: str, node: str, value: torch.Tensor):
    """A hook on the HF model that sends ``value`` [d_model] in place of ``node``'s output at every token: the
    embeddings' sum for ``input``, an MLP's output, or one head's share of its output projection (the projection's
    bias is no head's, and stays)."""
    module, cols, weight = _site(model, name, node)
    if cols is None:
        return module.register_forward_hook(lambda m, i, o: value.expand_as(o))
    return module.register_forward_hook(lambda m, args, out: out - args[0][..., cols] @ weight + value)


def _reference(model, name: str, node: str, value: torch.Tensor, batch: dict, loss: str) -> torch.Tensor:
    """The loss of the HF model with ``node`` replaced by ``value``, averaged over the next tokens of real tokens."""
    ids, mask = batch["clean"], batch["attention_mask"]
    logprobs = _run_with(model, _replaced(model, name, node, value), ids, mask)[:, :-1].log_softmax(-1)
    weights = (mask[:, :-1] * mask[:, 1:]).float()
    if loss == "cross-entropy":
        per_token = -logprobs.gather(-1, ids[:, 1:, None])[..., 0]
    else:
        with torch.no_grad():
            own = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
        per_token = (own.exp() * (own - logprobs)).sum(-1)
    return (per_token * weights).sum() / weights.sum()


@pytest.mark.parametrize("loss", ablations.LOSSES)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_each_node_has_its_own_loss_and_gradient_as_hooks_give_them(traced, name, loss):
    """Many nodes ablated in one call, each by its own value: every node's loss and the gradient of its value
    equal those of the HF model with that node alone replaced by a hook — so one backward pass over a call trains
    each value on its own node's loss, and nothing of the others'."""
    model, cm = traced(name)
    model.zero_grad(set_to_none=True)
    batch = _prompts()
    prompts = ablations._prompts(cm, [batch])
    (target, weights), = [ablations._targets(cm, ids, mask, loss) for ids, mask in prompts]
    generator = torch.Generator().manual_seed(0)
    values = [v + 0.3 * torch.randn(v.shape, generator=generator, dtype=v.dtype)
              for v in mean_ablation(cm, [batch]).values]
    chunks = torch.arange(len(cm.graph.upstream)).split(3)  # calls of three nodes, each call's gradient apart
    losses, grads = ablations._pass(cm, prompts, [(target, weights)], values, chunks, loss, int(weights.sum()), True)
    checked = ["input", "a0.h1", "a1.h3", "m0", "m1"]
    for node in checked:
        group, row = ablations._place(cm, cm.graph.upstream.index(node), node)
        value = values[group].detach()[row].reshape(-1).clone().requires_grad_()
        expected = _reference(model, name, node, value, batch, loss)
        gradient, = torch.autograd.grad(expected, value)
        torch.testing.assert_close(losses[cm.graph.upstream.index(node)], expected.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grads[group][row].reshape(-1), gradient, atol=1e-7, rtol=1e-4)
        assert gradient.abs().max() > 1e-4  # a gradient that moves the value
    assert all(p.grad is None for p in model.parameters())  # the model's weights are given none


@pytest.mark.parametrize("loss", ablations.LOSSES)
def test_optimal_values_lower_every_nodes_loss_below_its_means(traced, loss):
    """Every node's returned value gives it a loss, measured by hooks on the HF model, no higher than its mean does,
    and most nodes a lower one; ``info`` holds those losses; the calls' size does not change the values."""
    model, cm = traced("llama")
    batch = _prompts()
    optimal = optimal_ablation(cm, [batch], loss=loss, steps=20, progress=False)
    means = mean_ablation(cm, [batch])
    assert optimal.name == str(optimal) == "optimal" and optimal.info["loss"] == loss
    lowered = 0
    with torch.no_grad():
        for i, node in enumerate(cm.graph.upstream):
            found = _reference(model, "llama", node, optimal.node(cm, node).float(), batch, loss)
            start = _reference(model, "llama", node, means.node(cm, node).float(), batch, loss)
            torch.testing.assert_close(optimal.info["optimal"][i].float(), found, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(optimal.info["mean"][i].float(), start, atol=1e-6, rtol=1e-5)
            assert found <= start + 1e-7
            lowered += bool(found < start - 1e-6)
    assert lowered > len(cm.graph.upstream) // 2
    model_loss = optimal.info["model"]
    assert (model_loss == pytest.approx(0, abs=1e-7)) if loss == "kl" else model_loss > 1


def test_the_values_do_not_depend_on_the_nodes_a_call():
    """Nodes ablated one a call or many, the same values (in float64: Adam's steps divide a gradient by its size,
    and in float32 a coordinate whose gradient is rounding noise takes a step of noise)."""
    cm = fxcircuits.trace(make("llama", dtype=torch.float64))
    batch = _prompts()
    many, one = (optimal_ablation(cm, [batch], steps=10, masks_per_call=n, progress=False) for n in (None, 1))
    assert all(v.dtype == torch.float64 for v in many.values)
    for a, b in zip(many.values, one.values):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert not torch.equal(many.values[1], mean_ablation(cm, [batch]).values[1])


def test_a_node_keeps_its_lowest_value_and_the_side_inputs_go_with_input(traced):
    """Where a step makes a node's loss higher (a learning rate far too large), the node keeps the value of its
    lowest loss seen — its mean, if no step did better."""
    _, cm = traced("llama")
    batch = _prompts()
    wild = optimal_ablation(cm, [batch], steps=2, lr=50.0, progress=False)
    means = mean_ablation(cm, [batch])
    for i, node in enumerate(cm.graph.upstream):
        kept = wild.info["optimal"][i] < wild.info["mean"][i]
        assert kept or torch.equal(wild.node(cm, node), means.node(cm, node))
        assert wild.info["optimal"][i] <= wild.info["mean"][i]


def test_values_are_read_by_every_method_as_by_name(traced, prompts):
    """``ablation=`` values computed once give what the ablation by name gives, and the scores record its name;
    optimal values patch what ``cm(corrupted_activations=…)`` patches."""
    _, cm = traced("llama")
    clean, corrupted, mask = prompts
    batch = {"clean": clean, "corrupted": corrupted, "attention_mask": mask, "correct": torch.tensor([[5], [9], [3]]),
             "incorrect": torch.tensor([[7], [1], [2]])}
    by_name = fxcircuits.attribute(cm, batch, "logit_diff", "eap", ablation="mean", reference=[batch], progress=False)
    given = fxcircuits.attribute(cm, batch, "logit_diff", "eap", ablation=mean_ablation(cm, [batch]), progress=False)
    assert torch.equal(by_name.tensor, given.tensor) and given.info["ablation"] == "mean"
    zeros = fxcircuits.Evaluator(cm, batch, "logit_diff", ablation=zero_ablation(cm))
    assert torch.equal(zeros.empty, fxcircuits.Evaluator(cm, batch, "logit_diff", ablation="zero").empty)
    optimal = optimal_ablation(cm, [batch], steps=3, progress=False)
    evaluator = fxcircuits.Evaluator(cm, batch, "logit_diff", ablation=optimal)
    groups = torch.cat([v.expand(-1, 1, 1, -1) for v in optimal.values[:len(cm.graph.group_sizes)]])
    with torch.no_grad():
        logits = cm(clean, mask, edge_mask=torch.zeros(len(cm.graph.edges)), corrupted_activations=groups)
    torch.testing.assert_close(evaluator.empty, metrics.logit_diff(logits, batch))
    exact = fxcircuits.attribute(cm, batch, "logit_diff", "exact", ablation=optimal, progress=False)
    assert exact.info["ablation"] == "optimal" and exact.tensor.abs().max() > 1e-4


def _outputs(model, name: str, node: str, ids: torch.Tensor) -> torch.Tensor:
    """``node``'s output [batch, seq, d_model] in the HF model's run on ``ids``, as a hook reads it: what
    ``_replaced`` would replace (a head's share of its output projection, without the bias)."""
    module, cols, weight = _site(model, name, node)
    seen = []
    handle = module.register_forward_hook(
        lambda m, args, out: seen.append(out if cols is None else args[0][..., cols] @ weight))
    with torch.no_grad():
        _run_with(model, handle, ids, None)
    return seen[0]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_positional_means_patch_each_position_as_hooks_give_them(traced, name):
    """Positional mean ablation averages each node's output at each position over prompts of one length, and a
    node patched to it takes each position's mean there: ``patch_nodes``' effects equal the HF model's with that
    node's output replaced, by a hook, with its outputs on the reference averaged at each position."""
    model, cm = traced(name)
    generator = torch.Generator().manual_seed(5)
    reference = {"clean": torch.randint(0, 128, (4, 8), generator=generator)}
    clean = torch.randint(0, 128, (3, 8), generator=generator)
    batch = {"clean": clean, "corrupted": clean, "correct": torch.tensor([[5], [9], [3]]),
             "incorrect": torch.tensor([[7], [1], [2]])}
    nodes = ["input", "a0.h1", "m0", "a1.h3", "m1"]
    effects = fxcircuits.patch_nodes(cm, batch, "logit_diff", nodes=nodes, ablation="mean-positional",
                                     reference=[reference])
    means = mean_ablation(cm, reference, positional=True)
    with torch.no_grad():
        own = metrics.logit_diff(model(input_ids=clean).logits, batch)
        for node, found in zip(nodes, effects.effects):
            value = _outputs(model, name, node, reference["clean"]).mean(0)  # [seq, d_model]
            torch.testing.assert_close(means.node(cm, node).float(), value, atol=1e-6, rtol=1e-5)
            replaced = _run_with(model, _replaced(model, name, node, value), clean, None)
            torch.testing.assert_close(found, own - metrics.logit_diff(replaced, batch), atol=1e-5, rtol=1e-4)
    assert effects.ablation == "mean-positional" and effects.effects.abs().max() > 1e-3
    assert means.length == 8 and means.node(cm, "m0").shape == (8, cm.graph.d_model)
    torch.testing.assert_close(means.values[2].mean(2, keepdim=True), mean_ablation(cm, reference).values[2])


def test_positional_means_serve_prompts_of_their_length_alone(traced, tmp_path):
    """Positional means are taken over unpadded prompts of one length and serve those alone; saved, they load
    back positional."""
    _, cm = traced("llama")
    generator = torch.Generator().manual_seed(5)
    same = {"clean": torch.randint(0, 128, (4, 8), generator=generator)}
    longer = {"clean": torch.randint(0, 128, (2, 9), generator=generator)}
    with pytest.raises(ValueError, match="averages each position over prompts of one length, and the reference holds "
                                         "batches of 8, 9 tokens"):
        mean_ablation(cm, [same, longer], positional=True)
    with pytest.raises(ValueError, match="the reference holds padded prompts of 5 to 8 tokens"):
        mean_ablation(cm, _prompts(), positional=True)
    means = mean_ablation(cm, same, positional=True)
    batch = {**longer, "corrupted": longer["clean"], "correct": torch.tensor([[5], [9]]),
             "incorrect": torch.tensor([[7], [1]])}
    with pytest.raises(ValueError, match="holds a mean for each of 8 positions, and a batch holds prompts of 9 tokens: "
                                         "it serves unpadded prompts of 8 tokens alone"):
        fxcircuits.Evaluator(cm, batch, "logit_diff", ablation=means)
    means.save(tmp_path / "means.pt")
    loaded = Ablation.load(tmp_path / "means.pt")
    assert loaded.length == 8
    loaded.check(cm)


def test_bad_ablations_are_refused_by_name(traced):
    _, cm = traced("llama")
    other = fxcircuits.trace(make("llama", num_hidden_layers=3))
    batch = _prompts()
    with pytest.raises(ValueError, match="found for another model"):
        fxcircuits.Evaluator(cm, {**batch, "corrupted": batch["clean"], "correct": torch.tensor([[1]] * 3),
                                  "incorrect": torch.tensor([[2]] * 3)}, "logit_diff", ablation=zero_ablation(other))
    with pytest.raises(ValueError, match="computed already: drop reference="):
        ablations.ablation_of(cm, zero_ablation(cm), [batch])
    with pytest.raises(ValueError, match="pass reference=batches"):
        ablations.ablation_of(cm, "optimal", None)
    with pytest.raises(ValueError, match="does not read it"):
        ablations.ablation_of(cm, "zero", [batch])
    with pytest.raises(ValueError, match="unknown ablation 'best'; choose one of corrupted, zero, mean, "
                                         "mean-positional, optimal"):
        ablations.ablation_of(cm, "best", None)
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        optimal_ablation(cm, [batch], loss="mse")
    with pytest.raises(ValueError, match="learning rate"):
        optimal_ablation(cm, [batch], lr=0)
    with pytest.raises(ValueError, match="no prompt of reference has two real tokens"):
        optimal_ablation(cm, [{"clean": torch.tensor([[3, 4]]), "attention_mask": torch.tensor([[0, 1]])}])
    with pytest.raises(ValueError, match="no node 'a9.h0'"):
        zero_ablation(cm).node(cm, "a9.h0")
    assert isinstance(ablations.ablation_of(cm, "mean", [batch]), Ablation)
    assert ablations.ablation_of(cm, "corrupted", None) is None


def test_a_bf16_model_learns_in_float32():
    """Values are kept and trained in float32 beside a bf16 model (Adam's small steps would round away in bf16), and
    sent to the patcher in its dtype."""
    model = make("llama", dtype=torch.bfloat16)
    cm = fxcircuits.trace(model)
    optimal = optimal_ablation(cm, [_prompts()], steps=3, progress=False)
    assert all(v.dtype == torch.float32 for v in optimal.values)
    assert (optimal.info["optimal"] <= optimal.info["mean"]).all()


def test_values_saved_and_loaded_patch_alike(traced, tmp_path):
    """``save`` then ``load`` gives the same values, name and info, which patch as the values learned did."""
    _, cm = traced("llama")
    optimal = optimal_ablation(cm, [_prompts()], steps=2, progress=False)
    optimal.save(tmp_path / "values.pt")
    loaded = Ablation.load(tmp_path / "values.pt")
    assert loaded.name == "optimal" and loaded.info.keys() == optimal.info.keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.values, optimal.values))
    assert torch.equal(loaded.info["optimal"], optimal.info["optimal"])
    batch = {**_prompts(), "corrupted": _prompts()["clean"], "correct": torch.tensor([[5], [9], [3]]),
             "incorrect": torch.tensor([[7], [1], [2]])}
    assert torch.equal(fxcircuits.Evaluator(cm, batch, "logit_diff", ablation=loaded).empty,
                       fxcircuits.Evaluator(cm, batch, "logit_diff", ablation=optimal).empty)
    fxcircuits.Circuit(cm.graph, cm.graph.edges[:2]).save(tmp_path / "circuit.pt")
    with pytest.raises(ValueError, match="circuit.pt holds no ablation values: Ablation.save writes them"):
        Ablation.load(tmp_path / "circuit.pt")
    (tmp_path / "text.pt").write_text("{}")
    with pytest.raises(ValueError, match="text.pt is no file torch.save wrote: Ablation.save writes ablation values"):
        Ablation.load(tmp_path / "text.pt")
