"""Training and evaluation text for the tuned lens, packed into fixed-length token sequences.

``source`` is one of:

* a text file, or a folder (every ``*.txt`` / ``*.md`` file below it, sorted): each file is one document;
* a ``datasets`` name ``"NAME"``, ``"NAME:CONFIG"``, optionally ``"...@SPLIT"`` (default split ``train``), read from the
  local cache first (works offline), with a ``text`` column;
* ``"model"`` or ``"model:N"``: about ``N`` tokens (default 65536) sampled from the model itself at temperature 1,
  for when there is no corpus at hand;
* the text itself: a string holding whitespace that is not an existing file or folder (a dataset name never holds
  any), one document; or a list of strings, one document each.

Documents are tokenized without special tokens, joined with the end-of-text token as separator, and cut into
sequences of ``seq_len`` tokens (the tail that does not fill a sequence is dropped), as the ``tuned-lens`` package does.

Example:
    >>> _ = (tmp / "corpus.txt").write_text("The capital of France is Paris. " * 20)
    >>> load_tokens(tmp / "corpus.txt", model, seq_len=16).shape     # [n_seq, seq_len]
    torch.Size([10, 16])
    >>> bool((load_tokens("The capital of France is Paris. " * 20, model, seq_len=16)
    ...       == load_tokens(tmp / "corpus.txt", model, seq_len=16)).all())        # the text itself
    True
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from jaxtyping import Int
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.models.view import ModelView

TEXT_SUFFIXES = (".txt", ".md")


def load_tokens(
    source: str | os.PathLike | list[str], model: Any, seq_len: int, max_tokens: int | None = None, seed: int = 0
) -> Int[Tensor, "n_seq seq_len"]:
    """Packed token sequences ``[n_seq, seq_len]`` from ``source`` (see the module docstring)."""
    view = ModelView(model)
    if not isinstance(seq_len, int) or seq_len < 2:
        raise LensInputError(f"seq_len must be an int >= 2, got {seq_len!r}.")
    if isinstance(source, (list, tuple)):
        if not all(isinstance(t, str) for t in source):
            raise LensInputError("a list of texts must hold strings only: pass a file, a folder or the texts.")
        return pack(view, list(source), seq_len, max_tokens, what=f"the {len(source)} texts given")
    src = str(source)
    if re.fullmatch(r"model(:\d+)?", src):
        n = int(src.split(":", 1)[1]) if ":" in src else 65536
        n = min(n, max_tokens) if max_tokens else n
        return sample_from_model(view, n_tokens=n, seq_len=seq_len, seed=seed)
    path = _as_path(src)
    if path is not None:
        docs: Iterable[str] = _read_files(path)
    elif isinstance(source, str) and any(c.isspace() for c in src):
        return pack(view, [src], seq_len, max_tokens,
                    what=f"the text given ({src[:40]!r}...: not an existing file or folder, so read as the text)")
    else:
        docs = _dataset_texts(src)
    return pack(view, docs, seq_len, max_tokens, what=src)


def data_name(data: Any) -> str:
    """What a training record says of ``data``: its name or path, or how much text was given."""
    if isinstance(data, (list, tuple)):
        return f"{len(data)} texts"
    text = str(data)
    return text if len(text) <= 200 and "\n" not in text else f"a text of {len(text)} characters"


def _as_path(src: str) -> Path | None:
    """``src`` as an existing file or folder, or None (a text read as a path: too long a name, an unknown ``~user``)."""
    try:
        path = Path(src).expanduser()
        return path if path.exists() else None
    except (OSError, RuntimeError):
        return None


def pack(
    view: ModelView, docs: Iterable[str], seq_len: int, max_tokens: int | None = None, what: str = "the data"
) -> Int[Tensor, "n_seq seq_len"]:
    """Tokenize ``docs``, join them with the end-of-text token and cut into ``seq_len`` sequences."""
    tok = view.tokenizer
    if tok is None:
        raise LensInputError("the model has no tokenizer: pass token ids instead of text.")
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
    if sep is None:
        raise LensInputError("the tokenizer has neither an end-of-text nor a BOS token to separate documents with.")
    ids: list[int] = []
    limit = max_tokens if max_tokens else None
    for doc in docs:
        if not doc.strip():
            continue
        ids.extend(tok(doc, add_special_tokens=False)["input_ids"])
        ids.append(sep)
        if limit and len(ids) >= limit:
            break
    if limit:
        ids = ids[:limit]
    n = len(ids) // seq_len
    if n == 0:
        raise LensInputError(
            f"{what} holds {len(ids)} tokens, fewer than one sequence of {seq_len}: pass more text or a smaller "
            f"--seq-len."
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _read_files(path: Path) -> list[str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    if not files:
        raise LensInputError(f"{path} holds no {'/'.join(TEXT_SUFFIXES)} files: pass a text file or such a folder.")
    out = []
    for f in files:
        try:
            out.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise LensInputError(f"cannot read {f} as UTF-8 text ({err}).") from err
    return out


def _dataset_texts(spec: str) -> Iterable[str]:
    """Rows of the ``text`` column of a ``datasets`` dataset, cache first."""
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    split = split or "train"
    try:
        import datasets  # deferred: optional, and slow to import
    except ImportError as err:
        raise LensInputError(
            f"{spec!r} is not an existing file or folder, and the `datasets` package (needed to read it as a "
            "dataset name) is not installed: pass a text file, or `pip install datasets`."
        ) from err
    errors, ds = [], None
    for offline in (True, False):
        if not offline and os.environ.get("HF_HUB_OFFLINE") == "1":
            break
        prev = datasets.config.HF_HUB_OFFLINE
        try:
            datasets.config.HF_HUB_OFFLINE = offline
            ds = datasets.load_dataset(name, config or None, split=split)
            break
        except Exception as err:  # noqa: BLE001 (datasets raises many kinds)
            errors.append(f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")
        finally:
            datasets.config.HF_HUB_OFFLINE = prev
    if ds is None:
        raise LensInputError(
            f"{spec!r} is neither a file/folder nor a dataset in the local `datasets` cache ({'; '.join(errors)}). "
            "Pass a text file or folder, a cached dataset name (NAME[:CONFIG][@SPLIT]), or 'model' to sample text "
            "from the model."
        )
    if "text" not in ds.column_names:
        raise LensInputError(f"dataset {spec!r} has no 'text' column (columns: {ds.column_names}).")
    return (row for row in ds["text"])


@torch.no_grad()
def sample_from_model(view: ModelView, n_tokens: int, seq_len: int, seed: int = 0, batch: int = 8) -> Tensor:
    """``ceil(n_tokens / seq_len)`` sequences sampled from the model at temperature 1, each starting from the
    end-of-text (or BOS) token, ``batch`` at a time, one token per step on the model's KV cache. An end-of-text token
    inside a sequence starts a new document, as packed training text does.

    >>> tokens = sample_from_model(ModelView(model), n_tokens=24, seq_len=12, seed=0)
    >>> tokens.shape, bool(torch.equal(tokens, sample_from_model(ModelView(model), n_tokens=24, seq_len=12, seed=0)))
    (torch.Size([2, 12]), True)
    """
    tok = view.tokenizer
    start = None if tok is None else (tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
    if start is None:
        raise LensInputError("sampling needs a tokenizer with a BOS or end-of-text token.")
    n_seq = max(1, -(-n_tokens // seq_len))
    g = torch.Generator().manual_seed(seed)
    kv = view.kv  # one token per step on the KV cache; None: recompute the sequence (same tokens, slower)
    out = []
    for b0 in range(0, n_seq, batch):
        b = min(batch, n_seq - b0)
        seq = torch.full((b, 1), start, dtype=torch.long, device=view.device)
        cache = None
        with torch.inference_mode(), (kv.session() if kv is not None else contextlib.nullcontext()):
            while seq.shape[1] < seq_len:
                if kv is not None:
                    logits, cache = kv.forward(seq if cache is None else seq[:, -1:], cache)
                else:
                    logits = view.model(seq)
                nxt = torch.multinomial(logits[:, -1].float().cpu().softmax(-1), 1, generator=g)
                seq = torch.cat([seq, nxt.to(seq.device)], 1)
        out.append(seq.cpu().clone())  # a normal tensor: inference-mode tensors refuse later in-place updates
    return torch.cat(out)
