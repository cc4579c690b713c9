"""Circuit analysis against independent oracles, on every tiny architecture (raw bridge and compatibility mode):

* exact activation patching == TransformerLens's ``patching.get_act_patch_*`` (1e-4) for every ``what``/``by`` they
  have, and == a brute-force hook for ``resid_mid`` (the bridge's ``hook_resid_mid`` is ln2's input);
* attribution patching == TL 4.3's ``tools.analysis.attribution_patching.attribution_patch`` (node granularity);
  EAP-IG's embedding cut sums to the metric difference as ``ig_steps`` grows;
* edges: every writer's edge scores sum to its node attribution; circuits: the full circuit recovers exactly 1, the
  empty one exactly 0 (resample ablation), node circuits likewise;
* path patching == a brute-force two-step hook implementation (Wang et al.) and == TL's
  ``patching.get_act_patch_direct_path`` with frozen MLPs;
* batched pairs == the mean of single pairs, position maps, noising, a callable metric, the result protocol,
  the command line, bad input, and no hook left behind.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from conftest import hook_counts

import mi_lenses
from mi_lenses.errors import LensInputError
from mi_lenses.viz.html import esc
from tolerance import EPS, TIGHT

CLEAN, CORRUPTED = "The capital of France is", "The capital of Rome is"  # 14 tokens each with the tiny tokenizer
ANSWER, WRONG = "Paris", " city"


def _metric(m, clean_tokens, corrupted_tokens):
    """The normalised logit difference, written out for TransformerLens's ``patching_metric``."""
    a, w = m.to_single_token(ANSWER), m.to_single_token(WRONG)
    with torch.no_grad():
        cl, xl = m(clean_tokens), m(corrupted_tokens)

    def ld(lg):
        return (lg[:, -1, a] - lg[:, -1, w]).mean()

    c, x = float(ld(cl)), float(ld(xl))
    return lambda lg: (ld(lg) - x) / (c - x)


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stderr(io.StringIO()):  # TransformerLens's tqdm bars
        return fn(*args, **kwargs)


def _patch(m, **kw):
    kw.setdefault("answer", ANSWER)
    kw.setdefault("wrong", WRONG)
    return mi_lenses.activation_patching(m, CLEAN, CORRUPTED, progress=False, **kw)


# ------------------------------------------------------------------------------------------------ exact vs TL
CASES = [("resid_pre", None, "get_act_patch_resid_pre", None), ("attn_out", None, "get_act_patch_attn_out", None),
         ("mlp_out", None, "get_act_patch_mlp_out", None),
         ("head_out", None, "get_act_patch_attn_head_out_all_pos", None),
         ("head_out", "layer_pos_head", "get_act_patch_attn_head_out_by_pos", None),
         ("head_q", None, "get_act_patch_attn_head_q_all_pos", None),
         ("head_k", "layer_pos_head", "get_act_patch_attn_head_k_by_pos", None),
         ("head_v", None, "get_act_patch_attn_head_v_all_pos", None),
         ("head_pattern", None, "get_act_patch_attn_head_pattern_all_pos", None),
         ("head_pattern", "layer_pos_head", "get_act_patch_attn_head_pattern_by_pos", (0, 2, 1))]


def test_exact_equals_transformer_lens_patching(tiny):
    from transformer_lens import patching

    m = tiny.model
    before = hook_counts(m)
    ct, xt = m.to_tokens(CLEAN), m.to_tokens(CORRUPTED)
    metric = _metric(m, ct, xt)
    _, clean_cache = m.run_with_cache(ct)
    cases = CASES if not tiny.compat else [c for c in CASES if c[0] in ("resid_pre", "head_k", "head_pattern")]
    for what, by, name, perm in cases:  # the compatibility-mode twin: the cases its folded weights change most
        ours = _patch(m, what=what, by=by)
        ref = _quiet(getattr(patching, name), m, xt, clean_cache, metric).cpu()
        ref = ref.permute(*perm) if perm else ref
        assert ours.values.shape == ref.shape, (tiny.id, what, by)
        assert torch.allclose(ours.values, ref, atol=1024 * EPS), (tiny.id, what, by, float((ours.values - ref).abs().max()))
        assert ours.engine == "replay" and ours.passes >= 1
    assert hook_counts(m) == before


