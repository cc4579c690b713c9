"""Training dictionaries: TopK SAEs and transcoders, streamed from the model, the recipe of Gao et al. (2024) as
EleutherAI's ``sparsify`` implements it.

One forward pass per batch (no gradients, stopped once the deepest requested hook has fired) feeds every requested
layer; no activation is ever written to disk, and every token is seen once (``max_tokens`` in all). Per dictionary:

* ``kind="sae"`` reads and reconstructs ``blocks.{layer}.{hook}`` (``hook`` default ``hook_resid_post``: the block's
  output, sparsify's ``layers.N``); ``pre = (x - b_dec) @ W_enc + b_enc``;
  ``kind="transcoder"`` reads the MLP's input ``blocks.{layer}.mlp.hook_in`` and predicts its output
  ``blocks.{layer}.mlp.hook_out`` (sparsify's ``layers.N.mlp``; ``hook_mlp_out`` on a ``HookedTransformer``), with
  ``skip`` a linear skip connection ``W_skip`` (initialised to zero);
* the activation keeps the ``k`` largest of ``relu(pre)``; the output is ``acts @ W_dec + b_dec (+ x @ W_skip.T)``;
* initialisation: ``W_enc`` as ``torch.nn.Linear`` (uniform, bound ``1/sqrt(d_in)``), ``b_enc`` zero; an SAE's
  ``W_dec`` is ``W_enc.T`` with unit rows, a transcoder's zero; on the first batch ``b_dec`` is set to the mean of
  the target (a transcoder's ``b_enc`` to ``-mean(x) @ W_enc``, centring its pre-activations);
* loss: ``FVU = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2`` plus ``auxk_alpha`` x the AuxK loss: the ``k_aux``
  largest (ReLU'd) pre-activations of the *dead* latents (no positive activation in the last ``dead_tokens`` tokens)
  reconstruct the detached residual ``y - y_hat`` through their decoder rows, without ``b_dec`` (scaled by
  ``min(n_dead / k_aux, 1)``). As in sparsify 1.3.3 the AuxK gradient reaches only the dead latents' decoder rows:
  its fused encoder drops the gradient of the pre-activations, so neither the encoder nor ``b_dec`` is moved by it
  (OpenAI's reference trainer also backpropagates it into the encoder; see docs/features.md for what that does to
  the dead fraction). Losses and gradients equal ``sparsify.SparseCoder.forward(x, y, dead_mask=...,
  total_variance=...)`` to float32 rounding (tests/test_features_training.py checks it);
* Adam (torch defaults) with ``lr = 2e-4 / sqrt(n_features / 2**14)`` by default; an SAE's decoder gradient loses
  its component along each row before the step and the rows are renormalised to unit norm after it (sparsify
  renormalises before the next forward pass instead: the same trajectory, but its last saved decoder is not
  renormalised); a transcoder's decoder is free, as in sparsify. One step equals sparsify's ``Trainer`` update with
  ``optimizer="adam"`` at a constant learning rate.

Deliberate differences from sparsify's ``Trainer`` defaults: the learning rate is constant (sparsify's Adam warms up
linearly over 1000 steps and decays linearly to 0 at the end, so a run shorter than 1000 steps never reaches the
nominal rate, and its very first step has lr 0); Adam, not sparsify's default ``signum`` (SignSGD with schedule-free
momentum, lr ``5e-3 / sqrt(n_features / 2**14)``); ``auxk_alpha`` 1/32 (Gao et al.) where sparsify's default is 0,
``dead_tokens`` a quarter of the run (at most 10M) where sparsify's is 10M, and the first position of every sequence
left out (``exclude_first=1``: the attention sink, where some blocks write vectors thousands of times larger than
elsewhere; sparsify trains on it). "Tokens since fired" is counted as in
sparsify (every token of the step added, reset for each latent that fired in the step), except that a latent fires
only with a *positive* activation: sparsify also counts a TopK pick of value 0 (a token with fewer than ``k``
positive pre-activations), which can keep a dead latent off the dead list.

A checkpoint (``out/checkpoint/state.pt``, written atomically every ``checkpoint_every`` steps) holds the weights, the
Adam states, the dead-latent counters and the position in the data: ``resume=True`` ends at the same weights as an
uninterrupted run. ``torchrun --nproc_per_node=N`` splits each batch's sequences over the processes and sums the
gradients (gloo on CPU, nccl on GPU): the loss is normalised by the global batch, so the result is the
single-process one.

Example:
    >>> tokens = torch.randint(3, model.cfg.d_vocab, (16, 16), generator=torch.Generator().manual_seed(0))
    >>> d = train_dictionary(model, tokens, layers=[1], n_features=64, k=4, seq_len=16, progress=False)
    >>> d.hook, d.activation, d.k, d.n_features
    ('blocks.1.hook_resid_post', 'topk', 4, 64)
    >>> bool(torch.allclose(d.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5))     # unit decoder rows
    True
    >>> d.meta["training"]["steps"], d.meta["training"]["train_tokens"]      # 16 x 16, position 0 left out
    (4, 240)
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mi_lenses.atomic import write_files_atomic
from mi_lenses.data.tokens import data_name, load_tokens
from mi_lenses.errors import LensInputError
from mi_lenses.features.dictionary import Dictionary, DictionarySet
from mi_lenses.features.formats import save as save_folder
from mi_lenses.features.reading import resolve_hook
from mi_lenses.lenses.tuned.train import TrainingError, _data_id, _Dist, _init_distributed
from mi_lenses.models.batch import check_context
from mi_lenses.features.processing import processing
from mi_lenses.models.identity import model_identity
from mi_lenses.models.view import ModelView
from mi_lenses.progress import bar as progress_bar

CHECKPOINT = "checkpoint"
STATE_FILE = "state.pt"
DictionaryKind = Literal["sae", "transcoder"]
KINDS = ("sae", "transcoder")
SAE_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
RESUME_KEYS = ("kind", "layers", "hook", "n_features", "k", "skip", "max_tokens", "seq_len", "exclude_first",
               "batch_size", "lr", "auxk_alpha", "k_aux", "dead_tokens", "seed")
RESUME_DEFAULTS = {"exclude_first": 0}  # checkpoints written before the option existed trained every position


def _opt(default: Any, help: str, **cli: Any) -> Any:
    return field(default=default, metadata={"help": help, **({"cli": cli} if cli else {})})


@dataclass
class DictionaryTrainConfig:
    """Dictionary-training options (the module docstring has the recipe); ``mi-lenses train-dictionary`` derives its
    flags from these fields. ``layers`` None trains the middle block; ``lr``, ``k_aux`` and ``dead_tokens`` None take
    the recipe's values: ``2e-4 / sqrt(n_features / 2**14)``, half the output width, and a quarter of the training
    tokens but at most 10 million (Gao et al.)."""

    kind: DictionaryKind = _opt("sae", "sae (reconstructs a hook) or transcoder (MLP input -> MLP output)",
                                choices=KINDS)
    layers: list[int] | None = _opt(None, "blocks to train a dictionary for, one forward pass feeding all "
                                          "(default: the middle block)", nargs="+", type=int)
    hook: str | None = _opt(None, "the hook an SAE reads in each block (default hook_resid_post)",
                            choices=SAE_HOOKS)
    n_features: int = _opt(4096, "features (latents) per dictionary")
    k: int = _opt(32, "active features per token (TopK)")
    skip: bool = _opt(False, "transcoder: add a linear skip connection W_skip")
    max_tokens: int = _opt(8192, "train on this many tokens (each seen once)")
    seq_len: int = _opt(128, "tokens per training sequence")
    exclude_first: int = _opt(1, "leave the first N positions of every sequence out (the attention sink: the BOS, or "
                                 "the first token without one, where some blocks write activations thousands of "
                                 "times larger than elsewhere; 0 keeps them, as sparsify does)")
    batch_size: int = _opt(4, "sequences per forward pass and optimizer step, over all processes")
    lr: float | None = _opt(None, "Adam learning rate (default 2e-4 / sqrt(n_features / 2^14))", type=float)
    auxk_alpha: float = _opt(1 / 32, "weight of the AuxK loss on dead features (0 = off)")
    k_aux: int | None = _opt(None, "dead features in the AuxK loss (default: half the output width)", type=int)
    dead_tokens: int | None = _opt(None, "a feature silent this many tokens is dead (default: a quarter of the "
                                         "training tokens, at most 10M)", type=int)
    checkpoint_every: int = _opt(10, "checkpoint every N steps and at the end, into OUT/checkpoint (0 = never; "
                                      "only with an output folder)")
    seed: int = _opt(0, "initialisation seed")
    progress: bool = field(default=True, metadata={"cli": False})

    def validate(self, world: int = 1) -> None:
        """Check the options (a ``LensInputError`` naming the bad one)."""
        if self.kind not in KINDS:
            raise LensInputError(f"kind must be one of {KINDS}, got {self.kind!r}.")
        for name in ("n_features", "k", "max_tokens", "seq_len", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LensInputError(f"{name} must be a positive int, got {v!r}.")
        if self.k > self.n_features:
            raise LensInputError(f"k ({self.k}) cannot exceed n_features ({self.n_features}).")
        if not isinstance(self.exclude_first, int) or not 0 <= self.exclude_first < self.seq_len:
            raise LensInputError(f"exclude_first must be an int in [0, seq_len={self.seq_len}), got "
                                 f"{self.exclude_first!r}.")
        if self.batch_size % world:
            raise LensInputError(f"batch_size ({self.batch_size}) does not split over {world} processes.")
        if self.kind == "transcoder" and self.hook is not None:
            raise LensInputError("a transcoder reads the MLP's input and writes its output: leave hook unset.")
        if self.kind == "sae" and self.skip:
            raise LensInputError("skip is a transcoder's skip connection: use kind='transcoder'.")
        if self.hook is not None and self.hook not in SAE_HOOKS:
            raise LensInputError(f"hook must be one of {SAE_HOOKS}, got {self.hook!r}.")
        if self.lr is not None and not self.lr > 0:
            raise LensInputError(f"lr must be > 0, got {self.lr!r}.")
        if not self.auxk_alpha >= 0:
            raise LensInputError(f"auxk_alpha must be >= 0, got {self.auxk_alpha!r}.")
        for name in ("k_aux", "dead_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise LensInputError(f"{name} must be a positive int or None, got {v!r}.")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise LensInputError(f"checkpoint_every must be an int >= 0, got {self.checkpoint_every!r}.")

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.n_features / 2 ** 14)


# ---------------------------------------------------------------------------------------------- one dictionary
class _Coder:
    """One dictionary under training: its parameters (the :class:`Dictionary` layout), Adam, dead-latent counters."""

    def __init__(self, layer: int, hook: str, hook_out: str | None, d_in: int, d_out: int, cfg: DictionaryTrainConfig):
        self.layer, self.hook, self.hook_out, self.cfg = layer, hook, hook_out, cfg
        self.sae = hook_out is None
        n = cfg.n_features
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + layer)
        bound = 1.0 / math.sqrt(d_in)
        W = torch.rand(n, d_in, generator=g) * (2 * bound) - bound  # nn.Linear's init (kaiming uniform, a=sqrt(5))
        self.W_enc = W.T.clone().requires_grad_()
        self.b_enc = torch.zeros(n, requires_grad=True)
        dec = W / (W.norm(dim=-1, keepdim=True) + torch.finfo(W.dtype).eps) if self.sae else torch.zeros(n, d_out)
        self.W_dec = dec.requires_grad_()
        self.b_dec = torch.zeros(d_out, requires_grad=True)
        self.W_skip = torch.zeros(d_out, d_in, requires_grad=True) if cfg.skip else None
        self.opt = torch.optim.Adam(self.params, lr=cfg.learning_rate())
        self.since_fired = torch.zeros(n, dtype=torch.long)
        self.k_aux = cfg.k_aux or max(d_out // 2, 1)

    @property
    def params(self) -> list[Tensor]:
        return [p for p in (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.W_skip) if p is not None]

    @property
    def names(self) -> list[str]:
        return ["W_enc", "b_enc", "W_dec", "b_dec"] + (["W_skip"] if self.W_skip is not None else [])

    @torch.no_grad()
    def initialise(self, x: Tensor, y: Tensor, dist: _Dist, n_global: int) -> None:
        """First batch: ``b_dec`` = the target's mean; a transcoder's ``b_enc`` centres its pre-activations."""
        self.b_dec.copy_(dist.all_reduce(y.sum(0).double()).div(n_global).float())
        if not self.sae:
            mean_in = dist.all_reduce(x.sum(0).double()).div(n_global).float()
            self.b_enc.copy_(-mean_in @ self.W_enc)

    def losses(self, x: Tensor, y: Tensor, total_var: Tensor, dead: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The FVU and AuxK losses of one (share of a) batch, as sparsify's ``SparseCoder.forward(x, y,
        dead_mask=dead, total_variance=total_var)`` computes them, and the TopK ``(values, indices)``.

        As in sparsify the AuxK loss trains only the decoder: its ``k_aux`` pre-activations are taken detached
        (sparsify's fused encoder drops the gradient of its pre-activations), so the encoder of a dead latent is
        not pushed by the AuxK loss; the target ``e`` is detached too."""
        pre = (((x - self.b_dec) if self.sae else x) @ self.W_enc + self.b_enc).relu()
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        recon = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum") + self.b_dec
        if self.W_skip is not None:
            recon = recon + x @ self.W_skip.T
        e = y - recon
        fvu = e.pow(2).sum() / total_var
        n_dead = int(dead.sum())
        aux = fvu.new_zeros(())
        if n_dead > 0:
            k_aux = min(self.k_aux, n_dead)
            scale = min(n_dead / self.k_aux, 1.0)
            av, ai = torch.where(dead, pre.detach(), -torch.inf).topk(k_aux, dim=-1, sorted=False)
            e_hat = F.embedding_bag(ai, self.W_dec, per_sample_weights=av, mode="sum")
            aux = scale * (e_hat - e.detach()).pow(2).sum() / total_var
        return fvu, aux, vals, idx

    def step(self, x: Tensor, y: Tensor, dist: _Dist, n_global: int, dead_after: int) -> dict[str, float]:
        """One Adam step on this process's share ``x``, ``y`` of the global batch of ``n_global`` tokens."""
        cfg = self.cfg
        with torch.no_grad():
            moments = dist.all_reduce(torch.stack([y.double().sum(0), y.double().pow(2).sum(0)]))
            total_var = (moments[1] - moments[0].pow(2) / n_global).sum().clamp_min(1e-12).float()
        dead = self.since_fired > dead_after
        n_dead = int(dead.sum())
        fvu, aux, vals, idx = self.losses(x, y, total_var, dead if cfg.auxk_alpha > 0 else torch.zeros_like(dead))
        for p in self.params:
            p.grad = None
        (fvu + cfg.auxk_alpha * aux).backward()
        fired = torch.zeros(cfg.n_features)
        fired[idx[vals > 0].flatten()] = 1.0
        stats = dist.all_reduce(torch.stack([fvu.detach(), aux.detach()]).double())
        dist.all_reduce(fired)
        for p in self.params:
            dist.all_reduce(p.grad)
        if not (torch.isfinite(stats).all() and all(torch.isfinite(p.grad).all() for p in self.params)):
            return {"finite": False}
        with torch.no_grad():
            if self.sae:  # remove the gradient along each decoder row (the rows stay unit norm)
                self.W_dec.grad -= (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True) * self.W_dec
            self.opt.step()
            if self.sae:
                self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True) + torch.finfo(self.W_dec.dtype).eps
            self.since_fired += n_global
            self.since_fired[fired > 0] = 0
        if not all(torch.isfinite(p).all() for p in self.params):
            return {"finite": False}
        return {"fvu": float(stats[0]), "auxk": float(stats[1]), "dead": n_dead / cfg.n_features}

    def dictionary(self, meta: dict[str, Any]) -> Dictionary:
        return Dictionary(self.W_enc.detach().clone(), self.b_enc.detach().clone(), self.W_dec.detach().clone(),
                          self.b_dec.detach().clone(), hook=self.hook, hook_out=self.hook_out, activation="topk",
                          k=self.cfg.k, W_skip=None if self.W_skip is None else self.W_skip.detach().clone(),
                          apply_b_dec_to_input=self.sae, meta=meta)

    def state(self) -> dict[str, Any]:
        return {"params": {n: p.detach().clone() for n, p in zip(self.names, self.params)},
                "optimizer": self.opt.state_dict(), "since_fired": self.since_fired.clone()}

    def load(self, state: dict[str, Any], where: Path) -> None:
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                t = state["params"].get(n)
                if not isinstance(t, Tensor) or t.shape != p.shape or not torch.isfinite(t).all():
                    raise LensInputError(f"{where}: {n} of layer {self.layer} does not fit (or is not finite): the "
                                         "checkpoint belongs to another run; delete the folder to start over.")
                p.copy_(t)
        self.opt.load_state_dict(state["optimizer"])
        self.since_fired.copy_(state["since_fired"])


