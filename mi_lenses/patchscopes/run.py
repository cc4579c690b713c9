"""Run a Patchscope: read the source state, map it, patch it into the target run, read the next token or generate.

Example:
    >>> res = patchscope(model, Source("The capital of France is", layers=[0, 2]), presets.attribute("capital"),
    ...                  max_new_tokens=4)
    >>> res.prec_at_1.shape, len(res.generated)    # per source layer: top-1 == the source model's own prediction?
    (torch.Size([2]), 2)

Engine notes.
* Patched rows that share a target prompt run as one batch; rows with different target layers ``l*`` are patched by
  one hook per layer that writes only its own rows, so a whole ``l x l*`` sweep is a few forward passes.
* Positions before the first patched position do not depend on the patch (causal attention): with a KV cache
  (TransformerBridge) that prefix is computed once and shared by every row; without one the full prompt is recomputed.
* Generation patches the prompt pass only by default (the paper). With the KV cache the patched keys/values of the
  prompt are reused at every step, which equals an uncached loop that re-applies the prompt patch on every pass (the
  identity the tests check). ``patch_every_step=True`` also writes the vector at layer ``l*`` of every generated
  token (cached: the new ``[b, 1, d]`` position; uncached: every position after the prompt).
* Hooks are added with ``model.hooks(fwd_hooks=...)`` and removed on exit, also on exceptions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mi_lenses.errors import LensInputError, VerificationError
from mi_lenses.models.batch import Batch, check_context
from mi_lenses.models.hooks import write_hooks
from mi_lenses.models.interventions import active_hooks, recorded
from mi_lenses.models.view import ModelView
from mi_lenses.patchscopes.presets import identity
from mi_lenses.patchscopes.result import PatchscopeResult
from mi_lenses.patchscopes.spec import (
    POINT,
    ResolvedTarget,
    Source,
    Target,
    resolve_layer,
    resolve_map,
    resolve_position,
    resolve_target,
    translate_ids,
)
from mi_lenses.progress import track


# ------------------------------------------------------------------------------------------------ source side
def source_states(
    view: ModelView, batch: Batch, layers: Iterable[int]
) -> tuple[dict[int, Float[Tensor, "B S d"]], Float[Tensor, "B S V"]]:
    """The residual stream after each block in ``layers`` (``blocks.l.hook_resid_post``) and the model's logits."""
    names = {view.hook_name(POINT, l): l for l in layers}
    logits, cache = view.run_with_cache(batch, names)
    return {l: cache[name].detach() for name, l in names.items()}, logits.detach()


def apply_map(fmap: Callable | None, x: Float[Tensor, "n d_src"], target: ModelView) -> Float[Tensor, "n d_tgt"]:
    with torch.no_grad():
        y = x if fmap is None else fmap(x.to(target.device))
    return y.to(target.device, target.W_U.dtype)


# ------------------------------------------------------------------------------------------------ patching hooks
def patch_hooks(
    view: ModelView, layers: Int[Tensor, " N"], vectors: Float[Tensor, "N d"], positions: Sequence[int]
) -> list[tuple[str, Callable]]:
    """One hook per distinct target layer; each writes its rows' vectors at ``positions`` of ``resid_post``."""
    return write_hooks([view.hook_name(POINT, int(l)) for l in layers.tolist()], vectors, positions)


def _chunks(n: int, size: int, progress: bool, desc: str) -> Iterable[tuple[int, int]]:
    spans = [(a, min(a + size, n)) for a in range(0, n, size)]
    return track(spans, desc, unit="batch", enabled=progress and len(spans) > 1)


