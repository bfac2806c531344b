"""Capture: the exported program as the functional ATen graph the later stages read."""
import pytest
import torch
from torch.export import ExportedProgram

from fxcircuits import capture
from zoo import make

aten = torch.ops.aten


@pytest.mark.parametrize("name, dtype, as_is", [("llama", torch.float32, True), ("llama", torch.bfloat16, True),
                                                ("gpt2", torch.float32, True), ("mixtral", torch.float32, False),
                                                ("gemma4", torch.float32, False)])
def test_a_program_with_no_op_to_rewrite_is_used_as_exported(name, dtype, as_is, monkeypatch):
    """``run_decompositions`` traces the program a second time.  A program whose ops are all functional but for
    casts and dropout (Llama, GPT-2) skips it; one with in-place ops (Mixtral's and Gemma 4's routers) takes it.
    Either way the graph gives the model's logits and holds no in-place op, no dropout and no cast but those that
    change a dtype (bf16 Llama's norms compute in fp32)."""
    decomposed, decompose = [], ExportedProgram.run_decompositions
    monkeypatch.setattr(ExportedProgram, "run_decompositions",
                        lambda self, *args: decomposed.append(self) or decompose(self, *args))
    model = make(name, dtype=dtype)
    module, _ = capture.export(model)
    assert bool(decomposed) != as_is
    ops = {node.target for node in module.graph.nodes if node.op == "call_function"}
    assert not ops & (capture.CASTS | {aten.dropout.default})
    assert not any(isinstance(op, torch._ops.OpOverload) and op._schema.is_mutable for op in ops)
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
