"""Both TransformerLens worlds: every feature on the model ``mi_lenses.load_model`` gives in this environment
(TransformerLens 4.x: a ``TransformerBridge``; 3.x: a ``HookedTransformer``), built from the same local HF weights as
the independent oracle, for five architectures, raw and folded. CI runs this module in both environments.

* every lens statistic equals the HF brute force in float64 (1e-5 on logits-scale quantities, exact top-k ids up to
  ties), DLA's identities hold, Patchscopes patch where they read, cached generation equals uncached and the model's
  own ``generate``, tuned lenses train and round-trip both file formats;
* ragged batches: 8 prompts of different lengths, as text, right-padded tokens or left-padded tokens with their
  attention mask, equal the 8 single-prompt runs within 1e-5 on every statistic, for every lens, DLA and sweeps;
* circuit analysis: exact patching equals this world's ``transformer_lens.patching`` (``resid_mid`` too on a
  ``HookedTransformer``, whose hook is in the residual stream), attribution equals TL 4.3's ``attribution_patch``
  where it exists, edges sum to nodes, circuits recover 1 and 0, path patching equals this world's direct paths, and
  DLA under a user's head ablation sums to the hooked model's logit;
* across the two worlds: with ``MI_LENSES_WORLD_REFS`` set, the 4.x run writes its numbers (and the tiny models'
  weights) there and the 3.x run must reproduce them within 1e-5. CI sets it; locally a missing reference is a skip.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

import mi_lenses
from mi_lenses.models.loading import resolve_kind
from oracles import assert_lens_matches, close, final_with_state, hf_lens_logits, next_ids_of
from tiny import ARCHS, MODES, PROMPT, hook_counts
from tolerance import EPS, TIGHT

pytestmark = pytest.mark.worlds

KIND = resolve_kind("auto")
RAGGED = [
    "The capital",
    "The quick brown fox jumps over the lazy dog.",
    "A city",
    "Hello world, hello lens! Numbers must be right.",
    "one two three four five",
    "Paris is a city; Rome is a city; Berlin is a city too.",
    "A tiny model reads",
    "seven eight nine ten",
]
REFS = os.environ.get("MI_LENSES_WORLD_REFS")
PATCH_PAIR = ("The capital of France is", "The capital of Rome is")  # equal lengths with the tiny tokenizer


class World:
    """One model of this environment's kind plus its untouched HF twin (the oracle)."""

    def __init__(self, arch: str, mode: str, model, hf, tokenizer, folder: Path):
        self.arch, self.mode, self.model, self.hf, self.tokenizer, self.folder = arch, mode, model, hf, tokenizer, folder

    @property
    def compat(self) -> bool:
        return self.mode == "compat"

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.mode}-{KIND}"

    def __repr__(self) -> str:
        return f"World({self.id})"


def _folder(builder, arch: str, tmp_root: Path) -> Path:
    """The tiny HF model's folder: the shared reference folder when there is one (the same weights in both worlds),
    else a fresh one."""
    root = Path(REFS) if REFS else tmp_root
    folder = root / f"tiny-{arch}"
    if not (folder / "config.json").is_file():
        if KIND == "hooked" and REFS and os.environ.get("CI") == "true":
            pytest.fail(f"{folder} is missing: the TransformerLens 4.x run must write the references first.")
        folder.mkdir(parents=True, exist_ok=True)
        builder.hf(arch).save_pretrained(folder)
        builder.tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=[(a, m) for a in ARCHS for m in MODES], ids=lambda p: f"{p[0]}-{p[1]}")
def world(request, builder, tmp_path_factory) -> World:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, mode = request.param
    folder = _folder(builder, arch, tmp_path_factory.getbasetemp() / "worlds")
    model = mi_lenses.load_model(folder, compatibility_mode=mode == "compat")
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():  # the first cached forward installs transformers' lazy hooks: the steady state
        model.run_with_cache(model.to_tokens(PROMPT))
    return World(arch, mode, model, hf, AutoTokenizer.from_pretrained(folder), folder)


def test_load_model_gives_this_worlds_model(world):
    expected = "TransformerBridge" if KIND == "bridge" else "HookedTransformer"
    assert type(world.model).__name__ == expected
    assert mi_lenses.ModelView(world.model).is_bridge == (KIND == "bridge")
    # load_model compared it with the HF model (bridge or HookedTransformer alike) and it passed
    report = mi_lenses.parity_report(world.model)
    assert report.checked and report.passed and report.oracle == "load_model" and report.gap < 1024 * EPS, report


