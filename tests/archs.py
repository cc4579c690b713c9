"""Tiny random decoder models of many Hugging Face architectures, for the architecture matrix
(``tests/test_architectures.py``) and the generated support page (``scripts/support_table.py``).

Every model has 2 layers and tiny widths, is built in this process from its HF config class (no hub), and uses the
tiny byte-level tokenizer of :mod:`tiny`. Every norm gain is moved away from its neutral value and every norm / linear
bias away from zero, so a decoder or an attribution that forgets a gain, a bias, a multiplier or a post-norm is wrong
by far more than the tolerances. Multipliers (Granite), logit scales (Cohere), soft-caps (Gemma 2) are set far from 1
(or small) for the same reason.

``SPECS`` maps a configuration name to its HF config and model class; ``build(name, tokenizer)`` returns the seeded,
perturbed HF model (eager attention, eval mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

D, HEADS, KV, LAYERS, FF, CTX = 32, 4, 2, 2, 48, 64


@dataclass(frozen=True)
class Spec:
    """One configuration: the transformers config / model class names and the config's keyword arguments."""

    config: str
    model: str
    kwargs: dict = field(default_factory=dict)
    note: str = ""  # what this configuration exercises (shown on the support page)


def _llama_like(**extra) -> dict:
    base = dict(hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=KV, max_position_embeddings=CTX, tie_word_embeddings=False)
    return {**base, **extra}


