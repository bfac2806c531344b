"""Tiny randomly initialised configs of every architecture the engine supports, and — for the tests'
independent references only — where each family's MLP output and attention output projection live."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


class ScaledResidualConfig(LlamaConfig):
    model_type = "scaled_residual"


class ScaledResidualLayer(LlamaDecoderLayer):
    """A residual scaled as it is carried into the sum, ``x·α + f(x)``: by a learned factor per channel before
    attention (Doge's ``input_residual``), by a constant from the config before the MLP (as MiniMax
    does, on a stream it normalises first) — a user's own architecture, which no HF family has in this form."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.input_residual = torch.nn.Parameter(torch.ones(config.hidden_size))
        self.mlp_alpha = config.mlp_alpha_factor

    def forward(self, hidden_states, **kwargs):
        attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = self.input_residual * hidden_states + attended
        return hidden_states * self.mlp_alpha + self.mlp(self.post_attention_layernorm(hidden_states))


class ScaledResidualForCausalLM(LlamaForCausalLM):
    config_class = ScaledResidualConfig

    def __init__(self, config):
        super().__init__(config)
        self.model.layers = torch.nn.ModuleList(ScaledResidualLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


AutoConfig.register("scaled_residual", ScaledResidualConfig)
AutoModelForCausalLM.register(ScaledResidualConfig, ScaledResidualForCausalLM)

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
              max_position_embeddings=64)
GPT2_LIKE = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128)

