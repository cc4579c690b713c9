"""The architecture matrix: every configuration of :mod:`archs` booted with ``mi_lenses.load_model(folder)`` raw and in
compatibility mode, every feature checked against the Hugging Face model alone (:mod:`arch_oracle`).

``EXPECTED`` is the expectation table (configuration x mode x feature -> ``"ok"``, a note, a refusal, or a refusal
by the load-time parity probe); ``tests/test_architectures.py`` asserts every cell and ``scripts/support_table.py``
renders it as ``docs/architectures.md`` (a test keeps the committed page equal to the table).

Outcomes are strings: ``"ok"``; ``"note: <text>"`` (the feature gives its result and says why a part of it is not
available, never an exception); ``"refused: <text>"`` (``load_model`` raises a ``ModelLoadError`` naming the cause);
``"probe: <text>"`` (TransformerLens's own bridge disagrees with the HF model: the load-time parity probe refuses it,
or falls back to raw for a compatibility-mode-only breakage).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import arch_oracle as O
from archs import SPECS, build
from tolerance import EPS

FEATURES = ("logit lens", "tuned lens", "DLA heads", "DLA MLPs", "DLA neurons", "DLA sources", "Patchscope",
            "attention patterns", "q·k terms")
MODES = ("raw", "compat")
PROMPT = "The capital of France is Paris"
ANSWER, WRONG = "Paris", " city"  # single tokens of the tiny tokenizer
TOL = 2048 * EPS

# ------------------------------------------------------------------------------------------------ expectations
# TransformerLens cannot wrap these at all: load_model raises ModelLoadError naming TransformerLens and the cause.
REFUSED = {"biogpt": "TransformerLens 4.3 has no adapter for BioGPT"}
REFUSED_MATCH = {"biogpt": "Could not determine supported architecture"}  # what the ModelLoadError must say

# TransformerLens's own bridge disagrees with the HF model here (measured by this matrix): the load-time parity probe
# (mi_lenses.models.parity) refuses the model, or falls back to raw where only compatibility mode breaks; the cells
# assert that refusal / fallback. PARITY_PROBE = False turns them into expected failures (a TL world without the probe).
PARITY_PROBE = True
EXPECT_PROBE = {
    ("qwen2_moe_square", "compat"): "compatibility mode cannot fold the ln2 gain of a shared expert as wide as "
                                    "d_model (a square matrix): load_model falls back to raw",
    ("gemma3_attn_softcap", "raw"): "TransformerLens ignores Gemma 3's attn_logit_softcapping",
    ("gemma3_attn_softcap", "compat"): "TransformerLens ignores Gemma 3's attn_logit_softcapping",
    ("codegen", "raw"): "the first forward fails: the CodeGen adapter reads attn.embed_positions (gone in "
                        "transformers 5.24)",
    ("codegen", "compat"): "the first forward fails: the CodeGen adapter reads attn.embed_positions (gone in "
                           "transformers 5.24)",
}

# Features that answer with a note (same in both modes unless the key names a mode).
NOTES: dict[tuple[str, str], str] = {
    ("bloom", "q·k terms"): "this model adds ALiBi position biases to q · k",
}


def expected(name: str, mode: str, feature: str) -> str:
    if name in REFUSED:
        return f"refused: {REFUSED[name]}"
    if (name, mode) in EXPECT_PROBE:
        return f"probe: {EXPECT_PROBE[(name, mode)]}"
    note = NOTES.get((name, feature, mode)) or NOTES.get((name, feature))  # type: ignore[call-overload]
    return f"note: {note}" if note else "ok"


def expected_table() -> dict[tuple[str, str, str], str]:
    return {(n, m, f): expected(n, m, f) for n in SPECS for m in MODES for f in FEATURES}


# ------------------------------------------------------------------------------------------------ the models
def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prev = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            return fn()
        finally:
            logging.getLogger().setLevel(prev)


@dataclass
class Entry:
    """One configuration: the untouched HF model (the oracle), its saved folder and what the oracles computed."""

    name: str
    hf: torch.nn.Module
    folder: Path
    tokens: torch.Tensor
    answer: int
    wrong: int
    memo: dict = field(default_factory=dict)

    def once(self, key: Any, fn: Callable[[], Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = fn()
        return self.memo[key]

    @property
    def run(self) -> O.HFRun:
        return self.once("run", lambda: O.hf_run(self.name, self.hf, self.tokens))

    @property
    def lens_rows(self) -> torch.Tensor:
        return self.once("rows", lambda: O.lens_rows(self.hf, self.tokens, self.run))


class Matrix:
    """Builds configurations on demand (each once) and boots each mode once."""

    def __init__(self, tokenizer: Any, root: Path):
        self.tok, self.root = tokenizer, Path(root)
        self.entries: dict[str, Entry] = {}
        self.models: dict[tuple[str, str], Any] = {}

    def entry(self, name: str) -> Entry:
        if name not in self.entries:
            hf = build(name, self.tok)
            folder = self.root / name
            _quiet(lambda: (hf.save_pretrained(folder), self.tok.save_pretrained(folder)))
            ids = self.tok(PROMPT)["input_ids"]
            a, w = (self.tok(t, add_special_tokens=False)["input_ids"] for t in (ANSWER, WRONG))
            assert len(a) == len(w) == 1
            self.entries[name] = Entry(name, hf, folder, torch.tensor([ids]), a[0], w[0])
        return self.entries[name]

    def model(self, name: str, mode: str) -> Any:
        """The booted bridge (or the ModelLoadError ``load_model`` raised, re-raised on every call)."""
        import mi_lenses

        key = (name, mode)
        if key not in self.models:
            entry = self.entry(name)
            try:
                self.models[key] = _quiet(lambda: mi_lenses.load_model(entry.folder,
                                                                      compatibility_mode=mode == "compat"))
            except mi_lenses.ModelLoadError as err:
                self.models[key] = err
        got = self.models[key]
        if isinstance(got, Exception):
            raise got
        return got


# ------------------------------------------------------------------------------------------------ the checks
def close(ours: Any, ref: Any, what: str, tol: float = TOL) -> None:
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _lens_against_rows(res: Any, entry: Entry, mode: str, what: str) -> None:
    res.verify()
    ours = res.logits[:, 0].double()  # [R, S, V]
    ref = entry.lens_rows
    assert ours.shape == ref.shape, f"{what}: rows {tuple(ours.shape)} vs oracle {tuple(ref.shape)}"
    close(ours.log_softmax(-1), ref.log_softmax(-1), f"{what} log-probs vs HF rows")
    if mode == "raw":  # compatibility mode centres W_U: logits agree up to a per-position constant
        close(ours, ref, f"{what} logits vs HF rows")


def check_logit_lens(m: Any, entry: Entry, mode: str) -> str:
    import mi_lenses

    res = mi_lenses.logit_lens(m, entry.tokens, top_k=5, return_logits=True)
    _lens_against_rows(res, entry, mode, "logit lens")
    return "ok"


def check_tuned_lens(m: Any, entry: Entry, mode: str) -> str:
    import mi_lenses

    lens = mi_lenses.TunedLens.from_model(m)  # zero init: the logit lens exactly
    res = lens(m, entry.tokens, top_k=5, return_logits=True)
    _lens_against_rows(res, entry, mode, "tuned lens (zero init)")
    ref = mi_lenses.logit_lens(m, entry.tokens, top_k=5)
    assert torch.equal(res.top_ids, ref.top_ids), "tuned lens (zero init) top ids differ from the logit lens"
    return "ok"


def _dla(m: Any, entry: Entry, mode: str) -> tuple[Any, O.DLAOracle]:
    import mi_lenses

    def run():
        res = mi_lenses.direct_logit_attribution(m, entry.tokens, answer=entry.answer, wrong=entry.wrong)
        oracle = O.dla_oracle(entry.name, entry.hf, entry.tokens, entry.run, entry.answer, entry.wrong,
                              value_bias_folded=mode == "compat" and entry.name not in O.VALUE_BIAS_KEPT)
        return res, oracle

    return entry.once(("dla", mode), run)


def check_dla_heads(m: Any, entry: Entry, mode: str) -> str:
    res, oracle = _dla(m, entry, mode)
    close(res.actual[0], oracle.logit_diff, "DLA: the attributed logit difference vs HF's")
    close(res.total[0], oracle.logit_diff, "DLA: the parts' sum vs HF's logit difference")
    close(res.heads[0], oracle.heads, "DLA per-head values vs the HF brute force")
    return "ok"


def check_dla_mlps(m: Any, entry: Entry, mode: str) -> str:
    res, oracle = _dla(m, entry, mode)
    close(res.mlps[0], oracle.mlps, "DLA per-MLP values vs the HF brute force")
    for l, ex in enumerate(oracle.experts):
        if ex is not None:
            assert res.experts is not None, "DLA: an MoE model without per-expert values"
            close(res.experts[0, l, : len(ex)], ex, f"DLA per-expert values of layer {l} vs the HF brute force")
    return "ok"


def check_dla_neurons(m: Any, entry: Entry, mode: str) -> str:
    res, oracle = _dla(m, entry, mode)
    for l, ref in enumerate(oracle.neurons):
        n = len(ref)
        assert res.neurons.shape[-1] >= n, f"DLA: {res.neurons.shape[-1]} neurons in layer {l}, the model has {n}"
        close(res.neurons[0, l, :n], ref, f"DLA per-neuron values of layer {l} vs the HF brute force")
        assert not res.neurons[0, l, n:].any(), f"DLA: padding neurons of layer {l} are not zero"
    return "ok"


def check_dla_sources(m: Any, entry: Entry, mode: str) -> str:
    res, oracle = _dla(m, entry, mode)
    close(res.sources[0].sum(-1), oracle.heads, "DLA source positions summed vs the HF per-head brute force")
    return "ok"


def check_patchscope(m: Any, entry: Entry, mode: str) -> str:
    import mi_lenses

    S = entry.tokens.shape[1]
    L = m.cfg.n_layers
    ref = entry.run.logits[-1].log_softmax(-1)
    for pos in (1, S - 1):
        res = mi_lenses.patchscope(m, mi_lenses.Source(entry.tokens, layers=list(range(L)), position=pos),
                                   mi_lenses.Target(entry.tokens, positions=pos), top_k=5, max_new_tokens=0)
        for r in range(L):
            close(res.top_logprobs[r], ref[res.top_ids[r]], f"identity Patchscope (layer {r}, position {pos}) vs HF")
        assert torch.equal(res.top_ids[:, 0], ref.argmax().repeat(L)), "identity Patchscope changed the top-1"
    return "ok"


def _attention(m: Any, entry: Entry, mode: str) -> Any:
    import mi_lenses

    return entry.once(("attn", mode), lambda: mi_lenses.attention(m, entry.tokens, induction_length=0))


def check_attention(m: Any, entry: Entry, mode: str) -> str:
    res = _attention(m, entry, mode)
    for l, a in enumerate(entry.run.attentions):
        close(res.patterns[0, l], a, f"attention pattern of layer {l} vs HF output_attentions", 128 * EPS)
    return "ok"


def check_qk(m: Any, entry: Entry, mode: str) -> str:
    from mi_lenses.attn.scores import causal_scores

    res = _attention(m, entry, mode)
    if res.qk_note:
        assert res.q is None, "a q·k note, but queries were kept"
        return f"note: {res.qk_note}"
    S = entry.tokens.shape[1]
    for l, a in enumerate(entry.run.attentions):
        # HF's pattern of scale q·k: its soft-cap, its mask (causal, sliding window, chunks), its learned sinks
        probs = O.hf_pattern(entry.hf, l, causal_scores(res.q[0, l], res.k[0, l], res.scale[l], S), a)
        close(probs, a, f"softmax(scale q·k) of layer {l} vs HF output_attentions", 128 * EPS)
        terms = res.qk_terms(l, 0, S - 1)
        ref = a[0:1, S - 1 :]
        close(O.hf_pattern(entry.hf, l, terms.products.sum(-1)[None, None], ref, slice(0, 1))[0, 0], ref[0, 0],
              f"q·k terms of L{l}H0 vs HF", 128 * EPS)
        close(terms.probs, ref[0, 0], f"q·k terms' probabilities of L{l}H0 vs HF", 128 * EPS)
    return "ok"


CHECKS: dict[str, Callable[[Any, Entry, str], str]] = {
    "logit lens": check_logit_lens,
    "tuned lens": check_tuned_lens,
    "DLA heads": check_dla_heads,
    "DLA MLPs": check_dla_mlps,
    "DLA neurons": check_dla_neurons,
    "DLA sources": check_dla_sources,
    "Patchscope": check_patchscope,
    "attention patterns": check_attention,
    "q·k terms": check_qk,
}


def outcome(matrix: Matrix, name: str, mode: str, feature: str) -> str:
    """What the cell gives now: ``"ok"``, ``"note: ..."``, ``"refused: ..."``; raises when a number is wrong."""
    import mi_lenses

    entry = matrix.entry(name)
    if (name, mode) in EXPECT_PROBE:
        return _probe_outcome(matrix, entry, name, mode, feature)
    try:
        m = matrix.model(name, mode)
    except mi_lenses.ModelLoadError as err:
        msg = str(err)
        assert "TransformerLens" in msg, f"the refusal does not name TransformerLens: {msg}"
        assert REFUSED_MATCH.get(name, "\0") in msg, f"the refusal does not name the cause: {msg}"
        return f"refused: {REFUSED.get(name, msg)}"
    return CHECKS[feature](m, entry, mode)


# ------------------------------------------------------------------------------------------------ the support page
MARK = {"ok": "✓"}
INTRO = """\
# Architectures

