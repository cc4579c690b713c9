"""The parity probe: a TransformerLens model against the Hugging Face model it wraps, on a few tokens.

TransformerLens's adapters can be wrong for an architecture (TransformerLens 4.3 ignores Gemma 3's
``attn_logit_softcapping``; its compatibility mode mis-folds a Qwen2-MoE whose shared expert is as wide as the residual
stream; its CodeGen bridge cannot run under transformers 5.24). Every identity mi_lenses checks compares the lens with
the booted model, so a model that disagrees with Hugging Face would give lenses that verify and are wrong. The probe
compares the booted model's log-probabilities with the Hugging Face model's on a short prompt (8 tokens) and refuses
the model beyond a tolerance:

* :func:`mi_lenses.load_model` computes the Hugging Face reference *before* booting (the bridge rewires the HF model in
  place and compatibility mode rewrites its weights), probes the booted model, and, where only compatibility mode
  breaks, reloads in raw mode with a warning;
* every entry point given a model that ``load_model`` did not make (``ModelView`` runs :func:`ensure_checked` once
  per model object) reloads the Hugging Face weights from where the model came from (a local folder, or the local
  Hugging Face cache: nothing is downloaded), probes, and refuses a model that disagrees. Where no copy of the weights
  can be found (a model built in memory) it warns once and goes on; :func:`check_parity` with ``hf_model=`` checks
  such a model explicitly, and :func:`skip_parity` (or ``MI_LENSES_PARITY=0``) opts out.

Example (the doctest model was built in memory and checked against its Hugging Face twin when it was booted):
    >>> report = parity_report(model)
    >>> report.passed, report.gap < report.tolerance, report.tokens
    (True, True, 8)
    >>> skip_parity(model).passed                       # an explicit opt-out is recorded as such
    True
"""

from __future__ import annotations

import math
import os
import time
import warnings
import weakref
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache  # (comes with transformers; a file-system lookup, no network)
from jaxtyping import Float, Int
from torch import Tensor

from mi_lenses.errors import LensInputError, ModelLoadError
from mi_lenses.models.kv import is_bridge
from mi_lenses.models.interventions import active_hooks

PROBE_TEXT = "The capital of France is Paris, and the capital of Italy is Rome. One two three"
PROBE_TOKENS = 8
# Largest |difference| of log-probabilities (nats) tolerated between the booted model and Hugging Face, per parameter
# dtype. Measured on healthy models (TL 4.3, 27 tiny architectures and SmolLM2): float32 <= 4e-5 nats (1e-5 on the
# tiny models); a raw bridge in bfloat16 runs Hugging Face's own modules (gap 0); a bridge in compatibility mode in
# bfloat16 rounds the weights TransformerLens folded in float32 (0.02-0.13 nats on the tiny models, 0.51 on SmolLM2:
# refused, so such a model falls back to raw). The TransformerLens bugs it catches are 0.6 nats and more in float32.
TOLERANCE = {torch.float64: 0.01, torch.float32: 0.01, torch.float16: 0.1, torch.bfloat16: 0.25}
# A model an entry point is given is checked by reloading its Hugging Face weights: skipped (with a warning) above this
# many bytes of parameters, where the second copy would cost too much memory; check_parity(model, hf_model) still works.
RELOAD_LIMIT_BYTES = 2 << 30
ENV = "MI_LENSES_PARITY"  # "0" / "off" / "false": no probe at entry points (load_model(check_parity=...) decides there)
ISSUES = "https://github.com/TransformerLensOrg/TransformerLens/issues"


@dataclass(frozen=True)
class ParityReport:
    """What the probe measured: the largest log-probability gap (nats) and KL between the TransformerLens model and the
    Hugging Face model on ``tokens`` tokens, the tolerance, and where the reference came from (``"skipped"`` when the
    probe was switched off, ``"not found"`` when no Hugging Face copy of an entry point's model could be found)."""

    architecture: str
    variant: str  # how the model was loaded: "raw" / "compat" (bridge) or "hooked" / "hooked-folded"
    dtype: str
    tokens: int
    gap: float
    kl: float
    top1_agreement: float
    tolerance: float
    seconds: float  # the probe's time: the reference (reloading it too, at an entry point) and the model's forward
    oracle: str  # where the Hugging Face reference came from

    @property
    def checked(self) -> bool:
        """Whether the model was compared with Hugging Face at all."""
        return self.oracle not in ("skipped", "not found")

    @property
    def passed(self) -> bool:
        """Within tolerance, or not checked (see :attr:`checked`)."""
        return not self.checked or self.gap <= self.tolerance

    def __str__(self) -> str:
        if not self.checked:
            return f"parity probe {self.oracle} ({self.architecture}, {self.variant})"
        return (f"parity probe: {self.architecture} ({self.variant}, {self.dtype}) vs Hugging Face on {self.tokens} tokens: "
                f"max |Δ log p| = {self.gap:.3g} nats, max KL = {self.kl:.3g} (tolerance {self.tolerance:g}), "
                f"{'passed' if self.passed else 'FAILED'} in {self.seconds * 1000:.0f} ms")


