"""Patching one edge changes only that edge's downstream input — checked with hooks on the HF model — and
masks are differentiable, with gradients that match finite differences."""
import pytest
import torch

import fxcircuits
from zoo import DELAYED_WRITE_EDGES, make

HEAD = 16  # head_dim of the tiny llama configs


@pytest.fixture(scope="module")
def mha():
    model = make("llama", num_key_value_heads=4)
    return model, fxcircuits.trace(model)


@pytest.fixture
def pair():
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, 128, (2, 6), generator=generator), torch.randint(0, 128, (2, 6), generator=generator)


def _recorded(model, ids):
    """HF-side values of one run: embeddings, layer-0 attention input to o_proj, MLP-0 output."""
    saved, layer = {}, model.model.layers[0]
    handles = [model.model.embed_tokens.register_forward_hook(lambda m, i, o: saved.update(embed=o)),
               layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: saved.update(z=a[0])),
               layer.mlp.register_forward_hook(lambda m, i, o: saved.update(mlp=o))]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return saved


def _head_write(model, z, head):
    only = torch.zeros_like(z)
    only[..., head * HEAD:(head + 1) * HEAD] = z[..., head * HEAD:(head + 1) * HEAD]
    return model.model.layers[0].self_attn.o_proj.forward(only)


def _reference(model, clean, corrupted, patches: dict):
    """Logits with downstream inputs of the HF model shifted by their upstream nodes' differences: each edge's
    by its weight in ``patches``, a number or weights [batch, seq] over the positions (1 − its mask value)."""
    c, k = _recorded(model, clean), _recorded(model, corrupted)
    deltas = {"input": lambda: k["embed"] - c["embed"], "m0": lambda: k["mlp"] - c["mlp"],
              "a0.h1": lambda: _head_write(model, k["z"], 1) - _head_write(model, c["z"], 1)}
    shifts = {}
    for edge, weight in patches.items():
        src, dst = edge.split("->")
        weight = torch.as_tensor(weight, dtype=torch.float32)
        shifts[dst] = shifts.get(dst, 0) + (weight[..., None] if weight.dim() else weight) * deltas[src]()
    layer, stream = model.model.layers[1], {}
    handles = [layer.input_layernorm.register_forward_pre_hook(lambda m, a: stream.update(x=a[0]))]
    for dst, delta in shifts.items():
        if dst == "logits":
            handles.append(model.model.norm.register_forward_pre_hook(lambda m, a, d=delta: (a[0] + d,)))
        elif dst == "m1":
            handles.append(layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, d=delta: (a[0] + d,)))
        else:  # a1.h2<q|k|v>: recompute that head's slice of one projection from the shifted stream
            head, role = int(dst[4]), dst[-2]

            def shifted(m, a, out, d=delta, cols=slice(head * HEAD, (head + 1) * HEAD)):
                out = out.clone()
                out[..., cols] = m.forward(layer.input_layernorm.forward(stream["x"] + d))[..., cols]
                return out
            handles.append(getattr(layer.self_attn, f"{role}_proj").register_forward_hook(shifted))
    try:
        with torch.no_grad():
            return model(input_ids=clean).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("edge", ["a0.h1->a1.h2<q>", "a0.h1->a1.h2<k>", "a0.h1->a1.h2<v>", "input->a1.h2<k>",
                                  "m0->m1", "a0.h1->m1", "input->logits", "m0->logits"])