SPECS: dict[str, Spec] = {
    "gpt2": Spec("GPT2Config", "GPT2LMHeadModel",
                 dict(n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=CTX, n_inner=FF), "LayerNorm, learned positions"),
    "llama": Spec("LlamaConfig", "LlamaForCausalLM", _llama_like(), "RMSNorm, GQA"),
    "mistral": Spec("MistralConfig", "MistralForCausalLM", _llama_like(sliding_window=CTX), "sliding window"),
    "qwen2": Spec("Qwen2Config", "Qwen2ForCausalLM", _llama_like(), "q/k/v biases"),
    "qwen3": Spec("Qwen3Config", "Qwen3ForCausalLM", _llama_like(head_dim=8), "per-head q/k RMSNorm"),
    "gemma": Spec("GemmaConfig", "GemmaForCausalLM", _llama_like(head_dim=8, tie_word_embeddings=True),
                  "(1 + w) RMSNorm, scaled embeddings"),
    "gemma2": Spec("Gemma2Config", "Gemma2ForCausalLM",
                   _llama_like(head_dim=8, tie_word_embeddings=True, query_pre_attn_scalar=8, sliding_window=CTX,
                               final_logit_softcapping=3.0, attn_logit_softcapping=2.0),
                   "post-sublayer norms, final and attention soft-caps"),
    "gemma3": Spec("Gemma3TextConfig", "Gemma3ForCausalLM",
                   _llama_like(head_dim=8, tie_word_embeddings=True, query_pre_attn_scalar=8, sliding_window=CTX),
                   "post-sublayer norms, q/k norms"),
    "gemma3_attn_softcap": Spec("Gemma3TextConfig", "Gemma3ForCausalLM",
                                _llama_like(head_dim=8, tie_word_embeddings=True, query_pre_attn_scalar=8,
                                            sliding_window=CTX, attn_logit_softcapping=2.0),
                                "Gemma 3 with attn_logit_softcapping set"),
    "phi": Spec("PhiConfig", "PhiForCausalLM", _llama_like(num_key_value_heads=HEADS, partial_rotary_factor=0.5),
                "parallel attention, partial rotary, lm_head bias"),
    "phi3": Spec("Phi3Config", "Phi3ForCausalLM", _llama_like(num_key_value_heads=HEADS), "fused qkv / gate_up"),
    "stablelm": Spec("StableLmConfig", "StableLmForCausalLM", _llama_like(partial_rotary_factor=0.5, use_qkv_bias=True),
                     "LayerNorm, partial rotary"),
    "gpt_neox": Spec("GPTNeoXConfig", "GPTNeoXForCausalLM",
                     dict(hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          max_position_embeddings=CTX, rotary_pct=0.5, use_parallel_residual=True,
                          tie_word_embeddings=False), "parallel attention, partial rotary"),
    "gptj": Spec("GPTJConfig", "GPTJForCausalLM",
                 dict(n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=CTX, rotary_dim=4, n_inner=FF,
                      tie_word_embeddings=False), "interleaved rotary on rotary_dim, parallel attention"),
    "opt": Spec("OPTConfig", "OPTForCausalLM",
                dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=4 * D,
                     max_position_embeddings=CTX, word_embed_proj_dim=D, do_layer_norm_before=True),
                "OPT-125m layout (pre-LN)"),
    "opt_350m": Spec("OPTConfig", "OPTForCausalLM",
                     dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FF,
                          max_position_embeddings=CTX, word_embed_proj_dim=16, do_layer_norm_before=False),
                     "OPT-350m layout: project_in/out, post-LN, no final norm, ffn_dim != 4 d_model"),
    "bloom": Spec("BloomConfig", "BloomForCausalLM", dict(hidden_size=D, n_layer=LAYERS, n_head=HEADS), "ALiBi"),
    "falcon": Spec("FalconConfig", "FalconForCausalLM",
                   dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=CTX,
                        multi_query=True, parallel_attn=True, bias=False, alibi=False),
                   "multi-query, parallel attention"),
    "olmo": Spec("OlmoConfig", "OlmoForCausalLM", _llama_like(), "LayerNorm without parameters"),
    "olmo2": Spec("Olmo2Config", "Olmo2ForCausalLM", _llama_like(), "post-sublayer norms, q/k norms"),
    "cohere": Spec("CohereConfig", "CohereForCausalLM",
                   _llama_like(tie_word_embeddings=True, logit_scale=0.25), "logit_scale, parallel attention"),
    "granite": Spec("GraniteConfig", "GraniteForCausalLM",
                    _llama_like(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3,
                                logits_scaling=4.0), "embedding/residual/attention multipliers, logits_scaling"),
    "starcoder2": Spec("Starcoder2Config", "Starcoder2ForCausalLM", _llama_like(sliding_window=CTX, use_bias=True),
                       "LayerNorm, biases"),
    "mixtral": Spec("MixtralConfig", "MixtralForCausalLM", _llama_like(num_local_experts=4, num_experts_per_tok=2),
                    "MoE (top-2 of 4)"),
    "olmoe": Spec("OlmoeConfig", "OlmoeForCausalLM", _llama_like(num_experts=4, num_experts_per_tok=2),
                  "MoE, q/k norms"),
    "qwen2_moe": Spec("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                      _llama_like(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                  shared_expert_intermediate_size=40),
                      "MoE with a gated shared expert"),
    "qwen2_moe_square": Spec("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                             _llama_like(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                         shared_expert_intermediate_size=D),
                             "MoE, shared expert as wide as d_model"),
    "gpt_bigcode": Spec("GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                        dict(n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=CTX, n_inner=FF, multi_query=True),
                        "multi-query attention"),
    "codegen": Spec("CodeGenConfig", "CodeGenForCausalLM",
                    dict(n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=CTX, n_ctx=CTX, rotary_dim=4, n_inner=FF,
                         tie_word_embeddings=False), "rotary, parallel attention"),
    # more architectures TransformerLens 4.3 boots
    "gpt_neo": Spec("GPTNeoConfig", "GPTNeoForCausalLM",
                    dict(hidden_size=D, num_layers=LAYERS, num_heads=HEADS, max_position_embeddings=CTX,
                         intermediate_size=FF, attention_types=[[["global", "local"], 1]], window_size=16),
                    "global and local attention, unscaled scores"),
    "qwen3_moe": Spec("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      _llama_like(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8),
                      "MoE, q/k norms"),
    "granitemoe": Spec("GraniteMoeConfig", "GraniteMoeForCausalLM",
                       _llama_like(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=3.0,
                                   residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=4.0),
                       "MoE with Granite's multipliers"),
    "olmo3": Spec("Olmo3Config", "Olmo3ForCausalLM", _llama_like(sliding_window=CTX), "post-sublayer norms"),
    "smollm3": Spec("SmolLM3Config", "SmolLM3ForCausalLM", _llama_like(), "NoPE layers"),
    "nemotron": Spec("NemotronConfig", "NemotronForCausalLM", _llama_like(partial_rotary_factor=0.5),
                     "LayerNorm1P, squared ReLU, partial rotary"),
    # an architecture TransformerLens 4.3 cannot wrap: load_model refuses it, naming the cause
    "biogpt": Spec("BioGptConfig", "BioGptForCausalLM",
                   dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FF,
                        max_position_embeddings=CTX), "not supported by TransformerLens 4.3"),
}