def patched_runs(
    rt: ResolvedTarget,
    names: Sequence[str],
    vectors: Float[Tensor, "N d"],
    *,
    chunk: int = 256,
    use_kv_cache: bool = True,
    progress: bool = False,
    capture: str | None = None,
) -> Iterator[tuple[int, int, Float[Tensor, "n V"], Float[Tensor, "n d"] | None]]:
    """Run the target prompt once per row, row ``i`` with ``vectors[i]`` written at the target positions of hook
    ``names[i]``, ``chunk`` rows per forward pass; yield ``(a, b, logits, state)`` per chunk of rows ``a:b``: the
    logits at the target's last position and, with ``capture`` (a hook name), that hook's state there. The unpatched
    prefix before the first patched position is computed once and shared through the KV cache."""
    view, tokens = rt.view, rt.tokens
    kv = view.kv if use_kv_cache else None
    start = min(rt.positions) if kv is not None else 0
    with torch.no_grad():
        prefix = kv.forward(tokens[:, :start])[1] if start > 0 else None
        suffix = tokens[:, start:]
        for a, b in _chunks(len(names), chunk, progress, "patchscope rows"):
            n = b - a
            hooks = write_hooks(names[a:b], vectors[a:b], [p - start for p in rt.positions])
            got: dict[str, Tensor] = {}
            if capture is not None:
                def keep(resid: Tensor, hook: Any = None) -> Tensor:
                    got["state"] = resid[:, -1].detach().clone()
                    return resid

                hooks.append((capture, keep))  # after the patch hooks: it sees the patched stream
            with view.model.hooks(fwd_hooks=hooks):
                if prefix is not None:
                    logits, _ = kv.forward(suffix.expand(n, -1), kv.repeat(prefix, n))
                else:
                    logits = view.model(suffix.expand(n, -1))
            yield a, b, logits[:, -1], got.get("state")


def patched_readout(
    rt: ResolvedTarget,
    layers: Int[Tensor, " N"],
    vectors: Float[Tensor, "N d"],
    gather_ids: Int[Tensor, "N m"],
    top_k: int = 5,
    chunk: int = 256,
    use_kv_cache: bool = True,
    progress: bool = False,
) -> tuple[Int[Tensor, "N k"], Float[Tensor, "N k"], Float[Tensor, "N m"]]:
    """Next-token statistics at the target's last position for ``N`` patched rows.

    Returns the top-k ids and log-probs, and the log-probs of ``gather_ids`` (``nan`` where an id is -1). Rows are
    run ``chunk`` at a time; the unpatched prefix before the first patched position is shared via the KV cache.
    """
    N = layers.shape[0]
    top_ids = torch.zeros(N, top_k, dtype=torch.long)
    top_lp = torch.zeros(N, top_k)
    gathered = torch.full(gather_ids.shape, torch.nan)
    names = [rt.view.hook_name(POINT, int(l)) for l in layers.tolist()]
    for a, b, logits, _ in patched_runs(rt, names, vectors, chunk=chunk, use_kv_cache=use_kv_cache,
                                        progress=progress):
        logp = logits.float().log_softmax(-1).cpu()
        v, i = logp.topk(top_k, dim=-1)
        top_ids[a:b], top_lp[a:b] = i, v
        ids = gather_ids[a:b]
        got = logp.gather(1, ids.clamp(min=0))
        gathered[a:b] = torch.where(ids >= 0, got, torch.nan)
    return top_ids, top_lp, gathered


def _next_token(logits: Tensor, do_sample: bool, temperature: float, gen: torch.Generator | None) -> Tensor:
    logits = logits.float().cpu()
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def patched_generate(
    rt: ResolvedTarget,
    layers: Int[Tensor, " N"],
    vectors: Float[Tensor, "N d"],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    patch_every_step: bool = False,
    use_kv_cache: bool = True,
) -> Int[Tensor, "N n"]:
    """Generate ``max_new_tokens`` tokens for every patched row (greedy, or sampled with ``seed``).

    With ``use_kv_cache`` (and a model that supports it) the prompt runs once with the patch and each step feeds one
    token; otherwise every step recomputes the whole sequence and re-applies the patch. Both give the same tokens.
    """
    view = rt.view
    N, T = layers.shape[0], rt.tokens.shape[1]
    gen = torch.Generator().manual_seed(seed) if do_sample else None
    seq = rt.tokens.expand(N, -1).clone()
    out = torch.zeros(N, max_new_tokens, dtype=torch.long)
    kv = view.kv if use_kv_cache else None
    cache = None
    with torch.inference_mode(), (kv.session() if kv is not None else contextlib.nullcontext()):
        for step in range(max_new_tokens):
            if kv is not None and cache is not None:
                feed = seq[:, -1:]
                positions = [0] if patch_every_step else []
            else:
                feed = seq
                positions = list(rt.positions) + (list(range(T, seq.shape[1])) if patch_every_step else [])
            # a hook context only when there is a patch (entering one resets every hook point on exit)
            hooked = view.model.hooks(fwd_hooks=patch_hooks(view, layers, vectors, positions)) if positions \
                else contextlib.nullcontext()
            with hooked:
                if kv is not None:
                    logits, cache = kv.forward(feed, cache)
                else:
                    logits = view.model(feed)
            nxt = _next_token(logits[:, -1], do_sample, temperature, gen)
            out[:, step] = nxt
            seq = torch.cat([seq, nxt[:, None].to(seq.device)], dim=1)
    return out


