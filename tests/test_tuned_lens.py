"""Tuned lens: identities, file formats (ours and the tuned-lens package's, both directions), safety of loading,
training (objective, resume, non-finite loss, torchrun), evaluation, CLI (tutorial 02 runs as a notebook in tests/test_tutorials.py).

Oracles: the logit lens (a zero-initialised tuned lens must equal it exactly), the ``tuned-lens`` 0.2.0 package's
``TunedLens`` on the untouched HF copy of each tiny model, and a brute-force autograd KL for the training gradient.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROMPT

from mi_lenses.errors import LensInputError
from mi_lenses.lenses import logit_lens, run_lens
from mi_lenses import JacobianLens, load_lens, save_lens
from mi_lenses.lenses.tuned import TrainingError, TunedLens, evaluate_lens, train_lens
from mi_lenses.lenses.tuned import train as train_mod
from mi_lenses.data import load_tokens
from mi_lenses.models.view import ModelView
from tolerance import EPS


def random_lens(model, seed=0, scale=0.3) -> TunedLens:
    lens = TunedLens.from_model(model)
    g = torch.Generator().manual_seed(seed)
    d = lens.d_model
    with torch.no_grad():
        lens.weight.copy_(torch.randn(lens.weight.shape, generator=g) * scale / d**0.5)
        lens.bias.copy_(torch.randn(lens.bias.shape, generator=g) * scale)
    return lens


def rand_tokens(n_seq=32, seq_len=16, seed=0):
    return torch.randint(3, 320, (n_seq, seq_len), generator=torch.Generator().manual_seed(seed))


def close(a, b, msg, atol=1024 * EPS):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    err = (a - b).abs().max().item()
    assert err <= atol, f"{msg}: max abs err {err:.2e} > {atol:.0e}"


# ============================================================================================ 1. the lens
def test_zero_init_is_exactly_the_logit_lens(tiny):
    m = tiny.model
    lens = TunedLens.from_model(m)
    for point in ("resid_pre", "resid_post"):
        ours = lens(m, PROMPT, point=point, targets=[5, 7], return_logits=True)
        ref = logit_lens(m, PROMPT, point=point, targets=[5, 7], return_logits=True)
        assert ours.lens_name == "tuned lens"
        for key in ("logits", "kl", "entropy", "cross_entropy", "top_ids", "target_ranks", "final_top1_rank"):
            a, b = getattr(ours, key), getattr(ref, key)
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{tiny.id} {point}: {key} differs")


def test_translator_is_applied_per_layer_and_final_row_untouched(llama_raw):
    m = llama_raw.model
    view = ModelView(m)
    lens = random_lens(m)
    res = run_lens(lens, m, PROMPT, return_logits=True)
    _, cache = m.run_with_cache(m.to_tokens(PROMPT))
    for i in range(view.n_layers):
        h = cache[f"blocks.{i}.hook_resid_pre"][0]
        expect = view.decode(h + h @ lens.weight[i].T.detach() + lens.bias[i].detach())
        close(res.logits[i, 0], expect, f"row {i}", 1024 * EPS)
    close(res.logits[-1, 0], m(m.to_tokens(PROMPT))[0], "final row == model logits", 1024 * EPS)
    res.verify()
    # a lens that ignored the index (always translator 0) would fail the check above
    assert not torch.allclose(lens.weight[0], lens.weight[1])


def test_resid_mid_is_refused(llama_raw):
    with pytest.raises(LensInputError, match="resid_mid"):
        TunedLens.from_model(llama_raw.model)(llama_raw.model, PROMPT, point="resid_mid")


# ============================================================================================ 2. own format
def test_own_format_round_trip(tiny_pair, tmp_path):
    m = tiny_pair.model
    lens = random_lens(m, seed=3)
    lens.save(tmp_path / "lens")
    files = sorted(p.name for p in (tmp_path / "lens").iterdir())
    assert files == ["maps.safetensors", "mi_lens.json"]
    cfg = json.loads((tmp_path / "lens" / "mi_lens.json").read_text())
    assert (cfg["format"], cfg["kind"], cfg["form"], cfg["rows"]) == ("mi_lenses.affine_lens", "tuned", "residual",
                                                                      list(range(ModelView(m).n_layers)))
    view = ModelView(m)
    assert (cfg["n_layers"], cfg["d_model"], cfg["model_name"]) == (view.n_layers, view.d_model, view.name)
    assert len(cfg["unembed_hash"]) == 64
    back = load_lens(tmp_path / "lens", m)
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    a = lens(m, PROMPT, return_logits=True).logits
    b = back(m, PROMPT, return_logits=True).logits
    assert torch.equal(a, b)
    # overwriting keeps a complete folder and leaves no temp folders behind
    random_lens(m, seed=4).save(tmp_path / "lens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens"]
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == files
    assert not torch.equal(load_lens(tmp_path / "lens").weight, lens.weight)


def test_same_model_raw_and_compat_share_lenses(builder, tmp_path):
    """A lens saved for a model loads on the same model in the other mode (the fingerprint ignores the folding)."""
    for arch in ("llama_gqa", "gpt2"):
        raw, compat = builder.get(arch, "raw").model, builder.get(arch, "compat").model
        lens = random_lens(compat, seed=5)
        lens.save(tmp_path / arch)
        a = lens(compat, PROMPT, return_logits=True).logits.log_softmax(-1)
        b = load_lens(tmp_path / arch, raw)(raw, PROMPT, return_logits=True).logits.log_softmax(-1)
        close(a, b, f"{arch}: compat-trained lens on the raw model", 2048 * EPS)


@pytest.mark.parametrize("other", ["llama_tied", "qwen2", "neox"])
def test_lens_for_another_model_is_refused(builder, tmp_path, other):
    """gpt2, llama_tied, qwen2 and neox all have 2 layers and d_model 32: only the unembedding tells them apart."""
    lens = random_lens(builder.get("gpt2", "raw").model)
    lens.save(tmp_path / "l")
    with pytest.raises(LensInputError, match="another model"):
        load_lens(tmp_path / "l", builder.get(other, "raw").model)
    with pytest.raises(LensInputError, match="3 layers and d_model 48"):
        load_lens(tmp_path / "l", builder.get("llama_gqa", "raw").model)


def test_corrupt_own_files(llama_raw, tmp_path):
    m = llama_raw.model
    good = tmp_path / "good"
    random_lens(m).save(good)

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        return d

    w = "maps.safetensors"
    cases = {
        "truncated": lambda d: (d / w).write_bytes((d / w).read_bytes()[:-100]),
        "bitflip": lambda d: (d / w).write_bytes((d / w).read_bytes()[:-8] + b"\x00" * 8),
        "nojson": lambda d: (d / "mi_lens.json").write_text("{not json"),
        "noweights": lambda d: (d / w).unlink(),
    }
    for name, edit in cases.items():
        with pytest.raises(LensInputError, match="corrupt|truncated|missing|incomplete"):
            load_lens(variant(name, edit), m)
    # without the checksum a truncated safetensors file is still caught by the reader
    d = variant("truncated_nosum", cases["truncated"])
    cfg = json.loads((d / "mi_lens.json").read_text())
    del cfg["sha256"]
    (d / "mi_lens.json").write_text(json.dumps(cfg))
    with pytest.raises(LensInputError, match="corrupt or truncated"):
        load_lens(d, m)
    with pytest.raises(LensInputError, match="holds no lens"):
        load_lens(tmp_path, m)


# ============================================================================================ 3. tuned-lens format
class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_payload_is_never_executed(llama_raw, tmp_path):
    m = llama_raw.model
    good = tmp_path / "good"
    random_lens(m).save(good, format="tuned-lens")
    marker = tmp_path / "PWNED"
    # (a) torch.save zip archive holding the object, (b) a raw pickle stream
    for kind in ("zip", "raw"):
        d = tmp_path / kind
        shutil.copytree(good, d)
        state = torch.load(good / "params.pt", weights_only=True)
        state["0.weight"] = _Payload(marker)
        if kind == "zip":
            torch.save(state, d / "params.pt")
        else:
            (d / "params.pt").write_bytes(pickle.dumps(state))
        with pytest.raises(LensInputError, match="nothing was executed"):
            load_lens(d, m)
        assert not marker.exists(), f"{kind}: the payload ran"
    # sanity: the payload is live (plain pickle.load would run it), so the test can fail
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_corrupt_tuned_lens_files(llama_raw, tmp_path):
    m = llama_raw.model
    good = tmp_path / "good"
    random_lens(m).save(good, format="tuned-lens")
    d = tmp_path / "trunc"
    shutil.copytree(good, d)
    (d / "params.pt").write_bytes((good / "params.pt").read_bytes()[:300])
    with pytest.raises(LensInputError, match="corrupt, truncated"):
        load_lens(d, m)
    d = tmp_path / "keys"
    shutil.copytree(good, d)
    state = torch.load(good / "params.pt", weights_only=True)
    del state["1.bias"]
    torch.save(state, d / "params.pt")
    with pytest.raises(LensInputError, match="missing"):
        load_lens(d, m)
    d = tmp_path / "dims"
    shutil.copytree(good, d)
    cfg = json.loads((good / "config.json").read_text())
    cfg["d_model"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LensInputError, match="shape"):
        load_lens(d, m)


@pytest.fixture(scope="module")
def tl_api():
    pytest.importorskip("tuned_lens")
    import tuned_lens.model_surgery as ms

    ms._transformer_lens_available = False  # tuned-lens 0.2.0 crashes probing TL 4.x's (absent) HookedTransformer
    from tuned_lens.nn.lenses import TunedLens as TheirLens

    return ms, TheirLens


def _their_norm_patch(ms, hf, monkeypatch):
    try:
        ms.get_final_norm(hf)
    except NotImplementedError:  # tuned-lens 0.2.0 predates Qwen2
        monkeypatch.setattr(ms, "get_final_norm", lambda model: model.base_model.norm)


def _their_logits(their, hf, tokens):
    with torch.no_grad():
        hs = hf(tokens, output_hidden_states=True).hidden_states
        return torch.stack([their(hs[i], i) for i in range(len(their))])  # [L, 1, S, V]


def test_export_loads_in_tuned_lens_with_same_predictions(tiny, tl_api, tmp_path, monkeypatch):
    ms, TheirLens = tl_api
    _their_norm_patch(ms, tiny.hf, monkeypatch)
    m = tiny.model
    lens = random_lens(m, seed=11)
    save_lens(lens, tmp_path / "exp", format="tuned-lens")
    their = TheirLens.from_model_and_pretrained(tiny.hf, str(tmp_path / "exp"))
    tokens = m.to_tokens(PROMPT)
    ours = lens(m, tokens, return_logits=True).logits[:-1].float()
    theirs = _their_logits(their, tiny.hf, tokens).float()
    close(ours.log_softmax(-1), theirs.log_softmax(-1), f"{tiny.id}: exported lens vs tuned-lens", 2048 * EPS)
    # the comparison can fail: the same lens without its translators does not match
    base = logit_lens(m, tokens, return_logits=True).logits[:-1].float()
    assert (base.log_softmax(-1) - theirs.log_softmax(-1)).abs().max() > 1e-2


def test_import_from_tuned_lens_with_same_predictions(tiny, tl_api, tmp_path, monkeypatch):
    ms, TheirLens = tl_api
    _their_norm_patch(ms, tiny.hf, monkeypatch)
    their = TheirLens.from_model(tiny.hf)
    g = torch.Generator().manual_seed(7)
    d = their.config.d_model
    with torch.no_grad():
        for t in their:
            t.weight.copy_(torch.randn(t.weight.shape, generator=g) * 0.3 / d**0.5)
            t.bias.copy_(torch.randn(t.bias.shape, generator=g) * 0.3)
    their.save(tmp_path / "theirs")
    m = tiny.model
    if ModelView(m).decoder.kind == "LN" and tiny.compat:
        # the compat residual stream is mean-free: a raw-residual lens cannot be applied exactly; refused clearly
        with pytest.raises(LensInputError, match="compatibility_mode=False"):
            load_lens(tmp_path / "theirs", m)
        return
    lens = load_lens(tmp_path / "theirs", m)
    tokens = m.to_tokens(PROMPT)
    ours = lens(m, tokens, return_logits=True).logits[:-1].float()
    theirs = _their_logits(their, tiny.hf, tokens).float()
    close(ours.log_softmax(-1), theirs.log_softmax(-1), f"{tiny.id}: imported tuned-lens lens", 2048 * EPS)


# ============================================================================================ 4. training
@pytest.mark.parametrize("path", ["fused", "materialised", "row-blocks"])
def test_kl_gradient_matches_autograd(tiny, path):
    """The closed-form per-layer KL gradient equals autograd through log_softmax of the full decode, on every path:
    the fused one (flash-attention kernel over the vocabulary), the materialised logits in one block, and in
    blocks of 8 rows (two blocks here)."""
    m = tiny.model
    view = ModelView(m)
    obj = train_mod._Objective(view)
    assert obj.fused == (view.decoder.softcap is None)
    obj.fused = path == "fused" and obj.fused
    obj.block_bytes = 1 if path == "row-blocks" else None
    lens = random_lens(m, seed=2)
    tokens = rand_tokens(2, 8)
    hs = obj.hidden(tokens)
    target = obj.final(hs[-1])
    p, n = target.p, len(target.p)
    for i in range(lens.n_layers):
        lens.zero_grad()
        kl = obj.layer_step(lens, i, hs[i], target, 1.0 / n)
        g_ours = lens.weight.grad[i].clone(), lens.bias.grad[i].clone()
        lens.zero_grad()
        logq = view.decode(lens.translate(hs[i], i)).log_softmax(-1)
        ref = torch.sum(p * (p.log() - logq), -1)
        ref.mean().backward()
        close(kl / n, ref.mean().item(), f"layer {i} KL", 128 * EPS)
        close(g_ours[0], lens.weight.grad[i], f"layer {i} dA", 128 * EPS)
        close(g_ours[1], lens.bias.grad[i], f"layer {i} db", 128 * EPS)


def test_bf16_kl_step_is_close_to_float32(tiny_pair):
    """The bf16 path (bf16 matmuls, float32 reductions, blocks of rows) gives the float32 KL and gradient to bf16
    precision."""
    m = tiny_pair.model
    lens = random_lens(m, seed=3)
    tokens = rand_tokens(2, 8)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        obj = train_mod._Objective(ModelView(m), dtype)
        obj.block_bytes = 1
        hs = obj.hidden(tokens)
        target = obj.final(hs[-1])
        lens.zero_grad()
        kl = obj.layer_step(lens, 1, hs[1], target, 1.0)
        out[dtype] = kl, lens.weight.grad[1].clone()
    (kl32, g32), (kl16, g16) = out[torch.float32], out[torch.bfloat16]
    assert abs(kl16 - kl32) <= 2e-2 * abs(kl32) + 1e-3, (kl16, kl32)
    assert float((g16 - g32).norm() / g32.norm()) < 5e-2


def test_training_lowers_held_out_kl(llama_raw):
    m = llama_raw.model
    train, held = rand_tokens(64, 16, seed=1), rand_tokens(8, 16, seed=2)
    lens = train_lens(m, train, steps=15, tokens_per_step=128, seq_len=16, warm_start_tokens=512, progress=False)
    ev = evaluate_lens(lens, m, held)
    for i, layer in enumerate(ev.layers):
        assert ev.kl_bits["tuned lens"][i] < ev.kl_bits["logit lens"][i], f"{layer}: {ev.table()}"
    assert lens.meta["training"]["train_tokens"] == 15 * 128


def test_resume_ends_at_the_same_lens(llama_raw, tmp_path, monkeypatch):
    m = llama_raw.model
    tokens = rand_tokens(48, 16, seed=3)
    kw = dict(steps=6, tokens_per_step=64, seq_len=16, micro_batch=2, warm_start_tokens=128, checkpoint_every=2,
              progress=False)
    full = train_lens(m, tokens, out=tmp_path / "full", **kw)

    calls = {"n": 0}
    real = train_mod._Objective.layer_step

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3 * 2 * 3 + 1:  # dies during step 4 (3 layers x 2 micro-batches per step)
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(train_mod._Objective, "layer_step", dying)
    with pytest.raises(KeyboardInterrupt):
        train_lens(m, tokens, out=tmp_path / "cut", **kw)
    monkeypatch.setattr(train_mod._Objective, "layer_step", real)
    assert not (tmp_path / "cut" / "mi_lens.json").exists()
    state = torch.load(tmp_path / "cut" / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 2
    resumed = train_lens(m, tokens, out=tmp_path / "cut", resume=True, **kw)
    assert torch.equal(resumed.weight, full.weight) and torch.equal(resumed.bias, full.bias)
    with pytest.raises(LensInputError, match="seq_len"):
        train_lens(m, rand_tokens(48, 8), out=tmp_path / "cut", resume=True, **{**kw, "seq_len": 8})


def test_non_finite_loss_stops_and_keeps_last_checkpoint(llama_raw, tmp_path):
    m = llama_raw.model
    out = tmp_path / "lens"
    with pytest.raises(TrainingError, match="non-finite") as info:
        train_lens(m, rand_tokens(32, 16), out=out, steps=5, tokens_per_step=64, seq_len=16, lr=1e35,
                   checkpoint_every=1, warm_start_tokens=0, progress=False)
    import re

    bad, good = map(int, re.search(r"in step (\d+) .*checkpoint \(after step (\d+)\)", str(info.value)).groups())
    assert 1 <= good == bad - 1
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == good and torch.isfinite(state["weight"]).all()
    assert not (out / "mi_lens.json").exists()


def test_bad_training_input(llama_raw, tmp_path):
    m = llama_raw.model
    short = tmp_path / "short.txt"
    short.write_text("Hello world.")
    with pytest.raises(LensInputError, match="fewer than one sequence"):
        train_lens(m, short, seq_len=64, tokens_per_step=64, progress=False)
    with pytest.raises(LensInputError, match="multiple of seq_len"):
        train_lens(m, rand_tokens(8, 16), seq_len=16, tokens_per_step=40, progress=False)
    with pytest.raises(LensInputError, match="fewer than one step"):
        train_lens(m, rand_tokens(2, 16), seq_len=16, tokens_per_step=64, progress=False)


def test_data_sources(llama_raw, tmp_path, monkeypatch):
    m = llama_raw.model
    tok = m.tokenizer
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("The quick brown fox. " * 10)
    (tmp_path / "docs" / "b.md").write_text("Hello world, hello lens! " * 10)
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\x00\x01")
    t = load_tokens(tmp_path / "docs", m, seq_len=8)
    flat = t.flatten().tolist()
    ids_a = tok("The quick brown fox. " * 10, add_special_tokens=False)["input_ids"]
    assert flat[: len(ids_a)] == ids_a and flat[len(ids_a)] == tok.eos_token_id  # packed with an EOS separator
    sampled = load_tokens("model:40", m, seq_len=10)
    assert sampled.shape == (4, 10) and sampled.max() < 320
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("datasets")
    with pytest.raises(LensInputError, match="local `datasets` cache"):
        load_tokens("no-such-dataset-xyz:cfg@train", m, seq_len=8)


# ============================================================================================ 5. evaluation, CLI
def test_evaluation_result(llama_raw, tmp_path):
    m = llama_raw.model
    lens = random_lens(m, scale=0.05)
    tokens = rand_tokens(6, 12)
    ev = evaluate_lens(lens, m, tokens, batch_size=4)
    # independent: the mean of run_lens statistics over all tokens
    ref = run_lens(lens, m, tokens)
    base = logit_lens(m, tokens)
    close(torch.tensor(ev.kl_bits["tuned lens"]), ref.kl_bits[:-1].mean((1, 2)), "KL", 128 * EPS)
    close(torch.tensor(ev.kl_bits["logit lens"]), base.kl_bits[:-1].mean((1, 2)), "KL base", 128 * EPS)
    ce = ref.cross_entropy_bits[:, :, :-1]
    close(torch.tensor(ev.ce_bits["tuned lens"]), ce[:-1].mean((1, 2)), "CE", 128 * EPS)
    close(ev.final_ce_bits, ce[-1].mean().item(), "final CE", 128 * EPS)
    d = ev.to_dict()
    assert set(d) >= {"layers", "logit_lens", "tuned_lens", "final_ce_bits"}
    assert set(d["tuned_lens"]) >= {"kl_bits", "ce_bits"} and len(d["layers"]) == 3
    df = ev.to_dataframe()
    assert len(df) == 2 * 3 * 3
    ev.to_html(tmp_path / "ev.html")
    assert "<svg" in (tmp_path / "ev.html").read_text()
    assert "<svg" in ev.show()._repr_html_()


def test_cli_train_eval_and_logit_lens(hf_folder, tmp_path, capsys):
    from mi_lenses.cli import main

    text = tmp_path / "text.txt"
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog. Paris is a city."] * 40))
    out = tmp_path / "lens"
    assert main(["tuned-lens", "train", "--model", str(hf_folder), "--data", str(text), "--out", str(out),
                 "--steps", "3", "--tokens-per-step", "64", "--seq-len", "16"]) == 0
    assert (out / "mi_lens.json").is_file()
    js = tmp_path / "ev.json"
    assert main(["tuned-lens", "eval", "--lens", str(out), "--model", str(hf_folder), "--data", str(text),
                 "--max-tokens", "128", "--seq-len", "32", "--json", str(js)]) == 0
    d = json.loads(js.read_text())
    assert set(d) >= {"layers", "logit_lens", "tuned_lens", "final_ce_bits"}
    assert len(d["logit_lens"]["kl_bits"]) == len(d["tuned_lens"]["ce_bits"]) == len(d["layers"]) == 3
    # --resume on a finished run is a no-op that rewrites the same lens
    before = load_lens(out).weight.clone()
    assert main(["tuned-lens", "train", "--model", str(hf_folder), "--data", str(text), "--out", str(out),
                 "--steps", "3", "--tokens-per-step", "64", "--seq-len", "16", "--resume"]) == 0
    assert torch.equal(load_lens(out).weight, before)
    # --lens on the logit-lens command, both formats
    lens = load_lens(out)
    lens.save(tmp_path / "tl", format="tuned-lens")
    for folder in (out, tmp_path / "tl"):
        jl = tmp_path / "ll.json"
        assert main(["logit-lens", "The capital of France is", "--model", str(hf_folder), "--lens", str(folder),
                     "--json", str(jl)]) == 0
        assert json.loads(jl.read_text())["lens"] == "tuned lens"
    capsys.readouterr()
    assert main(["logit-lens", "x", "--model", str(hf_folder), "--lens", str(tmp_path)]) == 2
    assert "holds no lens" in capsys.readouterr().err


# ============================================================================================ 6. distributed
DDP_SCRIPT = """
import sys, torch
import mi_lenses
from mi_lenses.lenses.tuned import train_lens
model = mi_lenses.load_model(sys.argv[1])
tokens = torch.load(sys.argv[2], weights_only=True)
lens = train_lens(model, tokens, out=sys.argv[3], steps=4, tokens_per_step=128, seq_len=16, micro_batch=2,
                  warm_start_tokens=128, progress=False)