# --- issue 26: MLA and MoE
# Multi-head latent attention: value heads (16) twice as wide as the query/key heads' non-rotary part (8), so a
# per-head width taken from cfg.d_head is visibly wrong; layer 0 dense, layer 1 a mixture of experts.
_MLA = dict(num_key_value_heads=HEADS, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8,
            v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=2, moe_intermediate_size=24,
            n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5)
SPECS.update({
    "deepseek_v2": Spec("DeepseekV2Config", "DeepseekV2ForCausalLM",
                        _llama_like(**{**_MLA, "q_lora_rank": None, "routed_scaling_factor": 2.0,
                                       "norm_topk_prob": False}, first_k_dense_replace=1, topk_method="greedy"),
                        "multi-head latent attention (no q LoRA), 2 shared experts, routed_scaling_factor"),
    "deepseek_v3": Spec("DeepseekV3Config", "DeepseekV3ForCausalLM", _llama_like(**_MLA, first_k_dense_replace=1),
                        "multi-head latent attention, interleaved rotary, grouped router with bias"),
    "glm4_moe_lite": Spec("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM",
                          _llama_like(**_MLA, mlp_layer_types=["dense", "sparse"]), "multi-head latent attention"),
    "youtu": Spec("YoutuConfig", "YoutuForCausalLM",
                  _llama_like(**{k: _MLA[k] for k in ("num_key_value_heads", "kv_lora_rank", "q_lora_rank",
                                                       "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")}),
                  "multi-head latent attention, dense MLP"),
    "glm_moe_dsa": Spec("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM",
                        _llama_like(**_MLA, mlp_layer_types=["dense", "sparse"]),
                        "multi-head latent attention with a sparse-attention indexer"),
    "ernie4_5_moe": Spec("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
                         _llama_like(moe_num_experts=4, moe_k=2, moe_intermediate_size=24, moe_num_shared_experts=2,
                                     moe_layer_start_index=1, moe_layer_end_index=1, use_bias=True),
                         "2 shared experts, router with a score-correction bias"),
    "glm4_moe": Spec("Glm4MoeConfig", "Glm4MoeForCausalLM",
                     _llama_like(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                 n_shared_experts=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
                                 partial_rotary_factor=0.5, use_qk_norm=True, head_dim=8),
                     "shared experts, routed_scaling_factor, partial rotary"),
    "laguna": Spec("LagunaConfig", "LagunaForCausalLM",
                   _llama_like(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                               shared_expert_intermediate_size=40, head_dim=8, sliding_window=CTX,
                               moe_routed_scaling_factor=2.5, layer_types=["full_attention", "full_attention"]),
                   "shared expert, routed_scaling_factor applied by the block, per-head output gate"),
    "minimax_m2": Spec("MiniMaxM2Config", "MiniMaxM2ForCausalLM",
                       _llama_like(num_local_experts=4, num_experts_per_tok=2, head_dim=8),
                       "router with an e_score_correction_bias argument"),
    "afmoe": Spec("AfmoeConfig", "AfmoeForCausalLM",
                  _llama_like(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, num_shared_experts=2,
                              num_dense_layers=1, head_dim=8, route_scale=2.5, sliding_window=CTX,
                              layer_types=["full_attention", "full_attention"]),
                  "router with a bias argument, shared experts, route_scale, output gate, post-norms"),
    "gpt_oss": Spec("GptOssConfig", "GptOssForCausalLM",
                    _llama_like(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=CTX,
                                layer_types=["full_attention", "full_attention"]),
                    "experts without act_fn (clamped swiglu), biased experts, attention sinks"),
    "phimoe": Spec("PhimoeConfig", "PhimoeForCausalLM", _llama_like(num_local_experts=4, num_experts_per_tok=2),
                   "MoE, LayerNorm; booted under TransformerLens's spelling PhiMoEForCausalLM"),
    # --- issue 26: decoders and embeddings; bridges missing hooks (refused by name: mi_lenses.models.gaps)
    "modernbert_decoder": Spec("ModernBertDecoderConfig", "ModernBertDecoderForCausalLM",
                               dict(hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, max_position_embeddings=CTX, cls_token_id=1,
                                    sep_token_id=2), "prediction head (dense, activation, norm) before the decoder"),
    "nanochat": Spec("NanoChatConfig", "NanoChatForCausalLM", _llama_like(), "embeddings normalised before block 0"),
    "bitnet": Spec("BitNetConfig", "BitNetForCausalLM", _llama_like(), "attn_sub_norm before o_proj"),
    "hunyuan": Spec("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", _llama_like(head_dim=8),
                    "q/k norms after the rotation"),
    "openai_gpt": Spec("OpenAIGPTConfig", "OpenAIGPTLMHeadModel",
                       dict(n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=CTX), "post-LN GPT-1"),
    "xglm": Spec("XGLMConfig", "XGLMForCausalLM",
                 dict(d_model=D, num_layers=LAYERS, attention_heads=HEADS, ffn_dim=FF, max_position_embeddings=CTX),
                 "sinusoidal positions, scaled embeddings"),
    "gemma4": Spec("Gemma4TextConfig", "Gemma4ForCausalLM",
                   _llama_like(head_dim=8, tie_word_embeddings=True, sliding_window=CTX),
                   "per-layer attention geometry"),
    # --- end
    "flex_olmo": Spec("FlexOlmoConfig", "FlexOlmoForCausalLM", _llama_like(num_experts=4, num_experts_per_tok=2),
                      "MoE, post-sublayer norms"),
})
# --- end

