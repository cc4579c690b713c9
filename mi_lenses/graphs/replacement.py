"""The local replacement model of one prompt (Ameisen et al. 2025, "Circuit Tracing"), as circuit-tracer builds it.

The model's own forward pass, run once under our hooks, with

* every attention pattern and every norm scale (``hook_pattern``, ``hook_scale``: pre-, post- and final norms)
  frozen at its value on the prompt (``detach``): attention moves vectors linearly, a norm is an affine map;
* each block's MLP replaced by its transcoder: the output keeps its value, but the only way a gradient passes the
  MLP is the transcoder's linear skip connection (``x @ W_skip.T``); the transcoder's features are **nodes**: each
  active feature ``s`` writes ``a_s · W_dec[s]`` (a cross-layer transcoder: into every later block too), and
  ``error = output - reconstruction`` is the block's **error node** at each position;
* the token embeddings (``hook_embed``) as **token nodes**.

Everything else (biases, positional embeddings, the MLP outputs at the first ``exclude_first`` positions, where no
feature or error is kept, as circuit-tracer zeroes the BOS position) is a constant. The model is then linear in the
nodes, and the edge from a source ``s`` to a target ``t`` is

    A[t, s] = (what s writes) · ∂(what t reads) / ∂(where s writes)

for a feature target the encoder row ``W_enc[:, f]`` at its input hook (the pre-activation), for a logit target the
de-meaned unembedding column carried back through the frozen final norm at the last position. One forward pass is
recorded (batch 1, parameters without gradients, the MLPs' insides without a graph); :meth:`Replacement.rows` gets a
batch of targets' rows from one batched backward pass (``torch.autograd.grad(..., is_grads_batched=True)``), so
memory holds one copy of the prompt's activations whatever the batch.

:meth:`Replacement.replay` is the independent check: a plain forward pass (no gradients) in which the frozen values are
substituted and each MLP output is rebuilt from the nodes, with any of them removed or scaled; what each target reads
there is exactly linear in the nodes.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.features.dictionary import Dictionary, DictionarySet
from mi_lenses.models.decode import Norm
from mi_lenses.models.interventions import hook_point_names
from mi_lenses.models.parity import architecture_of
from mi_lenses.models.view import ModelView

FROZEN = ("hook_pattern", "hook_scale")  # attention patterns and every norm's scale
MLP_INPUTS = ("mlp.hook_in", "hook_mlp_in", "ln2.hook_normalized")  # hooks nothing but the MLP reads


@contextlib.contextmanager
def frozen_run(model: Any, fwd: list[tuple[str, Callable]]) -> Iterator[None]:
    """Our hooks on ``model`` (after the user's; removed on leaving, also on an exception), without the bridge's
    warnings that a hook edited a norm's scale (that is the point here) or a pattern it ignores (the probe of
    :func:`_check_patterns` finds that out and refuses the model)."""
    with warnings.catch_warnings(), model.hooks(fwd_hooks=fwd):
        warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
        warnings.filterwarnings("ignore", message="A hook on attn.hook_pattern returned a modified tensor")
        yield


@contextlib.contextmanager
def no_param_grads(model: Any) -> Iterator[None]:
    """Parameters without gradients for the duration (nothing is saved for their gradients), restored after."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def frozen_names(view: ModelView) -> list[str]:
    """One name per attention-pattern and norm-scale hook point of the model."""
    return sorted(n for n in hook_point_names(view.model).values() if n.rsplit(".", 1)[-1] in FROZEN)


@dataclass(eq=False)
class Sources:
    """The nodes that write: active features (``layer``, ``pos``, ``feature``, ``activation``, ordered by layer, then
    position, then feature), one error node per block and position, one token node per position."""

    layer: Int[Tensor, " n"]
    pos: Int[Tensor, " n"]
    feature: Int[Tensor, " n"]
    activation: Float[Tensor, " n"]
    errors: Float[Tensor, "L S d"]
    embed: Float[Tensor, "S d"]
    fixed: Float[Tensor, "L E d"]  # each MLP's output at the first exclude_first positions, less its skip part

    @property
    def n_features(self) -> int:
        return int(self.layer.numel())