<!-- generated by scripts/support_table.py from the architecture matrix (tests/arch_matrix.py); do not edit -->

Every configuration below is a tiny random Hugging Face model (2 layers, tiny widths, every norm gain and bias
perturbed so that a forgotten gain, bias, multiplier or post-norm is visible) built in the test process, saved to a
folder and booted with `mi_lenses.load_model(folder)` raw (`compatibility_mode=False`) and in compatibility mode.
Each feature is checked against the Hugging Face model alone, never through TransformerLens:

- **logit lens**, **tuned lens**: every row against the HF model run with a forward pre-hook on its final norm that
  replaces the norm's input with the row's residual state, so whatever follows the norm (OPT-350m's `project_out`,
  `lm_head`, Cohere's `logit_scale`, Granite's `logits_scaling`, Gemma 2's soft-cap) is the model's own code; the
  tuned lens zero-initialised (it must equal the logit lens);
- **DLA heads / MLPs / neurons / sources**: the parts sum to HF's logit difference (`verify()`), and each head's,
  MLP's (each expert's) and neuron's value equals a brute force on the HF modules (the attention output projection
  and its input, the MLP's down projection, the MoE router and experts), carried to the logit through every norm on
  the way with its scale frozen; source positions sum to the brute-force heads;
- **Patchscope**: a state patched into its own run (every layer, two positions) changes nothing;
- **attention patterns**: against HF `output_attentions=True` (eager attention);
- **q·k terms**: `softmax(scale · q · k)` against HF's patterns, where the scores are `scale · q · k`.

