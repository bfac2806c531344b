import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fxcircuits
from test_models import smollm2_tokenizer
from zoo import make


@pytest.fixture(scope="session")
def traced():
    """``traced(name)`` → (HF model, CircuitModel), traced once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = make(name)
            cache[name] = (model, fxcircuits.trace(model))
        return cache[name]

    return get


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """``as_on_a_gpu()`` makes, from then on in the test, the run-time choices a GPU makes, on CPU
    (``heads.launch_bound``): the corrupted run in the patched pass where no gradient is taken
    (``runs_alongside``), and the routes that launch fewer operations at the cost of more arithmetic."""
    return lambda: monkeypatch.setattr(fxcircuits.heads, "launch_bound", lambda device: True)


@pytest.fixture
def prompts():
    """Clean and corrupted token ids [3, 7] with a left-padded first row."""
    generator = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 128, (3, 7), generator=generator)
    corrupted = torch.randint(0, 128, (3, 7), generator=generator)
    mask = torch.ones_like(clean)
    mask[0, :2] = 0
    return clean, corrupted, mask


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A random 2-layer Llama with SmolLM2's tokenizer, saved as a local model folder (so the built-in tasks
    can be built for it).  Seeded: the same weights whichever tests ran before."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer()), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
    smollm2_tokenizer().save_pretrained(folder)
    return folder
