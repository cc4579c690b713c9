"""Tiny random causal LMs of several architectures, booted offline as TransformerBridges (shared by the test
fixtures in ``tests/conftest.py`` and the doctest namespace in the root ``conftest.py``).

Everything is built in the test process (no hub access): a small byte-level BPE tokenizer trained on a few sentences,
and five seeded HF architectures that together cover LayerNorm & RMSNorm, MHA & GQA, tied & untied unembeddings,
with & without biases, sequential & parallel attention:

=============  =========  =====  ======  ==========================  ======  =====
arch           norm       attn   tied    biases                      layers  eps
=============  =========  =====  ======  ==========================  ======  =====
gpt2           LayerNorm  MHA    tied    everywhere                  2       1e-3
llama_gqa      RMSNorm    GQA    untied  none                        3       1e-6
llama_tied     RMSNorm    GQA    tied    none                        2       2e-2
qwen2          RMSNorm    GQA    untied  q/k/v                       2       1e-6
neox           LayerNorm  MHA    untied  everywhere, parallel attn   2       1e-5
=============  =========  =====  ======  ==========================  ======  =====

The large eps of llama_tied makes a decode that uses the wrong epsilon visibly wrong on the embedding row.

Every norm gain is perturbed away from 1 and every norm bias away from 0 before booting, so a decode that forgets the
final norm's gain or bias on a raw (unfolded) bridge is wrong by far more than any tolerance used in the tests.

``TransformerBridge.boot_transformers(..., hf_model=m)`` rewires ``m`` in place, and ``enable_compatibility_mode``
rewrites its weights, so every bridge gets its own deep copy and ``TinyModel.hf`` is an untouched copy used as the
independent oracle.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch

ARCHS = ("gpt2", "llama_gqa", "llama_tied", "qwen2", "neox")
MODES = ("raw", "compat")

CORPUS = [
    "The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog.",
    "A tiny model reads a tiny sentence about lenses and layers.",
    "Hello world, hello lens! Numbers must be right.",
    "Paris is a city; Rome is a city; Berlin is a city too.",
    "one two three four five six seven eight nine ten",
]
VOCAB_SIZE = 320
DOC_VOCAB_SIZE = 450  # the doctest model's tokenizer: " Paris", " capital", " brown" ... are single tokens

# Prompts used across the tests (all tokenize to several tokens with the tokenizer below).
PROMPT = "The capital of France is Paris"
PROMPTS = ["The quick brown fox", "Hello world, hello lens! The capital", "A city"]


@dataclass
class TinyModel:
    """One booted bridge plus what the oracles need."""

    arch: str
    mode: str  # "raw" or "compat"
    model: Any  # TransformerBridge
    hf: Any  # untouched deep copy of the HF model (eager attention, eval mode)
    tokenizer: Any

    @property
    def compat(self) -> bool:
        return self.mode == "compat"

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.mode}"

    def __repr__(self) -> str:  # keep pytest output short
        return f"TinyModel({self.id})"


# --------------------------------------------------------------------------------------------- tokenizer
def _train_tokenizer(folder, vocab_size: int = VOCAB_SIZE) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", add_bos_token=True
    )
    # TransformerLens re-loads the tokenizer from `name_or_path` (with add_bos_token=True): give it a local folder.
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(str(folder))


# --------------------------------------------------------------------------------------------- models
def _hf_config(arch: str, tok: Any):
    import transformers as tr

    common = dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.2,  # large init: logits with real spread, so top-k and ranks are well separated
    )
    if arch == "gpt2":
        cfg = tr.GPT2Config(
            n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=True, layer_norm_epsilon=1e-3,
            **common
        )
        return cfg, tr.GPT2LMHeadModel
    if arch == "llama_gqa":
        cfg = tr.LlamaConfig(
            hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
            tie_word_embeddings=False, max_position_embeddings=64, rms_norm_eps=1e-6, **common,
        )
        return cfg, tr.LlamaForCausalLM
    if arch == "llama_tied":
        cfg = tr.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, max_position_embeddings=64, rms_norm_eps=2e-2, **common,
        )
        return cfg, tr.LlamaForCausalLM
    if arch == "qwen2":
        cfg = tr.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False, max_position_embeddings=64, **common,
        )
        return cfg, tr.Qwen2ForCausalLM
    if arch == "neox":
        cfg = tr.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            use_parallel_residual=True, tie_word_embeddings=False, rotary_pct=0.5, max_position_embeddings=64, **common,
        )
        return cfg, tr.GPTNeoXForCausalLM
    raise ValueError(arch)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every norm gain away from 1 and every norm / linear bias away from 0 (non-trivial folded weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm) or "RMSNorm" in type(mod).__name__:
                mod.weight.copy_(1.0 + 0.5 * torch.randn(mod.weight.shape, generator=g))
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=g))
            elif isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
            elif type(mod).__name__ == "Conv1D":  # GPT-2's linear layers
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))


def hook_counts(model: Any) -> dict[str, int]:
    """Number of hooks of every kind on the model: TL HookPoint handles and raw torch module hooks.

    A TransformerBridge's ``hook_dict`` holds its HookPoints (``fwd_hooks``/``bwd_hooks`` lists of TL handles); the
    torch dicts catch anything registered around TL (e.g. ``register_forward_hook`` on a block). The HF modules inside
    a bridge carry transformers' own output-capturing hooks after the first forward (see ``_Builder.get``): compare
    with a snapshot taken before the call under test, not with zero.
    """
    counts: dict[str, int] = {}
    for name, hp in model.hook_dict.items():
        n = len(getattr(hp, "fwd_hooks", [])) + len(getattr(hp, "bwd_hooks", []))
        if n:
            counts[f"hookpoint:{name}"] = n
    for name, mod in model.named_modules():
        n = (
            len(mod._forward_hooks)
            + len(mod._forward_pre_hooks)
            + len(mod._backward_hooks)
            + len(getattr(mod, "_backward_pre_hooks", {}))
        )
        if n:
            counts[f"module:{name or '<root>'}"] = n
    return counts


class _Builder:
    def __init__(self, tok: Any):
        self.tok = tok
        self.base: dict[str, torch.nn.Module] = {}
        self.built: dict[tuple[str, str], TinyModel] = {}

    def hf(self, arch: str) -> torch.nn.Module:
        if arch not in self.base:
            cfg, cls = _hf_config(arch, self.tok)
            cfg._attn_implementation = "eager"  # the bridge forces eager; keep the oracle on the same kernel
            torch.manual_seed(1234 + ARCHS.index(arch))
            model = cls(cfg).eval()
            _perturb(model, seed=99 + ARCHS.index(arch))
            self.base[arch] = model
        return self.base[arch]

    def get(self, arch: str, mode: str) -> TinyModel:
        key = (arch, mode)
        if key not in self.built:
            from transformer_lens.model_bridge import TransformerBridge

            base = self.hf(arch)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prev = logging.getLogger().level
                logging.getLogger().setLevel(logging.ERROR)
                try:
                    bridge = TransformerBridge.boot_transformers(
                        f"mi-lenses-tests/tiny-{arch}", hf_model=copy.deepcopy(base), tokenizer=self.tok, device="cpu"
                    )
                    if mode == "compat":
                        bridge.enable_compatibility_mode(disable_warnings=True)
                finally:
                    logging.getLogger().setLevel(prev)
            bridge.eval()
            # The parity probe against the untouched HF twin (entry points would otherwise warn that a model built in
            # memory cannot be checked): the bridges of the tests are checked like the ones load_model makes.
            import mi_lenses

            mi_lenses.check_parity(bridge, hf_model=base)
            # One forward first: transformers 5 installs its output-capturing hooks on the HF submodules lazily, on
            # the first forward, and keeps them. They are part of the model's steady state, not a leak of ours.
            with torch.no_grad():
                bridge.run_with_cache(bridge.to_tokens(PROMPT))
            self.built[key] = TinyModel(arch, mode, bridge, base, self.tok)
        return self.built[key]