def test_resid_mid_patches_the_residual_stream(tiny):
    """``resid_mid`` equals a brute-force patch of the residual stream (written into hook_attn_out); on a bridge
    TransformerLens's own get_act_patch_resid_mid patches only the MLP's input (ln2.hook_in)."""
    m = tiny.model
    if getattr(m.cfg, "parallel_attn_mlp", False):
        with pytest.raises(LensInputError, match="parallel"):
            _patch(m, what="resid_mid")
        return
    ct, xt = m.to_tokens(CLEAN), m.to_tokens(CORRUPTED)
    metric = _metric(m, ct, xt)
    _, cc = m.run_with_cache(ct)
    _, xc = m.run_with_cache(xt)
    ours = _patch(m, what="resid_mid")
    for l, p in [(0, 9), (1, ct.shape[1] - 1), (m.cfg.n_layers - 1, 10)]:
        delta = (cc[f"blocks.{l}.hook_resid_mid"] - xc[f"blocks.{l}.hook_resid_mid"])[:, p]

        def add(t, hook=None, p=p, delta=delta):
            t = t.clone()
            t[:, p] += delta
            return t

        with torch.no_grad():
            brute = float(metric(m.run_with_hooks(xt, fwd_hooks=[(f"blocks.{l}.hook_attn_out", add)])))
        assert float(ours.values[l, p]) == pytest.approx(brute, abs=1024 * EPS), (tiny.id, l, p)


def test_noising_layers_and_a_callable_metric(tiny_pair):
    from transformer_lens import patching

    m = tiny_pair.model
    ct, xt = m.to_tokens(CLEAN), m.to_tokens(CORRUPTED)
    metric = _metric(m, ct, xt)
    _, xc = m.run_with_cache(xt)
    noised = _patch(m, what="resid_pre", mode="noise")
    ref = _quiet(patching.get_act_patch_resid_pre, m, ct, xc, metric).cpu()  # corrupted into clean
    assert torch.allclose(noised.values, ref, atol=1024 * EPS)
    some = _patch(m, what="head_out", layers=[0, -1])
    full = _patch(m, what="head_out")
    assert some.layers == [0, m.cfg.n_layers - 1] and torch.allclose(some.values, full.values[[0, -1]], atol=TIGHT)
    raw = mi_lenses.activation_patching(m, CLEAN, CORRUPTED, metric=metric, what="resid_pre", progress=False)
    assert not raw.normalised and torch.allclose(raw.values, _patch(m, what="resid_pre").values, atol=1024 * EPS)


def test_batched_pairs_are_the_mean_of_single_pairs(tiny_pair):
    """Two pairs in one call: TransformerLens's metric is the mean over the batch; ours the same."""
    from transformer_lens import patching

    m = tiny_pair.model
    ct = m.to_tokens([CLEAN, "The capital of Paris is"])
    xt = m.to_tokens([CORRUPTED, "The capital of Paris is"])
    xt[1, 2] = ct[1, 3]  # a corrupted second prompt of the same length
    metric = _metric(m, ct, xt)
    _, cc = m.run_with_cache(ct)
    ours = mi_lenses.activation_patching(m, ct, xt, answer=ANSWER, wrong=WRONG, what="head_out", progress=False,
                                         max_batch=5)
    ref = _quiet(patching.get_act_patch_attn_head_out_all_pos, m, xt, cc, metric).cpu()
    assert ours.n_prompts == 2 and ours.passes > 1 and torch.allclose(ours.values, ref, atol=1024 * EPS)