@dataclass(eq=False)
class Replacement:
    """The recorded forward pass of the local replacement model on one prompt (see the module docstring)."""

    view: ModelView
    tokens: Int[Tensor, "1 S"]
    members: list[Dictionary]
    cross: dict[tuple[int, int], Tensor]
    hooks: list[tuple[str, str]]
    embed_hook: str
    exclude_first: int
    logits: Float[Tensor, " V"]  # the model's logits at the last position (float32, CPU)
    sources: Sources
    inputs: list[Tensor] = field(repr=False)  # what each transcoder reads [1, S, d_in], in the graph
    resid: Tensor = field(repr=False)  # the final residual stream [1, S, d], in the graph
    deltas: list[Tensor] = field(repr=False)  # zeros added at each write site (their gradients are the rows' factors)
    d_embed: Tensor = field(repr=False)
    frozen: dict[str, Tensor] = field(repr=False)

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_layers(self) -> int:
        return len(self.members)

    # ------------------------------------------------------------------------------------------ reading
    def feature_vectors(self, idx: Tensor) -> Float[Tensor, "n d_in"]:
        """The encoder rows of active features ``idx``: the direction of the input each pre-activation reads."""
        out = []
        for i in idx.tolist():
            d = self.members[int(self.sources.layer[i])]
            f = int(self.sources.feature[i])
            w = d.W_enc[:, f]
            if d.rescale_acts_by_decoder_norm:
                w = w * d.W_dec[f].norm()
            out.append(w)
        return torch.stack(out) if out else torch.zeros(0, self.members[0].d_in)

    def final_norm(self) -> Norm:
        dec = self.view.decoder
        return Norm(dec.kind or "RMS", dec.eps, None, None) if dec.kind else Norm("RMS", 0.0, None, None)

    def logit_vectors(self, ids: Int[Tensor, " n"]) -> Float[Tensor, "n d_model"]:
        """De-meaned unembedding columns of tokens ``ids`` (gain and logit multiplier included), carried back through
        the final norm with its scale frozen at the last position: what a logit target reads on the final residual."""
        dec = self.view.decoder
        W = dec.W.float()
        cols = (W[:, ids.to(W.device)] - W.mean(1, keepdim=True)).T
        last = self.resid[0, -1].detach().float()
        if dec.kind is None:
            return cols
        return self.final_norm().pullback(cols, dec.scale(last).expand(cols.shape[0]))

    def release(self) -> None:
        """Drop the recorded graph of the forward pass (after the last row): keep detached values for replays."""
        self.inputs = [x.detach() for x in self.inputs]
        self.resid = self.resid.detach()
        self.deltas, self.d_embed = [], torch.zeros(0)

    # ------------------------------------------------------------------------------------------ edges
    def rows(self, sites: Sequence[int], positions: Sequence[int], vectors: Float[Tensor, "B d"]
             ) -> Float[Tensor, "B n_sources"]:
        """Edges into a batch of targets from every source (features, then errors, then tokens): target ``b`` reads
        ``vectors[b]`` at position ``positions[b]`` of read site ``sites[b]`` (a block's transcoder input, or
        ``n_layers`` for the final residual stream)."""
        B = len(sites)
        outs, grads_out = [], []
        reads = [*self.inputs, self.resid]
        for site in sorted(set(sites)):
            t = reads[site]
            g = torch.zeros((B, *t.shape), dtype=t.dtype, device=t.device)
            for b, (s, p) in enumerate(zip(sites, positions)):
                if s == site:
                    g[b, 0, p] = vectors[b].to(t.dtype)
            outs.append(t)
            grads_out.append(g)
        wrt = [*self.deltas, self.d_embed]
        grads = torch.autograd.grad(outs, wrt, grads_out, retain_graph=True, allow_unused=True,
                                    is_grads_batched=True)
        zero = lambda t: torch.zeros((B, *t.shape[1:]), device=t.device)
        g_write = [(zero(d) if g is None else g[:, 0].float()) for g, d in zip(grads[:-1], self.deltas)]
        g_embed = zero(self.d_embed) if grads[-1] is None else grads[-1][:, 0].float()
        return torch.cat([self._feature_columns(g_write), self._error_columns(g_write),
                          torch.einsum("bsd,sd->bs", g_embed, self.sources.embed.to(g_embed.device))], dim=1)

    def _feature_columns(self, g_write: list[Tensor]) -> Tensor:
        """Each active feature's column: the gradient at its write site (and, cross-layer, at every later one) at its
        position, on its decoder row, times its activation. Per block, the decoder rows of each position's features
        are stacked ``[positions, slots, d]`` (a few per position) and contracted with that position's gradients."""
        src = self.sources
        B = g_write[0].shape[0]
        out = torch.zeros(B, src.n_features, device=g_write[0].device)
        for j, d in enumerate(self.members):
            sel = (src.layer == j).nonzero()[:, 0]
            if sel.numel() == 0:
                continue
            pos, feat = src.pos[sel], src.feature[sel]  # sorted by position
            where, group, counts = pos.unique(return_inverse=True, return_counts=True)
            slot = torch.arange(pos.numel()) - (torch.cumsum(counts, 0) - counts)[group]
            total = torch.zeros(B, sel.numel(), device=out.device)
            writes = [(j, d.decoder_rows())] + [(jj, W) for (i, jj), W in self.cross.items() if i == j]
            for jj, rows in writes:
                dec = torch.zeros(where.numel(), int(counts.max()), rows.shape[-1], device=out.device)
                dec[group, slot] = rows[feat].to(out.device)
                vals = torch.einsum("bpd,pkd->bpk", g_write[jj][:, where.to(out.device)], dec)
                total += vals[:, group, slot]
            out[:, sel] = total * src.activation[sel].to(out.device)
        return out

    def _error_columns(self, g_write: list[Tensor]) -> Tensor:
        errs = self.sources.errors
        return torch.cat([torch.einsum("bsd,sd->bs", g, errs[j].to(g.device)) for j, g in enumerate(g_write)], dim=1)

    # ------------------------------------------------------------------------------------------ the check
    def replay(self, scale: Float[Tensor, " n_sources"] | None = None) -> tuple[list[Tensor], Tensor, Tensor]:
        """A forward pass of the frozen replacement model with each source node's write multiplied by ``scale``
        (default all ones: the recorded run; zeros: only the constants), the features' activations as recorded,
        returning what each transcoder reads ``[S, d_in]``, the final residual stream ``[S, d]`` and the logits at the
        last position ``[V]``."""
        src, S, L = self.sources, self.n_pos, self.n_layers
        n_f = src.n_features
        scale = torch.ones(n_f + L * S + S) if scale is None else scale.float().cpu()
        f_scale = scale[:n_f]
        acts = []
        for j, d in enumerate(self.members):
            a = torch.zeros(S, d.n_features)
            sel = src.layer == j
            a[src.pos[sel], src.feature[sel]] = src.activation[sel] * f_scale[sel]
            acts.append(a)
        return self._forward(lambda j, x: acts[j], scale[n_f:n_f + L * S].view(L, S), scale[n_f + L * S:])

    def run(self, edits: dict[tuple[int, int, int], float] | None = None, keep: list[Tensor] | None = None
            ) -> Float[Tensor, " V"]:
        """The logits of the local replacement model itself: attention patterns and norm scales frozen, each MLP
        replaced by its transcoder (its features *recomputed* from what it reads) plus the recorded error. ``edits``
        sets features ``(layer, position, feature)`` to a value (0 ablates); ``keep`` (one ``[S, n_features]`` mask per
        block) zeroes every other feature. Without either it reproduces the model's logits. Returns the logits at the
        last position (float32, CPU)."""

        def activations(j: int, x: Tensor) -> Tensor:
            a = self.members[j].encode(x)
            a[: self.exclude_first] = 0
            if keep is not None:
                a = a * keep[j].to(a.device)
            for (layer, pos, feature), value in (edits or {}).items():
                if layer == j:
                    a[pos, feature] = value
            return a

        return self._forward(activations)[2]

    @torch.no_grad()
    def _forward(self, activations: Callable[[int, Tensor], Tensor], error_scale: Tensor | None = None,
                 token_scale: Tensor | None = None) -> tuple[list[Tensor], Tensor, Tensor]:
        """One forward pass of the frozen replacement model: the recorded patterns and norm scales substituted, each
        block's transcoder output rebuilt from ``activations(block, what it reads)`` (decoded, skip included), the
        earlier blocks' cross-layer writes and the block's error (times ``error_scale``), the recorded constant at the
        first ``exclude_first`` positions (plus its skip part); the token embeddings times ``token_scale``. Returns
        what each transcoder reads, the final residual stream and the last position's logits."""
        src, L, e = self.sources, self.n_layers, self.exclude_first
        reads: dict[int, Tensor] = {}
        acts: dict[int, Tensor] = {}

        def read(j: int) -> Callable:
            def hook(t: Tensor, hook: Any = None) -> Tensor:
                reads[j] = t[0].float()
                return t
            return hook

        def write(j: int) -> Callable:
            d = self.members[j]

            def hook(t: Tensor, hook: Any = None) -> Tensor:
                x = reads[j]
                acts[j] = a = activations(j, x).to(x.device)
                out = d.decode(a, x)
                for (i, jj), W in self.cross.items():
                    if jj == j:
                        out = out + acts[i] @ W.to(x.device)
                err = src.errors[j].to(x.device)
                out = out + (err if error_scale is None else err * error_scale[j, :, None].to(x.device))
                if e:
                    out[:e] = src.fixed[j].to(x.device) + (0 if d.W_skip is None else x[:e] @ d.W_skip.to(x.device).T)
                return out[None].to(t.dtype)
            return hook

        def final(t: Tensor, hook: Any = None) -> Tensor:
            reads[L] = t[0].float()
            return t

        fwd: list[tuple[str, Callable]] = [(n, lambda t, hook=None, n=n: self.frozen[n].to(t.dtype)) for n in self.frozen]
        if token_scale is not None:
            fwd.append((self.embed_hook, lambda t, hook=None: t * token_scale[None, :, None].to(t.device, t.dtype)))
        for j, (h_in, h_out) in enumerate(self.hooks):
            fwd += [(h_in, read(j)), (h_out, write(j))]
        fwd.append((self.view.final_resid_hook, final))
        with frozen_run(self.view.model, fwd):
            logits = self.view.model(self.tokens)
        return [reads[j] for j in range(L)], reads[L], logits[0, -1].float().cpu()