_REPORTS: "weakref.WeakKeyDictionary[Any, ParityReport]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------- measuring
def tolerance_for(dtype: torch.dtype) -> float:
    """The probe's tolerance (nats) for a model with parameters of ``dtype``."""
    return TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])


def probe_tokens(ids: list[int] | Tensor, n_ctx: int | None = None) -> Int[Tensor, "1 n"]:
    """The first :data:`PROBE_TOKENS` ids of a tokenised :data:`PROBE_TEXT` (fewer when the context is shorter)."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = min(PROBE_TOKENS, len(ids), n_ctx or PROBE_TOKENS)
    return ids[:n][None]


@torch.no_grad()
def hf_reference(hf_model: Any, tokens: Int[Tensor, "1 n"]) -> Float[Tensor, "n vocab"]:
    """Log-probabilities (float32, CPU) of an *untouched* Hugging Face causal LM on ``tokens``."""
    device = next(hf_model.parameters()).device
    out = hf_model(input_ids=tokens.to(device), use_cache=False)
    return out.logits[0].float().log_softmax(-1).cpu()


def architecture_of(model: Any) -> str:
    """The Hugging Face ``model_type`` of a TransformerLens model (its ``original_architecture`` otherwise)."""
    hf = getattr(model, "original_model", None)
    arch = getattr(getattr(hf, "config", None), "model_type", None)
    return str(arch or getattr(model.cfg, "original_architecture", None) or type(model).__name__)


def mode_of(model: Any) -> str:
    if is_bridge(model):
        return "compat" if getattr(model, "compatibility_mode", False) else "raw"
    return "hooked" if getattr(model.cfg, "normalization_type", None) in ("LN", "RMS") else "hooked-folded"


def param_dtype(model: Any) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None else torch.float32


@torch.no_grad()
def measure(model: Any, tokens: Int[Tensor, "1 n"], reference: Float[Tensor, "n vocab"], *, source: str,
            architecture: str | None = None, reference_seconds: float = 0.0) -> ParityReport:
    """Run ``model`` on ``tokens`` and compare its log-probabilities with ``reference`` (which took
    ``reference_seconds`` to make). Exceptions of the forward pass propagate (the caller words them)."""
    t0 = time.perf_counter() - reference_seconds
    logits = model(tokens.to(_device(model)), return_type="logits")
    lp = logits[0].float().log_softmax(-1).cpu()
    ref = reference
    vocab = min(lp.shape[-1], ref.shape[-1])  # TransformerLens may pad or trim the vocabulary; compare the shared part
    if lp.shape[-1] != ref.shape[-1]:
        lp, ref = lp[..., :vocab].log_softmax(-1), ref[..., :vocab].log_softmax(-1)
    if lp.shape != ref.shape or not torch.isfinite(lp).all():
        gap = kl = math.inf
        top1 = 0.0
    else:
        gap = float((lp - ref).abs().max())
        kl = float((ref.exp() * (ref - lp)).sum(-1).max())
        top1 = float((lp.argmax(-1) == ref.argmax(-1)).float().mean())
    dtype = param_dtype(model)
    return ParityReport(architecture or architecture_of(model), mode_of(model), str(dtype).replace("torch.", ""),
                        int(tokens.shape[-1]), gap, kl, top1, tolerance_for(dtype), time.perf_counter() - t0, source)


def _device(model: Any) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- wording
def versions() -> str:
    """The TransformerLens and transformers versions, for messages."""
    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "?"

    return f"TransformerLens {v('transformer-lens')}, transformers {v('transformers')}"


def disagreement(report: ParityReport, *, fix: str) -> str:
    """The message of a model that disagrees with Hugging Face: who is wrong, by how much, and how to proceed."""
    what = {"raw": "TransformerBridge", "compat": "TransformerBridge in compatibility mode",
            "hooked": "HookedTransformer", "hooked-folded": "HookedTransformer (folded weights)"}[report.variant]
    return (
        f"{versions()}: the {what} of this {report.architecture!r} model disagrees with the Hugging Face model it "
        f"was built from: its log-probabilities differ by up to {report.gap:.3g} nats (KL up to {report.kl:.3g}) on a "
        f"{report.tokens}-token probe, beyond the tolerance of {report.tolerance:g} for {report.dtype}. Lenses and "
        f"attributions on it would be silently wrong, so mi_lenses refuses it. This is a TransformerLens bug for this "
        f"architecture: report it at {ISSUES} (architecture, config, versions above). {fix}"
    )


def forward_failure(architecture: str, mode: str, err: BaseException, dtype: torch.dtype = torch.float32) -> str:
    """The message of a model TransformerLens boots but cannot run."""
    other = (f" (in {str(dtype).replace('torch.', '')}; float32 may work: load_model(..., dtype=torch.float32))"
             if dtype != torch.float32 else "")
    return (
        f"{versions()}: TransformerLens wraps this {architecture!r} model ({mode}) but cannot run it: its first "
        f"forward pass{other} fails with {type(err).__name__}: {err}. This is a TransformerLens bug (or an incompatibility "
        f"with this transformers version) for this architecture: report it at {ISSUES}; meanwhile use versions of "
        f"TransformerLens and transformers that support it together."
    )


# ---------------------------------------------------------------------------------------------- the registry
def register(model: Any, report: ParityReport) -> ParityReport:
    """Record ``report`` as ``model``'s probe result (entry points then do not probe it again)."""
    try:
        _REPORTS[model] = report
    except TypeError:  # not weak-referenceable
        pass
    return report


