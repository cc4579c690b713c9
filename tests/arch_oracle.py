"""The Hugging Face model alone as the oracle of the architecture matrix: nothing here goes through TransformerLens or
mi_lenses.

* **Lens rows**: the HF model run with a forward pre-hook on its final norm (or, without one, on the module that
  reads the last block: OPT-350m's ``project_out``) that replaces the norm's input with the residual state of a row
  (the input of block ``l``, captured by pre-hooks on the blocks). Whatever follows (project_out, lm_head, logit
  scaling, soft-capping) is the model's own code.
* **Direct logit attribution**: every head's output ``z_h @ W_O[h]`` from the HF attention module's own output
  projection and its input, every MLP's output and every neuron's ``act_n * W_down[:, n]`` from the HF modules (MoE:
  the router and the experts' weights, the shared expert and its gate), each carried to the logit by the frozen-scale
  linearisation of every norm on its way (sublayer post-norms, post-LN residual norms, the final norm) with the scales
  taken from the HF run, times the residual multiplier; the logit direction itself is read off the HF head by running
  it on the basis vectors.
* **Attention**: ``output_attentions=True`` (eager attention).

Each norm's formula is checked against the HF module on the input it saw in the run, so the oracle cannot silently
use the wrong formula.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from archs import hf_final_module, hf_layers
from tolerance import EPS

# Norms that the HF blocks apply to a sublayer's output before adding it ("post-norms"), per configuration:
# (after attention, after the MLP). Names differ between families (Llama's post_attention_layernorm is a pre-MLP norm).
POST_NORMS = {
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3_attn_softcap": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "olmo3": ("post_attention_layernorm", "post_feedforward_layernorm"),
}
# Post-LN blocks: norms applied to the residual stream itself after each add (OPT with do_layer_norm_before=False).
RESID_NORMS = {"opt_350m": ("self_attn_layer_norm", "final_layer_norm")}


def _first(mod: Any, names: tuple[str, ...]) -> Any:
    for n in names:
        sub = getattr(mod, n, None)
        if isinstance(sub, torch.nn.Module):
            return sub
    return None


def attention_module(block: torch.nn.Module) -> torch.nn.Module:
    return _first(block, ("self_attn", "attn", "attention", "self_attention"))


def out_projection(attn: torch.nn.Module) -> torch.nn.Module:
    names = ("o_proj", "c_proj", "dense", "out_proj")
    # GPT-Neo nests its self-attention; JetMoE's mixture of attention experts has no single output projection (None)
    return _first(attn, names) or _first(getattr(attn, "attention", None), names)


def mlp_module(block: torch.nn.Module) -> torch.nn.Module | None:
    return _first(block, ("mlp", "block_sparse_moe", "feed_forward", "ffn"))  # MPT: ffn


def router(mlp: torch.nn.Module) -> torch.nn.Module | None:
    return _first(mlp, ("gate", "router"))


def is_moe(mlp: torch.nn.Module | None) -> bool:
    return mlp is not None and hasattr(mlp, "experts") and router(mlp) is not None


def down_projection(block: torch.nn.Module) -> torch.nn.Module:
    mlp = mlp_module(block)
    return _first(mlp, ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out")) if mlp is not None else block.fc2


def _weight_out_in(lin: torch.nn.Module) -> Tensor:
    """A linear layer's weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``)."""
    w = lin.weight.detach().double()
    return w.T if type(lin).__name__ == "Conv1D" else w


