"""DLAResult: every component's direct effect on a logit (difference), with the identities and renderers;
NeuronAttribution: every MLP neuron's direct effect at every position of a cache.

Shapes: ``B`` prompts (rows), ``L`` layers, ``H`` heads, ``N`` neurons per MLP (``d_mlp``), ``S`` token positions
(padded to the longest prompt), ``E`` embedding terms (``embed``, and ``pos_embed`` where the model has one).
Per-prompt tensors are exact; ``batch=None`` in the accessors means the mean over prompts.

The additive parts of the attributed value (``components``): the embeddings, every head ``L{l}H{h}``, each layer's
attention output bias ``L{l}.b_O`` (when the model has one), on state-space and hybrid models every block's token
mixer without heads ``Mixer{l}`` (an SSM, linear attention, ...: ``mixer_kinds``), every MLP ``MLP{l}`` (its neurons
plus its bias ``b_out``) and the constants no residual component produces (``b_U``, the final LayerNorm's bias ``ln_final.b``). Neurons
``L{l}N{n}`` and source positions refine a MLP and a head; they are not extra parts. Under the user's own hooks, what a
hook changed between the cached states is a part too (``edit@<hook name>``, kind ``intervention``; see
:mod:`mi_lenses.attribution.interventions`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.errors import LensInputError, VerificationError
from mi_lenses.results import Result, dataframe, jsonable, plural
from mi_lenses.viz.attribution import (
    dla_fragment,
    dla_table,
    neuron_attribution_fragment,
    neuron_attribution_table,
)

KINDS = ("embed", "pos_embed", "head", "attn_bias", "mixer", "mlp", "constant", "intervention")


@dataclass(frozen=True)
class Component:
    """One labelled unit: ``kind`` is one of ``embed``, ``pos_embed``, ``head``, ``attn_bias``, ``mixer``, ``mlp``,
    ``neuron``, ``constant``."""

    label: str
    kind: str
    layer: int | None = None
    head: int | None = None
    neuron: int | None = None

    def as_dict(self, value: float) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "layer": self.layer, "head": self.head,
                "neuron": self.neuron, "value": value}


# (atol, rtol) of DLAResult.verify per model dtype.
SELF_CHECK_TOL = {"float32": (1e-3, 1e-4), "float64": (1e-3, 1e-4), "bfloat16": (0.05, 1e-2), "float16": (0.01, 2e-3)}


@dataclass
class DLAResult(Result):
    """Direct logit attribution of one position per prompt.

    >>> res = mi_lenses.direct_logit_attribution(model, "The capital of France is", answer=" Paris")
    >>> abs(float(res.total[0] - res.actual[0])) < 1e-3      # the parts sum to the model's own logit (verify())
    True
    >>> label, value = res.top_neurons(1)[0]                  # the neuron with the largest |direct effect|
    >>> abs(value) == float(res.neurons[0].abs().max())
    True
    >>> tokens, values = zip(*res.head_sources(1, 2))         # head L1H2's effect through each source token
    >>> tokens
    ('<bos>', 'The', ' capital', ' of', ' France', ' is')
    >>> abs(sum(values) - float(res.heads[0, 1, 2])) < 1e-4
    True
    >>> logits = model(model.to_tokens("The capital of France is")).detach()
    >>> abs(float(res.actual[0]) - float(logits[0, -1, model.to_single_token(" Paris")])) < 1e-4  # the model's logit
    True
    """

    view_options: ClassVar[dict[str, Any]] = {"top_k": 10, "head": None, "what": "components"}  # see results

    model_name: str
    metric: str  # what is attributed, e.g. "logit[' Paris'] - logit[' London']"
    answer: list[str]
    wrong: list[str]
    str_tokens: list[list[str]]
    positions: list[int]
    embed_labels: list[str]
    embed: Float[Tensor, "B E"]
    heads: Float[Tensor, "B L H"]
    attn_bias: Float[Tensor, "B L"] | None
    mlps: Float[Tensor, "B L"] | None
    mlp_bias: Float[Tensor, "B L"] | None
    neurons: Float[Tensor, "B L N"]
    sources: Float[Tensor, "B L H S"]
    constants: dict[str, Float[Tensor, " B"]]
    actual: Float[Tensor, " B"]
    actual_source: str  # "logits": the model's own output; "resid": computed from the final residual stream
    attn_out: Float[Tensor, "B L"] = field(repr=False)
    scale: Float[Tensor, " B"] = field(repr=False)
    raw_bridge: bool = False
    experts: Float[Tensor, "B L X"] | None = None  # mixture of experts: each expert's part of its MLP
    expert_names: list[str] = field(default_factory=list)  # "E0", "E1", ..., "shared"
    neuron_names: list[str] | None = None  # per neuron index (MoE: "E2N5", "SN3"); None: "N{n}"
    notes: list[str] = field(default_factory=list)  # what could not be attributed finer, and why
    interventions: dict[str, Float[Tensor, " B"]] = field(default_factory=dict)  # hook name -> a hook's edit
    sources_unavailable: dict[str, str] = field(default_factory=dict)  # "L{l}H{h}" -> why (sources are NaN there)
    model_dtype: str = "float32"  # the model's weights: its own logits (``actual``) are this precise
    mixers: Float[Tensor, "B L"] | None = None  # state-space / hybrid: what each block's mixer without heads wrote
    mixer_kinds: list[str] | None = None  # per block: "heads", or the mixer ("SSM", "linear attention", ...); "": none

    # ------------------------------------------------------------------------------------ structure
    @property
    def n_batch(self) -> int:
        return int(self.heads.shape[0])

    @property
    def title(self) -> str:
        return f"Direct logit attribution: {self.model_name}"

    @property
    def n_layers(self) -> int:
        return int(self.heads.shape[1])

    @property
    def n_heads(self) -> int:
        return int(self.heads.shape[2])

    def components(self) -> list[Component]:
        """The additive parts, in model order: embeddings, then per layer its heads, ``b_O``, MLP; then constants."""
        out = [Component(label, label) for label in self.embed_labels]
        for l in range(self.n_layers):
            if self.has_heads(l):
                out += [Component(f"L{l}H{h}", "head", l, h) for h in range(self.n_heads)]
                if self.attn_bias is not None:
                    out.append(Component(f"L{l}.b_O", "attn_bias", l))
            elif self.mixer_kinds[l]:  # type: ignore[index]
                out.append(Component(f"Mixer{l}", "mixer", l))
            if self.mlps is not None:
                out.append(Component(f"MLP{l}", "mlp", l))
        out += [Component(name, "constant") for name in self.constants]
        out += [Component(f"edit@{hook}", "intervention", _hook_layer(hook)) for hook in self.interventions]
        return out

    def values(self) -> Float[Tensor, "B C"]:
        """Per-row values aligned with :meth:`components`."""
        cols = [self.embed[:, i] for i in range(self.embed.shape[1])]
        for l in range(self.n_layers):
            if self.has_heads(l):
                cols += list(self.heads[:, l].unbind(-1))
                if self.attn_bias is not None:
                    cols.append(self.attn_bias[:, l])
            elif self.mixer_kinds[l]:  # type: ignore[index]
                cols.append(self.mixers[:, l])  # type: ignore[index]
            if self.mlps is not None:
                cols.append(self.mlps[:, l])
        cols += list(self.constants.values()) + list(self.interventions.values())
        return torch.stack(cols, -1)

    def has_heads(self, layer: int) -> bool:
        """Whether block ``layer`` is attributed per attention head (every block of a transformer)."""
        return self.mixer_kinds is None or self.mixer_kinds[layer] == "heads"

    @property
    def total(self) -> Float[Tensor, " B"]:
        """Sum of all parts (constants included): equals ``actual`` (see :meth:`verify`)."""
        return self.values().sum(-1)

    @property
    def constant(self) -> Float[Tensor, " B"]:
        """Sum of the constant terms (``b_U``, ``ln_final.b``); zero when the model has neither."""
        return sum(self.constants.values(), torch.zeros(self.n_batch))

    def _pick(self, t: Tensor, batch: int | None) -> Tensor:
        """Prompt ``batch`` of a per-prompt tensor, or the mean over prompts (``None``)."""
        return t.mean(0) if batch is None else t[self.check_batch(batch)]

    # ------------------------------------------------------------------------------------ identities
    def verify(self, atol: float | None = None, rtol: float | None = None) -> "DLAResult":
        """Check the identities; raise ``VerificationError`` naming the one that fails.

        1. all parts (constants included) sum to ``actual``, the model's own logit (difference) from the run;
        2. each layer's heads plus ``b_O`` sum to that layer's attention output (``hook_attn_out``) on the direction;
        3. each MLP's neurons plus its bias part sum to the MLP (and a mixture of experts' experts to the MLP);
        4. each head's source positions sum to the head.

        Tolerance per row: ``atol + rtol * Σ|parts|``; by default ``SELF_CHECK_TOL`` of the model's dtype (float32:
        1e-3, 1e-4; the outputs of a bfloat16 model are rounded to 8 bits, the parts computed in float32: 0.05, 1e-2).
        """
        default_atol, default_rtol = SELF_CHECK_TOL.get(self.model_dtype, SELF_CHECK_TOL["float32"])
        atol = default_atol if atol is None else atol
        rtol = default_rtol if rtol is None else rtol
        vals = self.values()
        tol = atol + rtol * vals.abs().sum(-1)  # [B]
        err = (vals.sum(-1) - self.actual).abs()
        if (err > tol).any():
            b = int((err - tol).argmax())
            hint = (
                " On a raw TransformerBridge this means the final norm was not reproduced: call "
                "model.enable_compatibility_mode() and run again."
                if self.raw_bridge else ""
            )
            raise VerificationError(
                f"the parts sum to {float(vals[b].sum()):.6g} but the model's {self.metric} is "
                f"{float(self.actual[b]):.6g} (prompt {b}, error {float(err[b]):.2e} > {float(tol[b]):.2e}): the "
                f"decomposition does not reproduce this model.{hint}"
            )
        heads_sum = self.heads.sum(-1) + (self.attn_bias if self.attn_bias is not None else 0.0)
        for l in range(self.n_layers):  # what a hook on hook_attn_out changed
            edit = self.interventions.get(f"blocks.{l}.hook_attn_out")
            if edit is not None:
                heads_sum[:, l] += edit
        self._close(heads_sum, self.attn_out, tol[:, None], "the heads plus b_O of a layer do not sum to its attention "
                    "output (hook_attn_out) on the direction: W_O or the head outputs are read wrongly")
        if self.mlps is not None and self.neurons.shape[-1]:
            neuron_sum = self.neurons.sum(-1) + (self.mlp_bias if self.mlp_bias is not None else 0.0)
            self._close(neuron_sum, self.mlps, tol[:, None], "the neurons of a layer (plus its b_out part) do not sum "
                        "to the MLP's output (hook_mlp_out): W_out or hook_post is read wrongly")
        if self.experts is not None and self.mlps is not None:
            moe = self.experts.abs().sum(-1) > 0  # [B, L]: the mixture-of-experts layers
            self._close(torch.where(moe, self.experts.sum(-1), self.mlps), self.mlps, tol[:, None], "the experts of a "
                        "layer do not sum to its MLP's output: the router weights or the experts are read wrongly")
        by_source = self.sources.sum(-1)
        by_source = torch.where(torch.isnan(by_source), self.heads, by_source)  # unavailable (a hook changed z)
        self._close(by_source, self.heads, tol[:, None, None], "the source positions of a head do not sum "
                    "to the head's value: pattern, value (GQA) or W_O do not reproduce hook_z")
        return self

    @staticmethod
    def _close(ours: Tensor, ref: Tensor, tol: Tensor, what: str) -> None:
        err = (ours - ref).abs()
        if (err > tol).any():
            idx = tuple(int(i) for i in torch.nonzero(err > tol)[0])
            raise VerificationError(f"{what} (at index {idx}: {float(ours[idx]):.6g} vs {float(ref[idx]):.6g}).")

    # ------------------------------------------------------------------------------------ rankings
    def top(self, top_k: int = 10, kinds: str | Iterable[str] | None = None, *, batch: int | None = None,
            by: Literal["abs", "value", "-value"] = "abs") -> list[tuple[str, float]]:
        """The ``top_k`` largest parts as ``(label, value)``; ``by="abs"`` (default), ``"value"`` (most positive) or
        ``"-value"`` (most negative). ``kinds`` filters (e.g. ``"head"``, ``("head", "mlp")``, ``"neuron"``);
        ``batch=None`` (default) ranks the mean over prompts."""
        kinds = {kinds} if isinstance(kinds, str) else (set(kinds) if kinds is not None else None)
        if kinds is not None and not kinds <= {*KINDS, "neuron"}:
            raise LensInputError(
                f"unknown kinds {sorted(kinds - {*KINDS, 'neuron'})}; use some of {KINDS + ('neuron',)}."
            )
        pairs: list[tuple[str, float]] = []
        if kinds is None or kinds - {"neuron"}:
            vals = self._pick(self.values(), batch).tolist()
            pairs = [(c.label, v) for c, v in zip(self.components(), vals) if kinds is None or c.kind in kinds]
        if kinds is not None and "neuron" in kinds:
            pairs += [(c.label, v) for c, v in self.top_neurons_with_components(self.neurons[0].numel(), batch=batch)]
        key = {"abs": lambda p: -abs(p[1]), "value": lambda p: -p[1], "-value": lambda p: p[1]}.get(by)
        if key is None:
            raise LensInputError(f"by must be 'abs', 'value' or '-value', got {by!r}.")
        return sorted(pairs, key=key)[:top_k]

    def top_neurons_with_components(self, top_k: int = 10, *,
                                    batch: int | None = None) -> list[tuple[Component, float]]:
        """The ``top_k`` neurons with the largest ``|value|`` as ``(Component, value)``."""
        flat = self._pick(self.neurons, batch).flatten()
        if flat.numel() == 0:
            return []
        n = self.neurons.shape[-1]
        idx = flat.abs().topk(min(top_k, flat.numel())).indices.tolist()
        return [(Component(f"L{i // n}{self.neuron_label(i % n)}", "neuron", i // n, None, i % n), float(flat[i]))
                for i in idx]

    def neuron_label(self, n: int) -> str:
        """The name of neuron index ``n`` within a layer: ``N{n}``, or for a mixture of experts ``E{e}N{i}``
        (expert ``e``'s neuron ``i``) and ``SN{i}`` (the shared expert's)."""
        return self.neuron_names[n] if self.neuron_names is not None and n < len(self.neuron_names) else f"N{n}"

    def top_neurons(self, top_k: int = 10, *, batch: int | None = None) -> list[tuple[str, float]]:
        """The ``top_k`` neurons with the largest ``|value|`` as ``(label, value)``, labels ``L{layer}N{index}``."""
        return [(c.label, v) for c, v in self.top_neurons_with_components(top_k, batch=batch)]

    def head_sources(self, layer: int, head: int, *, batch: int = 0) -> list[tuple[str, float]]:
        """``(token, value)`` for every source position of one head (prompt ``batch``); sums to the head's value."""
        if not (0 <= layer < self.n_layers and 0 <= head < self.n_heads):
            raise LensInputError(f"head L{layer}H{head} does not exist: layers 0..{self.n_layers - 1}, heads "
                                 f"0..{self.n_heads - 1}.")
        b = self.check_batch(batch)
        reason = self.sources_unavailable.get(f"L{layer}H{head}")
        if reason is not None and bool(torch.isnan(self.sources[b, layer, head]).any()):
            raise LensInputError(f"the source positions of L{layer}H{head} are unavailable: {reason}.")
        toks = self.str_tokens[b]
        return list(zip(toks, self.sources[b, layer, head, : len(toks)].tolist()))

    # ------------------------------------------------------------------------------------ exports
    def to_dict(self, *, batch: int | None = 0, top_k: int = 10) -> dict[str, Any]:
        """The ``mi-lenses dla --json`` contract: ``metric``, ``total``, ``actual``, ``components`` (every part,
        constants included, so they sum to ``total``), ``top_neurons`` (``top_k``) and ``sources`` (per-token values
        through the ``top_k`` heads with the largest ``|value|``). ``batch=None``: means over prompts, no sources."""
        vals = self._pick(self.values(), batch)
        sources: dict[str, Any] = {}
        if batch is not None:
            b = self.check_batch(batch)
            n = len(self.str_tokens[b])
            for label, _ in self.top(top_k, kinds="head", batch=b):
                l, h = (int(x) for x in label[1:].split("H"))
                sources[label] = self.sources[b, l, h, :n]
        return jsonable({
            "metric": self.metric,
            "total": float(vals.sum()),
            "actual": float(self._pick(self.actual, batch)),
            "components": [c.as_dict(v) for c, v in zip(self.components(), vals.tolist())],
            "top_neurons": [c.as_dict(v) for c, v in self.top_neurons_with_components(top_k, batch=batch)],
            "sources": sources,
            **({"experts": {f"MLP{l}.{name}": float(v) for l in range(self.n_layers)
                            for name, v in zip(self.expert_names, self._pick(self.experts, batch)[l].tolist())}}
               if self.experts is not None else {}),
            **({"mixer_kinds": list(self.mixer_kinds)} if self.mixer_kinds is not None else {}),
            **({"notes": list(self.notes)} if self.notes else {}),
            **({"sources_unavailable": self.sources_unavailable} if self.sources_unavailable else {}),
        }, digits=8)

    def to_dataframe(self, what: Literal["components", "neurons", "sources"] = "components"):
        """Tidy pandas frame, one row per (prompt, unit): ``what`` = ``"components"`` (default), ``"neurons"`` (every
        neuron) or ``"sources"`` (every head x source position of each prompt's real tokens)."""
        if what == "components":
            comps = self.components()
            return dataframe([{"batch": b, **c.as_dict(v)} for b, row in enumerate(self.values().tolist())
                              for c, v in zip(comps, row)])
        if what == "neurons":
            B, L, N = self.neurons.shape
            b, l, n = torch.cartesian_prod(torch.arange(B), torch.arange(L), torch.arange(N)).unbind(-1)
            return dataframe({"batch": b.numpy(),
                              "label": [f"L{i}{self.neuron_label(j)}" for i, j in zip(l.tolist(), n.tolist())],
                              "kind": "neuron", "layer": l.numpy(), "neuron": n.numpy(),
                              "value": self.neurons.flatten().numpy()})
        if what == "sources":
            return dataframe([{"batch": b, "label": f"L{l}H{h}", "layer": l, "head": h, "source": s, "token": t,
                               "value": float(self.sources[b, l, h, s])}
                              for b, toks in enumerate(self.str_tokens) for l in range(self.n_layers)
                              for h in range(self.n_heads) for s, t in enumerate(toks)])
        raise LensInputError(f"what must be 'components', 'neurons' or 'sources', got {what!r}.")

    def table(self, *, batch: int | None = 0, top_k: int = 10):
        """A rich table of the ``top_k`` largest parts and the ``top_k`` largest neurons (``batch=None``: means over
        prompts)."""
        return dla_table(self, top_k=top_k, batch=None if batch is None else self.check_batch(batch))

    def fragment(self, *, batch: int = 0, head: tuple[int, int] | None = None, top_k: int = 10) -> str:
        """The page body: the ``top_k`` largest parts, layer x head heat map, MLP bars, the ``top_k`` largest
        neurons, tokens through ``head`` (default the head with the largest ``|value|``)."""
        return dla_fragment(self, batch=self.check_batch(batch), head=head, top_k=top_k)

    def _summary(self) -> str:
        where = f"position {self.positions[0]}" if self.n_batch == 1 else f"positions {self.positions}"
        mean = "" if self.n_batch == 1 else "mean "
        return (f"of {self.metric} on {self.model_name!r}: {plural(self.n_batch, 'prompt')}, {where}, "
                f"{self.n_layers} layers x {self.n_heads} heads, {mean}sum of parts {float(self.total.mean()):+.4f}, "
                f"{mean}model {float(self.actual.mean()):+.4f}")