# ------------------------------------------------------------------------------------------------ every feature
def test_logit_lens_matches_hf_brute_force(world):
    m = world.model
    tokens = m.to_tokens(PROMPT)
    targets = [" city", 7]
    res = mi_lenses.logit_lens(m, tokens, targets=targets, top_k=5)
    assert_lens_matches(res, hf_lens_logits(world, tokens), next_ids_of(tokens), world.id,
                        logit_space=not world.compat, tol=128 * EPS if not world.compat else 1e-4)
    res.verify()
    logits, cache = m.run_with_cache(tokens)  # the user's own cache
    from_cache = mi_lenses.logit_lens(m, tokens, cache=cache, logits=logits, targets=targets)
    assert torch.equal(from_cache.top_ids, res.top_ids)
    close(from_cache.kl, res.kl, "from the user's cache", TIGHT)


def test_dla_identities_hold(world):
    m = world.model
    res = mi_lenses.direct_logit_attribution(m, RAGGED[:3], answer=" city", wrong="Paris")
    res.verify()  # parts == the model's logit difference; heads + b_O == attn_out; neurons; source positions
    with torch.no_grad():
        hf_logits = world.hf(m.to_tokens(RAGGED[1])).logits[0, -1].double()
    a, w = (world.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (" city", "Paris"))
    assert float(res.total[1]) == pytest.approx(float(hf_logits[a] - hf_logits[w]), abs=1024 * EPS)
    per_neuron = mi_lenses.neuron_attribution(m, m.run_with_cache(m.to_tokens(PROMPT))[1], answer=" city")
    assert per_neuron.values.shape[0] == m.cfg.n_layers
    last = per_neuron.values[:, 0, -1]  # the last position: the DLA of that prompt's own neurons
    assert torch.allclose(last, mi_lenses.direct_logit_attribution(m, PROMPT, answer=" city").neurons[0],
                          atol=128 * EPS)


def test_tuned_lens_trains_and_round_trips(world, tmp_path):
    m = world.model
    zero = mi_lenses.TunedLens.from_model(m)
    assert torch.equal(zero(m, PROMPT).top_ids, mi_lenses.logit_lens(m, PROMPT).top_ids)
    tokens = torch.randint(3, m.cfg.d_vocab, (8, 16), generator=torch.Generator().manual_seed(0))
    lens = mi_lenses.train_lens(m, tokens, steps=2, tokens_per_step=64, seq_len=16, warm_start_tokens=64,
                                progress=False)
    before = mi_lenses.evaluate_lens(zero, m, tokens).kl_bits["tuned lens"]
    after = mi_lenses.evaluate_lens(lens, m, tokens).kl_bits["tuned lens"]
    assert sum(after) < sum(before)
    ref = lens(m, PROMPT)
    for fmt in ("mi_lenses", "tuned-lens"):
        if fmt == "tuned-lens" and lens.meta.get("residual_centered"):
            continue  # refused by design on a mean-free residual stream (tested in test_tuned_lens)
        lens.save(tmp_path / fmt, format=fmt)
        again = mi_lenses.tuned_lens(m, PROMPT, lens=tmp_path / fmt)
        close(again.kl, ref.kl, f"{world.id} {fmt} round trip", 128 * EPS)


def test_patchscopes_patch_where_they_read(world):
    m = world.model
    mi_lenses.patchscopes.verify(m)  # own state back changes nothing; identity at the last layer reproduces logits
    src = mi_lenses.Source(PROMPT, layers=1, position=3)
    tgt = mi_lenses.Target("The capital of x is", placeholder="x")
    for every in (False, True):
        kw = dict(max_new_tokens=4, stop_at_eos=False, patch_every_step=every)
        cached = mi_lenses.patchscope(m, src, tgt, use_kv_cache=True, **kw)
        plain = mi_lenses.patchscope(m, src, tgt, use_kv_cache=False, **kw)
        assert torch.equal(cached.generated_ids, plain.generated_ids)
        close(cached.top_logprobs, plain.top_logprobs, "cached readout", 128 * EPS)
    assert mi_lenses.ModelView(m).kv is not None, "the KV cache path is off: generation would recompute"
    # unpatched generation equals the model's own generate
    tokens = m.to_tokens(PROMPT)
    ours = mi_lenses.patchscope(m, mi_lenses.Source(tokens, layers=0, position=1),
                                mi_lenses.Target(tokens, positions=1), max_new_tokens=5, stop_at_eos=False)
    theirs = m.generate(tokens, max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False,
                        use_past_kv_cache=False, return_type="tokens")[0, tokens.shape[1]:]
    assert torch.equal(ours.generated_ids[0], theirs.cpu())
    sw = mi_lenses.sweep(m, RAGGED[:2], tgt, positions=[0, -1], chunk=3, progress=False)
    loop = mi_lenses.sweep(m, RAGGED[:2], tgt, positions=[0, -1], use_kv_cache=False, progress=False)
    assert torch.equal(sw.top1_ids, loop.top1_ids)
    close(sw.surprisal, loop.surprisal, "sweep cached vs not", 128 * EPS)


