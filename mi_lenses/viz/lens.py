"""Figures of a lens result: the seed grids (top-1 token, rank of the final top-1, KL per layer) and circuitsvis
views of the prompt coloured by per-layer statistics."""

from __future__ import annotations

import html
import math

import circuitsvis as cv
import torch

from mi_lenses.viz.html import circuitsvis_block, heat_grid, line_chart
from mi_lenses.viz.tokens import distinct


def column_labels(res, batch: int, cols: list[int]) -> list[str]:
    """The input token of each column, with its position appended where the same token occurs twice."""
    tokens = res.position_tokens[batch]
    return distinct([tokens[j] for j in cols], [int(res.token_index[batch, j]) for j in cols])


def best_tokens(res, batch: int, column: int, n: int) -> list[int]:
    """The ``n`` token ids with the highest probability at *any* layer at ``column`` (among each layer's top-k):
    a view that shows a few tokens shows the ones some layer believed most, not only the final layer's."""
    best: dict[int, float] = {}
    ids, probs = res.top_ids[:, batch, column].tolist(), res.top_probs[:, batch, column].tolist()
    for r in range(len(res.labels)):
        for i, p in zip(ids[r], probs[r]):
            if i >= 0 and p > best.get(i, -1.0):
                best[i] = p
    return [i for i, _ in sorted(best.items(), key=lambda kv: -kv[1])[:n]]


def _rows_top_first(n: int) -> list[int]:
    """Rows are drawn with the final output row at the top and the embedding row at the bottom."""
    return list(range(n - 1, -1, -1))


def top1_grid(res, batch: int = 0, value: str = "prob") -> str:
    """Layers x positions, the top-1 token as text, coloured by its probability (or logit)."""
    cols = res.columns(batch)
    order = _rows_top_first(len(res.labels))
    toks = res.top_tokens
    probs = res.top_probs[..., 0]
    logits = res.top_logits[..., 0]
    if value == "logit":
        sel = logits[:, batch, cols]
        lo, hi = float(sel.min()), float(sel.max())
        shade = [[(float(logits[r, batch, j]) - lo) / (hi - lo or 1) for j in cols] for r in order]
    else:
        shade = [[float(probs[r, batch, j]) for j in cols] for r in order]
    text = [[toks[r][batch][j][0] for j in cols] for r in order]
    k = res.top_ids.shape[-1]
    labels = column_labels(res, batch, cols)
    top_probs = res.top_probs[:, batch].tolist()  # once: the property recomputes on every access
    titles = [
        [
            f"{res.labels[r]} @ {label!r}: "
            + ", ".join(f"{toks[r][batch][j][i]!r} {top_probs[r][j][i]:.3f}" for i in range(k))
            for j, label in zip(cols, labels)
        ]
        for r in order
    ]
    caption = f"Top-1 token per layer and position ({res.lens_name}), coloured by its {value}; hover for top-{k}."
    return heat_grid([res.labels[r] for r in order], labels, text, shade, titles, caption)


def rank_grid(res, batch: int = 0, target: int | None = None) -> str:
    """Layers x positions, the rank of the final top-1 token (or of target ``target``), coloured by log rank."""
    cols = res.columns(batch)
    order = _rows_top_first(len(res.labels))
    ranks = res.final_top1_rank if target is None else res.target_ranks[..., target]
    name = "the final top-1 token" if target is None else repr(res.target_strs[target])
    worst = math.log1p(max(float(ranks[:, batch, cols].max()), 1.0))
    # -1: no reference there (a lens predicting `ahead` positions beyond the prompt's end): no number, no shade
    text = [[str(int(ranks[r, batch, j])) if ranks[r, batch, j] >= 0 else "–" for j in cols] for r in order]
    shade = [[1.0 - math.log1p(float(ranks[r, batch, j])) / worst if ranks[r, batch, j] >= 0 else math.nan
              for j in cols] for r in order]
    caption = f"Rank of {name} per layer and position (0 = top-1); darker = better rank."
    return heat_grid([res.labels[r] for r in order], column_labels(res, batch, cols), text, shade, None, caption)


def kl_chart(res, batch: int = 0) -> str:
    """KL(final || layer) in bits per layer: mean over positions and at the last position."""
    cols = res.columns(batch)
    kl = res.kl_bits[:, batch, cols]
    series = {"mean over positions": kl.nanmean(-1).tolist(), "last position": kl[:, -1].tolist()}
    return line_chart(res.labels, series, "KL(final ‖ layer) [bits]")


def circuitsvis_views(res, batch: int = 0) -> list:
    """circuitsvis ``ColoredTokensMulti`` views: the prompt coloured by a statistic, one label per layer."""
    cols = res.columns(batch)
    tokens = [res.position_tokens[batch][j] for j in cols]
    labels = list(res.labels)

    def values(t: torch.Tensor) -> torch.Tensor:  # [rows, B, P] -> [pos, rows]
        return torch.nan_to_num(t[:, batch, cols].T.float().contiguous(), nan=0.0)

    views = [
        cv.tokens.colored_tokens_multi(tokens, values(res.kl_bits), [f"KL bits @ {l}" for l in labels]),
        cv.tokens.colored_tokens_multi(
            tokens, values(res.top_probs[..., 0]), [f"top-1 prob @ {l}" for l in labels]
        ),
        cv.tokens.colored_tokens_multi(tokens, values(res.entropy_bits), [f"entropy bits @ {l}" for l in labels]),
    ]
    return views


def lens_fragment(res, batch: int = 0) -> str:
    """Everything about one prompt as an HTML fragment (offline)."""
    n = int(res.valid[batch].sum())
    head = (
        f'<p class="note">{html.escape(res.lens_name)} on <b>{html.escape(res.model_name)}</b>, residual point '
        f"{res.point}, {len(res.labels)} rows x {n} positions, matmul dtype {res.dtype}. Prompt: "
        f"<code>{html.escape(''.join(res.str_tokens[batch]))}</code></p>"
    )
    parts = [
        head,
        "<h2>Top-1 token per layer</h2>",
        top1_grid(res, batch),
        "<h2>Rank of the final top-1 token</h2>",
        rank_grid(res, batch),
    ]
    for t in range(len(res.target_ids)):
        parts += [f"<h2>Rank of target {html.escape(repr(res.target_strs[t]))}</h2>", rank_grid(res, batch, t)]
    parts += [
        "<h2>KL divergence to the final distribution</h2>",
        kl_chart(res, batch),
        "<h2>Per-layer statistics over the prompt (circuitsvis)</h2>",
        '<p class="note">Pick a layer in each view; tokens are coloured by KL to the final distribution, the '
        "top-1 probability and the entropy at that layer.</p>",
        circuitsvis_block(circuitsvis_views(res, batch)),
    ]
    return "\n".join(parts)