@dataclass
class NeuronAttribution(Result):
    """Every MLP neuron's direct effect at every selected position of a cache (what
    :func:`~mi_lenses.attribution.neurons.neuron_attribution` returns).

    ``values[i, b, p, n]`` is neuron ``n`` of block ``layers[i]`` at cache position ``positions[p]`` of prompt ``b``
    (``[layers, batch, pos, d_mlp]``; a mixture of experts' neurons are named by ``neuron_names``, zero past a layer's
    own neurons). Labels: ``L{layer}N{neuron}@{position}``.

    >>> logits, cache = model.run_with_cache(model.to_tokens("The capital of France is"))
    >>> attr = mi_lenses.neuron_attribution(model, cache, answer=" Paris")
    >>> label, value = attr.top(1)[0]                 # the neuron and position with the largest |direct effect|
    >>> abs(value) == float(attr.values[:, 0].abs().max())
    True
    >>> layer, neuron, position = map(int, label[1:].replace("N", " ").replace("@", " ").split())   # "L1N64@1"
    >>> value == float(attr.values[attr.layers.index(layer), 0, attr.positions.index(position), neuron])
    True
    """

    model_name: str
    metric: str  # what is attributed, as in DLAResult
    values: Float[Tensor, "L B P N"]
    layers: list[int]
    positions: list[int]
    neuron_names: list[str] | None = None  # per neuron index (MoE: "E2N5", "SN3"); None: "N{n}"

    view_options: ClassVar[dict[str, Any]] = {"top_k": 10}  # see mi_lenses.results

    @property
    def n_batch(self) -> int:
        return int(self.values.shape[1])

    @property
    def title(self) -> str:
        return f"Neuron attribution: {self.model_name}"

    def neuron_label(self, n: int) -> str:
        """The name of neuron index ``n`` within a layer (see :meth:`DLAResult.neuron_label`)."""
        return self.neuron_names[n] if self.neuron_names is not None and n < len(self.neuron_names) else f"N{n}"

    def top_with_coords(self, top_k: int = 10, *, batch: int = 0) -> list[tuple[dict[str, Any], float]]:
        """The ``top_k`` (layer, position, neuron) of prompt ``batch`` with the largest ``|value|`` as
        ``(coords, value)``, ``coords`` holding ``label``, ``layer``, ``position`` and ``neuron``."""
        vals = self.values[:, self.check_batch(batch)]  # [L, P, N]
        flat = vals.flatten()
        idx = flat.abs().topk(min(top_k, flat.numel())).indices.tolist() if flat.numel() else []
        _, P, N = vals.shape
        out = []
        for i in idx:
            layer, position, neuron = self.layers[i // (P * N)], self.positions[i // N % P], i % N
            out.append(({"label": f"L{layer}{self.neuron_label(neuron)}@{position}", "layer": layer,
                         "position": position, "neuron": neuron}, float(flat[i])))
        return out

    def top(self, top_k: int = 10, *, batch: int = 0) -> list[tuple[str, float]]:
        """The ``top_k`` neurons (at a position) of prompt ``batch`` with the largest ``|value|`` as
        ``(label, value)``, labels ``L{layer}N{neuron}@{position}``."""
        return [(c["label"], v) for c, v in self.top_with_coords(top_k, batch=batch)]

    def to_dict(self, *, batch: int = 0, top_k: int = 10) -> dict[str, Any]:
        """JSON-ready: the metric, the layers and positions, the shape ``[layers, batch, pos, d_mlp]`` and the
        ``top_k`` largest neurons of prompt ``batch`` (not every value: ``to_dataframe`` has them all)."""
        return jsonable({"model": self.model_name, "metric": self.metric, "layers": self.layers,
                         "positions": self.positions, "shape": list(self.values.shape),
                         "top_neurons": [{**c, "value": v} for c, v in self.top_with_coords(top_k, batch=batch)]},
                        digits=8)

    def to_dataframe(self):
        """Tidy frame, one row per (layer, prompt, position, neuron): ``batch``, ``layer``, ``position``,
        ``neuron``, ``label`` and ``value``."""
        L, B, P, N = self.values.shape
        i, b, p, n = torch.cartesian_prod(torch.arange(L), torch.arange(B), torch.arange(P),
                                          torch.arange(N)).unbind(-1)
        layer, position = torch.tensor(self.layers)[i], torch.tensor(self.positions)[p]
        names = [self.neuron_label(j) for j in range(N)]
        return dataframe({"batch": b.numpy(), "layer": layer.numpy(), "position": position.numpy(),
                          "neuron": n.numpy(),
                          "label": [f"L{a}{names[c]}@{d}" for a, c, d in zip(layer.tolist(), n.tolist(),
                                                                            position.tolist())],
                          "value": self.values.detach().float().cpu().flatten().numpy()})

    def table(self, *, batch: int = 0, top_k: int = 10):
        """A rich table of the ``top_k`` largest neurons of prompt ``batch``, each with a signed bar."""
        return neuron_attribution_table(self, batch=self.check_batch(batch), top_k=top_k)

    def fragment(self, *, batch: int = 0, top_k: int = 10) -> str:
        """The page body: the largest neuron per layer and position (heat map) and the ``top_k`` largest neurons."""
        return neuron_attribution_fragment(self, batch=self.check_batch(batch), top_k=top_k)

    def _summary(self) -> str:
        L, B, P, N = self.values.shape
        top = self.top(1)
        largest = f", largest {top[0][0]} {top[0][1]:+.4f}" if top else ""
        return (f"of {self.metric} on {self.model_name!r}: {L} layers x {plural(B, 'prompt')} x "
                f"{plural(P, 'position')} x {N} neurons{largest}")


def _hook_layer(hook: str) -> int | None:
    """The block index in a hook name (``blocks.5.hook_attn_out`` -> 5), None outside the blocks."""
    parts = hook.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None