def test_attention_and_the_report(world, tmp_path, capsys):
    """attention() on this world's model equals the HF model's eager attention probabilities, its q·k terms equal
    the model's hook_attn_scores (rotary, GQA), and the report and its command run and leave no hooks."""
    m = world.model
    before = hook_counts(m)
    res = mi_lenses.attention(m, RAGGED[:3])
    for b, prompt in enumerate(RAGGED[:3]):
        tokens = m.to_tokens(prompt)
        with torch.no_grad():
            att = world.hf(tokens, output_attentions=True).attentions
        n = tokens.shape[1]
        for l, a in enumerate(att):
            close(res.patterns[b, l, :, :n, :n], a[0], f"{world.id} attention prompt {b} layer {l} vs HF", 128 * EPS)
    _, cache = m.run_with_cache(m.to_tokens(PROMPT))
    one = mi_lenses.attention(m, PROMPT, cache=cache)
    for l in range(m.cfg.n_layers):
        scores = cache[f"blocks.{l}.attn.hook_attn_scores"][0]
        for h in range(m.cfg.n_heads):
            terms = one.qk_terms(l, h)
            close(terms.products.sum(-1), scores[h, -1], f"{world.id} q·k terms L{l}H{h}", 128 * EPS)
    rep = mi_lenses.report(m, PROMPT, wrong=" city", patchscope_positions=3, progress=False)
    assert rep.to_html(tmp_path / "r.html").count("var CircuitsVis=") == 1 and rep.sections[-1] == "attention"
    rep.print(width=160)
    from mi_lenses.cli import main

    assert main(["report", PROMPT, "--model", str(world.folder), "--out", str(tmp_path / "c.html"), "--no-progress",
                 "--sections", "logit_lens,attention"]) == 0
    assert f"wrote {tmp_path / 'c.html'}" in capsys.readouterr().out
    assert hook_counts(m) == before


def test_renderers_and_commands(world, tmp_path, capsys):
    m = world.model
    before = hook_counts(m)
    results = [mi_lenses.logit_lens(m, RAGGED[:2]), mi_lenses.direct_logit_attribution(m, PROMPT, answer=" city"),
               mi_lenses.patchscope(m, mi_lenses.Source(PROMPT, layers=[0, 1]), max_new_tokens=2),
               mi_lenses.sweep(m, PROMPT, positions=[-1], progress=False)]
    for res in results:
        assert res.to_html(tmp_path / "r.html").startswith("<!DOCTYPE html>")
        res.show()._repr_html_()
        res.print(width=160)
        res.to_json(tmp_path / "r.json")
        assert len(res.to_dataframe())
    from mi_lenses.cli import main

    f = str(world.folder)
    assert main(["logit-lens", PROMPT, "--model", f, "--target", " city", "--json", str(tmp_path / "l.json")]) == 0
    assert main(["dla", PROMPT, "--model", f, "--answer", " city"]) == 0
    assert main(["patchscope", "--model", f, "--source-prompt", PROMPT, "--source-layer", "1"]) == 0
    mi_lenses.TunedLens.from_model(m).save(tmp_path / "lens")
    (tmp_path / "text.txt").write_text(" ".join(RAGGED) * 8)
    lens_args = ["--lens", str(tmp_path / "lens"), "--model", f]
    if world.compat:  # the command line loads models in compatibility mode, like this world's model
        assert main(["tuned-lens", "eval", *lens_args, "--data", str(tmp_path / "text.txt"), "--seq-len", "16",
                     "--max-tokens", "64"]) == 0
        assert main(["logit-lens", PROMPT, *lens_args]) == 0
    assert "final" in capsys.readouterr().out
    assert hook_counts(m) == before


def test_affine_map_between_a_bridge_and_a_hooked_transformer(world):
    """Where both kinds exist (TransformerLens 3.x), a map fitted from a HookedTransformer's states to a bridge of
    the same weights is the identity up to fit error, and a state patched across them through the map reproduces
    the bridge's own output."""
    from mi_lenses.models.loading import has_hooked_transformer

    if not has_hooked_transformer() or world.mode != "raw":
        pytest.skip("needs TransformerLens 3.x (both a HookedTransformer and a TransformerBridge); raw weights")
    hooked = mi_lenses.load_model(world.folder, kind="hooked", compatibility_mode=False)
    bridge = mi_lenses.load_model(world.folder, kind="bridge", compatibility_mode=False)
    texts = RAGGED * 6
    f = mi_lenses.fit_map(hooked, texts, source_layer=0, target_model=bridge, target_layer=0, ridge=1e-6)
    assert f.r2 > 0.999999
    tokens = hooked.to_tokens(PROMPT)
    res = mi_lenses.patchscope(hooked, mi_lenses.Source(tokens, layers=0, position=4),
                               mi_lenses.Target(tokens, positions=4, model=bridge, map=f))
    with torch.no_grad():
        own = bridge(tokens)[0, -1].float().log_softmax(-1)
    close(res.top_logprobs[0], own[res.top_ids[0]], "patched across worlds through the map", 8192 * EPS)