# ---------------------------------------------------------------------------------------------- recording
def _check(view: ModelView, dictionary: DictionarySet, hooks: list[tuple[str, str]]) -> None:
    members = dictionary.dictionaries
    layers = [d.layer for d in members]
    if not all(d.is_transcoder for d in members) or layers != list(range(view.n_layers)):
        raise LensInputError(
            f"an attribution graph needs one transcoder per block, blocks 0..{view.n_layers - 1} in order (each MLP "
            f"is replaced by its transcoder); this set has {[d.kind for d in members][:3]}... on blocks {layers}: "
            "load a per-layer or cross-layer transcoder set trained on this model.")
    for d, (h_in, h_out) in zip(members, hooks):
        if d.normalize_activations != "none":
            raise LensInputError(f"the transcoder on {d.hook} normalises its input ({d.normalize_activations}): "
                                 "its pre-activations are not linear in the residual stream; attribution graphs "
                                 "need transcoders without normalize_activations.")
        if h_in == h_out:
            raise LensInputError(f"{d.hook} is an SAE (it writes where it reads): attribution graphs need transcoders.")


def _check_patterns(view: ModelView, tokens: Tensor, names: list[str]) -> None:
    """Refuse a model whose attention does not read ``attn.hook_pattern`` (a TransformerBridge computes some
    architectures' attention without it): its patterns could not be frozen. One forward pass with every pattern
    reversed along the keys must change the logits."""
    patterns = [n for n in names if n.endswith("hook_pattern")]
    if tokens.shape[1] < 2:
        return  # one position: attention is the identity whatever the pattern (verify() checks the rest)
    if not patterns:
        raise LensInputError(f"{view.name} exposes no attn.hook_pattern: attention cannot be frozen, so attribution "
                             "graphs are not supported on it.")
    with torch.no_grad():
        base = view.model(tokens)
        with frozen_run(view.model, [(n, lambda t, hook=None: t.flip(-1)) for n in patterns]):
            moved = view.model(tokens)
    if torch.equal(base, moved):
        raise LensInputError(
            f"TransformerLens computes the attention of {view.name} ({architecture_of(view.model)}) "
            "without passing through attn.hook_pattern, so its attention patterns cannot be frozen: attribution "
            "graphs are not supported on this architecture (docs/graphs.md lists the ones that are).")