# ------------------------------------------------------------------------------------------------ public entry
def patchscope(
    model: Any,
    source: Source,
    target: Target | None = None,
    *,
    top_k: int = 5,
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    patch_every_step: bool = False,
    use_kv_cache: bool = True,
    stop_at_eos: bool = True,
) -> PatchscopeResult:
    """Run the Patchscope ``(S, i, M, l) -> (T, i*, f, M*, l*)`` for every source layer in ``source.layers``.

    Args:
        model: the default model (``M`` when ``source.model`` is None; ``M*`` when ``target.model`` is None too).
        source: :class:`Source` (prompt, layer or list of layers, position, model).
        target: :class:`Target`; default the token-identity preset.
        top_k: next-token candidates kept per row.
        max_new_tokens: tokens to generate per row (default: the target preset's ``max_new_tokens``; 0 = none).
        do_sample, temperature, seed: sampling (greedy by default; sampling is seeded and reproducible).
        patch_every_step: also patch every generated token at ``l*`` (default: the prompt pass only, the paper).
        use_kv_cache: generate (and share the unpatched prefix) with the model's KV cache.
        stop_at_eos: cut the generated text at the end-of-sequence token.

    Example:
        >>> res = patchscope(model, Source("The capital of France is", layers=-1), presets.identity())
        >>> bool(res.prec_at_1[0])   # the last layer patched into the last layer reproduces the prediction
        True
    """
    target = target if target is not None else identity()
    hooks = active_hooks(model)
    job = _prepare(model, source, target, top_k=top_k, max_new_tokens=max_new_tokens, do_sample=do_sample,
                   temperature=temperature)
    # forward: the source states, mapped into the target model's space, and the source model's own prediction
    states, src_logits = source_states(job.src, job.src.batch(job.src_tokens), set(job.src_layers))
    vectors = apply_map(job.fmap, torch.stack([states[l][0, job.i] for l in job.src_layers]), job.tgt)
    pred = src_logits[0, job.i].float().argmax().view(1).cpu()
    pred_t = translate_ids(pred, job.src, job.tgt).expand(len(job.src_layers))
    # patch: the next-token readout, then generation
    layers_t = torch.tensor(job.tgt_layers, dtype=torch.long)
    top_ids, top_lp, got = patched_readout(job.rt, layers_t, vectors, pred_t[:, None], top_k=top_k,
                                           use_kv_cache=use_kv_cache)
    gen_ids = None
    if job.n_new > 0:
        gen_ids = patched_generate(job.rt, layers_t, vectors, job.n_new, do_sample=do_sample,
                                   temperature=temperature, seed=seed, patch_every_step=patch_every_step,
                                   use_kv_cache=use_kv_cache)
    # assemble
    src, tgt = job.src, job.tgt
    return recorded(PatchscopeResult(
        model_name=src.name,
        target_model_name=tgt.name,
        target_name=target.name,
        source_prompt=_as_text(src, source.prompt, job.src_tokens),
        source_str_tokens=[src.id_to_str(int(t)) for t in job.src_tokens[0]],
        source_position=job.i,
        source_prediction=src.id_to_str(int(pred)),
        source_layers=job.src_layers,
        target_layers=job.tgt_layers,
        target_prompt=_as_text(tgt, target.prompt, job.rt.tokens),
        target_str_tokens=job.rt.str_tokens,
        target_positions=list(job.rt.positions),
        mapped=job.fmap is not None,
        top_ids=top_ids,
        top_logprobs=top_lp,
        prec_at_1=top_ids[:, 0] == pred_t,
        surprisal=-got[:, 0],
        generated_ids=gen_ids,
        vocab=tgt.id_to_str_map(top_ids if gen_ids is None else torch.cat([top_ids.flatten(), gen_ids.flatten()])),
        eos_token_id=getattr(tgt.tokenizer, "eos_token_id", None) if stop_at_eos else None,
        settings=dict(do_sample=do_sample, temperature=temperature, seed=seed, patch_every_step=patch_every_step,
                      use_kv_cache=use_kv_cache, top_k=top_k, max_new_tokens=job.n_new),
    ), hooks)