# name: (model_type, config overrides)
CONFIGS = {
    "gpt2": ("gpt2", GPT2_LIKE),
    "gpt_neo": ("gpt_neo", dict(hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                                vocab_size=128, max_position_embeddings=64, intermediate_size=128)),
    "gptj": ("gptj", dict(GPT2_LIKE, rotary_dim=8)),
    "gpt_neox": ("gpt_neox", dict(COMMON, use_parallel_residual=True)),
    "gpt_neox_sequential": ("gpt_neox", dict(COMMON, use_parallel_residual=False)),
    "opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                        max_position_embeddings=64, word_embed_proj_dim=64)),
    "bloom": ("bloom", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=128)),
    "falcon_multi_query": ("falcon", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                                          multi_query=True, new_decoder_architecture=False, parallel_attn=True)),
    "falcon_new_arch": ("falcon", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                                       vocab_size=128, new_decoder_architecture=True)),
    "llama": ("llama", dict(COMMON, num_key_value_heads=2)),
    "mistral": ("mistral", dict(COMMON, num_key_value_heads=2)),
    "mixtral": ("mixtral", dict(COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("qwen2", dict(COMMON, num_key_value_heads=2)),
    "qwen3": ("qwen3", dict(COMMON, num_key_value_heads=2, head_dim=16)),
    "gemma": ("gemma", dict(COMMON, num_key_value_heads=1, head_dim=16)),
    "gemma2": ("gemma2", dict(COMMON, num_key_value_heads=2, head_dim=16, sliding_window=4)),
    "gemma3": ("gemma3_text", dict(COMMON, num_key_value_heads=2, head_dim=16, sliding_window=4)),
    "phi": ("phi", dict(COMMON)),
    "phi3": ("phi3", dict(COMMON, num_key_value_heads=2, pad_token_id=0)),
    "olmo": ("olmo", dict(COMMON)),
    "olmo2": ("olmo2", dict(COMMON, num_key_value_heads=2)),
    "starcoder2": ("starcoder2", dict(COMMON, num_key_value_heads=2)),
    # attention sinks applied beside the core (out · sigmoid(logsumexp(scores) − sink)), a NoPE layer, multipliers
    "granite_swa": ("granite_swa", dict(COMMON, num_key_value_heads=2, sliding_window=4, bos_token_id=1, eos_token_id=2,
                                        layer_types=["full_attention", "sliding_attention"],
                                        layer_rope_theta=[0.0, 10000.0], residual_multiplier=0.5,
                                        embedding_multiplier=2.0)),
    # the whole stream scaled after each layer (layer_scalar), keys as values in full layers, an MoE block beside
    # the MLP
    "gemma4": ("gemma4_text", dict(COMMON, num_key_value_heads=2, head_dim=16, global_head_dim=16, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
                                   attention_k_eq_v=True, num_global_key_value_heads=1, enable_moe_block=True,
                                   num_experts=4, top_k_experts=2, moe_intermediate_size=32)),
    # Gemma 4's E-models: per-layer inputs, computed from the tokens beside the stream, read by a block after the MLP
    "gemma4_per_layer": ("gemma4_text", dict(COMMON, num_key_value_heads=2, head_dim=16, global_head_dim=16,
                                             sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                                             hidden_size_per_layer_input=8, vocab_size_per_layer_input=128)),
    # and their last layers reuse the keys and values of the last earlier layer of their kind (KV sharing)
    "gemma4_kv_shared": ("gemma4_text", dict(COMMON, num_hidden_layers=4, num_key_value_heads=2, head_dim=16,
                                             global_head_dim=16, sliding_window=4,
                                             layer_types=["sliding_attention", "full_attention"] * 2,
                                             hidden_size_per_layer_input=8, vocab_size_per_layer_input=128,
                                             num_kv_shared_layers=2)),
    # gated attention: q_proj writes each head's query and output gate (Qwen3-Next's full-attention layers)
    "qwen3_next": ("qwen3_next", dict(COMMON, num_key_value_heads=2, head_dim=16,
                                      layer_types=["full_attention", "full_attention"], num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=32)),
    # an output gate from its own projection (gate_proj), sandwich norms, RoPE in sliding layers alone, muP input
    # scaling, an MoE block with a shared expert after a dense first layer.  Every expert is routed: a top-k choice
    # near a tie (this model has one) flips on the rounding by which two ways of computing one run differ
    "afmoe": ("afmoe", dict(COMMON, num_key_value_heads=2, head_dim=16, sliding_window=4,
                            layer_types=["sliding_attention", "full_attention"], num_dense_layers=1, num_experts=4,
                            num_experts_per_tok=4, moe_intermediate_size=32, num_shared_experts=1, mup_enabled=True)),
    # a linear-attention layer (gated delta rule: a Python loop over chunks of the sequence, so torch.export traces
    # it at fixed lengths alone) before a gated full-attention layer
    "qwen3_5": ("qwen3_5_text", dict(COMMON, num_key_value_heads=2, head_dim=16,
                                     layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                                     linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)),
    # Granite 4.0's hybrid: a Mamba-2 layer (a chunked scan: fixed lengths alone, as above), then attention; each
    # layer's MoE block beside a shared MLP
    "granite_hybrid": ("granitemoehybrid", dict(COMMON, num_key_value_heads=2,
                                                layer_types=["linear_attention", "full_attention"], mamba_n_heads=8,
                                                mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16,
                                                num_local_experts=4, num_experts_per_tok=2,
                                                shared_intermediate_size=64)),
    # Griffin (RecurrentGemma): two recurrent blocks (a convolution, then the RG-LRU: a Python loop over positions,
    # so torch.export traces it at fixed lengths alone) before a local multi-query attention layer
    "recurrent_gemma": ("recurrent_gemma", dict(COMMON, num_hidden_layers=3, num_key_value_heads=1, lru_width=64,
                                                attention_window_size=4,
                                                block_types=["recurrent", "recurrent", "attention"])),
    # a depth-scaled residual (x·√((i−1)/i) + f(x)/√i), sandwich norms, full-attention layers without RoPE, an MoE
    # block after a dense layer
    "beam": ("beam", dict(COMMON, num_key_value_heads=2, head_dim=16, sliding_window=4,
                          layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
                          num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=1, topk_group=1)),
    # a residual and a branch each scaled per channel as they are summed (x·α + f(x)·β, both from one learned
    # vector), sandwich norms computed by the fused RMSNorm op (F.rms_norm), an MoE block after a dense layer
    "ergo": ("ergo", dict(COMMON, num_key_value_heads=2, sliding_window=4,
                          layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
                          first_dense_intermediate_size=128, num_dense_blocks=1, num_experts=4,
                          num_experts_per_tok=4, moe_intermediate_size=32, shared_intermediate_size=32,
                          rms_norm_eps=1e-6)),
    # LongCat-Flash: two attention layers and two MLPs per decoder layer, and a shortcut MoE that reads the stream
    # after the first MLP's read and writes at the layer's end (a delayed write); multi-head latent attention,
    # identity ("zero") experts.  Every expert is routed (see afmoe)
    "longcat_flash": ("longcat_flash", dict(hidden_size=64, num_layers=2, num_attention_heads=4,
                                            num_key_value_heads=4, ffn_hidden_size=128, expert_ffn_hidden_size=32,
                                            n_routed_experts=4, zero_expert_num=2, moe_topk=6, kv_lora_rank=16,
                                            q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16,
                                            head_dim=8, v_head_dim=16, vocab_size=128, max_position_embeddings=64)),
    # a residual scaled as it is carried into the sum (x·α + f(x)), per channel and by a constant
    "scaled_residual": ("scaled_residual", dict(COMMON, num_key_value_heads=2, mlp_alpha_factor=0.75)),
    # a vision-language model run on text: the language model's sizes live in its text config
    "gemma3_multimodal": ("gemma3", dict(text_config=dict(COMMON, num_key_value_heads=2, head_dim=16, sliding_window=4),
                                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                            num_attention_heads=2, image_size=28, patch_size=14),
                                         mm_tokens_per_image=4, boi_token_index=125, eoi_token_index=126,
                                         image_token_index=127)),
    # an MoE block whose routed experts write [batch·seq, d] beside a shared expert's [batch, seq, d]
    "glm4_moe": ("glm4_moe", dict(COMMON, num_key_value_heads=2, head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=0, n_group=1,
                                  topk_group=1)),
    # multi-head latent attention: keys and values from a shared latent, a rotary key shared by every head
    "deepseek_v3": ("deepseek_v3", dict(COMMON, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                                        qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                                        topk_group=1)),
    # DeepSeek sparse attention: an indexer computed from the stream keeps the top-k keys per query, here all of
    # them (k = 64 is more than any prompt the tests run; see test_patching for fewer)
    "deepseek_v32": ("deepseek_v32", dict(COMMON, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32,
                                          qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                                          num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                                          first_k_dense_replace=1, n_group=1, topk_group=1, index_n_heads=2,
                                          index_head_dim=16, index_topk=64)),
    # GLM-5: the same indexer, whose choice a later layer reuses ("shared") rather than computing its own
    "glm_moe_dsa": ("glm_moe_dsa", dict(COMMON, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32,
                                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
                                        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                        n_shared_experts=1, first_k_dense_replace=1, index_n_heads=2,
                                        index_head_dim=16, index_topk=64, indexer_types=["full", "shared"])),
    # no attention at all: Mamba's selective scan (a Python loop over positions without its CUDA kernels, so
    # torch.export traces it at fixed lengths alone) writes the stream, one m node a layer
    "mamba": ("mamba", dict(hidden_size=64, num_hidden_layers=2, vocab_size=128, state_size=8, expand=2,
                            conv_kernel=4)),
}

