"""Capture: the exported program as the functional ATen graph the later stages read."""
import sys

import pytest
import torch
from torch._export.utils import _is_cia_op, _is_preservable_cia_op
from torch.export import ExportedProgram

from fxcircuits import capture, functional
from zoo import make

aten = torch.ops.aten


@pytest.mark.parametrize("name, dtype, as_is", [("llama", torch.float32, True), ("llama", torch.bfloat16, True),
                                                ("gpt2", torch.float32, True), ("gpt_neox", torch.float32, True),
                                                ("gptj", torch.float32, True), ("gpt_neo", torch.float32, True),
                                                ("falcon_new_arch", torch.float32, True),
                                                ("mixtral", torch.float32, True), ("gemma4", torch.float32, True),
                                                ("deepseek_v3", torch.float32, True),
                                                ("qwen3_5", torch.float32, True)])
def test_a_program_with_no_op_to_rewrite_is_used_as_exported(name, dtype, as_is, monkeypatch):
    """``run_decompositions`` traces the program a second time.  A program whose ops are all functional, or
    rewritten in place as decomposition would spell them, skips it: casts and dropout (Llama, GPT-2), ``chunk``
    (Pythia), ``flatten`` (GPT-J), ``numpy_T``, ``broadcast_to`` and an in-place add (Falcon), ``detach_``
    (GPT-Neo), the routers' in-place writes to fresh tensors (Mixtral, Gemma 4), writes into slices and selects of
    fresh tensors (DeepSeek-V3's keys; Qwen3.5's rotary embedding and triangular solve), ``tensor_split`` (Qwen3.5's
    scan).  Either way the graph gives the model's logits and holds no in-place op, no dropout, no composite op that
    decomposition rewrites, and no cast but those that change a dtype (bf16 Llama's norms compute in fp32)."""
    decomposed, decompose = [], ExportedProgram.run_decompositions
    monkeypatch.setattr(ExportedProgram, "run_decompositions",
                        lambda self, *args: decomposed.append(self) or decompose(self, *args))
    model = make(name, dtype=dtype)
    module, _ = capture.export(model)
    assert bool(decomposed) != as_is
    ops = {node.target for node in module.graph.nodes if node.op == "call_function"}
    assert not ops & (functional.CASTS | {aten.dropout.default})
    assert not any(isinstance(op, torch._ops.OpOverload) and op._schema.is_mutable for op in ops)
    assert not any(isinstance(op, torch._ops.OpOverload) and _is_cia_op(op) and not _is_preservable_cia_op(op)
                   for op in ops - functional.KEPT_VIEWS)
    casts = {(node.args[0].meta["val"].dtype, node.meta["val"].dtype) for node in module.graph.nodes
             if node.target is aten._to_copy.default}
    assert all(before != after for before, after in casts)
    assert ((torch.bfloat16, torch.float32) in casts) == (dtype == torch.bfloat16)
    input_ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    with torch.no_grad():
        torch.testing.assert_close(module(input_ids, attention_mask),
                                   model(input_ids, attention_mask=attention_mask, use_cache=False).logits)


@pytest.mark.parametrize("name, dtype", [("llama", torch.float32), ("llama", torch.bfloat16),
                                         ("gemma4", torch.float32)])
def test_each_boolean_attention_mask_is_made_additive_once_for_all_layers(name, dtype, monkeypatch):
    """SDPA turns a boolean mask into 0 / −inf on every call, three launches a layer.  The capture does it once
    where the mask is made (Gemma 4: a full and a sliding-window mask, each shared by the layers of its kind), in
    the query's dtype, and the logits are those of the graph that leaves it to SDPA, bit for bit, padding
    included."""
    model = make(name, dtype=dtype)
    module, _ = capture.export(model)
    sdpa = list(module.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default))
    masks = {node.args[3] if len(node.args) > 3 else node.kwargs["attn_mask"] for node in sdpa}
    assert len(sdpa) == 2 and len(masks) == (2 if name == "gemma4" else 1)
    for mask in masks:
        assert mask.meta["val"].dtype == dtype
        made = mask.args[0] if mask.target is aten._to_copy.default else mask
        assert made.target is aten.where.Scalar and made.args[0].meta["val"].dtype == torch.bool
    monkeypatch.setattr(capture, "additive_masks", lambda module: module)
    left_to_sdpa, _ = capture.export(model)
    assert not any(n.target is aten.where.Scalar for n in left_to_sdpa.graph.nodes)
    input_ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    with torch.no_grad():
        assert torch.equal(module(input_ids, attention_mask), left_to_sdpa(input_ids, attention_mask))


