"""Loading: the parity probe (``mi_lenses.models.parity``), ``compatibility_mode="auto"`` and bfloat16 end to end.

The probe compares TransformerLens's model with the Hugging Face model; here the oracle of each case is computed
independently in the test (the HF model alone, and a bridge booted directly with ``TransformerBridge``), so a test
asserts a refusal exactly where TransformerLens really disagrees with Hugging Face, and a pass where it does not (a
TransformerLens release that fixes a bug turns the refusal into a pass, not into a failing test):

* healthy models (tiny GPT-2 and Llama) pass in raw and compatibility mode;
* a Qwen2-MoE whose shared expert is as wide as the residual stream: TransformerLens 4.3's compatibility mode misfolds
  it, so ``load_model`` falls back to raw with a warning;
* Gemma 3 with ``attn_logit_softcapping`` (ignored by TransformerLens 4.3's adapter): refused in both modes;
* CodeGen (TransformerLens 4.3's bridge reads ``attn.embed_positions``, gone in transformers 5.24): refused;
* a bridge a user booted and then changed (one weight perturbed) is refused at the first entry point, and accepted
  after ``skip_parity``; a model built in memory warns once; a user's hooks defer the probe; the opt-outs work;
* bfloat16 weights: every lens / DLA / attention statistic is float32 and within stated tolerances of the float32
  model.

Cost on the 2-core machine: ~25 s (about 30 loads of tiny models).
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

import mi_lenses
from mi_lenses import LensInputError, ModelLoadError
from mi_lenses.models import loading, parity
from tiny import PROMPT, PROMPTS, _perturb
from tolerance import EPS

D, FF, CTX = 32, 48, 64


# ------------------------------------------------------------------------------------------------ tiny models
def _config(name: str, tok):
    import transformers as tr

    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, initializer_range=0.2)
    llama_like = dict(hidden_size=D, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=CTX)
    if name == "qwen2_moe":  # shared expert as wide as d_model: TL 4.3 cannot fold its ln2 (a square matrix)
        return tr.Qwen2MoeConfig(**llama_like, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                 shared_expert_intermediate_size=D, tie_word_embeddings=False, **common), \
            tr.Qwen2MoeForCausalLM
    if name == "gemma3_softcap":
        return tr.Gemma3TextConfig(**llama_like, head_dim=8, query_pre_attn_scalar=8, sliding_window=CTX,
                                   attn_logit_softcapping=2.0, tie_word_embeddings=True, **common), \
            tr.Gemma3ForCausalLM
    if name == "codegen":
        return tr.CodeGenConfig(n_embd=D, n_layer=2, n_head=4, n_positions=CTX, n_ctx=CTX, rotary_dim=4, n_inner=FF,
                                tie_word_embeddings=False, **common), tr.CodeGenForCausalLM
    raise ValueError(name)


@pytest.fixture(scope="module")
def folder_of(builder, tmp_path_factory):
    """``folder_of(name)``: a saved tiny HF model (the five test architectures of ``tiny``, or a config above)."""
    made: dict[str, object] = {}
    root = tmp_path_factory.mktemp("loading")

    def get(name: str):
        if name not in made:
            if name in ("gpt2", "llama_gqa", "llama_tied"):
                model = builder.hf(name)
            else:
                cfg, cls = _config(name, builder.tok)
                torch.manual_seed(sum(map(ord, name)))
                model = cls(cfg).eval()
                _perturb(model, seed=7)
            folder = root / name
            model.save_pretrained(folder)
            builder.tok.save_pretrained(folder)
            made[name] = folder
        return made[name]

    return get


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def _boot(folder, hf=None, compat: bool = False, name: str | None = None):
    """A bridge booted directly with TransformerLens, as a user would (no mi_lenses involved)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(name or str(folder), hf_model=hf if hf is not None else _hf(folder),
                                                     tokenizer=AutoTokenizer.from_pretrained(folder), device="cpu")
        if compat:
            bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge.eval()


def _oracle_gap(folder, compat: bool) -> float:
    """The test's own measure of TransformerLens vs Hugging Face: max |Δ log p| over a prompt (inf: TL cannot run it)."""
    hf = _hf(folder)
    tokens = torch.tensor([[0, 17, 42, 99, 150, 200, 250, 300, 33, 5]])
    with torch.no_grad():
        ref = hf(tokens).logits.log_softmax(-1)
        try:
            bridge = _boot(folder, copy.deepcopy(hf), compat)
            out = bridge(tokens).log_softmax(-1)
        except Exception:  # noqa: BLE001  (TL cannot boot or run it)
            return float("inf")
    return float((out - ref).abs().max())


