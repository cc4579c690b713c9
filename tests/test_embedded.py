"""Integration tests on the embedded SmolLM2-135M-Instruct (real behaviour the logit lens must show)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import mi_lenses
from mi_lenses.cli import main as cli_main

pytestmark = pytest.mark.slow


def test_embedded_model_shape_and_no_bos(smol):
    view = mi_lenses.ModelView(smol)
    assert (view.n_layers, view.d_model, view.d_vocab, view.n_heads, view.n_kv_heads) == (30, 576, 49152, 9, 3)
    assert view.kv_head(8) == 2
    tokens = view.to_tokens("The capital of France is")
    assert smol.to_str_tokens(tokens[0])[0] == "The"  # SmolLM2 adds no BOS


def test_paris_only_in_late_layers(smol):
    res = mi_lenses.logit_lens(smol, "The capital of France is", targets=" Paris", positions=-1)
    res.verify()
    paris = smol.to_single_token(" Paris")
    top1 = res.top_ids[:, 0, 0, 0]
    assert int(top1[-1]) == paris
    assert int(res.final_top1[0, 0]) == paris
    assert not (top1[:10] == paris).any()  # not top-1 in the first layers
    ranks = res.target_ranks[:, 0, 0, 0]
    assert int(ranks[0]) > 1000 and int(ranks[-1]) == 0
    assert torch.equal(ranks, res.final_top1_rank[:, 0, 0])  # " Paris" is the final top-1
    # KL to the final distribution shrinks towards the output
    kl = res.kl_bits[:, 0, 0]
    assert float(kl[-1]) == 0.0 and float(kl[-2]) < float(kl[len(kl) // 2]) < float(kl[0])


def test_repeated_sentence_is_predicted_at_second_occurrence(smol):
    sentence = " Green ideas sleep furiously under purple mountains while seven cats dance."
    res = mi_lenses.logit_lens(smol, sentence + sentence)
    n = (res.tokens.shape[1]) // 2
    final = res.top_ids[-1, 0, :, 0]
    nxt = res.tokens[0, 1:]
    # a 135M model needs two tokens of the repeat before induction takes over
    first = (final[: n - 1] == nxt[: n - 1]).float().mean().item()
    second = (final[n + 1 : -1] == nxt[n + 1 :]).float().mean().item()
    assert second >= 0.8 and first < 0.3
    # the copy is a late-layer phenomenon: early rows do not predict the next token of the repeat
    early = (res.top_ids[2, 0, n + 1 : -1, 0] == nxt[n + 1 :]).float().mean().item()
    assert early < 0.3


def test_rare_token_is_copied(smol):
    res = mi_lenses.logit_lens(smol, "The secret word is axolotl. Remember it. The secret word is", positions=-1,
                               targets=" ax")
    assert res.top_tokens[-1][0][0][0] == " ax"
    ranks = res.target_ranks[:, 0, 0, 0]
    assert int(ranks[0]) > 100 and int(ranks[-1]) == 0


def test_cli_json_contract(smol, tmp_path, capsys):
    out_json, out_html = tmp_path / "lens.json", tmp_path / "lens.html"
    rc = cli_main(["logit-lens", "The capital of France is", "--top-k", "3", "--target", " Paris",
                   "--json", str(out_json), "--html", str(out_html)])
    assert rc == 0
    data = json.loads(out_json.read_text())
    for key in ("model", "tokens", "layers", "top_tokens", "top_probs", "final_top1_rank", "kl_to_final", "entropy"):
        assert key in data
    n_layers, n_pos = 31, 5
    assert data["tokens"] == ["The", " capital", " of", " France", " is"]
    assert data["layers"][0] == "embed" and data["layers"][-1] == "final" and len(data["layers"]) == n_layers
    assert len(data["top_tokens"]) == n_layers and len(data["top_tokens"][0]) == n_pos
    assert len(data["top_tokens"][0][0]) == 3 and len(data["top_probs"][-1][-1]) == 3
    assert data["top_tokens"][-1][-1][0] == " Paris"
    assert data["final_top1_rank"][-1] == [0] * n_pos
    assert len(data["kl_to_final"]) == n_layers and data["kl_to_final"][-1] == [0.0] * n_pos
    assert all(0 <= e <= 15.6 for row in data["entropy"] for e in row)  # log2(49152) = 15.58 bits
    page = out_html.read_text()
    assert "CircuitsVis.render(" in page and " Paris" in page
    assert not re.search(r"<script[^>]+src=", page), "the page must not load scripts from the network"
    assert page.count('var CircuitsVis=') == 1  # bundle inlined once
    assert "Paris" in capsys.readouterr().out


def test_cli_bad_input_is_a_clear_error(smol, capsys):
    assert cli_main(["logit-lens", "The capital of France is", "--target", " Parisian"]) == 2
    err = capsys.readouterr().err
    assert "not a single token" in err and "' Paris'" in err and "Traceback" not in err
    assert cli_main(["logit-lens", "x", "--model", "/no/such/model.gguf"]) == 2
    assert "not found" in capsys.readouterr().err


def test_converted_model_is_cached(smol):
    from mi_lenses.models.loading import cache_root, converted_folder, embedded_gguf_path

    folder = converted_folder(embedded_gguf_path())
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(cache_root().glob(".*"))  # no half-written temp folders left behind


def test_gguf_conversion_is_atomic_and_reused(tmp_path, monkeypatch):
    """A conversion that dies half-way leaves nothing behind; the next one completes and is then reused."""
    from transformers import PreTrainedModel

    from mi_lenses.models.loading import _converted_gguf, embedded_gguf_path

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(PreTrainedModel, "save_pretrained", boom)
        with pytest.raises(RuntimeError, match="disk full"):
            _converted_gguf(embedded_gguf_path(), tmp_path)
    assert list(tmp_path.iterdir()) == []
    folder, add_bos = _converted_gguf(embedded_gguf_path(), tmp_path)
    assert add_bos is False and (folder / "model.safetensors").is_file()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    # Warm path: reused as is, and the GGUF header (slow to parse) is not read again.
    import mi_lenses.models.loading as loading

    with monkeypatch.context() as m:
        m.setattr(loading, "_gguf_info", boom)
        assert _converted_gguf(embedded_gguf_path(), tmp_path) == (folder, False)
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    # A cache from an older version (no header record) is still reused, and gets its record.
    (folder / loading.INFO_FILE).unlink()
    assert _converted_gguf(embedded_gguf_path(), tmp_path) == (folder, False)
    assert (folder / loading.INFO_FILE).is_file() and (folder / "model.safetensors").stat().st_mtime_ns == mtime
