"""Bad input, as a table: every case raises a ``MiLensesError`` whose message names the fix (API) or prints one line
and exits non-zero without a traceback (CLI), and afterwards the model carries no hook and gives unchanged outputs.

The docs' "Bad input" page (docs/bad_input.md, written by scripts/bad_input_table.py) lists these cases by id (a test
keeps the two in step).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import mi_lenses
from mi_lenses.errors import MiLensesError
from tiny import PROMPT, PROMPTS, hook_counts

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_input.md"


class Env:
    """What a case may use: the tiny model ``m`` (Llama, GQA, raw), a second model of another size, a saved HF
    folder of ``m``, lens folders and a scratch folder."""

    def __init__(self, builder, tmp: Path):
        self.m = builder.get("llama_gqa", "raw").model
        self.other = builder.get("llama_tied", "raw").model
        self.tmp = tmp
        self.folder = tmp / "tiny-model"
        builder.hf("llama_gqa").save_pretrained(self.folder)
        builder.tok.save_pretrained(self.folder)
        self.tokens = self.m.to_tokens(PROMPT)
        mi_lenses.TunedLens.from_model(self.other).save(tmp / "other_lens")
        self.lens = tmp / "lens"
        mi_lenses.TunedLens.from_model(self.m).save(self.lens)
        (tmp / "empty").mkdir()
        (tmp / "short.txt").write_text("too short")
        (tmp / "no-model").mkdir()
        (tmp / "no-model" / "config.json").write_text("{}")
        (tmp / "loop-a").symlink_to(tmp / "loop-b")
        (tmp / "loop-b").symlink_to(tmp / "loop-a")
        os.mkfifo(tmp / "fifo")
        self.cleanups: list[Callable[[], None]] = []

    def device(self) -> Path:
        """A character device node like /dev/null (made here, so a regression cannot replace the system's), and a
        link to it."""
        node = self.tmp / "null"
        if not node.exists():
            try:
                os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
            except (PermissionError, OSError) as err:
                pytest.skip(f"cannot make a device node here ({err})")
            (self.tmp / "link-to-null").symlink_to(node)
        return node

    def full_folder(self) -> Path:
        """A folder on a small file system with no space left (a tmpfs mounted here; skipped where mounting is not
        allowed)."""
        mnt = self.tmp / "full"
        if not mnt.is_dir():
            mnt.mkdir()
            if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                              capture_output=True).returncode != 0:
                pytest.skip("cannot mount a small file system here (needs root)")
            self.cleanups.append(lambda: subprocess.run(["umount", str(mnt)], capture_output=True))
            with open(mnt / "filler", "wb") as fh:
                try:
                    fh.write(b"x" * 128 * 1024)
                except OSError:
                    pass
        return mnt


def _long_prompt() -> str:
    """A prompt of more tokens than the tiny models' context (64)."""
    return " ".join(["The capital of France is Paris."] * 30)


def _cache_without(env: Env) -> Any:
    return env.m.run_with_cache(env.tokens, names_filter=lambda n: n == "blocks.0.hook_resid_pre")[1]


def _lens_file(env: Env, name: str, edit: Callable[[dict], dict] | None = None, raw: bytes | None = None) -> Path:
    """A copy of the tuned-lens-format lens of ``m`` with ``params.pt`` edited or replaced by raw bytes."""
    folder = env.tmp / name
    mi_lenses.TunedLens.from_model(env.m).save(folder, format="tuned-lens")
    if raw is not None:
        (folder / "params.pt").write_bytes(raw)
    elif edit is not None:
        state = torch.load(folder / "params.pt", weights_only=True)
        torch.save(edit(state), folder / "params.pt")
    return folder


class _Payload:
    def __reduce__(self):
        return (print, ("pickle payload executed",))


def _pickled(env: Env) -> Path:
    import pickle

    return _lens_file(env, "pickled", raw=pickle.dumps({"0.weight": _Payload()}))


def _truncated(env: Env) -> Path:
    folder = _lens_file(env, "truncated")
    data = (folder / "params.pt").read_bytes()
    (folder / "params.pt").write_bytes(data[: len(data) // 2])
    return folder


L = 3  # the tiny Llama's blocks
API: dict[str, tuple[Callable[[Env], Any], list[str]]] = {
    # prompts and token ids
    "empty prompt": (lambda e: mi_lenses.logit_lens(e.m, ""), ["empty prompt"]),
    "no prompt at all": (lambda e: mi_lenses.logit_lens(e.m, []), ["no prompt"]),
    "prompt that is not text": (lambda e: mi_lenses.logit_lens(e.m, ["a", 3]), ["prompts must be strings"]),
    "float token ids": (lambda e: mi_lenses.logit_lens(e.m, torch.ones(1, 3)), ["integer ids"]),
    "token id out of the vocabulary": (lambda e: mi_lenses.logit_lens(e.m, torch.tensor([[1, 10**6]])),
                                       ["token ids must lie in"]),
    "attention mask of another shape": (lambda e: mi_lenses.logit_lens(e.m, e.tokens, attention_mask=torch.ones(1, 2)),
                                        ["attention_mask has shape", "the mask the tokenizer returned"]),
    "attention mask with a gap": (lambda e: mi_lenses.logit_lens(
        e.m, e.tokens, attention_mask=torch.tensor([[1, 0] + [1] * (e.tokens.shape[1] - 2)])), ["gap", "left or the right"]),
    "attention mask without a real token": (lambda e: mi_lenses.logit_lens(
        e.m, e.tokens, attention_mask=torch.zeros_like(e.tokens)), ["no real token"]),
    "attention mask with text": (lambda e: mi_lenses.logit_lens(e.m, PROMPT, attention_mask=torch.ones(1, 3)),
                                 ["goes with token ids"]),
    # layers, positions, options
    "layer out of range": (lambda e: mi_lenses.logit_lens(e.m, PROMPT, layers=[99]), ["layer 99 is out of range", "0 (embed)"]),
    "layer that is not an int": (lambda e: mi_lenses.logit_lens(e.m, PROMPT, layers=["1"]), ["must be an int"]),
    "layer given twice": (lambda e: mi_lenses.logit_lens(e.m, PROMPT, layers=[0, -1, -1]), ["twice"]),
    "position out of range": (lambda e: mi_lenses.logit_lens(e.m, PROMPT, positions=[99]), ["position 99", "out of range"]),
    "position that is a bool": (lambda e: mi_lenses.logit_lens(e.m, PROMPT, positions=True), ["position True", "int"]),
    "unknown residual point": (lambda e: mi_lenses.logit_lens(e.m, PROMPT, point="resid_foo"), ["resid_pre"]),
    "top_k of zero": (lambda e: mi_lenses.logit_lens(e.m, PROMPT, top_k=0), ["top_k must be an int in 1.."]),
    "unsupported matmul dtype": (lambda e: mi_lenses.logit_lens(e.m, PROMPT, dtype="float64"), ["bfloat16"]),
    "target of several tokens": (lambda e: mi_lenses.logit_lens(e.m, PROMPT, targets=" capital"),
                                 ["not a single token", "mind the leading space"]),
    "target id out of range": (lambda e: mi_lenses.logit_lens(e.m, PROMPT, targets=[10**6]), ["out of range"]),
    "prompt longer than the context": (lambda e: mi_lenses.logit_lens(e.m, _long_prompt()),
                                       ["context window is 64", "beyond_context=True"]),
    "prompt longer than the context (DLA)": (lambda e: mi_lenses.direct_logit_attribution(
        e.m, _long_prompt(), answer="Paris"), ["context window is 64"]),
    "prompt longer than the context (report)": (lambda e: mi_lenses.report(e.m, _long_prompt(), progress=False),
                                                ["context window is 64"]),
    "token ids longer than the context": (lambda e: mi_lenses.attention(e.m, torch.ones(1, 65, dtype=torch.long)),
                                          ["65 tokens", "context window is 64"]),
    "result written to a folder": (lambda e: mi_lenses.logit_lens(e.m, PROMPT).to_json(e.tmp),
                                   ["is a folder, not a file"]),
    "page written to a read-only file system": (lambda e: mi_lenses.logit_lens(e.m, PROMPT).to_html("/proc/x.html"),
                                                ["cannot write /proc/x.html"]),
    "empty layer list": (lambda e: mi_lenses.logit_lens(e.m, PROMPT, layers=[]), ["no layer selected", "None for all"]),
    "empty position list": (lambda e: mi_lenses.logit_lens(e.m, PROMPT, positions=[]),
                            ["no position selected", "None for all"]),
    "prompt with a lone surrogate (undecodable bytes)": (lambda e: mi_lenses.logit_lens(e.m, "caf\udcff"),
                                                         ["lone surrogate", "at character 3", "UTF-8"]),
    "prompt with a lone surrogate in a batch": (lambda e: mi_lenses.logit_lens(e.m, [PROMPT, "\udcff x"]),
                                                ["prompt 1 holds a lone surrogate"]),
    "target with a lone surrogate": (lambda e: mi_lenses.logit_lens(e.m, PROMPT, targets="\udcff"),
                                     ["lone surrogate"]),
    "answer of 5,000 characters": (lambda e: mi_lenses.direct_logit_attribution(e.m, PROMPT, answer="ab" * 2500),
                                   ["not a single token", "(5000 characters)"]),
    "result written to a character device": (lambda e: mi_lenses.logit_lens(e.m, PROMPT).to_json(e.device()),
                                             ["is a character device, not a regular file"]),
    "result written through a link to a device": (lambda e: e.device() and mi_lenses.logit_lens(e.m, PROMPT).to_json(
        e.tmp / "link-to-null"), ["a link to", "character device"]),
    "page written to a FIFO": (lambda e: mi_lenses.logit_lens(e.m, PROMPT).to_html(e.tmp / "fifo"),
                               ["is a FIFO, not a regular file"]),
    "result written to a symlink loop": (lambda e: mi_lenses.logit_lens(e.m, PROMPT).to_json(e.tmp / "loop-a"),
                                         ["symlink loop"]),
    # caches
    "cache missing the hooks": (lambda e: mi_lenses.logit_lens(e.m, e.tokens, cache=_cache_without(e)), ["names_filter"]),
    "tokens of another run than the cache": (lambda e: mi_lenses.logit_lens(
        e.m, e.tokens[:, :-1], cache=e.m.run_with_cache(e.tokens)[1]), ["do not match the cache"]),
    "DLA cache missing the hooks": (lambda e: mi_lenses.direct_logit_attribution(
        e.m, cache=_cache_without(e), answer="Paris"), ["required_hooks"]),
    # attribution
    "answer of several tokens": (lambda e: mi_lenses.direct_logit_attribution(e.m, PROMPT, answer=" Paris"),
                                 ["not a single token"]),
    "answer and direction together": (lambda e: mi_lenses.direct_logit_attribution(
        e.m, PROMPT, answer="Paris", direction=torch.ones(e.m.cfg.d_model)), ["exactly one of answer"]),
    "direction of the wrong size": (lambda e: mi_lenses.direct_logit_attribution(e.m, PROMPT, direction=torch.ones(7)),
                                    ["expected [d_model]"]),
    "one answer per prompt, miscounted": (lambda e: mi_lenses.direct_logit_attribution(
        e.m, PROMPTS, answer=["Paris", "The"]), ["got 2 answer tokens for 3 prompts"]),
    "direction with NaN (DLA)": (lambda e: mi_lenses.direct_logit_attribution(
        e.m, PROMPT, direction=torch.full((e.m.cfg.d_model,), float("nan"))), ["non-finite", "index 0"]),
    "direction with inf (DLA)": (lambda e: mi_lenses.direct_logit_attribution(
        e.m, PROMPT, direction=torch.ones(e.m.cfg.d_model).index_fill(0, torch.tensor([5]), float("inf"))),
        ["1 non-finite", "index 5"]),
    "answer equal to wrong (DLA)": (lambda e: mi_lenses.direct_logit_attribution(e.m, PROMPT, answer="Paris",
                                                                                 wrong="Paris"), ["the same token"]),
    "answer equal to wrong (report)": (lambda e: mi_lenses.report(e.m, PROMPT, answer="Paris", wrong="Paris",
                                                                  progress=False), ["the same token"]),
    "report with a corrupted prompt of another length": (lambda e: mi_lenses.report(
        e.m, PROMPT, corrupted=PROMPT + " known", progress=False), ["prompt's length", "position_map"]),
    "position a shorter prompt lacks (DLA)": (lambda e: mi_lenses.direct_logit_attribution(
        e.m, PROMPTS, answer="Paris", position=-6), ["out of range for prompt 2"]),
    # Patchscopes
    "source layer out of range": (lambda e: mi_lenses.patchscope(e.m, mi_lenses.Source(PROMPT, layers=L)),
                                  ["source layer 3 is out of range"]),
    "target prompt without its placeholder": (lambda e: mi_lenses.patchscope(
        e.m, mi_lenses.Source(PROMPT, layers=0), mi_lenses.Target("no slot here", placeholder="x")),
        ["has no placeholder 'x'"]),
    "map of the wrong shape": (lambda e: mi_lenses.patchscope(e.m, mi_lenses.Source(PROMPT, layers=0), mi_lenses.Target(
        "The x", placeholder="x", map=lambda h: h[:, :3])), ["the target model needs"]),
    "models of different d_model without a map": (lambda e: mi_lenses.patchscope(
        e.m, mi_lenses.Source(PROMPT, layers=0), mi_lenses.presets.identity().replace(model=e.other)),
        ["pass Target(map=...)", "fit_map"]),
    "generation past the context window": (lambda e: mi_lenses.patchscope(
        e.m, mi_lenses.Source(PROMPT, layers=0), max_new_tokens=500), ["context window"]),
    "sweep with unknown target layers": (lambda e: mi_lenses.sweep(e.m, PROMPT, target_layers="diag", progress=False),
                                         ["target_layers must be"]),
    # lens files
    "lens of another model": (lambda e: mi_lenses.load_lens(e.tmp / "other_lens", e.m), ["for a model with 2 layers"]),
    "folder without a lens": (lambda e: mi_lenses.load_lens(e.tmp / "empty", e.m), ["holds no lens"]),
    "truncated lens file": (lambda e: mi_lenses.load_lens(_truncated(e), e.m), ["corrupt, truncated"]),
    "pickle payload in a lens file": (lambda e: mi_lenses.load_lens(_pickled(e), e.m), ["nothing was executed"]),
    "lens with NaN weights": (lambda e: mi_lenses.load_lens(_lens_file(
        e, "nan", lambda s: {**s, "0.bias": s["0.bias"] * float("nan")}), e.m), ["non-finite", "retrain"]),
    "lens with wrong shapes": (lambda e: mi_lenses.load_lens(_lens_file(
        e, "shape", lambda s: {**s, "1.weight": s["1.weight"][:5]}), e.m), ["shape"]),
    "lens with integer weights": (lambda e: mi_lenses.load_lens(_lens_file(
        e, "ints", lambda s: {k: v.long() for k, v in s.items()}), e.m), ["expected floating point"]),
    # training data and options
    "data path that does not exist": (lambda e: mi_lenses.train_lens(e.m, str(e.tmp / "nope.txt"), seq_len=16,
                                                                     tokens_per_step=64, progress=False),
                                      ["neither a file/folder nor a dataset"]),
    "data shorter than one sequence": (lambda e: mi_lenses.train_lens(e.m, e.tmp / "short.txt", seq_len=16,
                                                                      tokens_per_step=64, progress=False),
                                       ["fewer than one sequence"]),
    "training sequences longer than the context": (lambda e: mi_lenses.train_lens(e.m, e.tmp / "short.txt",
                                                                                  progress=False),
                                                   ["context window is 64", "smaller seq_len"]),
    "tokens per step not a multiple of the sequence": (lambda e: mi_lenses.train_lens(
        e.m, e.tmp / "short.txt", tokens_per_step=100, seq_len=16), ["multiple of seq_len"]),
    "unknown training option": (lambda e: mi_lenses.train_lens(e.m, e.tmp / "short.txt", stpes=3), ["unknown options"]),
    # models and devices
    "model file that does not exist": (lambda e: mi_lenses.load_model(e.tmp / "no_such.gguf"), ["not found"]),
    "folder that is not a model": (lambda e: mi_lenses.load_model(e.tmp / "empty"), ["no config.json"]),
    "model folder whose config names no model": (lambda e: mi_lenses.load_model(e.tmp / "no-model"),
                                                 ["names no model", "model_type"]),
    "model path that is a symlink loop": (lambda e: mi_lenses.load_model(e.tmp / "loop-a"), ["symlink loop"]),
    "unknown model kind": (lambda e: mi_lenses.load_model(e.folder, kind="hookd"), ["kind must be"]),
    "device that does not exist": (lambda e: mi_lenses.load_model(e.folder, device="cuda:7"),
                                   ["use device='cpu'"]),
    "not a model": (lambda e: mi_lenses.logit_lens("gpt2", PROMPT), ["expected a TransformerLens model", "load_model"]),
    "a result asked for a prompt it lacks": (lambda e: mi_lenses.logit_lens(e.m, PROMPT).to_dict(batch=5),
                                             ["batch 5 is out of range"]),
    # circuit analysis
    "patching prompts of different lengths": (lambda e: mi_lenses.activation_patching(
        e.m, PROMPT + " known", PROMPT, answer="Paris"), ["position_map=", "--position-map"]),
    "edges on prompts of different lengths": (lambda e: mi_lenses.edge_attribution(
        e.m, PROMPT + " known", PROMPT, answer="Paris"), ["edge attribution", "takes no position map",
                                                         "without changing its length"]),
    "patching an activation that does not exist": (lambda e: mi_lenses.activation_patching(
        e.m, PROMPT, PROMPT, answer="Paris", what="logits"), ["what=", "resid_pre"]),
    "patching grid that does not fit the activation": (lambda e: mi_lenses.activation_patching(
        e.m, PROMPT, PROMPT, answer="Paris", what="resid_pre", by="layer_head"), ["by="]),
    "metric that returns NaN (exact patching)": (lambda e: mi_lenses.activation_patching(
        e.m, PROMPT, PROMPT, metric=lambda logits: logits[0, -1, 0] * float("nan")), ["returned nan", "finite"]),
    "metric that returns inf on a patched cell": (lambda e: mi_lenses.activation_patching(
        e.m, e.tokens, e.tokens.flip(-1), what="resid_pre",
        metric=_inf_after_two_calls()), ["returned inf", "patched"]),
    "metric that returns NaN (attribution patching)": (lambda e: mi_lenses.activation_patching(
        e.m, PROMPT, PROMPT, method="attribution", metric=lambda logits: logits[0, -1, 0] * float("nan")),
        ["returned nan", "finite"]),
    "metric whose answer is the wrong token": (lambda e: mi_lenses.activation_patching(
        e.m, PROMPT, PROMPT, answer="Paris", wrong="Paris"), ["same"]),
}


def _inf_after_two_calls() -> Callable[[torch.Tensor], torch.Tensor]:
    """A metric finite on the clean and corrupted runs, infinite on every patched cell."""
    calls = []

    def metric(logits: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return logits[0, -1, 0] if len(calls) <= 2 else logits[0, -1, 0] * 0 + float("inf")

    return metric


SHORT = 500  # characters: every message stays short, whatever the user passed


@pytest.fixture(scope="module")
def env(builder, tmp_path_factory) -> Env:
    e = Env(builder, tmp_path_factory.mktemp("bad_input"))
    yield e
    for cleanup in e.cleanups:
        cleanup()


@pytest.fixture(scope="module")
def reference(env):
    with torch.no_grad():
        return env.m(env.tokens)


@pytest.mark.parametrize("case", list(API), ids=str)
def test_api_case(env, reference, case, capsys):
    call, words = API[case]
    before = hook_counts(env.m)
    with pytest.raises(MiLensesError) as err:
        call(env)
    msg = str(err.value)
    for w in words:
        assert w in msg, f"{case}: {w!r} not in {msg!r}"
    assert len(msg) <= SHORT and "\n" not in msg, f"{case}: a message of {len(msg)} characters: {msg[:200]!r}"
    assert "pickle payload executed" not in capsys.readouterr().out
    assert hook_counts(env.m) == before, f"{case}: hooks left on the model"
    with torch.no_grad():
        assert torch.equal(env.m(env.tokens), reference), f"{case}: the model's outputs changed"


CLI: dict[str, tuple[Callable[[Env], list[str]], list[str]]] = {
    "CLI: model that does not exist": (lambda e: ["logit-lens", "x", "--model", "/no/such/model.gguf"], ["not found"]),
    "CLI: empty prompt": (lambda e: ["logit-lens", "", "--model", str(e.folder)], ["empty prompt"]),
    "CLI: top-k of zero": (lambda e: ["logit-lens", "x", "--model", str(e.folder), "--top-k", "0"], ["--top-k"]),
    "CLI: target of several tokens": (lambda e: ["logit-lens", PROMPT, "--model", str(e.folder), "--target", " capital"],
                                      ["not a single token"]),
    "CLI: lens of another model": (lambda e: ["logit-lens", PROMPT, "--model", str(e.folder), "--lens",
                                              str(e.tmp / "other_lens")], ["for a model with 2 layers"]),
    "CLI: answer of several tokens": (lambda e: ["dla", PROMPT, "--model", str(e.folder), "--answer", " Paris"],
                                      ["not a single token"]),
    "CLI: source layer out of range": (lambda e: ["patchscope", "--model", str(e.folder), "--source-prompt", PROMPT,
                                                  "--source-layer", "99"], ["out of range"]),
    "CLI: folder without a lens": (lambda e: ["tuned-lens", "eval", "--model", str(e.folder), "--lens",
                                              str(e.tmp / "empty")], ["holds no lens"]),
    "CLI: training data that does not exist": (lambda e: ["tuned-lens", "train", "--model", str(e.folder), "--data",
                                                          str(e.tmp / "nope.txt"), "--out", str(e.tmp / "o"),
                                                          "--seq-len", "16", "--tokens-per-step", "64"],
                                               ["neither a file/folder"]),
    "CLI: prompt longer than the context": (lambda e: ["logit-lens", _long_prompt(), "--model", str(e.folder)],
                                            ["context window is 64", "--beyond-context"]),
    "CLI: JSON path that is a folder": (lambda e: ["logit-lens", "x", "--model", str(e.folder), "--json", "/"],
                                        ["--json", "is a folder, not a file"]),
    "CLI: page on a read-only file system": (lambda e: ["report", "x", "--model", str(e.folder), "--out",
                                                        "/proc/version"], ["--out", "/proc/version", "not writable"]),
    "CLI: output folder that is a file": (lambda e: ["tuned-lens", "train", "--model", str(e.folder), "--out",
                                                     str(e.tmp / "short.txt")], ["--out", "is not a folder"]),
    "CLI: device that does not exist": (lambda e: ["logit-lens", "x", "--model", str(e.folder), "--device", "cuda:7"],
                                        ["use device='cpu'"]),
    "CLI: prompt with bytes that are not UTF-8": (lambda e: ["logit-lens", "caf\udcff", "--model", str(e.folder)],
                                                  ["argument 2", "not UTF-8", "b'\\xff'"]),
    "CLI: answer with bytes that are not UTF-8": (lambda e: ["dla", PROMPT, "--answer", "\udce9", "--model",
                                                             str(e.folder)], ["argument 4", "not UTF-8"]),
    "CLI: answer of 5,000 characters": (lambda e: ["dla", PROMPT, "--answer", "ab" * 2500, "--model", str(e.folder)],
                                        ["not a single token", "(5000 characters)"]),
    "CLI: model folder whose config names no model": (lambda e: ["logit-lens", "x", "--model", str(e.tmp / "no-model")],
                                                      ["names no model"]),
    "CLI: model path that is a symlink loop": (lambda e: ["logit-lens", "x", "--model", str(e.tmp / "loop-a")],
                                               ["symlink loop"]),
    "CLI: JSON to a character device": (lambda e: ["logit-lens", "x", "--model", str(e.folder), "--json",
                                                   str(e.device())], ["--json", "character device", "- for standard"]),
    "CLI: page through a link to a device": (lambda e: ["report", "x", "--model", str(e.folder), "--out",
                                                        str(e.device().parent / "link-to-null")],
                                             ["--out", "a link to", "character device"]),
    "CLI: page to a FIFO": (lambda e: ["logit-lens", "x", "--model", str(e.folder), "--html", str(e.tmp / "fifo")],
                            ["--html", "FIFO"]),
    "CLI: output to a symlink loop": (lambda e: ["logit-lens", "x", "--model", str(e.folder), "--json",
                                                 str(e.tmp / "loop-a")], ["--json", "symlink loop"]),
    "CLI: page on a full file system": (lambda e: ["report", "x", "--model", str(e.folder), "--out",
                                                   str(e.full_folder() / "r.html")], ["--out", "is full", "KiB free"]),
    "CLI: output folder that is standard output": (lambda e: ["tuned-lens", "train", "--model", str(e.folder),
                                                              "--out", "-"], ["--out", "cannot hold a folder"]),
    "CLI: report --corrupted of another length": (lambda e: ["report", PROMPT, "--corrupted", PROMPT + " known",
                                                             "--model", str(e.folder), "--out", str(e.tmp / "r.html")],
                                                  ["prompt's length", "--position-map"]),
    "CLI: patching prompts of different lengths": (lambda e: ["patch", PROMPT + " known", PROMPT, "--answer", "Paris",
                                                              "--model", str(e.folder)], ["--position-map C:K"]),
    "CLI: position map that is not pairs": (lambda e: ["patch", PROMPT + " known", PROMPT, "--answer", "Paris",
                                                       "--model", str(e.folder), "--position-map", "0-0"],
                                            ["--position-map", "clean:corrupted"]),
    "CLI: circuit with a position map": (lambda e: ["patch", PROMPT + " known", PROMPT, "--answer", "Paris", "--model",
                                                    str(e.folder), "--edges", "10", "--position-map", "0:0"],
                                         ["--edges", "takes no --position-map"]),
}


@pytest.mark.parametrize("case", list(CLI), ids=str)
def test_cli_case(env, case, capsys):
    from mi_lenses.cli import main

    argv, words = CLI[case]
    code = main(argv(env))
    err = capsys.readouterr().err.strip()
    assert code != 0, f"{case}: exit status 0"
    assert err.startswith("mi-lenses: error:") and "\n" not in err and "Traceback" not in err, err
    assert len(err) <= SHORT + len("mi-lenses: error: "), f"{case}: a message of {len(err)} characters"
    for w in words:
        assert w in err, f"{case}: {w!r} not in {err!r}"


def test_the_docs_list_every_case():
    table = DOC.read_text()
    missing = [case for case in [*API, *CLI] if f"| {case} |" not in table]
    assert not missing, f"docs/bad_input.md lacks {missing}: run .venv/bin/python scripts/bad_input_table.py"
    assert len(API) + len(CLI) >= 30
    rows = re.findall(r"^\| (?!case|---)(.+?) \|", table, flags=re.M)
    assert set(rows) >= set(API) | set(CLI)
    json.dumps(sorted(rows))  # plain text


# ------------------------------------------------------------------------------------------------ every file we read
def _own_lens(env: Env, name: str, edit: Callable[[dict], dict]) -> Path:
    """A copy of our own-format lens with ``maps.safetensors`` edited and its checksum updated (so the content
    checks, not the checksum, must catch it)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    folder = env.tmp / name
    mi_lenses.TunedLens.from_model(env.m).save(folder)
    save_file(edit(load_file(folder / "maps.safetensors")), str(folder / "maps.safetensors"))
    cfg = json.loads((folder / "mi_lens.json").read_text())
    cfg["sha256"] = hashlib.sha256((folder / "maps.safetensors").read_bytes()).hexdigest()
    (folder / "mi_lens.json").write_text(json.dumps(cfg))
    return folder


def _checkpoint(env: Env, name: str, raw: bytes | None = None, state: dict | None = None) -> Path:
    out = env.tmp / name
    (out / "checkpoint").mkdir(parents=True)
    if raw is not None:
        (out / "checkpoint" / "state.pt").write_bytes(raw)
    else:
        torch.save(state, out / "checkpoint" / "state.pt")
    return out


def _tokens_for_training():
    return torch.randint(3, 300, (16, 16), generator=torch.Generator().manual_seed(0))


def _map_file(env: Env, name: str, tensors: dict | None = None, raw: bytes | None = None) -> Path:
    from safetensors.torch import save_file

    path = env.tmp / f"{name}.safetensors"
    if raw is not None:
        path.write_bytes(raw)
    else:
        save_file(tensors, str(path))
    return path


def _pickle_bytes() -> bytes:
    import pickle

    return pickle.dumps({"weight": _Payload()})


FILES: dict[str, tuple[Callable[[Env], Any], list[str]]] = {
    "own lens: NaN weights": (lambda e: mi_lenses.load_lens(_own_lens(
        e, "own_nan", lambda s: {**s, "b.0": s["b.0"] * float("nan")}), e.m), ["non-finite"]),
    "own lens: wrong shape": (lambda e: mi_lenses.load_lens(_own_lens(
        e, "own_shape", lambda s: {**s, "A.1": s["A.1"][:1]}), e.m), ["shape"]),
    "own lens: integer weights": (lambda e: mi_lenses.load_lens(_own_lens(
        e, "own_int", lambda s: {k: v.long() for k, v in s.items()}), e.m), ["expected floating point"]),
    "own lens: truncated": (lambda e: mi_lenses.load_lens(_truncated_own(e), e.m), ["corrupt or truncated"]),
    "checkpoint: pickle payload": (lambda e: mi_lenses.train_lens(
        e.m, _tokens_for_training(), _checkpoint(e, "ck_pickle", raw=_pickle_bytes()), resume=True, seq_len=16,
        tokens_per_step=64, progress=False), ["nothing was executed", "start over"]),
    "checkpoint: truncated": (lambda e: mi_lenses.train_lens(
        e.m, _tokens_for_training(), _checkpoint(e, "ck_trunc", raw=b"PK\x03\x04 not a zip"), resume=True,
        seq_len=16, tokens_per_step=64, progress=False), ["corrupt, truncated"]),
    "checkpoint: another model's lens": (lambda e: mi_lenses.train_lens(
        e.m, _tokens_for_training(), _checkpoint(e, "ck_other", state={
            "weight": torch.zeros(2, 32, 32), "bias": torch.zeros(2, 32), "optimizer": {}, "step": 1}),
        resume=True, seq_len=16, tokens_per_step=64, progress=False), ["belongs to another run"]),
    "affine map: pickle bytes": (lambda e: mi_lenses.AffineMap.load(_map_file(e, "m_pickle", raw=_pickle_bytes())),
                                 ["corrupt or truncated"]),
    "affine map: wrong tensors": (lambda e: mi_lenses.AffineMap.load(_map_file(
        e, "m_keys", {"w": torch.zeros(2, 2)})), ["not an affine map"]),
    "affine map: shapes that do not fit": (lambda e: mi_lenses.AffineMap.load(_map_file(
        e, "m_shape", {"weight": torch.zeros(4, 3), "bias": torch.zeros(4)})), ["do not make an affine map"]),
    "affine map: NaN": (lambda e: mi_lenses.AffineMap.load(_map_file(
        e, "m_nan", {"weight": torch.full((2, 2), float("nan")), "bias": torch.zeros(2)})), ["non-finite"]),
    "GGUF file that is not one": (lambda e: mi_lenses.load_model(_fake_gguf(e)), ["not a readable GGUF"]),
}


def _truncated_own(env: Env) -> Path:
    folder = env.tmp / "own_trunc"
    mi_lenses.TunedLens.from_model(env.m).save(folder)
    data = (folder / "maps.safetensors").read_bytes()
    (folder / "maps.safetensors").write_bytes(data[: len(data) // 3])
    return folder


def _fake_gguf(env: Env) -> Path:
    path = env.tmp / "fake.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    return path


@pytest.mark.parametrize("case", list(FILES), ids=str)
def test_every_file_we_read_refuses_corruption(env, reference, case, capsys):
    call, words = FILES[case]
    before = hook_counts(env.m)
    with pytest.raises(MiLensesError) as err:
        call(env)
    for w in words:
        assert w in str(err.value), f"{case}: {w!r} not in {err.value!r}"
    assert "pickle payload executed" not in capsys.readouterr().out
    assert hook_counts(env.m) == before
    with torch.no_grad():
        assert torch.equal(env.m(env.tokens), reference)
