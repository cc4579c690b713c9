"""ModelView: the one place that knows TransformerBridge vs HookedTransformer, hook names, GQA and decoding.

Everything else in mi_lenses talks to a model through a ``ModelView``: hook names, residual rows, per-layer weights
(GQA layout included), tokenisation and the batch prelude, and the one decoder (:mod:`mi_lenses.models.decode`).

Example:
    >>> view = ModelView(model)
    >>> view.n_layers, [r.label for r in view.residual_rows()][:2], view.residual_rows()[-1].hook_name
    (3, ['embed', '1_pre'], 'blocks.2.hook_resid_post')
    >>> logits, cache = view.run_with_cache(view.batch("The capital of France is"), [view.final_resid_hook])
    >>> bool(torch.allclose(view.decode(cache[view.final_resid_hook]).log_softmax(-1), logits.log_softmax(-1),
    ...                     atol=1e-4))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mi_lenses.errors import LensInputError, check_text, quoted
from mi_lenses.indexing import resolve_index
from mi_lenses.models.batch import Batch, PromptInput, Reduction, make_batch, run_with_cache
from mi_lenses.models.blocks import Neurons, SublayerPath, is_post_ln, neurons, sublayer_path
from mi_lenses.models.decode import Decoder, decoder_of
from mi_lenses.models.gaps import gap
from mi_lenses.models.kv import BridgeKV, HookedKV, is_bridge, kv_cache
from mi_lenses.models.layout import BlockLayout, block_layout
from mi_lenses.models.masks import attention_masks
from mi_lenses.models.parity import ensure_checked

POINTS = ("resid_pre", "resid_mid", "resid_post")
# attention modules whose head outputs are gated at the destination (ModelView.output_gate), and the gate's activation
_OUTPUT_GATES: dict[str, Callable[[Tensor], Tensor]] = {"LagunaAttention": torch.nn.functional.softplus,
                                                        "AfmoeAttention": torch.sigmoid}


@dataclass(frozen=True)
class ResidualRow:
    """One row of a lens: a residual-stream state, its label, hook name and tuned-lens layer index.

    ``lens_index`` follows the ``tuned-lens`` package: 0 is the embeddings (``resid_pre`` of block 0), ``l`` is the
    input of block ``l``; the final output row has ``lens_index == n_layers`` and is never translated.
    """

    label: str
    hook_name: str
    lens_index: int
    is_final: bool = False


class ModelView:
    """A read-only adapter over a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``)."""

    @staticmethod
    def accepts(obj: Any) -> bool:
        """True for a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``) or a ``ModelView``."""
        return isinstance(obj, ModelView) or all(hasattr(obj, a) for a in ("run_with_cache", "cfg", "W_U"))

    def __init__(self, model: Any):
        if isinstance(model, ModelView):
            self._memo = model._memo
            model = model.model
        else:
            self._memo: dict = {}
        if not ModelView.accepts(model):
            raise LensInputError(
                f"expected a TransformerLens model (TransformerBridge or HookedTransformer), got "
                f"{type(model).__name__}. Load one with mi_lenses.load_model(...)."
            )
        if getattr(model, "training", False):
            raise LensInputError("the model is in training mode (dropout would add noise): call model.eval() first.")
        ensure_checked(model)  # once per model: TransformerLens against Hugging Face (mi_lenses.models.parity)
        self.model = model
        self.cfg = model.cfg

    # ----------------------------------------------------------------------------------------- structure
    @property
    def is_bridge(self) -> bool:
        """True for a ``TransformerBridge``, False for a ``HookedTransformer``."""
        return is_bridge(self.model)

    @property
    def hook_names(self) -> frozenset[str]:
        """Every hook point's name, aliases included; read once per view (a bridge rebuilds its ``hook_dict`` with
        every alias on each access: 4 ms on SmolLM2)."""
        if "hook_names" not in self._memo:
            self._memo["hook_names"] = frozenset(getattr(self.model, "hook_dict", {}))
        return self._memo["hook_names"]

    @property
    def name(self) -> str:
        return str(getattr(self.cfg, "model_name", None) or type(self.model).__name__)

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        return int(self.W_U.shape[-1])

    @property
    def n_heads(self) -> int:
        return int(self.cfg.n_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.cfg, "n_key_value_heads", None) or self.n_heads)

    def kv_head(self, head: int) -> int:
        """The key/value head that query head ``head`` reads (grouped-query attention)."""
        return head // (self.n_heads // self.n_kv_heads)

    def expand_kv(self, t: Tensor, dim: int) -> Tensor:
        """Repeat a per-KV-head tensor along ``dim`` to one slice per query head (no-op when already per head)."""
        if t.shape[dim] == self.n_heads:
            return t
        return t.repeat_interleave(self.n_heads // t.shape[dim], dim=dim)

    @property
    def device(self) -> torch.device:
        return self.W_U.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights (lens statistics are reduced in float32 whatever it is)."""
        return self.W_U.dtype

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.model.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"] | None:
        b = getattr(self.model, "b_U", None)
        return None if b is None else b

    def hook_name(self, point: str, layer: int) -> str:
        """TransformerLens hook name of ``point`` (``resid_pre``/``resid_mid``/``resid_post``) in block ``layer``."""
        if point not in POINTS:
            raise LensInputError(f"unknown residual point {point!r}; use one of {POINTS}.")
        layer = resolve_index(layer, self.n_layers, "block", f"this model has {self.n_layers} blocks")
        return f"blocks.{layer}.hook_{point}"

    def residual_rows(self, point: str = "resid_pre") -> list[ResidualRow]:
        """Lens rows from the embedding row to the final output row for a residual ``point``.

        ``resid_pre``: embed, input of blocks 1..L-1, final (L+1 rows). ``resid_post``: the same states labelled as
        block outputs. ``resid_mid``: embed, the mid-block state of every block, final (L+2 rows).
        """
        L = self.n_layers
        final = ResidualRow("final", f"blocks.{L - 1}.hook_resid_post", L, True)
        embed = ResidualRow("embed", "blocks.0.hook_resid_pre", 0)
        if point == "resid_pre":
            rows = [ResidualRow(f"{l}_pre", f"blocks.{l}.hook_resid_pre", l) for l in range(1, L)]
        elif point == "resid_post":
            rows = [ResidualRow(f"{l}_post", f"blocks.{l}.hook_resid_post", l + 1) for l in range(L - 1)]
        elif point == "resid_mid":
            if self.is_bridge and is_post_ln(self.model):
                raise LensInputError(
                    "this model normalises its residual stream after each sublayer (post-LN, like OPT-350m): its "
                    "blocks have no pre-norm resid_mid. Use point='resid_pre' or 'resid_post'."
                )
            if getattr(self.cfg, "parallel_attn_mlp", False):
                raise LensInputError(
                    "this model runs attention and MLP in parallel (cfg.parallel_attn_mlp): its blocks have no "
                    "resid_mid. Use point='resid_pre' or 'resid_post'."
                )
            rows = [ResidualRow(f"{l}_mid", f"blocks.{l}.hook_resid_mid", l) for l in range(L)]
        else:
            raise LensInputError(f"unknown residual point {point!r}; use one of {POINTS}.")
        return [embed, *rows, final]

    # ----------------------------------------------------------------------------------------- components (DLA)
    @property
    def is_compat(self) -> bool:
        """True when the final norm's gain/bias are folded into ``W_U``/``b_U`` by TransformerLens
        (a bridge in compatibility mode, or a HookedTransformer with folded LN); False on a raw bridge."""
        if self.is_bridge:
            return bool(getattr(self.model, "compatibility_mode", False))
        return getattr(self.cfg, "normalization_type", None) in ("LNPre", "RMSPre", None)

    @property
    def has_mlp(self) -> bool:
        return not getattr(self.cfg, "attn_only", False)

    @property
    def d_mlp(self) -> int:
        """The most neurons of any block's MLP, counted from the weights (TransformerLens fills ``cfg.d_mlp`` wrongly
        for some models, e.g. OPT's ``4 * d_model`` whatever ``ffn_dim`` is; mixture-of-experts blocks count every
        expert's neurons and the shared expert's)."""
        if not self.has_mlp:
            return 0
        return max([self.neurons(l).size for l in range(self.n_layers) if self.layout(l).mlp] or [0])

    def layout(self, layer: int) -> BlockLayout:
        """Block ``layer``'s parts: attention heads, or another token mixer (state-space, linear attention, ...),
        and its MLP (:mod:`mi_lenses.models.layout`), read once."""
        key = ("layout", layer)
        if key not in self._memo:
            self._memo[key] = block_layout(self.model, layer, self.hook_names)
        return self._memo[key]

    @property
    def attn_layers(self) -> list[int]:
        """The blocks with attention heads (every block of a transformer; only some of a hybrid model)."""
        return [l for l in range(self.n_layers) if self.layout(l).heads]

    def neurons(self, layer: int) -> Neurons:
        """Block ``layer``'s MLP neurons: their activations and output rows (:mod:`mi_lenses.models.blocks`; a
        mixture of experts: every expert's neurons weighted by the router, then the shared expert's), read once."""
        key = ("neurons", layer)
        if key not in self._memo:
            self._memo[key] = neurons(self.model, layer)
        return self._memo[key]

    def sublayer(self, layer: int, sublayer: str) -> SublayerPath:
        """How block ``layer``'s ``"attn"`` or ``"mlp"`` output reaches the residual stream: its hook before
        anything the block applies to it, the post-norm, the residual multiplier and, post-LN, the residual norm
        (:class:`~mi_lenses.models.blocks.SublayerPath`), read once."""
        key = ("sublayer", layer, sublayer)
        if key not in self._memo:
            if self.is_bridge:
                self._memo[key] = sublayer_path(self.model, layer, sublayer)
            else:
                if getattr(self.cfg, "use_normalization_before_and_after", False):
                    raise LensInputError(
                        "this HookedTransformer normalises each sublayer's output (ln1_post/ln2_post), which "
                        "direct logit attribution reads only on a TransformerBridge: load the model with "
                        "mi_lenses.load_model(..., kind='bridge').")
                self._memo[key] = SublayerPath(layer, sublayer, self.out_hook(layer, sublayer))
        return self._memo[key]

    @property
    def writes_through_norms(self) -> bool:
        """Whether some component reaches the logit through a norm besides the final one (a sublayer post-norm or a
        post-LN residual norm), so that its direction depends on the position."""
        subs = ("attn", "mlp") if self.has_mlp else ("attn",)
        return any(p.post_norm is not None or p.resid_norm is not None
                   for l in range(self.n_layers) for s in subs
                   if (self.layout(l).heads if s == "attn" else self.layout(l).mlp)
                   for p in (self.sublayer(l, s),))

    @property
    def embed_hooks(self) -> list[tuple[str, str]]:
        """``(label, hook name)`` of the input embeddings that are added to the residual stream: the token
        embedding (after ``project_in`` where the model has one, OPT-350m), and the learned positional embedding
        where the model has one (rotary models have none)."""
        first = next((h for h in ("project_in.hook_out", "blocks.0.pre_ln.hook_out") if h in self.hook_names),
                     "hook_embed")  # OPT-350m projects the embeddings, RWKV normalises them in block 0
        hooks = [("embed", first)]
        if getattr(self.cfg, "positional_embedding_type", "standard") in ("standard", "learned"):
            hooks.append(("pos_embed", "hook_pos_embed"))
        elif not self.layout(0).heads:  # what the first block reads (RecurrentGemma scales hook_embed after it)
            lay = self.layout(0)
            hooks = [("embed", (lay.span or lay.mlp_span or (first,))[0])]
        return hooks

    def attn_hook(self, layer: int, name: str) -> str:
        """Hook inside block ``layer``'s attention: ``z`` (per query head), ``v`` (per KV head on a bridge),
        ``pattern`` (``[batch, head, query, key]``)."""
        return f"blocks.{layer}.attn.hook_{name}"

    # --- issue 26: multi-head latent attention
    def is_mla(self, layer: int) -> bool:
        """Whether block ``layer`` runs multi-head latent attention (DeepSeek V2/V3, GLM-4-MoE-Lite, Youtu,
        GLM-MoE-DSA): queries and keys decompressed from latents, value heads wider than ``cfg.d_head``, ``hook_q``,
        ``hook_k`` and ``hook_v`` fired per head before the position axis (``[batch, head, pos, d]``)."""
        return self.is_bridge and hasattr(getattr(self.model.blocks[layer], "attn", None), "hook_kv_latent")

    def split_heads(self, z: Float[Tensor, "... a b"]) -> Float[Tensor, "... n_heads d_value"]:
        """A head-major ``[..., n_heads * d_value]`` tensor (``hook_z``, the input of ``W_O``) as ``[..., n_heads,
        d_value]``, whatever split TransformerLens gave it: it splits multi-head latent attention's ``hook_z`` by
        ``cfg.d_head`` although each value head is wider (the width comes from ``W_O`` instead)."""
        return z if z.shape[-2] == self.n_heads else z.flatten(-2).unflatten(-1, (self.n_heads, -1))

    def attn_v(self, cache: Any, layer: int) -> Float[Tensor, "B S KV d_value"]:
        """Block ``layer``'s values, one slice per key/value head, position before head."""
        v = cache[self.attn_hook(layer, "v")]
        return v.transpose(1, 2) if self.is_mla(layer) else v

    def output_gate(self, layer: int) -> tuple[str, Callable[[Tensor], Tensor]] | None:
        """The gate block ``layer`` multiplies its head outputs by, computed from the destination's input:
        ``z = (pattern · v) ⊙ act(gate)`` (Laguna: softplus, per head; AFMoE: sigmoid, per dimension), as its hook
        (before the activation) and the activation; None without one."""
        attn = getattr(self.model.blocks[layer], "attn", None)
        act = _OUTPUT_GATES.get(type(getattr(attn, "original_component", None)).__name__)
        hook = f"blocks.{layer}.attn.gate.hook_out"
        return (hook, act) if act is not None and hook in self.hook_names else None
    # --- end

    # ----------------------------------------------------------------------------------------- attention scores
    @property
    def d_head(self) -> int:
        return int(self.cfg.d_head)

    @property
    def is_rotary(self) -> bool:
        return getattr(self.cfg, "positional_embedding_type", "standard") == "rotary"

    def qk_unsupported(self) -> str | None:
        """Why the attention scores of this model are not ``scale * q · k`` under its masks (ALiBi), or None (soft-caps,
        sliding windows, chunks and learned sinks are reproduced: :mod:`mi_lenses.models.masks`)."""
        if any(m.alibi for m in attention_masks(self.model)):
            return "this model adds ALiBi position biases to q · k"
        why = gap(self.model, "qk", with_versions=False)
        return f"the q·k terms are not available on {why}" if why else None

    def qk_hooks(self, layer: int) -> list[str]:
        """Every hook :meth:`attn_qk` may read in block ``layer`` (the ones this model has): the queries and keys
        before and after rotary, and the rotary angles where the model exposes only those."""
        names = [self.attn_hook(layer, n) for n in ("q", "k", "rot_q", "rot_k", "cos", "sin")]
        return [n for n in names if n in self.hook_names]

    def attn_scale(self, layer: int) -> float:
        """The factor block ``layer`` multiplies ``q · k`` by (usually ``1 / sqrt(d_head)``)."""
        attn = self.model.blocks[layer].attn
        hf_type = getattr(getattr(getattr(self.model, "original_model", None), "config", None), "model_type", None)
        if not getattr(self.cfg, "use_attn_scale", True) or hf_type == "gpt_neo":
            return 1.0  # GPT-Neo does not scale q · k
        if self.is_bridge:
            scaling = getattr(getattr(attn, "original_component", None), "scaling", None)
        else:
            scale = getattr(attn, "attn_scale", None)
            scaling = None if scale is None else 1.0 / float(scale)
        return float(scaling) if scaling is not None else self.d_head ** -0.5

    def attn_qk(self, cache: Any, layer: int) -> tuple[Float[Tensor, "B S H d"], Float[Tensor, "B S KV d"]]:
        """The queries (one per query head) and keys (one per KV head under GQA) of block ``layer`` as they enter
        the attention scores: after rotary on rotary models. ``scores[h, q, k] = attn_scale * q[q, h] · k[k,
        kv_head(h)]`` (before the causal mask).

        Rotary queries come from ``hook_rot_q``/``hook_rot_k`` where they fire; a bridge that exposes only the
        rotary angles (``hook_cos``/``hook_sin``, e.g. GPT-NeoX) gets them rotated here on the first
        ``cos.shape[-1]`` dimensions (the Hugging Face convention, which that bridge runs)."""

        def get(name: str) -> Tensor | None:
            try:
                return cache[self.attn_hook(layer, name)]
            except (KeyError, IndexError):
                return None

        if self.is_mla(layer):  # hook_q / hook_k: the rotary and non-rotary parts joined, [B, H, S, d]
            q, k = get("q"), get("k")
            if q is not None and k is not None:
                return q.float().transpose(1, 2), k.float().transpose(1, 2)
        q, k = get("rot_q"), get("rot_k")
        if q is not None and k is not None:
            return q.float(), k.float()
        q, k, cos, sin = get("q"), get("k"), get("cos"), get("sin")
        if q is None or k is None:
            raise LensInputError(
                f"the cache lacks the queries/keys of block {layer} (attn.hook_q/hook_k, or hook_rot_q/hook_rot_k "
                "on rotary models): run model.run_with_cache(tokens) without a names_filter, or pass the prompt."
            )
        q, k = q.float(), k.float()
        if (cos is None or sin is None) and self.is_rotary:
            table = self._interleaved_rotary_table()
            if table is not None:  # GPT-J: the bridge exposes neither rotated q/k nor the angles
                r = table.shape[-1]
                sin, cos = (t.repeat_interleave(2, -1)[None, : q.shape[1], None, :].to(q.device)
                            for t in table.float().split(r // 2, dim=-1))
                return _rotate_interleaved(q, cos, sin), _rotate_interleaved(k, cos, sin)
        if cos is None or sin is None:
            if self.is_rotary:
                raise LensInputError(
                    f"block {layer} is rotary but the cache has neither hook_rot_q/hook_rot_k nor hook_cos/hook_sin: "
                    "cache them too (run_with_cache without a names_filter)."
                )
            return q, k
        cos, sin = cos.float()[:, :, None, :], sin.float()[:, :, None, :]  # [B or 1, S, 1, r]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def _interleaved_rotary_table(self) -> Tensor | None:
        """GPT-J's rotary table, ``[max_positions, r]`` = ``sin | cos`` per position (its ``embed_positions``
        buffer), where the bridge does not expose the rotation; ``None`` for other models."""
        hf = getattr(self.model, "original_model", None)
        if hf is None or getattr(getattr(hf, "config", None), "model_type", None) not in ("gptj", "codegen"):
            return None
        for mod in hf.modules():
            buf = getattr(mod, "embed_positions", None)
            if isinstance(buf, Tensor) and buf.ndim == 2:
                return buf.detach()
        return None

    def mlp_hook(self, layer: int, name: str = "post") -> str:
        """Hook inside block ``layer``'s MLP: ``post`` is the input of ``W_out`` (post-activation, gated)."""
        return f"blocks.{layer}.mlp.hook_{name}"

    def out_hook(self, layer: int, sublayer: str) -> str:
        """What block ``layer``'s ``"attn"`` or ``"mlp"`` sublayer adds to the residual stream."""
        return f"blocks.{layer}.hook_{sublayer}_out"

    @property
    def final_resid_hook(self) -> str:
        """The residual stream the final norm reads."""
        return f"blocks.{self.n_layers - 1}.hook_resid_post"

    def W_O(self, layer: int) -> Float[Tensor, "n_heads d_head d_model"]:
        """Block ``layer``'s output projection per query head (float32, detached)."""
        return self.model.blocks[layer].attn.W_O.detach().float()

    def b_O(self, layer: int) -> Float[Tensor, " d_model"] | None:
        """Block ``layer``'s attention output bias (None when the model has none)."""
        b = getattr(self.model.blocks[layer].attn, "b_O", None)
        return None if b is None else b.detach().float()

    def W_out(self, layer: int) -> Float[Tensor, "d_mlp d_model"]:
        """Block ``layer``'s MLP output weights, one row per neuron (float32, detached)."""
        return self.model.blocks[layer].mlp.W_out.detach().float()

    def b_out(self, layer: int) -> Float[Tensor, " d_model"] | None:
        """Block ``layer``'s MLP output bias (None when the model has none)."""
        b = getattr(self.model.blocks[layer].mlp, "b_out", None)
        return None if b is None else b.detach().float()

    # ----------------------------------------------------------------------------------------- decoding
    @property
    def decoder(self) -> Decoder:
        """The model's :class:`~mi_lenses.models.decode.Decoder` (final norm + unembedding + soft-cap), built once
        per model: the only decode path in mi_lenses."""
        return decoder_of(self.model)

    def decode(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """Logits of residual vectors through the final norm and unembedding (equals the model's logits on the
        final residual stream)."""
        return self.decoder.logits(x)

    @property
    def kv(self) -> BridgeKV | HookedKV | None:
        """The model's KV-cache adapter (:mod:`mi_lenses.models.kv`), or ``None`` where cached forward passes do not
        work (callers then recompute: same numbers, slower)."""
        return kv_cache(self.model)

    # ----------------------------------------------------------------------------------------- runs
    def batch(self, input: PromptInput, *, prepend_bos: bool | None = None,
              attention_mask: Tensor | None = None, beyond_context: bool = False) -> Batch:
        """Tokens, lengths and padding offsets of a prompt, a list of prompts or token ids (see
        :mod:`mi_lenses.models.batch`); prompts longer than the model's context are refused unless
        ``beyond_context``."""
        return make_batch(self, input, prepend_bos=prepend_bos, attention_mask=attention_mask,
                          beyond_context=beyond_context)

    def run_with_cache(self, batch: Batch, names: set[str] | Sequence[str], *, progress: bool = False,
                       reduce: Sequence[tuple[str, Reduction]] = (), fused: bool = False) -> tuple[Tensor, Any]:
        """``(logits, cache)`` of one forward pass over ``batch`` caching the hooks in ``names`` (no gradients; see
        :func:`~mi_lenses.models.batch.run_with_cache` for ``reduce`` and ``fused``)."""
        return run_with_cache(self, batch, names, progress=progress, reduce=reduce, fused=fused)

    # ----------------------------------------------------------------------------------------- tokens
    @property
    def tokenizer(self) -> Any:
        return getattr(self.model, "tokenizer", None)

    def to_tokens(
        self, input: str | Sequence[str] | Tensor, prepend_bos: bool | None = None
    ) -> Int[Tensor, "batch pos"]:
        """Tokens ``[batch, pos]`` for a prompt, a list of prompts (right-padded) or a token tensor."""
        if isinstance(input, Tensor):
            tokens = input
            if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise LensInputError(f"token tensors must be integer ids, got dtype {tokens.dtype}.")
            if tokens.ndim == 1:
                tokens = tokens[None]
            if tokens.ndim != 2 or tokens.shape[-1] == 0:
                raise LensInputError(f"expected tokens of shape [batch, pos] with pos >= 1, got {tuple(tokens.shape)}.")
            if int(tokens.min()) < 0 or int(tokens.max()) >= self.d_vocab:
                raise LensInputError(f"token ids must lie in 0..{self.d_vocab - 1} (this model's vocabulary): "
                                     "tokenize with this model's tokenizer (model.to_tokens).")
            return tokens.long().to(self.device)
        prompts = [input] if isinstance(input, str) else list(input)
        if not prompts:
            raise LensInputError("no prompt given: pass a non-empty string or a list of them.")
        for p in prompts:
            if not isinstance(p, str):
                raise LensInputError(f"prompts must be strings, got {type(p).__name__}: pass text, or token ids as "
                                     "a tensor [batch, pos].")
            if p == "":
                raise LensInputError("empty prompt: pass some text (the lens needs at least one token).")
            check_text(p, "the prompt" if len(prompts) == 1 else f"prompt {prompts.index(p)}")
        # truncate=False: TransformerLens cuts text at cfg.n_ctx silently; make_batch refuses it with the fix instead
        kwargs: dict[str, Any] = {"truncate": False} if prepend_bos is None else \
            {"prepend_bos": prepend_bos, "truncate": False}
        if len(prompts) > 1:
            kwargs["padding_side"] = "right"  # the valid mask assumes right padding, whatever the tokenizer says
        tokens = self.model.to_tokens(prompts if len(prompts) > 1 else prompts[0], **kwargs)
        if tokens.shape[-1] == 0:
            raise LensInputError("empty prompt: pass some text (the lens needs at least one token).")
        return tokens.to(self.device)

    @property
    def prepends_bos(self) -> bool:
        """Whether text is tokenised with a BOS token in front by default (SmolLM2: no)."""
        return bool(self.model.to_tokens("a").shape[-1] > self.model.to_tokens("a", prepend_bos=False).shape[-1])

    def str_tokens(self, batch: Batch, *, known: bool = True) -> list[list[str]]:
        """Each prompt's real tokens as strings (padding left out); ``known=False`` (a cache without token ids):
        placeholders ``[0]``, ``[1]``, ..."""
        if not known:
            return [[f"[{i}]" for i in range(n)] for n in batch.lengths]
        real = batch.real_tokens()
        vocab = self.id_to_str_map(torch.tensor([t for row in real for t in row]))
        return [[vocab[t] for t in row] for row in real]

    def to_single_token(self, token: str | int) -> int:
        """The id of a token given as a string that must be exactly one token, or as an id."""
        if isinstance(token, bool):
            raise LensInputError(f"expected a token string or id, got {token!r}.")
        if isinstance(token, int):
            if not 0 <= token < self.d_vocab:
                raise LensInputError(f"token id {token} is out of range 0..{self.d_vocab - 1}: pass a token of this "
                                     "model's vocabulary (or its string).")
            return token
        if not isinstance(token, str) or token == "":
            raise LensInputError(f"expected a non-empty token string or an id, got {quoted(token)}.")
        ids = self.model.to_tokens(check_text(token, "the token"), prepend_bos=False)[0].tolist()
        if len(ids) != 1:
            pieces = [self.id_to_str(i) for i in ids[:6]] + (["…"] if len(ids) > 6 else [])
            raise LensInputError(
                f"{quoted(token)} is not a single token: it splits into {len(ids)} tokens {pieces}. "
                f"Pass one of those pieces (mind the leading space), or a token id."
            )
        return int(ids[0])

    def id_to_str(self, token_id: int) -> str:
        tok = self.tokenizer
        if tok is None:
            return f"<{token_id}>"
        return tok.decode([int(token_id)])

    def id_to_str_map(self, ids: Tensor) -> dict[int, str]:
        """Decoded string of each distinct id in ``ids`` (decoded once each)."""
        return {int(i): self.id_to_str(int(i)) for i in torch.unique(ids.flatten()).tolist()}


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` dimensions of ``x`` (Hugging Face's ``rotate_half`` layout:
    the two halves of the rotated span are the paired coordinates)."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def _rotate_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` dimensions of ``x`` in GPT-J's layout: adjacent coordinates
    ``(2i, 2i + 1)`` are the rotated pairs (``rotate_every_two``), angles repeated per pair."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    pairs = torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2)
    return torch.cat((rot * cos + pairs * sin, rest), dim=-1)
