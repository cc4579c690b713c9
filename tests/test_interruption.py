"""Files and interruption: a process killed with SIGKILL never leaves a half-written file under a final name, tuned-lens
training resumes from its last checkpoint to the same lens as an uninterrupted run, and two processes writing the
same path at once never produce a mixed file. Subprocesses run the real command line on a tiny model folder."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mi_lenses
from tiny import PROMPT

pytestmark = pytest.mark.slow  # subprocesses: tens of seconds

ROOT = Path(__file__).resolve().parents[1]
WRITER = r'''
import hashlib, sys
from mi_lenses.atomic import write_atomic
path, tag, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for i in range(n):
    body = (f"{tag}:{i}:" * (size // 16 + 1))[:size]
    write_atomic(path, body + "\n" + hashlib.sha256(body.encode()).hexdigest())
'''


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _complete(text: str) -> bool:
    """A file written by WRITER is complete when its last line is the checksum of the rest."""
    body, _, digest = text.rpartition("\n")
    return hashlib.sha256(body.encode()).hexdigest() == digest


def _final_names(folder: Path) -> list[Path]:
    """Files under their final names (temp files of the atomic writer are hidden: ``.name.xxxx``)."""
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]


@pytest.fixture(scope="module")
def folder(builder, tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("interrupt") / "tiny-model"
    builder.hf("llama_gqa").save_pretrained(f)
    builder.tok.save_pretrained(f)
    return f


def _train(folder: Path, out: Path, *extra: str) -> list[str]:
    text = ROOT / "mi_lenses" / "data" / "shakespeare_train.txt"
    return [sys.executable, "-m", "mi_lenses.cli", "tuned-lens", "train", "--model", str(folder), "--data", str(text),
            "--out", str(out), "--steps", "60", "--tokens-per-step", "64", "--seq-len", "16", "--micro-batch", "2",
            "--warm-start-tokens", "64", "--checkpoint-every", "3", *extra]


def test_sigkill_during_training_resumes_to_the_same_lens(folder, tmp_path):
    ref = subprocess.run(_train(folder, tmp_path / "ref"), env=_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "run"
    proc = subprocess.Popen(_train(folder, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "checkpoint" / "state.pt"
    deadline = time.time() + 300
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            step = int(torch.load(state, weights_only=True)["step"])  # a checkpoint is complete or absent
            if step >= 9:
                break
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 9 <= step < 60
    for f in _final_names(out):  # whatever is there under a final name is whole
        if f.suffix == ".pt":
            torch.load(f, weights_only=True)
        elif f.suffix == ".json":
            json.loads(f.read_text())
    assert not (out / "mi_lens.json").exists(), "a lens was saved before training ended"
    resumed = subprocess.run(_train(folder, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = mi_lenses.load_lens(tmp_path / "ref"), mi_lenses.load_lens(out)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias), "resumed lens differs"
    assert [p.name for p in (out / "checkpoint").iterdir() if p.name.startswith(".")] == [], "temp files left"


def test_sigkill_while_writing_html_and_json_leaves_whole_files(folder, tmp_path):
    """The command line killed at random moments: --html and --json are absent or whole, never half-written."""
    cmd = [sys.executable, "-m", "mi_lenses.cli", "logit-lens", PROMPT, "--model", str(folder),
           "--html", str(tmp_path / "out.html"), "--json", str(tmp_path / "out.json")]
    t0 = time.time()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    runtime = time.time() - t0
    rng = random.Random(0)
    for attempt in range(4):
        for f in tmp_path.glob("out.*"):
            f.unlink()
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(runtime * rng.uniform(0.6, 1.0))  # the end of the run, where the files are written
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for f in _final_names(tmp_path):
            if f.name == "out.json":
                json.loads(f.read_text())
            elif f.name == "out.html":
                assert f.read_text().rstrip().endswith("</html>"), f"attempt {attempt}: half-written page"


    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)  # the next run cleans up
    assert done.returncode == 0, done.stderr[-2000:]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files of killed runs left"


def test_ctrl_c_ends_with_one_line_and_keeps_the_old_file(folder, tmp_path):
    """SIGINT during a report: one line on standard error, status 130, the page written before is kept whole."""
    page = tmp_path / "report.html"
    page.write_text("<html>old</html>")
    cmd = [sys.executable, "-m", "mi_lenses.cli", "report", PROMPT, "--model", str(folder), "--out", str(page)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not _imported(proc.pid):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the report finished before the signal arrived")
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("mi-lenses: interrupted") and "Traceback" not in err, err[-2000:]
    assert page.read_text() == "<html>old</html>"


def _imported(pid: int) -> bool:
    """Whether the process is loading the model (its weights file is mapped): inside the command, past start-up."""
    try:
        return "model.safetensors" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_standard_output_as_the_json_path(folder):
    """``--json -``: the result is the only thing on standard output (the table goes to standard error)."""
    cmd = [sys.executable, "-m", "mi_lenses.cli", "logit-lens", PROMPT, "--model", str(folder), "--json", "-"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(done.stdout)
    assert data["tokens"] and data["layers"][-1] == "final" and "final row verified" in done.stderr


def test_sigkill_mid_write_never_leaves_a_mixed_file(tmp_path):
    path = tmp_path / "big.txt"
    for kill_after in (0.5, 1.5, 3.0):
        path.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "a", "100000", str(2_000_000)], env=_env())
        deadline = time.time() + 120  # the first write lands once mi_lenses is imported (seconds on a busy machine)
        while not path.is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(kill_after)  # then kill it in the middle of later writes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert path.is_file() and _complete(path.read_text()), f"killed after {kill_after} s: a mixed file"


def test_two_processes_writing_one_path_never_mix(tmp_path):
    path = tmp_path / "shared.txt"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, "40", str(1_000_000)], env=_env())
             for tag in ("left", "right")]
    seen = set()
    while any(p.poll() is None for p in procs):
        if path.is_file():
            text = path.read_text()
            assert _complete(text), "a reader saw a mixed or half-written file"
            seen.add(text.split(":", 1)[0])
        time.sleep(0.005)
    assert all(p.returncode == 0 for p in procs)
    assert _complete(path.read_text())
    assert seen, "the reader never saw a version"