# --- issue 26: attention masks
# Sliding windows and chunks of WINDOW positions, shorter than the matrix prompt (15 tokens; tests/test_masks.py
# checks it), so most keys fall outside them; one sliding and one full layer where the config has layer types.
WINDOW = 4
_SLIDING_FULL = ["sliding_attention", "full_attention"]
SPECS.update({
    "mistral_window": Spec("MistralConfig", "MistralForCausalLM", _llama_like(sliding_window=WINDOW),
                           "sliding window shorter than the prompt"),
    "qwen2_window": Spec("Qwen2Config", "Qwen2ForCausalLM",
                         _llama_like(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
                         "full then sliding-window layer (max_window_layers)"),
    "phi3_window": Spec("Phi3Config", "Phi3ForCausalLM", _llama_like(num_key_value_heads=HEADS, sliding_window=WINDOW),
                        "sliding window shorter than the prompt"),
    "gpt_neo_window": Spec("GPTNeoConfig", "GPTNeoForCausalLM",
                           dict(hidden_size=D, num_layers=LAYERS, num_heads=HEADS, max_position_embeddings=CTX,
                                intermediate_size=FF, attention_types=[[["global", "local"], 1]], window_size=WINDOW),
                           "local attention shorter than the prompt"),
    "cohere2_window": Spec("Cohere2Config", "Cohere2ForCausalLM",
                           _llama_like(tie_word_embeddings=True, logit_scale=0.25, sliding_window=WINDOW,
                                       layer_types=_SLIDING_FULL), "sliding-window (rotary) and full (NoPE) layers"),
    "exaone4_window": Spec("Exaone4Config", "Exaone4ForCausalLM",
                           _llama_like(sliding_window=WINDOW, layer_types=_SLIDING_FULL),
                           "sliding-window and full layers, post-sublayer norms"),
    "gemma2_window": Spec("Gemma2Config", "Gemma2ForCausalLM",
                          _llama_like(head_dim=8, tie_word_embeddings=True, query_pre_attn_scalar=8,
                                      sliding_window=WINDOW, final_logit_softcapping=3.0, attn_logit_softcapping=2.0),
                          "sliding-window and full layers, soft-capped scores"),
    "gemma3_window": Spec("Gemma3TextConfig", "Gemma3ForCausalLM",
                          _llama_like(head_dim=8, tie_word_embeddings=True, query_pre_attn_scalar=8,
                                      sliding_window=WINDOW, layer_types=_SLIDING_FULL),
                          "sliding-window and full layers"),
    "olmo3_window": Spec("Olmo3Config", "Olmo3ForCausalLM", _llama_like(sliding_window=WINDOW, layer_types=_SLIDING_FULL),
                         "sliding-window and full layers"),
    "starcoder2_window": Spec("Starcoder2Config", "Starcoder2ForCausalLM",
                              _llama_like(sliding_window=WINDOW, use_bias=True), "sliding window shorter than the prompt"),
    "gpt_oss_window": Spec("GptOssConfig", "GptOssForCausalLM",
                           _llama_like(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=WINDOW,
                                       layer_types=_SLIDING_FULL),
                           "learned attention sinks, sliding-window and full layers"),
    "llama4_chunked": Spec("Llama4TextConfig", "Llama4ForCausalLM",
                           _llama_like(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=FF, head_dim=8,
                                       moe_layers=[1], interleave_moe_layer_step=2, attention_chunk_size=WINDOW,
                                       no_rope_layers=[1, 0], layer_types=["chunked_attention", "full_attention"]),
                           "chunked attention shorter than the prompt"),
})
# --- end

# --- issue 26: state-space and hybrid
# Every block kind of TransformerLens 4.3's state-space and hybrid adapters: pure SSMs (no attention at all), hybrids
# with one mixer and one attention block (2 layers), Nemotron-H's one-sublayer blocks (SSM, attention, MLP: 3 layers).
_SSM2 = dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=4, mamba_d_conv=3, mamba_expand=2,
             mamba_chunk_size=8)
