"""The logit lens, and the engine every lens runs on.

A lens maps each residual-stream row to a hidden state that is then decoded through the model's own final norm and
unembedding. The logit lens is the identity map; the tuned lens adds a learned affine translator per layer.

Example::

    import mi_lenses
    model = mi_lenses.load_model()
    res = mi_lenses.logit_lens(model, "The capital of France is", targets=" Paris")
    res.print()                       # top-1 token per layer x position
    res.target_ranks[:, 0, -1, 0]     # rank of " Paris" at the last position, per layer
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mi_lenses.lenses.result import LensResult
from mi_lenses.lenses.stream import FUSE_MIN_VECTORS, FinalDistribution, row_stats
from mi_lenses.models.view import LensInputError, ModelView, ResidualRow

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tolerance of the automatic final-row identity check, per matmul dtype (log-prob units).
_CHECK_ATOL = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.05}


class Lens(Protocol):
    """Maps a row's hidden states before decoding. ``row.lens_index`` follows the ``tuned-lens`` layer indexing."""

    name: str

    def transform(self, hidden: Float[Tensor, "n d_model"], row: ResidualRow) -> Float[Tensor, "n d_model"]: ...


class LogitLens:
    """The logit lens (nostalgebraist 2020): decode every residual state as if it were the last one."""

    name = "logit lens"

    def transform(self, hidden: Tensor, row: ResidualRow) -> Tensor:
        return hidden

    def __call__(self, model: Any, input: Any = None, **kwargs: Any) -> LensResult:
        return run_lens(self, model, input, **kwargs)


def logit_lens(model: Any, input: Any = None, **kwargs: Any) -> LensResult:
    """Run the logit lens; see :func:`run_lens` for the arguments.

    Example::

        res = logit_lens(model, "The capital of France is", targets=" Paris", top_k=5)
    """
    return run_lens(LogitLens(), model, input, **kwargs)


