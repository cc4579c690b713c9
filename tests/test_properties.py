"""Property tests: over randomly drawn tiny model configurations and prompts, every identity holds.

Configurations: GPT-2 (LayerNorm, biases, tied), Llama (RMSNorm, GQA ratio, tied or untied, with or without biases),
Qwen2 (q/k/v biases), GPT-NeoX (parallel attention), Gemma 2 (logit soft-cap, ``1 + w`` RMSNorm, post-norms); 1-3
layers, 2 or 4 heads, vocabularies of 320 or 450 tokens; raw or folded (compatibility mode); norm gains and biases
perturbed away from 1 and 0. Prompts: 1-4 prompts of random words and lengths.

Identities: the lens's final row equals the model's logits; a zero tuned lens is the logit lens; DLA's parts sum to
the logit difference, heads + b_O to the attention output, neurons + b_out to the MLP output, source positions to the
head (pre-norm architectures: Gemma 2's post-norms make a head's direct effect non-additive); writing a state back
into its own run changes nothing; KV-cached patched generation equals uncached; a ragged batch equals single runs.

Hypothesis runs derandomized (a fixed, reproducible set of examples in CI); ``MI_LENSES_HYPOTHESIS_EXAMPLES`` sets
how many.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from dataclasses import dataclass

import pytest
import torch

import mi_lenses
from oracles import close
from tiny import DOC_VOCAB_SIZE, VOCAB_SIZE, _perturb, _train_tokenizer, hook_counts

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402
from tolerance import EPS, TIGHT  # noqa: E402

EXAMPLES = int(os.environ.get("MI_LENSES_HYPOTHESIS_EXAMPLES", "30"))
WORDS = ("the capital of France is Paris a city quick brown fox jumps over lazy dog hello world lens layers tiny "
         "model reads numbers must be right Rome Berlin one two three four five six seven eight nine ten").split()


@dataclass(frozen=True)
class Spec:
    arch: str
    n_layers: int
    n_heads: int
    d_head: int
    n_kv: int
    tied: bool
    bias: bool
    softcap: float | None
    vocab: int
    mode: str
    seed: int


@st.composite
def specs(draw) -> Spec:
    arch = draw(st.sampled_from(["gpt2", "llama", "qwen2", "neox", "gemma2"]))
    n_heads = draw(st.sampled_from([2, 4]))
    gqa = arch in ("llama", "qwen2", "gemma2")
    return Spec(
        arch=arch,
        n_layers=draw(st.integers(1, 3)),
        n_heads=n_heads,
        d_head=draw(st.sampled_from([4, 8])),
        n_kv=draw(st.sampled_from([k for k in (1, 2, 4) if n_heads % k == 0])) if gqa else n_heads,
        tied=True if arch == "gpt2" else draw(st.booleans()),
        bias=draw(st.booleans()) if arch == "llama" else arch in ("gpt2", "neox", "qwen2"),
        softcap=draw(st.sampled_from([3.0, 30.0])) if arch == "gemma2" else None,
        vocab=draw(st.sampled_from([VOCAB_SIZE, DOC_VOCAB_SIZE])),
        mode=draw(st.sampled_from(["raw", "compat"])),
        seed=draw(st.integers(0, 2**16)),
    )


prompts = st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=9).map(" ".join), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {v: _train_tokenizer(tmp_path_factory.mktemp(f"tok{v}"), vocab_size=v) for v in (VOCAB_SIZE, DOC_VOCAB_SIZE)}


def _hf(spec: Spec, tok):
    import transformers as tr

    d = spec.n_heads * spec.d_head
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, initializer_range=0.2, tie_word_embeddings=spec.tied)
    rope = dict(num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv,
                hidden_size=d, intermediate_size=2 * d, max_position_embeddings=64)
    if spec.arch == "gpt2":
        cfg, cls = tr.GPT2Config(n_positions=64, n_ctx=64, n_embd=d, n_layer=spec.n_layers, n_head=spec.n_heads,
                                 **common), tr.GPT2LMHeadModel
    elif spec.arch == "llama":
        cfg, cls = tr.LlamaConfig(attention_bias=spec.bias, mlp_bias=spec.bias, **rope, **common), tr.LlamaForCausalLM
    elif spec.arch == "qwen2":
        cfg, cls = tr.Qwen2Config(**rope, **common), tr.Qwen2ForCausalLM
    elif spec.arch == "neox":
        rope.pop("num_key_value_heads")
        cfg, cls = tr.GPTNeoXConfig(use_parallel_residual=True, rotary_pct=0.5, **rope, **common), \
            tr.GPTNeoXForCausalLM
    else:
        cfg, cls = tr.Gemma2Config(head_dim=spec.d_head, final_logit_softcapping=spec.softcap,
                                   attn_logit_softcapping=None, query_pre_attn_scalar=spec.d_head, sliding_window=16,
                                   **rope, **common), tr.Gemma2ForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(spec.seed)
    model = cls(cfg).eval()
    _perturb(model, seed=spec.seed)
    return model


def _boot(spec: Spec, tok):
    from transformer_lens.model_bridge import TransformerBridge

    hf = _hf(spec, tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prev = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            model = TransformerBridge.boot_transformers(f"prop-{spec.arch}", hf_model=copy.deepcopy(hf),
                                                        tokenizer=tok, device="cpu")
            if spec.mode == "compat":
                model.enable_compatibility_mode(disable_warnings=True)
        finally:
            logging.getLogger().setLevel(prev)
    model.eval()
    with torch.no_grad():
        model.run_with_cache(model.to_tokens("the capital"))  # transformers' lazy hooks: the steady state
    return model, hf


@pytest.mark.slow  # dozens of freshly built models
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=specs(), texts=prompts)
# every architecture and both modes at least once, whatever the draw
@example(Spec("gemma2", 2, 4, 8, 2, False, False, 3.0, VOCAB_SIZE, "raw", 1), ["the capital of", "a city"])
# 17 tokens, one more than Gemma 2's sliding window here: the KV cache must keep every position (found by hypothesis)
@example(Spec("gemma2", 2, 2, 4, 1, False, False, 3.0, VOCAB_SIZE, "raw", 0), ["the the the the capital capital"])
@example(Spec("gemma2", 1, 2, 4, 1, True, False, 30.0, DOC_VOCAB_SIZE, "compat", 2), ["hello world"])
@example(Spec("llama", 3, 4, 4, 1, False, True, None, VOCAB_SIZE, "raw", 3), ["one two", "three four five six"])
@example(Spec("qwen2", 2, 4, 8, 2, True, True, None, DOC_VOCAB_SIZE, "raw", 4), ["Paris is a city", "Rome"])
@example(Spec("neox", 2, 2, 8, 2, False, True, None, VOCAB_SIZE, "compat", 5), ["the lazy dog"])
@example(Spec("gpt2", 2, 4, 4, 4, True, True, None, VOCAB_SIZE, "compat", 6), ["the quick brown fox", "lens"])
def test_every_identity_holds(tokenizers, spec, texts):
    tok = tokenizers[spec.vocab]
    m, hf = _boot(spec, tok)
    before = hook_counts(m)
    torch.set_num_threads(1)

    # the final row is the model's own output; against HF too
    res = mi_lenses.logit_lens(m, texts, top_k=3)  # verify() runs on the final row
    with torch.no_grad():
        hf_logits = hf(m.to_tokens(texts[0])).logits.double()
    n0 = len(res.str_tokens[0])
    final = (res.top_logits[-1, 0] - res.logsumexp[-1, 0][..., None])[:n0]
    close(final, hf_logits[0].log_softmax(-1).gather(-1, res.top_ids[-1, 0, :n0]), f"{spec} final row vs HF", 1024 * EPS)

    # a zero tuned lens is the logit lens
    zero = mi_lenses.TunedLens.from_model(m)(m, texts, top_k=3)
    assert torch.equal(zero.top_ids, res.top_ids)
    close(zero.kl, res.kl, f"{spec} zero tuned lens", TIGHT)

    # tuned-lens training: the closed-form KL gradient (fused, or from materialised soft-capped logits) == autograd
    from mi_lenses.lenses.tuned.train import _Objective

    obj, lens = _Objective(mi_lenses.ModelView(m)), mi_lenses.TunedLens.from_model(m)
    with torch.no_grad():
        lens.weight.copy_(torch.randn(lens.weight.shape, generator=torch.Generator().manual_seed(spec.seed)) * 0.1)
    hs = obj.hidden(m.to_tokens(texts[0]))
    tgt = obj.final(hs[-1])
    i = spec.seed % lens.n_layers
    kl = obj.layer_step(lens, i, hs[i], tgt, 1.0)
    grad = lens.weight.grad[i].clone()
    lens.zero_grad()
    logq = mi_lenses.ModelView(m).decode(lens.translate(hs[i], i)).log_softmax(-1)
    ref = torch.sum(tgt.p * (tgt.p.clamp_min(1e-30).log() - logq))
    ref.backward()
    close(kl, ref.item(), f"{spec} tuned-lens KL", 1024 * EPS)
    close(grad, lens.weight.grad[i], f"{spec} tuned-lens KL gradient", 1024 * EPS)

    # a ragged batch equals single runs
    for b, text in enumerate(texts):
        one = mi_lenses.logit_lens(m, text, top_k=3)
        n = len(one.str_tokens[0])
        assert torch.equal(res.top_ids[:, b, :n], one.top_ids[:, 0])
        close(res.kl[:, b, :n], one.kl[:, 0], f"{spec} ragged KL prompt {b}", 128 * EPS)

    # DLA: every identity (pre-norm architectures)
    if spec.arch != "gemma2":
        ids = m.to_tokens(texts[0])[0, -2:].tolist()
        mi_lenses.direct_logit_attribution(m, texts, answer=ids[-1], wrong=ids[0] if ids[0] != ids[-1] else None)

    # Patchscopes: a state written back into its own run changes nothing; cached generation == uncached
    tokens = m.to_tokens(texts[0])
    S = tokens.shape[1]
    with torch.no_grad():
        own = m(tokens)[0, -1].float().log_softmax(-1)
    layer = spec.seed % spec.n_layers
    src = mi_lenses.Source(tokens, layers=layer, position=S - 1)
    same = mi_lenses.patchscope(m, src, mi_lenses.Target(tokens, positions=S - 1), top_k=3)
    close(same.top_logprobs[0], own[same.top_ids[0]], f"{spec} self-patch", 1024 * EPS)
    target = mi_lenses.Target("the x is", placeholder="x")
    kw = dict(max_new_tokens=3, stop_at_eos=False, patch_every_step=bool(spec.seed % 2))
    cached = mi_lenses.patchscope(m, src, target, use_kv_cache=True, **kw)
    plain = mi_lenses.patchscope(m, src, target, use_kv_cache=False, **kw)
    assert torch.equal(cached.generated_ids, plain.generated_ids), spec
    assert hook_counts(m) == before
