"""``attribution_graph``: the graph of one prompt through transcoders, as circuit-tracer 0.5.0's ``attribute`` builds it.

1. Record the local replacement model (:mod:`~mi_lenses.graphs.replacement`).
2. Pick the logit nodes: the most probable next tokens until their probabilities reach ``desired_logit_prob``, at
   most ``max_n_logits`` (or the ``targets`` you name), and compute their rows.
3. Expand features in order of influence: rank the active features by their influence on the logits through the
   rows computed so far, compute the next ``update_interval`` batches of the best unvisited ones, re-rank, until
   ``max_feature_nodes`` features have rows (all of them when it is None).
4. Keep the rows and the columns of the expanded features (plus every error and token column).

Memory: one recorded forward pass of the prompt, the rows ``[max_feature_nodes + n_logits, n_active + n_layers *
n_pos + n_pos]`` (float32) while expanding, and one batch of gradients; never a node × node matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mi_lenses.errors import LensInputError, VerificationError
from mi_lenses.features.dictionary import Dictionary, DictionarySet
from mi_lenses.features.reading import DictionaryInput, as_dictionary, check_dictionary, dictionary_label
from mi_lenses.graphs.influence import Layout, partial_influence
from mi_lenses.graphs.nodes import Nodes
from mi_lenses.graphs.replacement import Replacement, record
from mi_lenses.graphs.result import AttributionGraph
from mi_lenses.models.batch import PromptInput
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.view import ModelView
from mi_lenses.progress import bar

GRAD_BYTES = 1 << 30  # the most one batch of gradients may take (the batch shrinks on long prompts)


def attribution_graph(
    model: Any,
    prompt: PromptInput,
    transcoders: DictionaryInput,
    *,
    answer: str | int | Sequence[str | int] | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = 4096,
    batch_size: int = 32,
    update_interval: int = 4,
    exclude_first: int = 1,
    prepend_bos: bool | None = None,
    beyond_context: bool = False,
    progress: bool = True,
    check: bool = True,
) -> AttributionGraph:
    """The attribution graph of ``prompt`` through ``transcoders`` (Ameisen et al. 2025), as circuit-tracer builds it.

    Args:
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``), used as you hooked it.
        prompt: one prompt (text or token ids ``[1, pos]``).
        transcoders: a per-layer or cross-layer transcoder set, one per block (a
            :class:`~mi_lenses.features.dictionary.DictionarySet`), or a folder
            :func:`~mi_lenses.load_dictionary` reads (ours, circuit-tracer's, a sparsify folder of ``layers.N.mlp``).
        answer: the logit nodes: a token or a list of tokens (strings that are one token, or ids) instead of the
            most probable ones.
        max_n_logits: at most this many logit nodes (without ``targets``).
        desired_logit_prob: logit nodes are added, most probable first, until their probabilities reach this.
        max_feature_nodes: the node budget: at most this many features get rows, the most influential first (None:
            every active feature; circuit-tracer also reads 0 so, which is refused here).
        batch_size: targets per backward pass.
        update_interval: batches between re-rankings of the features by influence.
        exclude_first: the leading positions whose transcoder outputs are constants (no feature or error node; 1:
            the BOS position, as circuit-tracer).
        prepend_bos: add the BOS token when tokenising text (default: the model's setting).
        beyond_context: accept a prompt longer than the model's context (``cfg.n_ctx``).
        progress: show a progress bar.
        check: run ``verify()`` before returning: a model with a non-linear path the replacement model does not
            freeze (a state-space or linear-attention layer) is refused instead of returning wrong edges.

    Returns:
        :class:`~mi_lenses.graphs.result.AttributionGraph`: ``nodes``, ``edges`` ``[features + logits, features +
        errors + tokens]``; ``verify()``, ``prune()``, ``to_json()``, ``show()``.

    Example:
        >>> ts = mi_lenses.load_dictionary(model=model, progress=False)  # the default transcoders, trained once
        >>> g = mi_lenses.attribution_graph(model, "The capital of France is", ts, progress=False)
        >>> g = g.verify()                # every node's input is the sum of its edges plus its constant
        >>> p = g.prune()
        >>> 0 < len(p.nodes) < len(g.nodes), p.logit_tokens == g.logit_tokens
        (True, True)
    """
    view = ModelView(model)
    hooks_before = active_hooks(view.model)
    dictionary = as_dictionary(transcoders)
    if isinstance(dictionary, Dictionary):
        raise LensInputError("attribution_graph needs a transcoder for every block (a DictionarySet), got one "
                             f"dictionary on {dictionary.hook}: load the whole set's folder.")
    _check_options(max_n_logits, desired_logit_prob, max_feature_nodes, batch_size, update_interval, exclude_first)
    hooks = check_dictionary(view, dictionary)
    batch = view.batch(prompt, prepend_bos=prepend_bos, beyond_context=beyond_context)
    if batch.shape[0] != 1:
        raise LensInputError(f"attribution_graph traces one prompt, got {batch.shape[0]}: call it once per prompt.")
    if exclude_first >= batch.shape[1]:
        raise LensInputError(f"the prompt has {batch.shape[1]} tokens and exclude_first={exclude_first} leaves none: "
                             "use a longer prompt.")
    rep = record(view, batch.tokens.to(view.device), dictionary, hooks, exclude_first)
    ids, probs = _logit_targets(view, rep, answer, max_n_logits, desired_logit_prob)
    rows, row_sources = _expand(rep, ids, probs, max_feature_nodes, batch_size, update_interval, progress)
    rep.release()
    graph = _assemble(view, rep, batch.tokens[0], ids, probs, rows, row_sources, dictionary)
    if check:
        low = view.dtype not in (torch.float32, torch.float64)
        try:  # a bfloat16 / float16 model sums in its own precision: a tolerance of a few of its epsilons
            graph.verify(tolerance=max(1e-4, 4 * torch.finfo(view.dtype).eps) if low else 1e-4)
        except VerificationError as err:
            why = (f"or {view.dtype} rounding beyond the tolerance (load the model in float32)" if low else
                   "a state-space or linear-attention mixer, a gate")
            raise VerificationError(
                f"the attribution graph of {view.name} is not exact ({err}): the model has a non-linear path between "
                f"its transcoders that the local replacement model does not freeze ({why}): attribution graphs are "
                "not supported on it (docs/graphs.md).") from err
    return recorded(graph, hooks_before)


def _check_options(max_n_logits: int, desired_logit_prob: float, max_feature_nodes: int | None, batch_size: int,
                   update_interval: int, exclude_first: int) -> None:
    for name, v in (("max_n_logits", max_n_logits), ("batch_size", batch_size), ("update_interval", update_interval)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise LensInputError(f"{name} must be a positive int, got {v!r}.")
    if max_feature_nodes is not None and (not isinstance(max_feature_nodes, int) or isinstance(max_feature_nodes, bool)
                                          or max_feature_nodes < 1):
        raise LensInputError(f"max_feature_nodes must be an int >= 1, or None for every feature, got "
                             f"{max_feature_nodes!r}.")
    if not 0.0 < desired_logit_prob <= 1.0:
        raise LensInputError(f"desired_logit_prob must be in (0, 1], got {desired_logit_prob!r}.")
    if not isinstance(exclude_first, int) or exclude_first < 0:
        raise LensInputError(f"exclude_first must be an int >= 0, got {exclude_first!r}.")


def _logit_targets(view: ModelView, rep: Replacement, answer: str | int | Sequence[str | int] | None,
                   max_n_logits: int, desired: float) -> tuple[Tensor, Tensor]:
    """Token ids and probabilities of the logit nodes (circuit-tracer's salient logits, or ``answer``)."""
    probs = torch.softmax(rep.logits, -1)
    if answer is not None:
        answer = [answer] if isinstance(answer, (str, int)) else list(answer)
        ids = torch.tensor([view.to_single_token(t) for t in answer], dtype=torch.long)
        if len(set(ids.tolist())) != len(ids) or not len(ids):
            raise LensInputError(f"answer must name distinct tokens, got {answer}.")
        return ids, probs[ids]
    top_p, top_i = probs.topk(min(max_n_logits, probs.numel()))
    cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), torch.tensor(desired, dtype=top_p.dtype))) + 1
    return top_i[:cutoff], top_p[:cutoff]


