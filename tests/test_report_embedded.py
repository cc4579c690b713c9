"""The report, the attention and the view polish on the embedded SmolLM2-135M-Instruct: real behaviour, the numbers
the tutorials and the docs quote, a 200-token prompt in the terminal and in the browser (tutorial 05 itself runs as
a notebook in tests/test_tutorials.py)."""

from __future__ import annotations

import time

import pytest

import mi_lenses

pytestmark = pytest.mark.slow

IOI = "When Mary and John went to the store, John gave a drink to"
LONG = ("The history of the city begins in the third century, when a small settlement grew on the banks of the river. "
        "Merchants came from the north and the south, trading salt, wool and iron. Over the next hundred years the "
        "settlement became a market town, and the market town became a city with walls, gates and a cathedral. ") * 3


def test_report_of_the_indirect_object_prompt(smol, tmp_path):
    """The numbers README and tutorial 05 quote: ' Mary' first, L23H3 the largest part, the views open on it."""
    rep = mi_lenses.report(smol, IOI, answer=" Mary", wrong=" John", progress=False)
    assert rep.prediction == " Mary" and rep.prediction_prob == pytest.approx(0.923, abs=2e-3)
    top = rep.dla.top(3, batch=0)
    assert [label for label, _ in top] == ["L23H3", "MLP28", "L29H1"]
    assert [round(v, 2) for _, v in top] == pytest.approx([2.86, 1.83, 1.73], abs=0.01)
    assert float(rep.dla.actual[0]) == pytest.approx(6.12, abs=0.01)
    assert rep.top_head == (23, 3)
    # the identity Patchscope reads the model's prediction earlier than the logit lens (the paper's finding)
    ps, ll = rep.patchscope.per_layer(), rep.lens_precision
    assert float(ps[-1]) == float(ll[-1]) == 1.0 and float(ps.sum()) > 2 * float(ll.sum())
    assert [label for label, _ in rep.attention.top_heads("induction", 3)] == ["L18H6", "L17H3", "L17H4"]
    page = rep.to_html(tmp_path / "ioi.html")
    assert "Neuron view: L23H3" in page and "Head view: layer 23" in page
    assert page.count("var CircuitsVis=") == 1


def test_the_diagnostics_find_real_heads(smol):
    """A trained model has the heads the diagnostics are built for; the tiny random models do not (test_attention)."""
    att = mi_lenses.attention(smol, IOI)
    (ind, ind_v), = att.top_heads("induction", 1)
    (prev, prev_v), = att.top_heads("previous_token", 1)
    (sink, sink_v), = att.top_heads("sink", 1)
    assert (ind, prev) == ("L18H6", "L16H0") and ind_v > 0.8 and prev_v > 0.7 and sink_v > 0.95
    uniform = sum(1 / (q + 1) for q in range(1, len(att.str_tokens[0]))) / (len(att.str_tokens[0]) - 1)
    assert float(att.previous_token[0].median()) < 2 * uniform  # most heads are not previous-token heads


def test_tutorial_01_numbers(smol):
    """The repeated phrase and the rare-token copy, as tutorial 01 states them."""
    sentence = " Green ideas sleep furiously under purple mountains while seven cats dance."
    res = mi_lenses.logit_lens(smol, sentence + sentence)
    n = res.tokens.shape[1] // 2
    nxt = res.tokens[0, 1:]
    hit = (res.top_ids[:, 0, :-1, 0] == nxt).float()
    bits = res.cross_entropy_bits[:, 0, :-1]
    first, second = list(range(1, n - 1)), list(range(n + 1, 2 * n - 1))
    row = {label: r for r, label in enumerate(res.labels)}
    assert hit[-1, second].sum() == 9 and hit[-1, first].sum() == 2 and len(second) == 11
    assert float(hit[:-1, second].mean(-1).max()) == pytest.approx(3 / 11) and int(hit[:-1, second].mean(-1).argmax()) \
        == row["27_pre"]
    for label, one, two in (("23_pre", 51.1, 41.5), ("24_pre", 40.2, 30.2), ("28_pre", 20.9, 9.1)):
        assert float(bits[row[label], first].median()) == pytest.approx(one, abs=0.06)
        assert float(bits[row[label], second].median()) == pytest.approx(two, abs=0.06)
    early = bits[1: row["23_pre"]]
    assert 40.9 <= float(early[:, first].median(-1).values.min()) and float(early[:, second].median(-1).values.max()) \
        <= 57.5
    copy = mi_lenses.logit_lens(smol, "The secret word is axolotl. Remember it. The secret word is", positions=-1,
                                targets=" ax")
    ranks = copy.target_ranks[:, 0, 0, 0].tolist()
    assert ranks[0] == pytest.approx(7767, abs=2) and ranks[24] == pytest.approx(267, abs=2)
    assert ranks[29] == pytest.approx(26, abs=1) and ranks[-1] == 0
    assert 2470 <= min(ranks[1:24]) and max(ranks[1:24]) <= 4735
    assert float(copy.target_probs[-1, 0, 0, 0]) == pytest.approx(0.30, abs=0.01)
    control = mi_lenses.logit_lens(smol, "The secret word is", positions=-1, targets=" ax")
    assert int(control.target_ranks[-1, 0, 0, 0]) == pytest.approx(3485, abs=3)


def test_a_200_token_prompt_stays_readable(smol, tmp_path, capsys):
    """In the terminal (as many last positions as fit, nothing cropped) and in the browser (every section rendered,
    the page no wider than the window, no error, no request, rendered in well under a minute)."""
    from test_report_browser import RENDERED, require_browser

    from browser import Browser

    rep = mi_lenses.report(smol, LONG, sections=["logit_lens", "dla", "attention"], progress=False)
    assert len(rep.str_tokens) == 205
    for width in (100, 160):
        rep.print(width=width)
        out = capsys.readouterr().out
        assert max(len(line) for line in out.splitlines()) <= width
        assert "of 205 shown (the last ones)" in out and "16 of 31 layers shown" in out
    page = tmp_path / "long.html"
    text = rep.to_html(page)
    assert len(text) < 12e6 and "Interactive view of the last 64 tokens" in text
    with Browser(require_browser()) as b:
        t0 = time.perf_counter()
        shown = b.open(page)
        seconds = time.perf_counter() - t0
        state = b.evaluate(RENDERED)
    assert shown.console_errors == [] and shown.network_requests == []
    assert state["empty"] == 0 and state["broken"] == 0 and state["overflow"] <= 1, state
    assert seconds < 45, f"the page took {seconds:.0f} s to render"
    for text in ("1. Logit lens", "2. Direct logit attribution", "3. Attention", "Model view", "Neuron view"):
        assert text in shown.text
