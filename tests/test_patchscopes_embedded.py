"""Patchscopes on the embedded SmolLM2-135M-Instruct: the last-layer identity, the per-layer curve, the CLI contract
(the tutorial runs as a notebook in tests/test_tutorials.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import mi_lenses
from mi_lenses.cli import main as cli_main
from mi_lenses.patchscopes import presets, sweep
from tolerance import EPS

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread():
    """On a loaded 2-core machine OpenMP's spin-waiting threads made these tests ~4x slower with 2 threads than with
    1 (measured: tutorial 80 s vs 18 s with OMP_WAIT_POLICY=PASSIVE). Numbers do not depend on it; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

PROMPTS = [
    "The capital of France is",
    "Alan Turing was a British mathematician who",
    "One, two, three, four,",
]


def test_identity_at_last_layer_reproduces_the_prediction(smol):
    """l = l* = L-1 into the identity prompt's '?': precision@1 = 1 at every position, and the target's probability
    of the source's prediction is the source model's own (the patched state is the final residual)."""
    L = mi_lenses.ModelView(smol).n_layers
    sw = sweep(smol, PROMPTS, presets.identity(), source_layers=[L - 1], target_layers=[L - 1], progress=False)
    assert len(sw.positions) >= 20
    assert bool((sw.prec_at_1 == 1).all())
    view = mi_lenses.ModelView(smol)
    tokens = view.to_tokens(PROMPTS)
    with torch.no_grad():
        own = smol(tokens).float().log_softmax(-1).max(-1).values  # the model's own log-prob of its top-1
    b = torch.tensor([b for b, _ in sw.positions])
    p = torch.tensor([p for _, p in sw.positions])
    assert torch.allclose(-sw.surprisal[0, 0], own[b, p], atol=8192 * EPS)


def test_per_layer_curve(smol, capsys):
    """Identity Patchscope with l* = l: precision@1 rises with depth and reaches 1 at the last layer."""
    sw = sweep(smol, PROMPTS[1], presets.identity(), target_layers="same", progress=False)
    curve = sw.per_layer()
    with capsys.disabled():
        print("\nidentity Patchscope precision@1 per layer (l* = l), " + repr(PROMPTS[1]) + ":")
        print(" ".join(f"{l}:{v:.2f}" for l, v in zip(sw.source_layers, curve.tolist())))
    assert float(curve[-1]) == 1.0
    assert float(curve[:5].mean()) < 0.5 < float(curve[-5:].mean())


def test_cli_json_contract(smol, tmp_path, monkeypatch, capsys):
    import mi_lenses.models.loading as loading

    monkeypatch.setattr(loading, "_boot", lambda *a, **k: smol)
    out, page = tmp_path / "ps.json", tmp_path / "ps.html"
    assert cli_main(["patchscope", "--source-prompt", "The capital of France is", "--source-layer", "-1",
                     "--max-new-tokens", "3", "--json", str(out), "--html", str(page)]) == 0
    data = json.loads(out.read_text())
    assert {"source_token", "generated", "top_tokens"} <= set(data)
    assert data["source_token"] == " is" and data["top_tokens"][0] == " Paris" and data["prec_at_1"] is True
    assert isinstance(data["generated"], str) and len(data["top_tokens"]) == 5
    text = page.read_text()
    assert "Paris" in text and not re.search(r"<script[^>]+src=", text)

    out2 = tmp_path / "sweep.json"
    assert cli_main(["patchscope", "--source-prompt", "The capital of France is", "--source-layer", "0,29",
                     "--target-layer", "0,29", "--source-position", "-1", "--sweep", "--json", str(out2)]) == 0
    sw = json.loads(out2.read_text())
    assert sw["source_layers"] == [0, 29] and sw["target_layers"] == [0, 29]
    assert len(sw["prec_at_1"]) == 2 and len(sw["surprisal"][0]) == 2 and sw["prec_at_1"][1][1] == 1.0

    assert cli_main(["patchscope", "--source-prompt", "Hi", "--source-layer", "30"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert cli_main(["patchscope", "--source-prompt", "Hi", "--source-layer", "1", "--target", "no slot"]) == 2
    assert "placeholder" in capsys.readouterr().err
