"""The lenses of issue 13 against their defining identities and independent oracles: the engine's ``ahead``
reference, the Jacobian lens (TransformerLens 4.3's own fit and readout, ``torch.autograd.functional.jacobian``),
the linear Future Lens, the attribute lens (LRE), the Patchscope read as a lens, and ``compare_lenses``."""

from __future__ import annotations

import json
import math

import pytest
import torch

import mi_lenses
from conftest import CORPUS, PROMPT, hook_counts
from mi_lenses.errors import LensInputError, VerificationError
from mi_lenses.lenses.jacobian import residual_jacobians
from oracles import close, final_with_state
from tolerance import EPS, TIGHT

LONG = [" ".join(CORPUS[i:] + CORPUS[:i]) for i in range(3)]


def _brute_final(m, tokens):
    with torch.no_grad():
        _, cache = m.run_with_cache(tokens)
    return cache[f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"][0].double()


# ------------------------------------------------------------------------------------------------ the engine
@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_identity_future_lens_compares_with_position_t_plus_ahead(tiny_pair, ahead):
    """``ahead=N`` with the identity map: row r at t is decoded as usual, and its KL / CE / rank / surprisal are taken
    against the model at t + N (brute force from the model's own logits); no reference -> NaN / -1."""
    m = tiny_pair.model
    tokens = m.to_tokens(PROMPT)
    S = tokens.shape[1]
    lens = mi_lenses.FutureLens.identity(m, ahead=ahead)
    res = lens(m, tokens, targets=[5])
    ref = mi_lenses.logit_lens(m, tokens, targets=[5])
    assert torch.equal(res.top_ids, ref.top_ids)  # the readout itself is the logit lens
    with torch.no_grad():
        own = m(tokens)[0].double().log_softmax(-1)
    lens_lp = torch.stack([mi_lenses.ModelView(m).decode(_brute_final(m, tokens).float()).double().log_softmax(-1)])
    for t in range(S):
        if t + ahead >= S:
            assert torch.isnan(res.kl[:, 0, t]).all() and (res.final_top1_rank[:, 0, t] == -1).all()
            assert torch.isnan(res.cross_entropy[:, 0, t]).all()
            continue
        p = own[t + ahead]
        kl = (p.exp() * (p - lens_lp[0, t])).sum()
        assert float(res.kl[-1, 0, t]) == pytest.approx(float(kl), abs=2048 * EPS)
        assert int(res.final_top1[0, t]) == int(p.argmax())
        assert float(res.surprisal_bits[-1, 0, t]) == pytest.approx(float(-lens_lp[0, t, p.argmax()] / torch.log(
            torch.tensor(2.0))), abs=2048 * EPS)
        if t + ahead + 1 < S:
            ce = -lens_lp[0, t, tokens[0, t + ahead + 1]]
            assert float(res.cross_entropy[-1, 0, t]) == pytest.approx(float(ce), abs=2048 * EPS)
    if ahead == 0:
        for f in ("kl", "cross_entropy", "final_top1_rank", "final_top1_logprob"):
            close(getattr(res, f), getattr(ref, f), f, 128 * EPS)
    with pytest.raises(VerificationError, match="not the model's output"):
        res.verify()


def test_surprisal_and_precision_of_the_logit_lens(tiny_pair):
    m = tiny_pair.model
    res = mi_lenses.logit_lens(m, PROMPT)
    with torch.no_grad():
        own = m(m.to_tokens(PROMPT))[0].float().log_softmax(-1)
    close(res.surprisal_bits[-1, 0], -own.max(-1).values / torch.log(torch.tensor(2.0)), "final surprisal", 1024 * EPS)
    assert res.prec_at_1[-1].eq(1).all()
    hit = res.top_ids[..., 0] == res.final_top1[None]
    assert torch.equal(res.prec_at_1.bool(), hit)


# ------------------------------------------------------------------------------------------------ Jacobian lens
@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2", "qwen2", "llama_tied"])
def test_native_jacobian_fit_equals_transformer_lens_fit_and_readout(builder, arch):
    pytest.importorskip("transformer_lens.tools.analysis.jacobian_lens")
    m = builder.get(arch, "raw").model
    # 48 tokens per prompt: within every tiny model's context (TransformerLens cuts prompts at n_ctx on its own, at
    # 63 or 64 tokens depending on the tokenizer, which would make the two fits read different prompts)
    ours = mi_lenses.fit_jacobian_lens(m, LONG, seq_len=48, skip_first_positions=4, progress=False)
    theirs = mi_lenses.fit_jacobian_lens(m, LONG, seq_len=48, skip_first_positions=4, progress=False,
                                         backend="transformer_lens")
    assert theirs.rows == list(range(1, m.cfg.n_layers + 1)) and ours.rows == list(range(m.cfg.n_layers + 1))
    for r in theirs.W:
        close(ours.W[r], theirs.W[r], f"{arch} J row {r}", 128 * EPS)
    # our lens (TL's matrices) read in our engine == TransformerLens's own readout, top-5 ids per layer and position
    from transformer_lens.tools.analysis.jacobian_lens import JacobianLens as TLJ

    tl = TLJ.fit(m, LONG, corpus="t", skip_first_positions=4, show_progress=False, max_seq_len=48)
    out = tl.readout(m, PROMPT, top_k=5, return_full_logits=True)
    res = theirs(m, PROMPT, top_k=5, layers=theirs.rows)  # rows 1..L: TL's layer l (output of block l) is row l + 1
    assert set(out.lens_topk_indices) == set(range(m.cfg.n_layers))
    for l, ids in out.lens_topk_indices.items():
        assert torch.equal(res.top_ids[l, 0], ids), f"{arch} layer {l}"
        close(res.logsumexp[l, 0], out.lens_logits[l].double().logsumexp(-1), f"{arch} lse {l}", 1024 * EPS)


def test_jacobians_equal_autograd_functional_jacobian(llama_raw):
    """residual_jacobians (batched one-hot cotangents, frozen weights) == torch.autograd.functional.jacobian of the
    map s -> h_final[t'] obtained by replacing the row's state in a hooked forward pass."""
    m = llama_raw.model
    view = mi_lenses.ModelView(m)
    tokens = m.to_tokens(PROMPT)
    t, tp = 2, tokens.shape[1] - 1
    jac, states, final = residual_jacobians(view, tokens, [0, 2], sources=[t], targets=[tp], dim_batch=5)
    rows = view.residual_rows()
    for r in (0, 2):
        brute = torch.autograd.functional.jacobian(
            lambda s, r=r: final_with_state(m, tokens, rows[r].hook_name, rows[-1].hook_name, t, s)[tp], states[r][0])
        close(jac[r], brute, f"row {r}", 1024 * EPS)
    close(final[0], _brute_final(m, tokens)[tp], "final state", 128 * EPS)


def test_jacobian_fit_restores_weights_and_hooks_on_error(llama_raw, monkeypatch):
    m = llama_raw.model
    flags = [p.requires_grad for p in m.parameters()]
    before = hook_counts(m)

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch.autograd, "grad", boom)
    with pytest.raises(RuntimeError, match="boom"):
        mi_lenses.fit_jacobian_lens(m, LONG[:1], seq_len=64, skip_first_positions=2, progress=False)
    assert [p.requires_grad for p in m.parameters()] == flags
    assert hook_counts(m) == before


