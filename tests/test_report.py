"""report(): every section against its own entry point and an independent HF oracle, the page, the terminal summary,
the command, and the view polish (target ranks in terminal tables, distinct repeated tokens, strides that keep the
last layer, long prompts)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import mi_lenses
from conftest import PROMPT, hook_counts
from mi_lenses.errors import LensInputError
from oracles import close, hf_final_norm
from tolerance import EPS, TIGHT

TEXT = "The capital of France is the capital of"


@pytest.fixture(scope="module")
def tuned(llama_raw):
    lens = mi_lenses.TunedLens.from_model(llama_raw.model)
    with torch.no_grad():  # a non-trivial lens
        lens.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        lens.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    return lens


@pytest.fixture(scope="module")
def rep(llama_raw, tuned):
    return mi_lenses.report(llama_raw.model, TEXT, lens=tuned, wrong=" city", patchscope_positions=4,
                            progress=False)


@torch.no_grad()
def _hf_block_outputs(tm, tokens):
    """The HF model's logits and its block outputs decoded (norm + head): ``[L, S, V]``, float64; the last block's
    output is the model's own logits."""
    out = tm.hf(tokens, output_hidden_states=True)
    norm, head = hf_final_norm(tm.hf), tm.hf.get_output_embeddings()
    L = tm.model.cfg.n_layers
    rows = [head(norm(out.hidden_states[l + 1]))[0] for l in range(L - 1)] + [out.logits[0]]
    return out.logits[0].double(), torch.stack(rows).double()


def test_every_section_is_its_own_entry_point(rep, llama_raw, tuned):
    m = llama_raw.model
    assert rep.sections == ["logit_lens", "tuned_lens", "patchscope", "dla", "attention"]
    ll = mi_lenses.logit_lens(m, TEXT, targets=[rep.prediction_id, " city"])
    assert torch.equal(rep.logit_lens.top_ids, ll.top_ids) and torch.equal(rep.logit_lens.target_ranks,
                                                                           ll.target_ranks)
    close(rep.tuned_lens.kl, tuned(m, TEXT).kl, "tuned lens", TIGHT)
    dla = mi_lenses.direct_logit_attribution(m, TEXT, answer=rep.prediction_id, wrong=" city")
    close(rep.dla.values(), dla.values(), "DLA", TIGHT)
    assert rep.dla.metric == dla.metric and rep.answer == rep.prediction
    att = mi_lenses.attention(m, TEXT)
    assert torch.equal(rep.attention.patterns, att.patterns)
    close(rep.attention.induction, att.induction, "induction", TIGHT)
    sw = mi_lenses.sweep(m, TEXT, mi_lenses.presets.identity(), target_layers="same", positions=[-4, -3, -2, -1],
                         progress=False)
    assert torch.equal(rep.patchscope.prec_at_1, sw.prec_at_1)


def test_precision_per_layer_and_prediction_against_the_hf_model(rep, llama_raw):
    """The logit lens's precision@1 per block output, and the model's prediction, from the untouched HF model."""
    tokens = llama_raw.model.to_tokens(TEXT)
    logits, rows = _hf_block_outputs(llama_raw, tokens)
    pred = logits[-4:].argmax(-1)
    hits = (rows[:, -4:].argmax(-1) == pred).double().mean(-1)
    close(rep.lens_precision, hits, "logit-lens precision@1 per layer vs HF", 1e-9)
    assert rep.prediction_id == int(logits[-1].argmax())
    assert rep.prediction_prob == pytest.approx(float(logits[-1].softmax(-1).max()), abs=128 * EPS)
    assert float(rep.patchscope.per_layer()[-1]) == 1.0 and float(rep.lens_precision[-1]) == 1.0
    per = rep.to_dataframe()
    assert per["patchscope_prec_at_1"].tolist()[1:] == pytest.approx(rep.patchscope.per_layer().tolist())
    assert per["lens_prec_at_1"].tolist()[1:] == pytest.approx(rep.lens_precision.tolist())
    assert per["layer"].tolist() == rep.logit_lens.labels and per["rank_prediction"].iloc[-1] == 0


