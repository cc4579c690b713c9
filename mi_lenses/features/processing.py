"""The weight processing a dictionary's activations were read under, checked against the model it runs on.

TransformerLens's compatibility mode (and a ``HookedTransformer`` loaded with its defaults) changes what some hooks
hold: folding each norm's gain into the next weights leaves a norm's output without the gain
(``blocks.3.mlp.hook_in`` of SmolLM2 on "The capital of France is": a largest difference of 21.9 from the Hugging Face
MLP's input, whose largest entry is 1.2), and on
LayerNorm models centring the writing weights removes the mean of everything written into the residual stream. A
dictionary trained on one and run on the other reads the wrong vectors: its features are silently wrong, though
``decode(encode(x)) + error == x`` still holds. So every dictionary records where it was read:

=================  =====================================================================================
``norm_folded``    the norms' gains were folded (compatibility mode; sparsify and circuit-tracer files:
                   False, they read the Hugging Face modules; SAELens: its ``fold_ln``, default True)
``residual_centered``  the residual stream was mean-free (LayerNorm models only; SAELens: its
                   ``center_writing_weights``, default True)
``value_bias_folded``  the value biases were moved into ``b_O`` (``hook_z`` and ``hook_v`` lose them;
                   models with value biases only; SAELens: its ``fold_value_biases``, default True)
=================  =====================================================================================

and :func:`check_processing` refuses a dictionary whose hooks depend on a setting the model does not share, naming
the fix. A dictionary without a record (a folder of ours written without ``model=``) is not checked.

Example:
    >>> processing(ModelView(model))                   # the test model: a raw bridge
    {'norm_folded': False, 'residual_centered': False, 'value_bias_folded': False}
    >>> depends_on("blocks.3.mlp.hook_in"), depends_on("blocks.3.hook_mlp_in"), depends_on("blocks.3.attn.hook_z")
    (('norm_folded',), ('residual_centered',), ('value_bias_folded',))
    >>> depends_on("blocks.3.ln2.hook_normalized"), depends_on("blocks.3.mlp.hook_post")    # the same in every mode
    ((), ())
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mi_lenses.errors import LensInputError
from mi_lenses.models.identity import residual_is_centered

if TYPE_CHECKING:
    from mi_lenses.features.dictionary import Dictionary
    from mi_lenses.models.view import ModelView

KEYS = ("norm_folded", "residual_centered", "value_bias_folded")
# A module's input straight after a norm: holds the norm's gain only when it is not folded into the module's weights
# (``ln*.hook_normalized`` is read before the gain in both modes, so it does not depend on folding).
_NORM_OUTPUTS = ("mlp.hook_in", "attn.hook_in")
# What is written into (or is) the residual stream: mean-free when TransformerLens centres the writing weights.
_RESIDUAL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out", "mlp.hook_out",
             "attn.hook_out", "hook_embed", "hook_pos_embed", "hook_mlp_in", "hook_attn_in", "hook_q_input",
             "hook_k_input", "hook_v_input", "ln1.hook_in", "ln2.hook_in", "hook_in", "hook_out", "ln_final.hook_in",
             "embed.hook_out")
_VALUES = ("attn.hook_z", "attn.hook_v")  # per-head values: without the value bias when it is folded into b_O
RAW = {"norm_folded": False, "residual_centered": False, "value_bias_folded": False}  # the Hugging Face modules' values (sparsify, circuit-tracer)


def processing(view: "ModelView") -> dict[str, bool]:
    """The model's side: whether its norms' gains are folded and its residual stream is mean-free."""
    return {"norm_folded": bool(view.is_compat), "residual_centered": residual_is_centered(view),
            "value_bias_folded": _value_bias_folded(view)}


def _value_bias_folded(view: "ModelView") -> bool:
    """A bridge folds value biases exactly in compatibility mode; a ``HookedTransformer`` may fold the norms but not
    the value biases (``fold_value_biases=False``), so there it is read off the weights: no non-zero ``b_V`` left."""
    if view.is_bridge:
        return bool(view.is_compat)
    b = getattr(view.model, "b_V", None)
    return not (isinstance(b, torch.Tensor) and bool(b.detach().abs().max() > 0))


def saelens_processing(kwargs: Any) -> dict[str, bool] | None:
    """A SAELens file's side, from its ``model_from_pretrained_kwargs`` (``HookedTransformer.from_pretrained``'s
    defaults where a key is absent); None when the file does not say how its model was loaded."""
    if not isinstance(kwargs, dict):
        return None
    return {"norm_folded": bool(kwargs.get("fold_ln", True)),
            "residual_centered": bool(kwargs.get("center_writing_weights", True)),
            "value_bias_folded": bool(kwargs.get("fold_value_biases", True))}


def depends_on(hook: str) -> tuple[str, ...]:
    """The processing settings that change what ``hook`` holds."""
    tail = hook.split(".", 2)[2] if hook.startswith("blocks.") else hook
    if tail in _NORM_OUTPUTS:
        return ("norm_folded",)
    if tail in _RESIDUAL:
        return ("residual_centered",)
    if tail in _VALUES:
        return ("value_bias_folded",)
    if tail == "attn.hook_result":  # each head's output: its value bias (or not) and its share of the centring
        return ("residual_centered", "value_bias_folded")
    return ()


def check_processing(view: "ModelView", dictionary: "Dictionary") -> None:
    """Raise ``LensInputError`` naming the fix when ``dictionary`` was read under processing that changes one of its
    hooks on ``view``'s model (residual centring only matters on LayerNorm models)."""
    rec = dictionary.meta.get("processing")
    if not isinstance(rec, dict):
        return
    model = processing(view)
    for hook in dict.fromkeys((dictionary.hook, dictionary.writes)):
        for key in depends_on(hook):
            if key == "residual_centered" and view.decoder.kind != "LN":
                continue
            if key == "value_bias_folded" and not _has_value_bias(view, model[key]):
                continue
            if rec.get(key) is None or bool(rec[key]) == model[key]:
                continue
            raise LensInputError(_mismatch(view, hook, key, bool(rec[key])))


