# %% [markdown]
# # The logit lens with mi_lenses
#
# Open this file as a notebook (VS Code / Jupyter with jupytext read `# %%` cells) or run it as a script:
# `python tutorials/01_logit_lens.py`. Everything runs offline on the embedded SmolLM2-135M-Instruct.

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
view = res.show()  # display(view) in a notebook: circuitsvis, rendered offline
res.to_html("logit_lens.html")  # standalone page: seed grids, KL chart, circuitsvis views
print("wrote logit_lens.html")