def test_identity_jacobian_lens_is_the_logit_lens_and_files_round_trip(tiny_pair, tmp_path, builder):
    m = tiny_pair.model
    ident = mi_lenses.JacobianLens.identity(m)
    a, b = ident(m, PROMPT), mi_lenses.logit_lens(m, PROMPT)
    assert torch.equal(a.top_ids, b.top_ids)
    close(a.kl, b.kl, "identity J", TIGHT)
    fitted = mi_lenses.fit_jacobian_lens(m, LONG[:2], seq_len=64, skip_first_positions=2, progress=False)
    fitted.save(tmp_path / "j")
    again = mi_lenses.load_lens(tmp_path / "j", m)
    close(again(m, PROMPT).kl, fitted(m, PROMPT).kl, "round trip", 0)
    other = builder.get("llama_tied" if tiny_pair.arch != "llama_tied" else "gpt2", "raw").model
    with pytest.raises(LensInputError, match="another model|layers and d_model"):
        mi_lenses.load_lens(tmp_path / "j", other)
    (tmp_path / "j" / "maps.safetensors").write_bytes(b"corrupt")
    with pytest.raises(LensInputError, match="checksum"):
        mi_lenses.load_lens(tmp_path / "j", m)


def test_transformer_lens_backend_names_the_fix_on_compat_mode(builder):
    pytest.importorskip("transformer_lens.tools.analysis.jacobian_lens")
    m = builder.get("llama_gqa", "compat").model
    with pytest.raises(LensInputError, match="compatibility_mode=False"):
        mi_lenses.fit_jacobian_lens(m, LONG[:1], seq_len=64, skip_first_positions=2, backend="transformer_lens", progress=False)
    # native works there, and on an RMSNorm model compatibility mode leaves the residual stream (hence J) unchanged
    raw = builder.get("llama_gqa", "raw").model
    a = mi_lenses.fit_jacobian_lens(m, LONG[:1], seq_len=64, skip_first_positions=2, progress=False)
    b = mi_lenses.fit_jacobian_lens(raw, LONG[:1], seq_len=64, skip_first_positions=2, progress=False)
    for r in a.W:
        close(a.W[r], b.W[r], f"compat vs raw row {r}", 1024 * EPS)