# ---------------------------------------------------------------------------------------------- hooks
class _Enough(Exception):
    """Raised by the last capture hook: the rest of the forward pass is not needed."""


def _hooks(view: ModelView, cfg: DictionaryTrainConfig) -> tuple[list[int], list[tuple[str, str | None]]]:
    """The layers and each one's ``(hook, hook_out)`` as stored in the dictionary (TransformerLens names)."""
    L = view.n_layers
    layers = cfg.layers if cfg.layers is not None else [L // 2]
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers:
        raise LensInputError("layers is empty: name at least one block.")
    out = []
    for layer in layers:
        if not isinstance(layer, int) or not -L <= layer < L:
            raise LensInputError(f"layer {layer!r} is out of range for {view.name} ({L} blocks).")
        out.append(layer % L)
    if len(set(out)) != len(out):
        raise LensInputError(f"layers {layers} name a block twice.")
    if cfg.kind == "sae":
        pairs = [(f"blocks.{layer}.{cfg.hook or 'hook_resid_post'}", None) for layer in out]
    else:
        pairs = [(f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.mlp.hook_out") for layer in out]
    for h, h_out in pairs:
        resolve_hook(view, h, "input hook")
        if h_out is not None:
            resolve_hook(view, h_out, "output hook")
    return out, pairs


@torch.no_grad()
def _activations(view: ModelView, tokens: Tensor, names: list[str], exclude_first: int = 0) -> dict[str, Tensor]:
    """One forward pass of ``tokens``, stopped once every hook in ``names`` has fired: ``{name: [n_tok, d]}``, the
    first ``exclude_first`` positions of each sequence left out."""
    got: dict[str, Tensor] = {}

    def keeper(name: str) -> Any:
        def keep(act: Tensor, hook: Any) -> Tensor:
            t = act.flatten(-2) if act.ndim == 4 else act  # per-head hooks: head-major
            got[name] = t[:, exclude_first:].reshape(-1, t.shape[-1])
            if len(got) == len(names):
                raise _Enough
            return act
        return keep

    try:
        with view.model.hooks(fwd_hooks=[(n, keeper(n)) for n in names]):
            view.model(tokens.to(view.device), return_type=None)
    except _Enough:
        pass
    missing = [n for n in names if n not in got]
    if missing:
        raise LensInputError(f"the hooks {missing} never fired on {view.name}: they cannot be trained on.")
    return {n: got[n].float().cpu() for n in names}


# ---------------------------------------------------------------------------------------------- the trainer
def train_dictionary(
    model: Any,
    data: Any,
    out: str | os.PathLike | None = None,
    config: DictionaryTrainConfig | None = None,
    *,
    resume: bool = False,
    **overrides: Any,
) -> Dictionary | DictionarySet:
    """Train TopK SAEs or transcoders on ``model``'s activations over ``data``, one per requested layer (the module
    docstring has the recipe).

    Args:
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``).
        data: the corpus: a text file or folder, a cached ``datasets`` name, ``"model[:N]"`` (see
            :func:`~mi_lenses.data.load_tokens`), or token ids ``[n_seq, seq_len]``.
        out: folder to save to, in our format with the model's identity (refused on another model): the dictionary
            itself for one layer, ``out/layer_{i}`` per layer for several; checkpoints go to ``out/checkpoint``.
        config: a :class:`DictionaryTrainConfig`; keyword ``overrides`` replace its fields (``kind="transcoder"``,
            ``layers=[12]``, ``n_features=1024``, ``k=16``, ``max_tokens=8192``, ...); any other keyword is an error.
        resume: continue from ``out/checkpoint`` (same data and options): ends at the same weights as an
            uninterrupted run.

    Returns:
        the :class:`~mi_lenses.features.dictionary.Dictionary` (one layer) or a
        :class:`~mi_lenses.features.dictionary.DictionarySet` (one per layer, in layer order); ``meta["training"]``
        records the options, the data and the last step's FVU.

    Raises ``TrainingError`` if the loss becomes non-finite (the last good checkpoint is kept, nothing is saved).
    """
    cfg = _config(config, overrides)
    view = ModelView(model)
    dist = _init_distributed(view.device)
    cfg.validate(dist.world)
    layers, pairs = _hooks(view, cfg)
    tokens, steps = _tokens(view, data, cfg)
    if resume and out is None:
        raise LensInputError("resume needs the output folder (out=...) that holds the checkpoint.")
    plan = _prepare(view, cfg, layers, pairs, tokens, steps)
    folder = None if out is None else Path(out)
    ckpt = None if folder is None else folder / CHECKPOINT
    start, history, last_good = _start(ckpt, plan, cfg, dist, resume)
    t0 = time.perf_counter()
    _train(view, tokens, plan, cfg, dist, ckpt, start, history, last_good)
    train_s = time.perf_counter() - t0
    return _assemble(view, data, plan, cfg, dist, history, train_s, folder)


# ---------------------------------------------------------------------------------------------- prepare
@dataclass
class _Plan:
    """Everything decided before the first step."""

    layers: list[int]
    coders: list[_Coder]  # one per layer, in layer order
    run_names: list[tuple[str, str]]  # each coder's (input, target) hook as the model names them
    fetch: list[str]  # the hooks one forward pass captures
    steps: int
    n_global: int  # tokens per step, over all processes
    dead_after: int  # silent tokens after which a latent is dead
    data_id: str


def _config(config: DictionaryTrainConfig | None, overrides: dict[str, Any]) -> DictionaryTrainConfig:
    """``config`` (or the defaults) with the keyword ``overrides``, refusing a keyword that is no field."""
    names = [f.name for f in dataclasses.fields(DictionaryTrainConfig)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise LensInputError(f"train_dictionary got unknown options {unknown}: pass DictionaryTrainConfig fields "
                             f"({', '.join(names)}).")
    return dataclasses.replace(config or DictionaryTrainConfig(), **overrides)


def _tokens(view: ModelView, data: Any, cfg: DictionaryTrainConfig) -> tuple[Tensor, int]:
    """The training sequences ``[n_seq, seq_len]`` on the CPU (at most ``max_tokens``) and the number of steps."""
    check_context(view, cfg.seq_len, "each training sequence", fix="Pass a smaller seq_len (--seq-len).")
    tokens = data if isinstance(data, Tensor) else load_tokens(data, view, cfg.seq_len, max_tokens=cfg.max_tokens,
                                                               seed=cfg.seed)
    if tokens.ndim != 2 or tokens.shape[1] != cfg.seq_len:
        raise LensInputError(f"token data must be [n_seq, seq_len={cfg.seq_len}], got {tuple(tokens.shape)}.")
    tokens = tokens.cpu()[: cfg.max_tokens // cfg.seq_len]
    steps = tokens.shape[0] // cfg.batch_size
    if steps == 0:
        raise LensInputError(f"the data holds {tokens.shape[0]} sequences of {cfg.seq_len} tokens (max_tokens "
                             f"{cfg.max_tokens}), fewer than one batch of {cfg.batch_size}: pass more text, a larger "
                             "max_tokens or a smaller batch_size.")
    return tokens, steps


def _prepare(view: ModelView, cfg: DictionaryTrainConfig, layers: list[int], pairs: list[tuple[str, str | None]],
             tokens: Tensor, steps: int) -> _Plan:
    """The hooks to capture, one freshly initialised coder per layer (widths from a probe pass) and the run's
    constants."""
    n_global = cfg.batch_size * (cfg.seq_len - cfg.exclude_first)
    dead_after = cfg.dead_tokens or min(10_000_000, max(steps * n_global // 4, 1))
    run_names = [(resolve_hook(view, h, "input hook"), resolve_hook(view, h_out or h, "output hook"))
                 for h, h_out in pairs]
    fetch = list(dict.fromkeys(n for pair in run_names for n in pair))
    probe = _activations(view, tokens[:1], fetch, cfg.exclude_first)
    coders = [_Coder(layer, h, h_out, probe[a].shape[-1], probe[b].shape[-1], cfg)
              for layer, (h, h_out), (a, b) in zip(layers, pairs, run_names)]
    return _Plan(layers, coders, run_names, fetch, steps, n_global, dead_after,
                 _data_id(tokens[: steps * cfg.batch_size]))


def _start(ckpt: Path | None, plan: _Plan, cfg: DictionaryTrainConfig, dist: _Dist, resume: bool
           ) -> tuple[int, list, int | None]:
    """The step to start from, the history so far and the step the newest checkpoint holds: 0, none and None, or
    the checkpoint's with ``resume`` (temp files a killed save left are removed first)."""
    if ckpt is not None and ckpt.is_dir() and dist.primary:
        for stale in ckpt.glob(f".{STATE_FILE}.*"):
            stale.unlink(missing_ok=True)
    if resume and ckpt is not None and (ckpt / STATE_FILE).is_file():
        start, history = _load_checkpoint(ckpt, plan.coders, cfg, plan.data_id)
        return start, history, start
    return 0, [], None


# ---------------------------------------------------------------------------------------------- forward and update
def _train(view: ModelView, tokens: Tensor, plan: _Plan, cfg: DictionaryTrainConfig, dist: _Dist, ckpt: Path | None,
           start: int, history: list, last_good: int | None) -> None:
    """Steps ``start`` .. the last, appending one record per step to ``history`` and checkpointing every
    ``checkpoint_every`` steps and at the end (the primary process writes; ``last_good``: the step the newest
    checkpoint holds)."""
    bar = progress_bar(plan.steps, "dictionary", initial=start, leave=True) \
        if cfg.progress and dist.primary and plan.steps > start else None
    try:
        for step in range(start, plan.steps):
            rec = _step(view, tokens, plan, cfg, dist, step, ckpt, last_good)
            history.append(rec)
            if bar is not None:
                bar.set_postfix(fvu=f"{sum(rec[c.layer]['fvu'] for c in plan.coders) / len(plan.coders):.3f}")
                bar.update(1)
            if ckpt is not None and cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0
                                                              or step + 1 == plan.steps):
                if dist.primary:
                    _save_checkpoint(ckpt, plan.coders, cfg, step + 1, plan.data_id, history)
                last_good = step + 1
    finally:
        if bar is not None:
            bar.close()


def _step(view: ModelView, tokens: Tensor, plan: _Plan, cfg: DictionaryTrainConfig, dist: _Dist, step: int,
          ckpt: Path | None, last_good: int | None) -> dict[Any, Any]:
    """One forward pass over this process's share of batch ``step`` and one update of every coder; its record
    (``step`` and per layer the coder's statistics). A non-finite loss raises ``TrainingError``."""
    rows = torch.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size)[dist.rank:: dist.world]
    acts = _activations(view, tokens[rows], plan.fetch, cfg.exclude_first)
    rec: dict[Any, Any] = {"step": step + 1}
    for c, (a, b) in zip(plan.coders, plan.run_names):
        if step == 0:
            c.initialise(acts[a], acts[b], dist, plan.n_global)
        s = c.step(acts[a], acts[b], dist, plan.n_global, plan.dead_after)
        if not s.get("finite", True):
            kept = (f"the last good checkpoint (after step {last_good}) is kept in {ckpt}"
                    if last_good is not None else "no checkpoint was written")
            raise TrainingError(f"the loss became non-finite in step {step + 1} (layer {c.layer}); {kept}; "
                                "nothing else was saved. Lower the learning rate (--lr) or check the data.")
        rec[c.layer] = s
    return rec


# ---------------------------------------------------------------------------------------------- assemble
def _assemble(view: ModelView, data: Any, plan: _Plan, cfg: DictionaryTrainConfig, dist: _Dist, history: list,
              train_s: float, folder: Path | None) -> Dictionary | DictionarySet:
    """The trained dictionaries with their ``meta["training"]`` record, saved into ``folder`` by the primary
    process."""
    info = {**{k: v for k, v in asdict(cfg).items() if k != "progress"}, "layers": plan.layers,
            "lr": cfg.learning_rate(), "dead_tokens": plan.dead_after, "steps": plan.steps,
            "train_tokens": plan.steps * plan.n_global, "world_size": dist.world,
            "data": "tokens" if isinstance(data, Tensor) else data_name(data), "data_sha": plan.data_id,
            "train_s": round(train_s, 3)}
    dicts, done = [], processing(view)  # how the activations were read (refused under other processing)
    for c in plan.coders:
        last = history[-1][c.layer] if history else {}
        dicts.append(c.dictionary({"training": {**info, "layer": c.layer, "k_aux": c.k_aux,
                                                "final_fvu": last.get("fvu"), "final_dead": last.get("dead")},
                                   "processing": done}))
    if folder is not None and dist.primary:
        identity = model_identity(view)
        for c, d in zip(plan.coders, dicts):
            save_folder(d, folder if len(dicts) == 1 else folder / f"layer_{c.layer}", meta=identity)
    return dicts[0] if len(dicts) == 1 else DictionarySet(dicts, meta={"training": info, "processing": done})


# ---------------------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(folder: Path, coders: list[_Coder], cfg: DictionaryTrainConfig, step: int, data_id: str,
                     history: list) -> None:
    state = {"step": step, "data_id": data_id, "config": {k: getattr(cfg, k) for k in RESUME_KEYS},
             "coders": {str(c.layer): c.state() for c in coders}, "history": history}
    write_files_atomic(folder, [(STATE_FILE, lambda tmp: torch.save(state, tmp))])


def _load_checkpoint(folder: Path, coders: list[_Coder], cfg: DictionaryTrainConfig, data_id: str) -> tuple[int, list]:
    path = folder / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError (a payload), EOFError (truncated), ...
        raise LensInputError(f"cannot read the checkpoint {path} ({type(err).__name__}): it is corrupt, truncated or "
                             f"carries objects other than tensors (nothing was executed). Delete {folder} to start "
                             "over.") from err
    if not isinstance(state, dict) or not {"step", "coders", "config"} <= set(state):
        raise LensInputError(f"{path} is not a dictionary-training checkpoint: delete {folder} to start over.")
    for key in RESUME_KEYS:
        if state["config"].get(key, RESUME_DEFAULTS.get(key)) != getattr(cfg, key):
            raise LensInputError(f"cannot resume: the checkpoint was made with "
                                 f"{key}={state['config'].get(key, RESUME_DEFAULTS.get(key))!r}, "
                                 f"now {getattr(cfg, key)!r}. Resume with the same options (or a new output folder).")
    if state.get("data_id") != data_id:
        raise LensInputError("cannot resume: the data differs from the data the checkpoint was trained on.")
    for c in coders:
        c.load(state["coders"][str(c.layer)], path)
    return int(state["step"]), list(state.get("history", []))
