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
    >>> circuit = edges.circuit(edges=10)
    >>> len(circuit.edges)
    10
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from torch import Tensor

from mi_lenses.attribution.directions import TokenSpec
from mi_lenses.errors import LensInputError
from mi_lenses.models.batch import PromptInput
from mi_lenses.models.flags import split_inputs
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.view import ModelView
from mi_lenses.patching.activation import integration_steps, resolve_metric, set_runs
from mi_lenses.patching.gradients import metric_pass, perturb_hook
from mi_lenses.patching.graph import Graph, build_graph, writer_hooks, writer_outputs
from mi_lenses.patching.metric import Metric, MetricFn
from mi_lenses.patching.pair import Direction, make_pair
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


def edge_attribution(
    model: Any,
    clean: PromptInput,
    corrupted: PromptInput,
    *,
    answer: TokenSpec | None = None,
    wrong: TokenSpec | None = None,
    metric: MetricFn | None = None,
    method: Literal["attribution", "eap_ig"] = "attribution",
    ig_steps: int | None = None,
    direction: Direction = "denoise",
    prepend_bos: bool | None = None,
) -> EdgeAttribution:
    """Score every edge between the embeddings, heads, MLPs and the logits (see the module docstring).

    Args mean what they mean in :func:`~mi_lenses.patching.activation.activation_patching`; the prompts must have
    the same length (edges sum over aligned positions). ``method="eap_ig"`` integrates over ``ig_steps`` points
    (default 16).

    Returns:
        :class:`~mi_lenses.patching.result.EdgeAttribution` (``scores[writer, reader]``, NaN where no edge;
        ``top_edges``, ``top_nodes``, ``circuit``).
    """
    t0 = time.perf_counter()
    view = ModelView(model)
    hooks = active_hooks(view.model)
    steps = integration_steps(method, ig_steps, ("attribution", "eap_ig"))
    pair = make_pair(view, clean, corrupted, direction=direction, prepend_bos=prepend_bos, aligned="edge attribution")
    met = resolve_metric(view, pair, answer, wrong, metric)
    graph = build_graph(view)
    names = writer_hooks(view)
    with split_inputs(view.model, mlp_in=view.has_mlp):
        base_logits, base_cache = view.run_with_cache(pair.base, names)
        src_logits, src_cache = view.run_with_cache(pair.source, names)
        check_head_writes(view, base_cache)
        set_runs(met, pair, base=met.cells(logits=base_logits), source=met.cells(logits=src_logits))
        grads = reader_gradients(view, graph, pair.base.tokens, src_cache, met, steps)
    delta = torch.stack([s - b for s, b in zip(writer_outputs(view, src_cache), writer_outputs(view, base_cache))])
    W = delta.shape[0]
    scores = delta.reshape(W, -1) @ grads.reshape(grads.shape[0], -1).T  # [writers, readers]
    gap = (met.clean - met.corrupted) if met.normalised else 1.0
    scores = torch.where(graph.valid, scores.cpu() / gap, torch.tensor(float("nan")))
    result = EdgeAttribution(
        model_name=view.name, method=method, direction=direction, metric=met.name, writers=graph.writers,
        readers=graph.readers, writer_layers=graph.writer_layers, reader_layers=graph.reader_layers, scores=scores,
        clean_value=met.clean, corrupted_value=met.corrupted, normalised=met.normalised, ig_steps=steps,
        n_layers=view.n_layers, n_heads=view.n_heads, n_kv_heads=view.n_kv_heads,
        spec=PairSpec.of(view, pair, met), seconds=time.perf_counter() - t0)
    return recorded(result, hooks)


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