def test_a_lens_fitted_on_some_rows_reads_those_by_default_and_names_them_otherwise(llama_raw):
    m = llama_raw.model
    lens = mi_lenses.JacobianLens({1: torch.eye(m.cfg.d_model)}, n_layers=m.cfg.n_layers, d_model=m.cfg.d_model)
    assert lens(m, PROMPT).labels == lens(m, PROMPT, layers=lens.rows).labels == ["1_pre", "final"]
    with pytest.raises(LensInputError, match=r"reads rows \[1, 3\]"):
        lens(m, PROMPT, layers=[0, 1])
    with pytest.raises(LensInputError, match=r"has no map for resid_mid"):
        lens(m, PROMPT, point="resid_mid")


# ------------------------------------------------------------------------------------------------ Future Lens
def test_future_lens_fit_recovers_the_identity_at_the_final_row(llama_raw):
    """ahead=0 at the final row: the target is the input itself, so least squares gives W = I, b = 0."""
    m = llama_raw.model
    tokens = torch.randint(3, m.cfg.d_vocab, (6, 16), generator=torch.Generator().manual_seed(1))
    lens = mi_lenses.fit_future_lens(m, tokens, ahead=0, rows=[-1], ridge=0.0, progress=False)
    L = m.cfg.n_layers
    close(lens.W[L], torch.eye(m.cfg.d_model), "W", 8192 * EPS)
    close(lens.b[L], torch.zeros(m.cfg.d_model), "b", 8192 * EPS)


def test_future_lens_fit_equals_least_squares_on_the_pairs(llama_raw):
    """The streamed normal equations equal a one-shot lstsq on the explicit (h_r[t], h_final[t + N]) pairs."""
    m = llama_raw.model
    tokens = torch.randint(3, m.cfg.d_vocab, (8, 16), generator=torch.Generator().manual_seed(2))
    lens = mi_lenses.fit_future_lens(m, tokens, ahead=2, rows=[1], batch_size=3, ridge=0.0, progress=False)
    with torch.no_grad():
        _, cache = m.run_with_cache(tokens)
    X = cache["blocks.1.hook_resid_pre"][:, :-2].reshape(-1, m.cfg.d_model).double()
    Y = cache[f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"][:, 2:].reshape(-1, m.cfg.d_model).double()
    sol = torch.linalg.lstsq(torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1), Y).solution
    close(lens.W[1], sol[:-1].T, "W", 8192 * EPS)
    close(lens.b[1], sol[-1], "b", 8192 * EPS)
    res = lens(m, PROMPT, layers=[1])
    assert res.ahead == 2 and torch.isnan(res.kl[0, 0, -2:]).all()


# ------------------------------------------------------------------------------------------------ attribute lens
def test_lre_of_one_subject_reproduces_its_output_state(llama_raw):
    """With one training subject and beta = 1, LRE(s) = J s + (o - J s) = o at every row: decoding it gives the LM's
    own next-token distribution."""
    m = llama_raw.model
    lens = mi_lenses.fit_attribute_lens(m, "The capital of {} is", ["France"], beta=1.0, progress=False)
    view = mi_lenses.ModelView(m)
    tokens, s_pos = mi_lenses.lenses.attribute.subject_prompt(view, "The capital of {} is", "France")
    with torch.no_grad():
        logits, cache = m.run_with_cache(tokens)
    rows = view.residual_rows()
    for r in lens.rows:
        out = lens.apply(cache[rows[r].hook_name][0, s_pos][None].float(), r)
        close(view.decode(out)[0].log_softmax(-1), logits[0, -1].log_softmax(-1), f"row {r}", 8192 * EPS)