class _WriteAfterView(torch.nn.Module):
    """Writes in place to a tensor a view of which is read after the write: only decomposition gets it right."""

    def forward(self, x):
        y = x * 2
        first = y[:, :1]
        y.mul_(3)
        return first + y


class _WriteToFresh(torch.nn.Module):
    """Writes in place to a tensor of its own that nothing reads after the write, as the MoE routers do."""

    def forward(self, x):
        y = x * 2
        total = y.sum(-1, keepdim=True)
        y.div_(total)
        return y.chunk(2, dim=-1)[1].flatten(0)


class _WriteToInput(torch.nn.Module):
    """Writes in place to its input: a side effect the graph must keep."""

    def forward(self, x):
        x.mul_(2)
        return x + 1


class _WriteIntoSlices(torch.nn.Module):
    """Fills a fresh tensor slice by slice and reads it in between, as DeepSeek builds its keys."""

    def forward(self, x):
        k = x.new_empty(*x.shape[:-1], 6)
        k[..., :4].copy_(x)
        first = k[..., :4].sum(-1, keepdim=True)
        k[..., 4:].copy_(first)
        return k * 2


class _WriteThroughOneView(torch.nn.Module):
    """Writes three times through one select of a fresh tensor, reading the tensor's other rows for each write,
    then returns the select: Qwen3.5's rotary embedding."""

    def forward(self, x):
        y = x * 2
        first = y[0]
        for row in (1, 2):
            first[..., row::2] = y[row, ..., row::2]
        first[0] = 1.0
        return first + 1


class _SolveByRows(torch.nn.Module):
    """Forward substitution row by row, each row written through a select and a slice and read by the next:
    Qwen3.5's triangular solve as exported.  The cast to contiguous memory becomes a contiguous ``_to_copy``, which
    the ``view`` after it needs."""

    def forward(self, x):
        system = -(x @ x.transpose(-1, -2)).tril(-1)
        for i in range(1, system.shape[-1]):
            row = system[..., i, :i].clone()
            system[..., i, :i] = row + (row.unsqueeze(-1) * system[..., :i, :i].clone()).sum(-2)
        return system.transpose(-1, -2).to(torch.float64, memory_format=torch.contiguous_format).view(-1)


class _ViewReadAfterWrite(torch.nn.Module):
    """Reads a transpose, taken before a write into a slice, after it: only decomposition gets it right."""

    def forward(self, x):
        y = x * 2
        turned = y.transpose(0, 1)
        y[:, :2].copy_(x[:, 2:])
        return turned + 1


class _WriteIntoInputSlice(torch.nn.Module):
    """Writes into a slice of its input: a side effect the graph must keep."""

    def forward(self, x):
        x[:, :2].copy_(x[:, 2:])
        return x + 1


@pytest.mark.parametrize("module, as_is", [(_WriteAfterView(), False), (_WriteToFresh(), True),
                                           (_WriteToInput(), False), (_WriteIntoSlices(), True),
                                           (_WriteThroughOneView(), True), (_SolveByRows(), True),
                                           (_ViewReadAfterWrite(), False), (_WriteIntoInputSlice(), False)])