# ------------------------------------------------------------------------------------------------ norms
@dataclass
class NormFormula:
    """``gain * centre?(x) / sqrt(mean(centre?(x)^2) + eps) + bias`` of an HF norm module."""

    centre: bool
    gain: Tensor
    bias: Tensor | None
    eps: float

    @classmethod
    def of(cls, mod: torch.nn.Module, d: int) -> "NormFormula":
        name = type(mod).__name__
        w = getattr(mod, "weight", None)
        gain = torch.ones(d, dtype=torch.float64) if w is None else w.detach().double()
        if ("Gemma" in name and "RMSNorm" in name) or name.endswith("LayerNorm1P"):
            gain = 1.0 + gain
        b = getattr(mod, "bias", None)
        eps = next(float(v) for v in (getattr(mod, "variance_epsilon", None), getattr(mod, "eps", None),
                                      getattr(mod, "epsilon", None), 1e-5) if v is not None)
        return cls("RMSNorm" not in name, gain, None if b is None else b.detach().double(), eps)

    def scale(self, x: Tensor) -> Tensor:
        x = x.double()
        if self.centre:
            x = x - x.mean(-1, keepdim=True)
        return torch.sqrt(x.pow(2).mean(-1) + self.eps)

    def apply(self, x: Tensor) -> Tensor:
        x = x.double()
        y = (x - x.mean(-1, keepdim=True)) if self.centre else x
        y = self.gain * y / self.scale(x)[..., None]
        return y if self.bias is None else y + self.bias

    def pullback(self, d: Tensor, x: Tensor) -> Tensor:
        """The direction ``d`` on the norm's output taken back to its input, with the scale frozen at ``x``."""
        v = self.gain * d
        if self.centre:
            v = v - v.mean(-1, keepdim=True)
        return v / self.scale(x)

    def constant(self, d: Tensor) -> Tensor:
        return torch.zeros((), dtype=torch.float64) if self.bias is None else self.bias @ d


def _checked(mod: torch.nn.Module, x: Tensor, d: int, what: str) -> NormFormula:
    f = NormFormula.of(mod, d)
    with torch.no_grad():
        ref = mod(x)
    err = (f.apply(x) - ref.double()).abs().max().item()
    assert err < 1024 * EPS, f"oracle norm formula for {what} ({type(mod).__name__}) is off by {err:.2e}"
    return f


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class HFRun:
    """One HF forward pass of ``tokens`` (batch 1) with what the oracles need captured."""

    logits: Tensor
    block_in: list[Tensor]  # input of each block, [S, d]
    final_in: Tensor  # input of the final norm (or of project_out), [S, d]
    z: list[Tensor]  # input of each attention output projection, [S, H * d_head]
    mlp_out: list[Tensor]  # what each MLP (down projection, or the MoE block) returns, [S, d]
    mlp_act: list[Tensor | None]  # input of each dense down projection, [S, d_mlp]
    mlp_in: list[Tensor | None]  # input of each MoE block, [S, d]
    attn_out: list[Tensor]  # output of each attention output projection, [S, d]
    norm_in: dict[tuple[int, str], Tensor] = field(default_factory=dict)  # inputs of post-norms / residual norms
    attentions: tuple = ()


def _tensor(x: Any) -> Tensor:
    return x[0] if isinstance(x, tuple) else x