def run_lens(
    lens: Lens,
    model: Any,
    input: str | Sequence[str] | Tensor | None = None,
    *,
    cache: Any = None,
    logits: Tensor | None = None,
    layers: Sequence[int] | None = None,
    positions: int | Sequence[int] | None = None,
    point: str = "resid_pre",
    top_k: int = 5,
    targets: str | int | Sequence[str | int] | None = None,
    return_logits: bool = False,
    prepend_bos: bool | None = None,
    dtype: torch.dtype | str = torch.float32,
    position_chunk: int = 256,
    vocab_tile: int = 2048,
    fused: bool | None = None,
    check: bool = True,
) -> LensResult:
    """Decode every residual row of ``input`` (or of an existing ``cache``) through ``lens`` and the unembedding.

    Args:
        model: a TransformerLens model (or a ``ModelView``).
        input: a prompt, a list of prompts (right-padded; padding is masked out), or tokens ``[batch, pos]``.
            With ``cache`` it supplies the token strings and next tokens only; no forward pass is run.
        cache: an ``ActivationCache`` holding the residual hooks; ``logits`` (the model output of that run) enables
            ``verify()``.
        layers: indices into the rows (embedding row .. final row; negative allowed); default all.
        positions: position indices (negative allowed); default all.
        point: ``"resid_pre"`` (default), ``"resid_mid"`` or ``"resid_post"``.
        top_k: tokens kept per row and position.
        targets: token strings (each exactly one token) or ids whose rank and probability are tracked.
        return_logits: also return the full ``[rows, batch, pos, vocab]`` logits (memory heavy).
        dtype: matmul dtype: ``float32`` (default) or ``bfloat16``/``float16`` (faster only on hardware with fast
            low-precision matmul; statistics are still reduced in float32).
        fused: reduce each logit tile in one ``torch.compile``d kernel (faster on large jobs, see benchmarks/README.md;
            compiled once per process, 10-20 s). ``None`` (default): only for jobs of at least
            ``stream.FUSE_MIN_VECTORS`` decoded vectors; falls back to eager code when no compiler is available.
        check: verify the final row against the model's own logits whenever a forward pass was run.
    """
    view = ModelView(model)
    dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in _CHECK_ATOL:
        raise LensInputError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}.")
    if not isinstance(top_k, int) or not 1 <= top_k <= view.d_vocab:
        raise LensInputError(f"top_k must be an int in 1..{view.d_vocab}, got {top_k!r}.")
    all_rows = view.residual_rows(point)
    selected = _select(all_rows, layers)
    target_ids = _target_ids(view, targets)

    if input is None and cache is None:
        raise LensInputError("pass a prompt, a list of prompts, tokens, or cache=ActivationCache.")
    tokens = view.to_tokens(input, prepend_bos) if input is not None else None
    if tokens is not None and isinstance(input, (list, tuple)) and all(isinstance(p, str) for p in input):
        lengths = view.token_lengths(input, tokens, prepend_bos)
    elif tokens is not None:
        lengths = [tokens.shape[1]] * tokens.shape[0]
    else:
        lengths = None

    model_logits = logits
    if cache is None:
        names = {r.hook_name for r in all_rows}
        with torch.no_grad():
            model_logits, cache = view.model.run_with_cache(tokens, names_filter=lambda n: n in names)
    final_row = all_rows[-1]
    resid = {r.hook_name: _read(cache, r.hook_name) for r in [*selected, final_row]}
    B, S = resid[final_row.hook_name].shape[:2]
    if tokens is not None and tuple(tokens.shape) != (B, S):
        raise LensInputError(f"tokens {tuple(tokens.shape)} do not match the cache's [batch, pos] = {(B, S)}.")
    if lengths is None:
        lengths = [S] * B
    pos = _positions(positions, S)
    P = len(pos)
    pos_t = torch.tensor(pos)
    valid = pos_t[None, :] < torch.tensor(lengths)[:, None]  # [B, P]

    # next token at each selected position (for cross-entropy); -1 where unknown
    next_ids = torch.full((B, P), -1, dtype=torch.long)
    if tokens is not None:
        nxt = pos_t + 1
        ok = nxt[None, :] < torch.tensor(lengths)[:, None]
        next_ids = torch.where(ok, tokens.cpu()[:, nxt.clamp(max=S - 1)], -1)

    W, b = view.unembed(dtype)
    softcap = view.softcap
    k = top_k
    rows_out = [r for r in selected if not r.is_final]
    n_rows = len(selected)
    N = B * P
    T = len(target_ids)
    out = _Buffers(n_rows, N, k, T, view.d_vocab if return_logits else None)
    tgt = torch.as_tensor(target_ids, dtype=torch.long)
    use_fused = fused if fused is not None else len(rows_out) * N >= FUSE_MIN_VECTORS

    with torch.no_grad():
        hidden = {
            r.hook_name + r.label: resid[r.hook_name][:, pos_t.to(resid[r.hook_name].device)].reshape(N, -1)
            for r in [*selected, final_row]
        }
        for c0 in range(0, N, position_chunk):
            c1 = min(c0 + position_chunk, N)
            C = c1 - c0
            nxt = next_ids.reshape(N)[c0:c1]
            xf = view.normalize(hidden[final_row.hook_name + final_row.label][c0:c1]).to(W.device, dtype)
            final, f_stats = _final_stats(xf, W, b, softcap, k, tgt, nxt, return_logits)
            if selected[-1].is_final:
                out.put(n_rows - 1, c0, c1, f_stats)
            rows_per = max(1, 1024 // C)
            for r0 in range(0, len(rows_out), rows_per):
                chunk = rows_out[r0 : r0 + rows_per]
                x = torch.cat(
                    [
                        view.normalize(lens.transform(hidden[r.hook_name + r.label][c0:c1].float(), r))
                        for r in chunk
                    ]
                ).to(W.device, dtype)
                st = row_stats(
                    x, W, b, k=k, final=final, positions_per_row=C,
                    targets=tgt.expand(x.shape[0], T), next_ids=nxt.repeat(len(chunk)),
                    softcap=softcap, keep_logits=return_logits, vocab_tile=vocab_tile, fused=use_fused,
                )
                for i in range(len(chunk)):
                    part = {key: v[i * C : (i + 1) * C] for key, v in vars(st).items() if v is not None}
                    out.put(r0 + i, c0, c1, part)

    shape = (n_rows, B, P)
    ref_max = ref_lp = None
    if model_logits is not None and selected[-1].is_final:
        ml = model_logits.detach()[:, pos_t.to(model_logits.device)].float().log_softmax(-1).cpu()
        ref_lp = ml.gather(-1, out.top_ids[-1].view(B, P, k))
        ref_max = ml.max(-1).values
    ce = (out.lse - out.next_logit).view(shape)
    ce = torch.where(next_ids[None] >= 0, ce, torch.nan)
    tokens_cpu = tokens.cpu() if tokens is not None else torch.full((B, S), -1, dtype=torch.long)
    vocab = view.id_to_str_map(torch.cat([out.top_ids.flatten(), tgt, tokens_cpu.flatten().clamp(min=0)]))
    str_tokens = [
        [vocab[t] if t >= 0 else "?" for t in row[: lengths[i]]] for i, row in enumerate(tokens_cpu.tolist())
    ]
    result = LensResult(
        model_name=view.name,
        lens_name=lens.name,
        labels=[r.label for r in selected],
        point=point,
        tokens=tokens_cpu,
        str_tokens=str_tokens,
        positions=pos,
        valid=valid,
        top_ids=out.top_ids.view(*shape, k),
        top_logits=out.top_logits.view(*shape, k),
        logsumexp=out.lse.view(shape),
        entropy=out.entropy.view(shape),
        kl=out.kl.view(shape),
        cross_entropy=ce,
        final_top1=out.final_top1.view(B, P),
        final_top1_rank=out.rank.view(shape),
        target_ids=tgt,
        target_ranks=out.target_ranks.view(*shape, T),
        target_logprobs=(out.target_logits - out.lse[:, :, None]).view(*shape, T),
        vocab=vocab,
        logits=None if out.logits is None else out.logits.view(*shape, -1),
        reference_logprobs=ref_lp,
        reference_max_logprob=ref_max,
        dtype=str(dtype).replace("torch.", ""),
    )
    if check and model_logits is not None and tokens is not None and selected[-1].is_final:
        result.verify(atol=_CHECK_ATOL[dtype])
    return result


# ------------------------------------------------------------------------------------------------ helpers
class _Buffers:
    """Output tensors ``[rows, N, ...]`` filled chunk by chunk."""

    def __init__(self, R: int, N: int, k: int, T: int, vocab: int | None):
        self.top_ids = torch.zeros(R, N, k, dtype=torch.long)
        self.top_logits = torch.zeros(R, N, k)
        self.lse = torch.zeros(R, N)
        self.entropy = torch.zeros(R, N)
        self.kl = torch.zeros(R, N)
        self.rank = torch.zeros(R, N, dtype=torch.long)
        self.target_ranks = torch.zeros(R, N, T, dtype=torch.long)
        self.target_logits = torch.zeros(R, N, T)
        self.next_logit = torch.zeros(R, N)
        self.final_top1 = torch.zeros(N, dtype=torch.long)
        self.logits = torch.zeros(R, N, vocab) if vocab else None

    def put(self, r: int, c0: int, c1: int, st: dict[str, Tensor]) -> None:
        self.top_ids[r, c0:c1] = st["top_ids"]
        self.top_logits[r, c0:c1] = st["top_logits"]
        self.lse[r, c0:c1] = st["logsumexp"]
        self.entropy[r, c0:c1] = st["entropy"]
        self.kl[r, c0:c1] = st["kl"]
        self.rank[r, c0:c1] = st["final_top1_rank"]
        self.target_ranks[r, c0:c1] = st["target_ranks"]
        self.target_logits[r, c0:c1] = st["target_logits"]
        self.next_logit[r, c0:c1] = st["next_logit"]
        if "final_top1" in st:
            self.final_top1[c0:c1] = st["final_top1"]
        if self.logits is not None and st.get("logits") is not None:
            self.logits[r, c0:c1] = st["logits"]


def _final_stats(x, W, b, softcap, k, tgt, nxt, keep_logits):
    """The final row in full: its distribution (for KL) and its own statistics."""
    logits = x @ W
    if b is not None:
        logits += b
    logits = logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    lse = torch.logsumexp(logits, -1)
    top_logits, top_ids = logits.topk(k, dim=-1)
    top1 = top_ids[:, 0].clone()
    ids = torch.cat([top1[:, None], tgt.expand(x.shape[0], -1)], 1)
    ref = logits.gather(1, ids)
    ranks = (logits[:, None, :] > ref[:, :, None]).sum(-1)
    neg_entropy = torch.linalg.vecdot(probs, logp)
    stats = {
        "top_ids": top_ids,
        "top_logits": top_logits,
        "logsumexp": lse,
        "entropy": -neg_entropy,
        "kl": torch.zeros_like(lse),
        "final_top1_rank": ranks[:, 0],
        "target_ranks": ranks[:, 1:],
        "target_logits": ref[:, 1:],
        "next_logit": logits.gather(1, nxt.clamp(min=0)[:, None])[:, 0],
        "final_top1": top1,
        "logits": logits if keep_logits else None,
    }
    return FinalDistribution(probs, neg_entropy, top1), stats


def _int_list(values: Any) -> list:
    """Python ints from an int, a sequence, a numpy array or a tensor of integers (other items kept for the error)."""
    import operator

    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        values = [values]
    out = []
    for v in values:
        try:
            out.append(v if isinstance(v, bool) else operator.index(v))
        except TypeError:
            out.append(v)
    return out


def _select(rows: list[ResidualRow], layers: Sequence[int] | int | None) -> list[ResidualRow]:
    if layers is None:
        return rows
    layers = _int_list(layers)
    chosen = []
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or not -len(rows) <= layer < len(rows):
            raise LensInputError(
                f"layer {layer!r} is out of range: the lens has {len(rows)} rows, 0 (embed) .. {len(rows) - 1} "
                f"(final output); negative indices count from the end."
            )
        chosen.append(rows[layer % len(rows)])
    if len(set(chosen)) != len(chosen):
        raise LensInputError(f"layers {list(layers)} select a row twice.")
    return sorted(chosen, key=rows.index)


def _positions(positions: int | Sequence[int] | None, S: int) -> list[int]:
    if positions is None:
        return list(range(S))
    positions = _int_list(positions)
    out = []
    for p in positions:
        if not isinstance(p, int) or isinstance(p, bool) or not -S <= p < S:
            raise LensInputError(
                f"position {p!r} is out of range for a sequence of {S} tokens (0..{S - 1}, or -{S}..-1)."
            )
        out.append(p % S)
    return out


def _target_ids(view: ModelView, targets: Any) -> list[int]:
    if targets is None:
        return []
    if isinstance(targets, (str, int)):
        targets = [targets]
    return [view.to_single_token(t) for t in targets]


def _read(cache: Any, name: str) -> Tensor:
    try:
        t = cache[name]
    except (KeyError, IndexError) as err:
        raise LensInputError(
            f"the cache has no {name!r}: run model.run_with_cache(tokens) without a names_filter, or one that keeps "
            f"the residual hooks (blocks.*.hook_resid_pre/mid/post)."
        ) from err
    return t if t.ndim == 3 else t[None]