def test_one_edge_matches_hf_with_hooks(mha, pair, edge):
    model, cm = mha
    clean, corrupted = pair
    with torch.no_grad():
        ours = cm(clean, corrupted_input_ids=corrupted, edge_mask={edge: 0.0})
        untouched = model(input_ids=clean).logits
    reference = _reference(model, clean, corrupted, {edge: 1.0})
    assert (reference - untouched).abs().max() > 1e-4, "the reference patch should change the logits"
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("edge", ["a0.h1->a1.h2<k>", "a0.h3->a1.h3<v>", "input->a1.h0<k>"])
def test_grouped_query_heads_get_their_own_k_and_v(pair, edge):
    """A grouped-query model equals the multi-head model with its k/v weights repeated per group; patching a k
    or v edge of one query head must not reach the other head of its group, so both give the same logits."""
    gqa = make("llama")
    mha = make("llama", num_key_value_heads=4)
    state = gqa.state_dict()
    for key, value in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = value.reshape(2, HEAD, -1).repeat_interleave(2, dim=0).reshape(4 * HEAD, -1)
    mha.load_state_dict(state)
    clean, corrupted = pair
    with torch.no_grad():
        torch.testing.assert_close(mha(input_ids=clean).logits, gqa(input_ids=clean).logits)
        ours = [fxcircuits.trace(m)(clean, corrupted_input_ids=corrupted, edge_mask={edge: 0.0}) for m in (gqa, mha)]
    torch.testing.assert_close(ours[0], ours[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2", "bloom", "deepseek_v3", "longcat_flash"])
def test_mask_gradients_match_finite_differences(name, pair):
    model = make(name, dtype=torch.float64)
    cm = fxcircuits.trace(model)
    clean, corrupted = pair
    generator = torch.Generator().manual_seed(4)
    mask = torch.rand(len(cm.graph.edges), generator=generator, dtype=torch.float64)
    target = clean[:, -1]

    def metric(m):
        logits = cm(clean, corrupted_input_ids=corrupted, edge_mask=m)
        return logits[torch.arange(len(target)), -1, target].sum()

    mask.requires_grad_(True)
    (grad,) = torch.autograd.grad(metric(mask), mask)
    largest = grad.abs().topk(3).indices.tolist()
    picks = torch.randperm(len(cm.graph.edges), generator=generator)[:4].tolist() + largest + [len(cm.graph.edges) - 1]
    if name == "longcat_flash":
        picks += [cm.graph.edge_index[e] for e in DELAYED_WRITE_EDGES]
    # float64 weights, but HF computes some norms and softmaxes in float32 (rounding ~1e-7 of the metric):
    # steps of 1e-3 keep that rounding small, central differences keep the truncation error at O(eps²), and the
    # absolute slack is 1e-4 of the largest gradient.
    eps, slack = 1e-3, 1e-4 * grad.abs().max()
    with torch.no_grad():
        for i in picks:
            up, down = mask.detach().clone(), mask.detach().clone()
            up[i] += eps
            down[i] -= eps
            numeric = (metric(up) - metric(down)) / (2 * eps)
            assert abs(numeric - grad[i]) <= slack + 2e-3 * abs(numeric), (cm.graph.edges[i], numeric, grad[i])
    assert grad.abs().sum() > 0


def test_weight_gradients_take_the_corrupted_run_as_a_constant_unless_it_is_given_with_its_gradient(pair):
    """The corrupted prompt's run is recorded without a gradient: a weight's gradient through a patched run is
    that of the clean run with the corrupted one held fixed, and ``corrupted_activations`` recorded with gradients
    gives the whole derivative (central finite differences, the weight edited in place; on GPT-2 the two differ by
    2×, so neither could pass for the other)."""
    model = make("gpt2", dtype=torch.float64)
    cm = fxcircuits.trace(model)
    clean, corrupted = pair
    weight, (row, column) = model.transformer.h[0].mlp.c_proj.weight, (3, 5)
    mask = torch.rand(len(cm.graph.edges), generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def metric(**other):
        return cm(clean, edge_mask=mask, **other)[:, -1, 7].sum()

    def gradient(**other):
        return torch.autograd.grad(metric(**other), weight)[0][row, column]

    fixed = cm.activations(corrupted).detach()
    assert torch.isclose(gradient(corrupted_input_ids=corrupted), gradient(corrupted_activations=fixed), rtol=1e-9)
    whole = gradient(corrupted_activations=cm.activations(corrupted))
    eps, original = 1e-4, weight[row, column].item()

    def moved(step):
        with torch.no_grad():
            weight[row, column] = original + step
            value = metric(corrupted_input_ids=corrupted)
            weight[row, column] = original
        return value

    numeric = (moved(eps) - moved(-eps)) / (2 * eps)
    assert torch.isclose(whole, numeric, rtol=1e-6)
    assert not torch.isclose(gradient(corrupted_input_ids=corrupted), numeric, rtol=0.1)