def test_lre_at_the_final_row_with_the_subject_last_is_the_logit_lens(llama_raw):
    """Subject at the last position and the final row: d o / d s = I, b = 0, so the LRE (beta = 1) is the logit
    lens; and its W equals the brute-force Jacobian at another row."""
    m = llama_raw.model
    L = m.cfg.n_layers
    lens = mi_lenses.fit_attribute_lens(m, "Here is {}", ["Paris", "the fox"], beta=1.0, progress=False)
    close(lens.W[L], torch.eye(m.cfg.d_model), "W final", TIGHT)
    close(lens.b[L], torch.zeros(m.cfg.d_model), "b final", 128 * EPS)
    a = lens(m, "The quick brown fox", layers=[-1])
    b = mi_lenses.logit_lens(m, "The quick brown fox", layers=[-1])
    close(a.top_logits, b.top_logits, "final row", 1024 * EPS)
    ev = mi_lenses.evaluate_attribute_lens(lens, m, [("Paris", " city"), ("Rome", "Paris")])
    assert ev.faithfulness[-1] == 1.0  # at the final row the LRE is the LM itself
    assert json.loads(ev.to_json())["faithfulness"][-1] == 1.0


def test_attribute_lens_errors_name_the_fix(llama_raw):
    m = llama_raw.model
    with pytest.raises(LensInputError, match="exactly one"):
        mi_lenses.fit_attribute_lens(m, "The capital of France", ["x"], progress=False)
    with pytest.raises(LensInputError, match="merges"):
        mi_lenses.fit_attribute_lens(m, "The capital of {}s is", ["Pari"], progress=False)


# ------------------------------------------------------------------------------------------------ Patchscope as a lens
def test_patchscope_lens_equals_the_sweep(tiny_pair):
    """Every row of the PatchscopeLens (decoded final states of patched runs) == the sweep's patched readout (the
    model's own logits) at l* = l: precision@1 and surprisal per source layer and position."""
    m = tiny_pair.model
    L = m.cfg.n_layers
    res = mi_lenses.PatchscopeLens()(m, PROMPT, point="resid_post")
    sw = mi_lenses.sweep(m, PROMPT, mi_lenses.presets.identity(), target_layers="same", progress=False)
    for l in range(L):
        row = l + 1  # embed, 0_post, ..., final
        close(res.prec_at_1[row, 0], sw.prec_at_1[l, 0], f"prec@1 layer {l}", 0)
        close(res.surprisal_bits[row, 0], sw.surprisal_bits[l, 0] if hasattr(sw, "surprisal_bits") else
              sw.surprisal[l, 0] / torch.log(torch.tensor(2.0)), f"surprisal layer {l}", 1e-3)
    logit = mi_lenses.logit_lens(m, PROMPT, point="resid_post")
    close(res.top_logits[-1], logit.top_logits[-1], "final row = the model", 1024 * EPS)


def test_patchscope_lens_leaves_no_hooks(tiny_pair, monkeypatch):
    m = tiny_pair.model
    before = hook_counts(m)
    mi_lenses.PatchscopeLens(mi_lenses.presets.identity_q())(m, PROMPT)
    assert hook_counts(m) == before
    import mi_lenses.patchscopes.run as ps_run

    real = ps_run.write_hooks

    def exploding(*a, **k):
        return [(n, lambda r, hook=None: (_ for _ in ()).throw(RuntimeError("boom"))) for n, _ in real(*a, **k)]

    monkeypatch.setattr(ps_run, "write_hooks", exploding)
    with pytest.raises(RuntimeError, match="boom"):
        mi_lenses.PatchscopeLens()(m, PROMPT)
    assert hook_counts(m) == before