_GDN = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_conv_kernel_dim=3, head_dim=8, layer_types=["linear_attention", "full_attention"])
HYBRID_SPECS = {
    "mamba": Spec("MambaConfig", "MambaForCausalLM",
                  dict(hidden_size=D, num_hidden_layers=LAYERS, state_size=4, expand=2, conv_kernel=3,
                       time_step_rank=4, tie_word_embeddings=False), "Mamba: SSM blocks only"),
    "mamba2": Spec("Mamba2Config", "Mamba2ForCausalLM",
                   dict(hidden_size=D, num_hidden_layers=LAYERS, state_size=4, expand=2, conv_kernel=3, num_heads=8,
                        head_dim=8, n_groups=1, chunk_size=8, tie_word_embeddings=False), "Mamba 2: SSM blocks only"),
    "falcon_mamba": Spec("FalconMambaConfig", "FalconMambaForCausalLM",
                         dict(hidden_size=D, num_hidden_layers=LAYERS, state_size=4, expand=2, conv_kernel=3,
                              time_step_rank=4, tie_word_embeddings=False), "Mamba with B/C/dt norms"),
    "rwkv": Spec("RwkvConfig", "RwkvForCausalLM",
                 dict(hidden_size=D, num_hidden_layers=LAYERS, attention_hidden_size=D, intermediate_size=FF,
                      context_length=CTX, tie_word_embeddings=False), "RWKV time-mix, gated channel-mix"),
    "recurrent_gemma": Spec("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM",
                            dict(hidden_size=D, num_hidden_layers=3, num_attention_heads=HEADS, num_key_value_heads=1,
                                 head_dim=8, intermediate_size=FF, lru_width=D, attention_window_size=16,
                                 block_types=["recurrent", "attention"], conv1d_width=3, logits_soft_cap=30.0),
                            "RG-LRU and local attention, blocks wrapped whole"),
    "jamba": Spec("JambaConfig", "JambaForCausalLM",
                  _llama_like(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                              num_experts=4, num_experts_per_tok=2, mamba_d_state=4, mamba_d_conv=3, mamba_expand=2,
                              mamba_dt_rank=4), "Mamba + attention, MoE"),
    "bamba": Spec("BambaConfig", "BambaForCausalLM", _llama_like(attn_layer_indices=[1], **_SSM2),
                  "Mamba 2 + attention"),
    "granitemoehybrid": Spec("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
                             _llama_like(layer_types=["mamba", "attention"], num_local_experts=0,
                                         shared_intermediate_size=FF, embedding_multiplier=3.0,
                                         residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=4.0,
                                         position_embedding_type="rope", **_SSM2),
                             "Mamba 2 + attention, Granite multipliers"),
    "nemotron_h": Spec("NemotronHConfig", "NemotronHForCausalLM",
                       _llama_like(num_hidden_layers=3, head_dim=8, hybrid_override_pattern="M*-", mamba_num_heads=8,
                                   mamba_head_dim=8, n_groups=1, ssm_state_size=4, conv_kernel=3, expand=2,
                                   chunk_size=8), "one-sublayer blocks: SSM, attention, MLP"),
    "zamba2": Spec("Zamba2Config", "Zamba2ForCausalLM",
                   _llama_like(num_key_value_heads=HEADS, layers_block_type=["mamba", "hybrid"], mamba_d_state=4,
                               mamba_d_conv=3, mamba_expand=2, mamba_headdim=8, n_mamba_heads=8, mamba_ngroups=1,
                               chunk_size=8, num_mem_blocks=1, use_mem_rope=False),
                   "Mamba 2 + shared-transformer hybrid blocks"),
    "lfm2": Spec("Lfm2Config", "Lfm2ForCausalLM",
                 _llama_like(layer_types=["conv", "full_attention"], conv_L_cache=3, block_auto_adjust_ff_dim=False),
                 "short convolution + attention"),
    "qwen3_next": Spec("Qwen3NextConfig", "Qwen3NextForCausalLM",
                       _llama_like(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                   shared_expert_intermediate_size=40, decoder_sparse_step=1, **_GDN),
                       "gated DeltaNet + gated attention, MoE"),
    "qwen3_5": Spec("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", _llama_like(**_GDN),
                    "gated DeltaNet + gated attention"),
    # --- issue 26: decoders and embeddings (Falcon-H1: attention and Mamba 2 in parallel in every block, muP
    # multipliers, lm_head_multiplier far from 1)
    "falcon_h1": Spec("FalconH1Config", "FalconH1ForCausalLM",
                      _llama_like(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=4, mamba_d_conv=3,
                                  mamba_expand=2, mamba_chunk_size=8, mamba_d_ssm=None, lm_head_multiplier=0.5),
                      "attention and Mamba 2 in parallel, lm_head_multiplier"),
    "lfm2_moe": Spec("Lfm2MoeConfig", "Lfm2MoeForCausalLM",
                     _llama_like(layer_types=["conv", "full_attention"], conv_L_cache=3, num_experts=4,
                                 num_experts_per_tok=2, moe_intermediate_size=24, num_dense_layers=1),
                     "short convolution + attention, MoE"),
    "qwen3_5_moe": Spec("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                        _llama_like(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                    shared_expert_intermediate_size=40, **_GDN),
                        "gated DeltaNet + gated attention, MoE with a shared expert"),
    # --- end
    "olmo_hybrid": Spec("OlmoHybridConfig", "OlmoHybridForCausalLM",
                        _llama_like(layer_types=["linear_attention", "full_attention"]),
                        "gated DeltaNet + attention with post-norms"),
}
SPECS.update(HYBRID_SPECS)
# --- end

