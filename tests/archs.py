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


def hf_layers(hf: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of an HF causal LM."""
    base = hf.base_model
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
    base = hf.base_model
    for owner, attrs in ((base, ("norm", "ln_f", "final_layernorm", "final_layer_norm")),
                         (getattr(base, "decoder", None), ("final_layer_norm", "project_out"))):
        for attr in attrs:
            mod = getattr(owner, attr, None) if owner is not None else None
            if isinstance(mod, torch.nn.Module):
                return mod, "project_out" if attr == "project_out" else "norm"
    raise AssertionError(f"no final norm on {type(base).__name__}")


BuildFn = Callable[[str, Any], torch.nn.Module]
