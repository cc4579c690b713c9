"""SelfIE (Chen et al. 2024, "SelfIE: Self-Interpretation of Large Language Model Embeddings"): the model describes
its own hidden states in words.

A hidden state of the source prompt (layer ``l``, position ``i``) is written at *every* placeholder of an
interpretation prompt (default ``"[INST] x x x x x [/INST] Sure, I will summarize the message:"``) at an early
injection layer ``k`` of the interpretation forward pass, and the model generates (the injection acts on the prompt
pass only, as in the paper). Layers follow the Patchscope convention: ``l`` and ``k`` are block outputs
(``blocks.{l}.hook_resid_post``); the reference code's "insert at layer k" (the input of block ``k``) is our
``k - 1``.

**Relevancy** (the paper's treatment effect) of each generated token ``w_j``:

    relevancy_j = p(w_j | interpretation prompt with the state injected, w_<j) - p(w_j | the prompt as written, w_<j)

both teacher-forced on the same generated text, so tokens that come from the injected state stand out from tokens
that the interpretation prompt produces on its own. Injecting a state equal to what the prompt already holds at those
positions gives relevancy 0 everywhere (tested).

Example:
    >>> res = mi_lenses.selfie(model, "The capital of France is", layers=[0, 2], max_new_tokens=4)
    >>> res.row_labels, len(res.generated), tuple(res.relevancy.shape)
    (['L0 @5', 'L2 @5'], 2, (2, 4))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from rich.table import Table
from rich.text import Text
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.indexing import IndexSpec, int_list
from mi_lenses.models.batch import check_context
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.view import ModelView
from mi_lenses.patchscopes.presets import selfie as selfie_preset
from mi_lenses.patchscopes.run import patch_hooks, patched_generate, source_states
from mi_lenses.patchscopes.spec import (
    Target,
    resolve_layer,
    resolve_position,
    resolve_target,
)
from mi_lenses.results import Result, dataframe, jsonable, plural
from mi_lenses.viz.colors import rich_style
from mi_lenses.viz.more_lenses import selfie_fragment


@dataclass
class SelfIEResult(Result):
    """One interpretation per (source layer, source position) row: generated tokens and their relevancy.

    ``relevancy[r, j]`` is ``p_injected - p_plain`` of generated token ``j`` of row ``r`` (both teacher-forced);
    ``p_injected[r, j]`` and ``p_plain[r, j]`` are the two probabilities. Tokens after an end-of-sequence token are
    not shown when ``stop_at_eos`` was on (their numbers stay in the tensors).
    """

    model_name: str
    source_prompt: str
    source_str_tokens: list[str]
    source_layers: list[int]
    source_positions: list[int]
    inject_layer: int
    interpretation_prompt: str
    placeholder_positions: list[int]
    generated_ids: Int[Tensor, "R n"]
    p_injected: Float[Tensor, "R n"]
    p_plain: Float[Tensor, "R n"]
    vocab: dict[int, str] = field(repr=False)
    eos_token_id: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def relevancy(self) -> Float[Tensor, "R n"]:
        return self.p_injected - self.p_plain

    @property
    def row_labels(self) -> list[str]:
        return [f"L{l} @{p}" for l, p in zip(self.source_layers, self.source_positions)]

    @property
    def title(self) -> str:
        return f"SelfIE: {self.model_name}"

    def _length(self, r: int) -> int:
        row = self.generated_ids[r].tolist()
        if self.eos_token_id is not None and self.eos_token_id in row:
            return row.index(self.eos_token_id)
        return len(row)

    @property
    def generated_tokens(self) -> list[list[str]]:
        return [[self.vocab[i] for i in self.generated_ids[r, : self._length(r)].tolist()]
                for r in range(len(self.source_layers))]

    @property
    def generated(self) -> list[str]:
        return ["".join(t) for t in self.generated_tokens]

    def to_dict(self, *, batch: int = 0) -> dict[str, Any]:
        """``{"source_prompt", "inject_layer", "interpretation_prompt", "rows": [{"layer", "position", "token",
        "generated", "tokens", "relevancy", "p_injected", "p_plain"}]}``."""
        self.check_batch(batch)
        rows = []
        for r, (l, p) in enumerate(zip(self.source_layers, self.source_positions)):
            n = self._length(r)
            rows.append({"layer": l, "position": p, "token": self.source_str_tokens[p],
                         "generated": self.generated[r], "tokens": self.generated_tokens[r],
                         "relevancy": self.relevancy[r, :n], "p_injected": self.p_injected[r, :n],
                         "p_plain": self.p_plain[r, :n]})
        return jsonable({"model": self.model_name, "source_prompt": self.source_prompt,
                         "inject_layer": self.inject_layer, "interpretation_prompt": self.interpretation_prompt,
                         "placeholder_positions": self.placeholder_positions, "settings": self.settings,
                         "rows": rows})

    def to_dataframe(self):
        return dataframe([{"layer": l, "position": p, "source_token": self.source_str_tokens[p], "step": j,
                              "token": tok, "relevancy": float(self.relevancy[r, j]),
                              "p_injected": float(self.p_injected[r, j]), "p_plain": float(self.p_plain[r, j])}
                          for r, (l, p) in enumerate(zip(self.source_layers, self.source_positions))
                          for j, tok in enumerate(self.generated_tokens[r])])

    def table(self, *, batch: int = 0):


        self.check_batch(batch)
        t = Table(title=f"SelfIE · {self.source_prompt!r} · injected at layer {self.inject_layer}",
                  caption="shade: relevancy (blue: the token comes from the injected state)")
        t.add_column("layer @ pos", style="bold")
        t.add_column("token")
        t.add_column("interpretation")
        for r, lab in enumerate(self.row_labels):
            text = Text()
            for j, tok in enumerate(self.generated_tokens[r]):
                text.append(tok, style=rich_style(float(self.relevancy[r, j]), signed=True))
            t.add_row(lab, repr(self.source_str_tokens[self.source_positions[r]]), text)
        return t

    def fragment(self, *, batch: int = 0) -> str:
        self.check_batch(batch)
        return selfie_fragment(self)

    def _summary(self) -> str:
        return (f"on {self.model_name!r}: {plural(len(self.source_layers), 'row')} (layer @ position "
                f"{self.row_labels}) injected at layer {self.inject_layer}, {self.generated_ids.shape[1]} tokens "
                f"generated per row")


def selfie(
    model: Any,
    prompt: str | Tensor,
    *,
    layers: IndexSpec = None,
    positions: IndexSpec = -1,
    interpretation: Target | None = None,
    inject_layer: int | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    use_kv_cache: bool = True,
    stop_at_eos: bool = True,
    prepend_bos: bool | None = None,
) -> SelfIEResult:
    """Interpret the hidden states of ``prompt`` at ``layers`` (block outputs; default all) and ``positions``
    (default the last token) with SelfIE (see the module docstring).

    Args:
        model: a TransformerLens model or a ``ModelView``; the states are read from it and interpreted by it.
        prompt: one prompt: a string or token ids ``[1, pos]``.
        layers: the blocks whose outputs (``hook_resid_post``) are interpreted: an int, a list or a range, negative
            from the end; default all.
        positions: the token positions interpreted (default ``-1``: the last token; negative from the end). One
            row per (layer, position).
        interpretation: the interpretation prompt as a :class:`Target` whose placeholder marks where the state goes
            (default ``presets.selfie()``; every occurrence is injected).
        inject_layer: ``k``, the block output where the state is written (default: the target's ``layer``, 2 for
            the preset).
        max_new_tokens, do_sample, temperature, seed: generation (greedy by default; sampling is seeded).
        use_kv_cache: generate with the model's KV cache (the patched prompt runs once, then one token per step);
            ``False`` recomputes the whole sequence at every step. Both give the same tokens.
        stop_at_eos: cut each interpretation at the end-of-sequence token (``max_new_tokens`` are still generated).
        prepend_bos: add the BOS token when tokenising a string ``prompt`` (default: the model's setting).
    """
    view = ModelView(model)
    hooks = active_hooks(view.model)
    target = interpretation if interpretation is not None else selfie_preset()
    if not isinstance(target, Target):
        raise LensInputError(f"interpretation must be a Target (e.g. presets.selfie()), got {target!r}.")
    if target.model is not None or target.map is not None:
        raise LensInputError("SelfIE interprets a state in the model it comes from: the Target takes no model or map.")
    k = inject_layer if inject_layer is not None else target.layer
    if k is None:
        raise LensInputError("pass inject_layer= (the block output where the state is written), or a Target with a "
                             "layer.")
    k = resolve_layer(view, k, "inject layer")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LensInputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    if do_sample and not temperature > 0:
        raise LensInputError(f"temperature must be > 0 when sampling, got {temperature!r}.")
    tokens = view.to_tokens(prompt, prepend_bos)
    if tokens.shape[0] != 1:
        raise LensInputError("SelfIE interprets one prompt at a time (a string or tokens [1, pos]).")
    S = tokens.shape[1]
    src_layers = [resolve_layer(view, l, "layer") for l in
                  (range(view.n_layers) if layers is None else int_list(layers))]
    src_pos = [resolve_position(p, S, "position") for p in int_list(positions)]
    if not src_layers or not src_pos:
        raise LensInputError("select at least one layer and one position.")
    rt = resolve_target(target, view)
    T = rt.tokens.shape[1]
    check_context(view, T + max_new_tokens, f"the interpretation prompt plus {max_new_tokens} generated tokens", opt_in=False)
    states, _ = source_states(view, view.batch(tokens), set(src_layers))
    pairs = [(l, p) for l in src_layers for p in src_pos]
    vectors = torch.stack([states[l][0, p] for l, p in pairs])
    inject = torch.full((len(pairs),), k, dtype=torch.long)
    gen = patched_generate(rt, inject, vectors, max_new_tokens, do_sample=do_sample, temperature=temperature,
                           seed=seed, use_kv_cache=use_kv_cache)
    p_inj, p_plain = relevancy_probs(rt.view, rt.tokens, gen, inject, vectors, rt.positions)
    eos = getattr(view.tokenizer, "eos_token_id", None) if stop_at_eos else None
    return recorded(SelfIEResult(
        model_name=view.name,
        source_prompt=prompt if isinstance(prompt, str) else " ".join(map(str, tokens[0].tolist())),
        source_str_tokens=[view.id_to_str(int(t)) for t in tokens[0]],
        source_layers=[l for l, _ in pairs],
        source_positions=[p for _, p in pairs],
        inject_layer=k,
        interpretation_prompt=target.prompt if isinstance(target.prompt, str) else "",
        placeholder_positions=list(rt.positions),
        generated_ids=gen,
        p_injected=p_inj,
        p_plain=p_plain,
        vocab=view.id_to_str_map(gen),
        eos_token_id=eos,
        settings=dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, seed=seed),
    ), hooks)


@torch.no_grad()
def relevancy_probs(
    view: ModelView,
    prompt_tokens: Int[Tensor, "1 T"],
    generated: Int[Tensor, "R n"],
    layers: Int[Tensor, " R"],
    vectors: Float[Tensor, "R d"],
    positions: Sequence[int],
) -> tuple[Float[Tensor, "R n"], Float[Tensor, "R n"]]:
    """Teacher-forced probabilities of each row's generated tokens after the interpretation prompt: with the row's
    vector written at ``positions`` of ``layers`` (block outputs) in the prompt, and without any injection."""
    R, n = generated.shape
    T = prompt_tokens.shape[1]
    seq = torch.cat([prompt_tokens.expand(R, -1), generated.to(prompt_tokens.device)], 1)
    idx = generated.to(prompt_tokens.device)[..., None]
    with view.model.hooks(fwd_hooks=patch_hooks(view, layers, vectors, positions)):
        injected = view.model(seq)[:, T - 1 : T - 1 + n].float().softmax(-1).gather(-1, idx)[..., 0]
    plain = view.model(seq)[:, T - 1 : T - 1 + n].float().softmax(-1).gather(-1, idx)[..., 0]
    return injected.cpu(), plain.cpu()