def test_an_in_place_write_is_rewritten_out_of_place_only_where_nothing_sees_the_difference(module, as_is,
                                                                                           monkeypatch):
    """An in-place op becomes its out-of-place twin only when it writes to fresh memory and no view of that memory
    is read after it, or, written through slices and selects, its twin scattered back into the memory where every
    view read is taken again after the writes before it; else the program is decomposed.  Both ways, the graph computes what the module does (the
    test above checks that the models' graphs hold no in-place op)."""
    decomposed, decompose = [], ExportedProgram.run_decompositions
    monkeypatch.setattr(ExportedProgram, "run_decompositions",
                        lambda self, *args: decomposed.append(self) or decompose(self, *args))
    x = torch.rand(3, 4) + 0.5
    program = torch.export.export(module, (x.clone(),), strict=False)
    graph = functional.functional(program)
    assert bool(decomposed) != as_is
    torch.testing.assert_close(graph(x.clone()), module(x.clone()), rtol=0, atol=0)


class _SplitAtTheLength(torch.nn.Module):
    """Splits the sequence at indices that depend on its length, one past its end: Qwen3.5's scan under
    transformers 5.25 splits it where its whole chunks end."""

    def forward(self, x):
        first, middle, last, past = torch.tensor_split(x, [1, x.shape[1] - 1, x.shape[1] + 3], dim=-2)
        return first.sum(1) + middle.sum(1) * 2 + last.sum(1) * 3 + past.sum(1) * 5


def test_tensor_split_at_indices_is_sliced_without_a_second_trace(monkeypatch):
    """``tensor_split`` at indices, symbolic or past the end, becomes one slice per piece, which gives the same
    numbers at every length the export serves."""
    decomposed, decompose = [], ExportedProgram.run_decompositions
    monkeypatch.setattr(ExportedProgram, "run_decompositions",
                        lambda self, *args: decomposed.append(self) or decompose(self, *args))
    module = _SplitAtTheLength()
    program = torch.export.export(module, (torch.rand(2, 9, 3),), strict=False,
                                  dynamic_shapes=({1: torch.export.Dim.DYNAMIC},))
    graph = functional.functional(program)
    assert not decomposed
    assert not any(node.target is aten.tensor_split.indices for node in graph.graph.nodes)
    for length in (4, 7, 12):
        x = torch.rand(2, length, 3)
        torch.testing.assert_close(graph(x), module(x), rtol=0, atol=0)


def test_a_model_in_training_is_captured_without_dropout_and_given_back_as_it_was():
    """The capture runs in eval mode (no dropout), and each module's own mode is given back: a model traced in the
    middle of training, some of its modules frozen in eval mode, is left that way."""
    import fxcircuits
    model = make("gpt2", resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    model.train()
    model.transformer.h[0].eval()
    modes = [m.training for m in model.modules()]
    cm = fxcircuits.trace(model)
    assert [m.training for m in model.modules()] == modes
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = cm(ids)
        assert torch.equal(ours, cm(ids))
        assert torch.allclose(ours, model.eval()(ids).logits, atol=1e-5)


LONGROPE = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 16}


def test_tensors_a_model_caches_on_itself_while_exported_are_given_back_as_they_were():
    """HF's LongRoPE caches ``long_inv_freq`` on its rotary module as it first runs: under export, a fake tensor,
    which left there made the HF model's own later runs wrong (past the original length, where the long factors
    apply) and a second capture fail.  The model is left as it was; its runs and ours agree with an untouched one."""
    import fxcircuits
    model, untouched = make("llama", rope_scaling=dict(LONGROPE)), make("llama", rope_scaling=dict(LONGROPE))
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))  # past 16: the long factors
    cm = fxcircuits.trace(model)
    fakes = [name for module in model.modules() for name, value in vars(module).items()
             if isinstance(value, torch._subclasses.FakeTensor)]
    assert fakes == []
    with torch.no_grad():
        expected = untouched(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, expected)
        assert (cm(ids) - expected).abs().max() <= 1e-4 * expected.abs().max()
        assert (fxcircuits.trace(model)(ids[:, :8]) - untouched(input_ids=ids[:, :8]).logits).abs().max() <= 1e-4