NO_ATTENTION = {"mamba"}  # no head to read, split, fold or draw patterns of

# Test references only: (module writing the MLP node's output, attention output projection, post-attention
# norm or None).  The engine itself never looks at these names.
LLAMA_LIKE = ("model.layers.{}.mlp", "model.layers.{}.self_attn.o_proj", None)
MODULES = {
    "gpt2": ("transformer.h.{}.mlp", "transformer.h.{}.attn.c_proj", None),
    "gpt_neo": ("transformer.h.{}.mlp", "transformer.h.{}.attn.attention.out_proj", None),
    "gptj": ("transformer.h.{}.mlp", "transformer.h.{}.attn.out_proj", None),
    "gpt_neox": ("gpt_neox.layers.{}.mlp", "gpt_neox.layers.{}.attention.dense", None),
    "gpt_neox_sequential": ("gpt_neox.layers.{}.mlp", "gpt_neox.layers.{}.attention.dense", None),
    "opt": ("model.decoder.layers.{}.fc2", "model.decoder.layers.{}.self_attn.out_proj", None),
    "bloom": ("transformer.h.{}.mlp.dense_4h_to_h", "transformer.h.{}.self_attention.dense", None),
    "falcon_multi_query": ("transformer.h.{}.mlp", "transformer.h.{}.self_attention.dense", None),
    "falcon_new_arch": ("transformer.h.{}.mlp", "transformer.h.{}.self_attention.dense", None),
    "phi": ("model.layers.{}.mlp", "model.layers.{}.self_attn.dense", None),
    "gemma2": ("model.layers.{}.post_feedforward_layernorm", "model.layers.{}.self_attn.o_proj",
               "model.layers.{}.post_attention_layernorm"),
    "gemma3": ("model.layers.{}.post_feedforward_layernorm", "model.layers.{}.self_attn.o_proj",
               "model.layers.{}.post_attention_layernorm"),
    "olmo2": ("model.layers.{}.post_feedforward_layernorm", "model.layers.{}.self_attn.o_proj",
              "model.layers.{}.post_attention_layernorm"),
    "gemma4": ("model.layers.{}.post_feedforward_layernorm", "model.layers.{}.self_attn.o_proj",
               "model.layers.{}.post_attention_layernorm"),
    "gemma4_per_layer": ("model.layers.{}.post_feedforward_layernorm", "model.layers.{}.self_attn.o_proj",
                         "model.layers.{}.post_attention_layernorm"),
    "gemma4_kv_shared": ("model.layers.{}.post_feedforward_layernorm", "model.layers.{}.self_attn.o_proj",
                         "model.layers.{}.post_attention_layernorm"),
    "beam": ("model.layers.{}.post_feedforward_layernorm", "model.layers.{}.self_attn.o_proj",
             "model.layers.{}.post_attention_layernorm"),
    "ergo": ("model.layers.{}.post_feedforward_layernorm", "model.layers.{}.self_attn.o_proj",
             "model.layers.{}.post_attention_layernorm"),
    "afmoe": ("model.layers.{}.post_mlp_layernorm", "model.layers.{}.self_attn.o_proj",
              "model.layers.{}.post_attention_layernorm"),
    "longcat_flash": ("model.layers.{}.mlps.0", "model.layers.{}.self_attn.0.o_proj", None),
    "qwen3_5": ("model.layers.{}.linear_attn", "model.layers.1.self_attn.o_proj", None),
    "mamba": ("backbone.layers.{}.mixer", None, None),
    "granite_hybrid": ("model.layers.{}.mamba", "model.layers.1.self_attn.o_proj", None),
    "recurrent_gemma": ("model.layers.{}.temporal_block.linear_out", "model.layers.2.temporal_block.o_proj", None),
    "gemma3_multimodal": ("model.language_model.layers.{}.post_feedforward_layernorm",
                          "model.language_model.layers.{}.self_attn.o_proj",
                          "model.language_model.layers.{}.post_attention_layernorm"),
}


# Test references only: edges into and out of LongCat-Flash's delayed writes (its shortcut MoE: m2, m5), which the
# finite-difference checks pick beside their own
DELAYED_WRITE_EDGES = ("a0.h1->m2", "m2->a2.h3<v>", "m2->m5", "input->m5")


def make(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    model_type, kwargs = CONFIGS[name]
    config = AutoConfig.for_model(model_type, **{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a constant initialisation (unit norm weights, zero biases and sinks) would hide a head
        for weight in model.parameters():  # or column taken for another
            if weight.numel() > 1 and bool((weight == weight.flatten()[0]).all()):
                weight.add_(0.1 * torch.randn_like(weight))
        for buffer in model.buffers():  # a scale of 1 (Gemma 4's layer_scalar) would hide one left out
            if buffer.is_floating_point() and buffer.numel() == 1:
                buffer.add_(0.1 * torch.randn_like(buffer))
    return model.to(dtype).eval()


def modules(name: str) -> tuple[str, str, str | None]:
    return MODULES.get(name, LLAMA_LIKE)
