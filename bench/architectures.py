"""Every causal-LM architecture of the installed transformers, traced and checked: which ones fxcircuits serves.

    PYTHONPATH=. python bench/architectures.py --out architectures.jsonl [--only llama,gpt2] [--jobs 2]

``tests/zoo.py`` holds the architectures the test suite checks on every run.  This survey asks the wider
question for a new transformers release: for each model type registered for ``AutoModelForCausalLM``, it builds
a tiny random configuration (sizes shrunk where the config has the usual fields), runs the HF model, and
traces it.  A model that traces is checked on padded prompts against the untouched HF model: the checks of
``fxcircuits.verify`` (what ``fxcircuits check`` runs on a user's model — ``clean``, ``corrupted``, ``logits``,
``masks``, ``patterns``, ``direct``, ``tokens``, ``sources``; ``readout`` says whether direct logit attribution
reads the model linearly, to first order (soft-capping), or is refused, with the reason: patching does not need
it), and two more whose reference is a forward hook on the HF model:

- ``input``: the ``input`` node patched equals HF with every embedding of the tokens replaced by its value on the
  corrupted prompts (forward hooks on the ``nn.Embedding`` modules called with the token ids — the input
  embedding, and the per-layer embedding of Gemma 4's E-models, whose per-layer inputs the ``input`` node
  carries: an independent reference).
- ``positions``: the ``input`` node patched at one position alone (``patch_positions``) equals HF with the
  embeddings of that position's token replaced by the corrupted token's, the same way.

Each is a max |difference| over the logit scale (the weights' own, for ``patterns``), ``ok`` at ≤ 1e-4.
Statuses: ``ok``; ``WRONG`` (traced, and a check failed: a defect); ``refused`` (fxcircuits raised its own error,
which names the model, the node and the reason); ``crash`` (it raised anything else: a defect); ``not-built`` (the
tiny config, the model or its HF forward failed: nothing to learn about fxcircuits).  Each type runs in its own
process, with a time limit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=128, max_position_embeddings=128, n_embd=64, n_layer=2, n_head=4,
             n_positions=128, ffn_dim=128, n_inner=128, d_model=64, n_heads=4, n_layers=2, num_layers=2, num_heads=4,
             moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_local_experts=4,
             n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
             first_k_dense_replace=1, num_dense_layers=1,  # a dense first layer, then one of experts
             kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=16, rotary_dim=8, sliding_window=8, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, mamba_n_heads=8, mamba_d_head=16, mamba_d_ssm=128, mamba_d_state=16, mamba_chunk_size=16,
             mamba_dt_rank=8, attn_layer_period=2, attn_layer_offset=1, attn_layer_indices=[1],
             # the decoder of an encoder-decoder family, which some register as a causal LM (Whisper's, BART's)
             decoder_attention_heads=4, decoder_layers=2, decoder_ffn_dim=128, encoder_attention_heads=4,
             encoder_layers=2, encoder_ffn_dim=128)
# fields a type's default config leaves unset although its model needs them (its checkpoints set them)
UNSET = {"lfm2_moe": dict(layer_types=["conv", "full_attention"]),
         "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}})}
# types whose config keeps sizes per kind of layer, set through aliases, so that no field can be shrunk on its own
# (Dots 3 Note: multi-head latent attention of other sizes in its sliding-window layers): built from these fields
BUILT_FROM = {"dots3_note_text": dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=32, shared_experts_intermediate_size=32,
    num_hidden_layers=3, layer_types=["indexed_attention", "indexed_attention", "sliding_attention"],
    mlp_layer_types=["dense", "sparse", "sparse"], num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
    num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    head_dim=16, index_head_dim=16, index_n_heads=2, sliding_window=8, swa_num_attention_heads=4,
    swa_num_key_value_heads=4, swa_q_lora_rank=32, swa_kv_lora_rank=16, swa_head_dim=16, swa_qk_nope_head_dim=8,
    swa_v_head_dim=16, vocab_size=128, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)}
TOLERANCE = 1e-4


def tiny_config(model_type: str):
    """The type's default config with the usual size fields shrunk (its text config's too).

    A config listing its layers' kinds keeps one layer of each (``_one_of_each``), and one whose kinds repeat over
    the layers in turn (``block_types``) gets layers enough to reach each; a hybrid that places its
    attention layers by period or index gets one at layer 1, after a layer of its other kind (Jamba, Bamba), and
    one whose default lists linear-attention layers alone gets a layer of full attention (``_with_attention``).
    Multi-head latent attention (a ``kv_lora_rank`` field) ties sizes together: its ``head_dim`` is the rotary
    part of a head, every query head has its own key/value head, and a ``qk_head_dim`` the config keeps as a field
    of its own is the sum of the shrunk parts.  A config sharing keys and values across more layers than the tiny
    one has (Gemma 3n's last 15 of 35) shares none.  A type in ``BUILT_FROM`` is built from the fields given
    there instead.  The config is then built again from its
    fields, so that sizes it derives from them follow the shrunk ones (``_rebuilt``).
    """
    from transformers import AutoConfig
    if model_type in BUILT_FROM:
        return AutoConfig.for_model(model_type, **BUILT_FROM[model_type])
    config = AutoConfig.for_model(model_type)
    for key, value in UNSET.get(model_type, {}).items():
        _set(config, key, value, replace_lists=True)
    for part in (config, getattr(config, "text_config", None)):
        if part is None:
            continue
        for key, value in SIZES.items():
            _set(part, key, value)
        if getattr(part, "kv_lora_rank", None) is not None:
            _set(part, "head_dim", SIZES["qk_rope_head_dim"])
            _set(part, "num_key_value_heads", SIZES["num_attention_heads"])
            if getattr(part, "qk_head_dim", None) is not None:  # kept as a field of its own (LongCat-Flash)
                _set(part, "qk_head_dim", SIZES["qk_nope_head_dim"] + SIZES["qk_rope_head_dim"])
        for key in ("layer_types", "layers_block_type"):
            if isinstance(getattr(part, key, None), list):
                kinds = _with_attention(_one_of_each(getattr(part, key)))
                _set(part, key, kinds, replace_lists=True)
                _set(part, "num_hidden_layers", len(kinds))
        if (getattr(part, "num_kv_shared_layers", None) or 0) >= getattr(part, "num_hidden_layers", 1):
            _set(part, "num_kv_shared_layers", 0)  # more than the tiny config has (Gemma 3n: 15 of 35): none shared
        cycle = getattr(part, "block_types", None)  # kinds repeated over the layers in turn (RecurrentGemma)
        if isinstance(cycle, list) and cycle:
            _set(part, "num_hidden_layers", max(SIZES["num_hidden_layers"], *(cycle.index(k) + 1 for k in cycle)))
    return _rebuilt(config)


def _rebuilt(config):
    """``config`` built again from its declared fields, so that sizes its class derives from them follow the shrunk
    ones (Zamba2's head sizes from ``hidden_size``); fields it does not derive are kept as they were set."""
    if not dataclasses.is_dataclass(config):
        return config
    declared = {f.name for f in dataclasses.fields(config)}
    fields = config.to_dict()
    try:
        rebuilt = type(config)(**{k: v for k, v in fields.items() if k in declared})
    except Exception:  # a class that will not take its own fields back: they stand as set
        return config
    for key, value in fields.items():
        if key not in vars(rebuilt):
            _set(rebuilt, key, value, replace_lists=True)
    return rebuilt


def _one_of_each(layer_types: list) -> list:
    """Layers enough to hold each kind once, in the order they first come (a hybrid's linear-attention and
    attention layers both), and at least as many as ``SIZES`` asks."""
    kinds = list(dict.fromkeys(layer_types))
    return kinds if len(kinds) >= SIZES["num_hidden_layers"] else layer_types[:SIZES["num_hidden_layers"]]


def _with_attention(kinds: list) -> list:
    """A hybrid whose default lists only linear-attention layers (GraniteMoeHybrid: Granite 4.0 is Mamba layers with
    a few of attention) gets one of full attention after them; a type that has none takes no notice of the list."""
    return kinds + ["full_attention"] if set(kinds) == {"linear_attention"} else kinds


def _set(config, key: str, value, replace_lists: bool = False) -> None:
    """Set one field where the config has it as a plain value (or as a list, with ``replace_lists``)."""
    try:
        if replace_lists or not isinstance(getattr(config, key), (list, dict)):
            setattr(config, key, value)
    except Exception:  # absent, per-layer, or a read-only property: the default stays
        pass


def check(model_type: str) -> dict:
    """Build, run and trace one model type; the result as a JSON-able dict (run in a child process)."""
    import torch
    from transformers import AutoModelForCausalLM

    import fxcircuits
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type)).float().eval()
        generator = torch.Generator().manual_seed(1)
        clean, corrupted = torch.randint(3, 128, (2, 2, 7), generator=generator)
        mask = torch.ones_like(clean)
        mask[0, :2] = 0  # left padding
        with torch.no_grad():
            hf = model(input_ids=clean, attention_mask=mask, use_cache=False).logits
    except Exception as error:
        return {"status": "not-built", "error": _line(error)}
    started = time.perf_counter()
    try:
        cm = fxcircuits.trace(model)
    except (fxcircuits.CaptureError, fxcircuits.DecompositionError) as error:
        return {"status": "refused", "error": _line(error)}
    except Exception as error:
        return {"status": "crash", "error": _line(error)}
    result = {"model": type(model).__name__, "trace_s": round(time.perf_counter() - started, 1),
              "edges": len(cm.graph.edges)}
    valid = mask.bool()
    scale = hf[valid].abs().max().item()  # as verify measures: over the real positions

    def difference(ours, reference):
        return (ours - reference)[valid].abs().max().item() / scale

    try:
        hybrid = clean.clone()
        hybrid[:, 4] = corrupted[:, 4]
        found = fxcircuits.verify(cm, model, clean, mask, corrupted, tolerance=TOLERANCE)
        with torch.no_grad():
            hf_input, hf_position = (_embedded_as(model, clean, other, mask) for other in (corrupted, hybrid))
            hooked = {"input": difference(cm(clean, mask, corrupted_input_ids=corrupted, node_mask={"input": 0.0}),
                                          hf_input),
                      "positions": difference(cm(clean, mask, corrupted_input_ids=corrupted, node_mask={"input": 0.0},
                                                 patch_positions=[4]), hf_position)}
    except Exception as error:
        return {**result, "status": "crash", "error": _line(error)}
    checks = {c.name: c.difference for c in found.checks if c.difference is not None}
    checks.update(hooked)
    result["readout"] = found.readout
    wrong = [k for k, v in checks.items() if not v <= TOLERANCE]
    return {**result, "status": "WRONG" if wrong else "ok", "checks": {k: float(f"{v:.2g}") for k, v in checks.items()}}