def _batch_limit(rep: Replacement, batch_size: int) -> int:
    per_row = rep.n_pos * (rep.n_layers + 1) * max(rep.members[0].d_out, rep.view.d_model) * 4
    return max(1, min(batch_size, GRAD_BYTES // per_row))


def _expand(rep: Replacement, ids: Tensor, probs: Tensor, max_feature_nodes: int | None, batch_size: int,
            update_interval: int, progress: bool) -> tuple[Tensor, Tensor]:
    """The rows of the logits, then of the features in order of influence (module docstring, step 3): ``rows``
    ``[n_logits + n_visited, n_sources]`` and each row's source index (``-1`` for a logit)."""
    src, S, L = rep.sources, rep.n_pos, rep.n_layers
    n_active = src.n_features
    budget = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    B = _batch_limit(rep, batch_size)
    n_logits = len(ids)
    rows = torch.zeros(n_logits + budget, n_active + L * S + S)
    row_sources = torch.full((n_logits + budget,), -1, dtype=torch.long)
    vectors = rep.logit_vectors(ids)
    for i in range(0, n_logits, B):
        k = min(B, n_logits - i)
        rows[i:i + k] = rep.rows([L] * k, [S - 1] * k, vectors[i:i + k]).cpu()
    filled, visited = n_logits, torch.zeros(n_active, dtype=torch.bool)
    with bar(budget, "attribution graph: feature rows", unit="feature", enabled=progress) as pb:
        while filled < n_logits + budget:
            left = n_logits + budget - filled
            queue = update_interval * batch_size  # circuit-tracer's re-ranking interval; B only splits it
            if budget == n_active:
                pending = (~visited).nonzero()[:, 0][:queue]
            else:
                inf = partial_influence(rows[:filled], row_sources[:filled], probs)[:n_active]
                order = torch.argsort(inf, descending=True)
                pending = order[~visited[order]][: min(queue, left)]
            for chunk in pending.split(B):
                idx = chunk.tolist()
                vec = rep.feature_vectors(chunk)
                rows[filled:filled + len(idx)] = rep.rows(src.layer[chunk].tolist(), src.pos[chunk].tolist(),
                                                          vec).cpu()
                row_sources[filled:filled + len(idx)] = chunk
                visited[chunk] = True
                filled += len(idx)
                pb.update(len(idx))
    return rows, row_sources


def _assemble(view: ModelView, rep: Replacement, tokens: Tensor, ids: Tensor, probs: Tensor, rows: Tensor,
              row_sources: Tensor, dictionary: DictionarySet) -> AttributionGraph:
    """Rows in node order (features ascending, then logits), columns of the expanded features, errors and tokens."""
    src, S, L = rep.sources, rep.n_pos, rep.n_layers
    n_active, n_logits = src.n_features, len(ids)
    feat_rows = (row_sources >= 0).nonzero()[:, 0]
    selected, order = row_sources[feat_rows].sort()
    row_index = torch.cat([feat_rows[order], torch.arange(n_logits)])
    cols = torch.cat([selected, torch.arange(n_active, n_active + L * S + S)])
    edges = (rows if len(cols) == rows.shape[1] else rows[:, cols])[row_index]  # columns first: no full-width copy
    layout = Layout(len(selected), L * S, S, n_logits)
    err_l, err_p = torch.arange(L).repeat_interleave(S), torch.arange(S).repeat(L)
    nodes = Nodes.build(layout, features=(src.layer[selected], src.pos[selected], src.feature[selected],
                                          src.activation[selected]),
                        errors=(err_l, err_p), tokens=tokens.cpu(), logits=(ids, probs.cpu()), n_pos=S)
    source_index = torch.cat([selected, torch.arange(n_active, n_active + L * S + S)])
    str_tokens = [view.id_to_str(int(t)) for t in tokens.tolist()]
    return AttributionGraph(
        model_name=view.name, transcoders_name=dictionary_label(dictionary), str_tokens=str_tokens,
        tokens=tokens.tolist(), n_layers=L, nodes_table=nodes, edges=edges, source_index=source_index,
        logit_token_strs=[view.id_to_str(int(i)) for i in ids.tolist()], n_active=n_active,
        edge_mask=None, replacement=rep, feature_type=_feature_type(dictionary))


def _feature_type(dictionary: DictionarySet) -> str:
    return "cross layer transcoder" if dictionary.is_cross_layer else "per-layer transcoder"
