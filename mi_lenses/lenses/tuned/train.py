"""Training a tuned lens: KL(final || lens) at the same position, summed over layers, the paper's SGD recipe.

Per step the model runs once, without gradients, with hooks collecting every block input and the final residual;
the final distribution is decoded once per micro-batch and shared by all layers. Each layer's loss gradient with
respect to its logits is formed in closed form (``softmax(lens) - softmax(final)``), so the only large operations per
layer are the two unavoidable ``tokens x d_model x vocab`` matmuls (forward and backward). A closed-form least-squares
warm start (regress each layer's residual onto the final residual) gets most of the way before any KL step.

Distributed: launch the same command with ``torchrun --nproc_per_node=N``; every rank takes its share of each
step's global batch and the gradients are summed with ``all_reduce`` (gloo on CPU, nccl on GPU), so the result equals
single-process training on the same global batch.

Example (the embedded model and the text shipped with mi_lenses; minutes on a CPU)::

    lens = train_lens(model, "corpus.txt", out="smol_lens", config=TrainConfig(steps=4, warm_start_tokens=16384))

:func:`train_lens` has a runnable example on a tiny model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor

from mi_lenses.atomic import write_files_atomic
from mi_lenses.data.tokens import data_name, load_tokens
from mi_lenses.errors import LensInputError, MiLensesError
from mi_lenses.lenses.affine import save_lens
from mi_lenses.lenses.tuned.lens import TunedLens
from mi_lenses.models.batch import check_context
from mi_lenses.models.view import ModelView
from mi_lenses.progress import bar as progress_bar
from mi_lenses.results import LN2

CHECKPOINT = "checkpoint"
STATE_FILE = "state.pt"


class TrainingError(MiLensesError, RuntimeError):
    """Training cannot go on (e.g. the loss became non-finite); the last good checkpoint is kept."""


def _opt(default: Any, help: str) -> Any:
    """A training option: its default and the help text the command line shows (``mi-lenses tuned-lens train``
    derives its flags from these fields, so the two cannot drift)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Training options. The optimizer follows the ``tuned-lens`` paper code (SGD, Nesterov momentum 0.9, effective
    lr 1.0, weight decay 1e-3, linear decay to 0, gradient-norm clip 1.0). The budget does not: the paper's
    250 steps x 2^18 tokens (~2e17 FLOP in SmolLM2's unembedding alone) is out of reach on a CPU, so the defaults are
    sized for minutes there (84 s for SmolLM2 on 2 AVX-512 cores, measured): a least-squares warm start on 16384 tokens,
    then 4 KL steps of 512 tokens. On a GPU, ``steps=250, tokens_per_step=2**18`` reproduces the paper's budget.

    ``micro_batch`` sequences run per forward pass; a step accumulates gradients over
    ``tokens_per_step / (seq_len * micro_batch * world_size)`` micro-batches. ``bf16`` runs the unembedding matmuls
    in bfloat16: only for hardware with fast bf16 (measured: 2.1x the float32 tokens/s on an AVX512_BF16 CPU, 20-30x
    *slower* on an AVX2 one; error ~0.05 bits of KL, 1.2% relative on the gradient).
    """

    steps: int = _opt(4, "KL steps (optimizer updates)")
    tokens_per_step: int = _opt(512, "tokens per optimizer step, over all processes")
    seq_len: int = _opt(128, "tokens per training sequence")
    micro_batch: int = _opt(4, "sequences per forward pass; gradients accumulate over the rest")
    lr: float = _opt(1.0, "effective learning rate (SGD lr x (1 - momentum))")
    momentum: float = _opt(0.9, "Nesterov momentum")
    weight_decay: float = _opt(1e-3, "weight decay")
    clip: float = _opt(1.0, "gradient-norm clip")
    warm_start_tokens: int = _opt(16384, "tokens for the least-squares warm start; 0 = start at the logit lens")
    ridge: float = _opt(1e-4, "ridge of the warm start, relative to the mean diagonal of the normal equations")
    bf16: bool = _opt(False, "bf16 unembedding matmuls: only for hardware with fast bf16")
    checkpoint_every: int = _opt(10, "checkpoint every N steps and at the end, into OUT/checkpoint (0 = never; "
                                      "only with an output folder)")
    seed: int = _opt(0, "data order and sampling seed")
    progress: bool = field(default=True, metadata={"cli": False})

    def validate(self, world: int = 1) -> int:
        """Check the options; return the number of sequences per step."""
        for name in ("tokens_per_step", "seq_len", "micro_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise LensInputError(f"{name} must be a positive int, got {v!r}.")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise LensInputError(f"steps must be an int >= 0, got {self.steps!r}.")
        seqs, rem = divmod(self.tokens_per_step, self.seq_len)
        if rem or seqs == 0:
            raise LensInputError(
                f"tokens_per_step ({self.tokens_per_step}) must be a positive multiple of seq_len ({self.seq_len})."
            )
        if seqs % world:
            raise LensInputError(f"{seqs} sequences per step do not split over {world} processes: adjust the sizes.")
        if not (self.lr > 0 and 0 <= self.momentum < 1 and self.weight_decay >= 0 and self.clip > 0):
            raise LensInputError("need lr > 0, 0 <= momentum < 1, weight_decay >= 0 and clip > 0.")
        return seqs


# ---------------------------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def primary(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over all processes, in place (through the GPU when the backend is nccl)."""
        if self.world > 1:
            if dist.get_backend() == "nccl" and t.device.type != "cuda":
                tmp = t.to(f"cuda:{torch.cuda.current_device()}")
                dist.all_reduce(tmp)
                t.copy_(tmp.cpu())
            else:
                dist.all_reduce(t)
        return t


def _init_distributed(device: torch.device) -> _Dist:
    """Join the process group that ``torchrun`` describes in the environment (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Dist()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size())


# ---------------------------------------------------------------------------------------------- the objective
@dataclass
class _Target:
    """The final distribution of a micro-batch, what every layer's KL is measured against: probabilities ``p``,
    ``sum p log p``, and (fused path) ``p @ W.T`` and ``p . b``, with which ``p . z = xn . (p @ W.T) + p . b`` for any
    layer's logits ``z = xn @ W + b`` without computing them."""

    p: Float[Tensor, "n vocab"]
    neg_h: Float[Tensor, " n"]
    pW: Float[Tensor, "n d_model"] | None = None
    pb: Float[Tensor, " n"] | None = None


class _Objective:
    """Hidden states of a batch and the KL objective of every layer against the final distribution, decoded by the
    model's :class:`~mi_lenses.models.decode.Decoder`.

    On the CPU in float32 without a logit soft-cap a layer's KL and gradient come from one fused pass,
    :meth:`Decoder.lse_grad` (``KL = sum p log p - p . z + lse``, ``dKL/dxn = softmax(z) @ W.T - p @ W.T``);
    otherwise (GPUs, bf16 matmuls, soft-capped models) from the materialised logits, a block of rows at a time
    (``block_bytes``: see :meth:`Decoder.row_blocks`).
    """

    block_bytes: int | None = None

    def __init__(self, view: ModelView, dtype: torch.dtype = torch.float32):
        self.view = view
        self.dec = view.decoder
        # the lens rows in tuned-lens order (embed = resid_pre of block 0, ..., input of block L-1), then the final row
        self.names = [r.hook_name for r in view.residual_rows("resid_pre")]
        self.dtype = dtype
        self.fused = dtype == torch.float32 and self.dec.fused_lse_grad(view.device)

    @torch.no_grad()
    def hidden(self, tokens: Tensor) -> list[Tensor]:
        """``[h_0, ..., h_{L-1}, h_final]``, each ``[n_tokens, d_model]`` float32 (one forward pass, no grad)."""
        _, cache = self.view.run_with_cache(self.view.batch(tokens.to(self.view.device)), self.names)
        return [cache[n].reshape(-1, cache[n].shape[-1]).float() for n in self.names]

    @torch.no_grad()
    def final(self, h_final: Tensor) -> _Target:
        """The final distribution of each token."""
        logp = torch.log_softmax(self.dec.logits(h_final, dtype=self.dtype), -1)
        p = logp.exp()
        target = _Target(p, torch.linalg.vecdot(p, logp))
        if self.fused:
            target.pW = p @ self.dec.W.T
            target.pb = torch.zeros(len(p), device=p.device) if self.dec.b is None else p @ self.dec.b
        return target

    def layer_step(self, lens: TunedLens, i: int, h: Tensor, target: _Target, scale: float) -> float:
        """Accumulate ``scale * sum_t KL(p_t || q_t)`` gradients into ``lens`` for layer ``i``; return the summed KL."""
        x = self.dec.normalize(lens.translate(h, i))  # graph only through the tiny translator
        with torch.no_grad():
            xd, p = x.detach(), target.p
            if self.fused:
                lse, grad = self.dec.lse_grad(xd)
                kl = (target.neg_h - torch.linalg.vecdot(xd, target.pW) - target.pb + lse).sum()
                dx = grad.sub_(target.pW).mul_(scale)
            else:  # one matmul, then per block of rows in cache: lse, p . z and dKL/dz = (softmax(z) - p) * cap'
                dz = torch.empty(p.shape, dtype=self.dtype, device=p.device)
                kl = torch.zeros((), dtype=torch.float64, device=p.device)
                for rows, z in self.dec.row_blocks(xd, self.dtype, self.block_bytes):
                    lse = torch.logsumexp(z, -1)
                    kl += (target.neg_h[rows] - torch.linalg.vecdot(p[rows], z) + lse).sum()
                    g = self.dec.cap_grad(z)
                    q = z.sub_(lse[:, None]).exp_().sub_(p[rows])
                    dz[rows] = q if g is None else q.mul_(g)
                dx = self.dec.project(dz, self.dtype).mul_(scale)
        x.backward(dx)
        return float(kl)


# ---------------------------------------------------------------------------------------------- warm start
@torch.no_grad()
def warm_start(lens: TunedLens, obj: _Objective, batches: list[Tensor], ridge: float, dist: _Dist) -> None:
    """Closed-form least squares per layer: ``A, b = argmin sum_t w_t ||h_t + A h_t + b - f_t||^2`` with ``f`` the
    final residual and ``w_t = 1 / mean(f_t^2)`` (errors measured relative to the scale the final norm removes)."""
    L, d = lens.n_layers, lens.d_model
    xtx = torch.zeros(L, d + 1, d + 1, dtype=torch.float64)
    xty = torch.zeros(L, d + 1, d, dtype=torch.float64)
    for tokens in batches:
        hs = obj.hidden(tokens)
        f = hs[-1].double().cpu()
        w = 1.0 / f.pow(2).mean(-1, keepdim=True).clamp_min(1e-12)
        for l in range(L):
            x = torch.cat([hs[l].double().cpu(), torch.ones(len(f), 1, dtype=torch.float64)], 1)
            xw = x * w
            xtx[l] += xw.T @ x
            xty[l] += xw.T @ f
    dist.all_reduce(xtx)
    dist.all_reduce(xty)
    eye = torch.eye(d + 1, dtype=torch.float64)
    for l in range(L):
        reg = ridge * torch.diagonal(xtx[l]).mean() * eye
        m = torch.linalg.solve(xtx[l] + reg, xty[l] - xtx[l][:, :d])  # target f - h
        lens.weight[l].copy_(m[:d].T.float())
        lens.bias[l].copy_(m[d].float())


# ---------------------------------------------------------------------------------------------- the trainer
def _order(n_seq: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n_seq, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _step_sequences(n_seq: int, seqs_per_step: int, step: int, seed: int) -> Tensor:
    """Indices of the sequences of global step ``step`` (a fresh permutation every epoch)."""
    per_epoch = n_seq // seqs_per_step
    if per_epoch == 0:
        raise LensInputError(
            f"the data holds {n_seq} sequences, fewer than one step's {seqs_per_step}: pass more text or fewer "
            "--tokens-per-step."
        )
    epoch, k = divmod(step, per_epoch)
    return _order(n_seq, seed, epoch)[k * seqs_per_step : (k + 1) * seqs_per_step]


def _data_id(tokens: Tensor) -> str:
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]


def train_lens(
    model: Any,
    data: Any,
    out: str | os.PathLike | None = None,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    lens: TunedLens | None = None,
    **overrides: Any,
) -> TunedLens:
    """Train a tuned lens for ``model`` on ``data`` (a source for :func:`load_tokens`, or tokens ``[n_seq, seq]``).

    Args:
        out: folder to save the trained lens to (own format); checkpoints go to ``out/checkpoint``.
        config: a :class:`TrainConfig`; keyword ``overrides`` replace single fields of it (``steps=10``); any
            other keyword is an error naming the fields.
        resume: continue from ``out/checkpoint`` (same data and options); ends at the same lens as an
            uninterrupted run.
        lens: start from this lens (no warm start) instead of a fresh, warm-started one.

    Raises ``TrainingError`` if the loss becomes non-finite (the last good checkpoint is kept, nothing is saved).

    >>> tokens = torch.randint(3, model.cfg.d_vocab, (8, 16))
    >>> lens = train_lens(model, tokens, steps=2, tokens_per_step=64, seq_len=16, warm_start_tokens=64,
    ...                   progress=False)
    >>> lens.meta["training"]["steps"]
    2
    >>> ev = mi_lenses.evaluate_lens(lens, model, tokens)     # on its training tokens, per layer
    >>> sum(ev.kl_bits["tuned lens"]) < sum(ev.kl_bits["logit lens"])   # trained: closer to the model's output
    True
    """
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise LensInputError(f"train_lens got unknown options {unknown}: pass TrainConfig fields "
                             f"({', '.join(f.name for f in dataclasses.fields(TrainConfig))}).")
    trainer = _Trainer.prepare(model, data, out, dataclasses.replace(config or TrainConfig(), **overrides), resume,
                               lens)
    try:
        trainer.start(resume)
        trainer.run()
        return trainer.finish(data)
    finally:
        trainer.obj.dec.release()  # the training-only weight copies (e.g. 113 MB for SmolLM2)


@dataclass
class _Trainer:
    """One training run: prepared (options, data, lens, optimizer), started (warm start or resumed), run step by
    step, finished (metadata, saved)."""

    cfg: TrainConfig
    view: ModelView
    dist: _Dist
    tokens: Tensor
    seqs_per_step: int
    lens: TunedLens
    fresh: bool
    obj: _Objective
    opt: torch.optim.Optimizer
    sched: Any
    out: Path | None
    data_id: str
    history: list = field(default_factory=list)
    stats: dict = field(default_factory=lambda: {"warm_start_s": 0.0, "warm_start_tokens": 0})
    start_step: int = 0
    last_good: int | None = None
    done_tokens: int = 0
    train_s: float = 0.0

    @property
    def ckpt_dir(self) -> Path | None:
        return None if self.out is None else self.out / CHECKPOINT

    @property
    def n_global(self) -> int:
        return self.seqs_per_step * self.cfg.seq_len

    @classmethod
    def prepare(cls, model: Any, data: Any, out: Any, cfg: TrainConfig, resume: bool,
                lens: TunedLens | None) -> "_Trainer":
        view = ModelView(model)
        dist = _init_distributed(view.device)
        seqs_per_step = cfg.validate(dist.world)
        check_context(view, cfg.seq_len, "each training sequence", fix="Pass a smaller seq_len (--seq-len).")
        tokens = data if isinstance(data, Tensor) else load_tokens(data, view, cfg.seq_len, seed=cfg.seed)
        if tokens.ndim != 2 or tokens.shape[1] != cfg.seq_len:
            raise LensInputError(f"token data must be [n_seq, seq_len={cfg.seq_len}], got {tuple(tokens.shape)}.")
        tokens = tokens.cpu()
        if tokens.shape[0] < seqs_per_step:
            raise LensInputError(
                f"the data holds {tokens.shape[0]} sequences of {cfg.seq_len} tokens, fewer than one step's "
                f"{seqs_per_step}: pass more text or a smaller --tokens-per-step."
            )
        if resume and out is None:
            raise LensInputError("resume needs the output folder (out=...) that holds the checkpoint.")
        fresh = lens is None
        lens = (TunedLens.from_model(view) if fresh else lens.bind(view)).to(view.device)
        opt = torch.optim.SGD([lens.weight, lens.bias], lr=cfg.lr * (1 - cfg.momentum), momentum=cfg.momentum,
                              nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
        steps = max(cfg.steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
        return cls(cfg, view, dist, tokens, seqs_per_step, lens, fresh,
                   _Objective(view, torch.bfloat16 if cfg.bf16 else torch.float32), opt, sched,
                   None if out is None else Path(out), _data_id(tokens))

    def start(self, resume: bool) -> None:
        """Resume from the checkpoint, or warm-start a fresh lens by least squares. Temp files a killed run left in
        the checkpoint folder (the atomic writer's ``.state.pt.*``) are removed first: this run owns the folder."""
        cfg = self.cfg
        if self.ckpt_dir is not None and self.ckpt_dir.is_dir() and self.dist.primary:
            for stale in self.ckpt_dir.glob(f".{STATE_FILE}.*"):
                stale.unlink(missing_ok=True)
        if resume and (self.ckpt_dir / STATE_FILE).is_file():
            self.start_step, self.history, self.stats = _load_checkpoint(
                self.ckpt_dir, self.lens, self.opt, self.sched, cfg, self.data_id)
            self.last_good = self.start_step
        elif cfg.warm_start_tokens > 0 and self.fresh:
            t0 = time.perf_counter()
            n_ws = max(1, min(self.tokens.shape[0], -(-cfg.warm_start_tokens // cfg.seq_len)))
            mine = torch.arange(n_ws)[self.dist.rank :: self.dist.world]
            batches = [self.tokens[mine[i : i + cfg.micro_batch]] for i in range(0, len(mine), cfg.micro_batch)]
            warm_start(self.lens, self.obj, batches, cfg.ridge, self.dist)
            self.stats = {"warm_start_s": time.perf_counter() - t0, "warm_start_tokens": n_ws * cfg.seq_len}

    def run(self) -> None:
        """Every remaining KL step, with a progress bar and checkpoints."""
        cfg, bar = self.cfg, None
        if cfg.progress and self.dist.primary and cfg.steps > self.start_step:
            bar = progress_bar(cfg.steps, "tuned lens", initial=self.start_step, leave=True)
        t0 = time.perf_counter()
        try:
            for step in range(self.start_step, cfg.steps):
                rec = self.step(step)
                self.history.append(rec)
                self.done_tokens += self.n_global
                if bar is not None:
                    rate = self.done_tokens / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(kl_bits=f"{rec['kl_bits_per_layer']:.3f}", tok_s=f"{rate:.0f}")
                    bar.update(1)
                if self.ckpt_dir is not None and cfg.checkpoint_every and (
                        (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                    if self.dist.primary:
                        _save_checkpoint(self.ckpt_dir, self.lens, self.opt, self.sched, cfg, step + 1, self.data_id,
                                         self.history, self.stats)
                    self.last_good = step + 1
        finally:
            if bar is not None:
                bar.close()
            self.train_s = time.perf_counter() - t0

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step over the step's global batch (gradients accumulated over micro-batches, summed over
        processes); refuses a non-finite loss, gradient or update."""
        cfg, lens, obj, L = self.cfg, self.lens, self.obj, self.lens.n_layers
        idx = _step_sequences(self.tokens.shape[0], self.seqs_per_step, step, cfg.seed)[self.dist.rank :: self.dist.world]
        self.opt.zero_grad(set_to_none=False)
        kl_sum = torch.zeros(L, dtype=torch.float64)
        for m0 in range(0, len(idx), cfg.micro_batch):
            hs = obj.hidden(self.tokens[idx[m0 : m0 + cfg.micro_batch]])
            target = obj.final(hs[-1])
            for i in range(L):
                kl_sum[i] += obj.layer_step(lens, i, hs[i], target, 1.0 / self.n_global)
            del hs, target
        for t in (kl_sum, lens.weight.grad, lens.bias.grad):
            self.dist.all_reduce(t)
        kl = kl_sum / self.n_global
        bad = None
        if not torch.isfinite(kl).all():
            bad = f"the loss of layer {int((~torch.isfinite(kl)).nonzero()[0])}"
        elif not (torch.isfinite(lens.weight.grad).all() and torch.isfinite(lens.bias.grad).all()):
            bad = "the gradient"
        else:
            torch.nn.utils.clip_grad_norm_([lens.weight, lens.bias], cfg.clip)
            self.opt.step()
            self.sched.step()
            if not (torch.isfinite(lens.weight).all() and torch.isfinite(lens.bias).all()):
                bad = "the updated translators"
        if bad is not None:
            kept = (f"the last good checkpoint (after step {self.last_good}) is kept in {self.ckpt_dir}"
                    if self.last_good is not None else "no checkpoint was written (set checkpoint_every to keep one)")
            raise TrainingError(f"the loss became non-finite in step {step + 1} ({bad}); {kept}; nothing else was "
                                "saved. Lower the learning rate (--lr) or check the data.")
        return {"step": step + 1, "kl_bits": float(kl.sum() / LN2), "kl_bits_per_layer": float(kl.mean() / LN2)}

    def finish(self, data: Any) -> TunedLens:
        """Record how the lens was trained in ``lens.meta["training"]`` and save it (primary process)."""
        cfg = self.cfg
        self.lens.meta["training"] = {
            **{k: v for k, v in asdict(cfg).items() if k != "progress"},
            "world_size": self.dist.world,
            "data": data_name(data) if not isinstance(data, Tensor) else "tokens",
            "data_sha": self.data_id,
            "train_tokens": cfg.steps * self.n_global,
            "train_s": round(self.train_s, 3),
            "tokens_per_s": round(self.done_tokens / self.train_s, 2) if self.done_tokens else None,
            **self.stats,
            "final_kl_bits_per_layer": self.history[-1]["kl_bits_per_layer"] if self.history else None,
        }
        if self.out is not None and self.dist.primary:
            save_lens(self.lens, self.out)
        return self.lens


def _save_checkpoint(folder, lens, opt, sched, cfg, step, data_id, history, stats) -> None:
    state = {
        "weight": lens.weight.detach().cpu().clone(),
        "bias": lens.bias.detach().cpu().clone(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": step,
        "data_position": step * (cfg.tokens_per_step // cfg.seq_len),
        "data_id": data_id,
        "config": {k: v for k, v in asdict(cfg).items() if k != "progress"},
        "rng": torch.get_rng_state(),
        "history": history,
        "stats": stats,
    }
    write_files_atomic(folder, [(STATE_FILE, lambda tmp: torch.save(state, tmp))])


def _load_checkpoint(folder, lens, opt, sched, cfg, data_id):
    path = Path(folder) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError (a payload), EOFError (truncated), ...
        raise LensInputError(f"cannot read the checkpoint {path} ({type(err).__name__}): it is corrupt, truncated or "
                             "carries objects other than tensors (nothing was executed). Delete the folder "
                             f"{Path(folder)} to start over.") from err
    if not isinstance(state, dict) or not {"weight", "bias", "optimizer", "step"} <= set(state):
        raise LensInputError(f"{path} is not a tuned-lens checkpoint: delete the folder {Path(folder)} to start over.")
    for key, ref in (("weight", lens.weight), ("bias", lens.bias)):
        t = state[key]
        if not isinstance(t, torch.Tensor) or t.shape != ref.shape or not torch.isfinite(t).all():
            raise LensInputError(f"{path}: {key} does not fit this model's lens (or is not finite): the checkpoint "
                                 f"belongs to another run; delete {Path(folder)} to start over.")
    saved = state.get("config", {})
    for key in ("tokens_per_step", "seq_len", "micro_batch", "lr", "momentum", "weight_decay", "clip", "seed", "steps",
                "warm_start_tokens", "ridge", "bf16"):
        if saved.get(key) != getattr(cfg, key):
            raise LensInputError(
                f"cannot resume: the checkpoint was made with {key}={saved.get(key)!r}, now {getattr(cfg, key)!r}. "
                "Resume with the same options (or start a new output folder)."
            )
    if state.get("data_id") != data_id:
        raise LensInputError("cannot resume: the data differs from the data the checkpoint was trained on.")
    with torch.no_grad():
        lens.weight.copy_(state["weight"])
        lens.bias.copy_(state["bias"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"]), list(state.get("history", [])), dict(state.get("stats", {}))