def test_position_map_aligns_prompts_of_different_lengths(tiny_pair):
    m = tiny_pair.model
    longer = "The capital of France is known"
    with pytest.raises(LensInputError, match="position_map"):
        mi_lenses.activation_patching(m, longer, CORRUPTED, answer=ANSWER, progress=False)
    n = m.to_tokens(CORRUPTED).shape[1]
    extra = m.to_tokens(longer).shape[1] - n
    # the clean prompt's last n positions are aligned with the corrupted prompt's n
    res = mi_lenses.activation_patching(m, longer, CORRUPTED, answer=ANSWER, wrong=WRONG, what="resid_pre",
                                        position_map={extra + p: p for p in range(n)}, progress=False)
    xt, lt = m.to_tokens(CORRUPTED), m.to_tokens(longer)
    _, lc = m.run_with_cache(lt)
    metric = _metric(m, lt, xt)
    for l, p in [(0, 2), (1, n - 1)]:
        def put(t, hook=None, l=l, p=p):
            t = t.clone()
            t[:, p] = lc[f"blocks.{l}.hook_resid_pre"][:, extra + p]
            return t

        with torch.no_grad():
            brute = float(metric(m.run_with_hooks(xt, fwd_hooks=[(f"blocks.{l}.hook_resid_pre", put)])))
        assert float(res.values[l, p]) == pytest.approx(brute, abs=1024 * EPS)
    with pytest.raises(LensInputError, match="same length"):
        mi_lenses.activation_patching(m, longer, CORRUPTED, answer=ANSWER, what="head_pattern",
                                      position_map={extra + p: p for p in range(n)}, progress=False)


# ------------------------------------------------------------------------------------------------ attribution
def test_attribution_equals_transformer_lens_attribution_patch(tiny):
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    m = tiny.model
    ct, xt = m.to_tokens(CLEAN), m.to_tokens(CORRUPTED)
    tl = attribution_patch(m, ct, xt, _metric(m, ct, xt))
    L, H, S = m.cfg.n_layers, m.cfg.n_heads, ct.shape[1]
    heads, mlps, embed = torch.zeros(L, S, H), torch.zeros(L, S), torch.zeros(S)
    for node, v in tl.node_scores.items():
        if node.kind == "attn_head_out":
            heads[node.layer, node.position, node.head] = v
        elif node.kind == "mlp_out":
            mlps[node.layer, node.position] = v
        elif node.kind == "embed":
            embed[node.position] = v
    ours_h = _patch(m, what="head_out", by="layer_pos_head", method="attribution")
    ours_m = _patch(m, what="mlp_out", method="attribution")
    assert ours_h.engine == "gradient"
    assert torch.allclose(ours_h.values, heads, atol=1024 * EPS), float((ours_h.values - heads).abs().max())
    assert torch.allclose(ours_m.values, mlps, atol=1024 * EPS)
    if tiny.arch != "gpt2":  # rotary models: hook_embed is the whole residual entering block 0
        ours_e = _patch(m, what="resid_pre", method="attribution", layers=[0])
        assert torch.allclose(ours_e.values[0], embed, atol=1024 * EPS)


def test_attribution_is_the_first_order_term_of_exact(tiny_pair):
    """On a tiny step along the clean - corrupted direction, exact patching and attribution agree."""
    m = tiny_pair.model
    ct, xt = m.to_tokens(CLEAN), m.to_tokens(CORRUPTED)
    with torch.no_grad():
        emb = m.run_with_cache(ct)[1]["blocks.0.hook_resid_pre"]
        base = m.run_with_cache(xt)[1]["blocks.0.hook_resid_pre"]
    eps = 1e-3
    near = base + eps * (emb - base)

    def at(x):
        def hook(t, hook=None):
            return x.clone()

        return hook

    metric = _metric(m, ct, xt)
    att = _patch(m, what="resid_pre", method="attribution", layers=[0]).values[0]
    with torch.no_grad():
        moved = float(metric(m.run_with_hooks(xt, fwd_hooks=[("blocks.0.hook_resid_pre", at(near))])))
    assert moved == pytest.approx(eps * float(att.sum()), rel=0.05, abs=TIGHT)


def test_eap_ig_completeness(tiny_pair):
    m = tiny_pair.model
    errs = []
    for steps in (4, 32, 128):  # the midpoint rule: the error falls as 1 / steps²
        res = _patch(m, what="head_out", method="eap_ig", ig_steps=steps)
        cut, diff = res.completeness
        assert diff == 1.0 and res.ig_steps == steps
        errs.append(abs(cut - diff))
    assert errs[2] < 3e-3 and errs[2] < errs[1] < errs[0], errs
    noised = _patch(m, what="resid_pre", method="eap_ig", mode="noise", ig_steps=128)
    assert noised.completeness[1] == -1.0 and abs(noised.completeness[0] + 1.0) < 3e-3