@dataclass
class _Job:
    """A Patchscope checked against its models, before any forward pass."""

    src: ModelView
    tgt: ModelView
    src_layers: list[int]
    tgt_layers: list[int]
    src_tokens: Tensor
    i: int
    rt: ResolvedTarget
    fmap: Callable | None
    n_new: int


def _prepare(model: Any, source: Source, target: Target, *, top_k: int, max_new_tokens: int | None,
             do_sample: bool, temperature: float) -> _Job:
    if not isinstance(source, Source):
        raise LensInputError(f"expected a Source(prompt, layers, position=-1), got {source!r}.")
    src = ModelView(source.model if source.model is not None else model)
    tgt = ModelView(target.model if target.model is not None else src)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= tgt.d_vocab:
        raise LensInputError(f"top_k must be an int in 1..{tgt.d_vocab}, got {top_k!r}.")
    n_new = target.max_new_tokens if max_new_tokens is None else max_new_tokens
    if not isinstance(n_new, int) or n_new < 0:
        raise LensInputError(f"max_new_tokens must be an int >= 0, got {n_new!r}.")
    if do_sample and not temperature > 0:
        raise LensInputError(f"temperature must be > 0 when sampling, got {temperature!r}.")
    src_layers = [resolve_layer(src, l, "source layer") for l in source.layers]
    if not src_layers:
        raise LensInputError("Source(layers=[]) selects no layer.")
    tgt_layers = [resolve_layer(tgt, l if target.layer is None else target.layer, "target layer") for l in src_layers]
    src_tokens = src.to_tokens(source.prompt, source.prepend_bos)
    if src_tokens.shape[0] != 1:
        raise LensInputError("the source prompt must be one prompt (a string or tokens [1, pos]); use sweep() for many.")
    i = resolve_position(source.position, src_tokens.shape[1], "source position")
    check_context(src, src_tokens.shape[1], "the source prompt", opt_in=False)
    rt = resolve_target(target, tgt)
    check_context(tgt, rt.tokens.shape[1] + n_new, f"the target prompt plus {n_new} generated tokens", opt_in=False)
    return _Job(src, tgt, src_layers, tgt_layers, src_tokens, i, rt, resolve_map(target.map, src, tgt), n_new)


def _as_text(view: ModelView, prompt: Any, tokens: Tensor) -> str:
    if isinstance(prompt, str):
        return prompt
    tok = view.tokenizer
    return tok.decode(tokens[0].tolist()) if tok is not None else " ".join(map(str, tokens[0].tolist()))


def verify(model: Any, prompt: str = "The capital of France is", atol: float = 1e-3) -> None:
    """Check the patching path on ``model``; raise ``VerificationError`` if an identity fails.

    1. Patching every layer's own state back into the same prompt and position changes nothing (next-token
       log-probs at the last position, within ``atol``).
    2. The last layer's state at every position patched at ``l* = L-1`` into the identity prompt's ``?`` gives the
       model's own next-token distribution there (precision@1 = 1, log-probs within ``atol``).

    >>> mi_lenses.patchscopes.verify(model)   # silent when the hooks, KV prefix and readout are right
    """
    view = ModelView(model)
    tokens = view.to_tokens(prompt)
    S, L = tokens.shape[1], view.n_layers
    with torch.no_grad():
        own = view.model(tokens)[0].float().log_softmax(-1).cpu()
    for layer in range(L):
        pos = S - 1 if layer % 2 else max(S - 2, 0)
        res = patchscope(view.model, Source(tokens, layers=layer, position=pos), Target(tokens, positions=pos))
        err = float((res.top_logprobs[0] - own[-1, res.top_ids[0]]).abs().max())
        if not err <= atol:
            raise VerificationError(
                f"patching layer {layer}'s own state back into position {pos} changed the output by {err:.2e} "
                f"(> {atol:.0e}): the patch hooks do not write where they read."
            )
    for pos in range(S):
        res = patchscope(view.model, Source(tokens, layers=L - 1, position=pos), identity().replace(layer=L - 1))
        err = float((res.top_logprobs[0] - own[pos, res.top_ids[0]]).abs().max())
        if not bool(res.prec_at_1[0]) or not err <= atol:
            raise VerificationError(
                f"the last-layer state of position {pos} patched into the identity prompt does not reproduce the "
                f"model's own prediction (log-prob error {err:.2e}, precision@1 {bool(res.prec_at_1[0])})."
            )