def test_a_model_configured_to_return_tuples_is_captured_as_it_computes():
    """``config.return_dict = False`` (HF then returns a tuple) is no base model: its logits are captured."""
    import fxcircuits
    model = make("falcon_new_arch")
    model.config.return_dict = False
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fxcircuits.trace(model)(ids), model(input_ids=ids)[0], atol=1e-5, rtol=1e-4)


def test_an_export_failure_names_the_models_line_it_stopped_at(capsys, monkeypatch):
    """A branch on the values export cannot follow: the refusal quotes that line of the model's code, and torch's
    print of the partial graph does not bury it."""
    import fxcircuits
    model = make("llama")

    def branching(hidden_states):
        if hidden_states.sum() > 0:
            return hidden_states
        return -hidden_states

    monkeypatch.setattr(model.model.norm, "forward", branching)
    with pytest.raises(fxcircuits.CaptureError,
                       match=r"It stopped at test_capture.py:\d+ in branching: `if hidden_states.sum\(\) > 0:`"):
        fxcircuits.trace(model)
    assert "def forward" not in capsys.readouterr().err


def test_a_model_whose_logits_overflow_is_refused_as_overflowing():
    """float16 logits that overflow to NaN show neither causality nor the model's parts, which the probes find:
    refused as overflowing (it was called "not causal"), with what to do."""
    import fxcircuits
    model = make("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e6)
    with pytest.raises(fxcircuits.CaptureError, match=r"logits are NaN or infinite on random prompts of 5 tokens in "
                                                      r"torch.float16 .* load it in float32 or bfloat16"):
        fxcircuits.trace(model.half())


@pytest.mark.parametrize("name, rope", [
    ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    ("gemma3", dict(rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                     layer_types=["sliding_attention", "full_attention"])),
])
def test_dynamic_ntk_rope_is_captured_below_where_it_rescales(name, rope):
    """HF's dynamic NTK RoPE branches on the prompt's positions against the length it last rescaled for.  Below the
    model's context it always rotates by its original frequencies, which the capture holds: HF's logits at every
    length up to one short of the context, also after HF has run (and rescaled for) a longer prompt; the context
    itself, where HF's answer depends on what it ran before, is refused by name.  The module is given back as it
    was."""
    import fxcircuits
    model = make(name, **rope)
    rotary = next(module for module in model.modules() if hasattr(module, "rope_type"))
    kept = dict(rotary.__dict__["_buffers"]), rotary.rope_type
    cm = fxcircuits.trace(model)
    assert dict(rotary.__dict__["_buffers"]) == kept[0] and rotary.rope_type == kept[1]
    generator = torch.Generator().manual_seed(0)
    context = model.config.max_position_embeddings
    with torch.no_grad():
        for grown in (False, True):
            if grown:  # past the context: HF rescales its frequencies and keeps them
                before = rotary.inv_freq if name == "llama" else rotary.full_attention_inv_freq
                model(input_ids=torch.randint(0, 128, (1, context + 16), generator=generator))
                after = rotary.inv_freq if name == "llama" else rotary.full_attention_inv_freq
                assert not torch.equal(before, after)
            for length in (3, 30, context - 1):
                ids = torch.randint(0, 128, (2, length), generator=generator)
                ours = cm(ids)  # first: HF's run of a shorter prompt resets its frequencies
                expected = model(input_ids=ids).logits
                assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()
        with pytest.raises(ValueError, match=f"up to {context - 1} tokens, below the {context} from which its dynamic "
                                             "NTK RoPE rescales"):
            cm(torch.randint(0, 128, (1, context), generator=generator))


def test_what_export_writes_to_stderr_is_passed_on_but_the_partial_graph(capsys):
    from fxcircuits.capture import partial_graph_unprinted

    class Failed(Exception):
        partial_fx_graph = "def forward(self):\n    pass"

    with partial_graph_unprinted():
        print("a warning", file=sys.stderr)
    with pytest.raises(Failed), partial_graph_unprinted():
        print("another", file=sys.stderr)
        print(Failed.partial_fx_graph, file=sys.stderr)
        raise Failed
    assert capsys.readouterr().err == "a warning\nanother\n"