# ------------------------------------------------------------------------------------------------ edges, circuits
def test_edges_sum_to_nodes_and_circuits_recover_exactly(tiny):
    m = tiny.model
    before = hook_counts(m)
    flags = (m.cfg.use_split_qkv_input, getattr(m.cfg, "use_hook_mlp_in", False))
    edges = mi_lenses.edge_attribution(m, CLEAN, CORRUPTED, answer=ANSWER, wrong=WRONG)
    nodes = _patch(m, what="head_out", method="attribution")
    L, H = m.cfg.n_layers, m.cfg.n_heads
    score = edges.node_scores()
    per_head = torch.stack([score[[edges.writers.index(f"L{l}H{h}") for h in range(H)]] for l in range(L)])
    assert torch.allclose(per_head, nodes.values, atol=1024 * EPS)
    mlp = _patch(m, what="mlp_out", method="attribution")
    assert torch.allclose(score[[edges.writers.index(f"MLP{l}") for l in range(L)]], mlp.values.sum(-1), atol=1024 * EPS)
    assert mi_lenses.faithfulness(m, edges.circuit(threshold=0.0)).faithfulness == pytest.approx(1.0, abs=1024 * EPS)
    assert mi_lenses.faithfulness(m, edges.circuit(edges=0)).faithfulness == pytest.approx(0.0, abs=1024 * EPS)
    every_node = edges.circuit(nodes=len(edges.writers) - 1)
    assert mi_lenses.faithfulness(m, every_node).faithfulness == pytest.approx(1.0, abs=1024 * EPS)
    for ablation in ("mean", "zero"):
        c = mi_lenses.faithfulness(m, edges.circuit(edges=10), ablation=ablation)
        assert c.ablation == ablation and c.faithfulness == c.faithfulness  # a number
    assert (m.cfg.use_split_qkv_input, getattr(m.cfg, "use_hook_mlp_in", False)) == flags
    assert hook_counts(m) == before


def test_edge_circuit_cuts_only_what_it_names(tiny_pair):
    """Cutting one edge by hand: the reader's input is rebuilt with the writer's corrupted output (brute force)."""
    m = tiny_pair.model
    edges = mi_lenses.edge_attribution(m, CLEAN, CORRUPTED, answer=ANSWER, wrong=WRONG)
    L = m.cfg.n_layers
    kept = [(w, r) for w, r, _ in edges.top_edges(edges.n_edges) if not (w == "L0H0" and r == "logits")]
    circuit = mi_lenses.Circuit(edges.model_name, "edges", kept, [], {}, edges.n_edges, L, m.cfg.n_heads,
                                m.cfg.n_key_value_heads or m.cfg.n_heads, edges.spec)
    got = mi_lenses.faithfulness(m, circuit)
    ct, xt = m.to_tokens(CLEAN), m.to_tokens(CORRUPTED)
    _, cc = m.run_with_cache(ct)
    _, xc = m.run_with_cache(xt)
    W_O = m.blocks[0].attn.W_O[0]
    diff = (cc["blocks.0.attn.hook_z"][:, :, 0] - xc["blocks.0.attn.hook_z"][:, :, 0]) @ W_O

    def cut(t, hook=None):
        return t - diff

    metric = _metric(m, ct, xt)
    with torch.no_grad():
        brute = float(metric(m.run_with_hooks(ct, fwd_hooks=[(f"blocks.{L - 1}.hook_resid_post", cut)])))
    assert got.faithfulness == pytest.approx(brute, abs=1024 * EPS)


# ------------------------------------------------------------------------------------------------ path patching
def _brute_path(m, xt, cc, xc, senders, receivers, metric):
    recorded = {}

    def freeze(l):
        def hook(t, hook=None):
            out = xc[f"blocks.{l}.attn.hook_z"].clone()
            for sl, sh in senders:
                if sl == l:
                    out[:, :, sh] = cc[f"blocks.{l}.attn.hook_z"][:, :, sh]
            return out

        return hook

    hooks = [(f"blocks.{l}.attn.hook_z", freeze(l)) for l in range(m.cfg.n_layers)]
    for key in receivers:
        hooks.append((f"blocks.{key[0]}.attn.hook_{key[2]}",
                      lambda t, hook=None, key=key: recorded.__setitem__(key, t[:, :, key[1]].clone())))
    with torch.no_grad():
        logits = m.run_with_hooks(xt, fwd_hooks=hooks)
    if not receivers:
        return float(metric(logits))

    def put(key):
        def hook(t, hook=None):
            t = t.clone()
            t[:, :, key[1]] = recorded[key]
            return t

        return hook

    with torch.no_grad():
        return float(metric(m.run_with_hooks(xt, fwd_hooks=[(f"blocks.{k[0]}.attn.hook_{k[2]}", put(k))
                                                           for k in receivers])))