def test_more_lenses_hold_their_identities(world):
    """Issue 13's lenses in this world: the Jacobian lens (native fit == autograd through this world's hooks; TL's
    own fit where this world has it), the Future Lens, the attribute lens, the Patchscope read as a lens, SelfIE and
    compare_lenses, each against its defining identity."""
    m = world.model
    before = hook_counts(m)
    view = mi_lenses.ModelView(m)
    L = m.cfg.n_layers
    # Jacobian lens: the identity map is the logit lens; the fit is the exact averaged Jacobian
    assert torch.equal(mi_lenses.JacobianLens.identity(m)(m, PROMPT).top_ids, mi_lenses.logit_lens(m, PROMPT).top_ids)
    tokens = m.to_tokens(PROMPT)
    S = tokens.shape[1]
    flags = [p.requires_grad for p in m.parameters()]
    jl = mi_lenses.fit_jacobian_lens(m, tokens, skip_first_positions=S - 3, progress=False)
    rows = view.residual_rows()
    with torch.no_grad():
        _, cache = m.run_with_cache(tokens)

    def final_sum(s, t):  # targets t' in V = {S-3, S-2}, t' >= t
        return final_with_state(m, tokens, rows[1].hook_name, rows[-1].hook_name, t, s)[t : S - 1].sum(0)

    brute = sum(torch.autograd.functional.jacobian(lambda s, t=t: final_sum(s, t), cache[rows[1].hook_name][0, t])
                for t in (S - 3, S - 2)) / 2  # the mean over the source positions V
    close(jl.W[1], brute, f"{world.id} Jacobian row 1 (source S-3)", 1024 * EPS)
    assert [p.requires_grad for p in m.parameters()] == flags, "the fit left the weights' grad flags changed"
    try:
        theirs = mi_lenses.fit_jacobian_lens(m, [PROMPT], skip_first_positions=S - 3, backend="transformer_lens",
                                             progress=False)
        close(theirs.W[1], jl.W[1], f"{world.id} TransformerLens's own Jacobian lens", 128 * EPS)
    except mi_lenses.LensInputError as err:  # 3.x HookedTransformer, compatibility mode: the error names the fix
        assert KIND == "hooked" or world.compat, err
        assert "backend='native'" in str(err) or "compatibility_mode=False" in str(err)
    # Future Lens: ahead=0 at the final row is the identity map
    data = torch.randint(3, m.cfg.d_vocab, (6, 16), generator=torch.Generator().manual_seed(0))
    fl = mi_lenses.fit_future_lens(m, data, ahead=0, rows=[-1], ridge=0.0, progress=False)
    from mi_lenses.models.identity import residual_is_centered

    # W h = h on every residual the model can produce. On a mean-free residual (LayerNorm, compatibility mode) the
    # unregularised fit is only determined on mean-free vectors (the min-norm answer is P = I - 11^T/d, but the
    # solver may return I + anything along 11^T): check W P == P, with P the identity elsewhere
    d = m.cfg.d_model
    P = torch.eye(d) - (1.0 / d if residual_is_centered(view) else 0.0)
    close(fl.W[L].double() @ P.double(), P, f"{world.id} future W on the residual's subspace", 8192 * EPS)
    # attribute lens: one subject, beta 1: LRE(s) = o at every row
    lre = mi_lenses.fit_attribute_lens(m, "The capital of {} is", ["France"], beta=1.0, progress=False)
    tk, s_pos = mi_lenses.lenses.attribute.subject_prompt(view, "The capital of {} is", "France")
    with torch.no_grad():
        logits, c2 = m.run_with_cache(tk)
    for r in (0, L // 2, L):
        out = view.decode(lre.apply(c2[rows[r].hook_name][0, s_pos][None].float(), r))[0].log_softmax(-1)
        close(out, logits[0, -1].float().log_softmax(-1), f"{world.id} LRE row {r}", 8192 * EPS)
    # the Patchscope read as a lens == the sweep; its final row is the model
    psl = mi_lenses.PatchscopeLens()(m, PROMPT, point="resid_post")
    sw = mi_lenses.sweep(m, PROMPT, target_layers="same", progress=False)
    close(psl.prec_at_1[1:, 0], sw.prec_at_1[:, 0], f"{world.id} PatchscopeLens prec@1", 0)
    close(psl.surprisal_bits[1:, 0], sw.surprisal[:, 0] / 0.6931471805599453, f"{world.id} surprisal", 8192 * EPS)
    # SelfIE: the prompt's own state injected back -> relevancy 0
    prompt = "Hello world, x is a city"
    pos = mi_lenses.patchscopes.spec.placeholder_positions(view, prompt, "x")[0]
    si = mi_lenses.selfie(m, prompt, layers=[0], positions=[pos],
                          interpretation=mi_lenses.Target(prompt, placeholder="x", layer=0), max_new_tokens=3)
    assert si.relevancy.abs().max() < 128 * EPS
    # the bench: the logit lens in compare_lenses == evaluate_lens
    cmp = mi_lenses.compare_lenses(m, data, {"logit": "logit", "patchscope-q": "patchscope-q", "jacobian": jl},
                                   point="resid_pre", progress=False)
    ev = mi_lenses.evaluate_lens(mi_lenses.TunedLens.from_model(m), m, data)
    close(cmp.stats["logit"]["kl_bits"][:-1], ev.kl_bits["logit lens"], f"{world.id} compare KL", 1024 * EPS)
    assert cmp.stats["patchscope-q"]["prec_at_1"][-1] == 1.0 == cmp.stats["jacobian"]["prec_at_1"][-1]
    assert hook_counts(m) == before


def test_circuit_analysis_in_this_world(world):
    import contextlib
    import io

    from transformer_lens import patching

    m = world.model
    before = hook_counts(m)
    clean, corrupted = PATCH_PAIR
    ct, xt = m.to_tokens(clean), m.to_tokens(corrupted)
    a, w = m.to_single_token("Paris"), m.to_single_token(" city")
    with torch.no_grad():
        cl, cc = m.run_with_cache(ct)
        xl, xc = m.run_with_cache(xt)
    c, x = float(cl[0, -1, a] - cl[0, -1, w]), float(xl[0, -1, a] - xl[0, -1, w])

    def metric(lg):
        return ((lg[:, -1, a] - lg[:, -1, w]).mean() - x) / (c - x)

    kw = dict(answer="Paris", wrong=" city", progress=False)
    cases = [("resid_pre", None, patching.get_act_patch_resid_pre), ("mlp_out", None, patching.get_act_patch_mlp_out),
             ("head_out", None, patching.get_act_patch_attn_head_out_all_pos),
             ("head_k", "layer_pos_head", patching.get_act_patch_attn_head_k_by_pos)]
    if KIND == "hooked" and not getattr(m.cfg, "parallel_attn_mlp", False):
        cases.append(("resid_mid", None, patching.get_act_patch_resid_mid))
    for what, by, fn in cases:
        ours = mi_lenses.activation_patching(m, clean, corrupted, what=what, by=by, **kw)
        with contextlib.redirect_stderr(io.StringIO()):
            ref = fn(m, xt, cc, metric).cpu()
        close(ours.values, ref, f"{world.id} exact {what} vs transformer_lens.patching", 1024 * EPS)
        assert ours.engine == "replay", world.id
    att = mi_lenses.activation_patching(m, clean, corrupted, what="head_out", by="layer_pos_head",
                                        method="attribution", **kw)
    if KIND == "bridge":
        from transformer_lens.tools.analysis.attribution_patching import attribution_patch

        heads = torch.zeros_like(att.values)
        for node, v in attribution_patch(m, ct, xt, metric).node_scores.items():
            if node.kind == "attn_head_out":
                heads[node.layer, node.position, node.head] = v
        close(att.values, heads, f"{world.id} attribution vs TL attribution_patch", 1024 * EPS)
    edges = mi_lenses.edge_attribution(m, clean, corrupted, answer="Paris", wrong=" city")
    per_head = att.values.sum(1)
    close(torch.stack([edges.node_scores()[[edges.writers.index(f"L{l}H{h}") for h in range(m.cfg.n_heads)]]
                       for l in range(m.cfg.n_layers)]), per_head, f"{world.id} edges sum to nodes", 1e-4)
    assert abs(mi_lenses.faithfulness(m, edges.circuit(threshold=0.0)).faithfulness - 1.0) < 1024 * EPS
    assert abs(mi_lenses.faithfulness(m, edges.circuit(edges=0)).faithfulness) < 1024 * EPS
    ours = mi_lenses.path_patching(m, clean, corrupted, senders=[(0, 1)], receivers="q", freeze="heads_and_mlps", **kw)
    if hasattr(patching, "get_act_patch_direct_path"):  # TransformerLens 4.x
        with contextlib.redirect_stderr(io.StringIO()):
            ref = patching.get_act_patch_direct_path(m, xt, cc, xc, metric, 0, 1, component="q", verbose=False)
        close(ours.values[1:], ref.cpu()[1:], f"{world.id} path patching vs direct paths", 1024 * EPS)

    def ablate(z, hook=None):
        z[:, :, 1] = 0.0
        return z

    with m.hooks(fwd_hooks=[("blocks.1.attn.hook_z", ablate)]):
        dla = mi_lenses.direct_logit_attribution(m, clean, answer="Paris", wrong=" city")
        with torch.no_grad():
            hooked = m(ct)
    assert float(dla.total[0]) == pytest.approx(float(hooked[0, -1, a] - hooked[0, -1, w]), abs=8192 * EPS)
    assert "L1H1" in dla.sources_unavailable and dla.active_hooks == ("blocks.1.attn.hook_z",)
    assert hook_counts(m) == before


# ------------------------------------------------------------------------------------------------ ragged batches
STATS = ("top_ids", "top_logits", "logsumexp", "entropy", "kl", "cross_entropy", "final_top1_rank",
         "target_ranks", "target_logprobs")


def _same_as_singles(batch, singles, what: str) -> None:
    """Column j of prompt b in the batch equals the single run's column j (the same requested position)."""
    for b, single in enumerate(singles):
        v = batch.valid[b]
        assert v.sum() == single.valid[0].sum(), f"{what}: prompt {b} valid columns"
        for field in STATS:
            ours, ref = getattr(batch, field)[:, b][:, v], getattr(single, field)[:, 0][:, single.valid[0]]
            if ours.dtype == torch.long:
                assert torch.equal(ours, ref), f"{what}: prompt {b} {field}"
            else:
                close(ours, ref, f"{what}: prompt {b} {field}", 128 * EPS)
        assert torch.isnan(batch.kl[:, b][:, ~v]).all() and (batch.top_ids[:, b][:, ~v] == -1).all(), \
            f"{what}: padding shows up as a number"


def _padded(m, prompts, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [m.to_tokens(p)[0] for p in prompts]
    S = max(len(r) for r in rows)
    pad = m.tokenizer.pad_token_id
    tokens = torch.full((len(rows), S), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(S - len(r), S) if side == "left" else slice(0, len(r))
        tokens[b, sl], mask[b, sl] = r, 1
    return tokens, mask


@pytest.mark.parametrize("positions", [None, [-1, -2, 0, 3]], ids=["all", "negative"])
def test_ragged_batch_equals_single_runs(world, positions):
    m = world.model
    lens = mi_lenses.TunedLens.from_model(m)
    with torch.no_grad():  # a non-trivial tuned lens
        lens.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        lens.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    lengths = [len(m.to_tokens(p)[0]) for p in RAGGED]
    for name, run in (("logit lens", mi_lenses.logit_lens), ("tuned lens", lens)):
        kw = dict(positions=positions, targets=[" city"], top_k=3)
        # a single prompt is asked only for the positions it has (the batch masks the others)
        singles = [run(m, p, **{**kw, "positions": None if positions is None else
                                [q for q in positions if -n <= q < n]}) for p, n in zip(RAGGED, lengths)]
        _same_as_singles(run(m, RAGGED, **kw), singles, f"{world.id} {name} text")
        for side in ("right", "left"):
            tokens, mask = _padded(m, RAGGED, side)
            _same_as_singles(run(m, tokens, attention_mask=mask, **kw), singles, f"{world.id} {name} {side}-padded")
    if positions is not None:  # -1 is each prompt's own last token
        res = mi_lenses.logit_lens(m, RAGGED, positions=[-1])
        assert res.token_index[:, 0].tolist() == [n - 1 for n in lengths]


def test_ragged_dla_and_sweep_equal_single_runs(world):
    m = world.model
    batch = mi_lenses.direct_logit_attribution(m, RAGGED, answer=" city", position=-2)
    tokens, mask = _padded(m, RAGGED, "left")
    left = mi_lenses.direct_logit_attribution(m, tokens, attention_mask=mask, answer=" city", position=-2)
    for b, p in enumerate(RAGGED):
        one = mi_lenses.direct_logit_attribution(m, p, answer=" city", position=-2)
        for res in (batch, left):
            close(res.values()[b], one.values()[0], f"{world.id} DLA prompt {b}", 128 * EPS)
            close(res.neurons[b], one.neurons[0], f"{world.id} DLA neurons prompt {b}", 128 * EPS)
            n = len(one.str_tokens[0])
            close(res.sources[b, ..., :n], one.sources[0], f"{world.id} DLA sources prompt {b}", 128 * EPS)
            assert res.positions[b] == one.positions[0]
    sw = mi_lenses.sweep(m, RAGGED[:4], positions=[-1], target_layers="same", progress=False)
    for b, p in enumerate(RAGGED[:4]):
        one = mi_lenses.sweep(m, p, positions=[-1], target_layers="same", progress=False)
        assert sw.positions[b] == (b, one.positions[0][1])
        close(sw.surprisal[..., b], one.surprisal[..., 0], f"{world.id} sweep prompt {b}", 128 * EPS)
        assert torch.equal(sw.top1_ids[..., b], one.top1_ids[..., 0])


# ------------------------------------------------------------------------------------------------ across worlds
def _graph_transcoders(m) -> mi_lenses.DictionarySet | None:
    """Random TopK skip transcoders from ``hook_resid_mid`` to ``hook_mlp_out`` (the same residual stream in both
    worlds); None on a parallel-attention model, which has no ``resid_mid``."""
    if getattr(m.cfg, "parallel_attn_mlp", False):
        return None
    g, D = torch.Generator().manual_seed(0), m.cfg.d_model
    return mi_lenses.DictionarySet([
        mi_lenses.Dictionary(torch.randn(D, 24, generator=g) * 0.4, torch.randn(24, generator=g) * 0.1,
                             torch.randn(24, D, generator=g) * 0.2, torch.zeros(D), hook=f"blocks.{l}.hook_resid_mid",
                             hook_out=f"blocks.{l}.hook_mlp_out", activation="topk", k=4,
                             W_skip=torch.randn(D, D, generator=g) * 0.05) for l in range(m.cfg.n_layers)])


def test_attribution_graph_in_this_world(world):
    """The graph verifies (every node's input is its edges plus its constant, logits reproduced) on this world's
    model, leaves its hooks as they were, and its edges equal removing each strong source in the frozen model."""
    ts = _graph_transcoders(world.model)
    if ts is None:
        pytest.skip("no resid_mid on a parallel-attention model")
    before = hook_counts(world.model)
    g = mi_lenses.attribution_graph(world.model, PROMPT, ts, max_feature_nodes=None, progress=False)
    assert hook_counts(world.model) == before and g.layout.n_features == g.n_active
    rep = g.replacement
    n = rep.sources.n_features + rep.n_layers * rep.n_pos + rep.n_pos
    logit = rep.logit_vectors(torch.tensor([int(g.nodes_table.feature[-1])]))[0]
    base = logit @ rep.replay()[1][-1]
    for col in g.edges[-1].abs().topk(3).indices.tolist():  # the last logit's strongest sources, one at a time
        scale = torch.ones(n)
        scale[g.source_index[col]] = 0.0
        moved = base - logit @ rep.replay(scale)[1][-1]
        close(moved, g.edges[-1, col], f"{world.id} edge {col}", 1e-4)
    g.prune().to_json()


def _numbers(m) -> dict[str, torch.Tensor]:
    res = mi_lenses.logit_lens(m, RAGGED, targets=[" city"], top_k=5)
    dla = mi_lenses.direct_logit_attribution(m, RAGGED, answer=" city", wrong="Paris")
    ps = mi_lenses.patchscope(m, mi_lenses.Source(PROMPT, layers=[0, 1]), max_new_tokens=3, stop_at_eos=False)
    jl = mi_lenses.fit_jacobian_lens(m, RAGGED[1:2], skip_first_positions=2, progress=False)
    data = torch.randint(3, m.cfg.d_vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    cmp = mi_lenses.compare_lenses(m, data, {"patchscope": "patchscope", "jacobian": jl,
                                             "future": mi_lenses.fit_future_lens(m, data, ahead=1, progress=False)},
                                   progress=False)
    more = {f"cmp_{n}_{k}": torch.tensor(v) for n, d in cmp.stats.items() for k, v in d.items()}
    si = mi_lenses.selfie(m, PROMPT, layers=[1], inject_layer=0, max_new_tokens=3, stop_at_eos=False)
    more.update({f"jlens_{r}": w for r, w in jl.W.items()}, selfie_ids=si.generated_ids, selfie_rel=si.relevancy)
    att = mi_lenses.attention(m, RAGGED[:3], induction_length=8)
    more.update(att_patterns=att.patterns, att_induction=att.induction, att_qk=att.qk_terms(1, 0, batch=1).products)
    # circuit analysis, raw metric values (a small clean-corrupted gap would magnify normalised differences)
    clean, corrupted = PATCH_PAIR
    a, w = m.to_single_token("Paris"), m.to_single_token(" city")

    def raw(lg):
        return (lg[:, -1, a] - lg[:, -1, w]).mean()

    for what in ("resid_pre", "resid_mid", "head_out", "head_v"):
        if what == "resid_mid" and getattr(m.cfg, "parallel_attn_mlp", False):
            continue
        more[f"patch_exact_{what}"] = mi_lenses.activation_patching(m, clean, corrupted, metric=raw, what=what,
                                                                    progress=False).values
    more["patch_attribution"] = mi_lenses.activation_patching(m, clean, corrupted, metric=raw, what="head_out",
                                                              by="layer_pos_head", method="attribution").values
    more["patch_path"] = mi_lenses.path_patching(m, clean, corrupted, metric=raw, progress=False).values
    more["patch_edges"] = mi_lenses.edge_attribution(m, clean, corrupted, metric=raw).scores.nan_to_num(0.0)
    ts = _graph_transcoders(m)
    if ts is not None:
        more["patch_graph_edges"] = mi_lenses.attribution_graph(m, PROMPT, ts, max_feature_nodes=None,
                                                                progress=False).edges
    return {**more, "top_ids": res.top_ids, "logp": res.top_logits - res.logsumexp[..., None], "kl": res.kl,
            "entropy": res.entropy, "ce": res.cross_entropy, "dla_heads": dla.heads, "dla_mlps": dla.mlps,
            "dla_neurons": dla.neurons, "dla_actual": dla.actual, "ps_top_ids": ps.top_ids,
            "ps_logp": ps.top_logprobs, "ps_generated": ps.generated_ids}


def _reference(name: str, ours: dict) -> dict | None:
    """The 4.x bridge writes its numbers to ``$MI_LENSES_WORLD_REFS/name`` (and gets ``None``); the 3.x world reads
    them back to compare (a missing file fails under CI, is skipped elsewhere)."""
    path = Path(REFS) / name
    if KIND == "bridge":
        torch.save(ours, path)
        return None
    if not path.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing: run the TransformerLens 4.x suite first (scripts/test.sh does).")
        pytest.skip(f"no reference {path} from a TransformerLens 4.x run")
    return torch.load(path, weights_only=True)


def test_both_worlds_give_the_same_numbers(world):
    if not REFS:
        pytest.skip("set MI_LENSES_WORLD_REFS to compare with the other TransformerLens world (CI does)")
    ours = _numbers(world.model)
    theirs = _reference(f"{world.arch}-{world.mode}.pt", ours)
    if theirs is None:
        return
    for key, ref in theirs.items():
        mine = ours[key]
        if ref.dtype == torch.long:
            assert torch.equal(mine, ref), f"{world.id} {key}: differs from the 4.x bridge"
        else:  # Jacobians go through a backward pass whose float32 summation order differs between the worlds
            close(mine, ref, f"{world.id} {key} vs the 4.x bridge",
                  1e-4 if key.startswith(("jlens", "patch_")) else 1e-5)


def test_every_statistic_of_a_world_needs_a_real_model():
    """The worlds' fixture models are what the environment says (guards against testing the same world twice)."""
    import importlib.metadata

    major = int(importlib.metadata.version("transformer-lens").split(".")[0])
    assert KIND == ("bridge" if major >= 4 else "hooked")


@pytest.mark.slow
def test_embedded_model_in_this_world(smol):
    """The embedded SmolLM2 loads offline as this world's model, shows real behaviour, and gives the other world's
    numbers."""
    assert type(smol).__name__ == ("TransformerBridge" if KIND == "bridge" else "HookedTransformer")
    res = mi_lenses.logit_lens(smol, ["The capital of France is", "The capital of Italy is the city of"],
                               targets=" Paris", positions=[-1])
    paris = smol.to_single_token(" Paris")
    assert int(res.top_ids[-1, 0, 0, 0]) == paris and not (res.top_ids[:10, 0, 0, 0] == paris).any()
    dla = mi_lenses.direct_logit_attribution(smol, "When Mary and John went to the store, John gave a drink to",
                                             answer=" Mary", wrong=" John")
    ours = {"top_ids": res.top_ids, "logp": res.top_logits - res.logsumexp[..., None], "kl": res.kl,
            "dla_heads": dla.heads, "dla_actual": dla.actual}
    if not REFS:
        pytest.skip("set MI_LENSES_WORLD_REFS to compare with the other TransformerLens world (CI does)")
    theirs = _reference("smollm2.pt", ours)
    if theirs is None:
        return
    assert torch.equal(ours["top_ids"], theirs["top_ids"])
    for key in ("logp", "kl", "dla_heads", "dla_actual"):
        close(ours[key], theirs[key], f"SmolLM2 {key} vs the 4.x bridge", 128 * EPS)


def test_ragged_batch_matches_nnterp(world):
    """An independent oracle for batched lenses: nnterp's ``logit_lens`` (nnsight on the same HF weights, left padding,
    each prompt's last token, the output of every block) gives our probabilities for a ragged batch. GPT-2's learned
    positions are shifted by nnsight's left padding, so there nnterp runs one prompt at a time."""
    nnterp = pytest.importorskip("nnterp", reason="nnterp is a test extra (CI installs it)")
    from nnterp.interventions import logit_lens as nnterp_logit_lens

    if world.arch not in ("llama_gqa", "qwen2", "gpt2") or world.compat:
        pytest.skip("nnterp standardises these architectures; compared on the raw weights")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nm = nnterp.StandardizedTransformer(str(world.folder))
        if world.arch == "gpt2":
            theirs = torch.cat([nnterp_logit_lens(nm, [p]) for p in RAGGED]).double()
        else:
            theirs = nnterp_logit_lens(nm, RAGGED).double()  # [B, L, V]
    # the tokenizer adds BOS for nnterp; TransformerLens's default for Qwen2 does not
    ours = mi_lenses.logit_lens(world.model, RAGGED, positions=[-1], point="resid_post", return_logits=True,
                                prepend_bos=True)
    probs = ours.logits[:, :, 0].double().softmax(-1).transpose(0, 1)  # [B, L + 1, V]: rows embed, 0_post .. final
    close(probs[:, 1:], theirs, f"{world.id} vs nnterp", 128 * EPS)