def _mi_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("mi_lenses:")]


# ------------------------------------------------------------------------------------------------ the probe
@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("mode", ["raw", "compat"])
def test_healthy_model_passes_in_both_modes(folder_of, arch, mode, monkeypatch):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = mi_lenses.load_model(folder_of(arch), compatibility_mode=mode == "compat")
    assert not _mi_warnings(record)
    report = mi_lenses.parity_report(model)
    assert report.checked and report.passed and report.oracle == "load_model"
    assert report.variant == mode and report.tokens == 8 and report.gap < 1024 * EPS and report.top1_agreement == 1.0
    assert bool(model.compatibility_mode) == (mode == "compat")
    # the oracle: the model load_model returned equals the HF model alone
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        gap = (model(tokens).log_softmax(-1) - _hf(folder_of(arch))(tokens).logits.log_softmax(-1)).abs().max()
    assert float(gap) < 1024 * EPS
    # entry points trust what load_model checked: no second probe
    monkeypatch.setattr(parity, "check_parity", lambda *a, **k: pytest.fail("probed twice"))
    mi_lenses.logit_lens(model, PROMPT)


def test_compat_only_bug_falls_back_to_raw(folder_of):
    folder = folder_of("qwen2_moe")
    raw_gap, compat_gap = _oracle_gap(folder, compat=False), _oracle_gap(folder, compat=True)
    assert raw_gap < 1024 * EPS
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = mi_lenses.load_model(folder)  # default: compatibility mode (a tiny model)
    notes = _mi_warnings(record)
    report = mi_lenses.parity_report(model)
    assert report.passed and report.gap < 1024 * EPS
    if compat_gap <= parity.TOLERANCE[torch.float32]:  # a TransformerLens that folds it right keeps compat mode
        assert model.compatibility_mode and not notes
        return
    assert compat_gap > 0.5  # TransformerLens 4.3: ~1.7 nats
    assert not model.compatibility_mode and report.variant == "raw"
    assert len(notes) == 1
    for part in ("TransformerLens", "'qwen2_moe'", "loaded in raw mode", "compatibility mode", "nats", "report it"):
        assert part in notes[0], (part, notes[0])
    gap = float(re.search(r"by up to ([0-9.]+) nats", notes[0]).group(1))
    assert gap > 0.5  # the probe's own prompt shows the bug as clearly as the oracle's
    # raw requested: no fallback, no warning
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        raw = mi_lenses.load_model(folder, compatibility_mode=False)
    assert not _mi_warnings(record) and mi_lenses.parity_report(raw).passed


@pytest.mark.parametrize("mode", ["raw", "compat"])
def test_gemma3_attention_softcap_is_refused(folder_of, mode):
    folder = folder_of("gemma3_softcap")
    oracle = _oracle_gap(folder, compat=mode == "compat")
    if oracle <= parity.TOLERANCE[torch.float32]:  # a TransformerLens that applies the cap
        assert mi_lenses.parity_report(mi_lenses.load_model(folder, compatibility_mode=mode == "compat")).passed
        return
    with pytest.raises(ModelLoadError) as err:
        mi_lenses.load_model(folder, compatibility_mode=mode == "compat")
    msg = str(err.value)
    for part in ("TransformerLens 4", "'gemma3_text'", "disagrees with the Hugging Face model", "nats", "report it",
                 "refuses"):
        assert part in msg, (part, msg)
    if mode == "compat":
        assert "Raw and compatibility mode are both wrong" in msg
    gap = float(re.search(r"differ by up to ([0-9.]+) nats", msg).group(1))
    assert gap > 0.3
    # the explicit opt-out loads it anyway, and records that it was not checked
    model = mi_lenses.load_model(folder, compatibility_mode=mode == "compat", check_parity=False)
    assert mi_lenses.parity_report(model).oracle == "skipped" and not mi_lenses.parity_report(model).checked


@pytest.mark.parametrize("mode", ["raw", "compat"])
def test_codegen_is_refused_when_it_cannot_run(folder_of, mode):
    folder = folder_of("codegen")
    if _oracle_gap(folder, compat=mode == "compat") < parity.TOLERANCE[torch.float32]:
        return  # a TransformerLens that runs CodeGen under this transformers
    with pytest.raises(ModelLoadError) as err:
        mi_lenses.load_model(folder, compatibility_mode=mode == "compat")
    msg = str(err.value)
    for part in ("TransformerLens", "'codegen'", "cannot run it", "first forward pass", "report it"):
        assert part in msg, (part, msg)