def _has_value_bias(view: "ModelView", folded: bool) -> bool:
    """Whether the model has value biases: ``b_V`` on a raw model; once folded they live in ``b_O`` (a model with an
    output bias but no value bias counts too: the check then errs on the side of refusing)."""
    b = getattr(view.model, "b_O" if folded else "b_V", None)  # absent on bias-free projections
    return isinstance(b, torch.Tensor) and bool(b.detach().abs().max() > 0)


def _mismatch(view: "ModelView", hook: str, key: str, trained: bool) -> str:
    """The refusal: how the dictionary read ``hook``, how this model holds it, and how to load the model instead."""
    model = processing(view)[key]
    if key == "norm_folded":
        was = ("without the norm's gain (folded into the next weights)" if trained
               else "with the norm's gain applied (as the Hugging Face module sees it)")
        now = "folds the gains (TransformerLens compatibility mode)" if model else "applies the gains (raw)"
    elif key == "value_bias_folded":
        was = "without the value bias (folded into b_O)" if trained else "with the value bias (raw)"
        now = "folds the value biases into b_O (compatibility mode)" if model else "keeps the value biases (raw)"
    else:
        was = "mean-free (TransformerLens centred the writing weights)" if trained else "with its mean (raw)"
        now = "has a mean-free residual stream (compatibility mode)" if model else "keeps the mean (raw)"
    fix = ("mi_lenses.load_model(..., compatibility_mode=True) (a HookedTransformer: from_pretrained's defaults)"
           if trained else "mi_lenses.load_model(..., compatibility_mode=False) (a HookedTransformer: "
           "from_pretrained_no_processing)")
    return (f"this dictionary read {hook} {was}, but {view.name} {now}: its features would be silently wrong. "
            f"Load the model as the dictionary was trained: {fix}.")