def record(view: ModelView, tokens: Tensor, dictionary: DictionarySet, hooks: list[tuple[str, str]],
           exclude_first: int) -> Replacement:
    """Run the prompt once through the local replacement model (module docstring) and encode every transcoder."""
    _check(view, dictionary, hooks)
    _check_patterns(view, tokens, frozen_names(view))
    members, L = dictionary.dictionaries, len(dictionary.dictionaries)
    embed_hook = view.embed_hooks[0][1]
    frozen: dict[str, Tensor] = {}
    state: dict[Any, Tensor] = {}

    def freeze(name: str) -> Callable:
        def hook(t: Tensor, hook: Any = None) -> Tensor:
            frozen[name] = t.detach()
            return t.detach()
        return hook

    def read(j: int, detach: bool) -> Callable:
        def hook(t: Tensor, hook: Any = None) -> Tensor:
            state["in", j] = t
            return t.detach() if detach else t  # the MLP's insides need no graph
        return hook

    def write(j: int) -> Callable:
        d = members[j]

        def hook(t: Tensor, hook: Any = None) -> Tensor:
            out = t.detach()
            state["out", j] = out
            delta = torch.zeros_like(out, requires_grad=True)
            state["delta", j] = delta
            y = out + delta
            if d.W_skip is not None:  # the one linear path through the MLP
                x = state["in", j]
                s = (x.float() @ d.W_skip.to(x.device).T).to(out.dtype)
                y = y + (s - s.detach())
            return y
        return hook

    def embed(t: Tensor, hook: Any = None) -> Tensor:
        state["embed"] = t.detach()
        delta = torch.zeros_like(t, requires_grad=True)
        state["d_embed"] = delta
        return t + delta

    def final(t: Tensor, hook: Any = None) -> Tensor:
        state["resid"] = t
        return t

    fwd = [(n, freeze(n)) for n in frozen_names(view)] + [(embed_hook, embed)]
    for j, (h_in, h_out) in enumerate(hooks):
        fwd += [(h_in, read(j, h_in.split(".", 2)[-1] in MLP_INPUTS)), (h_out, write(j))]
    fwd.append((view.final_resid_hook, final))
    try:
        with no_param_grads(view.model), torch.enable_grad(), frozen_run(view.model, fwd):
            logits = view.model(tokens)
    except AttributeError as err:  # TransformerLens 4.3 cannot rebuild a weightless norm whose scale a hook edits
        raise LensInputError(f"TransformerLens cannot freeze the norm scales of {view.name} ({err}): attribution graphs "
                             "are not supported on this model (docs/graphs.md lists the architectures that are).") from err
    missing = [h for j, (h_in, h_out) in enumerate(hooks) for h, k in ((h_in, ("in", j)), (h_out, ("out", j)))
               if k not in state] + [h for h, k in ((embed_hook, "embed"), (view.final_resid_hook, "resid"))
                                     if k not in state]
    if missing:
        raise LensInputError(f"the hooks {missing[:3]} never ran in {view.name}'s forward pass: attribution graphs "
                             "need the transcoders' input and output hooks, the token embedding and the final "
                             "residual stream.")
    inputs = [state["in", j] for j in range(L)]
    sources = _encode(members, dictionary.cross, inputs, [state["out", j] for j in range(L)], state["embed"],
                      exclude_first)
    return Replacement(view, tokens, members, dict(dictionary.cross), hooks, embed_hook, exclude_first,
                       logits[0, -1].detach().float().cpu(), sources, inputs, state["resid"],
                       [state["delta", j] for j in range(L)], state["d_embed"], frozen)


