import pytest
import torch

import fxcircuits
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
def prompts():
    """Clean and corrupted token ids [3, 7] with a left-padded first row."""
    generator = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 128, (3, 7), generator=generator)
    corrupted = torch.randint(0, 128, (3, 7), generator=generator)
    mask = torch.ones_like(clean)
    mask[0, :2] = 0
    return clean, corrupted, mask