def parity_report(model: Any) -> ParityReport | None:
    """The probe's result for ``model`` (``None`` when it was never probed).

    Args:
        model: the TransformerLens model (or a ``ModelView`` of it).

    Returns:
        The :class:`ParityReport` recorded by :func:`check_parity`, :func:`skip_parity` or an entry point's probe, or
        ``None``.
    """
    model = getattr(model, "model", model) if type(model).__name__ == "ModelView" else model
    try:
        return _REPORTS.get(model)
    except TypeError:
        return None


def _unchecked(model: Any, source: str) -> ParityReport:
    dtype = param_dtype(model)
    return ParityReport(architecture_of(model), mode_of(model), str(dtype).replace("torch.", ""), 0, 0.0, 0.0, 1.0,
                        tolerance_for(dtype), 0.0, source)


def skip_parity(model: Any) -> ParityReport:
    """Opt ``model`` out of the probe at every entry point (e.g. weights you changed on purpose); returns the
    record.

    Args:
        model: the TransformerLens model never to probe.

    Returns:
        The :class:`ParityReport` recorded for it, with ``oracle`` ``"skipped"`` (no comparison is run).
    """
    return register(model, _unchecked(model, "skipped"))


def check_parity(model: Any, hf_model: Any = None, *, tolerance: float | None = None) -> ParityReport:
    """Compare ``model`` (a ``TransformerBridge`` or ``HookedTransformer``) with Hugging Face on the probe prompt and
    record the result; raise :class:`~mi_lenses.errors.ModelLoadError` beyond the tolerance.

    Args:
        model: the TransformerLens model.
        hf_model: an *untouched* Hugging Face model with the same weights (not the one the bridge wraps: booting
            rewires it in place). ``None``: reload it from the folder or local Hugging Face cache the model came from
            (nothing is downloaded); a model with no such copy is recorded as ``"not found"``.
        tolerance: largest log-probability gap in nats (default: :data:`TOLERANCE` for the model's dtype).
    """
    if hf_model is not None and hf_model is getattr(model, "original_model", None):
        raise LensInputError(
            "hf_model is the model this bridge wraps (booting rewired it in place, so it runs the bridge itself): "
            "pass an untouched copy, e.g. AutoModelForCausalLM.from_pretrained(...) again or a copy.deepcopy made "
            "before booting."
        )
    tokens = _model_probe_tokens(model)
    arch = architecture_of(model)
    t0 = time.perf_counter()
    source = "hf_model"
    if hf_model is None:
        source = find_source(model)
        if source is None:
            return register(model, _unchecked(model, "not found"))
        hf_model = load_reference(source, param_dtype(model))
    reference = hf_reference(hf_model, tokens)
    del hf_model
    try:
        report = measure(model, tokens, reference, source=source, architecture=arch,
                         reference_seconds=time.perf_counter() - t0)
    except Exception as err:  # any failure of TransformerLens's forward pass
        raise ModelLoadError(forward_failure(arch, mode_of(model), err, param_dtype(model))) from err
    if tolerance is not None:
        report = ParityReport(**{**report.__dict__, "tolerance": float(tolerance)})
    register(model, report)
    if not report.passed:
        fix = ("A bridge in compatibility mode may work raw: mi_lenses.load_model(<folder>, compatibility_mode=False) "
               "checks it. " if report.variant == "compat" else "")
        raise ModelLoadError(disagreement(report, fix=fix + "If you changed the weights on purpose, "
                                          "mi_lenses.skip_parity(model) accepts the model as it is."))
    return report


