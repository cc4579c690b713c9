"""Architectures whose TransformerLens bridge lacks a piece an analysis needs, refused by name.

Each entry names the Hugging Face architecture (``config.architectures[0]``), what is missing and which analyses it
breaks (measured by the architecture matrix, ``tests/arch_matrix.py``, against the Hugging Face model alone):
``"load"`` (nothing mi_lenses offers would be right: ``load_model`` raises ``ModelLoadError``), ``"dla"`` (direct
logit attribution and neuron attribution raise ``LensInputError``), ``"qk"`` (``attention()`` gives the patterns and
a ``qk_note`` instead of the q·k terms). Every message names the architecture, the missing piece and the
TransformerLens version, so that an exception is never an unexplained ``KeyError`` deep in a hook lookup.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from mi_lenses.errors import LensInputError, ModelLoadError
from mi_lenses.models.parity import versions

GAPS: dict[str, tuple[str, str]] = {
    "OpenAIGPTLMHeadModel": ("load", "its bridge has no blocks.*.hook_resid_post (the residual stream every lens, "
                                     "direct logit attribution and Patchscope read)"),
    "ModernBertDecoderForCausalLM": ("load", "its bridge leaves out the prediction head (dense, activation, norm) "
                                             "between the final norm and the decoder, so no logit it decodes is "
                                             "the model's"),
    "HrmTextForCausalLM": ("load", "its bridge has no blocks (two recurrent stacks, L_blocks and "
                                   "H_blocks, that run H_cycles * (L_cycles + 1) times in one forward) "
                                   "and no blocks.*.hook_resid_pre/post, so there is no residual stream "
                                   "of one layer for a lens, direct logit attribution or Patchscope"),
    "DeepseekV4ForCausalLM": ("load", "DeepSeek V4 carries hc_mult residual streams mixed by "
                                      "hyper-connections between blocks, and its bridge has no "
                                      "blocks.*.hook_resid_pre/post (one residual stream for a lens, "
                                      "direct logit attribution or Patchscope) nor attention heads"),
    "XGLMForCausalLM": ("dla", "its bridge has no hook_pos_embed (XGLM's sinusoidal positions, one of the parts)"),
    "Gemma4ForCausalLM": ("dla", "its per-layer attention geometry (sliding and full layers of different head "
                                 "widths) cannot be split into TransformerLens's per-head weights"),
    "NanoChatForCausalLM": ("dla", "NanoChat normalises the embeddings before block 0, while the bridge's hook_embed "
                                   "holds them raw, so the embedding part would not be what the blocks read"),
    "BitNetForCausalLM": ("dla", "BitNet normalises the attention output (attn_sub_norm) before o_proj, so a head's "
                                 "output is not its value mixture times W_O (no per-head or per-source split)"),
    "FalconH1ForCausalLM": ("dla", "Falcon-H1 runs attention and Mamba 2 in parallel in each block and scales them "
                                   "by muP multipliers the bridge's hooks do not see, so the parts do not sum to the "
                                   "logit"),
    "HunYuanDenseV1ForCausalLM": ("qk", "Hunyuan normalises its queries and keys after the rotation, while the "
                                        "bridge's hook_rot_q/hook_rot_k hold them before that norm"),
}


# Hugging Face classes TransformerLens registers under another spelling (the same class: its adapter reads the
# native module names). load_model boots them under TransformerLens's name.
ALIASES = {"PhimoeForCausalLM": "PhiMoEForCausalLM"}


@contextmanager
def registry_alias(hf_model: Any) -> Iterator[None]:
    """While TransformerLens wraps ``hf_model``, spell its architecture the way TransformerLens's registry does
    (:data:`ALIASES`); the HF config is restored afterwards."""
    config = getattr(hf_model, "config", None)
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a in ALIASES for a in archs):
        yield
        return
    config.architectures = [ALIASES.get(a, a) for a in archs]
    try:
        yield
    finally:
        config.architectures = archs


def architecture(model: Any) -> str | None:
    """The Hugging Face architecture of a bridge (``config.architectures[0]``, else the class name); ``None`` for a
    HookedTransformer."""
    hf = getattr(model, "original_model", None)
    if hf is None:
        return None
    archs = getattr(getattr(hf, "config", None), "architectures", None) or [type(hf).__name__]
    return str(archs[0])


def gap(model: Any, what: str, *, with_versions: bool = True) -> str | None:
    """Why analysis ``what`` (``"load"``, ``"dla"``, ``"qk"``) is refused on ``model`` (``"<architecture> under
    <versions>: <why>"``), or ``None``."""
    arch = architecture(model)
    kind, why = GAPS.get(arch or "", (None, ""))
    if kind != what:
        return None
    return f"{arch} under {versions()}: {why}" if with_versions else f"{arch}: {why}"


def refuse_load(model: Any) -> None:
    """Raise ``ModelLoadError`` when ``model``'s architecture is refused at load."""
    why = gap(model, "load")
    if why:
        raise ModelLoadError(f"mi_lenses cannot analyse {why}. Load it with another TransformerLens version, or use "
                             "another model.")


def refuse(model: Any, what: str, analysis: str) -> None:
    """Raise ``LensInputError`` when ``analysis`` (its name, for the message) is refused on ``model``."""
    why = gap(model, what)
    if why:
        raise LensInputError(f"{analysis} is not available on {why}. The lenses, Patchscope and attention() work "
                             "on it.")