@torch.no_grad()
def hf_run(name: str, hf: torch.nn.Module, tokens: Tensor) -> HFRun:
    layers = hf_layers(hf)
    final, _ = hf_final_module(hf)
    got: dict[Any, Tensor] = {}
    handles = []

    def keep_in(key):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            got[key] = x[0].detach().clone() if x.dim() == 3 else x.detach().clone()
        return hook

    def keep_out(key):
        def hook(mod, args, out):
            t = _tensor(out)
            got[key] = t[0].detach().clone() if t.dim() == 3 else t.detach().clone()
        return hook

    handles.append(final.register_forward_pre_hook(keep_in("final"), with_kwargs=True))
    for l, block in enumerate(layers):
        handles.append(block.register_forward_pre_hook(keep_in(("block", l)), with_kwargs=True))
        o = out_projection(attention_module(block))
        if o is not None:
            handles.append(o.register_forward_pre_hook(keep_in(("z", l)), with_kwargs=True))
            handles.append(o.register_forward_hook(keep_out(("attn_out", l))))
        mlp = mlp_module(block)
        if is_moe(mlp):
            handles.append(mlp.register_forward_pre_hook(keep_in(("mlp_in", l)), with_kwargs=True))
            handles.append(mlp.register_forward_hook(keep_out(("mlp_out", l))))
        else:
            down = down_projection(block)
            handles.append(down.register_forward_pre_hook(keep_in(("act", l)), with_kwargs=True))
            handles.append(down.register_forward_hook(keep_out(("mlp_out", l))))
        for attr in POST_NORMS.get(name, ()) + RESID_NORMS.get(name, ()):
            handles.append(getattr(block, attr).register_forward_pre_hook(keep_in(("norm", l, attr)),
                                                                          with_kwargs=True))
    try:
        out = hf(tokens, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    L = len(layers)
    S = tokens.shape[1]

    def seq(t: Tensor | None) -> Tensor | None:  # OPT flattens [B*S, d] inside its MLP
        return None if t is None else t.reshape(S, -1)

    return HFRun(
        logits=out.logits[0].detach().double(),
        block_in=[got[("block", l)] for l in range(L)],
        final_in=got["final"],
        z=[seq(got.get(("z", l))) for l in range(L)],
        mlp_out=[seq(got[("mlp_out", l)]) for l in range(L)],
        mlp_act=[seq(got.get(("act", l))) for l in range(L)],
        mlp_in=[seq(got.get(("mlp_in", l))) for l in range(L)],
        attn_out=[seq(got.get(("attn_out", l))) for l in range(L)],
        norm_in={(k[1], k[2]): seq(v) for k, v in got.items() if isinstance(k, tuple) and k[0] == "norm"},
        attentions=tuple(a[0].detach().double() for a in out.attentions),
    )


@torch.no_grad()
def row_logits(hf: torch.nn.Module, tokens: Tensor, state: Tensor) -> Tensor:
    """The HF model's logits ``[S, V]`` with its final norm's input (or project_out's) replaced by ``state``."""
    final, _ = hf_final_module(hf)

    def replace(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        new = state.to(x.dtype).reshape(x.shape)
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    h = final.register_forward_pre_hook(replace, with_kwargs=True)
    try:
        return hf(tokens).logits[0].double()
    finally:
        h.remove()


@torch.no_grad()
def lens_rows(hf: torch.nn.Module, tokens: Tensor, run: HFRun) -> Tensor:
    """Oracle logit-lens logits ``[L + 1, S, V]``: rows embed (block 0's input), inputs of blocks 1..L-1, final."""
    return torch.stack([row_logits(hf, tokens, s) for s in [*run.block_in, run.final_in]])


# ------------------------------------------------------------------------------------------------ DLA
def _softcap(hf: torch.nn.Module) -> float | None:
    cap = getattr(hf.config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def uncap(hf: torch.nn.Module, z: Tensor) -> Tensor:
    cap = _softcap(hf)
    return z if cap is None else cap * torch.atanh(z / cap)


@torch.no_grad()
def readout_vector(hf: torch.nn.Module, tokens: Tensor, answer: int, wrong: int) -> tuple[Tensor, bool]:
    """``u`` with ``logit[answer] - logit[wrong] = u · y + const`` for ``y`` the final norm's output (or
    project_out's input without a final norm), read off the HF head on the basis vectors (soft-cap undone).
    Returns ``(u, after_norm)``."""
    final, kind = hf_final_module(hf)
    d = hf.config.hidden_size
    basis = torch.cat([torch.zeros(1, d), torch.eye(d)])[None]  # [1, d + 1, d]: 0, e_1 .. e_d

    if kind == "norm":
        def replace(mod, args, out):
            return basis.to(_tensor(out).dtype)
        h = final.register_forward_hook(replace)
    else:
        def replace_in(mod, args, kwargs):
            x = basis.to((args[0] if args else kwargs["hidden_states"]).dtype)
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
        h = final.register_forward_pre_hook(replace_in, with_kwargs=True)
    try:
        z = uncap(hf, hf(tokens[:, :1].expand(1, d + 1)).logits[0].double())  # [d + 1, V]: one row per vector
    finally:
        h.remove()
    lin = z[1:] - z[:1]
    return lin[:, answer] - lin[:, wrong], kind == "norm"


@dataclass
class DLAOracle:
    """Per-layer direct effects on ``logit[answer] - logit[wrong]`` at one position (float64)."""

    logit_diff: float  # the model's own (pre-soft-cap) logit difference
    heads: Tensor  # [L, H]
    mlps: Tensor  # [L]
    neurons: list[Tensor]  # per layer [d_mlp] (MoE: experts' neurons, router-weighted, then the shared expert's)
    experts: list[Tensor | None]  # per layer [E (+1 shared)] for MoE layers


INPUT_NORMS = ("input_layernorm", "ln_1", "self_attn_layer_norm", "ln_attn")
# where TransformerLens's compatibility mode does not fold the input norm into W_V (its adapters say why: LayerNorm1P
# stores gains as offsets from 1), so only the value projection's own bias moves into b_O
NO_LN_FOLD = {"nemotron"}


@torch.no_grad()
def value_bias_z(name: str, hf: torch.nn.Module, tokens: Tensor, pos: int = -1) -> list[Tensor]:
    """Per layer, the attention output before its projection (``[H * d_head]``) when every position's input is what
    the input norm gives for a zero normalised vector (its bias; zero without one): each head's value bias, the
    input-independent part of ``z`` that TransformerLens's compatibility mode moves into ``b_O``
    (``fold_value_biases``, after folding the norm into ``W_V``)."""
    out = []
    for block in hf_layers(hf):
        attn = attention_module(block)
        norm = None if name in RESID_NORMS or name in NO_LN_FOLD else _first(block, INPUT_NORMS)
        beta = getattr(norm, "bias", None) if norm is not None else None
        got = {}

        def replace(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            b = torch.zeros(x.shape[-1], dtype=x.dtype) if beta is None else beta.detach().to(x.dtype)
            new = b.expand_as(x).clone()
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        def keep(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            got["z"] = x.reshape(tokens.shape[1], -1)[pos].detach().double()

        hs = [attn.register_forward_pre_hook(replace, with_kwargs=True),
              out_projection(attn).register_forward_pre_hook(keep, with_kwargs=True)]
        try:
            hf(tokens)
        finally:
            for h in hs:
                h.remove()
        out.append(got["z"])
    return out


@torch.no_grad()
def dla_oracle(name: str, hf: torch.nn.Module, tokens: Tensor, run: HFRun, answer: int, wrong: int,
               pos: int = -1, value_bias_folded: bool = False) -> DLAOracle:
    """``value_bias_folded``: TransformerLens's compatibility-mode convention, where each head's value bias
    (:func:`value_bias_z`) belongs to the layer's ``b_O`` rather than to the head."""
    cfg = hf.config
    d = cfg.hidden_size
    layers = hf_layers(hf)
    L = len(layers)
    H = cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.n_head
    u, after_norm = readout_vector(hf, tokens, answer, wrong)
    final, _ = hf_final_module(hf)
    x_final = run.final_in[pos].double()
    if after_norm:
        dirn = _checked(final, run.final_in, d, "the final norm").pullback(u, x_final)
    else:
        dirn = u
    mult = float(getattr(cfg, "residual_multiplier", 1.0) or 1.0)
    heads, mlps = torch.zeros(L, H), torch.zeros(L)
    neurons: list[Tensor] = [torch.zeros(0)] * L
    experts: list[Tensor | None] = [None] * L
    post = POST_NORMS.get(name)
    vb = value_bias_z(name, hf, tokens, pos) if value_bias_folded else None
    resid = RESID_NORMS.get(name)
    for l in reversed(range(L)):
        block = layers[l]
        attn_dir = mlp_dir = dirn
        if resid is not None:  # resid_post = LN2(resid_mid + mlp), resid_mid = LN1(resid_pre + attn)
            ln1 = _checked(getattr(block, resid[0]), run.norm_in[(l, resid[0])], d, f"L{l}.{resid[0]}")
            ln2 = _checked(getattr(block, resid[1]), run.norm_in[(l, resid[1])], d, f"L{l}.{resid[1]}")
            mlp_dir = ln2.pullback(dirn, run.norm_in[(l, resid[1])][pos])
            attn_dir = ln1.pullback(mlp_dir, run.norm_in[(l, resid[0])][pos])
            dirn = attn_dir
        if post is not None:
            pa = _checked(getattr(block, post[0]), run.norm_in[(l, post[0])], d, f"L{l}.{post[0]}")
            pm = _checked(getattr(block, post[1]), run.norm_in[(l, post[1])], d, f"L{l}.{post[1]}")
            attn_dir = pa.pullback(attn_dir, run.norm_in[(l, post[0])][pos])
            mlp_dir = pm.pullback(mlp_dir, run.norm_in[(l, post[1])][pos])
        attn_dir, mlp_dir = attn_dir * mult, mlp_dir * mult
        W_O = _weight_out_in(out_projection(attention_module(block)))  # [d, H * dh]
        z = run.z[l][pos].double()
        if value_bias_folded:
            z = z - vb[l]
        dh = z.shape[-1] // H
        for h in range(H):
            sl = slice(h * dh, (h + 1) * dh)
            heads[l, h] = float((z[sl] @ W_O[:, sl].T) @ attn_dir)
        mlps[l] = float(run.mlp_out[l][pos].double() @ mlp_dir)
        mlp = mlp_module(block)
        if is_moe(mlp):
            neurons[l], experts[l] = _moe_neurons(mlp, run.mlp_in[l][pos].double(), mlp_dir)
        else:
            W_down = _weight_out_in(down_projection(block))  # [d, d_mlp]
            neurons[l] = (run.mlp_act[l][pos].double() * (mlp_dir @ W_down)).float()
    diff = run.logits[pos, answer] - run.logits[pos, wrong]
    cap = _softcap(hf)
    if cap is not None:
        z = run.logits[pos]
        diff = uncap(hf, z[answer]) - uncap(hf, z[wrong])
    return DLAOracle(float(diff), heads, mlps, neurons, experts)


# --- issue 26: MLA and MoE
POST_NORMS.update({"flex_olmo": ("post_attention_layernorm", "post_feedforward_layernorm"),
                   "afmoe": ("post_attention_layernorm", "post_mlp_layernorm")})


def _moe_neurons(mlp: torch.nn.Module, x: Tensor, dirn: Tensor) -> tuple[Tensor, Tensor]:
    """Every expert's neurons (router-weighted, zero where not routed; a down-projection bias is one more per expert),
    then the shared expert's (times its gate, its bias last); and the per-expert (and shared) totals.

    The HF block's output is linear in its down projections' weights and biases (the routing does not read them), so
    ``out · dirn = Σ_w w ∂(out · dirn)/∂w``: one backward pass through the block itself (its router, scaling factors,
    gates and activations) splits it exactly per weight, summed here per neuron. Nothing of the layout is assumed
    but which axis of a down projection indexes neurons (the one that is not d_model)."""
    d = x.shape[-1]
    ex = mlp.experts
    shared = _first(mlp, ("shared_expert", "shared_experts"))
    params = [ex.down_proj, getattr(ex, "down_proj_bias", None)]
    if shared is not None:
        params += [shared.down_proj.weight, shared.down_proj.bias]
    live = [p for p in params if p is not None]
    with torch.enable_grad():
        out = mlp(x[None, None].to(ex.down_proj.dtype))
        grads = dict(zip(map(id, live), torch.autograd.grad(_tensor(out).reshape(-1, d)[0].double() @ dirn, live,
                                                             allow_unused=True)))

    def split(p: Tensor | None) -> Tensor | None:  # each weight times its gradient
        if p is None:
            return None
        g = grads[id(p)]
        return (p.detach().double() * (torch.zeros_like(p) if g is None else g).double())

    per = split(ex.down_proj)  # [E, d, I] or [E, I, d]
    parts = per.sum(1) if ex.down_proj.shape[1] == d else per.sum(2)  # [E, I]
    if params[1] is not None:
        parts = torch.cat([parts, split(params[1]).sum(-1, keepdim=True)], -1)
    neurons, totals = [parts.reshape(-1)], [parts.sum(-1)]
    if shared is not None:
        s = split(params[2]).sum(0)
        if params[3] is not None:
            s = torch.cat([s, split(params[3]).sum()[None]])
        neurons.append(s)
        totals.append(s.sum()[None])
    return torch.cat(neurons).float(), torch.cat(totals).float()
# --- end


# --- issue 26: attention masks
# Post-sublayer norms of the windowed variants (as their full-attention configurations).
POST_NORMS.update({name: ("post_attention_layernorm", "post_feedforward_layernorm")
                   for name in ("gemma2_window", "gemma3_window", "olmo3_window", "exaone4_window")})
# Where compatibility mode leaves each head's value bias in the head (TransformerLens 4.3 does not fold GPT-OSS's: right,
# since with learned attention sinks a pattern row sums to less than one, so the bias is not a constant of b_O).
VALUE_BIAS_KEPT = {"gpt_oss", "gpt_oss_window"}


def hf_pattern(hf: torch.nn.Module, layer: int, scores: Tensor, hf_attn: Tensor, heads: slice = slice(None)) -> Tensor:
    """The pattern HF's eager attention makes of ``scores`` ``[H, Q, K]`` (``scale · q · k`` of the query heads
    ``heads``): soft-capped by the config's ``attn_logit_softcapping``, masked where HF's own pattern ``hf_attn`` is
    exactly 0 (its causal, sliding-window or chunked mask), and softmaxed with the attention module's learned sink
    logits (``sinks``, GPT-OSS) as one more column that is dropped afterwards."""
    cap = getattr(hf.config, "attn_logit_softcapping", None)
    s = scores.double()
    if cap:
        s = cap * torch.tanh(s / cap)
    s = s.masked_fill(hf_attn == 0, -torch.inf)
    sinks = getattr(attention_module(hf_layers(hf)[layer]), "sinks", None)
    if sinks is None:
        return s.softmax(-1)
    col = sinks.detach().double()[heads][:, None, None].expand(*s.shape[:-1], 1)
    return torch.cat([s, col], -1).softmax(-1)[..., :-1]
# --- end


# --- issue 26: state-space and hybrid
# State-space and hybrid blocks, from the HF modules alone: each block's token mixer without heads (an SSM, linear
# attention, a short convolution, RWKV's time-mix; attention TransformerLens does not split into heads) is that
# module's output; a block TransformerLens wraps whole (RecurrentGemma, Zamba 2's hybrid layers) is its output minus
# its input; heads, MLPs and dense neurons as above. Every part is carried to the logit through the post-norms and
# the residual multiplier of its block and the final norm (scale frozen from the run).
HYBRID_FINAL = ("norm_f", "ln_out", "final_norm", "embedding_norm", "final_layernorm", "norm")
HYBRID_MIXERS = ("mixer", "mamba", "linear_attn", "conv", "attention",  # token mixers without heads
                 "self_attention")  # JetMoE's mixture of attention experts (no per-head W_O)
HYBRID_MLPS = ("mlp", "feed_forward", "shared_mlp")
HYBRID_WHOLE = {"recurrent_gemma"}  # TransformerLens wraps every block whole
# MLPs with no dense down projection to split into neurons (RWKV's channel-mix, JetMoE's experts in one 3-D
# weight)
NO_NEURON_ORACLE = {"rwkv", "jetmoe"}


def hybrid_final(hf: torch.nn.Module) -> torch.nn.Module:
    return _first(hf.base_model, HYBRID_FINAL)


@dataclass
class HybridOracle:
    """Per-layer direct effects on ``logit[answer] - logit[wrong]`` at the last position, the lens rows and the
    attention layers' patterns of one HF run (float64)."""

    logit_diff: float
    lens: Tensor  # [L + 1, S, V]
    heads: Tensor  # [L, H], zero where a block has no heads
    mixers: Tensor  # [L], zero on blocks with heads
    mlps: Tensor  # [L]
    neurons: list[Tensor | None]  # dense MLPs' neurons, None elsewhere
    patterns: dict[int, Tensor]  # attention layer -> [H, S, S]


def _kind(name: str, block: torch.nn.Module) -> str:
    """``"heads"``, ``"mixer"``, ``"mlp"`` (Nemotron-H's MLP blocks) or ``"whole"``."""
    if name in HYBRID_WHOLE:
        return "whole"
    if _first(block, ("self_attn",)) is not None:
        return "heads"
    mixer = _first(block, HYBRID_MIXERS)
    if mixer is None:
        return "whole"
    return "mlp" if "MLP" in type(mixer).__name__ else "mixer"


def _hybrid_norm(mod: torch.nn.Module, x: Tensor, d: int, what: str) -> NormFormula:
    """:func:`_checked`, with the ``(1 + w)`` gain of Qwen3-Next / Qwen3.5's zero-centred RMSNorm."""
    if "Qwen3" in type(mod).__name__:
        f = NormFormula.of(mod, d)
        f = NormFormula(f.centre, 1.0 + f.gain, f.bias, f.eps)
        err = (f.apply(x) - mod(x).double()).abs().max().item()
        assert err < 1024 * EPS, f"oracle norm formula for {what} ({type(mod).__name__}) is off by {err:.2e}"
        return f
    return _checked(mod, x, d, what)


@torch.no_grad()
def hybrid_oracle(name: str, hf: torch.nn.Module, tokens: Tensor, answer: int, wrong: int) -> HybridOracle:
    cfg = hf.config
    layers = hf_layers(hf)
    L, S = len(layers), tokens.shape[1]
    H = getattr(cfg, "num_attention_heads", 1)
    final = hybrid_final(hf)
    got: dict[Any, Tensor] = {}
    handles = []

    def keep(key, out=False):
        def hook(mod, args, kwargs, output=None):
            x = _tensor(output) if out else (args[0] if args else kwargs.get("hidden_states"))
            got[key] = x.detach().clone()
        if out:
            return lambda mod, args, kwargs, output: hook(mod, args, kwargs, output)
        return hook

    def pattern(l):
        def hook(mod, args, kwargs, output):
            got[("pattern", l)] = output[1][0].detach().double()
        return hook

    kinds = [_kind(name, b) for b in layers]
    handles.append(final.register_forward_pre_hook(keep("final"), with_kwargs=True))
    for l, block in enumerate(layers):
        handles.append(block.register_forward_pre_hook(keep(("in", l)), with_kwargs=True))
        handles.append(block.register_forward_hook(keep(("out", l), True), with_kwargs=True))
        if kinds[l] == "heads":
            attn = block.self_attn
            handles.append(out_projection(attn).register_forward_pre_hook(keep(("z", l)), with_kwargs=True))
            handles.append(attn.register_forward_hook(pattern(l), with_kwargs=True))
        elif kinds[l] in ("mixer", "mlp"):
            handles.append(_first(block, HYBRID_MIXERS).register_forward_hook(keep(("mixer", l), True),
                                                                             with_kwargs=True))
        mlp = _first(block, HYBRID_MLPS) if kinds[l] in ("heads", "mixer") else None
        if mlp is not None:
            handles.append(mlp.register_forward_hook(keep(("mlp", l), True), with_kwargs=True))
            down = _first(mlp, ("down_proj", "output_linear", "value"))
            if down is not None and not is_moe(mlp) and name not in NO_NEURON_ORACLE:
                handles.append(down.register_forward_pre_hook(keep(("act", l)), with_kwargs=True))
        for attr in ("post_attention_layernorm", "post_feedforward_layernorm"):
            if _first(block, ("post_feedforward_layernorm",)) is not None:  # OLMo-style post-norms
                handles.append(getattr(block, attr).register_forward_pre_hook(keep(("norm", l, attr)),
                                                                              with_kwargs=True))
    try:
        out = hf(tokens)
    finally:
        for h in handles:
            h.remove()
    logits = out.logits[0].double()

    def row(state: Tensor) -> Tensor:
        def replace(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            new = state.to(x.dtype).reshape(x.shape)
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
        h = final.register_forward_pre_hook(replace, with_kwargs=True)
        try:
            return hf(tokens).logits[0].double()
        finally:
            h.remove()

    lens = torch.stack([row(s) for s in [*(got[("in", l)] for l in range(L)), got["final"]]])
    # the readout direction: the HF head on the basis vectors after the final norm (soft-cap undone)
    d = cfg.hidden_size
    cap = getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logits_soft_cap", None)
    uncap_ = (lambda z: z) if not cap else (lambda z: cap * torch.atanh(z / cap))
    basis = torch.cat([torch.zeros(1, d), torch.eye(d)])[None]
    h = final.register_forward_hook(lambda mod, args, o: basis.to(_tensor(o).dtype))
    try:
        z = uncap_(hf(tokens[:, :1].expand(1, d + 1)).logits[0].double())
    finally:
        h.remove()
    lin = z[1:] - z[:1]
    u = lin[:, answer] - lin[:, wrong]
    x_final = got["final"][0, -1].double()
    dirn = _hybrid_norm(final, got["final"][0], d, "the final norm").pullback(u, x_final)
    mult = float(getattr(cfg, "residual_multiplier", 1.0) or 1.0)
    heads, mixers, mlps = torch.zeros(L, H), torch.zeros(L), torch.zeros(L)
    neurons: list[Tensor | None] = [None] * L
    patterns: dict[int, Tensor] = {}
    for l, block in enumerate(layers):
        a_dir = m_dir = dirn * mult
        if ("norm", l, "post_attention_layernorm") in got:
            for attr in ("post_attention_layernorm", "post_feedforward_layernorm"):
                x = got[("norm", l, attr)][0]
                f = _hybrid_norm(getattr(block, attr), x, d, f"L{l}.{attr}")
                if attr.startswith("post_attention"):
                    a_dir = f.pullback(a_dir, x[-1])
                else:
                    m_dir = f.pullback(m_dir, x[-1])
        kind = kinds[l]
        if kind == "whole":
            mixers[l] = float((got[("out", l)][0, -1] - got[("in", l)][0, -1]).double() @ dirn)
        elif kind == "heads":
            W_O = _weight_out_in(out_projection(block.self_attn))
            zl = got[("z", l)].reshape(S, -1)[-1].double()
            dh = zl.shape[-1] // H
            for hh in range(H):
                sl = slice(hh * dh, (hh + 1) * dh)
                heads[l, hh] = float((zl[sl] @ W_O[:, sl].T) @ a_dir)
            patterns[l] = got[("pattern", l)]
        elif kind == "mixer":
            mixers[l] = float(got[("mixer", l)].reshape(S, -1)[-1].double() @ a_dir)
        else:
            mlps[l] = float(got[("mixer", l)].reshape(S, -1)[-1].double() @ m_dir)
        if ("mlp", l) in got:
            mlps[l] = float(got[("mlp", l)].reshape(S, -1)[-1].double() @ m_dir)
        if ("act", l) in got:
            mlp = _first(block, HYBRID_MLPS)
            W_down = _weight_out_in(_first(mlp, ("down_proj", "output_linear", "value")))
            neurons[l] = (got[("act", l)].reshape(S, -1)[-1].double() * (m_dir @ W_down)).float()
    diff = float(uncap_(logits[-1, answer]) - uncap_(logits[-1, wrong]))
    return HybridOracle(diff, lens, heads, mixers, mlps, neurons, patterns)
# --- end


# --- issue 26: the rest of the registry
# GLM-4's post-sublayer norms (its post_attention_layernorm is the pre-MLP norm)
POST_NORMS["glm4"] = ("post_self_attn_layernorm", "post_mlp_layernorm")
# --- end