"""


@pytest.mark.slow  # subprocesses
def test_torchrun_two_processes_match_single_process(hf_folder, tmp_path):
    import mi_lenses

    tokens = rand_tokens(32, 16, seed=9)
    torch.save(tokens, tmp_path / "tokens.pt")
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MI_LENSES_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(hf_folder), str(tmp_path / "tokens.pt"),
         str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_lens(tmp_path / "ddp")
    assert ddp.meta["training"]["world_size"] == 2
    model = mi_lenses.load_model(str(hf_folder))
    single = train_lens(model, tokens, steps=4, tokens_per_step=128, seq_len=16, micro_batch=2, warm_start_tokens=128,
                        progress=False)
    close(ddp.weight, single.weight, "DDP vs single-process weight", 128 * EPS)
    close(ddp.bias, single.bias, "DDP vs single-process bias", 128 * EPS)
    assert single.weight.abs().max() > 1e-3  # it trained


# ============================================================================================ 7. embedded model
@pytest.mark.slow
def test_embedded_tuned_lens_beats_logit_lens_everywhere(smol):
    from mi_lenses.data import EVAL_TEXT, TRAIN_TEXT

    train = load_tokens(TRAIN_TEXT, smol, seq_len=128, max_tokens=2048)
    lens = train_lens(smol, train, steps=1, tokens_per_step=128, seq_len=128, micro_batch=1,
                      warm_start_tokens=2048, progress=False)
    held = load_tokens(EVAL_TEXT, smol, seq_len=128, max_tokens=256)
    ev = evaluate_lens(lens, smol, held)
    worse = [lab for i, lab in enumerate(ev.layers) if not ev.kl_bits["tuned lens"][i] < ev.kl_bits["logit lens"][i]]
    assert not worse, ev.to_markdown()


def test_sampling_uses_the_kv_cache_and_equals_recompute(llama_raw, monkeypatch):
    """``model:N`` data is sampled one token per step on the KV cache; the tokens equal a full recompute per step."""
    from mi_lenses.data import sample_from_model

    view = ModelView(llama_raw.model)
    calls = []
    real = type(view.kv).forward
    monkeypatch.setattr(type(view.kv), "forward", lambda self, t, c=None: calls.append(t.shape[1]) or real(self, t, c))
    cached = sample_from_model(view, n_tokens=48, seq_len=16, seed=3, batch=2)
    assert calls and max(calls[1:]) == 1  # after the first step, one token per forward pass
    monkeypatch.setattr(ModelView, "kv", property(lambda self: None))
    assert torch.equal(cached, sample_from_model(view, n_tokens=48, seq_len=16, seed=3, batch=2))


def test_files_of_mi_lenses_0_1_still_load_with_the_same_numbers(llama_raw, tmp_path):
    """tests/fixtures/legacy_v1 was written by mi_lenses 0.1 (commit eec1fd9) on this tiny model: a tuned lens in
    the old own format (lens.safetensors) and a Jacobian lens in the old row-map format, with that version's own
    results on one prompt. Both load, bind and give the same numbers; saved again, they round-trip in the new
    format."""
    m = llama_raw.model
    legacy = Path(__file__).parent / "fixtures" / "legacy_v1"
    expected = torch.load(legacy / "expected.pt", weights_only=True)
    assert (legacy / "tuned" / "lens.safetensors").is_file()  # really the old layout
    for kind, cls in (("tuned", TunedLens), ("jacobian", JacobianLens)):
        lens = load_lens(legacy / kind, m)
        assert type(lens) is cls
        res = lens(m, "The capital of France is")
        assert torch.equal(res.top_ids, expected[f"{kind}_top_ids"])
        # saved by another machine and library versions: the KL (a sum over the vocabulary) may sit a few roundings
        # of its own size away (12 EPS seen between AVX-512 and AVX2 kernels); 64 EPS at its magnitude.
        torch.testing.assert_close(res.kl, expected[f"{kind}_kl"], atol=64 * EPS, rtol=64 * EPS)
        lens.save(tmp_path / kind)
        again = load_lens(tmp_path / kind, m)(m, "The capital of France is")
        assert torch.equal(again.top_ids, res.top_ids) and torch.equal(again.kl, res.kl)