# ------------------------------------------------------------------------------------------------ a user's model
def test_user_bridge_changed_after_boot_is_refused_at_entry_points(folder_of):
    folder = folder_of("llama_gqa")
    healthy = _boot(folder)
    mi_lenses.logit_lens(healthy, PROMPT)
    report = mi_lenses.parity_report(healthy)
    assert report.checked and report.passed and report.oracle == str(folder) and report.gap < 1024 * EPS

    bridge = _boot(folder)
    weight = next(p for n, p in bridge.named_parameters() if "layers.1" in n and "down_proj" in n)
    with torch.no_grad():
        weight.add_(0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    for call in (lambda: mi_lenses.logit_lens(bridge, PROMPT),
                 lambda: mi_lenses.direct_logit_attribution(bridge, PROMPT, answer=" city"),  # refused again
                 lambda: mi_lenses.load_model(bridge)):
        with pytest.raises(ModelLoadError) as err:
            call()
        msg = str(err.value)
        for part in ("TransformerLens", "'llama'", "TransformerBridge", "nats", "skip_parity"):
            assert part in msg, (part, msg)
    assert mi_lenses.parity_report(bridge).gap > 0.01
    mi_lenses.skip_parity(bridge)  # the weights were changed on purpose
    mi_lenses.logit_lens(bridge, PROMPT).verify()


def test_model_built_in_memory_warns_once_and_can_be_checked(folder_of, builder):
    hf = builder.hf("gpt2")  # built from its config: no folder to reload it from
    bridge = _boot(folder_of("gpt2"), copy.deepcopy(hf), name="not/on-disk")
    with pytest.warns(UserWarning, match="could not compare this 'gpt2' model with Hugging Face"):
        mi_lenses.ModelView(bridge)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        mi_lenses.logit_lens(bridge, PROMPT)
    assert not _mi_warnings(record)
    with pytest.raises(LensInputError, match="untouched copy"):
        mi_lenses.check_parity(bridge, hf_model=bridge.original_model)
    report = mi_lenses.check_parity(bridge, hf_model=hf)
    assert report.checked and report.passed and report.oracle == "hf_model"


def test_user_hooks_defer_the_probe(folder_of):
    bridge = _boot(folder_of("llama_tied"))
    bridge.add_hook("blocks.0.hook_resid_pre", lambda x, hook: x * 1.5)  # a user's ablation, left on
    with torch.no_grad():
        mi_lenses.ModelView(bridge)
    assert mi_lenses.parity_report(bridge) is None  # not probed through the user's hook
    bridge.reset_hooks()
    mi_lenses.ModelView(bridge)
    assert mi_lenses.parity_report(bridge).passed and mi_lenses.parity_report(bridge).checked


def test_environment_opt_out(folder_of, monkeypatch):
    bridge = _boot(folder_of("llama_tied"))
    with torch.no_grad():
        next(p for n, p in bridge.named_parameters() if "down_proj" in n).mul_(3.0)  # would be refused
    monkeypatch.setenv(parity.ENV, "0")
    mi_lenses.logit_lens(bridge, PROMPT)
    assert mi_lenses.parity_report(bridge) is None


# ------------------------------------------------------------------------------------------------ auto mode, bf16
def test_auto_compat_mode(folder_of, monkeypatch):
    folder = folder_of("llama_tied")
    assert mi_lenses.load_model(folder).compatibility_mode  # small float32 model: folded
    monkeypatch.setattr(loading, "AUTO_COMPAT_MAX_BYTES", 1024)
    with pytest.warns(UserWarning, match="without TransformerLens's compatibility mode"):
        big = mi_lenses.load_model(folder)
    assert not big.compatibility_mode and mi_lenses.parity_report(big).passed
    assert mi_lenses.load_model(folder, compatibility_mode=True).compatibility_mode  # asked for: folded
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        low = mi_lenses.load_model(folder, dtype=torch.bfloat16)
    assert not low.compatibility_mode and not _mi_warnings(record)  # bf16: raw, the HF modules themselves
    assert mi_lenses.parity_report(low).gap == 0.0
    with pytest.raises(ModelLoadError, match="compatibility_mode must be"):
        mi_lenses.load_model(folder, compatibility_mode="yes")


def _nan_max(a: torch.Tensor) -> float:
    return float(torch.nan_to_num(a.abs(), nan=0.0).max())


def _close(low: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> bool:
    """``|low - ref| <= atol + rtol |ref|`` wherever ``ref`` is a number (padding is NaN in both)."""
    ok = (low - ref).abs() <= atol + rtol * ref.abs()
    return bool((ok | ref.isnan()).all())


@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2"])
def test_bfloat16_end_to_end(folder_of, arch):
    """Every statistic of a bfloat16 model is float32 and close to the float32 model's (tolerances below); the
    automatic self-checks pass at the bfloat16 tolerances."""
    folder = folder_of(arch)
    models = {dt: mi_lenses.load_model(folder, dtype=dt, compatibility_mode=False)
              for dt in (torch.float32, torch.bfloat16)}
    assert next(models[torch.bfloat16].parameters()).dtype == torch.bfloat16
    out = {}
    for dt, m in models.items():
        lens = mi_lenses.logit_lens(m, PROMPTS, targets=[" city"], top_k=3).verify()
        dla = mi_lenses.direct_logit_attribution(m, PROMPTS, answer=" city", wrong="Paris").verify()
        attn = mi_lenses.attention(m, PROMPT).verify()
        out[dt] = (lens, dla, attn)
    (l32, d32, a32), (l16, d16, a16) = out[torch.float32], out[torch.bfloat16]
    for t in (l16.kl, l16.entropy, l16.target_logprobs, l16.top_logits, d16.heads, d16.neurons, d16.total,
              a16.patterns):
        assert t.dtype == torch.float32
    # nats: 0.05 + 5 % (the tiny models' logits spread over ~20 nats, so bfloat16's 8-bit rounding shows)
    for a, b in ((l16.kl, l32.kl), (l16.entropy, l32.entropy), (l16.target_logprobs, l32.target_logprobs)):
        assert _close(a, b, 0.05, 0.05), _nan_max(a - b)
    margin = l32.top_logits[..., 0] - l32.top_logits[..., 1]  # top-1 ids agree wherever fp32 has a clear winner
    clear = torch.nan_to_num(margin, nan=0.0) > 0.3
    assert torch.equal(l16.top_ids[..., 0][clear], l32.top_ids[..., 0][clear])
    scale = float(d32.total.abs().max())
    assert _nan_max(d16.total - d32.total) < 0.05 * scale
    assert _nan_max(d16.heads - d32.heads) < 0.05 * scale and _nan_max(d16.neurons - d32.neurons) < 0.05 * scale
    assert _nan_max(a16.patterns - a32.patterns) < 0.05


def test_converting_a_model_leaves_the_root_logger_alone():
    """While TransformerLens converts a model its notices below ERROR are held back; the root logger's level and
    every other record are untouched, and nothing is left installed afterwards. (TransformerLens 3.x logs through
    the root logger's module functions, so its records are recognised by the file they come from.)"""
    import logging

    import transformer_lens

    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    root = logging.getLogger()
    level, filters, tl_level = root.level, list(root.filters), logging.getLogger("transformer_lens").level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    tl_code = compile("logging.warning('tl notice'); logging.error('tl error')", transformer_lens.__file__, "exec")
    try:
        with loading._quiet_transformer_lens():
            assert root.level == logging.INFO
            exec(tl_code, {"logging": logging})  # as if TransformerLens's own code logged it
            logging.warning("another library's warning")
            logging.getLogger("transformer_lens.loading").warning("tl named")
        exec(tl_code, {"logging": logging})
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert records == ["tl error", "another library's warning", "tl notice", "tl error"]
    assert root.filters == filters and logging.getLogger("transformer_lens").level == tl_level


def test_only_transformer_lens_errors_are_reported_as_its_own():
    """``_transformer_lens_fails`` (around each TransformerLens call of the loading code, and nothing else) turns
    what the call raises into a ModelLoadError naming TransformerLens, with the cause kept."""
    with pytest.raises(ModelLoadError, match=r"TransformerLens cannot wrap this model \(architecture 'x'\): .*no "
                                             "adapter") as err:
        with loading._transformer_lens_fails("wrap this model (architecture 'x')"):
            raise KeyError("no adapter for this architecture")
    assert isinstance(err.value.__cause__, KeyError)