def test_path_patching_equals_brute_force_and_direct_paths(tiny):
    from transformer_lens import patching

    m = tiny.model
    ct, xt = m.to_tokens(CLEAN), m.to_tokens(CORRUPTED)
    metric = _metric(m, ct, xt)
    _, cc = m.run_with_cache(ct)
    _, xc = m.run_with_cache(xt)
    L, H = m.cfg.n_layers, m.cfg.n_heads
    kw = dict(answer=ANSWER, wrong=WRONG, progress=False)
    to_logits = mi_lenses.path_patching(m, CLEAN, CORRUPTED, receivers="logits", **kw)
    for l, h in [(0, 0), (L - 1, H - 1), (1, 1)]:
        assert float(to_logits.values[l, h]) == pytest.approx(_brute_path(m, xt, cc, xc, [(l, h)], [], metric),
                                                              abs=1024 * EPS)
    receivers = [(L - 1, 0, "q"), (L - 1, 0, "v")]
    into = mi_lenses.path_patching(m, CLEAN, CORRUPTED, receivers=receivers, **kw)
    assert torch.isnan(into.values[L - 1]).all() and not torch.isnan(into.values[: L - 1]).any()
    assert float(into.values[0, 1]) == pytest.approx(_brute_path(m, xt, cc, xc, [(0, 1)], receivers, metric), abs=1024 * EPS)
    gqa = (m.cfg.n_key_value_heads or H) != H
    for comp in ("q",) if gqa else ("q", "k", "v"):
        ours = mi_lenses.path_patching(m, CLEAN, CORRUPTED, senders=[(0, 1)], receivers=comp, freeze="heads_and_mlps",
                                       **kw)
        ref = _quiet(patching.get_act_patch_direct_path, m, xt, cc, xc, metric, 0, 1, component=comp,
                     verbose=False).cpu()
        assert torch.isnan(ours.values[0]).all()
        assert torch.allclose(ours.values[1:], ref[1:], atol=1024 * EPS), (tiny.id, comp)


# ------------------------------------------------------------------------------------------------ protocol, CLI
def test_results_render_and_export(tiny_pair, tmp_path):
    m = tiny_pair.model
    results = [_patch(m, what="resid_pre"), _patch(m, what="head_out", by="layer_pos_head", method="attribution"),
               _patch(m, what="neurons", method="attribution"), _patch(m, what="attn_out", by="layer"),
               mi_lenses.path_patching(m, CLEAN, CORRUPTED, answer=ANSWER, wrong=WRONG, progress=False)]
    edges = mi_lenses.edge_attribution(m, CLEAN, CORRUPTED, answer=ANSWER, wrong=WRONG, method="eap_ig", ig_steps=3)
    results += [edges, mi_lenses.faithfulness(m, edges.circuit(edges=8)), edges.circuit(nodes=3)]
    for res in results:
        page = res.to_html(tmp_path / "r.html")
        assert page.startswith("<!DOCTYPE html>") and "cdn" not in page.lower()
        res.show()._repr_html_()
        res.print(width=140)
        json.loads(res.to_json(tmp_path / "r.json"))
        assert len(res.to_dataframe())
    grid = results[0]
    page = grid.to_html()
    assert all(esc(tok) in page for tok in grid.pos_labels[:3])  # the columns are the tokens
    assert "<svg" in results[5].to_html()
    d = grid.to_dict()
    assert d["axes"] == ["layer", "pos"] and len(d["values"]) == m.cfg.n_layers and d["top"]