def test_top_tokens_are_chosen_by_their_best_probability_at_any_layer(rep, llama_raw):
    """The trajectory shows the tokens some layer believed most (not only the final layer's), with exact
    probabilities at every layer (HF oracle)."""
    from oracles import hf_lens_logits

    ll, traj = rep.logit_lens, rep.trajectory
    last = ll.columns(0)[-1]
    chosen = traj.target_ids.tolist()
    best: dict[int, float] = {}
    for r in range(len(ll.labels)):
        for i, p in zip(ll.top_ids[r, 0, last].tolist(), ll.top_probs[r, 0, last].tolist()):
            best[i] = max(best.get(i, 0.0), p)
    picked = [i for i in chosen if i in best]
    assert len(picked) == min(6, len(best))
    assert min(best[i] for i in picked) >= max([p for i, p in best.items() if i not in picked], default=0.0)
    tokens = llama_raw.model.to_tokens(TEXT)
    oracle = hf_lens_logits(llama_raw, tokens)[:, 0, -1].log_softmax(-1)  # [rows, V]
    close(traj.target_probs[:, 0, 0], oracle[:, chosen].exp(), "trajectory probabilities vs HF", 128 * EPS)


def test_sections_answer_wrong_and_errors(llama_raw, capsys):
    m = llama_raw.model
    before = hook_counts(m)
    rep = mi_lenses.report(m, PROMPT, answer=" city", sections=["dla", "logit_lens"], progress=True)
    assert "report" in capsys.readouterr().err  # the progress bar
    assert rep.sections == ["logit_lens", "dla"] and rep.patchscope is None and rep.attention is None
    assert rep.answer == " city" and rep.dla.metric == "logit[' city']"
    assert rep.to_dataframe()["rank_answer"].iloc[-1] == int(rep.logit_lens.target_ranks[-1, 0, -1,
                                                                                          rep.target_index("answer")])
    page = rep.to_html()
    assert 'id="dla"' in page and 'id="attention"' not in page and "Rank of the answer" in page
    for kwargs, match in [(dict(sections=["tuned_lens"]), "needs a lens"), (dict(sections=["x"]), "unknown report"),
                          (dict(sections=[]), "no section chosen"), (dict(answer=" Parisian"), "not a single token"),
                          (dict(patchscope_positions=0), "patchscope_positions must be a positive int")]:
        with pytest.raises(LensInputError, match=match):
            mi_lenses.report(m, PROMPT, progress=False, **kwargs)
    with pytest.raises(LensInputError, match="one prompt"):
        mi_lenses.report(m, [PROMPT, "A city"], progress=False)
    assert hook_counts(m) == before


def test_the_page(rep, tmp_path):
    page = rep.to_html(tmp_path / "r.html")
    assert page.count("var CircuitsVis=") == 1, "the circuitsvis bundle must be inlined once per page"
    assert not re.search(r"<(script|img|link)[^>]+(src|href)=\"?(https?:)?//", page), "nothing loads from the network"
    assert not re.search(r"<div[^>]*/>", page), "a self-closed div swallows the rest of the page"
    toc = re.search(r'<nav class="toc">(.*?)</nav>', page).group(1)
    for anchor in ("logit-lens", "patchscope", "dla", "attention"):
        assert f'href="#{anchor}"' in toc and f'<section id="{anchor}">' in page
    for text in ("Logit lens and tuned lens", "Rank of the model", "Rank of the wrong token", "KL to the final",
                 "Top tokens per layer", "precision@1", "Largest parts", "Top neurons", "Source positions through",
                 "Head view", "Model view", "Neuron view", "Attention-sink share"):
        assert text in page, text
    top = rep.top_head
    assert f"Neuron view: L{top[0]}H{top[1]}" in page and f"Head view: layer {top[0]}" in page
    data = json.loads(rep.to_json(tmp_path / "r.json"))
    assert data["per_layer"][-1]["layer"] == "final" and set(data) >= {"logit_lens", "tuned_lens", "patchscope", "dla",
                                                                        "attention", "seconds"}
    assert rep.show()._repr_html_().count("var CircuitsVis=") == 1