✓: equal to the HF model within 2048 float32 roundings (2.4e-4; patterns 128, 1.5e-5). A note: the feature gives
its result and says why a part is missing (never an exception). *refused*: `load_model` raises `ModelLoadError` naming TransformerLens and the cause.
*probe*: TransformerLens's own bridge disagrees with the HF model; the load-time parity probe refuses it (or falls
back to raw where only compatibility mode breaks).
"""

CONVENTIONS = """\
## DLA conventions

Every norm between a component and the logit (the final norm, Gemma 2/3 and OLMo 2/3's sublayer post-norms,
OPT-350m's post-LN residual norms) is linearised with its scale frozen from the run, multipliers are applied where
the model applies them, and a mixture of experts is split per expert: see [dla.md](dla.md).
"""


def _cell(text: str, notes: list[str]) -> str:
    if text == "ok":
        return MARK["ok"]
    kind, _, why = text.partition(": ")
    if why not in notes:
        notes.append(why)
    return f"{kind} [{notes.index(why) + 1}]"


def render_table(table: dict[tuple[str, str, str], str]) -> str:
    """The architecture x mode x feature table (Markdown) of an outcome table, notes numbered below it."""
    notes: list[str] = []
    lines = ["| configuration | mode | " + " | ".join(FEATURES) + " |",
             "|---|---|" + "---|" * len(FEATURES)]
    for name, spec in SPECS.items():
        for mode in MODES:
            cells = [_cell(table[(name, mode, f)], notes) for f in FEATURES]
            label = f"`{name}` ({spec.model.replace('ForCausalLM', '').replace('LMHeadModel', '')}: {spec.note})" \
                if mode == "raw" else ""
            lines.append(f"| {label} | {mode} | " + " | ".join(cells) + " |")
    lines += [""] + [f"[{i + 1}] {n}" for i, n in enumerate(notes)]
    return "\n".join(lines) + "\n"


def render_page(table: dict[tuple[str, str, str], str], versions: str) -> str:
    return f"{INTRO}\n{versions}\n\n{render_table(table)}\n{CONVENTIONS}"


def _probe_outcome(matrix: Matrix, entry: Entry, name: str, mode: str, feature: str) -> str:
    """A cell TransformerLens's bridge gets wrong: with the parity probe, ``load_model`` refuses it (a
    ``ModelLoadError`` naming TransformerLens), or, where only compatibility mode breaks, returns a raw bridge (with
    a warning) on which the feature is right."""
    import mi_lenses

    want = f"probe: {EXPECT_PROBE[(name, mode)]}"
    try:
        m = matrix.model(name, mode)
    except mi_lenses.ModelLoadError as err:
        assert "TransformerLens" in str(err), f"the parity probe's refusal does not name TransformerLens: {err}"
        return want
    assert mode == "compat" and not getattr(m, "compatibility_mode", False), \
        "the parity probe let a bridge that disagrees with the HF model through"
    CHECKS[feature](m, entry, "raw")
    return want


# --- issue 26: state-space and hybrid
# Blocks that mix tokens without attention heads (SSM, linear attention, short convolution, RWKV time-mix; blocks
# TransformerLens wraps whole): checked against the HF modules alone (arch_oracle.hybrid_oracle). The lens, tuned lens
# and Patchscope cells run the checks above on the oracle's rows and logits.
from archs import HYBRID_SPECS

_NO_HEADS = "attention() refuses: the model has no attention heads TransformerLens exposes"
_MIXER_PART = "blocks without heads are one part each (Mixer{l}: SSM, linear attention, convolution, ...)"
_WHOLE = "TransformerLens wraps some blocks whole: their mixer and MLP are one part"
_SKIPPED = "blocks without attention heads are left out"
_NO_NEURONS = "some MLPs are one part (no neurons TransformerLens exposes)"
_HYBRID_NOTES = {
    "DLA heads": (_MIXER_PART, _MIXER_PART), "DLA sources": (_MIXER_PART, _MIXER_PART),
    "attention patterns": (_SKIPPED, _NO_HEADS), "q·k terms": (_SKIPPED, _NO_HEADS),
}
_NO_ATTN = {"mamba", "mamba2", "falcon_mamba", "rwkv", "recurrent_gemma", "nemotron_h", "zamba2"}
for _n in HYBRID_SPECS:
    for _f, (_some, _none) in _HYBRID_NOTES.items():
        NOTES[(_n, _f)] = _none if _n in _NO_ATTN else _some
for _n in ("recurrent_gemma", "zamba2"):
    NOTES[(_n, "DLA MLPs")] = _WHOLE
for _n in ("rwkv", "nemotron_h"):
    NOTES[(_n, "DLA neurons")] = _NO_NEURONS
NOTES[("olmo_hybrid", "q·k terms")] = ("the q·k terms are not available: block 1's bridge does not fire "
                                       "hook_rot_q/hook_rot_k (its queries and keys as they enter the scores)")


def _hybrid(entry: Entry) -> O.HybridOracle:
    """The HF oracle of a hybrid configuration; primes the lens rows and logits the generic checks read."""
    def run():
        oracle = O.hybrid_oracle(entry.name, entry.hf, entry.tokens, entry.answer, entry.wrong)
        entry.memo["rows"] = oracle.lens
        entry.memo["run"] = type("Run", (), {"logits": oracle.lens.new_tensor(0)})()
        with torch.no_grad():
            entry.memo["run"].logits = entry.hf(entry.tokens).logits[0].double()
        return oracle
    return entry.once("hybrid", run)


def _hybrid_dla(m: Any, entry: Entry, mode: str) -> tuple[Any, O.HybridOracle]:
    import mi_lenses

    oracle = _hybrid(entry)
    res = entry.once(("dla", mode), lambda: mi_lenses.direct_logit_attribution(
        m, entry.tokens, answer=entry.answer, wrong=entry.wrong, progress=False))
    return res, oracle


def _heads(res: Any, oracle: O.HybridOracle) -> torch.Tensor:
    """The oracle's heads in the result's shape (a model without attention has TransformerLens's n_heads)."""
    ref = torch.zeros(res.heads.shape[1:])
    ref[:, : oracle.heads.shape[1]] = oracle.heads
    return ref


def _dla_note(res: Any, text: str) -> str:
    return f"note: {text}" if res.mixer_kinds is not None and any(k != "heads" for k in res.mixer_kinds) else "ok"


def check_hybrid_heads(m: Any, entry: Entry, mode: str) -> str:
    res, oracle = _hybrid_dla(m, entry, mode)
    close(res.actual[0], oracle.logit_diff, "DLA: the attributed logit difference vs HF's")
    close(res.total[0], oracle.logit_diff, "DLA: the parts' sum vs HF's logit difference")
    close(res.heads[0], _heads(res, oracle), "DLA per-head values vs the HF brute force")
    mixers = res.mixers[0] if res.mixers is not None else torch.zeros(len(oracle.mixers))
    close(mixers, oracle.mixers, "DLA per-mixer values vs the HF mixer modules' outputs")
    return _dla_note(res, _MIXER_PART)


def check_hybrid_mlps(m: Any, entry: Entry, mode: str) -> str:
    res, oracle = _hybrid_dla(m, entry, mode)
    mlps = res.mlps[0] if res.mlps is not None else torch.zeros(len(oracle.mlps))
    close(mlps, oracle.mlps, "DLA per-MLP values vs the HF MLP modules' outputs")
    return f"note: {_WHOLE}" if any(k == "block" for k in res.mixer_kinds or []) else "ok"


def check_hybrid_neurons(m: Any, entry: Entry, mode: str) -> str:
    res, oracle = _hybrid_dla(m, entry, mode)
    whole = False
    for l, ref in enumerate(oracle.neurons):
        if ref is None:
            whole = whole or (res.mlps is not None and bool(res.mlps[0, l] != 0) and not res.neurons[0, l].any())
            continue
        close(res.neurons[0, l, : len(ref)], ref, f"DLA per-neuron values of layer {l} vs the HF brute force")
    return f"note: {_NO_NEURONS}" if whole else "ok"


def check_hybrid_sources(m: Any, entry: Entry, mode: str) -> str:
    res, oracle = _hybrid_dla(m, entry, mode)
    close(res.sources[0].sum(-1), _heads(res, oracle), "DLA source positions summed vs the HF per-head brute force")
    return _dla_note(res, _MIXER_PART)


def _hybrid_attention(m: Any, entry: Entry, mode: str) -> Any:
    import mi_lenses

    try:
        return _attention(m, entry, mode)
    except mi_lenses.LensInputError as err:
        assert "no attention heads" in str(err), f"attention() refused for another reason: {err}"
        return None


def check_hybrid_attention(m: Any, entry: Entry, mode: str) -> str:
    res, oracle = _hybrid_attention(m, entry, mode), _hybrid(entry)
    if res is None:
        return f"note: {_NO_HEADS}"
    assert res.layers == sorted(oracle.patterns), f"attention layers {res.layers} vs HF's {sorted(oracle.patterns)}"
    for i, l in enumerate(res.layers):
        close(res.patterns[0, i], oracle.patterns[l], f"attention pattern of layer {l} vs HF", 128 * EPS)
    if len(res.layers) == m.cfg.n_layers:  # heads in every block (Falcon-H1: beside the SSM)
        return "ok"
    assert res.notes, "blocks without heads were left out silently"
    return f"note: {_SKIPPED}"


def check_hybrid_qk(m: Any, entry: Entry, mode: str) -> str:
    from mi_lenses.attn.scores import causal_scores

    res, oracle = _hybrid_attention(m, entry, mode), _hybrid(entry)
    if res is None:
        return f"note: {_NO_HEADS}"
    if res.qk_note:
        return f"note: {res.qk_note}"
    S = entry.tokens.shape[1]
    for i, l in enumerate(res.layers):
        probs = causal_scores(res.q[0, i], res.k[0, i], res.scale[i], S).softmax(-1)
        close(probs, oracle.patterns[l], f"softmax(scale q·k) of layer {l} vs HF", 128 * EPS)
    return "ok" if len(res.layers) == m.cfg.n_layers else f"note: {_SKIPPED}"


def _route(feature: str, hybrid: Callable[[Any, Entry, str], str] | None) -> Callable[[Any, Entry, str], str]:
    plain = CHECKS[feature]

    def check(m: Any, entry: Entry, mode: str) -> str:
        if entry.name not in HYBRID_SPECS:
            return plain(m, entry, mode)
        _hybrid(entry)
        return (hybrid or plain)(m, entry, mode)
    return check


CHECKS.update({f: _route(f, h) for f, h in (
    ("logit lens", None), ("tuned lens", None), ("Patchscope", None), ("DLA heads", check_hybrid_heads),
    ("DLA MLPs", check_hybrid_mlps), ("DLA neurons", check_hybrid_neurons), ("DLA sources", check_hybrid_sources),
    ("attention patterns", check_hybrid_attention), ("q·k terms", check_hybrid_qk))})
# --- end

# --- issue 26: attention masks
# Llama 4's bridge (TL 4.3) never fires its rotated queries/keys hooks (complex rotary), nor has rotary angle hooks.
NOTES[("llama4_chunked", "q·k terms")] = ("the q·k terms are not available: block 0's bridge does not fire "
                                          "hook_rot_q/hook_rot_k (its queries and keys as they enter the scores)")
# --- end


# --- issue 26: MLA and MoE
# Laguna's and AFMoE's bridges (TL 4.3) register hook_rot_q / hook_cos but never fire them: no rotated queries/keys.
for _n in ("laguna", "afmoe"):
    NOTES[(_n, "q·k terms")] = ("the q·k terms are not available: block 0's bridge does not fire "
                                "hook_rot_q/hook_rot_k (its queries and keys as they enter the scores)")
# --- end


# --- issue 26: decoders and embeddings; bridges missing hooks
# Refused by name (mi_lenses.models.gaps): at load where nothing would be right, per analysis elsewhere. The error
# must name the architecture and TransformerLens (its version).
REFUSED["openai_gpt"] = ("TransformerLens 4.3's bridge has no blocks.*.hook_resid_post (every lens, DLA and "
                         "Patchscope read it)")
REFUSED_MATCH["openai_gpt"] = "OpenAIGPTLMHeadModel under TransformerLens 4.3"
REFUSED["modernbert_decoder"] = ("TransformerLens 4.3's bridge leaves out the prediction head before the decoder "
                                 "(its logits are 2-6 nats off)")
REFUSED_MATCH["modernbert_decoder"] = "ModernBertDecoderForCausalLM under TransformerLens 4.3"
_DLA = ("DLA heads", "DLA MLPs", "DLA neurons", "DLA sources")
FEATURE_REFUSED: dict[tuple[str, str], tuple[str, str]] = {}  # (config, feature) -> (table text, what the error says)
for _n, _arch, _why in (
        ("xglm", "XGLMForCausalLM", "DLA refused: the bridge has no hook_pos_embed"),
        ("gemma4", "Gemma4ForCausalLM", "DLA refused: per-layer attention geometry TransformerLens cannot split"),
        ("nanochat", "NanoChatForCausalLM", "DLA refused: the embeddings are normalised before block 0, the bridge's "
                                            "hook_embed is raw"),
        ("bitnet", "BitNetForCausalLM", "DLA refused: attn_sub_norm before o_proj (a head's output is not z W_O)"),
        ("falcon_h1", "FalconH1ForCausalLM", "DLA refused: the parts miss Falcon-H1's muP multipliers (0.36 off on "
                                             "this model)")):
    for _f in _DLA:
        FEATURE_REFUSED[(_n, _f)] = (_why, f"{_arch} under TransformerLens 4.3")
for _f in ("attention patterns", "q·k terms"):  # Falcon-H1: attention heads in every block (beside the SSM)
    del NOTES[("falcon_h1", _f)]
NOTES[("hunyuan", "q·k terms")] = ("the q·k terms are not available on HunYuanDenseV1ForCausalLM: Hunyuan normalises "
                                   "its queries and keys after the rotation, while the bridge's hook_rot_q/hook_rot_k "
                                   "hold them before that norm")
for _n in ("nanochat", "gemma4", "phimoe"):
    NOTES[(_n, "q·k terms")] = ("the q·k terms are not available: block 0's bridge does not fire "
                                "hook_rot_q/hook_rot_k (its queries and keys as they enter the scores)")
_expected_before_gaps = expected


def expected(name: str, mode: str, feature: str) -> str:  # noqa: F811  (extends the table above)
    if (name, feature) in FEATURE_REFUSED:
        return f"refused: {FEATURE_REFUSED[(name, feature)][0]}"
    return _expected_before_gaps(name, mode, feature)


_outcome_before_gaps = outcome


def outcome(matrix: Matrix, name: str, mode: str, feature: str) -> str:  # noqa: F811
    import mi_lenses

    if (name, feature) not in FEATURE_REFUSED:
        return _outcome_before_gaps(matrix, name, mode, feature)
    text, match = FEATURE_REFUSED[(name, feature)]
    try:
        _outcome_before_gaps(matrix, name, mode, feature)
    except mi_lenses.LensInputError as err:
        assert match in str(err), f"the refusal does not name the architecture and TransformerLens: {err}"
        return f"refused: {text}"
    raise AssertionError(f"{name} {feature}: mi_lenses did not refuse it")
# --- end

# Registered in TransformerLens 4.3 but not buildable here: transformers 5.25 has no config class for them (remote
# code only), so no tiny model can be built in-process; tests/test_architectures.py keeps that true.
NOT_BUILT = {"RWKV7ForCausalLM": "Rwkv7Config", "HyenaDNAForCausalLM": "HyenaDNAConfig"}
CONVENTIONS += (
    "\n## Not in the matrix\n\n"
    + "".join(f"- `{arch}`: registered by TransformerLens 4.3, but transformers 5.25 has no `{cfg}` (remote code "
              "only), so no tiny model can be built to check it against Hugging Face; untested.\n"
              for arch, cfg in NOT_BUILT.items()))
# --- end


# --- issue 26: the rest of the registry
NOTES[("mpt", "q·k terms")] = NOTES[("bloom", "q·k terms")]  # ALiBi
# JetMoE's mixture of attention experts: TransformerLens wraps the attention and the MoE MLP whole (no heads).
for _f, _text in (("DLA heads", _MIXER_PART), ("DLA sources", _MIXER_PART), ("DLA neurons", _NO_NEURONS),
                  ("attention patterns", _NO_HEADS), ("q·k terms", _NO_HEADS)):
    NOTES[("jetmoe", _f)] = _text
REFUSED["hrm_text"] = ("TransformerLens 4.3's bridge has no blocks (two recurrent stacks run several times a "
                       "forward) and no blocks.*.hook_resid_pre/post")
REFUSED_MATCH["hrm_text"] = "HrmTextForCausalLM under TransformerLens 4.3"
REFUSED["deepseek_v4"] = ("TransformerLens 4.3's bridge has no blocks.*.hook_resid_pre/post (hc_mult "
                          "residual streams mixed by hyper-connections) nor attention heads")
REFUSED_MATCH["deepseek_v4"] = "DeepseekV4ForCausalLM under TransformerLens 4.3"

# Registered in TransformerLens 4.3 without a transformers model class: remote-code checkpoints and
# TransformerLens's own formats (tests/test_architectures.py fails when transformers gains the class).
_REMOTE = "a remote-code checkpoint (trust_remote_code)"
REMOTE_ONLY = {
    "BaichuanForCausalLM": f"Baichuan 1/2: {_REMOTE}",
    "BaiChuanForCausalLM": f"Baichuan 1 (an older spelling): {_REMOTE}",
    "ExaoneForCausalLM": f"EXAONE 3.x: {_REMOTE}; transformers 5.25 has EXAONE 4 (in the matrix: "
                         "exaone4_window)",
    "InternLM2ForCausalLM": f"InternLM 2: {_REMOTE}",
    "OpenELMForCausalLM": f"Apple OpenELM: {_REMOTE}",
    "OuroForCausalLM": f"ByteDance Ouro (looped depth): {_REMOTE}",
    "QwenForCausalLM": f"Qwen (1): {_REMOTE}; Qwen 2 and later are in the matrix",
    "RavenForCausalLM": f"Huginn (depth-recurrent): {_REMOTE}",
    "MinGPTForCausalLM": "TransformerLens's own conversion of minGPT weights; no Hugging Face model",
    "NanoGPTForCausalLM": "TransformerLens's own conversion of nanoGPT weights; no Hugging Face model",
    "NeelSoluOldForCausalLM": "TransformerLens's own format of Neel Nanda's old SoLU models; no Hugging Face "
                              "model",
}
# TransformerLens's other spellings of an architecture in the matrix (the same adapter class).
ALIASED = {"Gemma1ForCausalLM": "GemmaForCausalLM", "NeoForCausalLM": "GPTNeoForCausalLM",
           "NeoXForCausalLM": "GPTNeoXForCausalLM", "MPTForCausalLM": "MptForCausalLM",
           "JetMoEForCausalLM": "JetMoeForCausalLM"}
CONVENTIONS += (
    "".join(f"- `{arch}`: registered by TransformerLens 4.3, but transformers 5.25 has no `{arch}`: {why}; "
            "untested.\n" for arch, why in REMOTE_ONLY.items())
    + "".join(f"- `{arch}`: TransformerLens 4.3's other name for `{target}` (the same adapter), checked "
              "in the matrix under that name.\n" for arch, target in ALIASED.items()))
# --- end