@torch.no_grad()
def _encode(members: list[Dictionary], cross: dict[tuple[int, int], Tensor], inputs: list[Tensor],
            outputs: list[Tensor], embed: Tensor, exclude_first: int) -> Sources:
    """Every active feature (none at the first ``exclude_first`` positions) and every error node."""
    layer, pos, feature, act, acts, errors, fixed = [], [], [], [], [], [], []
    for j, d in enumerate(members):
        x = inputs[j][0].detach().float()
        a = d.to(x.device).encode(x)
        a[:exclude_first] = 0
        acts.append(a)
        p, f = a.nonzero(as_tuple=True)
        layer.append(torch.full_like(p, j))
        pos.append(p)
        feature.append(f)
        act.append(a[p, f])
    for j, d in enumerate(members):
        x = inputs[j][0].detach().float()
        recon = d.decode(acts[j], x)
        for (i, jj), W in cross.items():
            if jj == j:
                recon = recon + acts[i] @ W.to(x.device)
        out = outputs[j][0].float()
        skip = 0 if d.W_skip is None else x[:exclude_first] @ d.W_skip.to(x.device).T
        fixed.append((out[:exclude_first] - skip).cpu())
        err = out - recon
        err[:exclude_first] = 0
        errors.append(err.cpu())
    return Sources(torch.cat(layer).cpu(), torch.cat(pos).cpu(), torch.cat(feature).cpu(), torch.cat(act).cpu(),
                   torch.stack(errors), embed[0].float().cpu(), torch.stack(fixed))