# ------------------------------------------------------------------------------------------------ the bench
def test_compare_lenses_agrees_with_evaluate_lens(llama_raw):
    m = llama_raw.model
    tokens = torch.randint(3, m.cfg.d_vocab, (3, 16), generator=torch.Generator().manual_seed(3))
    tuned = mi_lenses.TunedLens.from_model(m)
    cmp = mi_lenses.compare_lenses(m, tokens, {"logit": "logit", "tuned": tuned}, point="resid_pre",
                                   precision_at=(1, 5), batch_size=2, progress=False)
    ev = mi_lenses.evaluate_lens(tuned, m, tokens)
    close(cmp.stats["logit"]["kl_bits"][:-1], ev.kl_bits["logit lens"], "KL", 1024 * EPS)
    close(cmp.stats["logit"]["ce_bits"][:-1], ev.ce_bits["logit lens"], "CE", 1024 * EPS)
    assert cmp.final_ce_bits == pytest.approx(ev.final_ce_bits, abs=1024 * EPS)
    assert cmp.stats["tuned"]["prec_at_1"] == cmp.stats["logit"]["prec_at_1"]
    assert cmp.stats["logit"]["prec_at_1"][-1] == 1.0 and cmp.stats["logit"]["mean_rank"][-1] == 0.0
    assert all(a <= b for a, b in zip(cmp.stats["logit"]["prec_at_1"], cmp.stats["logit"]["prec_at_5"]))
    d = json.loads(cmp.to_json())
    assert set(d) >= {"layers", "lenses", "tokens"} and d["tokens"] == 48
    assert set(d["lenses"]["logit"]) >= {"kl_bits", "ce_bits", "prec_at_1", "surprisal_bits", "mean_rank"}
    assert "<svg" in cmp.to_html() and cmp.to_markdown().startswith("| layer |")


def test_compare_command_end_to_end(hf_folder, tmp_path, capsys):
    from mi_lenses.cli import main

    data = tmp_path / "text.txt"
    data.write_text("\n".join(CORPUS * 6))
    out = tmp_path / "cmp.json"
    rc = main(["compare", "--model", str(hf_folder), "--data", str(data), "--max-tokens", "64", "--seq-len", "16",
               "--lenses", "logit,patchscope,patchscope-q,jacobian,future", "--fit-data", str(data),
               "--fit-tokens", "64", "--jacobian-prompts", "2", "--jacobian-seq-len", "32", "--json", str(out), "--html", str(tmp_path / "c.html"),
               "--save-fitted", str(tmp_path / "fitted")])
    assert rc == 0, capsys.readouterr().err
    d = json.loads(out.read_text())
    assert list(d["lenses"]) == ["logit", "patchscope", "patchscope-q", "jacobian", "future"]
    assert d["tokens"] == 64 and d["lenses"]["future"]["kl_bits"][0] is not None
    assert mi_lenses.load_lens(tmp_path / "fitted" / "jacobian").rows[-1] == mi_lenses.load_model(
        hf_folder).cfg.n_layers
    assert main(["compare", "--model", str(hf_folder), "--data", str(data), "--lenses", "tuned"]) == 2
    assert "--lens DIR" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ SelfIE
def test_selfie_relevancy_is_zero_when_the_injected_state_is_the_prompts_own(llama_raw):
    """Interpret the interpretation prompt's own state at its single placeholder, injected at the same layer: the
    injected run is the plain run, so every relevancy is 0 and the generation is the plain greedy continuation."""
    m = llama_raw.model
    prompt = "Hello world, x is a city"
    tgt = mi_lenses.Target(prompt, placeholder="x", layer=1)
    pos = mi_lenses.patchscopes.spec.placeholder_positions(mi_lenses.ModelView(m), prompt, "x")[0]
    res = mi_lenses.selfie(m, prompt, layers=[1], positions=[pos], interpretation=tgt, max_new_tokens=5,
                           stop_at_eos=False)
    assert res.relevancy.abs().max() < TIGHT
    with torch.no_grad():
        seq = m.to_tokens(prompt)
        for _ in range(5):
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert res.generated_ids[0].tolist() == seq[0, -5:].tolist()


