"""The exact engine's forward passes: many patched rows per pass, each row computed from the block where its patch
sits (block replay), or whole forward passes where replay cannot be trusted.

A patch at block ``l`` leaves blocks ``0 .. l-1`` exactly as in the base run, so recomputing them is waste (it is half
of TransformerLens's ``patching`` loops). :class:`Engine` runs the base prompt once, capturing what each block receives
(its hidden states and keyword arguments: attention mask, rotary angles, position ids — whatever the model hands it),
and then runs the *blocks themselves* on a growing batch: at block ``k`` the rows whose patch sits at ``k`` join the
batch with the base run's input of block ``k``. Every hook point inside the blocks fires as usual, so the patches are
ordinary TransformerLens hooks and the user's own hooks inside the blocks keep firing, in their order. The final
residual stream is decoded by the model's decoder (:mod:`mi_lenses.models.decode`).

Replay is checked before it is used: the base prompt replayed from block 0 must give the model's own logits. It is
not used (whole forward passes are, with the same hooks: the same numbers, slower) when that check fails, or when the
user has hooks after the blocks (on ``ln_final`` or ``unembed``, which replay does not run).

Rows of many patches share a forward pass, so a user's hook sees a batch TransformerLens's loops never make (they
run the base prompts alone, one patch per pass). A hook that treats batch rows differently (``z[0, :, 3] = 0``, written
for one prompt) would then act on one patched row instead of every one: under user hooks the base prompts are run
twice in one batch first, and where the copies differ from the base run, every pass holds one cell's rows only, in
the base prompts' order (:meth:`Engine.cells_per_pass`), which is TransformerLens's layout.

Rows are described by ``entry`` (the block where each row's patch sits; sorted) and ``prompt`` (the base prompt it
runs). In both modes the batch index of a row in every hook is its index in ``entry``, so one hook serves both.

Example:
    >>> view = ModelView(model)
    >>> eng = Engine(view, view.batch("The capital of France is"), names=[])
    >>> eng.mode
    'replay'
    >>> final = eng.run(torch.tensor([0, 2]), torch.tensor([0, 0]), lambda k: [])   # no patch: the base run twice
    >>> bool(torch.allclose(view.decode(final[:, -1]), eng.logits[0, -1].expand(2, -1), atol=1e-4))
    True
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from mi_lenses.models.batch import Batch
from mi_lenses.models.interventions import hooked_names, module_hooked
from mi_lenses.models.view import ModelView

Hooks = list[tuple[str, Callable]]
EMBED_STAGE = ("hook_embed", "hook_pos_embed", "hook_tokens")


def hooks_after_blocks(view: ModelView, names: set[str] | None = None) -> bool:
    """Whether a user's hook sits after the blocks (a hook point outside the blocks and the embeddings, or a plain
    torch hook on ``ln_final`` / ``unembed``): block replay and the decoder's own final norm and unembedding would
    bypass it. ``names``: :func:`~mi_lenses.models.interventions.hooked_names`, when already read."""
    names = hooked_names(view.model) if names is None else names
    return any(not n.startswith(("blocks.", "embed.", "pos_embed.")) and n not in EMBED_STAGE for n in names) \
        or any(module_hooked(getattr(view.model, m, None)) for m in ("ln_final", "unembed"))
CHECK_ATOL = 1e-3
PATCH_TOKENS = 8192  # rows x positions per forward pass by default (measured on SmolLM2: larger batches gain < 5%)
# per model, the (batch shape, user hooks) whose replay passed the check: the check costs a forward pass, and what it
# checks (that the blocks compute from what they were handed) does not change between calls
_CHECKED: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()


class Engine:
    """The base run of a patching experiment and the forward passes of its patched rows (see the module docstring).

    ``logits`` and ``cache`` (the hooks in ``names``) are the base run's; ``mode`` is ``"replay"`` or ``"forward"``.
    """

    def __init__(self, view: ModelView, batch: Batch, names: Sequence[str], *, replay: bool = True):
        self.view, self.batch = view, batch
        self.inputs: dict[int, tuple[tuple, dict]] = {}
        blocks = list(view.model.blocks)
        handles = []
        for k, block in enumerate(blocks):
            def capture(module: Any, args: tuple, kwargs: dict, k: int = k) -> None:
                if not args and "hidden_states" in kwargs:  # the hidden states passed by keyword: first positional
                    kwargs = dict(kwargs)
                    args = (kwargs.pop("hidden_states"),)
                # a copy: a hook inside the block may write into the tensor it was handed
                self.inputs[k] = ((args[0].detach().clone(),) + tuple(args[1:]) if args else args, kwargs)

            handles.append(block.register_forward_pre_hook(capture, with_kwargs=True))
        try:
            self.logits, self.cache = view.run_with_cache(batch, set(names) | {view.final_resid_hook})
        finally:
            for h in handles:
                h.remove()
        self.mode = "replay" if replay and self._replay_ok() else "forward"
        self._independent: bool | None = None

    def cells_per_pass(self, max_batch: int | None) -> int:
        """Cells per forward pass, each cell one row per base prompt: ``max_batch`` rows (default
        :data:`PATCH_TOKENS` tokens' worth), or one cell where a user's hook treats batch rows differently
        (:meth:`rows_independent`)."""
        B, S = self.batch.shape[0], self.batch.shape[1]
        if not self.rows_independent():
            return 1
        return max(1, (max_batch or max(1, PATCH_TOKENS // S)) // B)

    def rows_independent(self) -> bool:
        """Whether a row's result does not depend on the batch around it: always without user hooks; under them, the
        base prompts run twice in one batch (no patch) must give the base run twice."""
        if self._independent is None:
            self._independent = True
            if hooked_names(self.view.model):
                B = self.batch.shape[0]
                with torch.no_grad():
                    out = self.run(torch.zeros(2 * B, dtype=torch.long), torch.arange(B).repeat(2), lambda k: [])
                ref = self.logits if self.returns_logits else self.cache[self.view.final_resid_hook]
                ref = ref.float().to(out.device).repeat(2, *([1] * (ref.ndim - 1)))
                self._independent = bool((out.float() - ref).abs().max() <= CHECK_ATOL * (1.0 + float(ref.abs().max())))
        return self._independent

    # ------------------------------------------------------------------------------------------ replay
    def _replay_ok(self) -> bool:
        """Replay runs only what the blocks compute: refuse it under user hooks after the blocks, or when replaying
        the base run does not give the model's logits."""
        if len(self.inputs) != self.view.n_layers:
            return False
        names = hooked_names(self.view.model)
        if hooks_after_blocks(self.view, names):
            return False
        key = (tuple(self.batch.shape), tuple(sorted(names)))
        try:
            if key in _CHECKED.get(self.view.model, ()):
                return True
        except TypeError:  # a model that cannot be weakly referenced: check every time
            pass
        B = self.batch.shape[0]
        try:
            with torch.no_grad():
                final = self._replay(torch.zeros(B, dtype=torch.long), torch.arange(B), lambda k: [], None)
        except (RuntimeError, TypeError, ValueError, AttributeError, IndexError, KeyError):
            # an architecture whose blocks need state that replay does not carry: whole forward passes instead
            return False
        ref = self.cache[self.view.final_resid_hook]
        ours = self.view.decode(final[:, -1])
        theirs = self.logits[:, -1].float().to(ours.device)
        scale = 1.0 + float(theirs.abs().max())
        ok = bool((final - ref.to(final.device)).abs().max() <= CHECK_ATOL * (1.0 + float(ref.abs().max()))
                  and (ours - theirs).abs().max() <= CHECK_ATOL * scale)
        if ok:
            try:
                _CHECKED.setdefault(self.view.model, set()).add(key)
            except TypeError:
                pass
        return ok

    def _select(self, obj: Any, prompts: Tensor) -> Any:
        """A captured block argument for rows of base prompts ``prompts``: batch-first tensors are indexed (a batch of
        one broadcasts), caches dropped (every row is a fresh forward pass)."""
        B = self.batch.shape[0]
        if isinstance(obj, Tensor):
            if B > 1 and obj.ndim >= 2 and obj.shape[0] == B:
                return obj[prompts.to(obj.device)]
            return obj
        if isinstance(obj, (tuple, list)):
            return type(obj)(self._select(o, prompts) for o in obj)
        if isinstance(obj, dict):
            return {k: self._select(v, prompts) for k, v in obj.items()}
        if "Cache" in type(obj).__name__:
            return None
        return obj

    def _replay(self, entry: Tensor, prompt: Tensor, hooks: Callable[[int], Hooks], stop: int | None) -> Tensor | None:
        model = self.view.model
        x: Tensor | None = None
        first = int(entry.min())
        last = self.view.n_layers - 1 if stop is None else stop
        counts = torch.bincount(entry, minlength=self.view.n_layers).tolist()
        n = 0
        for k in range(first, last + 1):
            args, kwargs = self.inputs[k]
            if counts[k]:
                new = self._select(args[0], prompt[n : n + counts[k]])
                if new.shape[0] != counts[k]:
                    new = new.expand(counts[k], *new.shape[1:])
                x = new.clone() if x is None else torch.cat([x, new], 0)
                n += counts[k]
            active = prompt[:n]
            call_args = (x,) + tuple(self._select(a, active) for a in args[1:])
            call_kwargs = self._select(kwargs, active)
            if "use_cache" in call_kwargs:
                call_kwargs["use_cache"] = False
            with model.hooks(fwd_hooks=hooks(k)):
                out = model.blocks[k](*call_args, **call_kwargs)
            x = out[0] if isinstance(out, (tuple, list)) else out
        return None if stop is not None else x

    # ------------------------------------------------------------------------------------------ runs
    def run(self, entry: Tensor, prompt: Tensor, hooks: Callable[[int], Hooks], *, stop: int | None = None,
            grad: bool = False) -> Tensor | None:
        """Run rows (``entry`` sorted ascending, ``prompt`` the base prompt of each) with ``hooks(k)`` active in block
        ``k``; return the final residual stream ``[R, S, d]`` (replay) or the logits ``[R, S, vocab]`` (forward).
        ``stop``: run up to block ``stop`` only (for hooks that record) and return None."""
        entry, prompt = entry.long().cpu(), prompt.long().cpu()
        if bool((entry[1:] < entry[:-1]).any()):
            raise ValueError("rows must be sorted by entry block")
        with torch.set_grad_enabled(grad):
            if self.mode == "replay":
                return self._replay(entry, prompt, hooks, stop)
            every = [h for k in range(self.view.n_layers if stop is None else stop + 1) for h in hooks(k)]
            tokens = self.batch.tokens[prompt.to(self.batch.tokens.device)]
            with self.view.model.hooks(fwd_hooks=every):
                logits = self.view.model(tokens)
            return None if stop is not None else logits

    @property
    def returns_logits(self) -> bool:
        return self.mode == "forward"

    def measure(self, metric: Any, final: Tensor) -> Tensor:
        """The raw metric (a :class:`~mi_lenses.patching.metric.Metric`) of the rows :meth:`run` returned."""
        return metric.cells(**({"logits": final} if self.returns_logits else {"resid": final}))