# --- issue 26: the rest of the registry
# Every other decoder-only causal LM in TransformerLens 4.3's registry that transformers can build (the
# remote-code ones and TransformerLens's other spellings: arch_matrix.NOT_BUILT / REMOTE_ONLY / ALIASED).
SPECS.update({
    "apertus": Spec("ApertusConfig", "ApertusForCausalLM", _llama_like(), "xIELU activation, q/k norms"),
    "arcee": Spec("ArceeConfig", "ArceeForCausalLM", _llama_like(head_dim=8),
                  "squared-ReLU MLP without a gate"),
    "ernie4_5": Spec("Ernie4_5Config", "Ernie4_5ForCausalLM", _llama_like(use_bias=True, head_dim=8),
                     "interleaved rotary, linear biases"),
    "glm": Spec("GlmConfig", "GlmForCausalLM", _llama_like(head_dim=8, attention_bias=True),
                "partial interleaved rotary, fused gate_up, q/k/v biases"),
    "glm4": Spec("Glm4Config", "Glm4ForCausalLM", _llama_like(head_dim=8, attention_bias=True),
                 "GLM with post-sublayer norms"),
    "ministral3": Spec("Ministral3Config", "Ministral3ForCausalLM",
                       _llama_like(head_dim=8, sliding_window=CTX), "Mistral 3 text decoder"),
    "seed_oss": Spec("SeedOssConfig", "SeedOssForCausalLM",
                     _llama_like(head_dim=8, attention_bias=True, attention_out_bias=True),
                     "q/k/v and output biases"),
    "vaultgemma": Spec("VaultGemmaConfig", "VaultGemmaForCausalLM",
                       _llama_like(head_dim=8, tie_word_embeddings=True, query_pre_attn_scalar=8,
                                   sliding_window=CTX, final_logit_softcapping=3.0,
                                   attn_logit_softcapping=2.0),
                       "Gemma 2 without post-norms, soft-caps"),
    "jais2": Spec("Jais2Config", "Jais2ForCausalLM", _llama_like(head_dim=8), "LayerNorm, squared-ReLU MLP"),
    "mpt": Spec("MptConfig", "MptForCausalLM",
                dict(d_model=D, n_heads=HEADS, n_layers=LAYERS, expansion_ratio=2, max_seq_len=CTX),
                "ALiBi, fused Wqkv, bias-free LayerNorm"),
    "hrm_text": Spec("HrmTextConfig", "HrmTextForCausalLM", _llama_like(head_dim=8),
                     "two recurrent stacks (H and L cycles); refused by name"),
    "deepseek_v4": Spec("DeepseekV4Config", "DeepseekV4ForCausalLM",
                        dict(hidden_size=D, moe_intermediate_size=24, num_hidden_layers=LAYERS,
                             num_attention_heads=HEADS, num_key_value_heads=1, head_dim=16, q_lora_rank=24,
                             num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1,
                             max_position_embeddings=CTX, tie_word_embeddings=False),
                        "hyper-connections (hc_mult residual streams); refused by name"),
})
HYBRID_SPECS["jetmoe"] = SPECS["jetmoe"] = Spec(
    "JetMoeConfig", "JetMoeForCausalLM",
    dict(hidden_size=D, num_hidden_layers=LAYERS, num_key_value_heads=KV, kv_channels=8, intermediate_size=FF,
         num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=CTX, tie_word_embeddings=False),
    "mixture of attention experts, MoE MLP")