def test_command_line(hf_folder, tmp_path, capsys):
    from mi_lenses.cli import main

    args = ["patch", CLEAN, CORRUPTED, "--answer", ANSWER, "--wrong", WRONG, "--model", str(hf_folder)]
    assert main(args + ["--what", "head_out", "--json", str(tmp_path / "p.json"), "--html", str(tmp_path / "p.html"),
                        "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "L" in out and f"wrote {tmp_path / 'p.json'}" in out
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["what"] == "head_out" and data["axes"] == ["layer", "head"]
    assert main(args + ["--method", "attribution", "--what", "head_out", "--by", "layer_pos_head"]) == 0
    assert main(args + ["--edges", "12", "--html", str(tmp_path / "c.html")]) == 0
    assert "faithfulness" in capsys.readouterr().out and "<svg" in (tmp_path / "c.html").read_text()
    with pytest.raises(SystemExit) as exit_:  # argparse refuses a value outside the choices --help lists
        main(args + ["--what", "nothing"])
    assert exit_.value.code == 2 and "--what: invalid choice: 'nothing'" in capsys.readouterr().err
    # prompts of different lengths: refused with the flag that aligns them, which then gives the Python call's grid
    longer = ["patch", CLEAN + " known", CORRUPTED, "--answer", ANSWER, "--wrong", WRONG, "--model", str(hf_folder)]
    assert main(longer) == 2 and "--position-map" in capsys.readouterr().err
    m = mi_lenses.load_model(hf_folder)
    n, extra = m.to_tokens(CORRUPTED).shape[1], m.to_tokens(CLEAN + " known").shape[1] - m.to_tokens(CORRUPTED).shape[1]
    pairs = ",".join(f"{extra + p}:{p}" for p in range(n))
    assert main(longer + ["--position-map", pairs, "--json", str(tmp_path / "m.json"), "--no-progress"]) == 0
    want = mi_lenses.activation_patching(m, CLEAN + " known", CORRUPTED, answer=ANSWER, wrong=WRONG,
                                         position_map={extra + p: p for p in range(n)}, progress=False)
    assert torch.allclose(torch.tensor(json.loads((tmp_path / "m.json").read_text())["values"]), want.values,
                          atol=128 * EPS)
    assert main(longer + ["--position-map", "0-0"]) == 2 and "clean:corrupted" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_names_the_fix(tiny_pair):
    m = tiny_pair.model
    with pytest.raises(LensInputError, match="answer="):
        mi_lenses.activation_patching(m, CLEAN, CORRUPTED, progress=False)
    with pytest.raises(LensInputError, match="what="):
        _patch(m, what="logits")
    with pytest.raises(LensInputError, match="no head axis"):
        _patch(m, what="resid_pre", by="layer_head")
    with pytest.raises(LensInputError, match="method"):
        _patch(m, method="integrated")
    with pytest.raises(LensInputError, match="ig_steps"):
        _patch(m, method="attribution", ig_steps=4)
    with pytest.raises(LensInputError, match="same"):
        _patch(m, wrong=ANSWER)  # answer == wrong: the metric does not separate the runs
    with pytest.raises(LensInputError, match="corrupted prompt per clean"):
        mi_lenses.activation_patching(m, [CLEAN, CLEAN], CORRUPTED, answer=ANSWER, progress=False)
    with pytest.raises(LensInputError, match="mode"):
        _patch(m, mode="both")
    with pytest.raises(LensInputError, match="grid"):
        mi_lenses.path_patching(m, CLEAN, CORRUPTED, answer=ANSWER, senders=[(0, 0)], receivers="logits")
    with pytest.raises(LensInputError, match="exactly one"):
        mi_lenses.edge_attribution(m, CLEAN, CORRUPTED, answer=ANSWER, wrong=WRONG).circuit()


def test_report_gains_a_patching_section(tiny_pair, tmp_path):
    m = tiny_pair.model
    rep = mi_lenses.report(m, CLEAN, answer=ANSWER, wrong=WRONG, corrupted=CORRUPTED,
                           sections=["logit_lens", "patching"], progress=False)
    assert rep.sections == ["logit_lens", "patching"]
    assert torch.allclose(rep.patching.values, _patch(m, what="resid_pre").values, atol=TIGHT)
    assert rep.patching_heads.method == "attribution"
    page = rep.to_html(tmp_path / "r.html")
    assert 'id="patching"' in page and "Activation patching" in page
    assert set(rep.to_dict()) >= {"patching", "patching_heads"}
    rep.print(width=160)
    with pytest.raises(LensInputError, match="corrupted"):
        mi_lenses.report(m, CLEAN, sections=["patching"], progress=False)
    default = mi_lenses.report(m, CLEAN, sections=None, patchscope_positions=1, progress=False)
    assert "patching" not in default.sections