def test_terminal_summary(rep, capsys):
    rep.print(width=200)
    out = capsys.readouterr().out
    assert "rank ' city'" in out and "Patchscope prec@1" in out and "tuned KL" in out
    assert "DLA" in out and "induction:" in out and "computed in" in out
    rows = [line for line in out.splitlines() if line.startswith("│") and "_pre" in line]
    assert len(rows) <= 2 * 16  # both tables strided to at most 16 layers
    rep.print(width=80)
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 80


def test_command(llama_raw, tmp_path, capsys, monkeypatch):
    import mi_lenses.commands.report as command
    from mi_lenses.cli import main

    monkeypatch.setattr(command, "load", lambda args, **kw: llama_raw.model)
    out = tmp_path / "r.html"
    assert main(["report", PROMPT, "--out", str(out), "--json", str(tmp_path / "r.json"), "--no-progress",
                 "--sections", "logit_lens,attention", "--wrong", " city"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "rank ' city'" in printed
    assert 'id="attention"' in out.read_text() and json.loads((tmp_path / "r.json").read_text())["wrong"] == " city"
    assert main(["report", PROMPT, "--sections", "bogus"]) == 2
    assert main(["report", PROMPT, "--sections", ","]) == 2
    err = capsys.readouterr().err
    assert err.count("mi-lenses: error:") == 2 and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ view polish
def test_terminal_lens_table_shows_target_ranks_and_distinct_repeats(llama_raw, capsys):
    from mi_lenses.cli import main
    import mi_lenses.commands.logit_lens as command

    res = mi_lenses.logit_lens(llama_raw.model, TEXT, targets=[" city", " is"])
    res.print(width=220)
    out = capsys.readouterr().out
    assert "rank ' city'" in out and "rank ' is'" in out
    assert "ap·16" in out and "f·20" in out and "ce " in out  # repeated tokens are told apart, the others not
    last = int(res.target_ranks[-1, 0, -1, 0])
    assert re.search(rf"final .*│ +{last} │", out)
    cmd = pytest.MonkeyPatch()
    cmd.setattr(command, "load", lambda args, **kw: llama_raw.model)
    try:
        assert main(["logit-lens", TEXT, "--target", " city"]) == 0
    finally:
        cmd.undo()
    assert "rank ' city'" in capsys.readouterr().out


def test_long_prompts_stride_scroll_and_keep_the_last_layer(llama_raw, capsys):
    from mi_lenses.viz.html import esc, line_chart

    m = llama_raw.model
    text = " ".join(["one two three four five six seven eight nine ten"] * 2)  # 55 tokens (n_ctx 64)
    res = mi_lenses.logit_lens(m, text, targets=" city")
    n = len(res.positions)
    assert n > 50
    for width in (200, 120, 60):  # as many of the last positions as fit; never cropped at the right edge
        res.print(width=width, max_layers=2)
        out = capsys.readouterr().out
        first, end = map(int, re.search(rf"positions (\d+)\.\.(\d+) of {n} shown", out).groups())
        assert end == n - 1 and 1 <= end - first + 1 <= 12
        assert "final" in out and "embed" in out and "1_pre" not in out and "rank ' city'" in out
        assert max(len(line) for line in out.splitlines()) <= width
    page = res.to_html()
    assert page.count('<div class="scroll">') >= 2 and "position:sticky" in page
    from mi_lenses.viz.lens import column_labels

    labels = column_labels(res, 0, res.columns(0))
    assert len(set(labels)) == n and sum("·" in label for label in labels) > n // 2  # repeats told apart
    assert all(f">{esc(label)}</th>" in page for label in labels)
    labels = [f"x{i}" for i in range(31)]
    chart = line_chart(labels, {"a": list(range(31))}, "y")
    assert ">x30</text>" in chart and ">x1</text>" not in chart  # strided labels, the last one always there


def test_report_rejects_what_a_report_cannot_show(llama_raw):
    rep = mi_lenses.report(llama_raw.model, PROMPT, sections=["logit_lens"], progress=False)
    with pytest.raises(LensInputError, match="batch 1 is out of range"):
        rep.to_dict(batch=1)
    with pytest.raises(LensInputError, match="tracks no wrong token"):
        rep.target_index("wrong")
    assert rep.top_head is None and "No neuron view" not in rep.to_html()
