"""Faithfulness of a circuit, measured by intervening: the clean run with everything outside the circuit ablated.

An *edge* circuit keeps some writer -> reader edges of :mod:`mi_lenses.patching.graph`. Every other edge is cut: the
reader's own copy of the residual stream gets, in place of what the writer wrote in this run, the writer's
replacement value. The residual stream is a sum of writes, so the reader's input is rebuilt exactly:
``in_v - Σ_{u -> v cut} (out_u - replacement_u)``. A *node* circuit keeps some heads and MLPs; every other head's
``z`` and every other MLP's output is replaced (the embeddings are kept).

Replacements (``ablation``): ``"resample"`` (default) takes the corrupted run's values, ``"zero"`` zeros, ``"mean"``
the mean over ``reference`` prompts (default: the clean and corrupted prompts of the experiment) at each position.

``faithfulness = (metric(ablated) - metric(corrupted)) / (metric(clean) - metric(corrupted))``: 1 when the circuit
alone reproduces the clean behaviour, 0 when it does no better than the corrupted run. With resampling, the full
circuit gives exactly 1 and the empty edge circuit exactly 0 (every reader then sees the corrupted stream): the tests
check both.

Example:
    >>> edges = mi_lenses.edge_attribution(model, "The capital of France is", "The capital of Rome is",
    ...                                    answer=" Paris", wrong=" city")
    >>> full = mi_lenses.faithfulness(model, edges.circuit(threshold=0.0), ablation="zero")   # nothing cut
    >>> abs(full.ablated_value - full.spec.clean_value) < 1e-4        # whatever the ablation: the clean run
    True
    >>> small = mi_lenses.faithfulness(model, edges.circuit(edges=20), ablation="mean")
    >>> c, x = small.spec.clean_value, small.spec.corrupted_value
    >>> abs(small.faithfulness * (c - x) + x - small.ablated_value) < 1e-5   # the fraction of the gap recovered
    True
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

import torch
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.models.batch import PromptInput
from mi_lenses.models.flags import split_inputs
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.view import ModelView
from mi_lenses.patching.edges import check_head_writes
from mi_lenses.patching.graph import Graph, build_graph, head_writes, writer_hooks, writer_outputs
from mi_lenses.patching.metric import Metric
from mi_lenses.patching.result import Circuit

Ablation = Literal["resample", "zero", "mean"]


def faithfulness(model: Any, circuit: Circuit, *, ablation: Ablation = "resample",
                 reference: PromptInput | None = None) -> Circuit:
    """The circuit with its ``faithfulness`` measured (see the module docstring).

    Args:
        model: the model the circuit was found on, hooked as you like (your hooks stay active in the run).
        circuit: a :class:`~mi_lenses.patching.result.Circuit` (from ``EdgeAttribution.circuit`` or
            ``PatchingResult.circuit``); its prompts and metric are the ones it was found with.
        ablation: what replaces everything outside the circuit: ``"resample"`` (the corrupted run's values),
            ``"zero"`` or ``"mean"`` (the mean over ``reference``).
        reference: the prompts of a mean ablation (each as long as the clean prompt; default the clean and corrupted
            prompts).

    Returns:
        A copy of ``circuit`` with ``faithfulness`` = (metric with the circuit only - corrupted) / (clean -
        corrupted), ``ablation`` and ``ablated_value`` set.
    """
    t0 = time.perf_counter()
    view = ModelView(model)
    hooks = active_hooks(view.model)
    if ablation not in ("resample", "zero", "mean"):
        raise LensInputError(f"ablation must be 'resample', 'zero' or 'mean', got {ablation!r}.")
    if reference is not None and ablation != "mean":
        raise LensInputError("reference= holds the prompts of a mean ablation: pass ablation='mean' with it.")
    spec = circuit.spec
    clean = spec.clean_tokens.to(view.device)
    if ablation == "resample":
        ref_tokens = spec.corrupted_tokens.to(view.device)
    elif ablation == "mean":
        ref_tokens = torch.cat([clean, spec.corrupted_tokens.to(view.device)]) if reference is None else \
            view.batch(reference).tokens
        if ref_tokens.shape[1] != clean.shape[1]:
            raise LensInputError(f"the reference prompts have {ref_tokens.shape[1]} tokens and the clean prompt "
                                 f"{clean.shape[1]}: a mean ablation replaces values position by position.")
    else:
        ref_tokens = None
    met = Metric(view, spec.metric, clean.shape[0], spec.answer_ids, spec.wrong_ids, spec.metric_fn,
                 spec.clean_value, spec.corrupted_value)
    if circuit.kind == "edges":
        logits = _edge_run(view, circuit, clean, ref_tokens, ablation)
    else:
        logits = _node_run(view, circuit, clean, ref_tokens, ablation)
    value = float(met.cells(logits=logits)[0])
    gap = spec.clean_value - spec.corrupted_value
    recovered = (value - spec.corrupted_value) / gap if gap else float("nan")
    out = dataclasses.replace(circuit, faithfulness=recovered, ablation=ablation, ablated_value=value,
                              seconds=time.perf_counter() - t0)
    return recorded(out, hooks)


def _replacements(view: ModelView, ref_tokens: Tensor | None, like: list[Tensor], ablation: str) -> list[Tensor]:
    if ablation == "zero":
        return [torch.zeros_like(t[:1]) for t in like]
    _, cache = view.run_with_cache(view.batch(ref_tokens), writer_hooks(view))
    outs = writer_outputs(view, cache)
    return [o.mean(0, keepdim=True) for o in outs] if ablation == "mean" else outs


def _cut_edges(graph: Graph, circuit: Circuit) -> Tensor:
    """``cut[w, r]``: the edges of ``graph`` the circuit does not keep (refusing an edge the graph lacks)."""
    w_of = {w: i for i, w in enumerate(graph.writers)}
    r_of = {r: i for i, r in enumerate(graph.readers)}
    kept = torch.zeros(len(graph.writers), len(graph.readers), dtype=torch.bool)
    for w, r in circuit.edges:
        if w not in w_of or r not in r_of or not bool(graph.valid[w_of[w], r_of[r]]):
            raise LensInputError(f"the circuit's edge {w} -> {r} is not an edge of this model's graph: a circuit "
                                 "from another model, or a reader before its writer.")
        kept[w_of[w], r_of[r]] = True
    return graph.valid & ~kept


@torch.no_grad()
def _edge_run(view: ModelView, circuit: Circuit, clean: Tensor, ref_tokens: Tensor | None, ablation: str) -> Tensor:
    """The logits of the clean run with every edge outside ``circuit`` cut (see the module docstring)."""
    graph = build_graph(view)
    cut = _cut_edges(graph, circuit)
    with split_inputs(view.model, mlp_in=view.has_mlp):
        _, base_cache = view.run_with_cache(view.batch(clean), writer_hooks(view))
        check_head_writes(view, base_cache)
        repl = _replacements(view, ref_tokens, writer_outputs(view, base_cache), ablation)
        with view.model.hooks(fwd_hooks=_EdgeCuts(view, graph, cut, repl).hooks()):
            return view.model(clean)


class _EdgeCuts:
    """The hooks of an edge circuit's run: every writer's ``output - replacement`` is recorded as it is written
    (``live``), and every reader's input loses the recorded writes of the edges cut into it."""

    def __init__(self, view: ModelView, graph: Graph, cut: Tensor, repl: list[Tensor]):
        self.view, self.graph, self.cut, self.repl = view, graph, cut, repl
        self.live: dict[int, Tensor] = {}  # writer index -> (this run's output - replacement)

    def hooks(self) -> list:
        """Writers first, then readers of the same hook point (a writer at blocks.0.hook_resid_pre comes first)."""
        view = self.view
        out = [(view.hook_name("resid_pre", 0), self._write(0))]
        for l in range(view.n_layers):
            out.append((view.attn_hook(l, "z"), self._heads(l)))
            if view.has_mlp:
                out.append((view.out_hook(l, "mlp"), self._write(self.graph.writer_index(l)[1])))
        return out + [(name, self._read(first, n)) for name, first, n in self.graph.segments]

    def _write(self, w: int):
        def hook(t: Tensor, hook=None) -> None:
            self.live[w] = t.float() - self.repl[w].to(t.device)

        return hook

    def _heads(self, layer: int):
        first, _, _ = self.graph.writer_index(layer)

        def hook(t: Tensor, hook=None) -> None:
            writes = head_writes(t, self.view.W_O(layer))
            for h in range(self.graph.n_heads):
                self.live[first + h] = writes[:, :, h] - self.repl[first + h].to(t.device)

        return hook

    def _read(self, first: int, n: int):
        def hook(t: Tensor, hook=None) -> Tensor:
            ws = [w for w in self.live if bool(self.cut[w, first : first + n].any())]
            if not ws:
                return t
            D = torch.stack([self.live[w] for w in ws])  # [w, B, S, d]
            E = self.cut[ws, first : first + n].float().to(D.device)  # [w, n]
            if t.ndim == 3:
                return t - torch.einsum("w,wbsd->bsd", E[:, 0], D).to(t.dtype)
            return t - torch.einsum("wn,wbsd->bsnd", E, D).to(t.dtype)

        return hook


@torch.no_grad()
def _node_run(view: ModelView, circuit: Circuit, clean: Tensor, ref_tokens: Tensor | None, ablation: str) -> Tensor:
    kept = set(circuit.nodes)
    for n in kept:
        if not (n.startswith("MLP") or (n.startswith("L") and "H" in n)):
            raise LensInputError(f"a node circuit keeps heads (L{{l}}H{{h}}) and MLPs (MLP{{l}}), got {n!r}.")
    names = [view.attn_hook(l, "z") for l in range(view.n_layers)] + \
        ([view.out_hook(l, "mlp") for l in range(view.n_layers)] if view.has_mlp else [])
    if ablation == "zero":
        repl = None
    else:
        _, cache = view.run_with_cache(view.batch(ref_tokens), names)
        repl = {n: (cache[n].mean(0, keepdim=True) if ablation == "mean" else cache[n]) for n in names}

    def z_hook(layer: int):
        drop = [h for h in range(view.n_heads) if f"L{layer}H{h}" not in kept]
        name = view.attn_hook(layer, "z")

        def hook(t: Tensor, hook=None) -> Tensor:
            out = t.clone()
            out[:, :, drop] = 0.0 if repl is None else repl[name][:, :, drop].to(t.device, t.dtype)
            return out

        return hook, bool(drop)

    def mlp_hook(layer: int):
        name = view.out_hook(layer, "mlp")

        def hook(t: Tensor, hook=None) -> Tensor:
            return torch.zeros_like(t) if repl is None else repl[name].to(t.device, t.dtype).expand_as(t).clone()

        return hook

    hooks = []
    for l in range(view.n_layers):
        fn, any_dropped = z_hook(l)
        if any_dropped:
            hooks.append((view.attn_hook(l, "z"), fn))
        if view.has_mlp and f"MLP{l}" not in kept:
            hooks.append((view.out_hook(l, "mlp"), mlp_hook(l)))
    with view.model.hooks(fwd_hooks=hooks):
        return view.model(clean)