def _model_probe_tokens(model: Any) -> Int[Tensor, "1 n"]:
    """The probe prompt in ``model``'s tokenisation; fixed ids spread over the vocabulary for a model without a
    tokenizer."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if getattr(model, "tokenizer", None) is None:
        vocab = int(model.cfg.d_vocab)
        return probe_tokens([(1 + 7919 * i) % vocab for i in range(PROBE_TOKENS)], n_ctx)
    return probe_tokens(model.to_tokens(PROBE_TEXT)[0], n_ctx)


def ensure_checked(model: Any) -> None:
    """Probe a model an entry point was given, once per model object (see the module docstring); raise
    :class:`~mi_lenses.errors.ModelLoadError` for a model that disagrees with Hugging Face (again at every entry point
    until it is fixed or skipped)."""
    report = parity_report(model)
    if report is not None:
        if not report.passed:
            raise ModelLoadError(disagreement(report, fix="If you changed the weights on purpose, "
                                              "mi_lenses.skip_parity(model) accepts the model as it is."))
        return
    if os.environ.get(ENV, "1").lower() in ("0", "off", "false", "no") or not hasattr(model, "parameters"):
        return
    if _user_hooks_active(model):
        return  # a forward pass would run the user's hooks: probe at a later call, when they are gone
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if n_bytes > RELOAD_LIMIT_BYTES:
        warnings.warn(
            f"mi_lenses: this model ({n_bytes / 2**30:.1f} GiB of weights) was not made by mi_lenses.load_model, so it "
            f"was not compared with Hugging Face (reloading its weights for the check would double its memory). "
            f"mi_lenses.check_parity(model, hf_model) checks it; mi_lenses.skip_parity(model) silences this.",
            stacklevel=3)
        skip_parity(model)
        return
    report = check_parity(model)
    if not report.checked:
        warnings.warn(
            f"mi_lenses: could not compare this {report.architecture!r} model with Hugging Face (no local copy of its "
            f"weights was found, e.g. it was built in memory): TransformerLens bugs for an architecture would go "
            f"unnoticed. mi_lenses.check_parity(model, hf_model=<an untouched HF model>) checks it; "
            f"mi_lenses.skip_parity(model) silences this.", stacklevel=3)


def _user_hooks_active(model: Any) -> bool:
    return bool(active_hooks(model))  # not the bridge's own wiring (OPT), which would defer the probe forever


# ---------------------------------------------------------------------------------------------- the reference
def find_source(model: Any) -> str | None:
    """Where the Hugging Face weights of a TransformerLens model can be reloaded from without the network: a local
    model folder, or a hub name whose files are in the local Hugging Face cache."""
    names: list[str] = []
    if is_bridge(model):
        hf = getattr(model, "original_model", None)
        names += [getattr(getattr(hf, "config", None), "_name_or_path", None), getattr(hf, "name_or_path", None),
                  getattr(model.cfg, "model_name", None)]
    elif isinstance(getattr(model.cfg, "model_name", None), str):
        try:  # a HookedTransformer knows its hub name through TransformerLens's alias table
            from transformer_lens.loading_from_pretrained import get_official_model_name  # deferred: TL 3.x only

            names.append(get_official_model_name(model.cfg.model_name))
        except (ImportError, ValueError):
            # ImportError: a TransformerLens without the alias table; ValueError: TransformerLens's answer for a name
            # that is no official name or alias (a model built locally): either way there is no hub name to look for
            pass
    names = [n for n in names if isinstance(n, str) and n]
    for name in dict.fromkeys(names):
        path = Path(os.path.expanduser(name))
        if path.is_dir() and (path / "config.json").is_file() and _has_weights(path):
            return str(path)
        if "/" in name or not path.exists():
            if _in_hf_cache(name):
                return name
    return None


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _in_hf_cache(name: str) -> bool:
    try:
        hit = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repository id (huggingface_hub's HFValidationError is a ValueError)
        return False
    return isinstance(hit, str)


def load_reference(source: str, dtype: torch.dtype) -> Any:
    """The Hugging Face model at ``source`` (local files only, eager attention, eval mode)."""
    # deferred: transformers costs seconds to import; only loading needs it
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging  # (deferred, as above)

    hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True,
                                                    attn_implementation="eager").eval()
    except Exception as err:
        raise ModelLoadError(f"could not reload the Hugging Face model at {source!r} to check TransformerLens "
                             f"against it ({type(err).__name__}: {err}); mi_lenses.check_parity(model, hf_model) "
                             "takes one you have, mi_lenses.skip_parity(model) skips the check.") from err