def test_selfie_relevancy_equals_two_teacher_forced_runs(llama_raw):
    """relevancy = p(token | state injected at every placeholder) - p(token | plain prompt), against an independent
    loop: one hooked forward pass per generated token."""
    m = llama_raw.model
    res = mi_lenses.selfie(m, PROMPT, layers=[0, 2], positions=[-1, 2], max_new_tokens=4, stop_at_eos=False)
    assert res.row_labels[0].startswith("L0 @") and len(res.row_labels) == 4
    view = mi_lenses.ModelView(m)
    tgt = mi_lenses.presets.selfie()
    rt = mi_lenses.patchscopes.spec.resolve_target(tgt, view)
    with torch.no_grad():
        _, cache = m.run_with_cache(m.to_tokens(PROMPT))
    for r, (l, p) in enumerate(zip(res.source_layers, res.source_positions)):
        vec = cache[f"blocks.{l}.hook_resid_post"][0, p]

        def put(act, hook=None, vec=vec):
            act[:, list(rt.positions)] = vec
            return act

        seq = rt.tokens
        for j, tok in enumerate(res.generated_ids[r].tolist()):
            with torch.no_grad():
                with m.hooks(fwd_hooks=[(f"blocks.{res.inject_layer}.hook_resid_post", put)]):
                    injected = m(seq)[0, -1].float().softmax(-1)
                pp = m(seq)[0, -1].float().softmax(-1)[tok]
            assert float(res.p_injected[r, j]) == pytest.approx(float(injected[tok]), abs=128 * EPS)
            assert float(res.p_plain[r, j]) == pytest.approx(float(pp), abs=128 * EPS)
            assert tok == int(injected.argmax())  # greedy generation under the (prompt-pass) injection
            seq = torch.cat([seq, torch.tensor([[tok]])], 1)
    d = json.loads(res.to_json())
    assert d["rows"][0]["relevancy"] and "interpretation" in res.to_html()
    assert len(res.to_dataframe()) == 16


# ------------------------------------------------------------------------------------------------ learned prompt
def test_untrained_future_prompt_is_the_fixed_prompt_patchscope(tiny_pair):
    """steps=0: the soft prompt is the fixed prompt's own embeddings, so the lens equals the Patchscope that writes
    the state at the fixed prompt's last token at the same row (an independent path: tokens, no embedding hook)."""
    m = tiny_pair.model
    lens = mi_lenses.fit_future_prompt(m, torch.randint(3, m.cfg.d_vocab, (2, 8)), steps=0, progress=False)
    res = lens(m, PROMPT, layers=[1, -1], point="resid_pre")
    ps = mi_lenses.PatchscopeLens(mi_lenses.Target(lens.ids, positions=-1))(m, PROMPT, layers=[1, -1])
    close(res.top_logits, ps.top_logits, "fixed prompt", 1024 * EPS)
    close(res.kl, ps.kl, "fixed prompt KL", 1024 * EPS)


def test_future_prompt_training_lowers_the_kl_and_leaves_the_model_alone(llama_raw):
    m = llama_raw.model
    flags = [p.requires_grad for p in m.parameters()]
    before = hook_counts(m)
    tokens = torch.randint(3, m.cfg.d_vocab, (6, 16), generator=torch.Generator().manual_seed(4))
    lens = mi_lenses.fit_future_prompt(m, tokens, ahead=1, rows=[1, 2], steps=40, batch_size=16, lr=3e-2,
                                       progress=False)
    untrained = mi_lenses.fit_future_prompt(m, tokens, ahead=1, rows=[1, 2], steps=0, progress=False)
    cmp = mi_lenses.compare_lenses(m, tokens, {"trained": lens, "fixed": untrained}, point="resid_pre",
                                   progress=False)
    for r in (1, 2):  # in-sample KL to the model at t + 1: training helps
        assert cmp.stats["trained"]["kl_bits"][r] < cmp.stats["fixed"]["kl_bits"][r]
    assert all(math.isnan(cmp.stats["trained"]["kl_bits"][r]) for r in (0, 3))  # rows without a prompt
    assert json.loads(cmp.to_json())["lenses"]["trained"]["kl_bits"][0] is None
    assert lens.meta["loss"][-1] < lens.meta["loss"][0]
    assert [p.requires_grad for p in m.parameters()] == flags and hook_counts(m) == before


def test_results_of_the_new_lenses_render(llama_raw, tmp_path, capsys):
    """Every output of the result protocol works for lenses with a shifted reference (NaN at the last positions),
    a mapped final row and a Patchscope read as a lens."""
    m = llama_raw.model
    tokens = torch.randint(3, m.cfg.d_vocab, (3, 12), generator=torch.Generator().manual_seed(5))
    for lens in (mi_lenses.fit_future_lens(m, tokens, ahead=2, progress=False),
                 mi_lenses.fit_attribute_lens(m, "The capital of {} is", ["France", "Rome"], progress=False),
                 mi_lenses.PatchscopeLens()):
        res = lens(m, PROMPT, targets=" city")
        assert res.to_html(tmp_path / "r.html").startswith("<!DOCTYPE html>")
        res.print(width=200)
        d = json.loads(res.to_json())
        assert "NaN" not in res.to_json() and d["layers"][-1] == "final"
        assert len(res.to_dataframe()) > 0
    assert capsys.readouterr().out.strip()
