"""The pages as a person sees them: opened in headless Chromium with no network, every section rendered, no console
error, nothing requested over the network.

Chromium comes from Debian's ``chromium`` package (``scripts/test.sh`` installs it when it is missing and it can) and
is driven over the DevTools protocol with ``websocket-client`` (a test extra). With ``CI=true`` a missing browser is a
failure; elsewhere the tests are skipped with the reason.
"""

from __future__ import annotations

import os

import pytest
import torch

import mi_lenses
from browser import Browser, find_chromium
from conftest import PROMPT, PROMPTS

SECTIONS = ["1. Logit lens and tuned lens", "2. Identity Patchscope vs logit lens", "3. Direct logit attribution",
            "4. Attention"]
VIEWS = ["Top-1 token per layer and position", "Rank of the model's prediction", "KL to the final distribution",
         "Top tokens per layer", "Largest parts", "Heads (layer x head)", "MLPs and attention per layer",
         "Top neurons", "Source positions through", "Per-head diagnostics", "Head view: layer", "Head Selector",
         "Model view: every layer and head", "Neuron view:", "Attention-sink share"]


def require_browser() -> str:
    """The Chromium executable, or a skip (a failure with ``CI=true``) naming what is missing."""
    missing = None
    exe = find_chromium()
    if exe is None:
        missing = ("Chromium is not installed: apt-get install -y chromium (scripts/test.sh installs it when it can), "
                   "or set $CHROMIUM")
    else:
        try:
            import websocket  # noqa: F401
        except ImportError:
            missing = "websocket-client is not installed: pip install -e '.[test]'"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the browser test cannot run: {missing}")
        pytest.skip(missing)
    return exe


@pytest.fixture(scope="module")
def browser():
    with Browser(require_browser()) as b:
        yield b


RENDERED = """(() => {
  const views = Array.from(document.querySelectorAll('[id^=circuits-vis-]'));
  const images = Array.from(document.images);
  const links = Array.from(document.querySelectorAll('nav.toc a'));
  return {views: views.length, empty: views.filter(v => v.childElementCount === 0).length,
          images: images.length, broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).length,
          links: links.length, dead: links.filter(a => !document.querySelector(a.getAttribute('href'))).length,
          overflow: document.documentElement.scrollWidth - window.innerWidth};
})()"""


def test_the_report_renders_offline(browser, llama_raw, tmp_path):
    m = llama_raw.model
    lens = mi_lenses.TunedLens.from_model(m)
    with torch.no_grad():
        lens.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "report.html"
    mi_lenses.report(m, "The capital of France is the capital of", lens=lens, progress=False).to_html(path)
    page = browser.open(path)
    assert page.console_errors == [], page.console_errors
    assert page.network_requests == [], page.network_requests
    for text in ["Contents", *SECTIONS, *VIEWS]:
        assert text in page.text, f"{text!r} is not on the rendered page"
    state = browser.evaluate(RENDERED)
    L, H = m.cfg.n_layers, m.cfg.n_heads
    assert state["views"] >= 6 and state["empty"] == 0, state  # every circuitsvis view drew something
    assert state["images"] == L * H and state["broken"] == 0, state  # the model view's thumbnails
    assert state["links"] == 4 and state["dead"] == 0, state
    assert state["overflow"] <= 1, "wide grids must scroll inside the page, not widen it"


def test_every_result_page_renders_offline(browser, llama_raw, tmp_path):
    m = llama_raw.model
    tokens = torch.randint(3, m.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    results = {
        "lens": mi_lenses.logit_lens(m, PROMPTS, targets=" city"),
        "dla": mi_lenses.direct_logit_attribution(m, PROMPT, answer=" city"),
        "attention": mi_lenses.attention(m, PROMPTS),
        "qk": mi_lenses.attention(m, PROMPT).qk_terms(2, 1),
        "patchscope": mi_lenses.patchscope(m, mi_lenses.Source(PROMPT, layers=[0, 2]), max_new_tokens=2),
        "sweep": mi_lenses.sweep(m, PROMPT, positions=[-1, -2], progress=False),
        "evaluation": mi_lenses.evaluate_lens(mi_lenses.TunedLens.from_model(m), m, tokens),
    }
    for name, res in results.items():
        path = tmp_path / f"{name}.html"
        res.to_html(path)
        page = browser.open(path)
        assert page.console_errors == [] and page.network_requests == [], (name, page)
        assert res.title in page.text, name
        assert browser.evaluate(RENDERED)["empty"] == 0, name


def test_the_checks_can_fail(browser, tmp_path):
    """A page that logs an error, throws, and fetches from the network is caught on all three counts."""
    path = tmp_path / "bad.html"
    path.write_text('<!DOCTYPE html><html><body><p>bad page</p><img src="http://192.0.2.1/x.png">'
                    '<script>console.error("boom")</script><script>throw new Error("broken view")</script>'
                    "</body></html>")
    page = browser.open(path, ready="true")
    assert "bad page" in page.text
    assert page.network_requests == ["http://192.0.2.1/x.png"]
    assert any("boom" in e for e in page.console_errors) and any("broken view" in e for e in page.console_errors)