# --- end


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every norm gain away from its neutral value and every norm / linear bias away from zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            name = type(mod).__name__
            w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
            if "Norm" in name:
                if isinstance(w, torch.nn.Parameter):
                    w.add_(0.5 * torch.randn(w.shape, generator=g))
                if isinstance(b, torch.nn.Parameter):
                    b.add_(0.3 * torch.randn(b.shape, generator=g))
            elif isinstance(mod, torch.nn.Linear) or name == "Conv1D":
                if isinstance(b, torch.nn.Parameter):
                    b.copy_(0.1 * torch.randn(b.shape, generator=g))


def build(name: str, tokenizer: Any) -> torch.nn.Module:
    """The seeded, perturbed HF model of configuration ``name`` (eager attention, eval mode, float32)."""
    import transformers as tr

    spec = SPECS[name]
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    if spec.config == "OPTConfig":
        common.pop("initializer_range")
        common["init_std"] = 0.2
    cfg = getattr(tr, spec.config)(**common, **spec.kwargs)
    cfg._attn_implementation = "eager"
    seed = sum(map(ord, name))
    torch.manual_seed(seed)
    model = getattr(tr, spec.model)(cfg).eval()
    _perturb(model, seed + 1)
    return model


def _base(hf: torch.nn.Module) -> torch.nn.Module:
    """The decoder of an HF causal LM (Llama 4's base_model_prefix names no attribute: its decoder is ``model``)."""
    return hf.base_model if hf.base_model is not hf else getattr(hf, "model", hf)


def hf_layers(hf: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of an HF causal LM."""
    base = _base(hf)
    for path in ("layers", "h", "decoder.layers", "blocks"):
        mod: Any = base
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, torch.nn.ModuleList):
            return mod
    raise AssertionError(f"no decoder blocks on {type(base).__name__}")


def hf_final_module(hf: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The first module after the last block: the final norm (``"norm"``), or, without one (OPT-350m), the module
    that reads the last block's output (``"project_out"``)."""
    base = _base(hf)
    for owner, attrs in ((base, ("norm", "ln_f", "final_layernorm", "final_layer_norm", "layer_norm",
                                 "final_norm", "norm_f")),
                         (getattr(base, "decoder", None), ("final_layer_norm", "project_out"))):
        for attr in attrs:
            mod = getattr(owner, attr, None) if owner is not None else None
            if isinstance(mod, torch.nn.Module):
                return mod, "project_out" if attr == "project_out" else "norm"
    raise AssertionError(f"no final norm on {type(base).__name__}")


BuildFn = Callable[[str, Any], torch.nn.Module]
