"""Edge attribution patching (EAP; Syed et al. 2023) and EAP-IG (Hanna et al. 2024) on the residual-stream graph.

Every edge ``u -> v`` of :mod:`mi_lenses.patching.graph` gets the first-order effect of patching what ``u`` writes
into ``v``'s own copy of the residual stream only:

    score(u -> v) = Σ_{prompt, pos} (out_u[source] - out_u[base]) · ∂metric/∂in_v

with the gradient taken at the base run (``method="attribution"``) or averaged along the input path (``"eap_ig"``,
``ig_steps`` points, as in :mod:`mi_lenses.patching.gradients`). One forward and one backward pass give every edge:
the readers' inputs are the per-head query/key/value copies and the MLP inputs of :mod:`mi_lenses.models.flags`.
A writer's scores over all the readers it feeds add up to its node attribution (its output is read by exactly those
readers), which the tests check against :func:`~mi_lenses.patching.activation.activation_patching`.

Example:
    >>> edges = mi_lenses.edge_attribution(model, "The capital of France is", "The capital of Rome is",
    ...                                    answer=" Paris", wrong=" city")
    >>> (writer, reader, score), = edges.top_edges(1)
    >>> abs(score) == float(edges.scores.nan_to_num(0).abs().max())
    True
    >>> heads = mi_lenses.activation_patching(model, "The capital of France is", "The capital of Rome is",
    ...                                       answer=" Paris", wrong=" city", what="head_out", method="attribution")
    >>> node = float(edges.node_scores()[edges.writers.index("L1H2")])   # a head's edges add up to its attribution
    >>> abs(node - float(heads.values[1, 2])) < 1e-5
    True
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.models.batch import PromptInput
from mi_lenses.models.flags import split_inputs
from mi_lenses.models.view import ModelView
from mi_lenses.options import with_options
from mi_lenses.patching.experiment import Experiment
from mi_lenses.patching.gradients import metric_pass, perturb_hook
from mi_lenses.patching.graph import Graph, build_graph, writer_hooks, writer_outputs
from mi_lenses.patching.metric import Metric
from mi_lenses.patching.options import EdgeOptions
from mi_lenses.patching.result import EdgeAttribution, PairSpec

HEAD_SUM_RTOL = 1e-3  # Σ_h z_h W_O[h] + b_O against hook_attn_out: float32 noise is ~1e-6


def check_head_writes(view: ModelView, cache) -> None:
    """Refuse a model whose attention output is not the sum of its heads' ``z @ W_O`` (a norm or a scale after the
    heads): its heads have no residual write of their own, so their edges are undefined."""
    for l in range(view.n_layers):
        z = cache[view.attn_hook(l, "z")].float()
        total = torch.einsum("bshe,hed->bsd", z, view.W_O(l).to(z.device))
        b_O = view.b_O(l)
        if b_O is not None:
            total = total + b_O.to(z.device)
        out = cache[view.out_hook(l, "attn")].float()
        if float((total - out).abs().max()) > HEAD_SUM_RTOL * (1.0 + float(out.abs().max())):
            raise LensInputError(
                f"block {l}'s attention output is not the sum of its heads' z @ W_O (the model normalises or scales "
                "it, or one of your hooks changes hook_attn_out): heads have no residual write of their own here, so "
                "edge attribution and edge circuits are unavailable. Node-level patching still works "
                "(activation_patching with what='head_out').")


@with_options(EdgeOptions)
def edge_attribution(model: Any, clean: PromptInput, corrupted: PromptInput, *,
                     options: EdgeOptions | None = None) -> EdgeAttribution:
    """Score every edge between the embeddings, heads, MLPs and the logits (see the module docstring): one forward
    and one backward pass (over ``ig_steps`` points for ``method="eap_ig"``); a writer's scores add up to its node
    attribution.

    Args:
        {options}

    Returns:
        :class:`~mi_lenses.patching.result.EdgeAttribution` (``scores[writer, reader]``, NaN where no edge;
        ``top_edges``, ``top_nodes``, ``circuit``).
    """
    exp = Experiment.prepare(model, clean, corrupted, options, aligned="edge attribution")
    steps = options.integration_steps()
    view = exp.view
    graph = build_graph(view)
    scores = edge_scores(exp, graph, steps)
    m = exp.metric
    return exp.finish(EdgeAttribution(
        model_name=view.name, method=options.method, mode=exp.pair.mode, metric=m.name, writers=graph.writers,
        readers=graph.readers, writer_layers=graph.writer_layers, reader_layers=graph.reader_layers, scores=scores,
        clean_value=m.clean, corrupted_value=m.corrupted, normalised=m.normalised, ig_steps=steps,
        n_layers=view.n_layers, n_heads=view.n_heads, n_kv_heads=view.n_kv_heads,
        spec=PairSpec.of(exp.pair, m), seconds=exp.seconds))


def edge_scores(exp: Experiment, graph: Graph, steps: int | None) -> Float[Tensor, "W R"]:
    """Every edge's score in the result's units, NaN where the writer does not feed the reader: both runs cached at
    the writers (the metric measured on them), the readers' gradients, and the writers' differences times those."""
    view, pair, met = exp.view, exp.pair, exp.metric
    names = writer_hooks(view)
    with split_inputs(view.model, mlp_in=view.has_mlp):
        base_logits, base_cache = view.run_with_cache(pair.base, names)
        src_logits, src_cache = view.run_with_cache(pair.source, names)
        check_head_writes(view, base_cache)
        exp.measure(base=met.cells(logits=base_logits), source=met.cells(logits=src_logits))
        grads = reader_gradients(view, graph, pair.base.tokens, src_cache, met, steps)
    delta = torch.stack([s - b for s, b in zip(writer_outputs(view, src_cache), writer_outputs(view, base_cache))])
    W = delta.shape[0]
    scores = delta.reshape(W, -1) @ grads.reshape(grads.shape[0], -1).T  # [writers, readers]
    return torch.where(graph.valid, scores.cpu() / exp.gap, torch.tensor(float("nan")))


def reader_gradients(view: ModelView, graph: Graph, tokens: Tensor, src_cache, met: Metric,
                     steps: int | None) -> Tensor:
    """``∂metric/∂in_v`` of every reader (raw metric units, summed over the IG points): ``[readers, B, S, d]``."""
    B = tokens.shape[0]
    m = steps or 1
    cut = view.hook_name("resid_pre", 0)
    deltas: dict[str, Tensor] = {}
    alphas = (torch.arange(m, dtype=torch.float32) + 0.5) / m if steps else None

    def interpolate(t: Tensor, hook=None) -> Tensor:
        x0 = src_cache[cut].to(t.device, t.dtype).repeat(m, 1, 1)
        a = alphas.to(t.device, t.dtype).repeat_interleave(B)[:, None, None]
        return t + a * (x0 - t)

    hooks: list = [(cut, interpolate)] if steps else []
    hooks += [(name, perturb_hook(deltas, name)) for name, _, _ in graph.segments]
    raw = metric_pass(view, met, tokens.repeat(m, 1), hooks)
    order = [name for name, _, _ in graph.segments]
    got = torch.autograd.grad(raw.sum() / m, [deltas[n] for n in order], allow_unused=True)
    out = torch.zeros(len(graph.readers), B, tokens.shape[1], view.d_model)
    for (name, first, n), g in zip(graph.segments, got):
        if g is None:
            continue
        g = g.detach().float().view(m, B, *g.shape[1:]).sum(0).cpu()
        if g.ndim == 3:  # [B, S, d]: one reader
            out[first] = g
        else:  # [B, S, n, d]
            out[first : first + n] = g.permute(2, 0, 1, 3)
    return out