def _embedded_as(model, clean, other, mask):
    """HF's logits on ``clean`` with every embedding of its tokens replaced by the embedding of ``other``'s."""
    import torch
    hooks = [m.register_forward_hook(_on_corrupted(clean, other), with_kwargs=True)
             for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    try:
        return model(input_ids=clean, attention_mask=mask, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()


def _on_corrupted(clean, corrupted):
    """A forward hook that gives an embedding called with the clean token ids its output on the corrupted ones (a
    position embedding, called with positions, is left alone)."""
    import torch

    def hook(module, args, kwargs, out):
        ids = args[0] if args else None
        if isinstance(ids, torch.Tensor) and ids.shape == clean.shape and bool((ids == clean).all()):
            return module(corrupted, *args[1:], **kwargs)
        return out
    return hook


def _line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:400]


def run(model_type: str, timeout: float) -> dict:
    """``check`` in a child process (one model's failure or hang cannot touch the others)."""
    command = [sys.executable, __file__, "--child", model_type]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"type": model_type, "status": "not-built", "error": f"no answer in {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or [""])[-1]
        return {"type": model_type, "status": "not-built", "error": f"exit {done.returncode}: {tail[:300]}"}
    return {"type": model_type, **json.loads(lines[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="architectures.jsonl", help="one JSON line per model type")
    parser.add_argument("--only", help="comma-separated model types (default: every causal-LM type)")
    parser.add_argument("--jobs", type=int, default=2, help="model types checked at once")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per model type")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.child:
        print(json.dumps(check(args.child)))
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    types = args.only.split(",") if args.only else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    counts: dict[str, int] = {}
    with open(args.out, "w") as out, ThreadPoolExecutor(args.jobs) as pool:
        for result in pool.map(lambda t: run(t, args.timeout), types):
            out.write(json.dumps(result) + "\n")
            out.flush()
            counts[result["status"]] = counts.get(result["status"], 0) + 1
            print(f"{result['type']:28s} {result['status']:9s} {result.get('checks') or result.get('error', '')}",
                  flush=True)
    print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    sys.exit(1 if counts.get("WRONG") or counts.get("crash") else 0)


if __name__ == "__main__":
    main()
